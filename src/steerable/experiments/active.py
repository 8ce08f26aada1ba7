"""Active elicitation study: accuracy on held-out pairs vs the number of pairs asked, per strategy.

Two populations, each with two hidden user types:

* ``gaussian-rho0.5`` — Example 4.3's options [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]) at ρ = 0.5, type k prefers
  the larger h_k. Only a third of random pairs conflict, so random questions are often wasted.
* ``just-eval-2modes`` (or the UltraFeedback aspects with ``--data``) — the offline benchmark's
  ``length`` vs ``hedging`` users on held-out prompts; options are response embeddings. Candidates are
  the test prompts' pairs as they come (~half conflicting); targets are conflicting pairs
  (``--text-targets``), where knowing the user matters, and the model is trained on conflicting pairs,
  as in ``hh``.

For each population a variational NP-BTL (``vnp-btl``, the ``ml`` objective: the predictive that is
used here) is trained on users answering random pairs. Then every evaluation user gets a pool of
candidate pairs and a disjoint set of target pairs; each strategy asks k = 1..K pool pairs one at a time
(seeing only the answers to what it asked); after each k the *same* model predicts the targets from the
asked pairs, so strategies differ only in what they asked. The Bayes-optimal accuracy given the same
asked pairs (exact posterior over the two types, from the options' true attributes) is reported too:
it measures how informative the questions are, independently of the model. Strategies:
:mod:`steerable.active` (``bayes-greedy`` is the exact one-step look-ahead yardstick, defined because the
types are discrete and their rewards known).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.active import STRATEGIES, elicit_batch, member_probabilities
from steerable.bayes import BayesOptimalPredictor
from steerable.data.simulate import Population, gaussian_population, simulate
from steerable.errors import ConfigError, DataError
from steerable.evaluation import clustered_stderr
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
from steerable.models.base import RewardModel
from steerable.training import TrainConfig
from steerable.utils.config import option


@dataclass
class ActiveConfig(TextDataConfig):
    """Settings of ``steerable experiment active`` (~4 min on 2 CPU cores with the embedding cache warm)."""

    populations: list[str] = option(["gaussian", "text"], "which populations: gaussian, text")
    strategies: list[str] = option(list(STRATEGIES), "strategies compared")
    rho: float = option(0.5, "correlation of the Gaussian population's options")
    gaussian_train_users: int = option(4000, "training users of the Gaussian population")
    gaussian_pairs_per_user: int = option(40, "answered pairs per Gaussian training user")
    gaussian_steps: int = option(2000, "training steps of the Gaussian population's model")
    text_steps: int = option(800, "training steps of the text population's model (as hh)")
    conflict_rate: float | None = option(
        1.0, "training users' share of conflicting pairs, text (none: as they come; 1.0 as in the hh study)"
    )
    text_targets: str = option(
        "conflicting",
        "text targets: conflicting pairs (where knowing the user matters, as in hh) or all",
        choices=["conflicting", "all"],
    )
    model: str = option("vnp-btl", "model type: vnp-btl (info-gain from q(z | D^C)) or np-btl")
    vnp_objective: str = option("ml", "vnp-btl training objective: ml or elbo", choices=["ml", "elbo"])
    max_queries: int = option(10, "pairs asked per user (K)")
    pool_size: int = option(40, "candidate pairs per evaluation user")
    num_targets: int = option(40, "held-out target pairs per evaluation user")
    eval_users: int = option(400, "evaluation users per population")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")


@dataclass
class EvalUsers:
    """B evaluation users: pools, targets, their answers, and the options' true attributes."""

    pool: tuple[torch.Tensor, torch.Tensor]  # (B, P, D) ×2 model inputs
    pool_features: tuple[torch.Tensor, torch.Tensor]  # (B, P, F) ×2 true attributes
    pool_answers: torch.Tensor  # (B, P) bool: a ≻ b
    targets: tuple[torch.Tensor, torch.Tensor]  # (B, T, D) ×2
    target_features: tuple[torch.Tensor, torch.Tensor]  # (B, T, F) ×2
    target_answers: torch.Tensor  # (B, T) bool
    population: Population


