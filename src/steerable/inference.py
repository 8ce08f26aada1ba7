"""Personalise once, score many: a reward model conditioned on one user's context pairs.

>>> user = model.personalize(context_chosen, context_rejected)   # (Nc, D) arrays; omit for a new user
>>> user.rewards(options)                                         # (N,) rewards r(y | D^C)
>>> user.compare(options_a, options_b)                            # (N,) P(a ≻ b | D^C)

For NP models the user's embedding z is computed once; the decoder's first layer folds the option MLP's
last layer into one matrix and adds the user's term W_z·z + b once, so scoring an option costs one
hidden layer less than the training-time decoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerable.models.base import Latent, RewardModel
from steerable.models.neural_process import NPBTLRewardModel, VariationalNPBTLRewardModel


def _as_tensor(x: Any, dim: int, device: torch.device, name: str) -> Tensor:
    t = torch.as_tensor(
        np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x, dtype=torch.float32
    )
    if t.ndim == 1 and dim == 1:
        t = t.unsqueeze(-1)
    if t.ndim != 2 or t.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return t.to(device)


class PersonalizedRewardModel:
    """A reward model conditioned on one user's context pairs (see the module docstring)."""

    def __init__(self, model: RewardModel, context_chosen: Any = None, context_rejected: Any = None) -> None:
        self.model = model.eval()
        self.dim = model.config.input_dim
        device = model.device
        if (context_chosen is None) != (context_rejected is None):
            raise ValueError("give both context_chosen and context_rejected, or neither")
        if context_chosen is None:
            chosen = rejected = torch.zeros(0, self.dim, device=device)
        else:
            chosen = _as_tensor(context_chosen, self.dim, device, "context_chosen")
            rejected = _as_tensor(context_rejected, self.dim, device, "context_rejected")
            if len(chosen) != len(rejected):
                raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected context options")
        self.num_context = len(chosen)
        with torch.inference_mode():
            mask = torch.ones(1, len(chosen), dtype=torch.bool, device=device)
            self.latent: Latent | None = model.encode(chosen[None], rejected[None], mask)
            self._scorer = _FoldedScorer(model, self.latent) if isinstance(model, NPBTLRewardModel) else None

    @property
    def embedding(self) -> np.ndarray | None:
        """The user's z (mean of q(z | D^C) for vnp-btl), or None for unconditional models."""
        return None if self.latent is None else self.latent.mean[0].cpu().numpy()

    @property
    def embedding_std(self) -> np.ndarray | None:
        """Posterior standard deviation of z (vnp-btl only)."""
        return None if self.latent is None or self.latent.std is None else self.latent.std[0].cpu().numpy()

    def _rewards(self, options: Tensor) -> Tensor:
        if self._scorer is not None:
            return self._scorer(options)  # (S, N) or (1, N)
        return self.model.option_rewards(options[None], self.latent)  # (1, N)

    def rewards(self, options: Any, batch_size: int = 65536) -> np.ndarray:
        """(N, D) options -> (N,) rewards r(y | D^C) (posterior mean for vnp-btl, μ for DPL)."""
        x = _as_tensor(options, self.dim, self.model.device, "options")
        with torch.inference_mode():
            parts = [self._rewards(chunk).mean(dim=0) for chunk in x.split(batch_size)]
        return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float32)

    def compare(self, options_a: Any, options_b: Any) -> np.ndarray:
        """(N, D) × 2 -> (N,) P(a ≻ b | D^C), with the model's own likelihood (BTL, DPL or the
        Monte Carlo average over z for vnp-btl)."""
        a = _as_tensor(options_a, self.dim, self.model.device, "options_a")
        b = _as_tensor(options_b, self.dim, self.model.device, "options_b")
        if len(a) != len(b):
            raise ValueError(f"{len(a)} options in a but {len(b)} in b")
        with torch.inference_mode():
            out = self.model.preference(a[None], b[None], self.latent)
        return out.prob_chosen[0].cpu().numpy()


class _FoldedScorer:
    """r(y | z) for one user with MLP1's last Linear folded into MLP2's first layer (see the decoder)."""

    def __init__(self, model: NPBTLRewardModel, latent: Latent) -> None:
        decoder = model.decoder
        self.prefix, weight, bias = _folded_weights(decoder)
        variational = isinstance(model, VariationalNPBTLRewardModel)
        z = model.samples(latent)[:, 0] if variational else latent.mean  # (S, Z) or (1, Z)
        self.weight = weight
        self.bias = decoder.user_bias(z) + bias  # (S, H)
        self.suffix = decoder.reward_net[1:]
        self.standardize = model.standardize

    def __call__(self, options: Tensor) -> Tensor:
        g = self.prefix(self.standardize(options))  # (N, H_in)
        if len(self.bias) == 1:
            h = torch.addmm(self.bias[0], g, self.weight.T).unsqueeze(0)  # (1, N, H)
        else:
            h = (g @ self.weight.T).unsqueeze(0) + self.bias.unsqueeze(1)  # (S, N, H)
        return self.suffix(h).squeeze(-1)  # (S, N)


def _folded_weights(decoder) -> tuple[Any, Tensor, Tensor]:
    """Folded decoder weights, cached on the decoder until any of its parameters changes."""
    key = tuple((id(p), p._version) for p in decoder.parameters())
    cached = getattr(decoder, "_folded_cache", None)
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            cached = (key, decoder.folded())
        decoder._folded_cache = cached
    return cached[1]
