"""Figure 8 (appendix D.2): a continuum of users, w ~ Dirichlet(α) over 2 or 3 standardised attributes.

A user's reward is r(y) = Σ_k w_k · a_k(y) over the standardised attributes a_k (offline benchmark:
length, hedging, structure; UltraFeedback: helpfulness, honesty, truthfulness). One NP-BTL is trained per
dimension; test accuracy on unseen pairs is binned over the users' true w: ten bins of w_0 in 2-D, and
triangles of edge 0.1 on the simplex in 3-D.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerable.bayes import BayesOptimalPredictor
from steerable.data.simulate import Population
from steerable.evaluation import evaluate
from steerable.experiments.common import (
    begin_study,
    child_seeds,
    console,
    print_accuracy_table,
    train_model,
    write_results,
)
from steerable.experiments.text_common import TextDataConfig, prepare_text_study, simulate_splits_from_pools
from steerable.plots import plot_simplex_accuracy, plot_weight_curve
from steerable.training import TrainConfig
from steerable.utils.config import option


@dataclass
class ContinuousConfig(TextDataConfig):
    """Settings of the continuous-users study (~7 minutes on 2 CPU cores with a warm embedding cache)."""

    attributes: list[str] | None = option(
        None, "the 3 attributes (the 2-D study uses the first two; default: the dataset's)"
    )
    alpha: float = option(0.5, "Dirichlet concentration of the users' weights (paper: 0.5)")
    conflict_rate: float | None = option(1.0, "share of pairs on which the attributes disagree")
    context_sizes: list[int] = option([0, 1, 3, 5, 10], "N^C values evaluated")
    np_steps: int = option(800, "NP-BTL training steps per dimension")
    eval_tasks: int = option(3000, "evaluation tasks per N^C")
    bins: int = option(10, "bins per unit of weight (2-D: bins of w_0; 3-D: triangles of edge 1/bins)")


def simplex_bin(weights: np.ndarray, bins: int) -> np.ndarray:
    """(N, 3) points on the simplex -> (N, 3) int triangle ids (i, j, up): the small triangle of edge
    1/bins containing each point; ``up`` is 1 for upward triangles (i + j + k = bins − 1)."""
    cell = np.minimum(np.floor(weights * bins).astype(int), bins - 1)
    up = (cell.sum(axis=1) == bins - 1).astype(int)
    return np.stack([cell[:, 0], cell[:, 1], up], axis=1)


def _binned(tasks: dict[str, np.ndarray], bin_of: np.ndarray, nbins: int) -> list[float | None]:
    """Accuracy per bin of the tasks' users (None for empty bins)."""
    which = bin_of[tasks["user_index"]]
    correct = np.bincount(which, weights=tasks["correct"], minlength=nbins)
    count = np.bincount(which, weights=tasks["count"], minlength=nbins)
    return [float(a / n) if n else None for a, n in zip(correct, count, strict=True)]


def run_continuous(
    out_dir: str | Path, seed: int = 0, config: ContinuousConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the 2-D and 3-D studies; writes results.json, accuracy_2d.png and accuracy_3d.png."""
    config = config or ContinuousConfig()
    start = time.perf_counter()
    out = begin_study(out_dir, "continuous", "continuous users on the simplex (Figure 8)", seed, config)
    data_seed, train_seed, eval_seed = child_seeds(seed, 3)
    sizes = sorted(config.context_sizes)
    results: dict[str, Any] = {"experiment": "continuous", "seed": seed, "context_sizes": sizes}
    for dim in (2, 3):
        study = prepare_text_study(
            config, config.attributes[:dim] if config.attributes else None, dim, data_seed, standardize=True
        )
        population = Population(name=f"dirichlet-{dim}d", dim=dim, dirichlet_alpha=[config.alpha] * dim)
        users = simulate_splits_from_pools(study, population, config, config.conflict_rate, data_seed + dim)
        train_config = TrainConfig(
            max_steps=config.np_steps,
            max_context=max(sizes),
            learning_rate=config.learning_rate,
            seed=train_seed,
        )
        model = train_model(
            "np-btl",
            users["train"],
            users["val"],
            out / "models" / f"np-btl-{dim}d",
            train_config,
            overwrite=overwrite,
        ).model
        ev = evaluate(
            model, users["test"], sizes, num_tasks=config.eval_tasks, seed=eval_seed, keep_tasks=True
        )
        # The same test users and tasks with the hidden attributes as options: the simulator's draws do
        # not depend on the option vectors, so the Bayes-optimal predictor scores exactly the same tasks.
        attrs = study.table.attributes[:, study.table.attribute_index(study.aspects)].astype(np.float32)
        as_attributes = dataclasses.replace(study, embeddings=attrs)
        test_attr = simulate_splits_from_pools(
            as_attributes, population, config, config.conflict_rate, data_seed + dim
        )["test"]
        bayes = evaluate(
            BayesOptimalPredictor(population, seed=eval_seed),
            test_attr,
            sizes,
            num_tasks=config.eval_tasks,
            seed=eval_seed,
            keep_tasks=True,
        )
        weights = users["test"].user_z  # (U, dim)
        key = f"{dim}d"
        results[key] = {
            "attributes": study.aspects,
            "overall": {str(c): ev.model[c]["accuracy"] for c in sizes},
            "bayes_overall": {str(c): bayes.model[c]["accuracy"] for c in sizes},
            "embedding": study.embedding,
        }
        if dim == 2:
            edges = np.linspace(0, 1, config.bins + 1)
            results[key]["bins"] = [[float(a), float(b)] for a, b in itertools.pairwise(edges)]
            bin_of = np.minimum((weights[:, 0] * config.bins).astype(int), config.bins - 1)  # (U,) per user
        else:
            cells = simplex_bin(weights, config.bins)
            distinct = sorted({tuple(c) for c in cells.tolist()})
            results[key]["bins"] = [{"i": i, "j": j, "up": u} for i, j, u in distinct]
            position = {c: n for n, c in enumerate(distinct)}
            bin_of = np.array([position[tuple(c)] for c in cells.tolist()])
        nbins = len(results[key]["bins"])
        results[key]["accuracy"], results[key]["bayes_accuracy"], results[key]["tasks"] = {}, {}, {}
        for c in sizes:
            results[key]["accuracy"][str(c)] = _binned(ev.tasks[c], bin_of, nbins)
            results[key]["bayes_accuracy"][str(c)] = _binned(bayes.tasks[c], bin_of, nbins)
            results[key]["tasks"][str(c)] = np.bincount(
                bin_of[ev.tasks[c]["user_index"]], minlength=nbins
            ).tolist()
        print_accuracy_table(
            f"{dim}-D users: accuracy on unseen pairs (columns: N^C)",
            sizes,
            {
                f"np-btl-{dim}d": {c: ev.model[c]["accuracy"] for c in sizes},
                "bayes-optimal": {c: bayes.model[c]["accuracy"] for c in sizes},
            },
        )
    results["elapsed_s"] = time.perf_counter() - start
    write_results(out, results)
    plot_weight_curve(out / "accuracy_2d.png", results["2d"], sizes)
    plot_simplex_accuracy(out / "accuracy_3d.png", results["3d"], sizes, config.bins)
    console.print(f"results: {out / 'results.json'}  ({results['elapsed_s']:.0f} s)")
    return results
