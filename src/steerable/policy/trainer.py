"""Training NP-DPO (and BTL-DPO) through accelerate: one process by default; several processes, GPUs or
machines under ``torchrun`` / ``accelerate launch`` (DDP), with no code change.

One step: B users are drawn as NP tasks (:class:`~steerable.data.sampler.TaskSampler`; N^C ~
Uniform{min..max} context pairs per user, the same N^C in every process), each user's next
``targets_per_user`` pairs are the targets (D^T \\ D^C). z is encoded from the context embeddings, FiLM is
set per row, and the conditional DPO loss (:func:`steerable.objectives.dpo_loss`, β = 0.05 by default)
plus ``nll_weight`` × the chosen responses' NLL per token is minimised over LoRA, encoder and
hypernetwork. The reference log-probabilities come from the same model with adapters, FiLM and dropout
off, in the same autocast context as the policy (:mod:`~steerable.policy.sequences`), computed once per
pair; with ``blocks last:K`` the frozen first blocks' hidden states are cached too and a step runs only
the last K blocks.

Metrics use TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``) plus the log-ratios log π/π_ref of the
chosen and rejected responses (``logratio/chosen``, ``logratio/rejected``, in nats), averaged over every
process: a chosen log-ratio sinking far below zero while accuracy is perfect is the sign that generation
is degrading; the trainer warns when it happens. Checkpoints hold only the trained weights, the
optimizer and every process's RNG states, and are resumed automatically with the same number of
processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.checkpoint import load_checkpoint, save_checkpoint
from steerable.data.sampler import TaskSampler
from steerable.data.schema import PreferenceData
from steerable.errors import ConfigError
from steerable.objectives import dpo_loss, implicit_reward
from steerable.policy.model import ConditionalPolicy, PolicyConfig
from steerable.policy.selection import CheckpointSelector
from steerable.policy.sequences import SequenceStore, prefix_cache_for
from steerable.policy.tokens import PairBatch, TokenizedPairs, pair_batch
from steerable.text.models import folder_fingerprint
from steerable.training import MetricsLog
from steerable.utils.config import config_to_dict, option
from steerable.utils.distributed import (
    DEVICES,
    PRECISIONS,
    gather_rng_states,
    make_accelerator,
    rank_seed,
    restore_rng_states,
    rng_states,
)
from steerable.utils.files import write_json_atomic
from steerable.utils.numerics import denormals_flushed

METRICS = [
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logratio/chosen",
    "logratio/rejected",
    "nll",
    "lr",
]
COLLAPSE_NATS = -10.0  # mean chosen log-ratio below this: warn that generation is likely degrading


@dataclass
class PolicyTrainConfig:
    """How NP-DPO / BTL-DPO is trained."""

    max_steps: int = option(
        300,
        "optimizer steps; a resumed run may raise it: the learning-rate schedule keeps the length of the run "
        "that started it and the extra steps run at its final rate",
    )
    users_per_batch: int = option(4, "users (tasks) per step over all processes")
    targets_per_user: int = option(2, "target pairs per user per step (each costs two sequences)")
    min_context: int = option(0, "smallest N^C while training")
    max_context: int = option(8, "largest N^C while training")
    learning_rate: float = option(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(20, "linear warm-up steps, then cosine decay to 10% of the peak")
    beta: float = option(0.05, "DPO β (paper: 0.05)")
    nll_weight: float = option(1.0, "weight of the chosen responses' per-token NLL (0: plain DPO)")
    grad_accum: int = option(1, "gradient accumulation steps per optimizer step")
    max_length: int = option(256, "tokens per prompt + response")
    max_prompt_length: int = option(128, "tokens per prompt (cut from the left)")
    max_response_length: int | None = option(
        None, "tokens per response (cut from the right; a cut response has no end token); none: what fits"
    )
    device: str = option(
        "auto",
        "auto (a GPU when there is one), cpu or cuda (under a launcher: each process's GPU)",
        choices=list(DEVICES),
    )
    mixed_precision: str = option(
        "auto",
        "auto (bf16 on GPUs that support it) | no | bf16 (also on CPUs) | fp16 (GPUs)",
        choices=list(PRECISIONS),
    )
    disable_dropout: bool = option(
        True, "turn the LM's dropout off (as TRL does), so that a fresh policy equals its reference"
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    cache_reference: bool = option(
        True, "compute each pair's reference log-probabilities once and keep them (π_ref never changes)"
    )
    cache_prefix: bool = option(
        True,
        "with blocks last:K, compute the frozen first blocks' hidden states once per sequence and keep them "
        "on disk (the step then runs the last K blocks only)",
    )
    cache_dir: str | None = option(None, "cache root (default: $STEERABLE_CACHE or ~/.cache/steerable)")
    init_encoder: str | None = option(
        None,
        "an NP-BTL folder trained on the same embeddings: its set encoder and input standardisation start "
        "the context encoder (it already tells users apart; the hypernetwork learns what to do with z)",
    )
    freeze_encoder: bool = option(False, "keep the context encoder as it starts (with --init-encoder)")
    mirror_users: bool = option(
        False,
        "NP-DPO: each step also trains every task's mirror user, the same context and target pairs with "
        "their labels swapped. Valid only when each pair's two answers are preferred by two user types of "
        "equal share (the npdpo-real and npdpo-hh users, whose pairs all conflict): the mirror is then a "
        "user of the other type. Doubles the sequences per step",
    )
    validate_every: int = option(
        0,
        "steps between scoring the validation users (needs validation data); the policy saved is then the "
        "best-scoring step, not the last (0: the last)",
    )
    val_context: int | None = option(None, "N^C of the validation tasks (default: max_context)")
    val_tasks: int = option(64, "validation tasks (users cycle)")
    val_targets: int = option(4, "target pairs scored per validation task")
    save_every: int = option(50, "steps between resumable checkpoints")
    log_every: int = option(10, "steps between metrics.csv rows (each the mean over those steps)")
    seed: int = option(0, "seed of the task sampler, LoRA init and dropout")

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.users_per_batch < 1 or self.targets_per_user < 1:
            raise ConfigError("max_steps, users_per_batch and targets_per_user must be >= 1")
        if not 0 <= self.min_context <= self.max_context:
            raise ConfigError(
                f"need 0 <= min_context <= max_context, got {self.min_context}, {self.max_context}"
            )
        if self.beta <= 0 or self.nll_weight < 0:
            raise ConfigError("beta must be > 0 and nll_weight >= 0")
        if self.validate_every < 0 or self.val_tasks < 1 or self.val_targets < 1:
            raise ConfigError("validate_every must be >= 0, val_tasks and val_targets >= 1")
        if self.val_context is not None and self.val_context < 0:
            raise ConfigError(f"val_context must be >= 0, got {self.val_context}")


def learning_rate_at(step: int, config: PolicyTrainConfig, horizon: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``horizon`` steps (default ``max_steps``);
    constant at 10% after it."""
    horizon = config.max_steps if horizon is None else horizon
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, horizon - config.warmup_steps))
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Trainable:
    """What a checkpoint stores of a policy: its trained weights only, and (with checkpoint selection) the
    best step's weights under ``best.``."""

    BEST = "best."

    def __init__(self, policy: ConditionalPolicy, selector: CheckpointSelector | None = None) -> None:
        self.policy, self.selector = policy, selector
        self.loaded_best: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        best = self.selector.tensors() if self.selector is not None else {}
        return {**self.policy.trainable_state_dict(), **{self.BEST + k: v for k, v in best.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = len(self.BEST)
        self.loaded_best = {k[n:]: v for k, v in state.items() if k.startswith(self.BEST)}
        self.policy.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith(self.BEST)})


