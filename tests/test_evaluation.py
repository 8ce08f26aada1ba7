"""Evaluation scores only unseen pairs, reports honest uncertainty, and never lets a model beat Bayes."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.bayes import BayesOptimalPredictor
from steerable.data import TaskBatch
from steerable.evaluation import evaluate, expected_calibration_error
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


def test_no_predictor_beats_bayes_beyond_noise(step_data):
    """An (untrained or trained) model is at most Bayes + noise on the same tasks."""
    pop, _, val = step_data
    model = build_reward_model(tiny_config("np-btl"), seed=0)
    result = evaluate(model, val, [0, 1, 4], num_targets=12, num_tasks=400, population=pop, seed=0)
    for k in (0, 1, 4):
        assert result.accuracy[k] <= result.bayes[k]["accuracy"] + 3 * result.model[k]["stderr"]


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
