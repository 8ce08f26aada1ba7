"""A training process killed with SIGKILL mid-run, restarted with the same command, ends exactly where
an uninterrupted run ends (same metrics, same weights).

The kill is deterministic: the child process runs the real CLI with ``os.replace`` wrapped so that it
kills itself at the third checkpoint swap (step 15), either right after the new checkpoint is in place or
in the middle of the swap (the old checkpoint moved aside, the new one not yet in place). Polling from
outside instead raced the swap (a checkpoint folder that is briefly absent) and the run's speed.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from steerable.data import simulate, step_population, write_preferences


def train_cmd(data, out):
    return [
        sys.executable,
        "-m",
        "steerable",
        "train",
        "--data",
        str(data),
        "--model",
        "vnp-btl",
        "--out",
        str(out),
        "--seed",
        "1",
        "--hidden-dim",
        "16",
        "--latent-dim",
        "8",
        "--num-heads",
        "2",
        "--max-steps",
        "60",
        "--eval-every",
        "5",
        "--batch-size",
        "8",
        "--val-tasks",
        "22",
        "--warmup-steps",
        "1",
    ]


KILLER = """
import os, runpy, signal, sys
from pathlib import Path

swaps, real_replace = [0], os.replace
kill_at, where = int(os.environ["KILL_AT_SWAP"]), os.environ["KILL_WHERE"]


def replace(src, dst):
    if Path(dst).name == "checkpoint":  # a staged checkpoint moving into place
        swaps[0] += 1
        if swaps[0] == kill_at and where == "mid-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if swaps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    real_replace(src, dst)


os.replace = replace
sys.argv = ["steerable", *sys.argv[1:]]
runpy.run_module("steerable", run_name="__main__")
"""


def metrics(out):
    with open(out / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


def checkpoint_step(out):
    """Step of the checkpoint a rerun resumes from (the complete one left by an interrupted swap too)."""
    for name in ("checkpoint", "checkpoint.old"):
        state = out / name / "trainer_state.json"
        if state.exists():
            return json.loads(state.read_text())["step"]
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    data = write_preferences(simulate(step_population(), 60, 24, seed=0), tmp / "d.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd(data, tmp / "full"), check=True, env=env, capture_output=True)
    return data, tmp / "full", env


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("where", ["after-swap", "mid-swap"])
def test_sigkill_then_rerun_matches_uninterrupted(uninterrupted, tmp_path, where):
    data, full, env = uninterrupted
    cut = tmp_path / "cut"
    killer = [sys.executable, "-c", KILLER, *train_cmd(data, cut)[3:]]
    killed = subprocess.run(
        killer, env={**env, "KILL_AT_SWAP": "3", "KILL_WHERE": where}, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    # checkpoints at steps 5, 10, 15: killed at the third swap, a rerun resumes from 15 or, mid-swap, from 10
    expected = 15 if where == "after-swap" else 10
    assert checkpoint_step(cut) == expected
    assert (where == "mid-swap") == (not (cut / "checkpoint").exists())

    rerun = subprocess.run(train_cmd(data, cut), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {expected}" in rerun.stdout
    assert metrics(cut) == metrics(full)  # no row lost, duplicated or changed
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
