"""The embedder and its cache, on tiny random models built from configs (no download, fast)."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from steerable.text.cache import EmbeddingCache, text_key
from steerable.text.embedder import Embedder, EmbedderConfig

transformers = pytest.importorskip("transformers")


def embedder(model, cache, **kw):
    return Embedder(EmbedderConfig(model=model, cache_dir=str(cache), device="cpu", **kw))


TEXTS = ["short one", "a somewhat longer sentence about preferences", "short one", "word " * 300]


def test_mean_pooling_normalised_and_deduplicated(tiny_encoder, tmp_path):
    e = embedder(tiny_encoder, tmp_path, max_length=64)
    assert e.pooling == "mean"
    v = e.embed_texts(TEXTS)
    assert v.shape == (4, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(v[0], v[2])
    assert (e.stats.unique, e.stats.embedded, e.stats.truncated) == (3, 3, 1)
    assert e.stats.windows == 2 + 5  # the 300-word text: 300 tokens in windows of 62


def test_rerun_reads_the_cache_without_loading_the_model(tiny_encoder, tmp_path):
    first = embedder(tiny_encoder, tmp_path, max_length=64).embed_texts(TEXTS)
    again = embedder(tiny_encoder, tmp_path, max_length=64)
    second = again.embed_texts(TEXTS)
    np.testing.assert_array_equal(first, second)
    assert again.stats.embedded == 0 and again.stats.cached == 3 and again._model is None


def test_settings_that_change_vectors_change_the_namespace(tiny_encoder, tmp_path):
    a, b = embedder(tiny_encoder, tmp_path, max_length=64), embedder(tiny_encoder, tmp_path, max_length=32)
    c = embedder(tiny_encoder, tmp_path, max_length=64, long_texts="truncate")
    assert len({a.cache.dir, b.cache.dir, c.cache.dir}) == 3
    long = c.embed_texts([TEXTS[3]])
    assert c.stats.windows == 1 and not np.allclose(long, a.embed_texts([TEXTS[3]]))


def test_batching_and_padding_do_not_change_vectors(tiny_encoder, tiny_decoder, tmp_path):
    for model in (tiny_encoder, tiny_decoder):
        alone = [
            embedder(model, tmp_path / f"a{i}", max_length=64).embed_texts([t])[0]
            for i, t in enumerate(TEXTS[:2])
        ]
        together = embedder(model, tmp_path / "b", max_length=64, batch_size=8).embed_texts(TEXTS[:2])
        np.testing.assert_allclose(together, np.stack(alone), atol=1e-5)


def test_causal_lm_uses_last_token_and_keeps_the_end_of_long_texts(tiny_decoder, tmp_path):
    e = embedder(tiny_decoder, tmp_path, max_length=32)
    assert e.pooling == "last-token"
    assert (
        e.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "q\n\na"
    )  # no template
    head, tail = "alpha " * 40, "omega " * 40
    v = e.embed_texts([head + tail, "beta " * 40 + tail])
    np.testing.assert_allclose(v[0], v[1], atol=1e-5)  # only the last 32 tokens count


def test_processes_split_the_work_by_shard(tiny_encoder, tmp_path):
    texts = [f"text number {i}" for i in range(10)]
    ranks = [
        embedder(tiny_encoder, tmp_path, max_length=32, shard_size=3) for _ in range(2)
    ]  # start together
    workers = []
    for rank, e in enumerate(ranks):
        e.rank, e.world = rank, 2
        e.fill_cache(texts)
        workers.append(e.stats.embedded)
    assert workers == [6, 4]  # shards of 3, 3, 3, 1 dealt round-robin
    final = embedder(tiny_encoder, tmp_path, max_length=32, shard_size=3)
    final.embed_texts(texts)
    assert final.stats.embedded == 0 and final.stats.cached == 10


KILL_SCRIPT = """
import sys, time
from steerable.text.cache import EmbeddingCache
from steerable.text.embedder import Embedder, EmbedderConfig
add = EmbeddingCache.add
def slow_add(self, *a, **k):
    path = add(self, *a, **k); time.sleep(0.3); return path
EmbeddingCache.add = slow_add
texts = [f"text number {i} " * 5 for i in range(200)]
config = EmbedderConfig(model=sys.argv[1], cache_dir=sys.argv[2], device="cpu", max_length=32, shard_size=10)
Embedder(config).embed_texts(texts)
"""


def test_sigkill_keeps_finished_shards_and_rerun_completes(tiny_encoder, tmp_path):
    texts = [f"text number {i} " * 5 for i in range(200)]
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, tiny_encoder, str(cache)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("embeddings/*/shard-*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list(cache.glob("embeddings/*/shard-*.safetensors")))
    assert 3 <= kept < 20, f"{kept} shards: not killed mid-run"
    rerun = embedder(tiny_encoder, cache, max_length=32, shard_size=10)
    vectors = rerun.embed_texts(texts)
    assert rerun.stats.cached == 10 * kept and rerun.stats.embedded == 200 - 10 * kept
    fresh = embedder(tiny_encoder, tmp_path / "fresh", max_length=32, shard_size=10).embed_texts(texts)
    np.testing.assert_allclose(vectors, fresh, atol=1e-6)


def test_cache_shards_are_complete_files(tmp_path):
    cache = EmbeddingCache(tmp_path, {"model": "x"})
    keys = [text_key(t) for t in ("a", "b")]
    cache.add(keys, np.ones((2, 4), dtype=np.float32))
    assert not list(cache.dir.glob(".*.tmp"))
    assert (
        len(EmbeddingCache(tmp_path, {"model": "x"})) == 2
        and len(EmbeddingCache(tmp_path, {"model": "y"})) == 0
    )


def test_max_length_beyond_the_model_is_clamped_to_its_positions(tiny_encoder, tmp_path):
    """The tiny encoder has 128 positions: a 256-token limit reads 128-token windows and no text crashes."""
    wide = Embedder(EmbedderConfig(model=tiny_encoder, max_length=256, cache_dir=str(tmp_path)))
    exact = Embedder(EmbedderConfig(model=tiny_encoder, max_length=128, cache_dir=str(tmp_path / "b")))
    assert wide.max_length == 128 and wide.namespace() == exact.namespace()
    long_text = " ".join(["word"] * 400)
    assert np.allclose(wide.embed_texts([long_text]), exact.embed_texts([long_text]), atol=1e-6)
