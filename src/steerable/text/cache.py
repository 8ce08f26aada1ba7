"""On-disk embedding cache: sharded, append-only, safe to kill, bounded in size.

Layout: ``<root>/embeddings/<namespace>/meta.json`` describes what the namespace holds (model fingerprint,
pooling, maximum length, ...); ``shard-*.safetensors`` files each hold ``keys`` (n, 32) uint8 — SHA-256 of
the exact text embedded — and ``vectors`` (n, D) float32. A shard is written to a temporary file and
renamed into place, so it is either complete or absent: a run killed mid-way keeps every finished shard
and a rerun computes only what is missing. Any number of processes may add shards to one namespace (names
carry the writer's rank and a unique id).

The index — which shard and row holds each key, and when each shard was last used — is an SQLite file
(``index.sqlite``) next to the shards, so a process holds none of it in memory and it shrinks with the
shards it describes. Shards found on disk but not in the index (written by a process killed before it
indexed them, or by an older version) are indexed when a cache is opened; index entries of shards that
are gone are dropped.

Size: the whole cache root is kept under ``max_bytes`` (``$STEERABLE_CACHE_MAX_SIZE``, default 10 GiB):
after a read that follows new shards, the least recently used shards of any namespace are deleted until
the cache is at 90 % of the cap (the shards just read are kept). ``steerable cache prune --max-size
SIZE`` does the same on demand. A vector whose shard was deleted is simply embedded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from steerable.errors import ConfigError, SteerableError
from steerable.utils.files import atomic_path, write_json_atomic

DEFAULT_MAX_SIZE = "10G"
INDEX_NAME = "index.sqlite"
TOUCH_EVERY_S = 60.0  # a shard's last use is recorded at most this often
PRUNE_TO = 0.9  # automatic pruning goes down to this fraction of the cap (not at every call)
LOOKUP_CHUNK = 500  # keys per SQL lookup
INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (key BLOB PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_shard ON keys (shard);
"""


class MissingVectors(SteerableError, KeyError):
    """Some keys have no vector (never embedded, or their shard was pruned meanwhile)."""


def text_key(text: str) -> bytes:
    """The 32-byte SHA-256 of a text, its identity in the cache."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def namespace_id(description: dict[str, Any]) -> str:
    """A short stable id of everything that determines an embedding besides the text."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$STEERABLE_CACHE`` or ``~/.cache/steerable``."""
    return Path(os.environ.get("STEERABLE_CACHE", Path.home() / ".cache" / "steerable"))


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GiB', '10GB' or a number of bytes -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"expected a size like 500M, 2G or 1.5GiB, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def default_max_bytes() -> int:
    """``$STEERABLE_CACHE_MAX_SIZE`` (e.g. ``20G``) or 10 GiB."""
    return parse_size(os.environ.get("STEERABLE_CACHE_MAX_SIZE", DEFAULT_MAX_SIZE))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA auto_vacuum=FULL")  # the file shrinks when shards are forgotten (new files)
    conn.execute("PRAGMA synchronous=NORMAL")  # an index lost in a power cut is rebuilt from the shards
    conn.executescript(INDEX_SCHEMA)
    return conn


def _chunks(items: list[bytes]) -> Iterable[list[bytes]]:
    for start in range(0, len(items), LOOKUP_CHUNK):
        yield items[start : start + LOOKUP_CHUNK]