def step_terms(
    policy: Any,
    unwrapped: ConditionalPolicy,
    batch: PairBatch,
    context: tuple | None,
    reference: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, torch.Tensor]:
    """Policy and reference log-probabilities of one :class:`PairBatch` (``policy`` may be wrapped by
    accelerate; ``unwrapped`` is the module itself). ``reference`` (2·pairs,) = log π_ref of the batch's
    rows when already known (:class:`~steerable.policy.sequences.SequenceStore`); computed here, inside
    ``autocast`` like the policy, otherwise. ``prefix`` (2·pairs, T, H): cached prefix hidden states."""
    if reference is None:
        with autocast():
            reference = unwrapped.reference_log_probs(
                batch.input_ids, batch.attention_mask, batch.response_mask, prefix_hidden=prefix
            )
    users = torch.arange(len(batch.rows_per_user), device=batch.input_ids.device)
    row_user = users.repeat_interleave(batch.rows_per_user).repeat(2)  # chosen half, rejected half
    logps, lengths = policy(
        batch.input_ids, batch.attention_mask, batch.response_mask, context, row_user, prefix
    )
    n = batch.num_pairs
    return {
        "policy_chosen": logps[:n],
        "policy_rejected": logps[n:],
        "reference_chosen": reference[:n],
        "reference_rejected": reference[n:],
        "chosen_tokens": lengths[:n],
        "rejected_tokens": lengths[n:],
    }


