"""Figure 5: NP-BTL trained at different conflict rates, evaluated as the context's conflict rate varies.

Three NP-BTL models are trained on users whose pairs (context and targets alike) conflict at rate 0.5,
0.75 and 1.0. Each is evaluated on fresh test users of held-out prompts whose N^C context pairs conflict
at a rate from 0 to 1 while every target pair conflicts, so a model must identify the user's type from
the context to beat chance. Non-conflicting context pairs carry no information about the type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.evaluation import evaluate_batches
from steerable.experiments.common import (
    begin_study,
    child_seeds,
    console,
    print_accuracy_table,
    train_model,
    write_results,
)
from steerable.experiments.text_common import (
    TextDataConfig,
    mode_population,
    prepare_text_study,
    simulate_splits_from_pools,
)
from steerable.plots import plot_conflict_rate
from steerable.text.responses import pool_tasks
from steerable.training import TrainConfig
from steerable.utils.config import option


@dataclass
class ConflictRateConfig(TextDataConfig):
    """Settings of the conflict-rate study (~8 minutes on 2 CPU cores with a warm embedding cache)."""

    modes: list[str] | None = option(
        None, "the two attributes defining the user types (default: the dataset's first two)"
    )
    train_conflict_rates: list[float] = option(
        [0.5, 0.75, 1.0], "conflict rates of the training users, one NP-BTL each"
    )
    context_conflict_rates: list[float] = option(
        [0.0, 0.25, 0.5, 0.75, 1.0], "conflict rates of the test context"
    )
    context_sizes: list[int] = option([1, 3, 5, 10], "N^C values evaluated")
    num_targets: int = option(10, "target pairs per test task (all conflicting)")
    np_steps: int = option(800, "NP-BTL training steps")
    eval_tasks: int = option(1000, "test tasks per (context conflict rate, N^C)")


def run_conflict_rate(
    out_dir: str | Path, seed: int = 0, config: ConflictRateConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the study; writes results.json and conflict_rate.png."""
    config = config or ConflictRateConfig()
    start = time.perf_counter()
    out = begin_study(
        out_dir, "conflict-rate", "conflict rate in training and in context (Figure 5)", seed, config
    )
    data_seed, train_seed, eval_seed = child_seeds(seed, 3)
    study = prepare_text_study(config, config.modes, 2, data_seed)
    population = mode_population(len(study.aspects))
    results: dict[str, Any] = {
        "experiment": "conflict-rate",
        "seed": seed,
        "modes": study.aspects,
        "train_conflict_rates": config.train_conflict_rates,
        "context_conflict_rates": config.context_conflict_rates,
        "context_sizes": config.context_sizes,
        "embedding": study.embedding,
        "accuracy": {},
        "stderr": {},
    }
    for rate in config.train_conflict_rates:
        name = f"train_conflict_rate={float(rate)}"
        users = simulate_splits_from_pools(study, population, config, rate, data_seed)
        train_config = TrainConfig(
            max_steps=config.np_steps,
            max_context=max(config.context_sizes),
            learning_rate=config.learning_rate,
            seed=train_seed,
        )
        model = train_model(
            "np-btl", users["train"], users["val"], out / "models" / name, train_config, overwrite=overwrite
        ).model
        results["accuracy"][name], results["stderr"][name] = {}, {}
        for i, ctx_rate in enumerate(config.context_conflict_rates):
            acc, err = {}, {}
            for j, nc in enumerate(config.context_sizes):
                tasks = pool_tasks(
                    study.pools["test"],
                    study.embeddings,
                    population,
                    config.eval_tasks,
                    nc,
                    config.num_targets,
                    ctx_rate,
                    1.0,
                    seed=eval_seed + 100 * i + j,
                )
                summary = evaluate_batches(model, [tasks])
                acc[str(nc)], err[str(nc)] = summary["accuracy"], summary["stderr"]
            results["accuracy"][name][str(float(ctx_rate))] = acc
            results["stderr"][name][str(float(ctx_rate))] = err
    results["elapsed_s"] = time.perf_counter() - start
    write_results(out, results)
    plot_conflict_rate(out / "conflict_rate.png", results["accuracy"], config.context_sizes)
    for nc in config.context_sizes:
        rows = {k: {float(c): v[str(nc)] for c, v in per.items()} for k, per in results["accuracy"].items()}
        print_accuracy_table(
            f"accuracy on conflicting targets, N^C = {nc} (columns: context conflict rate)",
            [float(c) for c in config.context_conflict_rates],
            rows,
        )
    console.print(f"results: {out / 'results.json'}  ({results['elapsed_s']:.0f} s)")
    return results
