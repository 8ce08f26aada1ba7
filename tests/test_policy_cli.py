"""The policy commands through ``main(argv)``: train-policy (and its resume), evaluate-policy, generate,
the two NP-DPO studies' schemas, and clear errors — on a tiny LM and a tiny embedder."""

from __future__ import annotations

import json
import re

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


def test_train_policy_keeps_the_best_step_on_validation_users(policy_world, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "np"
    val = ["--val-data", str(policy_world / "test.jsonl"), "--validate-every", "2", "--val-targets", "2"]
    assert main(_train_args(policy_world, tiny_encoder, out, *val)) == 0
    selection = json.loads((out / "train_config.json").read_text())["selection"]
    assert [row["step"] for row in selection["history"]] == [2, 3]
    assert f"saved step {selection['best_step']}: validation accuracy" in capsys.readouterr().out
    # one without the other is a clear error, before any work
    assert main(_train_args(policy_world, tiny_encoder, tmp_path / "a", "--validate-every", "2")) == 2
    assert "--val-data" in capsys.readouterr().err
    assert main(_train_args(policy_world, tiny_encoder, tmp_path / "b", *val[:2])) == 2
    assert "--validate-every" in capsys.readouterr().err


def test_train_evaluate_generate(policy_world, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "np"
    bf16 = ("--mixed-precision", "bf16")  # on a CPU too; evaluate-policy reads it back
    assert main(_train_args(policy_world, tiny_encoder, out, *bf16)) == 0
    first = capsys.readouterr().out
    for name in (
        "policy.safetensors",
        "policy_config.json",
        "embedder.json",
        "metrics.csv",
        "train_config.json",
    ):
        assert (out / name).exists(), name
    # a finished run is not retrained: same command, nothing new, and the same summary of its last
    # logged steps (steps 1-3, the one metrics.csv row) as the run that trained it
    assert main(_train_args(policy_world, tiny_encoder, out, *bf16)) == 0
    again = capsys.readouterr().out
    assert "3 steps (" in again

    def summary_of(output: str) -> str:
        return re.search(r"steps 1–3: acc .*? \(nats\)", output).group(0)

    assert summary_of(again) == summary_of(first)
    # changed settings are refused without --overwrite; a longer run resumes
    assert main(_train_args(policy_world, tiny_encoder, out, *bf16, "--beta", "0.2")) == 2
    assert "train.beta" in capsys.readouterr().err
    assert main(_train_args(policy_world, tiny_encoder, out, *bf16, "--max-steps", "4")) == 0
    assert "4 steps (" in capsys.readouterr().out

    report = tmp_path / "eval.json"
    args = ["evaluate-policy", str(out), "--data", str(policy_world / "test.jsonl"), "--context-sizes", "0,2"]
    args += ["--tasks", "4", "--targets", "2", "--max-length", "48", "--json", str(report)]
    assert main(args) == 0
    result = json.loads(report.read_text())
    assert set(result["accuracy"]) == {"0", "2"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert 0.0 <= result["label_swap_flip_rate"] <= 1.0
    assert result["label_swap_flip_rate_stderr"] >= 0.0  # clustered by user (4 tasks, several users)
    assert set(result["accuracy_by_mode"]) <= {"0", "1"}
    # by default in the precision the policy was trained in, like the trainer's own evaluation
    assert result["mixed_precision"] == "bf16"
    assert main([*args, "--mixed-precision", "no"]) == 0
    assert json.loads(report.read_text())["mixed_precision"] == "no"
    record = (out / "train_config.json").read_text()
    (out / "train_config.json").write_text("{not json")  # a damaged record: one line, no traceback
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train_config.json" in err and "mixed_precision" in err and "Traceback" not in err
    (out / "train_config.json").write_text(record)

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
    # a mirror user is another type's user only when every pair conflicts
    args = [
        "experiment",
        "npdpo-hh",
        "--out",
        str(tmp_path / "hh"),
        "--mirror-users",
        "--conflict-rate",
        "0.5",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mirror_users needs conflict_rate 1" in err and "Traceback" not in err
    assert not (tmp_path / "hh").exists()


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
    assert set(r["label_swap_flip_rate_stderr_by_context"]) == set(r["label_swap_flip_rate_by_context"])
    assert (out / "npdpo_synthetic.png").exists() and (out / "npdpo_training.png").exists()


def test_npdpo_hh_smoke_schema(tmp_path, tiny_encoder, tiny_decoder, monkeypatch):
    import torch

    import steerable.experiments.npdpo_hh as study
    from steerable.policy.model import ConditionalPolicy

    calls = _record_generation(monkeypatch, study)
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
    # no context: the trained empty-set embedding (z = None would turn FiLM off and leave LoRA on)
    policy = ConditionalPolicy.from_pretrained(out / "np-dpo")
    assert calls[-1] is not None and torch.allclose(calls[-1], _empty_set_z(policy), atol=1e-6)


def _record_generation(monkeypatch, module):
    """Wrap ``module.generate`` to record the z each call was given."""
    calls = []
    original = module.generate

    def recording(policy, prompts, z=None, **kwargs):
        calls.append(None if z is None else z.detach().clone())
        return original(policy, prompts, z, **kwargs)

    monkeypatch.setattr(module, "generate", recording)
    return calls


def _empty_set_z(policy):
    import torch

    empty = torch.zeros(1, 0, policy.config.input_dim)
    with torch.no_grad():
        return policy.encode(empty, empty, torch.zeros(1, 0, dtype=torch.bool))[0]


def test_npdpo_real_smoke_schema(tmp_path, tiny_encoder, tiny_decoder, monkeypatch):
    """The documented results.json of npdpo-real (what ../shared/checks/npdpo-real reads), on tiny models;
    no-context answers come from the trained empty-set embedding."""
    import torch

    import steerable.experiments.npdpo_real as study
    import steerable.policy.best_of_n as best_of_n
    from steerable.policy.model import ConditionalPolicy

    calls = _record_generation(monkeypatch, study)
    base_calls = _record_generation(monkeypatch, best_of_n)
    out = tmp_path / "real"
    args = [
        "experiment",
        "npdpo-real",
        "--out",
        str(out),
        "--seed",
        "0",
        "--smoke",
        "--embedder",
        tiny_encoder,
    ]
    args += ["--base-model", tiny_decoder, "--blocks", "last:1", "--cache-dir", str(tmp_path / "cache")]
    args += ["--max-length", "64"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    types = r["types"]
    assert types == ["hedging", "structure"]
    for t in types:
        assert set(r["models"]["np-dpo"]["accuracy"][t]) == {"0", "3"}
        assert set(r["models"]["np-dpo"]["stderr_by_prompt"][t]) == {"0", "3"}  # test users share prompts
        assert set(r["models"]["btl-dpo"]["accuracy"][t]) == {"0"}
        assert set(r["models"]["oracle-dpo"]["accuracy"][t]) == {"0"}
    assert set(r["label_swap_flip_rate_by_context"]) == {"3"}
    assert set(r["label_swap_flip_rate_of_oracles_by_context"]) == {"3"}
    for key in ("stderr", "stderr_by_prompt", "of_oracles_stderr"):
        assert set(r[f"label_swap_flip_rate_{key}_by_context"]) == {"3"}
    assert 0.0 <= r["label_swap_flip_rate_of_oracles_by_context"]["3"] <= 1.0
    right, wrong = r["label_swap_flips_from_right_by_context"], r["label_swap_flips_from_wrong_by_context"]
    assert set(right) == set(wrong) == {"3"}
    assert 0.0 <= right["3"] + wrong["3"] <= r["label_swap_flip_rate_by_context"]["3"] + 1e-12
    assert set(r["user_embedding_type_probe"]) == {"3"}
    g = r["generation"]
    assert g["prompts"] == 2  # --smoke asks for 2
    for condition in (
        "no-context",
        "base",
        *(f"user:{t}" for t in types),
        *(f"best-of-2:{t}" for t in types),
    ):
        for key in (*types, "nll_per_token"):
            assert set(g[condition][key]) == {"mean", "stderr"}, (condition, key)
    for name in ("npdpo_real.png", "generation.png", "npdpo_training.png"):
        assert (out / name).exists(), name
    assert r["training"]["np-dpo"]["selection"] is None  # the default keeps the last step
    policy = ConditionalPolicy.from_pretrained(out / "np-dpo")
    assert len(calls) == 3 and torch.allclose(calls[2], _empty_set_z(policy), atol=1e-6)  # A, B, no context
    assert base_calls == [None]  # the base model's samples: no z (adapters and FiLM off)


def test_npdpo_real_same_seed_same_training(tmp_path, tiny_encoder, tiny_decoder):
    """Same seed, same numbers: two runs give the same NP-DPO training log, whether the prefix cache is
    filled during the run (cold) or read from an earlier one (warm). (The frozen encoder's attention
    dropout, left on and drawn from an unseeded generator, made every run differ from its third step.)"""

    def run(name: str, *extra: str) -> str:
        args = ["experiment", "npdpo-real", "--out", str(tmp_path / name), "--seed", "0", "--smoke"]
        args += ["--embedder", tiny_encoder, "--base-model", tiny_decoder, "--blocks", "last:1"]
        args += ["--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--models", "np-dpo"]
        args += ["--generation-prompts", "0", *extra]
        assert main(args) == 0
        return (tmp_path / name / "np-dpo" / "metrics.csv").read_text()

    def scored(name: str) -> tuple[object, object]:
        results = json.loads((tmp_path / name / "results.json").read_text())
        return results["data"], results["num_scored"]

    cold = run("cold")
    assert run("warm") == cold
    # --policy-seed: another training run on the same users, prompts, split and evaluation tasks
    assert run("other", "--policy-seed", "7") != cold
    assert scored("other") == scored("cold")


def test_npdpo_real_select_baselines_scores_each_oracle_on_its_own_type(
    tmp_path, tiny_encoder, tiny_decoder, monkeypatch
):
    import steerable.policy.selection as selection

    seen: list[set[int]] = []
    original = selection.balanced_accuracy

    def record(margins):
        seen.append(set(margins.mode.tolist()))
        return original(margins)

    monkeypatch.setattr(selection, "balanced_accuracy", record)
    args = ["experiment", "npdpo-real", "--out", str(tmp_path / "r"), "--seed", "0", "--smoke"]
    args += ["--embedder", tiny_encoder, "--base-model", tiny_decoder, "--blocks", "last:1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--generation-prompts", "0"]
    args += ["--models", "np-dpo,oracle-dpo", "--validate-every", "2", "--select-baselines"]
    args += ["--np-dpo-steps", "3"]  # as many as the oracles' (mirrored NP-DPO would take half)
    assert main(args) == 0
    training = json.loads((tmp_path / "r" / "results.json").read_text())["training"]
    for name in ("np-dpo", "oracle-hedging", "oracle-structure"):
        assert training[name]["selection"]["best_step"] is not None, name
    # --smoke: NP-DPO scored at steps 2 and 3 on both types, each oracle at 2 and 3 on its own type only
    assert seen == [{0, 1}, {0, 1}, {0}, {0}, {1}, {1}]
    saved = lambda name: json.loads((tmp_path / "r" / name / "policy_config.json").read_text())  # noqa: E731
    assert saved("np-dpo")["lora_gates"] and not saved("np-dpo")["lora_shared"]  # the default: unshared
    assert saved("oracle-hedging")["lora_shared"] and not saved("oracle-hedging")["lora_gates"]


def test_npdpo_real_np_dpo_steps_apply_to_np_dpo_only_and_halve_with_mirror_users():
    from steerable.experiments.npdpo_real import NPDPORealConfig

    assert NPDPORealConfig().policy_steps(conditional=True) == 150  # mirrored: twice the sequences a step
    assert NPDPORealConfig().policy_steps(conditional=False) == 300
    assert NPDPORealConfig(mirror_users=False).policy_steps(conditional=True) == 300
    assert NPDPORealConfig(steps=50, mirror_users=False).policy_steps(conditional=True) == 50
    assert NPDPORealConfig(steps=1).policy_steps(conditional=True) == 1
    config = NPDPORealConfig(steps=50, np_dpo_steps=70)
    assert config.policy_steps(conditional=True) == 70
    assert config.policy_steps(conditional=False) == 50  # BTL-DPO and the oracles
    with pytest.raises(ValueError, match="np_dpo_steps"):
        NPDPORealConfig(np_dpo_steps=0)


def test_generation_prompts_are_held_out_and_as_many_as_asked():
    """Prompts the test users answered come first, then other test prompts, then validation prompts
    (seed 1's test users answered all 24 test prompts; 32 are asked for); never a training prompt."""
    from steerable.experiments.npdpo_real import generation_prompts

    answered = {f"a{i}" for i in range(20)}
    test = answered | {f"t{i}" for i in range(4)}
    val = {f"v{i}" for i in range(30)}
    prompts = generation_prompts([answered, test, val], 32, seed=1)
    assert len(prompts) == len(set(prompts)) == 32 and set(prompts) <= test | val
    assert test <= set(prompts)  # every test prompt before any validation prompt
    assert prompts == generation_prompts([answered, test, val], 32, seed=1)
    many = {f"a{i}" for i in range(40)}
    assert set(generation_prompts([many, many | {"t"}, val], 32, seed=0)) <= many
    assert len(generation_prompts([answered, test], 32, seed=0)) == 24  # all there are


def test_best_of_n_returns_the_answer_the_reward_model_ranks_first(
    policy_world, tiny_encoder, tmp_path, capsys
):
    from steerable.models.base import RewardModel
    from steerable.policy.best_of_n import option_vectors
    from steerable.text.embedder import Embedder, load_embedder_config

    rm = tmp_path / "rm"
    args = ["train", "--data", str(policy_world / "train.jsonl"), "--model", "np-btl", "--out", str(rm)]
    args += ["--embedder", tiny_encoder, "--cache-dir", str(tmp_path / "cache"), "--max-steps", "5"]
    args += ["--max-context", "2", "--num-targets", "4", "--val-tasks", "8", "--hidden-dim", "16"]
    args += ["--latent-dim", "8", "--num-heads", "2"]
    assert main(args) == 0
    capsys.readouterr()
    prompt = "tell me about the red cat"
    args = ["generate", "--base-model", str(policy_world / "base"), "--reward-model", str(rm), "--json"]
    args += ["--context", str(policy_world / "test.jsonl"), "--user", "u100", "--prompt", prompt]
    args += ["--num-candidates", "4", "--max-new-tokens", "6", "--temperature", "1.0"]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert len(row["candidates"]) == 4 and len(set(row["candidates"])) > 1
    # the rewards recomputed independently: the user's pairs embedded, the model personalised on them
    model = RewardModel.from_pretrained(rm)
    embedder = Embedder(load_embedder_config(rm))
    from steerable.data.text import TextRowBuilder
    from steerable.text.embedder import embed_preferences

    builder = TextRowBuilder("test")
    for n, line in enumerate((policy_world / "test.jsonl").read_text().splitlines()):
        pair = json.loads(line)
        if pair["user_id"] == "u100":
            builder.add(pair, f"line {n}")
    user = embed_preferences(builder.build(), embedder, progress=False)
    chosen, rejected = user.chosen, user.rejected
    rewards = model.personalize(chosen, rejected).rewards(
        option_vectors(embedder, [prompt] * 4, row["candidates"])
    )
    assert np.allclose(rewards, row["rewards"], atol=1e-5)
    assert row["best"] == row["candidates"][int(np.argmax(rewards))]


def test_oracle_disagreement_counts_pairs_where_the_two_oracles_pick_different_winners():
    """The label swap's yardstick: a pair counts when the oracles' predicted winners differ (a tie ½ is
    its own prediction), once per scored target (a pair scored in two tasks counts twice)."""
    from steerable.experiments.npdpo_real import oracle_disagreement

    a = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.5}
    b = {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.5}
    assert oracle_disagreement(np.array([0, 1, 2, 3]), a, b).tolist() == [1, 0, 1, 0]
    assert oracle_disagreement(np.array([0, 0, 1, 3]), a, b).mean() == 0.5
    assert oracle_disagreement(np.array([1, 3]), a, b).mean() == 0.0
    assert len(oracle_disagreement(np.array([], dtype=np.int64), a, b)) == 0


def test_swap_labels_makes_the_other_types_choices_this_types():
    """The mirrored oracle's data: the rows named have chosen and rejected exchanged, as tokens and as
    embeddings, and are marked as this type's users; every other row and the input are untouched."""
    from steerable.data.schema import PreferenceData
    from steerable.experiments.npdpo_real import swap_labels
    from steerable.policy.tokens import TokenizedPairs

    tokens = TokenizedPairs([[1], [2], [3]], [[10], [20], [30]], [[11], [21], [31]])
    vectors = PreferenceData(
        user_ids=np.array(["a", "b", "b"]),
        chosen=np.arange(6, dtype=np.float32).reshape(3, 2),
        rejected=-np.arange(6, dtype=np.float32).reshape(3, 2) - 1,
        hidden_mode=np.array([0, 1, 1]),
    )
    new_tokens, new_vectors = swap_labels(tokens, vectors, np.array([1, 2]), mode=0)
    assert new_tokens.prompt == [[1], [2], [3]]
    assert new_tokens.chosen == [[10], [21], [31]] and new_tokens.rejected == [[11], [20], [30]]
    assert np.array_equal(new_vectors.chosen, [[0, 1], [-3, -4], [-5, -6]])
    assert np.array_equal(new_vectors.rejected, [[-1, -2], [2, 3], [4, 5]])
    assert new_vectors.hidden_mode.tolist() == [0, 0, 0]
    assert new_vectors.user_ids.tolist() == ["a", "b", "b"]
    assert tokens.chosen == [[10], [20], [30]] and vectors.hidden_mode.tolist() == [0, 1, 1]


def test_npdpo_real_mirrored_oracles_learn_from_every_pair(tmp_path, tiny_encoder, tiny_decoder, monkeypatch):
    """--models oracle-dpo-mirrored: one oracle per type on every training pair, the other type's with
    the labels swapped; reported beside NP-DPO with their disagreement (the label swap's yardstick)."""
    import steerable.experiments.npdpo_real as study

    seen: dict[str, tuple[list, list, list]] = {}
    original = study.train_policy

    def record(policy, tokens, embedded, config, out, *args, **kwargs):
        seen[out.name] = (tokens.chosen, tokens.rejected, embedded.hidden_mode.tolist())
        return original(policy, tokens, embedded, config, out, *args, **kwargs)

    monkeypatch.setattr(study, "train_policy", record)
    args = ["experiment", "npdpo-real", "--out", str(tmp_path / "r"), "--seed", "0", "--smoke"]
    args += ["--embedder", tiny_encoder, "--base-model", tiny_decoder, "--blocks", "last:1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--generation-prompts", "0"]
    args += ["--models", "np-dpo,oracle-dpo,oracle-dpo-mirrored"]
    assert main(args) == 0
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    chosen, rejected, modes = seen["np-dpo"]
    for mode, t in enumerate(r["types"]):
        assert set(r["models"]["oracle-dpo-mirrored"]["accuracy"][t]) == {"0"}
        own = [i for i, m in enumerate(modes) if m == mode]
        assert seen[f"oracle-{t}"][0] == [chosen[i] for i in own]  # the plain oracle: its own type
        m_chosen, m_rejected, m_modes = seen[f"oracle-mirrored-{t}"]
        assert m_modes == [mode] * len(modes)  # every pair, all made this type's
        assert m_chosen == [c if m == mode else w for c, w, m in zip(chosen, rejected, modes, strict=True)]
        assert m_rejected == [w if m == mode else c for c, w, m in zip(chosen, rejected, modes, strict=True)]
    for key in ("", "_stderr"):
        assert set(r[f"label_swap_flip_rate_of_mirrored_oracles{key}_by_context"]) == {"3"}
    assert (tmp_path / "r" / "npdpo_real.png").exists()


def test_npdpo_real_unknown_model_is_a_one_line_error(tmp_path, capsys):
    args = ["experiment", "npdpo-real", "--out", str(tmp_path / "r"), "--smoke", "--models", "np-dpo,oracle"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "unknown models ['oracle']" in err and "Traceback" not in err


def test_npdpo_real_np_dpo_lora_rank_applies_to_np_dpo_only(tmp_path, tiny_encoder, tiny_decoder):
    """--np-dpo-lora-r 0: NP-DPO with FiLM only, the oracles keep their adapters (at rank 0 an
    unconditional policy would have nothing to train)."""
    from steerable.experiments.npdpo_real import NPDPORealConfig

    assert NPDPORealConfig().policy_lora_r(conditional=True) == 16
    config = NPDPORealConfig(np_dpo_lora_r=0, lora_gates=False)
    assert (config.policy_lora_r(conditional=True), config.policy_lora_r(conditional=False)) == (0, 16)
    with pytest.raises(ValueError, match="no-lora-gates"):
        NPDPORealConfig(np_dpo_lora_r=0)
    args = ["experiment", "npdpo-real", "--out", str(tmp_path / "r"), "--seed", "0", "--smoke"]
    args += ["--embedder", tiny_encoder, "--base-model", tiny_decoder, "--blocks", "last:1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--generation-prompts", "0"]
    args += ["--models", "np-dpo,oracle-dpo", "--np-dpo-lora-r", "0", "--no-lora-gates"]
    assert main(args) == 0
    rank = lambda name: json.loads((tmp_path / "r" / name / "policy_config.json").read_text())["lora_r"]  # noqa: E731
    assert rank("np-dpo") == 0
    assert rank("oracle-hedging") == rank("oracle-structure") == 16


def test_npdpo_real_identity_empty_context_trains_film_only_np_dpo_on_context_only(
    tmp_path, tiny_encoder, tiny_decoder
):
    """--empty-context identity with FiLM only: NP-DPO without context is the base model, so it trains on
    N^C >= 1 only and is saved with the setting (generation then uses no modulation for no context);
    BTL-DPO and the oracles are untouched; with LoRA NP-DPO still trains at N^C = 0 (its adapters)."""
    from steerable.experiments.npdpo_real import NPDPORealConfig

    film_only = NPDPORealConfig(np_dpo_lora_r=0, lora_gates=False, empty_context="identity")
    assert (film_only.policy_min_context(True), film_only.policy_min_context(False)) == (1, 0)
    assert NPDPORealConfig(empty_context="identity", lora_shared=True).policy_min_context(True) == 0
    assert NPDPORealConfig(np_dpo_lora_r=0, lora_gates=False).policy_min_context(True) == 0
    unshared = NPDPORealConfig(empty_context="identity")  # the default gates every adapter by z
    assert unshared.unshared_gates(True) and not unshared.unshared_gates(False)
    assert unshared.policy_min_context(True) == 1
    assert NPDPORealConfig().policy_min_context(True) == 0  # z_∅ opens the gates
    shared = NPDPORealConfig(lora_shared=True, empty_context="identity")  # the shared adapter acts at N^C = 0
    assert not shared.unshared_gates(True) and shared.policy_min_context(True) == 0
    plain = NPDPORealConfig(lora_gates=False, empty_context="identity")  # no gates: plain LoRA acts at 0
    assert not plain.unshared_gates(True) and plain.policy_min_context(True) == 0
    args = ["experiment", "npdpo-real", "--out", str(tmp_path / "r"), "--seed", "0", "--smoke"]
    args += ["--embedder", tiny_encoder, "--base-model", tiny_decoder, "--blocks", "last:1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--max-length", "64", "--generation-prompts", "0"]
    args += ["--models", "np-dpo,btl-dpo", "--np-dpo-lora-r", "0", "--no-lora-gates"]
    args += ["--empty-context", "identity"]
    assert main(args) == 0
    saved = lambda name, file: json.loads((tmp_path / "r" / name / file).read_text())  # noqa: E731
    assert saved("np-dpo", "policy_config.json")["empty_context"] == "identity"
    assert saved("np-dpo", "train_config.json")["train"]["min_context"] == 1
    assert saved("btl-dpo", "policy_config.json")["empty_context"] == "learned"
    assert saved("btl-dpo", "train_config.json")["train"]["min_context"] == 0