def _answers(population: Population, fa: np.ndarray, fb: np.ndarray, weights: np.ndarray, rng) -> np.ndarray:
    b, n = fa.shape[:2]
    flat = population.choose(fa.reshape(b * n, -1), fb.reshape(b * n, -1), np.repeat(weights, n, axis=0), rng)
    return flat.reshape(b, n)


def gaussian_users(population: Population, config: ActiveConfig, seed: int) -> EvalUsers:
    """Evaluation users of a simulated population: options are their own true attributes."""
    rng = np.random.default_rng(seed)
    b, p, t = config.eval_users, config.pool_size, config.num_targets
    _, weights = population.sample_users(b, rng)
    a, bb = population.sample_pairs(b * (p + t), rng)
    a = a.reshape(b, p + t, -1).astype(np.float32)
    bb = bb.reshape(b, p + t, -1).astype(np.float32)
    answers = _answers(population, a, bb, weights, rng)
    ta, tb = torch.from_numpy(a), torch.from_numpy(bb)
    split = (slice(None), slice(0, p))
    rest = (slice(None), slice(p, None))
    return EvalUsers(
        (ta[split], tb[split]),
        (ta[split], tb[split]),
        torch.from_numpy(answers[split]),
        (ta[rest], tb[rest]),
        (ta[rest], tb[rest]),
        torch.from_numpy(answers[rest]),
        population,
    )


def text_users(study: Any, population: Population, config: ActiveConfig, seed: int) -> EvalUsers:
    """Evaluation users on the test split's pairs: pool and targets drawn without overlap per user."""
    rng = np.random.default_rng(seed)
    pool = study.pools["test"]
    p, t = config.pool_size, config.num_targets
    eligible = (
        pool.conflicting(population) if config.text_targets == "conflicting" else np.ones(len(pool), bool)
    )
    if len(pool) < p + t or eligible.sum() < t:
        raise DataError(
            f"the test split has {len(pool)} pairs ({int(eligible.sum())} eligible as targets), but each "
            f"user needs {p} pool pairs and {t} targets: lower --pool-size / --num-targets or add prompts",
            source=study.table.source,
        )
    picks = []
    for _ in range(config.eval_users):  # targets first (from the eligible pairs), the pool from the rest
        targets = rng.choice(np.flatnonzero(eligible), size=t, replace=False)
        rest = np.setdiff1d(np.arange(len(pool)), targets)
        picks.append(np.concatenate([rng.choice(rest, size=p, replace=False), targets]))
    picks = np.stack(picks)
    a, b = pool.a[picks], pool.b[picks]  # (B, P + T) response numbers
    attrs = study.table.attributes[:, pool.aspects]
    fa, fb = attrs[a].astype(np.float64), attrs[b].astype(np.float64)
    _, weights = population.sample_users(config.eval_users, rng)
    answers = torch.from_numpy(_answers(population, fa, fb, weights, rng))
    ea, eb = torch.from_numpy(study.embeddings[a]), torch.from_numpy(study.embeddings[b])
    fa_t, fb_t = torch.from_numpy(fa), torch.from_numpy(fb)
    return EvalUsers(
        (ea[:, :p], eb[:, :p]),
        (fa_t[:, :p], fb_t[:, :p]),
        answers[:, :p],
        (ea[:, p:], eb[:, p:]),
        (fa_t[:, p:], fb_t[:, p:]),
        answers[:, p:],
        population,
    )


def _oriented(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, first: torch.Tensor):
    """Asked pairs (B, k) of pool (B, P, D) ×2 as (chosen, rejected) given the answers (B, k)."""
    gather = idx.unsqueeze(-1).expand(-1, -1, a.shape[-1])
    qa, qb = a.gather(1, gather), b.gather(1, gather)
    f = first.unsqueeze(-1)
    return torch.where(f, qa, qb), torch.where(f, qb, qa)


