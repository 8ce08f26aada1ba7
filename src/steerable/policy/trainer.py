"""Training NP-DPO (and BTL-DPO) through accelerate: one process on CPU, DDP/FSDP/DeepSpeed under
``accelerate launch`` with no code change.

One step: B users are drawn as NP tasks (:class:`~steerable.data.sampler.TaskSampler`; N^C ~
Uniform{min..max} context pairs per user), each user's next ``targets_per_user`` pairs are the targets
(D^T \\ D^C). z is encoded from the context embeddings, FiLM is set per row, and the conditional DPO
loss (:func:`steerable.objectives.dpo_loss`, β = 0.05 by default) plus ``nll_weight`` × the chosen
responses' NLL per token is minimised over LoRA, encoder and hypernetwork. The reference
log-probabilities come from the same model with adapters and FiLM off.

Metrics use TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``) plus the log-ratios log π/π_ref of the
chosen and rejected responses (``logratio/chosen``, ``logratio/rejected``, in nats): a chosen log-ratio
sinking far below zero while accuracy is perfect is the sign that generation is degrading; the
trainer warns when it happens. Checkpoints hold only the trained weights and are resumed automatically.
"""

from __future__ import annotations

import math
import time
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
from steerable.policy.model import ConditionalPolicy
from steerable.policy.tokens import PairBatch, ReferenceLogProbs, TokenizedPairs, pair_batch
from steerable.training import MetricsLog
from steerable.utils.config import config_to_dict, option

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

    max_steps: int = option(300, "optimizer steps")
    users_per_batch: int = option(4, "users (tasks) per step")
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
    mixed_precision: str = option(
        "auto",
        "auto (bf16 on GPUs that support it) | no | bf16 | fp16",
        choices=["auto", "no", "bf16", "fp16"],
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    cache_reference: bool = option(
        True, "compute each pair's reference log-probabilities once and keep them (π_ref never changes)"
    )
    save_every: int = option(50, "steps between resumable checkpoints")
    log_every: int = option(10, "steps between metrics.csv rows")
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


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def learning_rate_at(step: int, config: PolicyTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``max_steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Trainable:
    """What a checkpoint stores of a policy: its trained weights only."""

    def __init__(self, policy: ConditionalPolicy) -> None:
        self.policy = policy

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.policy.trainable_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.policy.load_trainable_state_dict(state)


def step_terms(
    policy: Any,
    unwrapped: ConditionalPolicy,
    batch: PairBatch,
    context: tuple | None,
    reference: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Policy and reference log-probabilities of one :class:`PairBatch` (``policy`` may be wrapped by
    accelerate; ``unwrapped`` is the module itself). ``reference`` (2·pairs,) = log π_ref of the batch's
    rows when already known (:class:`ReferenceLogProbs`); computed here otherwise."""
    if reference is None:
        reference = unwrapped.reference_log_probs(batch.input_ids, batch.attention_mask, batch.response_mask)
    users = torch.arange(len(batch.rows_per_user), device=batch.input_ids.device)
    row_user = users.repeat_interleave(batch.rows_per_user).repeat(2)  # chosen half, rejected half
    logps, lengths = policy(batch.input_ids, batch.attention_mask, batch.response_mask, context, row_user)
    n = batch.num_pairs
    return {
        "policy_chosen": logps[:n],
        "policy_rejected": logps[n:],
        "reference_chosen": reference[:n],
        "reference_rejected": reference[n:],
        "chosen_nll": -logps[:n],  # summed over each chosen response's tokens
        "chosen_tokens": lengths[:n],
    }


def train_policy(
    policy: ConditionalPolicy,
    tokens: TokenizedPairs,
    embedded: PreferenceData,
    config: PolicyTrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``policy`` on the users of ``embedded`` (pair i of ``tokens`` is pair i of ``embedded``).

    Saves ``policy.safetensors`` + ``policy_config.json`` + ``metrics.csv`` in ``out_dir`` and resumes
    from ``out_dir/checkpoint`` when present. Returns the final metrics and timings."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config = config or PolicyTrainConfig()
    if len(tokens.chosen) != embedded.num_pairs:
        raise ConfigError(f"{len(tokens.chosen)} tokenized pairs but {embedded.num_pairs} embedded pairs")
    out = Path(out_dir) if out_dir is not None else None
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=_mixed_precision(config.mixed_precision),
    )
    device = accelerator.device
    sampler = TaskSampler(
        embedded,
        min_context=config.min_context,
        max_context=config.max_context,
        num_targets=config.max_context + config.targets_per_user,
        batch_size=config.users_per_batch,
        seed=config.seed * 1000 + accelerator.process_index,
    )
    if policy.hooks is not None and not out_has_checkpoint(out):
        policy.fit_standardization(torch.from_numpy(np.concatenate([embedded.chosen, embedded.rejected])))
    if config.gradient_checkpointing:
        policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.to(device).train()
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    run = {"train": config_to_dict(config), "policy": policy.config.to_json(), **(description or {})}

    start = 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        restored = load_checkpoint(out / "checkpoint", _Trainable(policy), optimizer)
        if restored is not None:
            meta, rng = restored
            changed = _changed_settings(meta["run"], run)
            if changed:
                raise ConfigError(
                    f"{out} holds a run with other settings ({', '.join(changed[:4])}); pass --overwrite "
                    "or choose another --out"
                )
            start = meta["step"]
            sampler.generator.set_state(rng["sampler"])
            torch.set_rng_state(rng["torch"])
    wrapped, optimizer = accelerator.prepare(policy, optimizer)
    log = MetricsLog(out if accelerator.is_main_process else None, start, METRICS)
    pad = policy.tokenizer.pad_token_id if policy.tokenizer is not None else None
    pad_id = (
        pad if pad is not None else (policy.tokenizer.eos_token_id if policy.tokenizer is not None else 0)
    )
    reference_cache = ReferenceLogProbs(policy, tokens, pad_id) if config.cache_reference else None
    warned = False
    totals: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(
        total=config.max_steps,
        initial=start,
        desc="np-dpo" if policy.hooks is not None else "btl-dpo",
        disable=not progress or not accelerator.is_main_process,
    )
    step = start
    while step < config.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        sums: dict[str, float] = {}
        for _ in range(config.grad_accum):
            with accelerator.accumulate(wrapped):
                task = sampler.sample()
                nc = task.num_context
                index = task.pair_index[:, nc : nc + config.targets_per_user]
                rows = [[int(i) for i in r if i >= 0] for r in index]
                keep = [k for k, r in enumerate(rows) if r]
                rows = [rows[k] for k in keep]
                batch = pair_batch(tokens, rows, pad_id, device)
                context = None
                if policy.hooks is not None:
                    keep_t = torch.tensor(keep)
                    context = (
                        task.context_chosen[keep_t].to(device),
                        task.context_rejected[keep_t].to(device),
                        task.context_mask[keep_t].to(device),
                    )
                reference = reference_cache([i for r in rows for i in r]) if reference_cache else None
                terms = step_terms(wrapped, policy, batch, context, reference)
                loss = dpo_loss(
                    terms["policy_chosen"],
                    terms["policy_rejected"],
                    terms["reference_chosen"],
                    terms["reference_rejected"],
                    config.beta,
                    chosen_nll=terms["chosen_nll"],
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
        step += 1
        bar.update(1)
        for key, value in sums.items():
            totals[key] = value
        bar.set_postfix(
            acc=f"{sums['rewards/accuracies']:.2f}",
            lr_chosen=f"{sums['logratio/chosen']:+.1f}",
            lr_rejected=f"{sums['logratio/rejected']:+.1f}",
        )
        if sums["logratio/chosen"] < COLLAPSE_NATS and not warned and accelerator.is_main_process:
            warned = True
            bar.write(
                f"warning: step {step}: the chosen responses' log-ratio is "
                f"{sums['logratio/chosen']:.1f} nats "
                "(they are becoming unlikely; generation may degrade): raise nll_weight or lower the "
                "learning rate"
            )
        if step % config.log_every == 0 or step == config.max_steps:
            log.log({"step": step, **sums, "lr": learning_rate_at(step - 1, config)})
        if (
            out is not None
            and accelerator.is_main_process
            and (step % config.save_every == 0 or step == config.max_steps)
        ):
            rng = {"sampler": sampler.generator.get_state(), "torch": torch.get_rng_state()}
            save_checkpoint(
                out / "checkpoint", _Trainable(policy), optimizer, rng, {"step": step, "run": run}
            )
    bar.close()
    log.close()
    policy.eval()
    seconds = time.perf_counter() - started
    if out is not None and accelerator.is_main_process:
        from steerable.utils.files import write_json_atomic

        policy.save_pretrained(out)
        write_json_atomic(out / "train_config.json", run)
    return {"steps": step, "resumed_from": start, "seconds": seconds, "final": totals}


RESUMABLE_CHANGES = ("max_steps", "save_every", "log_every")  # may differ between a run and its resumption


def _changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpointed run and this one (``policy.*`` and ``train.*``)."""
    changed = [f"policy.{k}" for k in current["policy"] if saved["policy"].get(k) != current["policy"][k]]
    changed += [
        f"train.{k}"
        for k in current["train"]
        if k not in RESUMABLE_CHANGES and saved["train"].get(k) != current["train"][k]
    ]
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
            "nll": float(terms["chosen_nll"].sum() / terms["chosen_tokens"].sum().clamp(min=1)),
        }
