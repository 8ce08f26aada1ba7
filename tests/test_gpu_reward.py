"""Every public reward-side path works with the model on any torch device and gives the CPU's numbers:
evaluate (with the Bayes row), evaluate_batches, personalize / rewards / compare, active elicitation,
the Gaussian identification error and the user embeddings of the text studies.

Each test runs on the CPU and, marked ``gpu``, on CUDA when a device is present (skipped otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.active import elicit_batch, member_probabilities, select_next
from steerable.bayes import BayesOptimalPredictor
from steerable.data import TaskSampler
from steerable.data.simulate import gaussian_population
from steerable.evaluation import evaluate, evaluate_batches
from steerable.experiments.gaussian import identification_error, identification_tasks
from steerable.experiments.modes import user_embeddings
from steerable.models import build_reward_model

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


def _pair(model_type: str, device: str, **kw):
    """The same weights on the CPU and on ``device``."""
    cpu = build_reward_model(tiny_config(model_type, **kw), seed=0).eval()
    moved = build_reward_model(tiny_config(model_type, **kw), seed=0).to(device).eval()
    return cpu, moved


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_on_the_models_device(device, step_data):
    pop, _, val = step_data
    cpu, moved = _pair("np-btl", device)
    args = dict(num_targets=12, num_tasks=64, population=pop, seed=0)
    a, b = evaluate(cpu, val, [0, 2], **args).to_json(), evaluate(moved, val, [0, 2], **args).to_json()
    for key in ("accuracy", "stderr", "bayes_accuracy"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    batches = TaskSampler(val, 0, 3, 8, batch_size=16, seed=1).fixed_tasks([3], 32)[3]
    assert evaluate_batches(cpu, batches)["accuracy"] == pytest.approx(
        evaluate_batches(moved, batches)["accuracy"], abs=1e-6
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["btl", "dpl", "np-btl", "vnp-btl"])
def test_personalize_score_compare_on_the_models_device(device, model_type):
    cpu, moved = _pair(model_type, device)
    rng = np.random.default_rng(0)
    ctx = rng.uniform(size=(5, 1)).astype(np.float32), rng.uniform(size=(5, 1)).astype(np.float32)
    options, other = (
        rng.uniform(size=(30, 1)).astype(np.float32),
        rng.uniform(size=(30, 1)).astype(np.float32),
    )
    for context in (ctx, ()):
        u, v = cpu.personalize(*context), moved.personalize(*context)
        np.testing.assert_allclose(u.rewards(options), v.rewards(options), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(u.compare(options, other), v.compare(options, other), rtol=1e-4, atol=1e-5)
    # tensors given on another device than the model's are moved too
    u, w = cpu.personalize(*ctx), moved.personalize(torch.from_numpy(ctx[0]), torch.from_numpy(ctx[1]))
    np.testing.assert_allclose(w.rewards(torch.from_numpy(options)), u.rewards(options), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_active_elicitation_on_the_models_device(device):
    cpu, moved = _pair("vnp-btl", device, input_dim=2)
    rng = np.random.default_rng(1)
    pool_a, pool_b = torch.randn(3, 12, 2), torch.randn(3, 12, 2)
    answers = torch.from_numpy(rng.random((3, 12)) < 0.5)
    ctx = torch.randn(3, 2, 2)
    np.testing.assert_allclose(
        member_probabilities(cpu, ctx, ctx.flip(1), pool_a, pool_b).numpy(),
        member_probabilities(moved, ctx, ctx.flip(1), pool_a, pool_b).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    for strategy in ("uncertainty", "info-gain"):
        a = elicit_batch(strategy, pool_a, pool_b, answers, 3, np.random.default_rng(0), predictor=cpu)
        b = elicit_batch(strategy, pool_a, pool_b, answers, 3, np.random.default_rng(0), predictor=moved)
        assert torch.equal(a, b)
    q_cpu = select_next(cpu, pool_a[0].numpy(), pool_b[0].numpy(), [2], [True], rng=0)
    q_dev = select_next(moved, pool_a[0].numpy(), pool_b[0].numpy(), [2], [True], rng=0)
    assert q_cpu.index == q_dev.index


@pytest.mark.parametrize("device", DEVICES)
def test_study_helpers_on_the_models_device(device, step_data):
    cpu, moved = _pair("np-btl", device, input_dim=2)
    tasks = identification_tasks(
        gaussian_population(0.5), gaussian_population(0.0), 50, 4, np.random.default_rng(0)
    )
    assert identification_error(cpu, tasks) == pytest.approx(identification_error(moved, tasks), abs=1e-6)
    bayes = identification_error(BayesOptimalPredictor(gaussian_population(0.5)), tasks)
    assert 0.0 <= bayes[0] <= 1.0 and bayes[1] > 0
    _, _, val = step_data
    cpu1, moved1 = _pair("np-btl", device)
    z_cpu, modes = user_embeddings(cpu1, val, 3, 20, seed=0)
    z_dev, modes_dev = user_embeddings(moved1, val, 3, 20, seed=0)
    np.testing.assert_allclose(z_cpu, z_dev, rtol=1e-4, atol=1e-5)
    assert (modes == modes_dev).all()
