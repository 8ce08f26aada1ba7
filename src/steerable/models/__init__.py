"""Reward models: BTL, DPL, NP-BTL and variational NP-BTL, with save/load."""

from steerable.models.base import PreferenceOutput, RewardModel, RewardModelConfig
from steerable.models.registry import MODEL_TYPES, build_reward_model, load_reward_model

__all__ = [
    "MODEL_TYPES",
    "PreferenceOutput",
    "RewardModel",
    "RewardModelConfig",
    "build_reward_model",
    "load_reward_model",
]
