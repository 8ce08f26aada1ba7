"""Best-of-N steering: sample N answers from any causal LM, score them with a text reward model conditioned
on the user's context pairs (e.g. NP-BTL), keep the best. It steers any LM, trained or not, at N times the
cost of sampling; it is the baseline NP-DPO has to beat.

>>> result = best_of_n(policy, prompts, reward_model, embedder, context=pairs, num_candidates=8)
>>> result.best[0], result.rewards[0]        # the chosen answer to prompt 0 and every candidate's reward

An option is scored as the reward model was trained: the conversation [prompt, answer] embedded by the
reward model's embedder, then r(y | D^C) from the model personalised on the user's context pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from steerable.policy.generation import generate


@dataclass
class BestOfN:
    """Candidates per prompt, their rewards, and the best of each."""

    prompts: list[str]  # (P,)
    candidates: list[list[str]]  # (P, N)
    rewards: np.ndarray  # (P, N) r(candidate | D^C)

    @property
    def best_index(self) -> np.ndarray:
        """(P,) the candidate with the highest reward (the first of equals)."""
        return np.argmax(self.rewards, axis=1)

    @property
    def best(self) -> list[str]:
        return [c[i] for c, i in zip(self.candidates, self.best_index, strict=True)]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "best": c[int(i)], "candidates": c, "rewards": [float(x) for x in r]}
            for p, c, r, i in zip(self.prompts, self.candidates, self.rewards, self.best_index, strict=True)
        ]


def sample_candidates(
    policy: Any, prompts: list[str], num_candidates: int, z: Tensor | None = None, **sampling: Any
) -> list[list[str]]:
    """``num_candidates`` sampled answers per prompt (one batch; row i of ``z`` steers prompt i)."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    repeated = [p for p in prompts for _ in range(num_candidates)]
    if z is not None and z.ndim == 2:
        z = z.repeat_interleave(num_candidates, dim=0)
    texts = generate(policy, repeated, z, **sampling)
    return [texts[i * num_candidates : (i + 1) * num_candidates] for i in range(len(prompts))]


def option_vectors(embedder: Any, prompts: list[str], answers: list[str]) -> np.ndarray:
    """(N, D) embeddings of the options [prompt, answer], rendered as the text studies render them."""
    return embedder.embed_messages(
        [
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
            for p, a in zip(prompts, answers, strict=True)
        ],
        progress=False,
    )


def score_candidates(
    personalized: Any | list[Any], embedder: Any, prompts: list[str], candidates: list[list[str]]
) -> np.ndarray:
    """(P, N) rewards of every candidate; ``personalized`` is one user's personalised reward model
    (``model.personalize(...)``) or one per prompt."""
    users = personalized if isinstance(personalized, list) else [personalized] * len(prompts)
    flat_prompts = [p for p, c in zip(prompts, candidates, strict=True) for _ in c]
    vectors = option_vectors(embedder, flat_prompts, [a for c in candidates for a in c])
    out, start = np.zeros((len(prompts), max(len(c) for c in candidates))), 0
    for i, (user, c) in enumerate(zip(users, candidates, strict=True)):
        out[i, : len(c)] = user.rewards(vectors[start : start + len(c)])
        start += len(c)
    return out


def best_of_n(
    policy: Any,
    prompts: list[str],
    reward_model: Any,
    embedder: Any,
    context: list[dict[str, Any]] | None = None,
    num_candidates: int = 8,
    z: Tensor | None = None,
    **sampling: Any,
) -> BestOfN:
    """Sample ``num_candidates`` answers per prompt from ``policy`` (a :class:`ConditionalPolicy`; steered
    by ``z``, or the base model inside ``policy.reference()``), score them with ``reward_model``
    personalised on the user's ``context`` pairs (``{"prompt"?, "chosen", "rejected"}`` text, embedded by
    ``embedder``; none: a new user) and keep the best of each prompt."""
    from steerable.data.text import TextRowBuilder
    from steerable.text.embedder import embed_preferences

    user = reward_model.personalize()
    if context:
        builder = TextRowBuilder("<context>")
        for n, pair in enumerate(context, 1):
            builder.add({"user_id": "user", **pair}, f"pair {n}")
        vectors = embed_preferences(builder.build(), embedder, progress=False)
        user = reward_model.personalize(vectors.chosen, vectors.rejected)
    candidates = sample_candidates(policy, prompts, num_candidates, z, **sampling)
    return BestOfN(prompts, candidates, score_candidates(user, embedder, prompts, candidates))
