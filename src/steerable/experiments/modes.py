"""Figures 2a, 3, 6a, 7: users of 2 (``hh``) or 3 (``three-modes``) hidden types on real text.

Each type prefers the response that is higher on one attribute (offline benchmark: ``length``,
``hedging``, ``structure``; UltraFeedback: ``helpfulness``, ``honesty``, ``truthfulness``). By default all
pairs conflict (the types never all agree), so a model that ignores the user is at chance. Trained:
BTL-mixed (every user's choices), one oracle BTL per type (only that type's choices: the upper bound a
model without privileged access can at best match), and NP-BTL. Reported per type and N^C: accuracy on
unseen pairs of held-out users on held-out prompts; PCA of z coloured by type; silhouette of z per N^C.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.bayes import BayesOptimalPredictor
from steerable.data.sampler import TaskSampler
from steerable.data.schema import PreferenceData
from steerable.evaluation import evaluate
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
    TextStudyData,
    mode_population,
    prepare_text_study,
    simulate_splits_from_pools,
)
from steerable.models.base import RewardModel
from steerable.plots import plot_accuracy_per_mode, plot_embedding_pca
from steerable.training import TrainConfig
from steerable.utils.config import option
from steerable.utils.modules import eval_mode


@dataclass
class ModesConfig(TextDataConfig):
    """Settings of the hh / three-modes studies (defaults: ~6 minutes on 2 CPU cores, cold cache)."""

    modes: list[str] | None = option(
        None, "attributes defining the user types (default: the dataset's first 2 or 3)"
    )
    conflict_rate: float | None = option(
        1.0, "share of conflicting pairs each user answers (none: as they come)"
    )
    np_steps: int = option(800, "NP-BTL training steps")
    btl_steps: int = option(600, "training steps of each BTL model")
    context_sizes: list[int] = option([0, 1, 3, 5, 10], "N^C values evaluated")
    pca_context_sizes: list[int] = option([1, 3, 10], "N^C values shown in the PCA figure")
    eval_tasks: int = option(2000, "evaluation tasks per N^C")


def user_embeddings(
    model: RewardModel, data: PreferenceData, num_context: int, num_tasks: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """z of ``num_tasks`` test users from ``num_context`` of their pairs, and their hidden modes."""
    sampler = TaskSampler(data, num_context, num_context, num_context + 1, seed=seed)
    batch = sampler.fixed_tasks([num_context], num_tasks, batch_size=num_tasks)[num_context][0]
    with torch.no_grad(), eval_mode(model):
        z = model.encode_batch(batch.to(model.device)).mean.cpu().numpy()
    return z, batch.hidden_mode.numpy()


def silhouette(z: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of z grouped by true type (0 when all z coincide, e.g. with no context)."""
    from sklearn.metrics import silhouette_score  # sklearn costs seconds to import: only when used

    if len(np.unique(labels)) < 2 or float(z.std(axis=0).max()) < 1e-6:
        return 0.0
    return float(silhouette_score(z, labels))


def bayes_per_mode(
    study: TextStudyData, config: ModesConfig, data_seed: int, eval_seed: int, sizes: list[int]
) -> dict[str, dict[str, float]]:
    """Bayes-optimal accuracy per type on exactly the models' test tasks, from the true attributes.

    The simulator's draws do not depend on the option vectors, so the same users answer the same pairs
    with the attributes as options; the posterior over types then explains the per-type shape of the
    curves (e.g. a type that the context-free majority favours can lose accuracy from N^C = 0 to 1).
    """
    attrs = study.table.attributes[:, study.table.attribute_index(study.aspects)].astype(np.float32)
    as_attributes = dataclasses.replace(study, embeddings=attrs)
    population = mode_population(len(study.aspects))
    test = simulate_splits_from_pools(as_attributes, population, config, config.conflict_rate, data_seed)[
        "test"
    ]
    ev = evaluate(
        BayesOptimalPredictor(population, seed=eval_seed),
        test,
        sizes,
        num_tasks=config.eval_tasks,
        seed=eval_seed,
    )
    return {m: {str(c): ev.model[c]["by_mode"].get(i) for c in sizes} for i, m in enumerate(study.aspects)}


