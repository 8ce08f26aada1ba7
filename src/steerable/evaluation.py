"""Accuracy vs number of context pairs, on unseen pairs only (D^T \\ D^C), with uncertainty.

For each N^C, tasks are drawn from the evaluation users (:meth:`TaskSampler.fixed_tasks`) and every
target pair not in the context is scored. Reported per N^C: accuracy with a standard error clustered by
user (:func:`clustered_stderr`: tasks cycle over the users, so several tasks share a user, their pairs
and their type; the user is the independently sampled unit), log loss, expected calibration error (10
equal-width confidence bins), accuracy per hidden mode when the data has one, and the Bayes-optimal
accuracy on the very same tasks when the population is known.

Models run on their own device (the batches follow them); the caller's train/eval mode is restored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from steerable.data.sampler import TaskBatch, TaskSampler
from steerable.data.schema import PreferenceData
from steerable.data.simulate import Population
from steerable.models.base import PreferenceOutput
from steerable.utils.modules import eval_mode
from steerable.utils.numerics import denormals_flushed

Predictor = Callable[[TaskBatch], PreferenceOutput]


def clustered_stderr(correct: np.ndarray, count: np.ndarray, cluster_ids: np.ndarray | None = None) -> float:
    """Standard error of the accuracy Σ correct / Σ count when the rows come in independent clusters.

    ``correct``, ``count`` (T,): hits and scored pairs of each row (task); ``cluster_ids`` (T,) int: the
    independently sampled unit each row belongs to (the user); a negative id, or no ids at all, makes the
    row a cluster of its own. Linearised ratio estimator with the small-sample factor G/(G − 1):
    se² = G/(G − 1) · Σ_g (Σ_{t∈g} correct_t − acc · count_t)² / (Σ_t count_t)², G clusters.
    NaN with fewer than two clusters or nothing scored.
    """
    correct, count = np.asarray(correct, np.float64), np.asarray(count, np.float64)
    total = count.sum()
    if total <= 0:
        return float("nan")
    ids = np.arange(len(count)) if cluster_ids is None else np.asarray(cluster_ids, np.int64)
    own = ids < 0
    if own.any():  # rows without a cluster: fresh ids past the largest one
        ids = ids.copy()
        ids[own] = ids.max(initial=-1) + 1 + np.arange(int(own.sum()))
    _, group = np.unique(ids, return_inverse=True)
    g = int(group.max()) + 1 if len(group) else 0
    if g < 2:
        return float("nan")
    resid = np.bincount(group, weights=correct - correct.sum() / total * count, minlength=g)  # (G,)
    return float(np.sqrt(g / (g - 1) * (resid**2).sum()) / total)


@dataclass
class _Tally:
    """Accumulates scored pairs of one predictor at one N^C."""

    task_correct: list[np.ndarray] = field(default_factory=list)
    task_count: list[np.ndarray] = field(default_factory=list)
    task_mode: list[np.ndarray] = field(default_factory=list)
    task_user: list[np.ndarray] = field(default_factory=list)
    prob: list[np.ndarray] = field(default_factory=list)
    log_loss_sum: float = 0.0

    def add(self, out: PreferenceOutput, batch: TaskBatch) -> None:
        log_odds = out.log_odds
        mask = batch.scored_mask.to(log_odds.device)
        hit = (log_odds > 0).double() + 0.5 * (log_odds == 0).double()
        self.task_correct.append((hit * mask).sum(1).cpu().numpy())
        self.task_count.append(mask.sum(1).cpu().numpy())
        self.task_mode.append(batch.hidden_mode.cpu().numpy())
        self.task_user.append(batch.user_index.cpu().numpy())
        self.prob.append(out.prob_chosen[mask].double().cpu().numpy())
        self.log_loss_sum += float(-out.log_prob_chosen.double().clamp(min=-50.0)[mask].sum())

    def per_task(self) -> dict[str, np.ndarray]:
        return {
            "user_index": np.concatenate(self.task_user),
            "correct": np.concatenate(self.task_correct),
            "count": np.concatenate(self.task_count),
        }

    def summary(self) -> dict[str, Any]:
        correct, count = np.concatenate(self.task_correct), np.concatenate(self.task_count)
        modes, users = np.concatenate(self.task_mode), np.concatenate(self.task_user)
        keep = count > 0
        correct, count, modes, users = correct[keep], count[keep], modes[keep], users[keep]
        total = count.sum()
        acc = correct.sum() / total
        stderr = clustered_stderr(correct, count, users)  # tasks of one user are not independent
        by_mode = {
            int(m): float(correct[modes == m].sum() / count[modes == m].sum())
            for m in np.unique(modes)
            if m >= 0
        }
        return {
            "accuracy": float(acc),
            "stderr": stderr,
            "log_loss": self.log_loss_sum / total,
            "ece": expected_calibration_error(np.concatenate(self.prob)),
            "by_mode": by_mode,
            "num_scored": int(total),
            "num_tasks": len(count),
            "num_users": len(np.unique(users)) if (users >= 0).all() else None,
        }


def expected_calibration_error(prob_chosen: np.ndarray, num_bins: int = 10) -> float:
    """ECE of predictions P(observed choice) over confidence bins max(p, 1 − p) ∈ [0.5, 1]."""
    if len(prob_chosen) == 0:
        return float("nan")
    confidence = np.maximum(prob_chosen, 1 - prob_chosen)
    correct = (prob_chosen > 0.5) + 0.5 * (prob_chosen == 0.5)
    bins = np.minimum(((confidence - 0.5) * 2 * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def type_probe_accuracy(latents: np.ndarray, types: np.ndarray, users: np.ndarray, folds: int = 5) -> float:
    """How well user embeddings identify the hidden type: accuracy of a logistic regression from z (N, L)
    to the type (N,), cross-validated with whole users held out (``users`` (N,); a user seen in training
    would let the probe recall the user instead of reading the type). NaN with fewer than two types or
    fewer than two users of each; 0.5-ish for a z that carries no type."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    types, users = np.asarray(types), np.asarray(users)
    # stratified, and no more folds than the rarest type has users: every training fold holds both types
    users_per_type = [len(np.unique(users[types == t])) for t in np.unique(types)]
    folds = min(folds, *users_per_type) if len(users_per_type) > 1 else 0
    if folds < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=0)
    scores = cross_val_score(probe, np.asarray(latents, np.float64), types, groups=users, cv=cv)
    return float(np.mean(scores))


