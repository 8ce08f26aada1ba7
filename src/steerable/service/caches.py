"""Memory of the personalization service, bounded in bytes.

:class:`ByteLRU` is the one cache of a server: personalised models per user and per inline context, and
text embeddings, each entry with its size in bytes; past ``max_bytes`` the least recently used entries
are evicted, whatever their kind. :func:`nbytes` measures an entry: the arrays and tensors it holds
(except storages it shares with the model, such as its weights) plus the Python objects around them.
:class:`TextEncoder` embeds text options through the model's embedder and keeps the vectors in the cache.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any

import numpy as np
import torch

ENTRY_OVERHEAD = 400  # bytes per entry beyond its value: the ordered-dict node, key tuple, size, headers
FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType)  # code, not data


class ByteLRU:
    """A thread-safe map whose values' sizes add up to at most ``max_bytes`` (least recently used out)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        """The value (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: Hashable) -> Any:
        """The value, or None, without counting a hit or a miss or refreshing its recency."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def put(self, key: Hashable, value: Any, size: int) -> bool:
        """Keep ``value`` (``size`` bytes); False when it is larger than the whole cache (not kept)."""
        size += ENTRY_OVERHEAD
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return False
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._items.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
            return True

    def pop(self, key: Hashable) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "max_bytes": self.max_bytes,
                "bytes": self.bytes,
                "entries": len(self._items),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def tensors(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``value`` through containers and object attributes (not through
    modules: their weights belong to the model)."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(
        value, (torch.nn.Module, str, bytes, int, float, np.ndarray, *FUNCTIONS)
    ):
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from tensors(v, seen)
    elif hasattr(value, "__dict__"):
        yield from tensors(vars(value), seen)


def shared_storages(models: list[torch.nn.Module], personalize: Any) -> set[int]:
    """Storages that every personalised model shares (the models' parameters and buffers, and what two
    independent personalisations have in common, e.g. folded decoder weights): not counted per entry."""
    shared = {_storage(t)[0] for m in models for t in [*m.parameters(), *m.buffers()]}
    first = {_storage(t)[0] for t in tensors(personalize())}
    second = {_storage(t)[0] for t in tensors(personalize())}
    return shared | (first & second)


def nbytes(value: Any, shared: set[int] = frozenset(), seen: set[int] | None = None) -> int:  # type: ignore[assignment]
    """Approximate bytes held by ``value``: its arrays and tensors (each storage once, none in ``shared``)
    and the Python objects around them; modules count nothing (they are the model's)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, (torch.nn.Module, *FUNCTIONS)):
        return 0
    if isinstance(value, torch.Tensor):
        pointer, size = _storage(value)
        if pointer in shared or pointer in seen:
            return sys.getsizeof(value)
        seen.add(pointer)
        return sys.getsizeof(value) + size
    if isinstance(value, np.ndarray):  # its header, and the buffer of the array owning its data (once)
        header = sys.getsizeof(value) - (value.nbytes if value.base is None else 0)
        owner = value
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        pointer = owner.__array_interface__["data"][0]
        if pointer in seen:
            return header
        seen.add(pointer)
        return header + owner.nbytes
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        return size + sum(nbytes(k, shared, seen) + nbytes(v, shared, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return size + sum(nbytes(v, shared, seen) for v in value)
    if hasattr(value, "__dict__"):
        return size + nbytes(vars(value), shared, seen)
    return size


class TextEncoder:
    """Options as conversations -> vectors through the model's embedder (and its disk cache), with the
    vectors kept in ``cache`` under the SHA-256 of the rendered text (not the text itself)."""

    def __init__(self, embedder: Any, cache: ByteLRU) -> None:
        self.embedder, self.cache = embedder, cache
        self.lock = threading.Lock()  # the embedder (tokenizer, model) is used by one thread at a time

    def __call__(self, conversations: list[list[dict[str, str]]]) -> np.ndarray:
        """(N,) conversations -> (N, D) float32."""
        with self.lock:
            texts = [self.embedder.render(c) for c in conversations]
        keys = [("text", hashlib.sha256(t.encode("utf-8")).digest()) for t in texts]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = {k: t for k, t in zip(keys, texts, strict=True) if found[k] is None}
        if missing:
            with self.lock:
                vectors = self.embedder.embed_texts(list(missing.values()), progress=False)
            for k, v in zip(missing, vectors, strict=True):
                found[k] = np.array(v, dtype=np.float32)  # a copy: a row would keep the whole block alive
                self.cache.put(k, found[k], nbytes(found[k]))
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)
