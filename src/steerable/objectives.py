"""Every likelihood and loss of the package, each written once.

Shapes: rewards and log-probabilities are (B, N) for B tasks and N pairs unless stated otherwise;
``mask`` (B, N) bool marks the pairs that count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def prediction_hits(log_odds: Any) -> Any:
    """Credit of each prediction of a recorded choice from its log-odds (or implicit-reward margin):
    1 when > 0, ½ when exactly 0 (a tie is a coin flip), 0 when < 0. Tensors or numpy arrays; float64."""
    if isinstance(log_odds, Tensor):
        return (log_odds > 0).double() + 0.5 * (log_odds == 0).double()
    log_odds = np.asarray(log_odds)
    return (log_odds > 0).astype(np.float64) + 0.5 * (log_odds == 0)


def btl_log_prob(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Bradley-Terry-Luce: log P(y_c ≻ y_r) = log σ(r(y_c) − r(y_r)) (paper eq. 2 and 7).

    Also the (conditional) DPO likelihood when the rewards are implicit, β·log π/π_ref (eq. 8, 24).
    """
    return F.logsigmoid(reward_chosen - reward_rejected)


def dpl_log_prob(
    mean_chosen: Tensor, std_chosen: Tensor, mean_rejected: Tensor, std_rejected: Tensor
) -> Tensor:
    """Mean-variance distributional preference learning (Siththaranjan et al., 2024).

    With independent r(y) ~ N(μ(y), σ(y)²), P(y_c ≻ y_r) = P(r(y_c) − r(y_r) > 0)
    = Φ((μ_c − μ_r) / sqrt(σ_c² + σ_r²)).
    """
    scale = torch.sqrt(std_chosen.square() + std_rejected.square())
    return torch.special.log_ndtr((mean_chosen - mean_rejected) / scale)


def mixture_log_prob(log_probs: Tensor, dim: int = 0) -> Tensor:
    """Monte Carlo predictive: log (1/S) Σ_s p_s from S per-sample log-probabilities (eq. 3)."""
    return torch.logsumexp(log_probs, dim=dim) - math.log(log_probs.shape[dim])


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mean_q, std_q²) || N(mean_p, std_p²)) summed over the last (latent) dimension."""
    var_ratio = (std_q / std_p).square()
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).square() - 1.0 - var_ratio.log()).sum(dim=-1)


def preference_loss(log_prob: Tensor, mask: Tensor, kl: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of the observed choices per counted pair (Algorithm 1).

    * ``log_prob`` (B, N): −Σ log p(choice | D^C) over the counted pairs.
    * with ``kl`` (B,): adds KL(q(z | D^T) || q(z | D^C)) per task — the negative NP evidence lower bound.
    * ``log_prob`` (S, B, N), per sample z_s ~ q(z | D^C): −Σ_tasks log (1/S) Σ_s Π_pairs p(choice | z_s),
      the negative log of the Monte Carlo predictive of each task's targets ("ML" NP objective,
      Foong et al., 2020).

    Always normalised by the number of counted pairs.
    """
    mask = mask.to(log_prob.dtype)
    if log_prob.ndim == 3:
        total = -mixture_log_prob((log_prob * mask).sum(dim=-1)).sum()  # (S, B) -> (B,) -> scalar
    else:
        total = -(log_prob * mask).sum()
    if kl is not None:
        total = total + kl.sum()
    return total / mask.sum().clamp(min=1.0)


def implicit_reward(policy_log_prob: Tensor, reference_log_prob: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward of a response, r = β·(log π(y | x) − log π_ref(y | x)) (eq. 8).

    For NP-DPO, π is conditioned on the user's context, π(y | x, D^C) (eq. 24); π_ref never is.
    """
    return beta * (policy_log_prob - reference_log_prob)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    mask: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    chosen_tokens: Tensor | None = None,
    nll_weight: float = 0.0,
) -> Tensor:
    """(Conditional) DPO: the BTL negative log-likelihood of the implicit rewards (eq. 8, 24), mean per pair.

    Plain DPO and NP-DPO differ only in what the policy log-probabilities were conditioned on. With
    ``nll_weight`` > 0, ``nll_weight`` × the chosen responses' negative log-likelihood per token is added,
    as RPO does (TRL's ``rpo_alpha``): ``chosen_nll`` (pairs,) holds each chosen response's summed NLL and
    ``chosen_tokens`` (pairs,) its length, and the term is Σ NLL / Σ tokens over the batch, so that every
    token counts the same whatever the length of its response. It keeps the chosen responses likely while
    the margin grows, which keeps generation fluent.
    """
    reward_chosen = implicit_reward(policy_chosen, reference_chosen, beta)
    reward_rejected = implicit_reward(policy_rejected, reference_rejected, beta)
    if mask is None:
        mask = torch.ones_like(reward_chosen, dtype=torch.bool)
    loss = preference_loss(btl_log_prob(reward_chosen, reward_rejected), mask)
    if nll_weight and chosen_nll is not None:
        weights = mask.to(chosen_nll.dtype)
        tokens = (
            chosen_tokens.to(chosen_nll.dtype) if chosen_tokens is not None else torch.ones_like(chosen_nll)
        )
        loss = loss + nll_weight * (chosen_nll * weights).sum() / (tokens * weights).sum().clamp(min=1.0)
    return loss
