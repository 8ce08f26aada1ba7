"""Evaluation scores only unseen pairs, reports honest uncertainty (clustered by user), and its Bayes row
bounds what a type-blind predictor can reach on average."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.bayes import BayesOptimalPredictor
from steerable.data import TaskBatch
from steerable.data.simulate import simulate, step_population
from steerable.evaluation import (
    clustered_stderr,
    evaluate,
    expected_calibration_error,
    type_probe_accuracy,
)
from steerable.models import build_reward_model
from steerable.models.base import PreferenceOutput


class ContextMemorizer:
    """A cheater: certain and right on pairs that are in its context, a coin flip elsewhere."""

    def __call__(self, batch: TaskBatch) -> PreferenceOutput:
        seen = torch.zeros_like(batch.target_mask)
        for j in range(batch.num_context):
            same = (batch.target_chosen == batch.context_chosen[:, j : j + 1]).all(-1)
            seen |= same & batch.context_mask[:, j : j + 1]
        logit = torch.where(seen, torch.tensor(10.0), torch.tensor(0.0))
        return PreferenceOutput(torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))


def test_context_pairs_are_never_scored(step_data):
    _, train, _ = step_data
    result = evaluate(ContextMemorizer(), train, [0, 5, 10], num_targets=20, num_tasks=300, seed=0)
    for k in (0, 5, 10):
        assert result.accuracy[k] == pytest.approx(0.5)  # would be 0.5 + k/40 if context pairs were scored
        assert result.model[k]["num_scored"] == 300 * (20 - k)


def test_bayes_reference_is_computed_on_the_same_tasks(step_data):
    pop, _, val = step_data
    model = build_reward_model(tiny_config("np-btl"), seed=0)
    result = evaluate(model, val, [0, 2], num_targets=12, num_tasks=200, population=pop, seed=0)
    summary = result.to_json()
    assert set(summary) >= {"accuracy", "stderr", "ece", "log_loss", "bayes_accuracy", "accuracy_by_mode"}
    assert set(summary["accuracy"]) == {"0", "2"}
    assert set(summary["accuracy_by_mode"]) == {"2y above 0.5", "1-y above 0.5"}
    again = evaluate(BayesOptimalPredictor(pop), val, [0, 2], num_targets=12, num_tasks=200, seed=0)
    assert summary["bayes_accuracy"]["2"] == pytest.approx(again.accuracy[2])


class ModeGuesser:
    """Type-blind but context-aware: assumes the first mode unless a context pair contradicts it, then
    predicts with the true rewards of the mode it assumes (certain, ties 0). Bayes-optimal on average in
    the step population, but it favours the first type: per type it beats the Bayes row there."""

    def __init__(self, population) -> None:
        self.population = population

    def __call__(self, batch: TaskBatch) -> PreferenceOutput:
        pop = self.population
        weights = torch.as_tensor(pop.reference_weights, dtype=torch.float64)  # (M, K)

        def margin(a, b):  # (B, N, D) ×2 -> (B, N, M) reward differences per mode
            return (pop.basis_rewards(a.double()) - pop.basis_rewards(b.double())) @ weights.T

        explains = (margin(batch.context_chosen, batch.context_rejected) > 0) | ~batch.context_mask[..., None]
        mode = torch.where(explains[:, :, 0].all(dim=1), 0, 1)  # (B,)
        diff = margin(batch.target_chosen, batch.target_rejected)  # (B, N, M)
        logit = 10.0 * torch.sign(diff.gather(2, mode[:, None, None].expand(-1, diff.shape[1], 1))[..., 0])
        logit = logit.float()
        return PreferenceOutput(torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))


class TypeReader(ModeGuesser):
    """A cheater: reads each task's hidden type (which no honest model knows)."""

    def __call__(self, batch: TaskBatch) -> PreferenceOutput:
        pop = self.population
        weights = torch.as_tensor(pop.reference_weights, dtype=torch.float64)[batch.hidden_mode]  # (B, K)
        diff = (
            (
                pop.basis_rewards(batch.target_chosen.double())
                - pop.basis_rewards(batch.target_rejected.double())
            )
            * weights[:, None]
        ).sum(-1)
        logit = (10.0 * torch.sign(diff)).float()
        return PreferenceOutput(torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))


def test_bayes_row_bounds_type_blind_predictors_on_average_not_per_type(step_data):
    """Where the Bayes row is a bound: the population average of any predictor that does not know the
    user's type (here one that also reads the context); not each type (that predictor beats it on the type
    it favours), and not a predictor that reads the type. A Bayes row that is too low (e.g. a posterior
    that ignores the context) is caught by the first assertion."""
    pop, _, val = step_data
    sizes = [0, 1, 2, 4]
    guess = evaluate(ModeGuesser(pop), val, sizes, num_targets=12, num_tasks=400, population=pop, seed=0)
    cheat = evaluate(TypeReader(pop), val, sizes, num_targets=12, num_tasks=400, population=pop, seed=0)
    for k in sizes:
        model, bayes = guess.model[k], guess.bayes[k]
        assert model["accuracy"] <= bayes["accuracy"] + 3 * model["stderr"], k
        assert cheat.model[k]["accuracy"] > bayes["accuracy"] + 3 * cheat.model[k]["stderr"], k
    # per type, at N^C = 0: the guesser is right on every pair of the type it assumes, Bayes only on 3/4
    favoured = guess.model[0]["by_mode"][0]
    assert favoured == pytest.approx(1.0) and favoured > guess.bayes[0]["by_mode"][0] + 0.15


