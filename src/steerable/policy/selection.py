"""Checkpoint selection on validation users: the policy a run saves is its best-scoring step, not its last.

How long a policy should train depends on the data: on the ``npdpo-real`` study a fixed step count
under-trained one data split and over-trained the other (README). As the NP-BTL keeps its best step on
the validation loss, the policy trainer scores the policy every ``validate_every`` steps on held-out
users (implicit-reward accuracy of their targets outside a context of ``val_context`` pairs, the mean over
user types so that each type counts equally; :class:`~steerable.policy.evaluation.PolicyEvaluator`) and
keeps a copy of the weights of the best step. The copy travels inside the resumable checkpoint, so a
resumed run keeps the best step of the runs before it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from steerable.data.schema import PreferenceData
from steerable.policy.evaluation import PolicyEvaluator, TargetMargins
from steerable.policy.model import ConditionalPolicy
from steerable.policy.sequences import Autocast, PrefixCache
from steerable.policy.tokens import TokenizedPairs


def balanced_accuracy(margins: TargetMargins) -> float:
    """Implicit-reward accuracy averaged over the users' types (each type counts once; all targets when
    the types are unknown)."""
    modes = sorted(m for m in set(margins.mode.tolist()) if m >= 0)
    if not modes:
        return margins.accuracy()
    return float(np.mean([margins.select(margins.mode == m).accuracy() for m in modes]))


class CheckpointSelector:
    """Scores ``policy`` on fixed validation tasks and keeps the weights of the best-scoring step."""

    def __init__(
        self,
        policy: ConditionalPolicy,
        tokens: TokenizedPairs,
        embedded: PreferenceData,
        *,
        context: int,
        num_tasks: int,
        targets: int,
        beta: float,
        seed: int,
        autocast: Autocast,
        prefix_cache: PrefixCache | None,
    ) -> None:
        self.policy = policy
        self.evaluator = PolicyEvaluator(
            policy, tokens, embedded, beta, autocast=autocast, prefix_cache=prefix_cache
        )
        self.batches = self.evaluator.tasks([context], num_tasks, targets, seed)[context]
        self.history: list[dict[str, float]] = []  # {"step", "accuracy"} per validation
        self.best_step: int | None = None
        self.best_accuracy = -np.inf
        self.best_state: dict[str, torch.Tensor] | None = None

    def prepare(self, progress: bool) -> int:
        """Compute the validation sequences' cached prefixes (once; returns how many were new)."""
        return self.evaluator.fill_prefixes(self.batches, progress)

    def validate(self, step: int) -> bool:
        """Score the policy as it is now; returns whether this step is the best so far (its weights are
        then kept). The policy returns to training mode."""
        self.policy.eval()
        accuracy = balanced_accuracy(self.evaluator.score(self.batches))
        self.policy.train()
        self.history.append({"step": step, "accuracy": accuracy})
        if accuracy <= self.best_accuracy:  # a tie keeps the earlier, shorter-trained step
            return False
        self.best_step, self.best_accuracy = step, accuracy
        self.best_state = {k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()}
        return True

    def state(self) -> dict[str, Any]:
        """What the checkpoint's JSON keeps (the best weights go into its tensors: :meth:`tensors`)."""
        best = None if self.best_step is None else float(self.best_accuracy)
        return {"history": self.history, "best_step": self.best_step, "best_accuracy": best}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.best_state or {})

    def restore(self, state: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's :meth:`state` and :meth:`tensors`."""
        if not state:
            return
        self.history = [dict(row) for row in state["history"]]
        self.best_step = state["best_step"]
        self.best_accuracy = -np.inf if state["best_accuracy"] is None else state["best_accuracy"]
        self.best_state = dict(tensors) if self.best_step is not None else None
