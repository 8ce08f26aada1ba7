"""The policy commands through ``main(argv)``: train-policy (and its resume), evaluate-policy, generate,
the two NP-DPO studies' schemas, and clear errors — on a tiny LM and a tiny embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from steerable.cli import main
from steerable.policy.sft import tiny_llama, word_tokenizer
from steerable.text import synthetic_text as world


def _write_pairs(path, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(data.num_pairs):
            row = {
                "user_id": str(data.user_ids[i]),
                "prompt": data.prompts[i],
                "chosen": data.chosen[i],
                "rejected": data.rejected[i],
                "hidden_mode": int(data.hidden_mode[i]),
            }
            handle.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def policy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy-cli")
    tok = word_tokenizer(world.vocabulary())
    lm = tiny_llama(len(tok), hidden=32, layers=2, seed=0)
    lm.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    train_prompts, test_prompts = world.split_prompts(0.25, seed=0)
    train, _ = world.simulate_users(train_prompts, 8, 6, seed=1)
    test, _ = world.simulate_users(test_prompts, 4, 6, seed=2, first_user=100)
    _write_pairs(root / "train.jsonl", train)
    _write_pairs(root / "test.jsonl", test)
    return root


def _train_args(root, tiny_encoder, out, *extra):
    return [
        "train-policy",
        "--data",
        str(root / "train.jsonl"),
        "--out",
        str(out),
        "--base-model",
        str(root / "base"),
        "--embedder",
        tiny_encoder,
        "--cache-dir",
        str(root / "cache"),
        "--lora-r",
        "4",
        "--latent-dim",
        "8",
        "--encoder-hidden",
        "16",
        "--hyper-hidden",
        "16",
        "--max-steps",
        "3",
        "--users-per-batch",
        "2",
        "--targets-per-user",
        "1",
        "--max-context",
        "2",
        "--max-length",
        "48",
        "--max-prompt-length",
        "24",
        "--save-every",
        "2",
        "--seed",
        "0",
        *extra,
    ]


def test_train_evaluate_generate(policy_world, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "np"
    assert main(_train_args(policy_world, tiny_encoder, out)) == 0
    for name in (
        "policy.safetensors",
        "policy_config.json",
        "embedder.json",
        "metrics.csv",
        "train_config.json",
    ):
        assert (out / name).exists(), name
    capsys.readouterr()
    # a finished run is not retrained: same command, nothing new
    assert main(_train_args(policy_world, tiny_encoder, out)) == 0
    assert "3 steps (" in capsys.readouterr().out
    # changed settings are refused without --overwrite; a longer run resumes
    assert main(_train_args(policy_world, tiny_encoder, out, "--beta", "0.2")) == 2
    assert "train.beta" in capsys.readouterr().err
    assert main(_train_args(policy_world, tiny_encoder, out, "--max-steps", "4")) == 0
    assert "4 steps (" in capsys.readouterr().out

    report = tmp_path / "eval.json"
    args = ["evaluate-policy", str(out), "--data", str(policy_world / "test.jsonl"), "--context-sizes", "0,2"]
    args += ["--tasks", "4", "--targets", "2", "--max-length", "48", "--json", str(report)]
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert set(result["accuracy"]) == {"0", "2"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert 0.0 <= result["label_swap_flip_rate"] <= 1.0
    assert set(result["accuracy_by_mode"]) <= {"0", "1"}

    capsys.readouterr()
    args = ["generate", "--model", str(out), "--context", str(policy_world / "test.jsonl"), "--user", "u100"]
    args += ["--prompt", "tell me about the red cat", "--max-new-tokens", "5", "--num-samples", "2", "--json"]
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(x["prompt"] == "tell me about the red cat" for x in lines)
    # the same seed gives the same samples
    assert main(args) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()] == lines


def test_btl_dpo_trains_without_an_embedder(policy_world, tmp_path):
    out = tmp_path / "btl"
    assert main(_train_args(policy_world, "no-such-embedder", out, "--model", "btl-dpo")) == 0
    assert not (out / "embedder.json").exists()
    config = json.loads((out / "policy_config.json").read_text())
    assert config["conditional"] is False


def test_clear_errors(policy_world, tiny_encoder, tmp_path, capsys):
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"user_id": "a", "chosen": [0.1], "rejected": [0.2]}) + "\n")
    assert main(_train_args(policy_world, tiny_encoder, tmp_path / "x", "--data", str(numeric))) == 2
    err = capsys.readouterr().err
    assert "numeric vectors" in err and "Traceback" not in err
    args = ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]
    assert main(args) == 2
    assert "not a policy folder" in capsys.readouterr().err


def test_npdpo_synthetic_schema(tmp_path, tiny_encoder):
    out = tmp_path / "study"
    args = ["experiment", "npdpo-synthetic", "--out", str(out), "--seed", "0", "--embedder", tiny_encoder]
    args += ["--cache-dir", str(tmp_path / "cache"), "--train-users", "8", "--test-users", "4"]
    args += ["--pairs-per-user", "6", "--sft-steps", "3", "--steps", "2", "--users-per-batch", "2"]
    args += ["--max-context", "2", "--context-sizes", "0,2", "--eval-tasks", "4", "--generation-prompts", "1"]
    args += ["--lm-hidden", "16", "--latent-dim", "8"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    types = set(world.TYPES)
    assert set(r["models"]["np-dpo"]["accuracy"]) == types
    assert all(set(v) == {"0", "2"} for v in r["models"]["np-dpo"]["accuracy"].values())
    assert all(set(v) == {"0"} for v in r["models"]["btl-dpo"]["accuracy"].values())
    gen = r["generation"]["np-dpo"]
    assert 0 <= gen["with_context"] <= 1 and 0 <= gen["without_context"] <= 1
    assert 0 <= r["label_swap_flip_rate"] <= 1
    assert (out / "npdpo_synthetic.png").exists() and (out / "npdpo_training.png").exists()


def test_npdpo_hh_smoke_schema(tmp_path, tiny_encoder, tiny_decoder):
    out = tmp_path / "hh"
    args = ["experiment", "npdpo-hh", "--out", str(out), "--seed", "0", "--smoke", "--embedder", tiny_encoder]
    args += ["--base-model", tiny_decoder, "--cache-dir", str(tmp_path / "cache"), "--max-length", "64"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["smoke"] is True and len(r["modes"]) == 2
    for mode in r["modes"]:
        curve = r["models"]["np-dpo"]["accuracy"][mode]
        assert set(curve) == {"0", "4"} and all(0 <= v <= 1 for v in curve.values())
        assert set(r["models"]["btl-dpo"]["accuracy"][mode]) == {"0"}
    assert set(r["generation"]) >= {*r["modes"], "no context"}
    assert np.isfinite(r["generation"]["no context"]["mean_words"])
    assert (out / "npdpo_hh.png").exists()