def _larger_wins(batch: TaskBatch) -> PreferenceOutput:
    """Predicts that the larger option is chosen: right for every pair of one type, half of the other's."""
    logit = 10.0 * torch.sign(batch.target_chosen[..., 0] - batch.target_rejected[..., 0])
    return PreferenceOutput(torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))


def test_reported_stderr_matches_the_spread_across_independent_populations():
    """Many tasks per user (300 tasks over 30 users): the reported standard error must be the real
    sampling error, i.e. the spread of the accuracy across independently drawn populations (within 20 %).
    Clustering by task instead (pairs of a user scored again and again as if new) is ~2.9x too small."""
    pop = step_population()
    accuracy, reported, by_task = [], [], []
    for rep in range(160):
        data = simulate(pop, 30, 24, seed=1000 + rep)
        result = evaluate(_larger_wins, data, [2], num_targets=8, num_tasks=300, seed=rep, keep_tasks=True)
        accuracy.append(result.accuracy[2])
        reported.append(result.model[2]["stderr"])
        tasks = result.tasks[2]
        by_task.append(clustered_stderr(tasks["correct"], tasks["count"]))
    spread = float(np.std(accuracy, ddof=1))
    assert float(np.mean(reported)) / spread == pytest.approx(1.0, abs=0.2)
    assert float(np.mean(by_task)) / spread < 0.6  # the task-clustered error this replaces


def test_clustered_stderr_hand_values():
    correct, count = np.array([3.0, 1.0, 4.0, 0.0]), np.array([4.0, 4.0, 4.0, 4.0])
    # equal counts, one row per cluster: the usual standard error of the cluster means (ddof 1)
    means = correct / count
    assert clustered_stderr(correct, count) == pytest.approx(means.std(ddof=1) / 2)
    assert clustered_stderr(correct, count, np.array([-1, -1, -1, -1])) == pytest.approx(
        means.std(ddof=1) / 2
    )
    # two clusters of two rows: the rows' residuals add up within a cluster before squaring
    acc = correct.sum() / count.sum()
    resid = np.array([3 + 1 - 8 * acc, 4 + 0 - 8 * acc])
    expected = np.sqrt(2 / 1 * (resid**2).sum()) / count.sum()
    assert clustered_stderr(correct, count, np.array([7, 7, 2, 2])) == pytest.approx(expected)
    assert np.isnan(clustered_stderr(correct, count, np.array([5, 5, 5, 5])))  # one cluster: unknown


def test_evaluation_is_reproducible(step_data):
    _, _, val = step_data
    model = build_reward_model(tiny_config("vnp-btl"), seed=0)
    a = evaluate(model, val, [0, 3], num_targets=12, num_tasks=100, seed=4).to_json()
    b = evaluate(model, val, [0, 3], num_targets=12, num_tasks=100, seed=4).to_json()
    assert a == b


def test_expected_calibration_error_hand_values():
    assert expected_calibration_error(np.array([1.0, 1.0, 0.0])) == pytest.approx(
        1 / 3
    )  # 1/3 confidently wrong
    assert expected_calibration_error(np.array([0.75, 0.75, 0.75, 0.25])) == pytest.approx(
        0.0
    )  # 3 of 4 at 0.75
    assert expected_calibration_error(np.array([0.75, 0.75, 0.25, 0.25])) == pytest.approx(
        0.25
    )  # 2 of 4 at 0.75
    assert expected_calibration_error(np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_context_sizes_must_leave_targets(step_data):
    _, _, val = step_data
    with pytest.raises(ValueError, match="must exceed"):
        evaluate(ContextMemorizer(), val, [0, 20], num_targets=20)


def test_type_probe_reads_the_type_and_cannot_recall_users():
    """The probe finds a type z carries, and holds whole users out: a z that only names the user (whose
    type was drawn at random) must not look informative, although each user has several tasks."""
    rng = np.random.default_rng(0)
    users = np.tile(np.arange(40), 5)  # 40 users x 5 tasks, users cycling as in evaluation tasks
    user_type = rng.integers(0, 2, 40)
    types = user_type[users]
    carries_type = np.c_[2.0 * types - 1, np.zeros(len(users))] + 0.3 * rng.normal(size=(len(users), 2))
    assert type_probe_accuracy(carries_type, types, users) > 0.95
    names_user = np.eye(40)[users] + 0.01 * rng.normal(size=(len(users), 40))  # one-hot of the user
    assert type_probe_accuracy(names_user, types, users) < 0.7
    assert np.isnan(type_probe_accuracy(carries_type, np.zeros_like(types), users))


@pytest.mark.filterwarnings("error")
def test_type_probe_with_few_users_keeps_both_types_in_every_training_fold():
    """Few users of one type: a fold whose training part lacks a type cannot be fitted (a NaN score and a
    warning); the folds are stratified by type and capped at the rarest type's number of users."""
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(6), np.array([2, 2, 6, 6, 6, 6]))  # the 2 rare-type users have fewer tasks
    types = np.array([0, 0, 1, 1, 1, 1])[users]
    latents = np.c_[2.0 * types - 1] + 0.3 * rng.normal(size=(len(users), 1))
    assert type_probe_accuracy(latents, types, users) > 0.9
    lone = np.where(users == 0, 0, 1)  # one user of type 0: it cannot be held out and probed
    assert np.isnan(type_probe_accuracy(latents, lone, users))
