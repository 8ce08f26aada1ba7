"""The Bayes-optimal yardsticks agree with the paper's closed forms."""

import math

import numpy as np

from steerable.bayes import (
    BayesOptimalPredictor,
    gaussian_identification_error,
    step_bayes_accuracy,
)
from steerable.data import attribute_population, gaussian_population, simulate, step_population
from steerable.evaluation import evaluate
from steerable.experiments.gaussian import identification_error, identification_tasks


def test_closed_forms():
    assert [round(step_bayes_accuracy(k), 4) for k in (0, 1, 3, 5, 10)] == [
        0.75,
        0.875,
        0.9688,
        0.9922,
        0.9998,
    ]
    assert gaussian_identification_error(-1.0) == 0.0
    assert math.isclose(gaussian_identification_error(0.0), 0.25)
    assert math.isclose(gaussian_identification_error(1.0), 0.5)


def test_bayes_predictor_reaches_the_step_closed_form():
    pop = step_population()
    data = simulate(pop, 300, 30, seed=0)
    result = evaluate(BayesOptimalPredictor(pop), data, [0, 1, 3], num_tasks=1500, seed=0)
    for k in (0, 1, 3):
        assert abs(result.accuracy[k] - step_bayes_accuracy(k)) < 4 * result.model[k]["stderr"] + 0.003


def test_bayes_identification_error_matches_appendix_a():
    for rho in (-0.5, 0.0, 0.75):
        tasks = identification_tasks(
            gaussian_population(rho), gaussian_population(-1.0), 20000, 2, np.random.default_rng(0)
        )
        err, se = identification_error(BayesOptimalPredictor(gaussian_population(rho)), tasks)
        assert abs(err - gaussian_identification_error(rho)) < 4 * se + 0.002


def test_posterior_concentrates_on_the_true_mode():
    pop = attribute_population(3)
    data = simulate(pop, 30, 12, seed=1)
    from steerable.data import TaskSampler

    batch = TaskSampler(data, 0, 10, 12, batch_size=30, seed=0).sample(num_context=10)
    post = (
        BayesOptimalPredictor(pop)
        .log_posterior(batch.context_chosen, batch.context_rejected, batch.context_mask)
        .exp()
    )
    assert (post.argmax(1) == batch.hidden_mode).float().mean() > 0.95


def test_dirichlet_particles_give_a_sensible_reference():
    pop = attribute_population(2, dirichlet_alpha=[0.5, 0.5])
    data = simulate(pop, 200, 20, seed=0)
    result = evaluate(BayesOptimalPredictor(pop, num_particles=2048), data, [0, 8], num_tasks=400, seed=0)
    assert result.accuracy[8] > result.accuracy[0] + 0.05
