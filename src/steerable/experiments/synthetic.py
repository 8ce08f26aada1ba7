"""Example 4.1 / Figure 1: BTL and DPL average the two modes away; NP-BTL recovers each user's mode.

Options y ~ U[0, 1]; r(y) = y for y ≤ 0.5 and 2y (mode 0) or 1 − y (mode 1) above; deterministic
choices. Half the pairs conflict, so with N^C context pairs the Bayes-optimal accuracy on unseen pairs is
1 − ¼·(½)^N^C (0.750 / 0.875 / 0.969 / 0.992 / 0.9998 at N^C = 0 / 1 / 3 / 5 / 10).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.bayes import step_bayes_accuracy
from steerable.data.simulate import step_population
from steerable.evaluation import evaluate
from steerable.experiments.common import (
    begin_study,
    child_seeds,
    console,
    print_accuracy_table,
    simulate_splits,
    train_model,
    write_results,
)
from steerable.models.base import RewardModel
from steerable.models.baselines import DPLRewardModel
from steerable.plots import plot_accuracy_vs_context, plot_reward_functions_1d
from steerable.training import TrainConfig
from steerable.utils.config import option
from steerable.utils.modules import eval_mode


@dataclass
class SyntheticConfig:
    """Settings of the synthetic 1-D study (defaults: the paper's task sizes; ~3 minutes on 2 CPU cores)."""

    models: list[str] = option(["btl", "dpl", "np-btl"], "models to train (btl, dpl, np-btl, vnp-btl)")
    train_users: int = option(4000, "simulated training users")
    val_users: int = option(500, "simulated validation users")
    test_users: int = option(1000, "simulated test users")
    pairs_per_user: int = option(40, "answered pairs per simulated user")
    np_steps: int = option(2500, "training steps of the NP models")
    baseline_steps: int = option(1000, "training steps of BTL and DPL")
    eval_tasks: int = option(4096, "evaluation tasks per context size")
    max_context: int = option(10, "largest context size evaluated (and trained on)")


def run_synthetic(
    out_dir: str | Path, seed: int = 0, config: SyntheticConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the study; writes ``results.json``, ``accuracy_vs_context.png``, ``reward_functions.png``."""
    config = config or SyntheticConfig()
    start = time.perf_counter()
    out = begin_study(out_dir, "synthetic", "synthetic 1-D study (Example 4.1)", seed, config)
    population = step_population()
    data_seed, train_seed, eval_seed = child_seeds(seed, 3)
    data = simulate_splits(
        population,
        out / "data",
        {"train": config.train_users, "val": config.val_users, "test": config.test_users},
        config.pairs_per_user,
        data_seed,
    )
    sizes = list(range(config.max_context + 1))
    results: dict[str, Any] = {"experiment": "synthetic", "seed": seed, "context_sizes": sizes, "models": {}}
    models: dict[str, RewardModel] = {}
    for name in config.models:
        steps = config.np_steps if name in ("np-btl", "vnp-btl") else config.baseline_steps
        train_config = TrainConfig(max_steps=steps, max_context=config.max_context, seed=train_seed)
        trained = train_model(
            name, data["train"], data["val"], out / "models" / name, train_config, overwrite=overwrite
        )
        models[name] = trained.model
        evaluation = evaluate(
            trained.model,
            data["test"],
            sizes,
            num_tasks=config.eval_tasks,
            seed=eval_seed,
            population=population,
        )
        summary = evaluation.to_json()
        results["models"][name] = {
            k: summary[k] for k in ("accuracy", "stderr", "log_loss", "ece", "accuracy_by_mode")
        }
        results["models"][name]["train"] = {
            "steps": trained.steps,
            "best_step": trained.best_step,
            "train_seconds": trained.elapsed_s,
        }
        results["bayes_on_eval_tasks"] = summary["bayes_accuracy"]
    results["bayes"] = {"accuracy": {str(k): step_bayes_accuracy(k) for k in sizes}}
    results["elapsed_s"] = time.perf_counter() - start
    write_results(out, results)

    curves = {n: {int(k): v for k, v in r["accuracy"].items()} for n, r in results["models"].items()}
    errors = {n: {int(k): v for k, v in r["stderr"].items()} for n, r in results["models"].items()}
    plot_accuracy_vs_context(
        out / "accuracy_vs_context.png",
        curves,
        errors,
        {k: step_bayes_accuracy(k) for k in sizes},
        title="Example 4.1: accuracy on unseen pairs",
    )
    _plot_rewards(out / "reward_functions.png", models, population, seed)
    print_accuracy_table(
        "accuracy on unseen pairs (rows: model, columns: N^C)",
        sizes,
        {**curves, "bayes-optimal": {k: step_bayes_accuracy(k) for k in sizes}},
    )
    console.print(f"results: {out / 'results.json'}  ({results['elapsed_s']:.0f} s)")
    return results


def _plot_rewards(path: Path, models: dict[str, RewardModel], population, seed: int) -> None:
    """Figure 1a: BTL, DPL (μ ± σ) and NP-BTL conditioned on 10 pairs of a user of each mode."""
    grid = np.linspace(0.0, 1.0, 401, dtype=np.float32)[:, None]
    basis = population.basis_rewards(grid.astype(np.float64))
    truth = {name: basis[:, k] for k, name in enumerate(population.mode_names)}
    rng = np.random.default_rng(seed)
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray | None]]] = {}
    for name, model in models.items():
        if isinstance(model, DPLRewardModel):
            with torch.no_grad(), eval_mode(model):
                mean, std = model.mean_and_std(torch.from_numpy(grid)[None].to(model.device))
            panels[name] = {"μ ± σ": (mean[0].cpu().numpy(), std[0].cpu().numpy())}
        elif model.conditional:
            curves = {}
            for mode, label in enumerate(population.mode_names):
                y1, y2 = population.sample_pairs(10, rng)
                weights = population.reference_weights[[mode] * 10]
                first = population.choose(y1, y2, weights, rng)
                chosen, rejected = np.where(first[:, None], y1, y2), np.where(first[:, None], y2, y1)
                curves[f"10 pairs of mode '{label}'"] = (
                    model.personalize(chosen, rejected).rewards(grid),
                    None,
                )
            curves["no context"] = (model.personalize().rewards(grid), None)
            panels[name] = curves
        else:
            panels[name] = {"r(y)": (model.personalize().rewards(grid), None)}
    plot_reward_functions_1d(path, grid[:, 0], truth, panels)
