"""A training process killed with SIGKILL mid-run, restarted with the same command, ends exactly where
an uninterrupted run ends (same metrics, same weights)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

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


def metrics(out):
    with open(out / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    data = write_preferences(simulate(step_population(), 60, 24, seed=0), tmp_path / "d.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd(data, tmp_path / "full"), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(
        train_cmd(data, tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["step"] >= 15:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 15 <= killed_at < 60, f"process was not killed mid-run (checkpoint at step {killed_at})"

    rerun = subprocess.run(train_cmd(data, tmp_path / "cut"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from step" in rerun.stdout
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")  # no row lost, duplicated or changed
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all((full[k] == cut[k]).all() for k in full)
