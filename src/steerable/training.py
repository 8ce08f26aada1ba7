"""One training loop for every reward model (BTL, DPL, NP-BTL, vnp-btl).

Tasks are sampled per user (:class:`~steerable.data.sampler.TaskSampler`); the loss is
:func:`~steerable.objectives.preference_loss` on all of D^T (the NP convention); the model kept is the
one with the lowest validation loss, measured on a fixed set of validation tasks scored on D^T \\ D^C
only. With an output folder the run writes ``metrics.csv`` (and TensorBoard logs when tensorboard is
installed), keeps the best model as ``config.json`` + ``model.safetensors``, and checkpoints at every
validation; rerun the same command after a crash or kill and it resumes from the last checkpoint with
the same numbers it would have produced uninterrupted.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.checkpoint import load_checkpoint, save_checkpoint
from steerable.data.sampler import TaskBatch, TaskSampler
from steerable.data.schema import PreferenceData
from steerable.errors import ConfigError
from steerable.models.base import CONFIG_NAME, WEIGHTS_NAME, RewardModel
from steerable.objectives import prediction_hits, preference_loss
from steerable.utils.config import config_to_dict, option
from steerable.utils.distributed import (
    DEVICES,
    gather_rng_states,
    make_accelerator,
    rank_seed,
    restore_rng_states,
    rng_states,
)
from steerable.utils.files import write_json_atomic
from steerable.utils.numerics import denormals_flushed

METRIC_COLUMNS = [
    "step",
    "elapsed_s",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_accuracy_max_context",
    "is_best",
]
RESUMABLE_CHANGES = {"patience", "device"}  # settings that may differ when a run is resumed


@dataclass
class TrainConfig:
    """How to train a reward model. Defaults reach the paper's accuracy on its studies unchanged."""

    max_steps: int = option(2000, "optimisation steps (batches of tasks)")
    batch_size: int = option(64, "tasks per step over all processes (paper: 64)")
    min_context: int = option(0, "fewest context pairs per task, N^C min (paper: 0)")
    max_context: int = option(10, "most context pairs per task, N^C max (paper: 10)")
    num_targets: int = option(20, "target pairs per task N^T, context included (paper: 20)")
    learning_rate: float = option(
        1e-3, "Adam learning rate (paper: 1e-4; 1e-3 reaches the same accuracy ~10x sooner here)"
    )
    lr_schedule: str = option(
        "cosine", "learning-rate schedule after warm-up", choices=["cosine", "constant"]
    )
    warmup_steps: int = option(50, "linear learning-rate warm-up steps")
    min_lr_ratio: float = option(0.01, "cosine schedule: final learning rate as a fraction of the peak")
    weight_decay: float = option(0.0, "Adam weight decay")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    eval_every: int = option(100, "validate (and checkpoint) every this many steps")
    val_tasks: int = option(1024, "fixed validation tasks, spread over N^C = min..max")
    patience: int | None = option(None, "stop after this many validations without improvement (none: never)")
    val_fraction: float = option(
        0.1, "share of training users held out for validation when no validation data is given"
    )
    seed: int = option(0, "seed of initialisation, task sampling and dropout")
    device: str = option(
        "auto",
        "auto (a GPU when there is one), cpu or cuda (under a launcher: each process's own GPU)",
        choices=list(DEVICES),
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "num_targets", "eval_every", "val_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_context <= self.max_context < self.num_targets:
            raise ConfigError(
                f"need 0 <= min_context <= max_context < num_targets, got {self.min_context}, "
                f"{self.max_context}, {self.num_targets}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class TrainResult:
    """The best model and what happened while finding it."""

    model: RewardModel
    best_step: int
    best_val_loss: float
    steps: int
    elapsed_s: float
    history: list[dict[str, float]]
    resumed_from: int = 0


EvalCallback = Callable[[int, dict[str, float], RewardModel], bool]


@torch.no_grad()
def validation_metrics(model: RewardModel, batches: list[TaskBatch]) -> dict[str, float]:
    """Predictive loss and accuracy on D^T \\ D^C of fixed validation batches."""
    was_training = model.training
    model.eval()
    nll = correct = count = 0.0
    by_context: dict[int, list[float]] = {}
    for batch in batches:
        out = model(batch)
        mask = batch.scored_mask
        n = float(mask.sum())
        nll += float(preference_loss(out.log_prob_chosen, mask)) * n
        hits = float(prediction_hits(out.log_odds)[mask].sum())
        correct += hits
        count += n
        stats = by_context.setdefault(batch.num_context, [0.0, 0.0])
        stats[0] += hits
        stats[1] += n
    model.train(was_training)
    top = max(by_context)
    return {
        "val_loss": nll / count,
        "val_accuracy": correct / count,
        "val_accuracy_max_context": by_context[top][0] / by_context[top][1],
    }


def _validation_batches(val_data: PreferenceData, config: TrainConfig) -> list[TaskBatch]:
    sampler = TaskSampler(
        val_data, config.min_context, config.max_context, config.num_targets, seed=config.seed + 1
    )
    sizes = list(range(config.min_context, config.max_context + 1))
    per_size = math.ceil(config.val_tasks / len(sizes))
    batches = [b for nc, group in sampler.fixed_tasks(sizes, per_size, batch_size=256).items() for b in group]
    return batches


def learning_rate_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Step (0-based) -> learning rate: linear warm-up, then constant or cosine decay to
    ``min_lr_ratio`` × peak at ``max_steps``."""

    def lr(step: int) -> float:
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return config.learning_rate
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return config.learning_rate * ratio

    return lr


class MetricsLog:
    """metrics.csv (+ TensorBoard when installed), truncated to the checkpoint's step on resume."""

    def __init__(
        self, out_dir: Path | None, resume_step: int, columns: list[str] | tuple[str, ...] | None = None
    ) -> None:
        self.columns = list(columns or METRIC_COLUMNS)
        self.path = None if out_dir is None else out_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if self.path is not None and self.path.exists() and resume_step > 0:
            with open(self.path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    try:
                        parsed = {k: float(v) for k, v in row.items() if k in self.columns}
                    except (TypeError, ValueError):
                        continue  # a line cut short by a crash
                    if len(parsed) == len(self.columns) and parsed["step"] <= resume_step:
                        self.rows.append(parsed)
        if self.path is not None:
            with open(self.path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows([{k: _fmt(v) for k, v in r.items()} for r in self.rows])
        self.tensorboard = None
        if out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, self.columns).writerow({k: _fmt(v) for k, v in row.items()})
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "is_best"):
                    self.tensorboard.add_scalar(key, value, int(row["step"]))
            self.tensorboard.flush()

    def last(self) -> tuple[dict[str, float], tuple[int, int]]:
        """The last row without its step, and the (first, last) steps it averages ({}, (0, 0) if none)."""
        if not self.rows:
            return {}, (0, 0)
        last = int(self.rows[-1]["step"])
        first = int(self.rows[-2]["step"]) + 1 if len(self.rows) > 1 else 1
        return {k: v for k, v in self.rows[-1].items() if k != "step"}, (first, last)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _run_description(
    model: RewardModel, config: TrainConfig, train: PreferenceData, val: PreferenceData, processes: int
) -> dict[str, Any]:
    from steerable import __version__

    return {
        "steerable_version": __version__,
        "num_processes": processes,
        "train": config_to_dict(config),
        "model": config_to_dict(model.config),
        "data": {
            "train": train.source,
            "train_summary": train.summary(),
            "train_fingerprint": train.fingerprint(),
            "val": val.source,
            "val_summary": val.summary(),
            "val_fingerprint": val.fingerprint(),
        },
    }


def _check_same_run(previous: dict[str, Any], current: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume a checkpoint of other settings, other data or another number of processes."""
    advice = "pass --overwrite to start afresh, or choose another --out"
    old_world, world = previous.get("num_processes", 1), current["num_processes"]
    if old_world != world:
        raise ConfigError(
            f"{out_dir} holds a run with {old_world} process(es), now {world}: resume it with the same "
            f"number of processes, or {advice}"
        )
    for key in ("train_fingerprint", "val_fingerprint"):
        old, new = previous.get("data", {}).get(key), current["data"][key]
        if old is not None and old != new:
            split = key.split("_")[0]
            raise ConfigError(
                f"{out_dir} holds a run trained on other {split} data ({old} rows:hash, now {new}); {advice}"
            )
    for section in ("train", "model"):
        for key, value in current[section].items():
            old = previous.get(section, {}).get(key)
            if old != value and not (section == "train" and key in RESUMABLE_CHANGES):
                raise ConfigError(
                    f"{out_dir} holds a run with {section} setting {key}={old!r} (now {value!r}); "
                    "pass --overwrite to start afresh, or choose another --out"
                )


class PreferenceObjective(torch.nn.Module):
    """A reward model's training loss as a module: ``objective(batch)`` -> scalar loss.

    DDP synchronises gradients only through the wrapped module's ``forward``; the model's own forward
    predicts, so the loss (:func:`~steerable.objectives.preference_loss` on all of D^T) is wrapped here.
    """

    def __init__(self, model: RewardModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        out = self.model.training_output(batch)
        return preference_loss(out.log_prob_chosen, batch.target_mask, out.kl)


@denormals_flushed()  # subnormal floats are slow on CPUs (utils/numerics.py)
def train_reward_model(
    model: RewardModel,
    train_data: PreferenceData,
    val_data: PreferenceData | None = None,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    callbacks: tuple[EvalCallback, ...] = (),
    progress: bool | None = None,
) -> TrainResult:
    """Train ``model`` on tasks from ``train_data``, select it on ``val_data`` (or on held-out users).

    Runs through accelerate: one process by default; under ``torchrun`` / ``accelerate launch`` each
    process draws its own ``batch_size / processes`` tasks per step (all with the same N^C), gradients
    are averaged, and only the main process writes files.

    Args:
        out_dir: folder for the best model, ``metrics.csv`` and the resumable checkpoint; resumes
            automatically when it already holds a checkpoint of the same run (same settings, data and
            number of processes).
        overwrite: discard an existing run in ``out_dir``.
        callbacks: ``f(step, metrics, model) -> stop?`` called after each validation (in every process).
        progress: show a progress bar (default: when writing to a terminal).
    """
    config = config or TrainConfig()
    accelerator = make_accelerator(config.device)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size ({config.batch_size}) is the global batch: it must be divisible by the number "
            f"of processes ({world})"
        )
    if val_data is None:
        train_data, val_data = train_data.split_users(config.val_fraction, seed=config.seed)
    train_sampler = TaskSampler(
        train_data,
        config.min_context,
        config.max_context,
        config.num_targets,
        config.batch_size // world,
        seed=rank_seed(config.seed, rank),
        context_seed=None if world == 1 else config.seed + 2,  # every process draws the same N^C
    )
    val_batches = [b.to(device) for b in _validation_batches(val_data, config)]
    model.to(device).train()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = learning_rate_schedule(config)
    out = Path(out_dir) if out_dir is not None else None
    description = _run_description(model, config, train_data, val_data, world)
    ckpt_dir = out / "checkpoint" if out is not None else None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(rank_seed(config.seed, rank))
        start, elapsed, best = 0, 0.0, {"val_loss": math.inf, "step": 0, "stale": 0}
        restored = None
        if out is not None:
            if overwrite and main:
                for name in (
                    "checkpoint",
                    "checkpoint.old",
                    "metrics.csv",
                    "tensorboard",
                    CONFIG_NAME,
                    WEIGHTS_NAME,
                    "train_config.json",
                ):
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            accelerator.wait_for_everyone()
            restored = load_checkpoint(ckpt_dir, model, optimizer)
        if restored is None:
            model.fit_standardization(train_data)
        else:
            meta, rng = restored
            _check_same_run(meta["description"], description, out)
            start, elapsed, best = meta["step"], meta["elapsed_s"], meta["best"]
            restore_rng_states(rng, accelerator, train_sampler, device)
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "train_config.json", description)
        objective, optimizer = accelerator.prepare(PreferenceObjective(model), optimizer)
        log = MetricsLog(out if main else None, start)
        finished = start >= config.max_steps or (
            config.patience is not None and best["stale"] >= config.patience
        )
        bar = tqdm(
            total=config.max_steps,
            initial=start,
            desc=f"train {model.model_type}",
            unit="step",
            disable=True if not main else (not progress) if progress is not None else None,
            leave=False,
            dynamic_ncols=True,
        )
        window_loss, window_steps, clock = 0.0, 0, time.perf_counter()
        step = start
        try:
            while not finished:
                batch = train_sampler.sample()
                if device.type != "cpu":
                    batch = batch.to(device)
                loss = objective(batch)
                optimizer.zero_grad(set_to_none=True)
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
                accelerator.backward(loss)
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                step += 1
                window_loss += float(loss.detach())
                window_steps += 1
                bar.update(1)
                if step % config.eval_every == 0 or step == config.max_steps:
                    metrics = validation_metrics(model, val_batches)
                    train_loss = window_loss / window_steps
                    if world > 1:  # the mean over every process's tasks
                        train_loss = float(
                            accelerator.reduce(torch.tensor(train_loss, device=device), "mean")
                        )
                    now = time.perf_counter()
                    elapsed += now - clock
                    clock = now
                    improved = metrics["val_loss"] < best["val_loss"]
                    if improved:
                        best = {"val_loss": metrics["val_loss"], "step": step, "stale": 0}
                        if out is None:
                            best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        elif main:
                            model.save_pretrained(out)
                    else:
                        best["stale"] += 1
                    row = {
                        "step": step,
                        "elapsed_s": elapsed,
                        "train_loss": train_loss,
                        **metrics,
                        "is_best": float(improved),
                    }
                    log.log(row)
                    window_loss, window_steps = 0.0, 0
                    bar.set_postfix(
                        loss=f"{row['train_loss']:.3f}",
                        val=f"{metrics['val_loss']:.3f}",
                        acc=f"{metrics['val_accuracy']:.3f}",
                    )
                    stop = any(cb(step, row, model) for cb in callbacks)
                    finished = (
                        stop
                        or step >= config.max_steps
                        or (config.patience is not None and best["stale"] >= config.patience)
                    )
                    if out is not None:
                        rng = gather_rng_states(accelerator, rng_states(train_sampler.get_state(), device))
                        state = {
                            "step": step,
                            "elapsed_s": elapsed,
                            "best": {k: v for k, v in best.items() if k != "state"},
                            "description": description,
                        }
                        if main:
                            save_checkpoint(ckpt_dir, model, optimizer, rng, state)
                        accelerator.wait_for_everyone()
                    clock = time.perf_counter()
        finally:
            bar.close()
            log.close()

    accelerator.wait_for_everyone()  # the main process has written the best model
    if out is not None and (out / WEIGHTS_NAME).exists():
        best_model = type(model).from_pretrained(out, device=device)
    else:
        if "state" in best:
            model.load_state_dict(best["state"])
        best_model = model.eval()
    return TrainResult(
        model=best_model,
        best_step=int(best["step"]),
        best_val_loss=float(best["val_loss"]),
        steps=step,
        elapsed_s=elapsed,
        history=log.rows,
        resumed_from=start,
    )
