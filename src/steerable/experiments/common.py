"""Pieces shared by the studies: seeds, run folders, data files, training, results and tables."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from steerable.data.schema import PreferenceData
from steerable.data.simulate import Population, simulate
from steerable.data.writers import write_preferences
from steerable.models.base import RewardModel, RewardModelConfig
from steerable.models.registry import build_reward_model
from steerable.training import TrainConfig, TrainResult, train_reward_model
from steerable.utils.config import config_to_dict, json_ready
from steerable.utils.distributed import is_main_process
from steerable.utils.files import write_json_atomic

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that tables are never truncated
    console.width = 200


def begin_study(out_dir: str | Path, name: str, title: str, seed: int, config: Any) -> Path:
    """Create the run folder, record the resolved settings in ``config.json``, announce the study.

    Under ``torchrun`` / ``accelerate launch`` every process runs the study (the trainers share the work)
    and only the main one writes files and prints: the others' console is quiet."""
    from steerable import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not is_main_process():
        console.quiet = True
        return out
    write_json_atomic(
        out / "config.json",
        {"experiment": name, "seed": seed, "steerable_version": __version__, **config_to_dict(config)},
    )
    console.print(f"[bold]{title}[/bold] → {out}")
    return out


def child_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent seeds derived from one (numpy SeedSequence)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def simulate_splits(
    population: Population, out_dir: Path, users: Mapping[str, int], pairs_per_user: int, seed: int
) -> dict[str, PreferenceData]:
    """Simulate independent users for each split, write ``<split>.jsonl`` and ``population.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {}
    for (split, n), split_seed in zip(users.items(), child_seeds(seed, len(users)), strict=True):
        data[split] = simulate(population, n, pairs_per_user, seed=split_seed, user_prefix=f"{split}-")
    if is_main_process():
        for split, split_data in data.items():
            write_preferences(split_data, out_dir / f"{split}.jsonl")
        write_json_atomic(out_dir / "population.json", population.to_dict())
    return data


def train_model(
    model_type: str,
    train: PreferenceData,
    val: PreferenceData,
    out_dir: Path,
    train_config: TrainConfig,
    model_overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Build a model of ``model_type`` for ``train``'s option size and train it (resuming if possible)."""
    config = RewardModelConfig(model_type=model_type, input_dim=train.dim, **(model_overrides or {}))
    model = build_reward_model(config, seed=train_config.seed)
    start = time.perf_counter()
    result = train_reward_model(model, train, val, train_config, out_dir=out_dir, overwrite=overwrite)
    console.print(
        f"  trained [bold]{model_type}[/bold]: {result.steps} steps, best at {result.best_step} "
        f"(val loss {result.best_val_loss:.4f}), {time.perf_counter() - start:.1f} s this run"
        + (f", resumed from step {result.resumed_from}" if result.resumed_from else "")
    )
    return result


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (keys stringified, numpy scalars converted; an undefined
    statistic, NaN, becomes null)."""
    path = out_dir / "results.json"
    if is_main_process():
        write_json_atomic(path, _nan_to_none(json_ready(results)))
    return path


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def print_accuracy_table(
    title: str, columns: Sequence[int | float], rows: Mapping[str, Mapping[Any, float]], fmt: str = "{:.3f}"
) -> None:
    """A rich table: one row per model, one column per N^C (or ρ)."""
    console.print(f"[bold]{title}[/bold]")
    table = Table()
    table.add_column("model")
    for c in columns:
        table.add_column(str(c), justify="right")
    for name, values in rows.items():
        table.add_row(name, *[fmt.format(values[c]) if c in values else "" for c in columns])
    console.print(table)


def model_summary(model: RewardModel) -> str:
    return f"{model.model_type} ({model.num_parameters():,} parameters)"
