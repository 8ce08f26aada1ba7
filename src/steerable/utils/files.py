"""Atomic writes: a file is either its old content or its complete new content, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN/inf are refused)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``, keeping the old one until the swap.

    If the process dies mid-swap, ``target.with_suffix('.old')`` still holds the previous version;
    :func:`recover_dir` restores it.
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(target: Path) -> Path | None:
    """Return ``target`` if it exists, else a complete previous version left by an interrupted swap."""
    if target.exists():
        return target
    old = target.with_name(target.name + ".old")
    if old.exists():
        os.replace(old, target)
        return target
    return None