def mirror_context(context: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Context of B users (chosen, rejected (B, N, D), mask (B, N)) → of 2B: the users, then their mirrors
    (every context pair's labels swapped)."""
    chosen, rejected, mask = context
    return torch.cat([chosen, rejected]), torch.cat([rejected, chosen]), torch.cat([mask, mask])


def mirror_terms(terms: dict[str, torch.Tensor], real: int) -> dict[str, torch.Tensor]:
    """:func:`step_terms` of a batch whose pairs after the first ``real`` are the mirror users' (the same
    pairs, labels swapped): swap chosen and rejected there, so every term is of the mirror user's choice."""
    swapped = {}
    for chosen_key, rejected_key in (
        ("policy_chosen", "policy_rejected"),
        ("reference_chosen", "reference_rejected"),
        ("chosen_tokens", "rejected_tokens"),
    ):
        chosen, rejected = terms[chosen_key], terms[rejected_key]
        swapped[chosen_key] = torch.cat([chosen[:real], rejected[real:]])
        swapped[rejected_key] = torch.cat([rejected[:real], chosen[real:]])
    return swapped


def disable_dropout(module: torch.nn.Module) -> None:
    """Set every dropout probability of ``module`` to 0 (``nn.Dropout`` layers, the float ``dropout`` of
    ``nn.MultiheadAttention`` (the context encoder's) and the float ``attention_dropout`` that Hugging Face
    attention modules pass to their kernels)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


@denormals_flushed()  # bf16 autocast on a CPU ran ~6x slower on subnormal floats
def train_policy(
    policy: ConditionalPolicy,
    tokens: TokenizedPairs,
    embedded: PreferenceData,
    config: PolicyTrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    description: dict[str, Any] | None = None,
    label: str | None = None,
    validation: tuple[TokenizedPairs, PreferenceData] | None = None,
) -> dict[str, Any]:
    """Train ``policy`` on the users of ``embedded`` (pair i of ``tokens`` is pair i of ``embedded``).

    Saves ``policy.safetensors`` + ``policy_config.json`` + ``metrics.csv`` + ``train_config.json`` in
    ``out_dir`` (main process only) and resumes from ``out_dir/checkpoint`` when present. Returns the final
    metrics and timings. ``label`` names the progress bar (default: np-dpo or btl-dpo). With
    ``config.validate_every``, ``validation`` (held-out users' pairs, as ``tokens`` and ``embedded``) picks
    the step whose weights are saved (:mod:`~steerable.policy.selection`; one process only)."""
    from tqdm.auto import tqdm

    config = config or PolicyTrainConfig()
    if len(tokens.chosen) != embedded.num_pairs:
        raise ConfigError(f"{len(tokens.chosen)} tokenized pairs but {embedded.num_pairs} embedded pairs")
    out = Path(out_dir) if out_dir is not None else None
    policy.config.max_length, policy.config.max_prompt_length = config.max_length, config.max_prompt_length
    policy.config.max_response_length = config.max_response_length or 0
    accelerator = make_accelerator(config.device, config.mixed_precision, config.grad_accum)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if config.users_per_batch % world:
        raise ConfigError(
            f"users_per_batch ({config.users_per_batch}) is per step over all processes: it must be "
            f"divisible by the number of processes ({world})"
        )
    if config.mirror_users and policy.hooks is None:
        raise ConfigError(
            "mirror_users trains users with swapped labels: it needs NP-DPO (a context encoder)"
        )
    if config.validate_every and validation is None:
        raise ConfigError("validate_every needs validation users' pairs (train-policy: --val-data)")
    if config.validate_every and world > 1:
        raise ConfigError(
            f"checkpoint selection on validation users (validate_every) runs in one process, not {world}: "
            "set it to 0 under a launcher"
        )
    sampler = TaskSampler(
        embedded,
        min_context=config.min_context,
        max_context=config.max_context,
        num_targets=config.max_context + config.targets_per_user,
        batch_size=config.users_per_batch // world,
        seed=rank_seed(config.seed * 1000, rank),
        context_seed=None if world == 1 else config.seed * 1000 + 2,  # every process: the same N^C
    )
    if policy.hooks is not None and not out_has_checkpoint(out):
        if config.init_encoder:
            policy.init_encoder_from(config.init_encoder)
        else:
            policy.fit_standardization(torch.from_numpy(np.concatenate([embedded.chosen, embedded.rejected])))
    if config.freeze_encoder and policy.hooks is not None:
        policy.encoder.requires_grad_(False)
    if config.disable_dropout:
        disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.to(device).train()
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters (CPU: 2.6x faster here)
    )
    run = {
        "num_processes": world,
        "mixed_precision": accelerator.mixed_precision,
        "train": config_to_dict(config),
        "policy": policy.config.to_json(),
        "data": {"fingerprint": data_fingerprint(tokens, embedded)},
        # what the encoder starts from, by content: a moved or copied NP-BTL folder still resumes
        "init_encoder_weights": (
            folder_fingerprint(Path(config.init_encoder), ("config.json", "model.safetensors"))
            if config.init_encoder
            else None
        ),
        **(description or {}),
    }

    start, horizon = 0, config.max_steps
    selected: tuple[dict[str, Any] | None, dict[str, torch.Tensor]] = (None, {})
    earlier_seconds: float | None = 0.0  # None: spent by a version that did not record it
    # torch's generator drives whatever dropout is left on (disable_dropout=False): same seed, same run;
    # a resumed run restores the state it had instead
    torch.manual_seed(rank_seed(config.seed, rank))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        trainable = _Trainable(policy)
        restored = load_checkpoint(out / "checkpoint", trainable, optimizer)
        if restored is not None:
            meta, rng = restored
            changed = _changed_settings(meta["run"], run)
            if changed:
                raise ConfigError(
                    f"{out} holds a run with other settings ({', '.join(changed[:4])}); pass --overwrite "
                    "or choose another --out"
                )
            start = meta["step"]
            horizon = meta.get("schedule_steps", meta["run"]["train"]["max_steps"])
            earlier_seconds = meta.get("train_seconds") if start else 0.0  # by the runs before this one
            restore_rng_states(rng, accelerator, sampler, device)
            selected = (meta.get("selection"), trainable.loaded_best)
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    log = MetricsLog(out if main else None, start, METRICS)
    pad = policy.tokenizer.pad_token_id if policy.tokenizer is not None else None
    pad_id = (
        pad if pad is not None else (policy.tokenizer.eos_token_id if policy.tokenizer is not None else 0)
    )
    prefix_cache = None
    if config.cache_prefix and policy.prefix_blocks > 0:
        prefix_cache = prefix_cache_for(policy, accelerator.mixed_precision, config.cache_dir)
    store = SequenceStore(policy, tokens, pad_id, accelerator.autocast, prefix_cache)
    timings: dict[str, float] = {}
    if prefix_cache is not None:
        clock = time.perf_counter()
        computed = store.fill(range(len(tokens.chosen)), progress=progress and main, rank=rank, world=world)
        accelerator.wait_for_everyone()
        prefix_cache.refresh()
        timings["prefix_cache_s"] = time.perf_counter() - clock
        timings["prefix_sequences_computed"] = computed
    selector = None
    if config.validate_every and validation is not None:
        context = config.max_context if config.val_context is None else config.val_context
        selector = CheckpointSelector(
            policy,
            *validation,
            context=context if policy.hooks is not None else 0,
            num_tasks=config.val_tasks,
            targets=config.val_targets,
            beta=config.beta,
            seed=config.seed * 1000 + 3,
            autocast=accelerator.autocast,
            prefix_cache=prefix_cache,
        )
        clock = time.perf_counter()
        timings["validation_sequences_computed"] = selector.prepare(progress and main)
        timings["validation_prefix_s"] = time.perf_counter() - clock
        selector.restore(*selected)
        policy.train()
    warned = False
    window: dict[str, float] = {}
    window_steps = 0
    started = time.perf_counter()

    def over_every_run(this_run: float) -> float | None:
        """Training time of this checkpoint over every run (None: an earlier one did not record it)."""
        return None if earlier_seconds is None else earlier_seconds + this_run

    bar = tqdm(
        total=config.max_steps,
        initial=start,
        desc=label or ("np-dpo" if policy.hooks is not None else "btl-dpo"),
        disable=not progress or not main,
    )
    step = start
    while step < config.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config, horizon)
        sums: dict[str, float] = {}
        for _ in range(config.grad_accum):
            with accelerator.accumulate(wrapped):
                task = sampler.sample()
                nc = task.num_context
                index = task.pair_index[:, nc : nc + config.targets_per_user]
                rows = [[int(i) for i in r if i >= 0] for r in index]
                keep = [k for k, r in enumerate(rows) if r]
                rows = [rows[k] for k in keep]
                context = None
                if policy.hooks is not None:
                    keep_t = torch.tensor(keep)
                    context = (
                        task.context_chosen[keep_t].to(device),
                        task.context_rejected[keep_t].to(device),
                        task.context_mask[keep_t].to(device),
                    )
                if config.mirror_users:
                    mirrored = sum(len(r) for r in rows)  # pairs of the real users; the mirrors' follow
                    rows, context = rows + rows, mirror_context(context)
                flat = [i for r in rows for i in r]
                batch = pair_batch(tokens, rows, pad_id, device)
                known = config.cache_reference or store.uses_prefix
                reference = store.reference(flat) if known else None
                prefix = store.prefix(flat, batch.input_ids.shape[1])
                terms = step_terms(wrapped, policy, batch, context, reference, prefix, accelerator.autocast)
                if config.mirror_users:
                    terms = mirror_terms(terms, mirrored)
                loss = dpo_loss(
                    terms["policy_chosen"],
                    terms["policy_rejected"],
                    terms["reference_chosen"],
                    terms["reference_rejected"],
                    config.beta,
                    chosen_nll=-terms["policy_chosen"],  # each chosen response's summed NLL
                    chosen_tokens=terms["chosen_tokens"],
                    nll_weight=config.nll_weight,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                policy.modulate(None)
                for key, value in _metrics(terms, loss, config.beta).items():
                    sums[key] = sums.get(key, 0.0) + value / config.grad_accum
        if world > 1:  # the mean over every process's batch
            names = sorted(sums)
            mean = accelerator.reduce(torch.tensor([sums[k] for k in names], device=device), "mean")
            sums = dict(zip(names, mean.tolist(), strict=True))
        step += 1
        bar.update(1)
        for key, value in sums.items():  # the logged row is the mean over the steps since the last one
            window[key] = window.get(key, 0.0) + value
        window_steps += 1
        bar.set_postfix(
            acc=f"{sums['rewards/accuracies']:.2f}",
            lr_chosen=f"{sums['logratio/chosen']:+.1f}",
            lr_rejected=f"{sums['logratio/rejected']:+.1f}",
        )
        if sums["logratio/chosen"] < COLLAPSE_NATS and not warned and main:
            warned = True
            bar.write(
                f"warning: step {step}: the chosen responses' log-ratio is "
                f"{sums['logratio/chosen']:.1f} nats "
                "(they are becoming unlikely; generation may degrade): raise nll_weight or lower the "
                "learning rate"
            )
        if step % config.log_every == 0 or step == config.max_steps:
            mean = {key: value / window_steps for key, value in window.items()}
            log.log({"step": step, **mean, "lr": learning_rate_at(step - 1, config, horizon)})
            window, window_steps = {}, 0
        if selector is not None and (step % config.validate_every == 0 or step == config.max_steps):
            clock = time.perf_counter()
            best = selector.validate(step)
            timings["validation_s"] = timings.get("validation_s", 0.0) + time.perf_counter() - clock
            kept = "best so far" if best else f"best {selector.best_accuracy:.3f} at {selector.best_step}"
            bar.write(f"step {step}: validation accuracy {selector.history[-1]['accuracy']:.3f} ({kept})")
        if out is not None and (step % config.save_every == 0 or step == config.max_steps):
            rng = gather_rng_states(accelerator, rng_states(sampler.get_state(), device))
            if main:
                state = {
                    "step": step,
                    "run": run,
                    "schedule_steps": horizon,
                    "train_seconds": over_every_run(time.perf_counter() - started),
                }
                if selector is not None:
                    state["selection"] = selector.state()
                save_checkpoint(out / "checkpoint", _Trainable(policy, selector), optimizer, rng, state)
            accelerator.wait_for_everyone()
    bar.close()
    log.close()
    policy.eval()
    seconds = time.perf_counter() - started
    selection = selector.state() if selector is not None else None
    if selector is not None and selector.best_state is not None:
        policy.load_trainable_state_dict(selector.best_state)  # the checkpoint keeps the last step's
    if out is not None and main:
        policy.save_pretrained(out)
        write_json_atomic(out / "train_config.json", {**run, "selection": selection} if selection else run)
    accelerator.wait_for_everyone()
    timings["train_s"] = seconds
    final, final_steps = log.last()
    return {
        "steps": step,
        "resumed_from": start,
        "seconds": seconds,  # this run
        "total_seconds": over_every_run(seconds),
        "final": final,  # the last metrics.csv row: the mean over final_steps, in a fresh or resumed run
        "final_steps": final_steps,  # (first, last) step of that row
        "timings": timings,
        "num_processes": world,
        "selection": selection,  # None, or {"history", "best_step", "best_accuracy"}
    }


RESUMABLE_CHANGES = ("max_steps", "save_every", "log_every", "device", "cache_dir")  # may differ on resume


def describe_final(summary: dict[str, Any]) -> str:
    """``steps 141–150: acc 0.92, log-ratio chosen +15.58 / rejected -14.86`` from ``train_policy``'s
    summary (the last logged row, the same whether the run finished now or earlier)."""
    final, (first, last) = summary["final"], summary["final_steps"]
    steps = f"step {last}" if first == last else f"steps {first}–{last}"
    nan = float("nan")
    return (
        f"{steps}: acc {final.get('rewards/accuracies', nan):.2f}, log-ratio chosen "
        f"{final.get('logratio/chosen', nan):+.2f} / rejected {final.get('logratio/rejected', nan):+.2f}"
    )


def data_fingerprint(tokens: TokenizedPairs, embedded: PreferenceData) -> str:
    """``<pairs>:<sha256 prefix>`` of the token ids and the context embeddings."""
    import hashlib

    digest = hashlib.sha256(embedded.fingerprint().encode())
    for seqs in (tokens.prompt, tokens.chosen, tokens.rejected):
        for ids in seqs:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    return f"{len(tokens.chosen)}:{digest.hexdigest()[:16]}"


def _changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpointed run and this one (``policy.*``, ``train.*``, the data
    and the number of processes)."""
    # read as a saved policy_config.json is: a setting added since had its default then
    saved_policy = PolicyConfig.from_json(saved["policy"]).to_json()
    changed = [f"policy.{k}" for k in current["policy"] if saved_policy.get(k) != current["policy"][k]]
    saved_train = {**config_to_dict(PolicyTrainConfig()), **saved["train"]}
    changed += [
        f"train.{k}"
        for k in current["train"]
        if k not in RESUMABLE_CHANGES and saved_train.get(k) != current["train"][k]
    ]
    before, now = saved.get("init_encoder_weights"), current.get("init_encoder_weights")
    if before is not None and now is not None:  # the NP-BTL by content, wherever its folder is now
        changed = [c for c in changed if c != "train.init_encoder"]
        if before != now:
            changed.append("train.init_encoder (the NP-BTL's weights)")
    if saved.get("num_processes", 1) != current["num_processes"]:
        changed.append(f"num_processes ({saved.get('num_processes', 1)} -> {current['num_processes']})")
    old_data = saved.get("data", {}).get("fingerprint")
    if old_data is not None and old_data != current["data"]["fingerprint"]:
        changed.append("the training data")
    return changed


def out_has_checkpoint(out: Path | None) -> bool:
    return out is not None and (out / "checkpoint").exists()


def _metrics(terms: dict[str, torch.Tensor], loss: torch.Tensor, beta: float) -> dict[str, float]:
    with torch.no_grad():
        rc = implicit_reward(terms["policy_chosen"], terms["reference_chosen"], beta)
        rr = implicit_reward(terms["policy_rejected"], terms["reference_rejected"], beta)
        return {
            "loss": float(loss),
            "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()),
            "logps/chosen": float(terms["policy_chosen"].mean()),
            "logps/rejected": float(terms["policy_rejected"].mean()),
            "logratio/chosen": float((terms["policy_chosen"] - terms["reference_chosen"]).mean()),
            "logratio/rejected": float((terms["policy_rejected"] - terms["reference_rejected"]).mean()),
            "nll": float(-terms["policy_chosen"].sum() / terms["chosen_tokens"].sum().clamp(min=1)),
        }
