"""Several processes on one CPU: ``torchrun --nproc_per_node 2`` gives a real gloo group (the trainers
create their accelerator with ``cpu=True``). Each test starts ``tests/distributed_worker.py`` in two
processes and reads what each process recorded."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(mode: str, out: Path, *extra: str, expect_kill: bool = False) -> list[dict]:
    """Run the worker in two processes; each process's record (rank 0, rank 1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        mode,
        str(out),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    if expect_kill:  # process 0 was SIGKILLed; torchrun then stops the other one and fails
        assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
        return []
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _metric_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", encoding="utf-8") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    return out, run_two("reward", out)


def test_two_processes_train_one_reward_model(reward_run):
    out, (r0, r1) = reward_run
    assert r0["world_size"] == r1["world_size"] == 2
    assert [s[0] for s in r0["samples"]] == [s[0] for s in r1["samples"]]  # the same N^C at every step
    assert [s[1] for s in r0["samples"]] != [s[1] for s in r1["samples"]]  # their own tasks
    assert all(len(s[1]) == 4 for s in r0["samples"])  # 8 tasks per step over 2 processes
    assert r0["params"] == r1["params"] and r0["best"] == r1["best"]  # gradients were synchronised
    assert r0["checkpoint_writers"] == [0, 0, 0] and r1["checkpoint_writers"] == []
    assert _metric_steps(out / "run") == [4, 8, 12]
    assert json.loads((out / "run" / "train_config.json").read_text())["num_processes"] == 2


def test_killed_two_process_run_resumes_to_the_same_weights(reward_run, tmp_path):
    _, (straight, _) = reward_run
    run_two("reward", tmp_path, "8", expect_kill=True)  # killed after step 8, last checkpoint at step 4
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    r0, r1 = run_two("reward", tmp_path)
    assert r0["params"] == r1["params"] == straight["params"]
    assert _metric_steps(tmp_path / "run") == [4, 8, 12]


def test_two_processes_train_one_policy(tmp_path):
    from steerable.policy.sft import tiny_llama, word_tokenizer
    from steerable.text import synthetic_text as world

    tok = word_tokenizer(world.vocabulary())
    tiny_llama(len(tok), hidden=32, layers=2, seed=0).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    r0, r1 = run_two("policy", tmp_path / "out", str(tmp_path / "base"))
    assert [s[0] for s in r0["samples"]] == [s[0] for s in r1["samples"]]
    assert [s[1] for s in r0["samples"]] != [s[1] for s in r1["samples"]]
    assert r0["params"] == r1["params"]
    assert r0["checkpoint_writers"] == [0, 0] and r1["checkpoint_writers"] == []
    assert _metric_steps(tmp_path / "out" / "run") == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "out" / "run" / "train_config.json").read_text())["num_processes"] == 2


def test_empty_context_in_one_process_and_pairs_in_the_other(tmp_path):
    r0, r1 = run_two("encoder", tmp_path)
    assert r0["num_processes"] == 2
    assert r0["params"] == r1["params"]