def run_modes(
    study_name: str,
    num_modes: int,
    out_dir: str | Path,
    seed: int = 0,
    config: ModesConfig | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``hh`` (num_modes=2) or ``three-modes`` (3); writes results.json and PNG plots."""
    config = config or ModesConfig()
    start = time.perf_counter()
    title = {
        2: "two hidden types on real text (Figures 2a, 3)",
        3: "three hidden types on real text (Figures 6a, 7)",
    }[num_modes]
    out = begin_study(out_dir, study_name, title, seed, config)
    data_seed, train_seed, eval_seed = child_seeds(seed, 3)
    study = prepare_text_study(config, config.modes, num_modes, data_seed)
    modes = study.aspects
    k = len(modes)
    mixed = simulate_splits_from_pools(study, mode_population(k), config, config.conflict_rate, data_seed)
    sizes = sorted(config.context_sizes)

    def train_cfg(steps: int) -> TrainConfig:
        return TrainConfig(
            max_steps=steps, max_context=max(sizes), learning_rate=config.learning_rate, seed=train_seed
        )

    results: dict[str, Any] = {
        "experiment": study_name,
        "seed": seed,
        "modes": modes,
        "context_sizes": sizes,
        "data": {
            "source": study.table.source,
            "kind": study.kind,
            "prompts": study.table.num_prompts,
            "pairs": {s: len(p) for s, p in study.pools.items()},
        },
        "embedding": study.embedding,
        "models": {},
        "stderr": {},
    }

    def per_mode(model: RewardModel, only: int | None = None) -> tuple[dict, dict]:
        ev = evaluate(model, mixed["test"], sizes, num_tasks=config.eval_tasks, seed=eval_seed)
        acc = {
            m: {str(c): ev.model[c]["by_mode"].get(i) for c in sizes}
            for i, m in enumerate(modes)
            if only in (None, i)
        }
        return acc, {"overall": {str(c): ev.model[c]["stderr"] for c in sizes}}

    console.print("  training BTL-mixed, one oracle BTL per type, NP-BTL")
    btl = train_model(
        "btl",
        mixed["train"],
        mixed["val"],
        out / "models" / "btl-mixed",
        train_cfg(config.btl_steps),
        overwrite=overwrite,
    ).model
    results["models"]["btl-mixed"], results["stderr"]["btl-mixed"] = per_mode(btl)
    results["models"]["btl-oracle"] = {}
    for i, mode in enumerate(modes):
        single = simulate_splits_from_pools(
            study,
            mode_population(k, only=i),
            config,
            config.conflict_rate,
            data_seed + 1 + i,
            tag=f"{mode}-",
            reference=mode_population(k),
        )
        oracle = train_model(
            "btl",
            single["train"],
            single["val"],
            out / "models" / f"btl-oracle-{mode}",
            train_cfg(config.btl_steps),
            overwrite=overwrite,
        ).model
        results["models"]["btl-oracle"].update(per_mode(oracle, only=i)[0])
    np_btl = train_model(
        "np-btl",
        mixed["train"],
        mixed["val"],
        out / "models" / "np-btl",
        train_cfg(config.np_steps),
        overwrite=overwrite,
    ).model
    results["models"]["np-btl"], results["stderr"]["np-btl"] = per_mode(np_btl)
    results["bayes"] = bayes_per_mode(study, config, data_seed, eval_seed, sizes)

    embeddings = {
        c: user_embeddings(np_btl, mixed["test"], c, min(1000, config.test_users), eval_seed)
        for c in sorted(set(sizes) | set(config.pca_context_sizes))
    }
    results["silhouette"] = {str(c): silhouette(*embeddings[c]) for c in sizes}
    results["elapsed_s"] = time.perf_counter() - start
    write_results(out, results)

    curves = {**results["models"], "bayes-optimal": results["bayes"]}
    plot_accuracy_per_mode(out / "accuracy_per_mode.png", modes, curves, title=title)
    from sklearn.decomposition import PCA

    pca = {}
    for c in config.pca_context_sizes:
        z, labels = embeddings[c]
        pca[c] = (
            PCA(n_components=2).fit_transform(z) if z.std(axis=0).max() > 1e-6 else np.zeros((len(z), 2)),
            labels,
        )
    plot_embedding_pca(
        out / "embedding_pca.png", pca, modes, {c: results["silhouette"].get(str(c)) for c in pca}
    )
    rows = {
        f"{name} ({m})": {int(c): v for c, v in curve.items()}
        for name, per in curves.items()
        for m, curve in per.items()
    }
    print_accuracy_table("accuracy on unseen pairs per user type (columns: N^C)", sizes, rows)
    console.print(
        "silhouette of z by type: " + ", ".join(f"N^C={c}: {v:.2f}" for c, v in results["silhouette"].items())
    )
    console.print(
        f"results: {out / 'results.json'}  ({results['elapsed_s']:.0f} s; "
        f"embedding {study.embedding['seconds']:.0f} s)"
    )
    return results
