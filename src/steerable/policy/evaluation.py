"""Implicit-reward accuracy of a (conditional) policy on held-out users, and the label-swap test.

For a task (one user, N^C context pairs, targets = the user's other pairs), the policy prefers y_c over
y_r when β·log π(y_c | x, D^C)/π_ref(y_c | x) > β·log π(y_r | x, D^C)/π_ref(y_r | x) (eq. 8); a tie counts
½, as for reward models (:func:`~steerable.objectives.prediction_hits`). Only targets outside the context
are scored (and, with ``scored``, only the pairs it marks, e.g. the conflicting ones). Standard errors are
clustered by user (:func:`~steerable.evaluation.clustered_stderr`): evaluation tasks reuse users. Reference
log-probabilities do not depend on the user and are computed once per pair, in the same autocast context
as the policy (``autocast``); with a prefix cache, both run from the frozen blocks' cached hidden states.

The type probe asks the same question of z alone: can a linear read-out tell the user types apart
from z (users held out)? A high probe with a low accuracy puts the gap in the policy, not the encoder.

Label swap: the same tasks with every context pair's chosen and rejected exchanged; the flip rate is the
share of scored targets whose predicted winner changes. A policy that ignores its context flips none.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from steerable.data.sampler import TaskBatch, TaskSampler
from steerable.data.schema import PreferenceData
from steerable.evaluation import clustered_stderr, type_probe_accuracy
from steerable.objectives import implicit_reward, prediction_hits
from steerable.policy.model import ConditionalPolicy
from steerable.policy.sequences import Autocast, PrefixCache, SequenceStore
from steerable.policy.tokens import TokenizedPairs, pair_batch
from steerable.utils.numerics import denormals_flushed


@dataclass
class TargetMargins:
    """Implicit-reward margins r(y_c) − r(y_r) of every scored target of a set of tasks."""

    margin: np.ndarray  # (M,)
    mode: np.ndarray  # (M,) hidden mode of the task's user, -1 unknown
    task: np.ndarray  # (M,) task number
    user: np.ndarray  # (M,) the task's user (position in ``data.users``): the unit of the standard error
    pair: np.ndarray  # (M,) the scored pair's row in the data

    def select(self, keep: np.ndarray) -> TargetMargins:
        return TargetMargins(*(getattr(self, f)[keep] for f in ("margin", "mode", "task", "user", "pair")))

    def accuracy(self) -> float:
        return float(np.mean(prediction_hits(self.margin))) if len(self.margin) else float("nan")


def clustered_share(
    values: np.ndarray, users: np.ndarray, prompts: np.ndarray | None = None
) -> dict[str, float]:
    """Mean of per-target values in [0, 1] (M,) (hits, flips) with its standard error clustered by user
    (M,) and, with ``prompts`` (M,) (−1: a cluster of its own), by prompt:
    {"share", "stderr", "stderr_by_prompt" (only with prompts), "num_scored"}."""
    values = np.asarray(values, np.float64)
    ones = np.ones_like(values)
    out = {
        "share": float(values.mean()) if len(values) else float("nan"),
        "stderr": clustered_stderr(values, ones, users),
        "num_scored": len(values),
    }
    if prompts is not None:
        out["stderr_by_prompt"] = clustered_stderr(values, ones, prompts)
    return out


class PolicyEvaluator:
    """Scores held-out users' pairs with a policy (see the module docstring)."""

    def __init__(
        self,
        policy: ConditionalPolicy,
        tokens: TokenizedPairs,
        embedded: PreferenceData,
        beta: float = 0.05,
        scored: np.ndarray | None = None,
        max_pairs_per_forward: int = 16,
        autocast: Autocast = nullcontext,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.policy, self.tokens, self.embedded, self.beta = policy.eval(), tokens, embedded, beta
        self.scored = np.ones(embedded.num_pairs, dtype=bool) if scored is None else np.asarray(scored, bool)
        self.max_pairs, self.autocast = max_pairs_per_forward, autocast
        tok = policy.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.store = SequenceStore(policy, tokens, self.pad_id, autocast, prefix_cache, max_pairs_per_forward)
        self.prompt_id = _prompt_ids(embedded)  # (P,) or None: the second unit of the standard errors
        self._margins: dict[tuple[int, bool], tuple[list[TaskBatch], TargetMargins]] = {}

    def tasks(
        self, context_sizes: list[int], num_tasks: int, targets: int, seed: int
    ) -> dict[int, list[TaskBatch]]:
        """Evaluation tasks with common random numbers across N^C (see ``TaskSampler.fixed_tasks``): each
        task holds max(N^C) + ``targets`` pairs, and N^C scores the max(N^C) − N^C + ``targets`` outside
        its context (14 at N^C = 0 and 4 at N^C = 10 for sizes up to 10 and 4 targets)."""
        sampler = TaskSampler(
            self.embedded, 0, max(context_sizes), num_targets=max(context_sizes) + targets, seed=seed
        )
        return sampler.fixed_tasks(context_sizes, num_tasks)

    @torch.no_grad()
    def margins(self, batches: list[TaskBatch], swap_context: bool = False) -> TargetMargins:
        """Margins of the scored targets of every task in ``batches`` (kept: the same list of batches is
        scored once, e.g. by :meth:`accuracy_by_mode` and then :meth:`label_swap_flip_rate`)."""
        key = (id(batches), swap_context)
        if key not in self._margins:
            self._margins[key] = (batches, self.score(batches, swap_context))  # batches kept alive
        return self._margins[key][1]

    def fill_prefixes(self, batches: list[TaskBatch], progress: bool = False) -> int:
        """Compute the cached prefixes of every scored target of ``batches`` that the cache lacks, at once
        (length-sorted into full forwards); returns how many sequences were new."""
        if not self.store.uses_prefix:
            return 0
        targets = {
            int(p) for b in batches for p in b.pair_index[:, b.num_context :].flatten().tolist() if p >= 0
        }
        return self.store.fill(sorted(p for p in targets if self.scored[p]), progress=progress)

    @torch.no_grad()
    @denormals_flushed()
    def score(self, batches: list[TaskBatch], swap_context: bool = False) -> TargetMargins:
        """Margins of the scored targets of every task in ``batches`` by the policy as it is now (not
        kept: :meth:`margins` keeps them)."""
        device = self.policy.device
        self.fill_prefixes(batches)
        out_margin, out_mode, out_task, out_user, out_pair = [], [], [], [], []
        task_offset = 0
        label = "scoring (context labels swapped)" if swap_context else "scoring"
        for batch in tqdm(batches, desc=label, leave=False, disable=None):  # no bar when not a terminal
            nc = batch.num_context
            targets = batch.pair_index[:, nc:]
            rows = [[int(p) for p in r if p >= 0 and self.scored[int(p)]] for r in targets]
            order = [t for t in range(len(rows)) if rows[t]]
            # group tasks so that one forward holds at most max_pairs pairs
            groups, current, size = [], [], 0
            for t in order:
                if current and size + len(rows[t]) > self.max_pairs:
                    groups.append(current)
                    current, size = [], 0
                current.append(t)
                size += len(rows[t])
            if current:
                groups.append(current)
            for group in groups:
                group_rows = [rows[t] for t in group]
                pb = pair_batch(self.tokens, group_rows, self.pad_id, device)
                context = None
                if self.policy.hooks is not None:
                    idx = torch.tensor(group)
                    chosen, rejected = batch.context_chosen[idx], batch.context_rejected[idx]
                    if swap_context:
                        chosen, rejected = rejected, chosen
                    context = (chosen.to(device), rejected.to(device), batch.context_mask[idx].to(device))
                users = torch.arange(len(group), device=device).repeat_interleave(pb.rows_per_user).repeat(2)
                flat = [p for r in group_rows for p in r]
                prefix = self.store.prefix(flat, pb.input_ids.shape[1])
                with self.autocast():
                    logps, _ = self.policy(
                        pb.input_ids, pb.attention_mask, pb.response_mask, context, users, prefix
                    )
                self.policy.modulate(None)
                ref = self.store.reference(flat)  # (2n,) chosen then rejected
                n = len(flat)
                rc = implicit_reward(logps[:n], ref[:n], self.beta)
                rr = implicit_reward(logps[n:], ref[n:], self.beta)
                out_margin.append((rc - rr).float().cpu().numpy())
                out_pair.append(np.asarray(flat, dtype=np.int64))
                for t, r in zip(group, group_rows, strict=True):
                    out_mode.append(np.full(len(r), int(batch.hidden_mode[t])))
                    out_task.append(np.full(len(r), task_offset + t))
                    out_user.append(np.full(len(r), int(batch.user_index[t])))
            task_offset += len(rows)
        cat = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype)  # noqa: E731
        return TargetMargins(
            cat(out_margin, np.float32),
            cat(out_mode, np.int64),
            cat(out_task, np.int64),
            cat(out_user, np.int64),
            cat(out_pair, np.int64),
        )

    def accuracy_by_mode(
        self, tasks: dict[int, list[TaskBatch]], mode_names: list[str] | None = None
    ) -> dict[str, dict[str, float]]:
        """{mode: {N^C: accuracy}} (plus "all")."""
        table = self.accuracy_table(tasks, mode_names)
        return {mode: {nc: v["accuracy"] for nc, v in row.items()} for mode, row in table.items()}

    def share(self, values: np.ndarray, margins: TargetMargins) -> dict[str, float]:
        """:func:`clustered_share` of per-target ``values`` (M,) of ``margins``' targets: clustered by
        their users, and by their prompts when the data has prompts."""
        prompts = None if self.prompt_id is None else self.prompt_id[margins.pair]
        return clustered_share(values, margins.user, prompts)

    def accuracy_table(
        self, tasks: dict[int, list[TaskBatch]], mode_names: list[str] | None = None
    ) -> dict[str, dict[str, dict[str, float]]]:
        """{mode: {N^C: {"accuracy", "stderr" (clustered by user), "num_scored", "num_users"}}} (plus
        "all"); with the pairs' prompts known, also "stderr_by_prompt" (clustered by prompt) and
        "num_prompts": the users of a split answer the same few prompts, so the prompts are a second
        sample whose luck the user-clustered error leaves out."""
        result: dict[str, dict[str, dict[str, float]]] = {}
        for nc, batches in tasks.items():
            m = self.margins(batches)
            groups = {"all": np.ones(len(m.margin), dtype=bool)}
            for mode in sorted(set(m.mode.tolist())):
                name = mode_names[mode] if mode_names and mode >= 0 else str(mode)
                groups[name] = m.mode == mode
            for name, keep in groups.items():
                part = m.select(keep)
                row = self.share(prediction_hits(part.margin), part)
                row["accuracy"] = row.pop("share")
                row["num_users"] = len(np.unique(part.user))
                if self.prompt_id is not None:
                    prompts = self.prompt_id[part.pair]
                    row["num_prompts"] = len(np.unique(prompts[prompts >= 0]))
                result.setdefault(name, {})[str(nc)] = row
        return dict(sorted(result.items(), key=lambda kv: kv[0] != "all"))

    @torch.no_grad()
    def type_probe(self, tasks: dict[int, list[TaskBatch]]) -> dict[str, float]:
        """{N^C: how well z identifies the user's type} for N^C > 0 (:func:`type_probe_accuracy` on the
        tasks' z, users held out): whether the context encoder tells the types apart, separately from
        whether the policy acts on it. Empty for an unconditional policy."""
        if self.policy.hooks is None:
            return {}
        device, out = self.policy.device, {}
        for nc, batches in tasks.items():
            if nc == 0:
                continue
            z, types, users = [], [], []
            for b in batches:
                context = (
                    b.context_chosen.to(device),
                    b.context_rejected.to(device),
                    b.context_mask.to(device),
                )
                z.append(self.policy.encode(*context).float().cpu().numpy())
                types.append(b.hidden_mode.numpy())
                users.append(b.user_index.numpy())
            types_all = np.concatenate(types)
            known = types_all >= 0
            out[str(nc)] = type_probe_accuracy(
                np.concatenate(z)[known], types_all[known], np.concatenate(users)[known]
            )
        return out

    def label_swap(self, batches: list[TaskBatch]) -> dict[str, float]:
        """Share of scored targets whose predicted winner changes when the context's labels are swapped,
        with its standard errors (:func:`clustered_share`: by user, and by prompt when known), and how
        it splits: "flips_from_right", the share whose winner was the user's choice before the swap (and
        is the other answer after it), and "flips_from_wrong", the share whose winner was the other answer
        before. Where every pair conflicts, the swapped context is a user of the other type: the first is
        the share right for both types, the second the share wrong for both, and the targets that do not
        flip get one winner whatever the context says (right for one type, wrong for the other)."""
        plain, swapped = self.margins(batches), self.margins(batches, swap_context=True)
        before, after = prediction_hits(plain.margin), prediction_hits(swapped.margin)
        out = self.share(before != after, plain)
        # a tie (credit ½) on either side counts half, so the two parts sum to the share without ties
        out["flips_from_right"] = self.share(before * (1 - after), plain)["share"]
        out["flips_from_wrong"] = self.share((1 - before) * after, plain)["share"]
        return out

    def label_swap_flip_rate(self, batches: list[TaskBatch]) -> float:
        """The share of :meth:`label_swap` alone."""
        return self.label_swap(batches)["share"]


def _prompt_ids(embedded: PreferenceData) -> np.ndarray | None:
    """Each pair's prompt as an int (P,), −1 for a pair without one (a cluster of its own); None when the
    data has no prompts."""
    if embedded.prompts is None:
        return None
    names = {p: i for i, p in enumerate(sorted({str(p) for p in embedded.prompts if p is not None}))}
    return np.array([-1 if p is None else names[str(p)] for p in embedded.prompts], np.int64)
