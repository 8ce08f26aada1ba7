"""The fast NP-DPO path: LoRA and FiLM on the last K blocks, the frozen first blocks' hidden states
computed once per sequence and cached on disk (safe to kill), log-probabilities from them equal to the
full forward's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from steerable.data.schema import PreferenceData
from steerable.policy.model import ConditionalPolicy, PolicyConfig
from steerable.policy.sequences import PrefixCache, SequenceStore, prefix_cache_for
from steerable.policy.sft import tiny_llama, word_tokenizer
from steerable.policy.tokens import PolicyTokenizer, pair_batch
from steerable.policy.trainer import PolicyTrainConfig, train_policy
from steerable.text import synthetic_text as world


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tok = word_tokenizer(world.vocabulary())
    lm = tiny_llama(len(tok), hidden=32, layers=4, seed=0)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts, _ = world.split_prompts(0.25, seed=0)
    data, _ = world.simulate_users(prompts, 8, 6, seed=1)
    rng = np.random.default_rng(0)
    vectors = PreferenceData(
        user_ids=data.user_ids,
        chosen=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        rejected=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        hidden_mode=data.hidden_mode,
    )
    return folder, data, vectors


def _policy(folder, blocks="last:2", **kw):
    from steerable.policy.model import load_base_model

    base, tok = load_base_model(str(folder))
    values = dict(
        base_model=str(folder), input_dim=6, latent_dim=8, encoder_hidden=16, hyper_hidden=16, lora_r=4
    )
    values.update(kw)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ConditionalPolicy(PolicyConfig(blocks=blocks, **values), base, tok)


def _perturb(policy):
    """Make LoRA and FiLM change the output (fresh ones are the identity)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name or name.startswith(
                ("hypernetwork.net.2", "gate_network.net.2", "mlp_hypernetwork.net.2")
            ):
                torch.nn.init.normal_(p, std=0.3)


def test_lora_and_film_follow_the_blocks(tiny):
    folder, *_ = tiny
    policy = _policy(folder, blocks="last:2")
    assert policy.prefix_blocks == 2 and policy.block_index == [2, 3]
    lora_blocks = {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in policy.named_parameters() if "lora_" in n
    }
    assert lora_blocks == {2, 3}
    assert len(policy.hooks.modules) == 2
    assert _policy(folder, blocks="all").prefix_blocks == 0


@pytest.mark.parametrize("modulation", ["film", "lora_gates", "lora_unshared", "film_mlp"])
def test_log_probs_from_the_cached_prefix_equal_the_full_forward(tiny, tmp_path, modulation):
    folder, data, _vectors = tiny
    extra = {"film": {}, "lora_unshared": {"lora_gates": True, "lora_shared": False}}.get(
        modulation, {modulation: True}
    )
    policy = _policy(folder, **extra).eval()
    _perturb(policy)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    cache = prefix_cache_for(policy, "no", tmp_path)
    store = SequenceStore(policy, tokens, 0, prefix_cache=cache)
    pairs = [0, 3, 5, 7]
    batch = pair_batch(tokens, [pairs[:2], pairs[2:]], 0, "cpu")
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    users = torch.tensor([0, 0, 1, 1]).repeat(2)
    with torch.no_grad():
        full, _ = policy(batch.input_ids, batch.attention_mask, batch.response_mask, ctx, users)
        prefix = store.prefix(pairs, batch.input_ids.shape[1])
        cached, _ = policy(batch.input_ids, batch.attention_mask, batch.response_mask, ctx, users, prefix)
        reference = policy.reference_log_probs(batch.input_ids, batch.attention_mask, batch.response_mask)
    policy.modulate(None)
    assert (full - reference).abs().max() > 1e-2  # LoRA and FiLM matter here
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)
    assert torch.allclose(store.reference(pairs), reference, atol=1e-5, rtol=0)


