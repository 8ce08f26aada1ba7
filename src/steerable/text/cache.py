"""On-disk embedding cache: sharded, append-only, safe to kill.

Layout: ``<root>/<namespace>/meta.json`` describes what the namespace holds (model fingerprint, pooling,
maximum length, ...); ``shard-*.safetensors`` files each hold ``keys`` (n, 32) uint8 — SHA-256 of the
exact text embedded — and ``vectors`` (n, D) float32. A shard is written to a temporary file and
renamed into place, so it is either complete or absent: a run killed mid-way keeps every finished shard
and a rerun computes only what is missing. Shards are opened memory-mapped (safetensors ``safe_open``).
Any number of processes may add shards to one namespace (names carry the writer's rank and a unique id).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from steerable.utils.files import atomic_path, write_json_atomic


def text_key(text: str) -> bytes:
    """The 32-byte SHA-256 of a text, its identity in the cache."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def namespace_id(description: dict[str, Any]) -> str:
    """A short stable id of everything that determines an embedding besides the text."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$STEERABLE_CACHE`` or ``~/.cache/steerable``."""
    return Path(os.environ.get("STEERABLE_CACHE", Path.home() / ".cache" / "steerable"))


class EmbeddingCache:
    """Embeddings of one namespace (one model + settings) under ``root``."""

    def __init__(self, root: str | Path, description: dict[str, Any]) -> None:
        self.description = description
        self.dir = Path(root) / "embeddings" / namespace_id(description)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            write_json_atomic(meta, description)
        self._index: dict[bytes, tuple[Path, int]] = {}
        self._seen: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index shards written since the last call (by this or another process)."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._seen:
                continue
            with safe_open(str(shard), framework="np") as handle:
                keys = handle.get_tensor("keys")
            for row, key in enumerate(keys):
                self._index.setdefault(key.tobytes(), (shard, row))
            self._seen.add(shard)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys that have no vector yet (order kept, duplicates dropped)."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def get(self, keys: list[bytes]) -> np.ndarray:
        """(len(keys), D) float32 vectors; every key must be present."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((i, row))
        out: np.ndarray | None = None
        for shard, items in by_shard.items():
            with safe_open(str(shard), framework="np") as handle:
                vectors = handle.get_slice("vectors")
                rows = np.array([r for _, r in items])
                block = vectors[int(rows.min()) : int(rows.max()) + 1][rows - rows.min()]
            if out is None:
                out = np.empty((len(keys), block.shape[1]), dtype=np.float32)
            out[[i for i, _ in items]] = block
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

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
        for row, key in enumerate(keys):
            self._index.setdefault(key, (path, row))
        self._seen.add(path)
        return path