def accuracy_curve(
    model: RewardModel, users: EvalUsers, asked: torch.Tensor, batch: int = 200
) -> dict[str, dict[int, float]]:
    """Model and Bayes-optimal accuracy on the targets after the first k asked pairs, k = 0..K (exact
    ties count ½), each with its standard error clustered by user (:func:`clustered_stderr`):
    {"accuracy", "stderr", "bayes_accuracy", "bayes_stderr"} -> {k: value}."""
    bayes = BayesOptimalPredictor(users.population)
    rows = torch.arange(asked.shape[0]).unsqueeze(1)
    first = users.pool_answers[rows, asked]  # (B, K)
    curves: dict[str, dict[int, float]] = {
        key: {} for key in ("accuracy", "stderr", "bayes_accuracy", "bayes_stderr")
    }
    for k in range(asked.shape[1] + 1):
        per_user, per_user_bayes = [], []
        for start in range(0, asked.shape[0], batch):
            sl = slice(start, start + batch)
            idx, ans = asked[sl, :k], first[sl, :k]
            chosen, rejected = _oriented(users.pool[0][sl], users.pool[1][sl], idx, ans)
            p = member_probabilities(
                model, chosen, rejected, users.targets[0][sl], users.targets[1][sl]
            ).mean(0)
            truth = users.target_answers[sl].double()
            hit = torch.where(p == 0.5, 0.5, ((p > 0.5).double() == truth).double())
            per_user.append(hit.sum(1))
            fc, fr = _oriented(users.pool_features[0][sl], users.pool_features[1][sl], idx, ans)
            post = bayes.log_posterior(fc, fr, torch.ones(idx.shape, dtype=torch.bool)).exp()  # (b, M)
            choice = bayes._choice_prob(users.target_features[0][sl], users.target_features[1][sl])
            pb = (choice * post.unsqueeze(1)).sum(-1)  # (b, T)
            hit_b = torch.where((pb - 0.5).abs() < 1e-12, 0.5, ((pb > 0.5).double() == truth).double())
            per_user_bayes.append(hit_b.sum(1))
        count = np.full(asked.shape[0], users.target_answers.shape[1])  # (B,) targets per user
        for name, hits in (("", per_user), ("bayes_", per_user_bayes)):
            correct = torch.cat(hits).numpy()  # (B,) one row per user: users are the clusters
            curves[f"{name}accuracy"][k] = float(correct.sum() / count.sum())
            curves[f"{name}stderr"][k] = clustered_stderr(correct, count)
    return curves


def _compare(
    name: str, model: RewardModel, users: EvalUsers, config: ActiveConfig, seed: int
) -> dict[str, dict[str, dict[int, float]]]:
    """Every strategy on the same users (same pools, targets and answers)."""
    out: dict[str, dict[str, dict[int, float]]] = {
        "accuracy": {},
        "stderr": {},
        "bayes_accuracy": {},
        "bayes_stderr": {},
    }
    for strategy, s in zip(config.strategies, child_seeds(seed, len(config.strategies)), strict=True):
        start = time.perf_counter()
        asked = elicit_batch(
            strategy,
            users.pool[0],
            users.pool[1],
            users.pool_answers,
            config.max_queries,
            np.random.default_rng(s),
            predictor=model,
            population=users.population,
            features=users.pool_features,
        )
        curves = accuracy_curve(model, users, asked)
        for key, curve in curves.items():
            out[key][strategy] = curve
        acc = curves["accuracy"]
        console.print(
            f"  {name} / {strategy}: accuracy {acc[0]:.3f} → {acc[config.max_queries]:.3f} after "
            f"{config.max_queries} pairs ({time.perf_counter() - start:.1f} s)"
        )
    return out


def _gaussian(out: Path, config: ActiveConfig, seed: int, overwrite: bool) -> tuple[str, dict[str, Any]]:
    population = gaussian_population(config.rho)
    name = f"gaussian-rho{config.rho:g}"
    s_train, s_val, s_model, s_eval, s_cmp = child_seeds(seed, 5)
    train = simulate(
        population, config.gaussian_train_users, config.gaussian_pairs_per_user, s_train, "train-"
    )
    val = simulate(population, 500, config.gaussian_pairs_per_user, s_val, "val-")
    train_config = TrainConfig(max_steps=config.gaussian_steps, seed=s_model)
    result = train_model(
        config.model, train, val, out / name / config.model, train_config,
        {"vnp_objective": config.vnp_objective} if config.model == "vnp-btl" else None, overwrite,
    )  # fmt: skip
    users = gaussian_users(population, config, s_eval)
    return name, _compare(name, result.model, users, config, s_cmp)