def test_fresh_policy_from_the_cache_equals_its_reference(tiny, tmp_path):
    """Step 1 of prefix-cached training: the implicit rewards of a fresh policy are 0 (up to fp32 noise)."""
    folder, data, vectors = tiny
    policy = _policy(folder)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    config = PolicyTrainConfig(
        max_steps=1,
        users_per_batch=2,
        max_context=2,
        log_every=1,
        max_length=48,
        max_prompt_length=24,
        cache_dir=str(tmp_path),
        device="cpu",
    )
    summary = train_policy(policy, tokens, vectors, config, tmp_path / "run", progress=False)
    assert summary["timings"]["prefix_sequences_computed"] > 0
    assert abs(summary["final"]["rewards/margins"]) < 1e-5


def test_prefix_cache_keeps_finished_shards_after_kill_9(tiny, tmp_path):
    folder, *_ = tiny
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_prefix_cache import _policy
        from steerable.data.schema import PreferenceData
        from steerable.policy.sequences import PrefixCache, SequenceStore, prefix_cache_for
        from steerable.policy.tokens import PolicyTokenizer
        from steerable.text import synthetic_text as world
        prompts, _ = world.split_prompts(0.25, seed=0)
        data, _ = world.simulate_users(prompts, 8, 6, seed=1)
        policy = _policy({str(folder)!r})
        tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
        cache = prefix_cache_for(policy, "no", {str(tmp_path)!r})
        if sys.argv[1] == "kill":
            add, written = PrefixCache.add, []
            def add_then_die(self, *args, **kwargs):
                path = add(self, *args, **kwargs)
                written.append(path)
                if len(written) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return path
            PrefixCache.add = add_then_die
        store = SequenceStore(policy, tokens, 0, prefix_cache=cache, max_pairs_per_forward=2)
        print("computed", store.fill(range(len(tokens.chosen)), progress=False, shard_size=8))
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    namespace = next((tmp_path / "prefix").iterdir())
    assert len(list(namespace.glob("shard-*.safetensors"))) == 2
    assert not list(namespace.glob(".*tmp"))  # no half-written shard
    rerun = subprocess.run([sys.executable, "-c", script, "again"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    computed = int(rerun.stdout.split()[-1])
    policy = _policy(folder)
    _, data, _ = tiny
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    store = SequenceStore(policy, tokens, 0, prefix_cache=prefix_cache_for(policy, "no", tmp_path))
    unique = len({k for p in range(len(tokens.chosen)) for k in store.keys(p)})
    assert computed == unique - 16  # the two finished shards of 8 sequences were kept
    assert len(PrefixCache(tmp_path, store.cache.description)) == unique


def test_another_model_gets_another_prefix_cache(tiny, tmp_path):
    folder, *_ = tiny
    a = prefix_cache_for(_policy(folder, blocks="last:2"), "no", tmp_path)
    b = prefix_cache_for(_policy(folder, blocks="last:1"), "no", tmp_path)
    c = prefix_cache_for(_policy(folder, blocks="last:2"), "bf16", tmp_path)
    other = _policy(folder, blocks="last:2")
    with torch.no_grad():
        other.causal_lm.get_input_embeddings().weight.add_(1e-3)
    d = prefix_cache_for(other, "no", tmp_path)
    assert len({a.dir, b.dir, c.dir, d.dir}) == 4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
def test_every_family_runs_from_its_cached_prefix(family, tmp_path):
    from test_policy import _tiny_models

    torch.manual_seed(0)
    base = _tiny_models()[family]
    config = PolicyConfig(
        base_model=family,
        input_dim=6,
        latent_dim=8,
        encoder_hidden=16,
        hyper_hidden=16,
        lora_r=4,
        blocks="last:1",
    )
    policy = ConditionalPolicy(config, base).eval()
    _perturb(policy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (4, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[2:, 9:] = 0  # right padding
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 5:] = attention[:, 5:].bool()
    ctx = (
        torch.randn(4, 2, 6, generator=g),
        torch.randn(4, 2, 6, generator=g),
        torch.ones(4, 2, dtype=torch.bool),
    )
    with torch.no_grad():
        full, _ = policy(ids, attention, response, ctx)
        _, prefix = policy.reference_log_probs(ids, attention, response, capture_prefix=True)
        cached, _ = policy(ids, attention, response, ctx, prefix_hidden=prefix)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)
