"""Bayes-optimal yardsticks for simulated populations.

:class:`BayesOptimalPredictor` predicts like a model, but from the population's true reward functions:
P(y1 ≻ y2 | D^C) = Σ_m p(m | D^C) P(y1 ≻ y2 | m), with p(m | D^C) ∝ p(m) Π_{D^C} P(choice | m). For
discrete modes this is exact; for Dirichlet users the sum runs over prior samples of the weights
(self-normalised importance sampling, exact as the number of particles grows). No predictor that does
not know the user's type can beat it on the population average: one above it by more than sampling noise
is scoring pairs it has seen (or reading the type). Per type it is no bound: a predictor that favours one
type (e.g. the majority's choice at N^C = 0) can beat it on that type and lose more on the others.
Tensors follow the batch's device.

Closed forms: :func:`step_bayes_accuracy` (Example 4.1) and :func:`gaussian_identification_error`
(Example 4.3, appendix A).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from steerable.data.sampler import TaskBatch
from steerable.data.simulate import Population
from steerable.models.base import PreferenceOutput


def step_bayes_accuracy(num_context: int) -> float:
    """Example 4.1: half the pairs conflict and each conflicting context pair reveals the mode, so the
    Bayes-optimal accuracy on unseen pairs is 1 − ¼·(½)^N^C."""
    return 1.0 - 0.25 * 0.5**num_context


def gaussian_identification_error(rho: float) -> float:
    """Example 4.3 / appendix A: with one context pair, P(Ẑ ≠ Z*) = ¼ + arcsin(ρ) / (2π)."""
    return 0.25 + math.asin(rho) / (2 * math.pi)


class BayesOptimalPredictor:
    """The Bayes-optimal predictive of a simulated population (see the module docstring)."""

    def __init__(self, population: Population, num_particles: int = 4096, seed: int = 0) -> None:
        self.population = population
        if population.discrete:
            self.weights = torch.as_tensor(population.reference_weights, dtype=torch.float64)  # (M, K)
            self.log_prior = torch.log(torch.as_tensor(population.mode_probs, dtype=torch.float64))  # (M,)
        else:
            _, w = population.sample_users(num_particles, np.random.default_rng(seed))
            self.weights = torch.as_tensor(w, dtype=torch.float64)
            self.log_prior = torch.full((num_particles,), -math.log(num_particles), dtype=torch.float64)
        self.exact = population.discrete
        self.fallbacks = 0  # tasks whose context no particle explains (Dirichlet, deterministic choices)

    def _choice_prob(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        """(B, N, D) ×2 -> (B, N, M): P(chosen ≻ rejected | particle m)."""
        basis = self.population.basis_rewards
        weights = self.weights.to(chosen.device)
        diff = (basis(chosen.double()) - basis(rejected.double())) @ weights.T  # (B, N, M)
        if self.population.temperature > 0:
            return torch.sigmoid(diff / self.population.temperature)
        return (diff > 0).double() + 0.5 * (diff == 0).double()

    def log_posterior(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Tensor:
        """Context (B, Nc, D) ×2 with mask (B, Nc) -> (B, M) log p(m | D^C)."""
        with np.errstate(divide="ignore"):
            log_lik = (
                torch.log(self._choice_prob(chosen, rejected))
                if chosen.shape[1]
                else chosen.new_zeros(chosen.shape[0], 0, len(self.log_prior)).double()
            )
        log_lik = torch.where(mask.unsqueeze(-1), log_lik, torch.zeros_like(log_lik)).sum(dim=1)  # (B, M)
        log_prior = self.log_prior.to(log_lik.device)
        joint = log_prior + log_lik
        norm = torch.logsumexp(joint, dim=1, keepdim=True)
        lost = ~torch.isfinite(norm.squeeze(1))
        if lost.any():  # nothing explains the context: fall back to the prior for those tasks
            self.fallbacks += int(lost.sum())
            joint = torch.where(lost.unsqueeze(1), log_prior.expand_as(joint), joint)
            norm = torch.logsumexp(joint, dim=1, keepdim=True)
        return joint - norm

    def __call__(self, batch: TaskBatch) -> PreferenceOutput:
        """Predict every target pair of ``batch`` from its context (same contract as a model)."""
        out_c, out_r = [], []
        for start in range(0, batch.batch_size, 64):  # bounded memory: (64, Nt, M) at a time
            sl = slice(start, start + 64)
            post = self.log_posterior(
                batch.context_chosen[sl], batch.context_rejected[sl], batch.context_mask[sl]
            ).exp()
            p = (
                self._choice_prob(batch.target_chosen[sl], batch.target_rejected[sl]) * post.unsqueeze(1)
            ).sum(-1)
            p = p.clamp(0.0, 1.0)
            out_c.append(torch.log(p).float())
            out_r.append(torch.log1p(-p).float())
        return PreferenceOutput(torch.cat(out_c), torch.cat(out_r))