def _text(out: Path, config: ActiveConfig, seed: int, overwrite: bool) -> tuple[str, dict[str, Any]]:
    s_data, s_users, s_model, s_eval, s_cmp = child_seeds(seed, 5)
    study = prepare_text_study(config, None, 2, s_data)
    name = f"{study.kind}-2modes"
    population = mode_population(2)
    splits = simulate_splits_from_pools(study, population, config, config.conflict_rate, s_users)
    train_config = TrainConfig(max_steps=config.text_steps, learning_rate=config.learning_rate, seed=s_model)
    result = train_model(
        config.model, splits["train"], splits["val"], out / name / config.model, train_config,
        {"vnp_objective": config.vnp_objective} if config.model == "vnp-btl" else None, overwrite,
    )  # fmt: skip
    users = text_users(study, population, config, s_eval)
    results = _compare(name, result.model, users, config, s_cmp)
    results["attributes"] = study.aspects
    results["embedding"] = study.embedding
    return name, results


def run_active(
    out_dir: str | Path, seed: int = 0, config: ActiveConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the study; writes ``results.json``, ``active.png`` and the trained models under ``out_dir``."""
    config = config or ActiveConfig()
    out = begin_study(out_dir, "active", "Active elicitation: which pair to ask next", seed, config)
    started = time.perf_counter()
    runners = {"gaussian": _gaussian, "text": _text}
    unknown = sorted(set(config.populations) - set(runners))
    if unknown:
        raise ConfigError(f"unknown populations {unknown}; choose from gaussian, text")
    results: dict[str, Any] = {
        "populations": {},
        "stderr": {},
        "bayes_accuracy": {},
        "bayes_stderr": {},
        "details": {},
    }
    for kind, s in zip(config.populations, child_seeds(seed, len(config.populations)), strict=True):
        name, r = runners[kind](out, config, s, overwrite)
        results["populations"][name] = r.pop("accuracy")
        results["stderr"][name] = r.pop("stderr")
        results["bayes_accuracy"][name] = r.pop("bayes_accuracy")
        results["bayes_stderr"][name] = r.pop("bayes_stderr")
        results["details"][name] = r
        ks = list(range(config.max_queries + 1))
        rows = {f"{st}": v for st, v in results["populations"][name].items()}
        rows.update({f"Bayes | {st}'s pairs": v for st, v in results["bayes_accuracy"][name].items()})
        print_accuracy_table(f"{name}: accuracy on held-out pairs after k asked pairs", ks, rows)
    results["settings"] = {
        "model": config.model,
        "pool_size": config.pool_size,
        "num_targets": config.num_targets,
        "eval_users": config.eval_users,
        "max_queries": config.max_queries,
    }
    results["seconds"] = time.perf_counter() - started
    write_results(out, results)
    _plot(out, results)
    return results


def _plot(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["populations"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for i, (strategy, curve) in enumerate(results["populations"][name].items()):
            ks = sorted(int(k) for k in curve)
            err = results["stderr"][name][strategy]
            ax.errorbar(ks, [curve[k] for k in ks], yerr=[err[k] for k in ks], fmt="o-", ms=3, color=f"C{i}",
                        label=strategy, capsize=2)  # fmt: skip
            bayes = results["bayes_accuracy"][name][strategy]
            ax.plot(ks, [bayes[k] for k in ks], ls=":", color=f"C{i}", lw=1)
        ax.set(xlabel="pairs asked k", ylabel="accuracy on held-out pairs", title=name)
        ax.legend(fontsize=8, title="model (solid) / Bayes given the same pairs (dotted)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "active.png", dpi=120)
    plt.close(fig)
