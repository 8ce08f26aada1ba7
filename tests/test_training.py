"""The training loop: learns, keeps the best model, logs, resumes with identical numbers."""

import csv

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_train_config
from steerable.errors import ConfigError
from steerable.evaluation import evaluate
from steerable.models import build_reward_model
from steerable.training import TrainConfig, learning_rate_schedule, train_reward_model


def test_np_btl_learns_the_hidden_modes(step_data):
    _, train, val = step_data
    model = build_reward_model(tiny_config("np-btl", hidden_dim=32, latent_dim=16), seed=0)
    config = tiny_train_config(
        max_steps=150, eval_every=50, batch_size=32, learning_rate=3e-3, max_context=8, num_targets=16
    )
    result = train_reward_model(model, train, val, config)
    accuracy = evaluate(result.model, val, [0, 8], num_targets=16, num_tasks=200, seed=0).accuracy
    assert accuracy[8] > 0.85 and accuracy[8] > accuracy[0] + 0.08  # a context-free model stays at 0.75


def test_outputs_and_metrics_file(tmp_path, step_data):
    _, train, val = step_data
    result = train_reward_model(
        build_reward_model(tiny_config("btl"), seed=0), train, val, tiny_train_config(), out_dir=tmp_path
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.csv", "checkpoint", "train_config.json"} <= names
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert result.best_step in (3, 6)


def _run(tmp_path, train, val, steps, **kw):
    model = build_reward_model(
        tiny_config("vnp-btl"), seed=0
    )  # stochastic training: RNG state must be restored
    return train_reward_model(
        model, train, val, tiny_train_config(max_steps=steps, eval_every=2, **kw), out_dir=tmp_path
    )


def test_resume_reproduces_an_uninterrupted_run(tmp_path, step_data):
    _, train, val = step_data
    full = _run(tmp_path / "full", train, val, 8)

    class Stop(Exception):
        pass

    def kill_at_4(step, row, model):
        if step == 4:
            raise Stop

    model = build_reward_model(tiny_config("vnp-btl"), seed=0)
    with pytest.raises(Stop):
        train_reward_model(
            model,
            train,
            val,
            tiny_train_config(max_steps=8, eval_every=2),
            out_dir=tmp_path / "cut",
            callbacks=(kill_at_4,),
        )
    resumed = _run(tmp_path / "cut", train, val, 8)
    assert resumed.resumed_from == 2  # the kill hit before step 4's checkpoint
    assert [r["val_loss"] for r in resumed.history] == pytest.approx(
        [r["val_loss"] for r in full.history], abs=1e-6
    )
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [r["train_loss"] for r in full.history], abs=1e-6
    )
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_finished_run_is_not_retrained_and_changed_settings_are_refused(tmp_path, step_data):
    _, train, val = step_data
    _run(tmp_path, train, val, 4)
    again = _run(tmp_path, train, val, 4)
    assert again.resumed_from == 4 and again.steps == 4
    with pytest.raises(ConfigError, match="learning_rate"):
        _run(tmp_path, train, val, 4, learning_rate=0.5)
    fresh = train_reward_model(
        build_reward_model(tiny_config("vnp-btl"), seed=0),
        train,
        val,
        tiny_train_config(max_steps=4, eval_every=2, learning_rate=0.5),
        out_dir=tmp_path,
        overwrite=True,
    )
    assert fresh.resumed_from == 0


def test_validation_split_by_user_when_no_validation_data(step_data):
    _, train, _ = step_data
    result = train_reward_model(
        build_reward_model(tiny_config("btl"), seed=0), train, None, tiny_train_config()
    )
    assert result.steps == 6


def test_callback_can_stop_training(step_data):
    _, train, val = step_data
    result = train_reward_model(
        build_reward_model(tiny_config("btl"), seed=0),
        train,
        val,
        tiny_train_config(max_steps=30),
        callbacks=(lambda step, row, m: step >= 6,),
    )
    assert result.steps == 6


def test_learning_rate_schedule_warms_up_and_decays():
    lr = learning_rate_schedule(
        TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    )
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(100) == pytest.approx(0.1)
    assert lr(55) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_context": 20, "num_targets": 20}, {"min_context": 3, "max_context": 2}, {"learning_rate": 0}],
)
def test_invalid_training_config(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_resume_refuses_other_data_and_another_number_of_processes(tmp_path, step_data):
    import json

    _, train, val = step_data
    _run(tmp_path, train, val, 4)
    edited = train.select_rows(np.arange(train.num_pairs - 1))  # one row fewer
    with pytest.raises(ConfigError, match="other train data"):
        _run(tmp_path, edited, val, 4)
    state_path = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["description"]["num_processes"] = 2
    state_path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="2 process"):
        _run(tmp_path, train, val, 4)
