"""The training and policy paths with the model on any torch device: reward-model training, NP-DPO
training (every block, and the last block from cached prefix states), policy evaluation and steered
generation. Each test runs on the CPU and, marked ``gpu``, on CUDA when a device is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from conftest import tiny_config, tiny_train_config
from steerable.data.schema import PreferenceData
from steerable.evaluation import evaluate
from steerable.models import build_reward_model
from steerable.policy.evaluation import PolicyEvaluator
from steerable.policy.generation import SteeredPolicy, generate
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.sequences import autocast_context, prefix_cache_for
from steerable.policy.sft import tiny_llama, word_tokenizer
from steerable.policy.tokens import PolicyTokenizer
from steerable.policy.trainer import PolicyTrainConfig, train_policy
from steerable.text import synthetic_text as world
from steerable.training import train_reward_model

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_reward_model_trains_and_evaluates_on(device, tmp_path, three_mode_data):
    population, data = three_mode_data
    train, val = data.split_users(0.25, seed=0)
    model = build_reward_model(tiny_config("np-btl", input_dim=data.dim), seed=0)
    result = train_reward_model(model, train, val, tiny_train_config(device=device), out_dir=tmp_path)
    assert result.model.device.type == device
    accuracy = evaluate(
        result.model, val, [0, 2], num_targets=8, num_tasks=16, population=population
    ).accuracy
    assert set(accuracy) == {0, 2}
    assert result.model.personalize(val.chosen[:3], val.rejected[:3]).rewards(val.chosen[:5]).shape == (5,)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tok = word_tokenizer(world.vocabulary())
    tiny_llama(len(tok), hidden=32, layers=3, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts, _ = world.split_prompts(0.25, seed=0)
    data, _ = world.simulate_users(prompts, 8, 8, seed=1)
    rng = np.random.default_rng(0)
    vectors = PreferenceData(
        user_ids=data.user_ids,
        chosen=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        rejected=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        hidden_mode=data.hidden_mode,
    )
    return folder, data, vectors


@pytest.mark.parametrize("blocks", ["all", "last:1"])
@pytest.mark.parametrize("device", DEVICES)
def test_policy_trains_evaluates_and_generates_on(device, blocks, tiny_world, tmp_path):
    folder, data, vectors = tiny_world
    base, tok = load_base_model(str(folder))
    config = PolicyConfig(
        base_model=str(folder),
        input_dim=6,
        latent_dim=8,
        encoder_hidden=16,
        hyper_hidden=16,
        lora_r=4,
        blocks=blocks,
    )
    torch.manual_seed(0)
    policy = ConditionalPolicy(config, base, tok)
    tokens = PolicyTokenizer(tok, 48, 24).pairs(data)
    train_config = PolicyTrainConfig(
        max_steps=3,
        users_per_batch=2,
        max_context=2,
        log_every=1,
        max_length=48,
        max_prompt_length=24,
        device=device,
        cache_dir=str(tmp_path / "cache"),
    )
    summary = train_policy(policy, tokens, vectors, train_config, tmp_path / "run", progress=False)
    assert policy.device.type == device and summary["steps"] == 3
    precision = "bf16" if device == "cuda" else "no"
    cache = prefix_cache_for(policy, precision, tmp_path / "cache") if policy.prefix_blocks else None
    evaluator = PolicyEvaluator(
        policy, tokens, vectors, autocast=autocast_context(policy.device, precision), prefix_cache=cache
    )
    table = evaluator.accuracy_table(evaluator.tasks([0, 2], num_tasks=4, targets=2, seed=0))
    assert 0 <= table["all"]["2"]["accuracy"] <= 1
    z0 = SteeredPolicy(policy).user_embedding([])
    assert z0.device.type == device
    texts = generate(policy, ["tell me about the red cat"], z0, max_new_tokens=4, seed=0)
    assert len(texts) == 1