@dataclass
class EvaluationResult:
    """Metrics per N^C for the model (and the Bayes-optimal reference, when known)."""

    context_sizes: list[int]
    model: dict[int, dict[str, Any]]
    bayes: dict[int, dict[str, Any]] | None
    num_targets: int
    num_tasks: int
    mode_names: list[str] | None = None
    tasks: dict[int, dict[str, np.ndarray]] | None = None  # per N^C: user_index, correct, count (keep_tasks)

    @property
    def accuracy(self) -> dict[int, float]:
        return {k: v["accuracy"] for k, v in self.model.items()}

    def to_json(self) -> dict[str, Any]:
        """The documented ``results.json`` of ``steerable evaluate`` (keys are strings)."""

        def per(metrics: dict[int, dict[str, Any]], key: str) -> dict[str, Any]:
            return {str(k): v[key] for k, v in metrics.items()}

        out: dict[str, Any] = {
            "accuracy": per(self.model, "accuracy"),
            "stderr": per(self.model, "stderr"),
            "log_loss": per(self.model, "log_loss"),
            "ece": per(self.model, "ece"),
            "num_scored": per(self.model, "num_scored"),
            "num_tasks": self.num_tasks,
            "num_targets": self.num_targets,
        }
        modes = sorted({m for v in self.model.values() for m in v["by_mode"]})
        if modes:
            out["accuracy_by_mode"] = {
                self._mode_name(m): {str(k): v["by_mode"].get(m) for k, v in self.model.items()}
                for m in modes
            }
        if self.bayes is not None:
            out["bayes_accuracy"] = per(self.bayes, "accuracy")
            out["bayes_stderr"] = per(self.bayes, "stderr")
        return out

    def _mode_name(self, mode: int) -> str:
        return self.mode_names[mode] if self.mode_names and mode < len(self.mode_names) else str(mode)


@torch.no_grad()
def evaluate(
    predictor: Predictor | torch.nn.Module,
    data: PreferenceData,
    context_sizes: list[int] | tuple[int, ...] = (0, 1, 2, 4, 8),
    num_targets: int = 20,
    num_tasks: int = 4096,
    seed: int = 0,
    population: Population | None = None,
    batch_size: int = 256,
    progress: bool | None = None,
    keep_tasks: bool = False,
) -> EvaluationResult:
    """Accuracy vs N^C of ``predictor`` (a reward model, or any ``batch -> PreferenceOutput``).

    ``population`` (the simulator that made ``data``) adds the Bayes-optimal accuracy on the same tasks;
    ``keep_tasks`` keeps each task's user and score (e.g. to bin accuracy over hidden user weights).
    """
    from steerable.bayes import BayesOptimalPredictor

    sizes = sorted(set(int(c) for c in context_sizes))
    if num_targets <= sizes[-1]:
        raise ValueError(f"num_targets ({num_targets}) must exceed the largest context size ({sizes[-1]})")
    device = predictor_device(predictor)
    sampler = TaskSampler(data, sizes[0], sizes[-1], num_targets, seed=seed)
    tasks = sampler.fixed_tasks(sizes, num_tasks, batch_size=batch_size)
    bayes = BayesOptimalPredictor(population, seed=seed) if population is not None else None
    model_tally = {c: _Tally() for c in sizes}
    bayes_tally = {c: _Tally() for c in sizes}
    total = sum(len(v) for v in tasks.values())
    with (
        denormals_flushed(),
        eval_mode(predictor),
        tqdm(
            total=total,
            desc="evaluate",
            unit="batch",
            disable=(not progress) if progress is not None else None,
            leave=False,
        ) as bar,
    ):
        for c in sizes:
            for batch in tasks[c]:
                model_tally[c].add(predictor(batch.to(device)), batch)
                if bayes is not None:
                    bayes_tally[c].add(bayes(batch), batch)
                bar.update(1)
    return EvaluationResult(
        context_sizes=sizes,
        model={c: t.summary() for c, t in model_tally.items()},
        bayes={c: t.summary() for c, t in bayes_tally.items()} if bayes is not None else None,
        num_targets=num_targets,
        num_tasks=num_tasks,
        mode_names=population.mode_names if population is not None else None,
        tasks={c: t.per_task() for c, t in model_tally.items()} if keep_tasks else None,
    )


@torch.no_grad()
def evaluate_batches(predictor: Predictor | torch.nn.Module, batches: list[TaskBatch]) -> dict[str, Any]:
    """Metrics (accuracy, stderr, log loss, ECE, by mode) over ready-made task batches, e.g. tasks
    drawn straight from a pair pool with their own context and target conflict rates."""
    device = predictor_device(predictor)
    tally = _Tally()
    with denormals_flushed(), eval_mode(predictor):
        for batch in batches:
            tally.add(predictor(batch.to(device)), batch)
    return tally.summary()


def predictor_device(predictor: Predictor | torch.nn.Module) -> torch.device:
    """Where a predictor's batches must go: a model's parameters' device; CPU for plain callables."""
    if isinstance(predictor, torch.nn.Module):
        param = next(predictor.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")
