"""The service's memory: one cache bounded in bytes (least recently used out, whatever the kind of entry),
entries measured without the model's own weights, answers identical with and without the cache, and
personalisation and next-query reading only the newest ``max_context`` stored pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.errors import ConfigError
from steerable.models import build_reward_model
from steerable.service import Limits
from steerable.service.caches import ByteLRU, nbytes, shared_storages
from steerable.service.engine import Engine, resolve_device
from steerable.service.store import open_store


def test_the_lru_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = ByteLRU(max_bytes=3000)
    assert cache.put("a", 1, 600) and cache.put("b", 2, 600) and cache.put("c", 3, 600)
    assert cache.get("a") == 1  # now the most recently used: "b" goes first
    assert cache.put("d", 4, 600)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("d") == 4
    assert cache.bytes <= 3000 and cache.stats()["evictions"] == 1
    assert not cache.put("huge", 5, 5000) and cache.get("huge") is None  # larger than the whole cache
    cache.put("a", 6, 2000)  # replacing an entry frees its old size first
    assert cache.get("a") == 6 and cache.bytes <= 3000
    cache.pop("a")
    assert cache.get("a") is None and cache.bytes == sum(s for _, s in cache._items.values())
    assert not ByteLRU(0).put("x", 1, 0)


def test_entries_are_measured_without_the_models_weights():
    model = build_reward_model(tiny_config("np-btl", input_dim=8, hidden_dim=64, latent_dim=32), seed=0)
    shared = shared_storages([model], lambda: [model.personalize()])
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    user = model.personalize(chosen, rejected)
    size = nbytes(user, shared)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 32 * 4 <= size < weights / 4  # its z (32 floats) and more, but none of the weights
    assert nbytes(user) >= size  # shared storages (e.g. folded decoder weights) are left out, if any
    array = np.zeros((100, 384), dtype=np.float32)
    assert array.nbytes <= nbytes(array) < array.nbytes + 200
    assert nbytes([array[0], array[1]]) >= array.nbytes  # views keep their whole base alive
    assert nbytes(torch.zeros(1000)) >= 4000


def _engine(tmp_path, name: str, cache_bytes: int, max_context: int = 20) -> Engine:
    model = build_reward_model(tiny_config("np-btl", input_dim=4), seed=0)
    store = open_store(tmp_path / f"{name}.db")
    limits = Limits(max_context=max_context, max_cache_bytes=cache_bytes)
    return Engine([model], store, limits=limits)


def test_a_small_cache_stays_under_its_cap_and_answers_as_without_a_cache(tmp_path):
    capped, uncached = _engine(tmp_path, "capped", 40_000), _engine(tmp_path, "uncached", 0)
    rng = np.random.default_rng(1)
    options = rng.normal(size=(6, 4)).round(3).tolist()
    inline = [{"chosen": rng.normal(size=4).tolist(), "rejected": rng.normal(size=4).tolist()}]
    try:
        for u in range(40):
            pairs = [
                {"chosen": rng.normal(size=4).round(3).tolist(), "rejected": rng.normal(size=4).tolist()}
                for _ in range(5 + u % 7)
            ]
            capped.store.add_pairs(f"u{u}", pairs)
            uncached.store.add_pairs(f"u{u}", pairs)
        for step, u in enumerate([*range(40), *range(40)] + [u for u in range(40) for _ in range(2)]):
            if step % 7 == 0:  # a write between two reads must be seen (the cache is keyed on it)
                for engine in (capped, uncached):
                    engine.store.add_pairs(f"u{u}", inline)
            context = inline if u % 3 == 0 else None
            got = capped.score(f"u{u}", options, None, context)
            assert got == uncached.score(f"u{u}", options, None, context), u
            assert capped.cache.bytes <= 40_000
        stats = capped.cache.stats()
        assert stats["evictions"] > 0 and stats["hits"] > 0 and 0 < stats["entries"] < 80
        assert uncached.cache.stats()["entries"] == 0
    finally:
        capped.close()
        uncached.close()


class CountingStore:
    """A store that records the arguments of every ``pairs`` read."""

    def __init__(self, store) -> None:
        self.store, self.reads = store, []

    def pairs(self, user_id, last=None, after=0, limit=None):
        self.reads.append({"last": last, "limit": limit})
        return self.store.pairs(user_id, last=last, after=after, limit=limit)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_personalisation_and_next_query_read_only_the_newest_pairs(tmp_path):
    engine = _engine(tmp_path, "reads", 10**6, max_context=5)
    counting = CountingStore(engine.store)
    engine.store = counting
    rng = np.random.default_rng(2)
    stored = [
        {"chosen": rng.normal(size=4).tolist(), "rejected": rng.normal(size=4).tolist()} for _ in range(12)
    ]
    engine.store.add_pairs("amy", stored)
    try:
        assert engine.score("amy", [[0.0] * 4], None, None)[1] == 5
        assert engine.score("amy", [[0.0] * 4], None, None)[1] == 5  # cached: no read
        assert engine.score("amy", [[0.0] * 4], None, stored[:2])[1] == 5
        old, new = stored[0], stored[-1]  # answered long ago (not among the newest 5), and just now
        candidates = [{"a": old["chosen"], "b": old["rejected"]}, {"a": new["rejected"], "b": new["chosen"]}]
        candidates.append({"a": [0.0] * 4, "b": [1.0] * 4})
        got = engine.next_query("amy", candidates, "uncertainty", seed=0)
        assert got["excluded"] == [1] and got["num_context"] == 5
        assert len(counting.reads) == 3
        assert all(r["last"] is not None and r["last"] <= 5 for r in counting.reads), counting.reads
    finally:
        engine.close()


def test_devices_are_checked_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            resolve_device("cuda:3")


def test_only_requests_that_need_no_stored_pairs_are_quick(tmp_path):
    """Numeric score/compare run on the event loop only when quick: a cache miss reads and personalises
    the user's pairs, which may take long, and goes to the threadpool instead."""
    engine = _engine(tmp_path, "quick", 10**6)
    pair = {"chosen": [0.0, 1.0, 2.0, 3.0], "rejected": [1.0, 0.0, 0.0, 0.0]}
    try:
        assert engine.quick(None, 0) and engine.quick("nobody", 5) and engine.quick(None, 100)
        assert not engine.quick(None, 101)
        engine.store.add_pairs("kim", [pair])
        assert not engine.quick("kim", 0) and not engine.quick("kim", 1)
        engine.score("kim", [[0.0] * 4], None, None)
        assert engine.quick("kim", 0)
        engine.store.add_pairs("kim", [pair])  # a write (through any replica) makes it slow again
        assert not engine.quick("kim", 0)
    finally:
        engine.close()
