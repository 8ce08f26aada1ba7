"""Model types by name, and helpers to build or load any of them."""

from __future__ import annotations

from pathlib import Path

import torch

from steerable.models.base import RewardModel, RewardModelConfig
from steerable.models.baselines import BTLRewardModel, DPLRewardModel
from steerable.models.neural_process import NPBTLRewardModel, VariationalNPBTLRewardModel

MODEL_TYPES: dict[str, type[RewardModel]] = {
    "btl": BTLRewardModel,
    "dpl": DPLRewardModel,
    "np-btl": NPBTLRewardModel,
    "vnp-btl": VariationalNPBTLRewardModel,
}


def build_reward_model(config: RewardModelConfig, seed: int | None = None) -> RewardModel:
    """A freshly initialised model; ``seed`` makes the initialisation reproducible without touching
    the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return MODEL_TYPES[config.model_type](config)


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """Load any reward model saved with ``save_pretrained``."""
    return RewardModel.from_pretrained(directory, device=device)
