"""Task sampling as in the paper (Algorithm 1, appendix C): one task = one user.

For a task, a user with enough pairs is drawn uniformly; N^T of their pairs (or all of them, if fewer)
are drawn without replacement as the targets D^T, and the first N^C of those are the context D^C, so
D^C ⊆ D^T. Training scores all of D^T (the NP convention); metrics score only D^T \\ D^C
(:attr:`TaskBatch.scored_mask`). All tasks of a batch share N^C ~ Uniform{min..max}; users with fewer
than N^T pairs are padded and masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from steerable.data.schema import PreferenceData
from steerable.errors import DataError


@dataclass
class TaskBatch:
    """A batch of B tasks with N^C context pairs and N^T target pairs of D-dimensional options.

    ``context_*`` are views of the first N^C targets when the batch comes from :class:`TaskSampler`.
    """

    context_chosen: torch.Tensor  # (B, Nc, D)
    context_rejected: torch.Tensor  # (B, Nc, D)
    context_mask: torch.Tensor  # (B, Nc) bool: the pair exists
    target_chosen: torch.Tensor  # (B, Nt, D)
    target_rejected: torch.Tensor  # (B, Nt, D)
    target_mask: torch.Tensor  # (B, Nt) bool: the pair exists
    target_in_context: torch.Tensor  # (B, Nt) bool: the pair is also in D^C
    user_index: torch.Tensor  # (B,) long: position of the task's user in ``data.users``
    hidden_mode: torch.Tensor  # (B,) long: the user's hidden mode, -1 when unknown
    pair_index: torch.Tensor | None = None  # (B, Nt) long: each target's row in the data, -1 if padded

    @property
    def scored_mask(self) -> torch.Tensor:
        """(B, Nt) bool: the targets that metrics score, D^T \\ D^C."""
        return self.target_mask & ~self.target_in_context

    @property
    def batch_size(self) -> int:
        return self.target_chosen.shape[0]

    @property
    def num_context(self) -> int:
        return self.context_chosen.shape[1]

    def context_sizes(self) -> torch.Tensor:
        """(B,) long: number of context pairs of each task."""
        return self.context_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> TaskBatch:
        """A copy of the batch on ``device``."""
        return TaskBatch(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            }
        )


def make_task_batch(
    context_chosen: torch.Tensor,
    context_rejected: torch.Tensor,
    target_chosen: torch.Tensor,
    target_rejected: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> TaskBatch:
    """A batch whose context and targets are given separately (targets are all scored)."""
    b, nc = context_chosen.shape[:2]
    nt = target_chosen.shape[1]
    device = target_chosen.device
    return TaskBatch(
        context_chosen=context_chosen,
        context_rejected=context_rejected,
        context_mask=torch.ones(b, nc, dtype=torch.bool, device=device)
        if context_mask is None
        else context_mask,
        target_chosen=target_chosen,
        target_rejected=target_rejected,
        target_mask=torch.ones(b, nt, dtype=torch.bool, device=device)
        if target_mask is None
        else target_mask,
        target_in_context=torch.zeros(b, nt, dtype=torch.bool, device=device),
        user_index=torch.full((b,), -1, dtype=torch.long, device=device),
        hidden_mode=torch.full((b,), -1, dtype=torch.long, device=device),
    )


class TaskSampler:
    """Draws :class:`TaskBatch` es from a :class:`PreferenceData`, reproducibly.

    Args:
        data: the users' preference pairs.
        min_context, max_context: N^C ~ Uniform{min_context..max_context} per batch (paper: 0..10).
        num_targets: N^T, pairs per task including the context (paper: 20).
        batch_size: tasks per batch (paper: 64).
        seed: seeds the sampler's own ``torch.Generator`` (the global RNG is never touched).
        context_seed: when given, N^C is drawn from a generator of its own with this seed, so that
            samplers of several processes (each with its own ``seed``) draw the same N^C at every step;
            by default N^C comes from the main generator.

    A user can serve a task with N^C context pairs only if they have at least N^C + 1 pairs (one pair
    left to score). Raises :class:`DataError` if no user can serve N^C = ``max_context``.
    """

    def __init__(
        self,
        data: PreferenceData,
        min_context: int = 0,
        max_context: int = 10,
        num_targets: int = 20,
        batch_size: int = 64,
        seed: int = 0,
        context_seed: int | None = None,
    ) -> None:
        if not 0 <= min_context <= max_context:
            raise ValueError(f"need 0 <= min_context <= max_context, got {min_context}, {max_context}")
        if num_targets <= max_context:
            raise ValueError(f"num_targets ({num_targets}) must exceed max_context ({max_context})")
        self.data = data
        self.min_context, self.max_context = min_context, max_context
        self.num_targets, self.batch_size = num_targets, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.context_generator = (
            self.generator if context_seed is None else torch.Generator().manual_seed(context_seed)
        )
        self.counts = torch.as_tensor(data.pairs_per_user, dtype=torch.long)
        if int(self.counts.max()) < max_context + 1:
            raise DataError(
                f"no user has enough pairs to form a task: a task with {max_context} context pairs needs "
                f"{max_context + 1} pairs from one user, the most any user has is {int(self.counts.max())} "
                f"({data.num_users} users); lower the maximum context size or add pairs",
                source=data.source,
            )
        self.chosen = torch.from_numpy(np.ascontiguousarray(data.chosen))
        self.rejected = torch.from_numpy(np.ascontiguousarray(data.rejected))
        self.rows = [torch.from_numpy(r) for r in data.rows_by_user]
        modes = data.user_mode
        self.user_modes = (
            torch.full((data.num_users,), -1, dtype=torch.long) if modes is None else torch.from_numpy(modes)
        )
        self._eligible: dict[int, torch.Tensor] = {}

    def eligible_users(self, num_context: int) -> torch.Tensor:
        """(U',) long: users with at least ``num_context + 1`` pairs."""
        if num_context not in self._eligible:
            self._eligible[num_context] = torch.nonzero(self.counts >= num_context + 1).flatten()
        return self._eligible[num_context]

    def sample_context_size(self) -> int:
        """Draw N^C ~ Uniform{min_context..max_context}."""
        draw = torch.randint(self.min_context, self.max_context + 1, (1,), generator=self.context_generator)
        return int(draw)

    def get_state(self) -> dict[str, torch.Tensor]:
        """The generators' states (for checkpoints)."""
        state = {"sampler": self.generator.get_state()}
        if self.context_generator is not self.generator:
            state["sampler_context"] = self.context_generator.get_state()
        return state

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`get_state`."""
        self.generator.set_state(state["sampler"])
        if self.context_generator is not self.generator:
            self.context_generator.set_state(state["sampler_context"])

    def sample(self, num_context: int | None = None, batch_size: int | None = None) -> TaskBatch:
        """One batch of tasks sharing N^C (drawn uniformly if not given)."""
        nc = self.sample_context_size() if num_context is None else num_context
        b = batch_size or self.batch_size
        eligible = self.eligible_users(nc)
        if len(eligible) == 0:
            raise DataError(
                f"no user has the {nc + 1} pairs a task with {nc} context pairs needs",
                source=self.data.source,
            )
        users = eligible[torch.randint(len(eligible), (b,), generator=self.generator)]
        return self._build(users, nc)

    def tasks_for_users(self, users: torch.Tensor, num_context: int) -> TaskBatch:
        """Tasks for the given users (one each), with fresh random target sets."""
        return self._build(users, num_context)

    def _build(self, users: torch.Tensor, nc: int) -> TaskBatch:
        b, nt = len(users), self.num_targets
        index = torch.zeros(b, nt, dtype=torch.long)
        mask = torch.zeros(b, nt, dtype=torch.bool)
        for i, u in enumerate(users.tolist()):
            rows = self.rows[u]
            take = min(len(rows), nt)
            index[i, :take] = rows[torch.randperm(len(rows), generator=self.generator)[:take]]
            mask[i, :take] = True
        chosen, rejected = self.chosen[index], self.rejected[index]  # (B, Nt, D)
        in_context = torch.zeros(b, nt, dtype=torch.bool)
        in_context[:, :nc] = True
        return TaskBatch(
            context_chosen=chosen[:, :nc],
            context_rejected=rejected[:, :nc],
            context_mask=mask[:, :nc],
            target_chosen=chosen,
            target_rejected=rejected,
            target_mask=mask,
            target_in_context=in_context,
            user_index=users,
            hidden_mode=self.user_modes[users],
            pair_index=torch.where(mask, index, -1),
        )

    def __iter__(self) -> Iterator[TaskBatch]:
        while True:
            yield self.sample()

    def fixed_tasks(
        self, context_sizes: list[int], num_tasks: int, batch_size: int = 512
    ) -> dict[int, list[TaskBatch]]:
        """Evaluation tasks: for each N^C, ``num_tasks`` tasks cycling over the eligible users in a
        random order (so every user is used about equally often). Each N^C restarts from the same
        generator state, so sizes that share eligible users share users and target sets (common
        random numbers: differences across N^C are less noisy)."""
        start = self.generator.get_state()
        out: dict[int, list[TaskBatch]] = {}
        for nc in context_sizes:
            self.generator.set_state(start)
            eligible = self.eligible_users(nc)
            if len(eligible) == 0:
                raise DataError(
                    f"no user has the {nc + 1} pairs a task with {nc} context pairs needs",
                    source=self.data.source,
                )
            reps = -(-num_tasks // len(eligible))
            order = torch.cat(
                [eligible[torch.randperm(len(eligible), generator=self.generator)] for _ in range(reps)]
            )[:num_tasks]
            out[nc] = [self._build(chunk, nc) for chunk in order.split(batch_size)]
        return out