class EmbeddingCache:
    """Embeddings of one namespace (one model + settings) under ``root``; thread-safe.

    ``missing`` answers as of the last :meth:`refresh` (plus this cache's own shards), so processes that
    share out the missing texts all see the same list even while the others write."""

    def __init__(self, root: str | Path, description: dict[str, Any], max_bytes: int | None = None) -> None:
        self.description = description
        self.root = Path(root)
        self.dir = self.root / "embeddings" / namespace_id(description)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            write_json_atomic(meta, description)
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._db = _connect(self.dir / INDEX_NAME)
        self._snapshot = 0  # shards with an id up to this one were there at the last refresh
        self._mine: set[int] = set()  # shards this cache added since
        self._touched: dict[int, float] = {}
        self._grew = False  # shards added since the size was last checked
        self.refresh()

    def close(self) -> None:
        self._db.close()

    # ---- the index -----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """See shards written since the last call by any process; index shard files the index lacks and
        forget indexed shards whose files are gone."""
        with self._lock:
            indexed = dict(self._db.execute("SELECT name, id FROM shards"))
            on_disk = {p.name: p for p in self.dir.glob("shard-*.safetensors")}
            for name in sorted(set(on_disk) - set(indexed)):
                try:
                    with safe_open(str(on_disk[name]), framework="np") as handle:
                        keys = handle.get_tensor("keys")
                    stat = on_disk[name].stat()
                except Exception:  # pruned meanwhile, or not a readable shard: skip it
                    continue
                self._index_shard(name, [k.tobytes() for k in keys], stat.st_size, stat.st_mtime)
            gone = [indexed[name] for name in set(indexed) - set(on_disk)]
            if gone:
                self._forget(gone)
            (last,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM shards").fetchone()
            self._snapshot, self._mine = last, set()

    def _index_shard(self, name: str, keys: list[bytes], size: int, used: float) -> int:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute(
                "INSERT INTO shards (name, rows, bytes, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET rows = rows RETURNING id",
                (name, len(keys), size, used),
            )
            (shard,) = cursor.fetchone()
            self._db.executemany(
                "INSERT OR IGNORE INTO keys (key, shard, row) VALUES (?, ?, ?)",
                [(k, shard, row) for row, k in enumerate(keys)],
            )
        return shard

    def _forget(self, shards: list[int]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for chunk in _chunks(shards):  # type: ignore[arg-type]
                marks = ",".join("?" * len(chunk))
                self._db.execute(f"DELETE FROM keys WHERE shard IN ({marks})", chunk)
                self._db.execute(f"DELETE FROM shards WHERE id IN ({marks})", chunk)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM keys").fetchone()[0])

    def __contains__(self, key: bytes) -> bool:
        return not self.missing([key])

    def _locate(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """key -> (shard id, row) for the keys that are indexed."""
        found: dict[bytes, tuple[int, int]] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, shard, row FROM keys WHERE key IN ({marks})", chunk)
            found.update((k, (s, r)) for k, s, r in rows)
        return found

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys that had no vector at the last refresh and have none from this cache since (order
        kept, duplicates dropped)."""
        unique = list(dict.fromkeys(keys))
        with self._lock:
            found = self._locate(unique)
        return [
            k
            for k in unique
            if k not in found or not (found[k][0] <= self._snapshot or found[k][0] in self._mine)
        ]

    # ---- vectors -------------------------------------------------------------------------------------
    def get(self, keys: list[bytes]) -> np.ndarray:
        """(len(keys), D) float32 vectors. Raises :class:`MissingVectors` when some key has none (its shard
        may have been pruned meanwhile: embed it again)."""
        with self._lock:
            found = self._locate(list(dict.fromkeys(keys)))
            names = dict(self._db.execute("SELECT id, name FROM shards"))
        absent = [k for k in keys if k not in found]
        if absent:
            raise MissingVectors(f"{len(absent)} of {len(keys)} texts have no cached vector")
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = found[key]
            by_shard.setdefault(shard, []).append((i, row))
        out: np.ndarray | None = None
        for shard, items in by_shard.items():
            try:
                with safe_open(str(self.dir / names[shard]), framework="np") as handle:
                    vectors = handle.get_slice("vectors")
                    rows = np.array([r for _, r in items])
                    block = vectors[int(rows.min()) : int(rows.max()) + 1][rows - rows.min()]
            except (OSError, KeyError):  # pruned by another process: forget it, let the caller re-embed
                with self._lock:
                    self._forget([shard])
                raise MissingVectors(f"a cache shard was pruned while reading {len(items)} texts") from None
            if out is None:
                out = np.empty((len(keys), block.shape[1]), dtype=np.float32)
            out[[i for i, _ in items]] = block
        self._touch(list(by_shard))
        if self._grew:
            self._grew = False
            prune_cache(
                self.root,
                int(self.max_bytes * PRUNE_TO),
                keep={self.dir / names[s] for s in by_shard},
                only_if_over=self.max_bytes,
            )
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def _touch(self, shards: list[int]) -> None:
        now = time.time()
        due = [s for s in shards if now - self._touched.get(s, 0.0) > TOUCH_EVERY_S]
        if not due:
            return
        with self._lock:
            self._db.executemany("UPDATE shards SET last_used = ? WHERE id = ?", [(now, s) for s in due])
        self._touched.update(dict.fromkeys(due, now))

    def add(self, keys: list[bytes], vectors: np.ndarray, rank: int = 0) -> Path:
        """Write one shard atomically and index it."""
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        path = self.dir / f"shard-r{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        with atomic_path(path) as tmp:
            save_file(
                {"keys": key_array, "vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp)
            )
        now = time.time()
        with self._lock:
            shard = self._index_shard(path.name, list(keys), path.stat().st_size, now)
            self._mine.add(shard)
            self._touched[shard] = now
        self._grew = True
        return path


# ---- the whole cache ---------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    """What :func:`prune_cache` found and did (sizes in bytes)."""

    before: int
    after: int
    shards_removed: int
    shards_left: int


def _namespaces(root: Path) -> list[Path]:
    return sorted(p for p in (root / "embeddings").glob("*") if p.is_dir())


def _index_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob(INDEX_NAME + "*") if p.is_file())


