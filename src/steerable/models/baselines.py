"""Unconditional baselines: one reward for everyone (BTL) or a reward distribution per option (DPL)."""

from __future__ import annotations

import torch
from torch import Tensor

from steerable.models.base import Latent, PreferenceOutput, RewardModel, RewardModelConfig
from steerable.models.mlp import mlp
from steerable.objectives import btl_log_prob, dpl_log_prob


class BTLRewardModel(RewardModel):
    """Bradley-Terry-Luce: r(y) = MLP(y); P(y1 ≻ y2) = σ(r(y1) − r(y2)). Ignores the context."""

    model_type = "btl"

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        self.reward_net = mlp(config.input_dim, config.hidden_dim, 1, config.num_layers, config.activation)

    def option_rewards(self, options: Tensor, latent: Latent | None = None) -> Tensor:
        return self.reward_net(self.standardize(options)).squeeze(-1)  # (B, N)

    def preference(self, chosen: Tensor, rejected: Tensor, latent: Latent | None) -> PreferenceOutput:
        n = chosen.shape[-2]
        rewards = self.option_rewards(torch.cat([chosen, rejected], dim=-2))  # (B, 2N)
        r_c, r_r = rewards[..., :n], rewards[..., n:]
        return PreferenceOutput(btl_log_prob(r_c, r_r), btl_log_prob(r_r, r_c))


class DPLRewardModel(RewardModel):
    """Mean-variance DPL: MLP(y) = (μ(y), log σ(y)); P(y1 ≻ y2) = Φ((μ1 − μ2) / sqrt(σ1² + σ2²))."""

    model_type = "dpl"

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        self.reward_net = mlp(config.input_dim, config.hidden_dim, 2, config.num_layers, config.activation)

    def mean_and_std(self, options: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) -> μ (B, N), σ (B, N)."""
        mean, log_std = self.reward_net(self.standardize(options)).unbind(-1)
        return mean, log_std.clamp(-10.0, 10.0).exp() + self.config.min_std

    def option_rewards(self, options: Tensor, latent: Latent | None = None) -> Tensor:
        return self.mean_and_std(options)[0]

    def preference(self, chosen: Tensor, rejected: Tensor, latent: Latent | None) -> PreferenceOutput:
        n = chosen.shape[-2]
        mean, std = self.mean_and_std(torch.cat([chosen, rejected], dim=-2))  # (B, 2N) each
        m_c, m_r, s_c, s_r = mean[..., :n], mean[..., n:], std[..., :n], std[..., n:]
        return PreferenceOutput(dpl_log_prob(m_c, s_c, m_r, s_r), dpl_log_prob(m_r, s_r, m_c, s_c))
