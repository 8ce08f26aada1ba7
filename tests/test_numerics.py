"""Subnormal floats are flushed to zero while the library trains, evaluates or personalises, and the
caller's floating-point mode is restored afterwards (it is processor state that numpy and every other
library in the process share)."""

import numpy as np
import torch

from conftest import tiny_config, tiny_train_config
from steerable.evaluation import evaluate
from steerable.models import build_reward_model
from steerable.training import train_reward_model
from steerable.utils.numerics import denormals_flushed, flushing_denormals


def test_denormals_flushed_inside_and_the_callers_mode_restored():
    assert not flushing_denormals()
    with denormals_flushed():
        assert flushing_denormals()
        assert float(torch.tensor(1e-37) / 1e3) == 0.0  # torch sees it too
        with denormals_flushed():
            pass
        assert flushing_denormals()  # an inner block leaves the outer mode alone
    assert not flushing_denormals()
    assert float(torch.tensor(1e-37) / 1e3) > 0.0


def test_training_evaluation_and_personalisation_leave_the_mode_as_they_found_it(step_data):
    _, train, val = step_data
    seen = []
    model = build_reward_model(tiny_config("np-btl"), seed=0)
    config = tiny_train_config(max_steps=3, eval_every=3)
    train_reward_model(model, train, val, config, callbacks=(lambda *a: seen.append(flushing_denormals()),))
    assert seen == [True] and not flushing_denormals()
    evaluate(model, val, [0, 1], num_targets=8, num_tasks=16)
    user = model.personalize(np.zeros((2, 1)), np.ones((2, 1)))
    user.rewards(np.zeros((3, 1))), user.compare(np.zeros((3, 1)), np.ones((3, 1)))
    assert not flushing_denormals()