def prune_cache(
    root: str | Path,
    max_bytes: int,
    keep: set[Path] | frozenset[Path] = frozenset(),
    only_if_over: int | None = None,
) -> PruneReport:
    """Delete the least recently used shards of every namespace under ``root`` until the cache (shards
    and indexes) takes at most ``max_bytes``; shards in ``keep`` stay. With ``only_if_over``, nothing is
    done unless the cache is larger than that."""
    root = Path(root)
    shards: list[tuple[float, Path, int, int]] = []  # (last used, namespace folder, id, bytes)
    fixed = 0
    for folder in _namespaces(root):
        conn = _connect(folder / INDEX_NAME)
        try:
            rows = conn.execute("SELECT last_used, id, bytes, name FROM shards").fetchall()
        finally:
            conn.close()
        fixed += _index_bytes(folder)
        shards += [
            (used, folder, shard, size) for used, shard, size, name in rows if folder / name not in keep
        ]
        fixed += sum(size for _, _, size, name in rows if folder / name in keep)
    before = fixed + sum(size for *_, size in shards)
    if only_if_over is not None and before <= only_if_over:
        return PruneReport(before, before, 0, len(shards))
    total, doomed = before, {}
    for _, folder, shard, size in sorted(shards, key=lambda s: s[0]):
        if total <= max_bytes:
            break
        doomed.setdefault(folder, []).append(shard)
        total -= size
    for folder, ids in doomed.items():
        conn = _connect(folder / INDEX_NAME)
        try:
            names = [
                n
                for (n,) in conn.execute(
                    f"SELECT name FROM shards WHERE id IN ({','.join('?' * len(ids))})", ids
                )
            ]
            with conn:  # the index rows first, then the files (a crash between: the files are indexed again)
                conn.execute("BEGIN IMMEDIATE")
                for chunk in _chunks(ids):  # type: ignore[arg-type]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM keys WHERE shard IN ({marks})", chunk)
                    conn.execute(f"DELETE FROM shards WHERE id IN ({marks})", chunk)
        finally:
            conn.close()
        for name in names:
            (folder / name).unlink(missing_ok=True)
    removed = sum(len(ids) for ids in doomed.values())
    return PruneReport(before, total, removed, len(shards) - removed)
