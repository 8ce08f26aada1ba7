"""The on-disk embedding cache's size: least recently used shards go first (on demand with ``steerable
cache prune`` and automatically past the cap), the index shrinks with the shards, shards the index lacks
are indexed, and vectors whose shard vanished are embedded again."""

from __future__ import annotations

import numpy as np
import pytest

from steerable.cli import main
from steerable.errors import ConfigError
from steerable.text import cache as cache_module
from steerable.text.cache import INDEX_NAME, EmbeddingCache, MissingVectors, parse_size, prune_cache, text_key


def _shard(cache: EmbeddingCache, name: str, n: int = 50, dim: int = 64):
    keys = [text_key(f"{name} {i}") for i in range(n)]
    path = cache.add(keys, np.full((n, dim), float(len(name)), dtype=np.float32))
    return keys, path


def _size(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".json")


def test_sizes_are_parsed_in_binary_units():
    assert parse_size("500M") == 500 * 2**20 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("10GB") == 10 * 2**30 and parse_size("4096") == 4096 and parse_size("2k") == 2048
    with pytest.raises(ConfigError, match="like 500M"):
        parse_size("2X")


def test_prune_removes_the_least_recently_used_shards_first(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "TOUCH_EVERY_S", 0.0)
    cache = EmbeddingCache(tmp_path, {"model": "x"}, max_bytes=2**40)
    shards = {name: _shard(cache, name) for name in ("a", "bb", "ccc", "dddd")}
    cache.get(shards["a"][0])  # "a" is now the most recently used
    one = shards["a"][1].stat().st_size
    index = sum(p.stat().st_size for p in cache.dir.glob(INDEX_NAME + "*"))
    report = prune_cache(tmp_path, index + 2 * one + one // 2)  # room for two shards
    assert (report.shards_removed, report.shards_left) == (2, 2) and report.after < report.before
    assert not shards["bb"][1].exists() and not shards["ccc"][1].exists()
    assert shards["a"][1].exists() and shards["dddd"][1].exists()
    fresh = EmbeddingCache(tmp_path, {"model": "x"})
    assert len(fresh) == 100  # the index forgot the pruned shards' keys
    assert fresh.missing(shards["bb"][0] + shards["a"][0]) == shards["bb"][0]
    np.testing.assert_array_equal(fresh.get(shards["dddd"][0][:2]), np.full((2, 64), 4.0))


def test_past_the_cap_the_cache_prunes_itself_and_its_index_stays_bounded(tmp_path):
    probe = EmbeddingCache(tmp_path / "probe", {"model": "x"})
    shard_bytes = _shard(probe, "probe", dim=512)[1].stat().st_size
    cap = 6 * shard_bytes + 60_000  # six shards and the index
    cache = EmbeddingCache(tmp_path / "capped", {"model": "x"}, max_bytes=cap)
    index_sizes = []
    for i in range(40):
        keys, _ = _shard(cache, f"text {i}", dim=512)
        cache.get(keys)  # a read after new shards checks the size
        assert _size(tmp_path / "capped") <= cap
        index_sizes.append((cache.dir / INDEX_NAME).stat().st_size)
    assert len(cache) <= 6 * 50 and len(list(cache.dir.glob("shard-*"))) <= 6
    assert max(index_sizes[20:]) <= max(index_sizes[:20])  # the index does not grow with use
    assert cache.missing(keys) == []  # the shard just read is kept


def test_unindexed_shards_are_indexed_and_vanished_ones_forgotten(tmp_path):
    cache = EmbeddingCache(tmp_path, {"model": "x"})
    keys_a, _ = _shard(cache, "a")
    keys_b, path_b = _shard(cache, "b")
    cache.close()
    for p in cache.dir.glob(INDEX_NAME + "*"):  # as after a crash before indexing, or an older version
        p.unlink()
    path_b.unlink()
    again = EmbeddingCache(tmp_path, {"model": "x"})
    assert len(again) == 50 and again.missing(keys_a + keys_b) == keys_b
    (again.dir / f"{path_b.name}").write_bytes(b"not a shard")  # unreadable files are skipped
    again.refresh()
    assert len(again) == 50


def test_a_shard_deleted_under_a_reader_is_embedded_again(tiny_encoder, tmp_path):
    from steerable.text.embedder import Embedder, EmbedderConfig

    texts = [f"sentence number {i}" for i in range(6)]
    embedder = Embedder(EmbedderConfig(model=tiny_encoder, cache_dir=str(tmp_path), device="cpu"))
    first = embedder.embed_texts(texts)
    for shard in embedder.cache.dir.glob("shard-*"):
        shard.unlink()  # removed behind the index's back (another process, a person)
    np.testing.assert_allclose(embedder.embed_texts(texts), first, atol=1e-6)
    assert embedder.stats.embedded == 6
    for shard in embedder.cache.dir.glob("shard-*"):
        shard.unlink()
    with pytest.raises(MissingVectors):
        embedder.cache.get([text_key(t) for t in texts])


def test_cache_prune_command(tmp_path, capsys):
    cache = EmbeddingCache(tmp_path, {"model": "x"})
    for name in ("a", "b", "c"):
        _shard(cache, name)
    assert main(["cache", "prune", "--max-size", "1K", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "removed 3 shards" in out and "0 left" in out
    assert not list(cache.dir.glob("shard-*"))
    assert main(["cache", "prune", "--max-size", "lots", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steerable: error:") and "like 500M" in err and err.count("\n") == 1
