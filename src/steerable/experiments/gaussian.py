"""Example 4.3 / Figure 4: how correlated attributes limit identifying a user from one choice.

Options y = [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]); mode k prefers larger h_k. One NP-BTL is trained per
ρ_train ∈ {−1, −0.7, 0, 0.7} (100 / 75 / 50 / 25 % conflicting pairs). Each is then shown ONE context pair
drawn at a test correlation ρ and answered by a user of a random mode, and scored on conflicting target
pairs (Definition 4.2). The error rate is the share of those targets predicted wrongly: a target pair
that conflicts is right exactly when the user's mode was identified (a coin flip when the context is
uninformative), so the Bayes-optimal error is P(Ẑ ≠ Z*) = ¼ + arcsin(ρ)/(2π) (appendix A).

Targets are drawn from the model's own training distribution (conflicting pairs at ρ_train), so the
measured error is the identification error and not the decoder extrapolating to options it never saw
(at ρ_train = −1 every training option lies on the line h1 = −h0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.bayes import BayesOptimalPredictor, gaussian_identification_error
from steerable.data.sampler import make_task_batch
from steerable.data.simulate import Population, gaussian_population
from steerable.evaluation import clustered_stderr, predictor_device
from steerable.experiments.common import (
    begin_study,
    child_seeds,
    console,
    print_accuracy_table,
    simulate_splits,
    train_model,
    write_results,
)
from steerable.models.base import PreferenceOutput, RewardModel
from steerable.plots import plot_error_vs_rho
from steerable.training import TrainConfig
from steerable.utils.config import option
from steerable.utils.modules import eval_mode


@dataclass
class GaussianConfig:
    """Settings of the correlated-Gaussian identifiability study (~5 minutes on 2 CPU cores)."""

    train_rhos: list[float] = option([-1.0, -0.7, 0.0, 0.7], "training correlations, one NP-BTL each")
    test_rhos: list[float] = option(
        [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.9], "test correlations of the context pair"
    )
    train_users: int = option(4000, "simulated training users per training correlation")
    val_users: int = option(500, "simulated validation users per training correlation")
    pairs_per_user: int = option(40, "answered pairs per simulated user")
    steps: int = option(1500, "training steps per model")
    eval_tasks: int = option(20000, "evaluation tasks (users with one context pair) per test correlation")
    eval_targets: int = option(8, "conflicting target pairs scored per evaluation task")


def identification_tasks(
    context_population: Population,
    target_population: Population,
    num_tasks: int,
    num_targets: int,
    rng: np.random.Generator,
):
    """Tasks with one context pair from ``context_population`` and ``num_targets`` conflicting target pairs
    from ``target_population``, all answered by the task's user (a random mode)."""
    _, weights = context_population.sample_users(num_tasks, rng)
    c1, c2 = context_population.sample_pairs(num_tasks, rng)
    first = context_population.choose(c1, c2, weights, rng)
    t1, t2 = target_population.sample_pairs(num_tasks * num_targets, rng, conflicting=True)
    t_first = target_population.choose(t1, t2, np.repeat(weights, num_targets, axis=0), rng)

    def order(
        a: np.ndarray, b: np.ndarray, keep: np.ndarray, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = np.where(keep[:, None], a, b).reshape(*shape, -1)
        rejected = np.where(keep[:, None], b, a).reshape(*shape, -1)
        return torch.from_numpy(chosen.astype(np.float32)), torch.from_numpy(rejected.astype(np.float32))

    ctx_c, ctx_r = order(c1, c2, first, (num_tasks, 1))
    tgt_c, tgt_r = order(t1, t2, t_first, (num_tasks, num_targets))
    return make_task_batch(ctx_c, ctx_r, tgt_c, tgt_r)


def _error_rate(outputs: list[PreferenceOutput]) -> tuple[float, float]:
    """Share of wrongly predicted targets (ties count half) and its standard error, clustered by task
    (every task is a freshly drawn user)."""
    wrong = torch.cat(
        [((o.log_odds < 0).double() + 0.5 * (o.log_odds == 0).double()).sum(1) for o in outputs]
    )
    count = torch.cat([torch.full((o.log_odds.shape[0],), o.log_odds.shape[1]) for o in outputs])
    wrong_np, count_np = wrong.cpu().numpy(), count.numpy()
    return float(wrong_np.sum() / count_np.sum()), clustered_stderr(wrong_np, count_np)


@torch.no_grad()
def identification_error(predict, tasks, batch_size: int = 1024) -> tuple[float, float]:
    """Error rate of ``predict`` (model or Bayes predictor) on ``tasks``, in chunks on its device."""
    device = predictor_device(predict)
    outputs = []
    with eval_mode(predict):
        for start in range(0, tasks.batch_size, batch_size):
            sl = slice(start, start + batch_size)
            chunk = make_task_batch(
                tasks.context_chosen[sl],
                tasks.context_rejected[sl],
                tasks.target_chosen[sl],
                tasks.target_rejected[sl],
            )
            outputs.append(predict(chunk.to(device)))
    return _error_rate(outputs)


def run_gaussian(
    out_dir: str | Path, seed: int = 0, config: GaussianConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the study; writes ``results.json`` and ``error_vs_rho.png``."""
    config = config or GaussianConfig()
    start = time.perf_counter()
    out = begin_study(
        out_dir, "gaussian", "correlated-Gaussian identifiability study (Example 4.3)", seed, config
    )
    data_seed, train_seed, eval_seed = child_seeds(seed, 3)
    rho_key = lambda r: f"{float(r)}"  # noqa: E731
    errors: dict[str, dict[str, float]] = {
        "bayes": {rho_key(r): gaussian_identification_error(r) for r in config.test_rhos}
    }
    stderr: dict[str, dict[str, float]] = {}
    bayes_measured: dict[str, dict[str, float]] = {}
    conflict: dict[str, float] = {}
    models: dict[float, RewardModel] = {}
    for i, rho in enumerate(config.train_rhos):
        name = f"rho_train={float(rho)}"
        population = gaussian_population(rho)
        data = simulate_splits(
            population,
            out / "data" / name,
            {"train": config.train_users, "val": config.val_users},
            config.pairs_per_user,
            data_seed + i,
        )
        probe = np.random.default_rng(data_seed)
        y1, y2 = population.sample_pairs(20000, probe)
        conflict[name] = float(population.is_conflicting(y1, y2).mean())
        train_config = TrainConfig(max_steps=config.steps, seed=train_seed)
        models[rho] = train_model(
            "np-btl", data["train"], data["val"], out / "models" / name, train_config, overwrite=overwrite
        ).model
    for rho_train, model in models.items():
        name = f"rho_train={float(rho_train)}"
        errors[name], stderr[name], bayes_measured[name] = {}, {}, {}
        for j, rho in enumerate(config.test_rhos):
            tasks = identification_tasks(
                gaussian_population(rho),
                gaussian_population(rho_train),
                config.eval_tasks,
                config.eval_targets,
                np.random.default_rng([eval_seed, j]),
            )
            errors[name][rho_key(rho)], stderr[name][rho_key(rho)] = identification_error(model, tasks)
            bayes_measured[name][rho_key(rho)] = identification_error(
                BayesOptimalPredictor(gaussian_population(rho)), tasks
            )[0]
    results = {
        "experiment": "gaussian",
        "seed": seed,
        "error_rate": errors,
        "stderr": stderr,
        "bayes_on_eval_tasks": bayes_measured,
        "train_conflict_rate": conflict,
        "elapsed_s": time.perf_counter() - start,
    }
    write_results(out, results)
    curves = {k: {float(r): v for r, v in e.items()} for k, e in errors.items() if k != "bayes"}
    errs = {k: {float(r): v for r, v in e.items()} for k, e in stderr.items()}
    plot_error_vs_rho(out / "error_vs_rho.png", curves, errs, gaussian_identification_error)
    print_accuracy_table(
        "error rate on conflicting targets with one context pair (columns: test ρ)",
        [float(r) for r in config.test_rhos],
        {"bayes-optimal": {float(r): v for r, v in errors["bayes"].items()}, **curves},
    )
    console.print(f"results: {out / 'results.json'}  ({results['elapsed_s']:.0f} s)")
    return results
