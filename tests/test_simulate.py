"""Simulators: the populations behave as the paper says (conflict rates, choices, hidden variables)."""

import math

import numpy as np
import pytest

from steerable.data import attribute_population, gaussian_population, simulate, step_population
from steerable.data.simulate import Population
from steerable.errors import ConfigError


def test_step_population_half_the_pairs_conflict_and_choices_follow_the_mode():
    pop = step_population()
    rng = np.random.default_rng(0)
    y1, y2 = pop.sample_pairs(200_000, rng)
    assert abs(pop.is_conflicting(y1, y2).mean() - 0.5) < 0.005
    data = simulate(pop, 50, 20, seed=0)
    r = pop.basis_rewards(data.chosen.astype(np.float64)) - pop.basis_rewards(
        data.rejected.astype(np.float64)
    )
    assert (r[np.arange(data.num_pairs), data.hidden_mode] > 0).all()  # deterministic choices
    assert data.chosen.min() >= 0 and data.chosen.max() <= 1


@pytest.mark.parametrize("rho", [-1.0, -0.7, 0.0, 0.7])
def test_gaussian_conflict_rate_is_arccos_rho_over_pi(rho):
    pop = gaussian_population(rho)
    y1, y2 = pop.sample_pairs(100_000, np.random.default_rng(1))
    assert abs(pop.is_conflicting(y1, y2).mean() - math.acos(rho) / math.pi) < 0.006
    assert abs(np.corrcoef(y1.T)[0, 1] - rho) < 0.02


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_conflict_rate_control(rate):
    pop = attribute_population(3, conflict_rate=rate)
    data = simulate(pop, 30, 20, seed=0)
    conflicting = pop.is_conflicting(data.chosen.astype(np.float64), data.rejected.astype(np.float64))
    assert conflicting.mean() == pytest.approx(rate, abs=1e-9)


def test_impossible_conflict_rate_is_reported():
    pop = Population(name="anti", dim=2, correlation=-1.0, modes=[[1, 0], [0, 1]], conflict_rate=0.5)
    with pytest.raises(ConfigError, match="no non-conflicting pairs"):
        simulate(pop, 2, 4, seed=0)


def test_dirichlet_users_store_weights_on_the_simplex():
    pop = attribute_population(3, dirichlet_alpha=[0.5, 0.5, 0.5])
    data = simulate(pop, 40, 5, seed=0)
    assert data.hidden_mode is None and data.hidden_z.shape == (200, 3)
    np.testing.assert_allclose(data.hidden_z.sum(1), 1.0, atol=1e-5)
    assert len(np.unique(data.user_z.round(5), axis=0)) == 40


def test_bradley_terry_choices_follow_the_logistic_rate():
    pop = Population(name="bt", dim=1, modes=[[1.0]], temperature=1.0)
    rng = np.random.default_rng(0)
    y1, y2 = np.full((50_000, 1), 1.0), np.zeros((50_000, 1))
    first = pop.choose(y1, y2, np.ones((50_000, 1)), rng)
    assert abs(first.mean() - 1 / (1 + math.exp(-1))) < 0.01


def test_population_round_trips_through_dict():
    pop = attribute_population(4, mode_probs=[0.1, 0.2, 0.3, 0.4], temperature=0.5, correlation=0.3)
    assert Population.from_dict(pop.to_dict()) == pop


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modes": [[1, 0]], "dirichlet_alpha": [1, 1]}, "not both"),
        ({"modes": [[1, 0, 0]]}, "every mode needs 2 weights"),
        ({"modes": [[1, 0], [0, 1]], "mode_probs": [0.9, 0.2]}, "summing to 1"),
        ({"modes": [[1, 0]], "correlation": 1.5}, "correlation"),
        ({"modes": [[1, 0]], "conflict_rate": 2.0}, "conflict_rate"),
    ],
)
def test_invalid_population_is_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Population(name="x", dim=2, **kwargs)
