"""The CLI through ``main(argv)``, as a user runs it: simulate -> train -> evaluate, bad inputs, studies."""

import json

import pytest

from steerable.cli import main

TINY_MODEL = ["--hidden-dim", "16", "--latent-dim", "8", "--num-heads", "2"]
TINY_TRAIN = [
    "--max-steps",
    "4",
    "--eval-every",
    "2",
    "--batch-size",
    "8",
    "--val-tasks",
    "22",
    "--warmup-steps",
    "1",
]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    args = [
        "simulate",
        "--population",
        "attributes",
        "--num-attributes",
        "3",
        "--train-users",
        "40",
        "--val-users",
        "10",
        "--test-users",
        "20",
        "--pairs-per-user",
        "24",
        "--out",
        str(out),
        "--seed",
        "0",
    ]
    assert main(args) == 0
    return out


def test_simulate_writes_splits_and_population(simulated):
    assert {p.name for p in simulated.iterdir()} == {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "population.json",
    }
    assert json.loads((simulated / "population.json").read_text())["modes"] == [
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 1],
    ]


def test_train_then_evaluate_writes_documented_json(simulated, tmp_path, capsys):
    model_dir = tmp_path / "model"
    code = main(
        [
            "train",
            "--data",
            str(simulated / "train.jsonl"),
            "--val",
            str(simulated / "val.jsonl"),
            "--model",
            "np-btl",
            "--out",
            str(model_dir),
            "--seed",
            "0",
            *TINY_MODEL,
            *TINY_TRAIN,
        ]
    )
    assert code == 0 and (model_dir / "model.safetensors").exists()
    out_json = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            str(model_dir),
            "--data",
            str(simulated / "test.jsonl"),
            "--context-sizes",
            "0,1,2,4,8",
            "--targets",
            "20",
            "--tasks",
            "50",
            "--seed",
            "0",
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    result = json.loads(out_json.read_text())
    assert set(result["accuracy"]) == {"0", "1", "2", "4", "8"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert set(result["bayes_accuracy"]) == set(result["accuracy"])  # population.json found next to the data
    assert "bayes-optimal" in capsys.readouterr().out


def test_same_seed_same_numbers(simulated, tmp_path):
    results = []
    for run in ("a", "b"):
        main(
            [
                "train",
                "--data",
                str(simulated / "train.jsonl"),
                "--model",
                "dpl",
                "--out",
                str(tmp_path / run),
                "--seed",
                "3",
                *TINY_MODEL,
                *TINY_TRAIN,
            ]
        )
        main(
            [
                "evaluate",
                str(tmp_path / run),
                "--data",
                str(simulated / "test.jsonl"),
                "--tasks",
                "40",
                "--json",
                str(tmp_path / f"{run}.json"),
            ]
        )
        results.append(json.loads((tmp_path / f"{run}.json").read_text())["accuracy"])
    assert results[0] == results[1]


BAD_FILES = {
    "dims": ['{"user_id": "a", "chosen": [0.1], "rejected": [0.3, 0.4]}'],
    "missing": ['{"user_id": "b", "chosen": [0.1, 0.2]}'],
    "nan": ['{"user_id": "c", "chosen": [NaN, 0.2], "rejected": [0.3, 0.4]}'],
    "truncated": ['{"user_id": "d", "chosen": [0.1, 0.2], "rej'],
    "empty": None,
    "too-few-pairs": [],
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_is_one_line_error_without_traceback(tmp_path, capsys, case):
    path = tmp_path / f"{case}.jsonl"
    good = '{"user_id": "a", "chosen": [0.1, 0.2], "rejected": [0.3, 0.4]}'
    lines = BAD_FILES[case]
    path.write_text("" if lines is None else "\n".join([good, *lines]) + "\n")
    code = main(
        [
            "train",
            "--data",
            str(path),
            "--val",
            str(path),
            "--model",
            "np-btl",
            "--out",
            str(tmp_path / "m"),
            "--seed",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("steerable: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_missing_model_folder_is_a_clean_error(tmp_path, capsys, simulated):
    assert main(["evaluate", str(tmp_path / "nothing"), "--data", str(simulated / "test.jsonl")]) == 2
    assert "not a saved steerable model" in capsys.readouterr().err


def test_experiment_synthetic_writes_results_schema_and_plots(tmp_path):
    out = tmp_path / "syn"
    code = main(
        [
            "experiment",
            "synthetic",
            "--out",
            str(out),
            "--seed",
            "0",
            "--train-users",
            "60",
            "--val-users",
            "20",
            "--test-users",
            "20",
            "--np-steps",
            "4",
            "--baseline-steps",
            "2",
            "--eval-tasks",
            "30",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"btl", "dpl", "np-btl"}
    for model in results["models"].values():
        assert set(model["accuracy"]) == {str(k) for k in range(11)}
    assert {p.name for p in out.glob("*.png")} == {"accuracy_vs_context.png", "reward_functions.png"}


def test_experiment_gaussian_writes_results_schema_and_plot(tmp_path):
    out = tmp_path / "gauss"
    code = main(
        [
            "experiment",
            "gaussian",
            "--out",
            str(out),
            "--seed",
            "0",
            "--train-rhos=-1.0,0.7",
            "--test-rhos=-1,-0.5,0,0.5,0.9",
            "--train-users",
            "40",
            "--val-users",
            "10",
            "--steps",
            "3",
            "--eval-tasks",
            "50",
        ]
    )
    assert code == 0
    errors = json.loads((out / "results.json").read_text())["error_rate"]
    assert set(errors) == {"bayes", "rho_train=-1.0", "rho_train=0.7"}
    assert set(errors["rho_train=-1.0"]) == {"-1.0", "-0.5", "0.0", "0.5", "0.9"}
    assert errors["bayes"]["0.0"] == pytest.approx(0.25)
    assert (out / "error_vs_rho.png").exists()


def _commands_and_studies() -> list[list[str]]:
    from steerable.cli import _commands
    from steerable.experiments import STUDIES

    commands = _commands()
    return [[name] for name in commands if name != "experiment"] + [["experiment", s] for s in STUDIES]


@pytest.mark.parametrize("words", _commands_and_studies(), ids=" ".join)
def test_every_command_has_working_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: steerable {' '.join(words)}")


def test_top_level_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from steerable.cli import main\n"
        "for words in (['--help'], ['experiment', '--help']):\n"
        "    try:\n"
        "        main(words)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "train-policy" in run.stdout and "npdpo-synthetic" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "False"
