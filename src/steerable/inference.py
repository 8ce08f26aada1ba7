"""Personalise once, score many: a reward model conditioned on one user's context pairs.

>>> user = model.personalize(context_chosen, context_rejected)   # (Nc, D) arrays; omit for a new user
>>> user.rewards(options)                                         # (N,) rewards r(y | D^C)
>>> user.compare(options_a, options_b)                            # (N,) P(a ≻ b | D^C)

Personalising computes the user's embedding z once (the set encoder's unpadded path: a few fused ops).
For NP models scoring uses folded weights: the decoder's first layer absorbs the option MLP's last layer
and the user's term W_z·z + b is added once, so an option costs one hidden layer less than the
training-time decoder. The folded weights are shared by every user of a model and recomputed when a
weight they come from changes (see :func:`_folded_weights`).

The model runs in eval mode during each call and is left in the mode the caller had it in; inputs follow
the model's device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerable.models.base import Latent, RewardModel
from steerable.models.neural_process import (
    ConditionalRewardDecoder,
    NPBTLRewardModel,
    VariationalNPBTLRewardModel,
)
from steerable.utils.modules import eval_mode
from steerable.utils.numerics import denormals_flushed


def _as_tensor(x: Any, dim: int, device: torch.device, name: str) -> Tensor:
    """(N, dim) float32 on ``device`` (a (N,) vector is accepted when dim == 1); checks shape and values."""
    if isinstance(x, Tensor):
        t = x.to(dtype=torch.float32)
        finite = bool(torch.isfinite(t).all()) if t.numel() else True
    else:
        a = np.asarray(x, dtype=np.float32)
        finite = bool(np.isfinite(a).all())
        t = torch.from_numpy(a)
    if t.ndim == 1 and dim == 1:
        t = t.unsqueeze(-1)
    if t.ndim != 2 or t.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {tuple(t.shape)}")
    if not finite:
        raise ValueError(f"{name} contains NaN or infinity")
    return t.to(device)


class PersonalizedRewardModel:
    """A reward model conditioned on one user's context pairs (see the module docstring)."""

    def __init__(self, model: RewardModel, context_chosen: Any = None, context_rejected: Any = None) -> None:
        self.model = model
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
        with denormals_flushed(), torch.inference_mode(), eval_mode(model):
            self.latent: Latent | None = model.encode(chosen[None], rejected[None], None)  # no padding
        self._scorer: _FoldedScorer | None = None  # built at the first scoring

    @property
    def embedding(self) -> np.ndarray | None:
        """The user's z (mean of q(z | D^C) for vnp-btl), or None for unconditional models."""
        return None if self.latent is None else self.latent.mean[0].cpu().numpy()

    @property
    def embedding_std(self) -> np.ndarray | None:
        """Posterior standard deviation of z (vnp-btl only)."""
        return None if self.latent is None or self.latent.std is None else self.latent.std[0].cpu().numpy()

    def _rewards(self, options: Tensor) -> Tensor:
        """(N, D) -> (S, N) per sample of z (vnp-btl) or (1, N)."""
        if isinstance(self.model, NPBTLRewardModel):
            if self._scorer is None:
                assert self.latent is not None
                self._scorer = _FoldedScorer(self.model, self.latent)
            return self._scorer(options)
        return self.model.option_rewards(options[None], self.latent)

    def rewards(self, options: Any, batch_size: int = 65536) -> np.ndarray:
        """(N, D) options -> (N,) rewards r(y | D^C) (posterior mean for vnp-btl, μ for DPL)."""
        x = _as_tensor(options, self.dim, self.model.device, "options")
        with denormals_flushed(), torch.inference_mode(), eval_mode(self.model):
            parts = [self._rewards(chunk).mean(dim=0) for chunk in x.split(batch_size)]
        return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float32)

    def compare(self, options_a: Any, options_b: Any) -> np.ndarray:
        """(N, D) × 2 -> (N,) P(a ≻ b | D^C), with the model's own likelihood (BTL, DPL or the
        Monte Carlo average over z for vnp-btl)."""
        a = _as_tensor(options_a, self.dim, self.model.device, "options_a")
        b = _as_tensor(options_b, self.dim, self.model.device, "options_b")
        if len(a) != len(b):
            raise ValueError(f"{len(a)} options in a but {len(b)} in b")
        with denormals_flushed(), torch.inference_mode(), eval_mode(self.model):
            out = self.model.preference(a[None], b[None], self.latent)
        return out.prob_chosen[0].cpu().numpy()


class _FoldedScorer:
    """r(y | z) for one user with MLP1's last Linear folded into MLP2's first layer (see the decoder)."""

    def __init__(self, model: NPBTLRewardModel, latent: Latent) -> None:
        decoder = model.decoder
        weight, bias = _folded_weights(decoder)
        variational = isinstance(model, VariationalNPBTLRewardModel)
        z = model.samples(latent)[:, 0] if variational else latent.mean  # (S, Z) or (1, Z)
        self.prefix = decoder.option_net[:-1]
        self.weight = weight  # (H, H_in)
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


def _folded_weights(decoder: ConditionalRewardDecoder) -> tuple[Tensor, Tensor]:
    """The decoder's folded (weight (H, H_in), bias (H,)), cached on the decoder.

    The cache is keyed by every tensor the fold reads: its storage address, device, dtype, shape,
    autograd version counter and a checksum of its bits (:func:`_checksum`), since edits through
    ``.data`` bump no version counter and a storage can be reused at the same address. A device or dtype
    move, ``load_state_dict`` or any in-place edit therefore recomputes the fold.
    """
    last, first = decoder.option_net[-1], decoder.first
    sources = (last.weight, last.bias, first.weight)
    with torch.inference_mode():
        key = tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape), t._version) for t in sources)
        key += (tuple(torch.stack([_checksum(t) for t in sources]).tolist()),)
        cached = getattr(decoder, "_folded_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, decoder.folded()[1:])
            decoder._folded_cache = cached
    return cached[1]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum(t: Tensor) -> Tensor:
    """() int64: Σ_i (i + 1) · bits_i over the tensor's elements' bit patterns (wrapping). Any change of
    one element changes it; so does exchanging two different elements."""
    bits = t.detach().reshape(-1).view(_INT_OF_SIZE[t.element_size()]).long()
    return (bits * torch.arange(1, len(bits) + 1, device=t.device)).sum()
