"""Hidden-context populations (paper section 4, appendix C) and the simulator that writes them.

A population has *options* y ∈ R^D, K *basis rewards* b(y) ∈ R^K, and users with hidden weights
w ∈ R^K so that r(y; w) = w · b(y). Users are either discrete modes (given weight vectors and
probabilities; one-hot weights make each mode follow one basis reward) or continuous, w ~ Dirichlet(α)
(appendix D.2). Choices are deterministic (P(y1 ≻ y2) = 1{r(y1) > r(y2)}) or Bradley-Terry with a
temperature T (P = σ((r(y1) − r(y2)) / T)).

A pair is *conflicting* (Definition 4.2, extended to K reward functions) when the reference reward
functions do not all order it the same way; the references are the modes, or the K basis rewards for
Dirichlet users. ``conflict_rate`` fixes the share of conflicting pairs each user answers.

Built-in examples:
* :func:`step_population` — Example 4.1: y ~ U[0, 1]; r(y) = y for y ≤ 0.5 and 2y (mode 0) or 1 − y
  (mode 1) above. Half the pairs conflict; Bayes-optimal accuracy is 1 − ¼·(½)^N^C.
* :func:`gaussian_population` — Example 4.3: y = [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]), r = h0 or h1.
* :func:`attribute_population` — K attributes, discrete modes or Dirichlet users, any conflict rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from steerable.data.schema import PreferenceData
from steerable.errors import ConfigError

Array = Any  # numpy array or torch tensor; the reward functions work on both


@dataclass
class Population:
    """A simulated population of users with hidden preferences (see the module docstring)."""

    name: str
    dim: int
    options: str = "gaussian"  # "gaussian" | "uniform"
    correlation: float = 0.0  # off-diagonal correlation of gaussian options (unit variances)
    low: float = 0.0  # uniform options: lower bound
    high: float = 1.0  # uniform options: upper bound
    basis: str = "identity"  # "identity" (b(y) = y) | "step-1d" (Example 4.1's two reward functions)
    modes: list[list[float]] | None = None  # (M, K) weight vector of each discrete mode
    mode_probs: list[float] | None = None  # (M,) probabilities of the modes
    dirichlet_alpha: list[float] | None = None  # (K,) continuous users: w ~ Dirichlet(alpha)
    temperature: float = 0.0  # 0: deterministic choices; > 0: Bradley-Terry with this temperature
    conflict_rate: float | None = None  # share of conflicting pairs per user; None: as sampled
    mode_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.options not in ("gaussian", "uniform"):
            raise ConfigError(f"options must be 'gaussian' or 'uniform', got {self.options!r}")
        if self.basis not in ("identity", "step-1d"):
            raise ConfigError(f"basis must be 'identity' or 'step-1d', got {self.basis!r}")
        if self.basis == "step-1d" and self.dim != 1:
            raise ConfigError("the step-1d basis needs 1-dimensional options")
        if (self.modes is None) == (self.dirichlet_alpha is None):
            raise ConfigError("give either discrete modes or dirichlet_alpha (continuous users), not both")
        k = self.num_basis
        if self.modes is not None:
            if any(len(m) != k for m in self.modes):
                raise ConfigError(f"every mode needs {k} weights (one per basis reward)")
            probs = self.mode_probs or [1.0 / len(self.modes)] * len(self.modes)
            if (
                len(probs) != len(self.modes)
                or min(probs) < 0
                or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)
            ):
                raise ConfigError(f"mode_probs must be {len(self.modes)} non-negative numbers summing to 1")
            self.mode_probs = [float(p) for p in probs]
        if self.dirichlet_alpha is not None and (
            len(self.dirichlet_alpha) != k or min(self.dirichlet_alpha) <= 0
        ):
            raise ConfigError(f"dirichlet_alpha must be {k} positive numbers")
        if not -1.0 <= self.correlation <= 1.0:
            raise ConfigError(f"correlation must be in [-1, 1], got {self.correlation}")
        if self.options == "gaussian" and self.dim > 1 and self.correlation < -1.0 / (self.dim - 1) - 1e-12:
            raise ConfigError(
                f"correlation {self.correlation} is not a valid equicorrelation for {self.dim} dimensions"
            )
        if self.conflict_rate is not None and not 0.0 <= self.conflict_rate <= 1.0:
            raise ConfigError(f"conflict_rate must be in [0, 1], got {self.conflict_rate}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")

    # ---- structure -----------------------------------------------------------------------------
    @property
    def num_basis(self) -> int:
        """K, the number of basis reward functions."""
        return 2 if self.basis == "step-1d" else self.dim

    @property
    def discrete(self) -> bool:
        return self.modes is not None

    @property
    def num_modes(self) -> int:
        return len(self.modes) if self.modes is not None else 0

    @property
    def reference_weights(self) -> np.ndarray:
        """(R, K): the reward functions that define conflicting pairs (modes, or the basis)."""
        return np.asarray(self.modes if self.modes is not None else np.eye(self.num_basis), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Population:
        known = set(cls.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown:
            raise ConfigError(f"unknown population field(s): {', '.join(sorted(unknown))}")
        return cls(**spec)

    # ---- rewards and choices ---------------------------------------------------------------------
    def basis_rewards(self, options: Array) -> Array:
        """(..., D) options -> (..., K) basis rewards; accepts numpy arrays or torch tensors."""
        if self.basis == "identity":
            return options
        y = options[..., 0]
        low = y <= 0.5
        if isinstance(options, torch.Tensor):
            return torch.stack([torch.where(low, y, 2 * y), torch.where(low, y, 1 - y)], dim=-1)
        return np.stack([np.where(low, y, 2 * y), np.where(low, y, 1 - y)], axis=-1)

    def rewards(self, options: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """r(y; w) for options (N, D) and weights (N, K) (or (K,)) -> (N,)."""
        return (self.basis_rewards(options) * weights).sum(axis=-1)

    def is_conflicting(self, y1: np.ndarray, y2: np.ndarray) -> np.ndarray:
        """(N,) bool: the reference reward functions do not all agree on y1 vs y2 (Definition 4.2)."""
        diff = (self.basis_rewards(y1) - self.basis_rewards(y2)) @ self.reference_weights.T  # (N, R)
        prefers_first = diff > 0
        return prefers_first.any(axis=1) & ~prefers_first.all(axis=1)

    # ---- sampling --------------------------------------------------------------------------------
    def sample_options(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D) options from the population's option distribution."""
        if self.options == "uniform":
            return rng.uniform(self.low, self.high, size=(n, self.dim))
        if self.dim == 1:
            return rng.standard_normal((n, 1))
        # Equicorrelated unit-variance Gaussian: y = sqrt(rho) * shared + sqrt(1 - rho) * own (rho >= 0),
        # or via a Cholesky factor in general (handles rho = -1 in 2-D exactly).
        cov = np.full((self.dim, self.dim), self.correlation) + (1 - self.correlation) * np.eye(self.dim)
        eigval, eigvec = np.linalg.eigh(cov)
        factor = eigvec * np.sqrt(np.clip(eigval, 0.0, None))
        return rng.standard_normal((n, self.dim)) @ factor.T

    def sample_users(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw n users: (modes (n,) int, -1 for continuous users; weights (n, K))."""
        if self.modes is not None:
            modes = rng.choice(self.num_modes, size=n, p=np.asarray(self.mode_probs))
            return modes.astype(np.int64), self.reference_weights[modes]
        weights = rng.dirichlet(np.asarray(self.dirichlet_alpha, dtype=np.float64), size=n)
        return np.full(n, -1, dtype=np.int64), weights

    def sample_pairs(
        self, n: int, rng: np.random.Generator, conflicting: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """n option pairs ((n, D), (n, D)); only conflicting (True) or non-conflicting (False) if asked."""
        if conflicting is None or n == 0:
            return self.sample_options(n, rng), self.sample_options(n, rng)
        got1, got2, tried = [], [], 0
        have = 0
        while have < n:
            batch = max(1024, 2 * (n - have))
            y1, y2 = self.sample_options(batch, rng), self.sample_options(batch, rng)
            keep = self.is_conflicting(y1, y2) == conflicting
            got1.append(y1[keep])
            got2.append(y2[keep])
            have += int(keep.sum())
            tried += batch
            if have == 0 and tried >= 200_000:
                kind = "conflicting" if conflicting else "non-conflicting"
                raise ConfigError(f"population '{self.name}' produced no {kind} pairs in {tried} draws")
        return np.concatenate(got1)[:n], np.concatenate(got2)[:n]

    def choose(
        self, y1: np.ndarray, y2: np.ndarray, weights: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """(N,) bool: whether each user (row of ``weights``) prefers y1 over y2."""
        diff = self.rewards(y1, weights) - self.rewards(y2, weights)
        if self.temperature > 0:
            return rng.random(len(diff)) < 1.0 / (1.0 + np.exp(-diff / self.temperature))
        ties = diff == 0
        return np.where(ties, rng.random(len(diff)) < 0.5, diff > 0)


def simulate(
    population: Population, num_users: int, pairs_per_user: int, seed: int = 0, user_prefix: str = "user"
) -> PreferenceData:
    """Draw ``num_users`` users and ``pairs_per_user`` answered pairs each, in the data format.

    The hidden mode (discrete populations) or hidden weights (continuous ones) are stored in
    ``hidden_mode`` / ``hidden_z`` for evaluation only.
    """
    if num_users < 1 or pairs_per_user < 1:
        raise ConfigError("num_users and pairs_per_user must be positive")
    rng = np.random.default_rng(seed)
    modes, weights = population.sample_users(num_users, rng)
    n = num_users * pairs_per_user
    if population.conflict_rate is None:
        y1, y2 = population.sample_pairs(n, rng)
    else:
        per_user = round(population.conflict_rate * pairs_per_user)
        c1, c2 = population.sample_pairs(num_users * per_user, rng, conflicting=True)
        n1, n2 = population.sample_pairs(num_users * (pairs_per_user - per_user), rng, conflicting=False)
        y1 = np.concatenate(
            [
                c1.reshape(num_users, per_user, population.dim),
                n1.reshape(num_users, pairs_per_user - per_user, population.dim),
            ],
            axis=1,
        )
        y2 = np.concatenate(
            [
                c2.reshape(num_users, per_user, population.dim),
                n2.reshape(num_users, pairs_per_user - per_user, population.dim),
            ],
            axis=1,
        )
        order = np.argsort(rng.random((num_users, pairs_per_user)), axis=1)[..., None]
        y1 = np.take_along_axis(y1, order, axis=1).reshape(n, -1)
        y2 = np.take_along_axis(y2, order, axis=1).reshape(n, -1)
    user_of_row = np.repeat(np.arange(num_users), pairs_per_user)
    first = population.choose(y1, y2, weights[user_of_row], rng)
    chosen = np.where(first[:, None], y1, y2).astype(np.float32)
    rejected = np.where(first[:, None], y2, y1).astype(np.float32)
    width = len(str(num_users - 1))
    return PreferenceData(
        user_ids=np.array([f"{user_prefix}{u:0{width}d}" for u in user_of_row], dtype=object),
        chosen=chosen,
        rejected=rejected,
        hidden_mode=modes[user_of_row] if population.discrete else None,
        hidden_z=None if population.discrete else weights[user_of_row].astype(np.float32),
        source=f"<simulated {population.name}>",
    )


def step_population() -> Population:
    """Example 4.1 (Figure 1): options on [0, 1], two equally likely modes, half the pairs conflict."""
    return Population(
        name="step-1d",
        dim=1,
        options="uniform",
        low=0.0,
        high=1.0,
        basis="step-1d",
        modes=[[1.0, 0.0], [0.0, 1.0]],
        mode_probs=[0.5, 0.5],
        mode_names=["2y above 0.5", "1-y above 0.5"],
    )


def gaussian_population(rho: float) -> Population:
    """Example 4.3 (Figure 4): [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]); mode k prefers larger h_k."""
    return Population(
        name=f"gaussian-rho{rho:+.2f}",
        dim=2,
        options="gaussian",
        correlation=rho,
        modes=[[1.0, 0.0], [0.0, 1.0]],
        mode_probs=[0.5, 0.5],
        mode_names=["h0", "h1"],
    )


def attribute_population(
    num_attributes: int = 3,
    modes: list[list[float]] | None = None,
    mode_probs: list[float] | None = None,
    dirichlet_alpha: list[float] | None = None,
    correlation: float = 0.0,
    options: str = "gaussian",
    temperature: float = 0.0,
    conflict_rate: float | None = None,
) -> Population:
    """K attributes per option; users are discrete modes (one-hot per attribute unless ``modes`` is
    given) or, with ``dirichlet_alpha``, continuous Dirichlet weights over the attributes."""
    if dirichlet_alpha is None and modes is None:
        modes = np.eye(num_attributes).tolist()
    kind = "dirichlet" if dirichlet_alpha is not None else f"{len(modes)}modes"
    return Population(
        name=f"attributes-{num_attributes}d-{kind}",
        dim=num_attributes,
        options=options,
        correlation=correlation,
        modes=modes,
        mode_probs=mode_probs,
        dirichlet_alpha=dirichlet_alpha,
        temperature=temperature,
        conflict_rate=conflict_rate,
    )
