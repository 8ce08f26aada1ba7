"""Active elicitation: strategy maths on hand-made cases, the simulated loop, the one-user API, the
candidate-pool reader, ``steerable elicit`` and the study's schema."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.active import (
    ElicitationState,
    binary_entropy,
    elicit,
    elicit_batch,
    select_next,
    strategy_scores,
)
from steerable.cli import main
from steerable.data.pool import load_pool
from steerable.data.simulate import gaussian_population
from steerable.errors import ConfigError, DataError
from steerable.models import build_reward_model


def test_binary_entropy_by_hand():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    h = binary_entropy(p)
    assert h[0] == pytest.approx(0.0, abs=1e-9) and h[2] == pytest.approx(0.0, abs=1e-9)
    assert h[1] == pytest.approx(math.log(2))
    assert h[3] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def _state(pool_a, pool_b, asked=(), answers=()):
    p = pool_a.shape[0]
    available = torch.ones(1, p, dtype=torch.bool)
    available[0, list(asked)] = False
    return ElicitationState(
        pool_a=pool_a[None],
        pool_b=pool_b[None],
        asked=torch.tensor([list(asked)], dtype=torch.long).reshape(1, -1),
        answers=torch.tensor([list(answers)], dtype=torch.bool).reshape(1, -1),
        available=available,
        features_a=pool_a[None].double(),
        features_b=pool_b[None].double(),
    )


def test_bayes_greedy_asks_the_conflicting_pair_and_stops_caring_once_the_mode_is_known():
    pop = gaussian_population(0.5)  # mode 0 prefers larger h0, mode 1 larger h1
    # pair 0: both modes prefer a (agree); pair 1: mode 0 prefers a, mode 1 prefers b (conflict);
    # pair 2: agree; pair 3: conflict
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 2.0], [0.5, -0.2]])
    b = torch.tensor([[0.0, 0.0], [-1.0, 1.0], [0.0, 1.0], [-0.5, 0.2]])
    expected, mutual = strategy_scores("bayes-greedy", _state(a, b), population=pop)
    assert mutual[0, 1] == pytest.approx(math.log(2)) and mutual[0, 0] == pytest.approx(0.0)
    assert expected[0, 1] > expected[0, 0] and expected[0, 3] > expected[0, 2]
    # after the answer to pair 1 the mode is known: no pair carries information any more
    _, mutual = strategy_scores("bayes-greedy", _state(a, b, asked=[1], answers=[True]), population=pop)
    assert torch.allclose(mutual[0, [0, 2, 3]], torch.zeros(3, dtype=mutual.dtype), atol=1e-12)


def test_info_gain_is_zero_where_ensemble_members_agree_and_needs_spread():
    torch.manual_seed(0)
    models = [build_reward_model(tiny_config(input_dim=2), seed=s).eval() for s in (0, 1)]
    a = torch.randn(6, 2)
    same = strategy_scores("info-gain", _state(a, a.clone()), predictor=models)[0]
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-9)  # a vs itself: everyone says 1/2
    with pytest.raises(ConfigError, match="ensemble"):
        strategy_scores("info-gain", _state(a, a.clone()), predictor=models[0])
    vnp = build_reward_model(tiny_config("vnp-btl", input_dim=2), seed=0).eval()
    gains = strategy_scores("info-gain", _state(a, torch.randn(6, 2)), predictor=vnp)[0]
    entropy = strategy_scores("uncertainty", _state(a, torch.randn(6, 2)), predictor=vnp)[0]
    assert (gains >= -1e-9).all() and (entropy >= 0).all() and (entropy <= math.log(2) + 1e-9).all()


def test_elicit_batch_asks_distinct_pairs_and_bayes_greedy_identifies_the_mode():
    pop = gaussian_population(0.5)
    rng = np.random.default_rng(0)
    b, p = 16, 12
    _, weights = pop.sample_users(b, rng)
    a, c = pop.sample_pairs(b * p, rng)
    answers = pop.choose(a, c, np.repeat(weights, p, axis=0), rng).reshape(b, p)
    ta, tc = (torch.from_numpy(x.reshape(b, p, 2).astype(np.float32)) for x in (a, c))
    for strategy in ("random", "bayes-greedy"):
        asked = elicit_batch(
            strategy, ta, tc, torch.from_numpy(answers), 4, np.random.default_rng(1),
            population=pop, features=(ta, tc),
        )  # fmt: skip
        assert asked.shape == (b, 4)
        assert all(len(set(row.tolist())) == 4 for row in asked)
    # bayes-greedy's first question is a conflicting pair whenever the pool has one
    conflicting = pop.is_conflicting(a, c).reshape(b, p)
    first = asked[:, 0].numpy()
    has = conflicting.any(axis=1)
    assert conflicting[np.arange(b), first][has].all()


def test_select_next_validates_and_is_seeded():
    model = build_reward_model(tiny_config("vnp-btl", input_dim=2), seed=0).eval()
    pool_a, pool_b = np.random.default_rng(0).normal(size=(2, 8, 2))
    q1 = select_next(model, pool_a, pool_b, [0], [True], "info-gain", rng=3)
    q2 = select_next(model, pool_a, pool_b, [0], [True], "info-gain", rng=3)
    assert q1.index == q2.index and q1.index != 0 and np.isnan(q1.scores[0])
    assert select_next(model, pool_a, pool_b, exclude=range(7), strategy="random").index == 7
    with pytest.raises(ConfigError, match="out of range"):
        select_next(model, pool_a, pool_b, [9], [True])
    with pytest.raises(ConfigError, match="shape"):
        select_next(model, pool_a[:, :1], pool_b[:, :1])
    with pytest.raises(ConfigError, match="nothing left"):
        select_next(model, pool_a, pool_b, exclude=range(8))
    # a user who always prefers larger first coordinate
    result = elicit(
        model, pool_a, pool_b, lambda i: bool(pool_a[i, 0] > pool_b[i, 0]), 3, "uncertainty", rng=0
    )
    assert len(set(result.asked)) == 3 and len(result.answers) == 3


def test_pool_reader_errors(tmp_path):
    good = tmp_path / "pool.jsonl"
    good.write_text('{"a": [1, 2], "b": [3, 4]}\n{"a": [0, 1], "b": [1, 0]}\n')
    pool = load_pool(good)
    assert len(pool) == 2 and not pool.is_text and pool.a.shape == (2, 2)
    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "hi", "a": "hello", "b": "go away"}\n')
    pool = load_pool(text)
    assert pool.is_text and pool.a[0][-1] == {"role": "assistant", "content": "hello"}
    cases = {
        '{"a": [1, 2], "b": [3]}\n': "line 1: field 'b'",
        '{"a": [1, 2]}\n': "missing required field",
        '{"a": [NaN, 2], "b": [3, 4]}\n': "line 1",
        '{"a": [1, 2], "b": [3, 4]}\n{"a": "x", "b": "y"}\n': "mixes text",
        "": "empty file",
        '{"a": [1, 2], "b": [3, 4]': "invalid JSON",
    }
    for content, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            load_pool(bad)


@pytest.fixture
def saved_vnp(tmp_path):
    model = build_reward_model(tiny_config("vnp-btl", input_dim=2), seed=0)
    model.save_pretrained(tmp_path / "vnp")
    pool = tmp_path / "pool.jsonl"
    rng = np.random.default_rng(0)
    rows = [{"a": rng.normal(size=2).tolist(), "b": rng.normal(size=2).tolist()} for _ in range(10)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "vnp", pool


def test_elicit_cli_ranks_and_asks_interactively(saved_vnp, tmp_path, capsys, monkeypatch):
    model_dir, pool = saved_vnp
    assert main(["elicit", "--model", str(model_dir), "--pool", str(pool), "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "info-gain" and len(out["ranking"]) == 3
    scores = [r["score"] for r in out["ranking"]]
    assert scores == sorted(scores, reverse=True) and out["next"] == out["ranking"][0]
    # interactive: answer a, skip, answer b, quit; answers appended atomically in the data format
    answers = tmp_path / "answers.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("a\ns\nx\nb\nq\n"))
    args = ["elicit", "--model", str(model_dir), "--pool", str(pool), "--interactive", "--num-queries", "6"]
    assert main([*args, "--out", str(answers), "--user-id", "ann"]) == 0
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 2 and all(r["user_id"] == "ann" for r in rows)
    from steerable.data.readers import load_any

    assert load_any(answers).num_pairs == 2  # readable as preference data
    # a deterministic np-btl cannot do info-gain: one clear line, exit 2
    det = tmp_path / "det"
    build_reward_model(tiny_config("np-btl", input_dim=2), seed=0).save_pretrained(det)
    capsys.readouterr()
    assert main(["elicit", "--model", str(det), "--pool", str(pool)]) == 2
    assert "ensemble" in capsys.readouterr().err
    assert main(["elicit", "--model", str(det), "--model", str(det), "--pool", str(pool)]) == 0


def test_active_study_schema(tmp_path):
    out = tmp_path / "active"
    args = ["experiment", "active", "--out", str(out), "--seed", "0", "--populations", "gaussian"]
    args += ["--gaussian-train-users", "60", "--gaussian-pairs-per-user", "16", "--gaussian-steps", "3"]
    args += ["--eval-users", "8", "--pool-size", "6", "--num-targets", "5", "--max-queries", "3"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    (name,) = r["populations"]
    assert "gauss" in name
    curves = r["populations"][name]
    assert set(curves) == {"random", "uncertainty", "info-gain", "bayes-greedy"}
    assert all(set(c) == {"0", "1", "2", "3"} for c in curves.values())
    assert len({c["0"] for c in curves.values()}) == 1  # k = 0: the same prediction for every strategy
    bayes = r["bayes_accuracy"][name]
    assert all(0.0 <= v <= 1.0 for c in bayes.values() for v in c.values())
    assert (out / "active.png").exists()
