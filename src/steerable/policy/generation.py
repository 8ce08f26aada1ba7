"""Steered generation: a user's context pairs -> z -> FiLM -> sampled responses.

>>> steered = load_policy("runs/npdpo")                           # policy + its embedder
>>> steered.generate(["How do I boil an egg?"], context=[{"prompt": ..., "chosen": ..., "rejected": ...}])
>>> z_a, z_b = steered.user_embedding(pairs_a), steered.user_embedding(pairs_b)
>>> steered.generate_from_embedding(prompts, interpolate(z_a, z_b, 0.5))   # a user "between" a and b

Prompts are rendered exactly as in training (:class:`~steerable.policy.tokens.PolicyTokenizer`), left
padded for batching. Sampling is seeded with its own generator state; the global RNG is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerable.data.text import Message, TextRowBuilder
from steerable.policy.model import ConditionalPolicy
from steerable.policy.tokens import PolicyTokenizer
from steerable.utils.numerics import denormals_flushed


def interpolate(z_a: Tensor, z_b: Tensor, alpha: float | list[float]) -> Tensor:
    """(1 − α)·z_a + α·z_b for one α (same shape as z) or several (one row per α)."""
    alphas = torch.as_tensor(alpha, dtype=z_a.dtype, device=z_a.device)
    if alphas.ndim == 0:
        return (1 - alphas) * z_a + alphas * z_b
    return (1 - alphas[:, None]) * z_a.reshape(1, -1) + alphas[:, None] * z_b.reshape(1, -1)


@torch.no_grad()
@denormals_flushed()
def generate(
    policy: ConditionalPolicy,
    prompts: list[str] | list[list[Message]],
    z: Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompt_length: int | None = None,
) -> list[str]:
    """Sample one response per prompt; row i is steered by z[i] (z (B, L) or (L,) for all; None: FiLM
    off — for a conditional policy, pass what :meth:`SteeredPolicy.user_embedding` gives for no context
    to sample π(y | x, ∅) instead: z_∅, or None with ``empty_context`` identity). Prompts are cut to the
    policy's training limit (``policy_config.json``; 512 tokens if unknown) unless ``max_prompt_length``
    is given."""
    if max_prompt_length is None:
        max_prompt_length = policy.config.max_prompt_length or 512
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")
    tok = policy.tokenizer
    encoder = PolicyTokenizer(tok, max_length=max_prompt_length + 1, max_prompt_length=max_prompt_length)
    ids = [encoder.prompt_ids(p) for p in prompts]
    width = max(len(i) for i in ids)
    device = policy.device
    input_ids = torch.full((len(ids), width), encoder.pad_id, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        attention[row, width - len(seq) :] = 1
    if z is not None and policy.hooks is not None:
        z = z.to(device)
        if z.ndim == 1:
            z = z.expand(len(ids), -1)
        policy.modulate(z)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            sample = temperature > 0
            out = policy.lm.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=0 if sample else None,
                pad_token_id=encoder.pad_id,
                eos_token_id=encoder.eos_id,
            )
    finally:
        policy.modulate(None)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]


class SteeredPolicy:
    """A trained policy with the embedder its context encoder was trained on (see the module docstring)."""

    def __init__(self, policy: ConditionalPolicy, embedder: Any = None) -> None:
        self.policy, self.embedder = policy, embedder

    @torch.no_grad()
    def user_embedding(self, context: list[dict[str, Any]] | None) -> Tensor | None:
        """z (L,) from context pairs ``{"prompt"?, "chosen", "rejected"}`` (text, TRL standard or
        conversational form); None for an unconditional policy. An empty list gives the prior z, or None
        (no modulation: what such a policy was trained with) when the policy's ``empty_context`` is
        identity."""
        if self.policy.hooks is None:
            return None
        if not context and self.policy.config.empty_context == "identity":
            return None
        from steerable.text.embedder import embed_preferences

        device = self.policy.device
        if not context:
            empty = torch.zeros(1, 0, self.policy.config.input_dim, device=device)
            return self.policy.encode(empty, empty, torch.zeros(1, 0, dtype=torch.bool, device=device))[0]
        if self.embedder is None:
            raise ValueError("this policy has no embedder recorded; cannot embed text context")
        builder = TextRowBuilder("<context>")
        for n, pair in enumerate(context, 1):
            builder.add({"user_id": "user", **pair}, f"pair {n}")
        data = embed_preferences(builder.build(), self.embedder, progress=False)
        chosen = torch.from_numpy(np.asarray(data.chosen))[None].to(device)
        rejected = torch.from_numpy(np.asarray(data.rejected))[None].to(device)
        mask = torch.ones(1, chosen.shape[1], dtype=torch.bool, device=device)
        with torch.no_grad():
            return self.policy.encode(chosen, rejected, mask)[0]

    def generate_from_embedding(self, prompts: list[str], z: Tensor | None, **sampling: Any) -> list[str]:
        """Generate with a given user embedding (e.g. from :func:`interpolate`)."""
        return generate(self.policy, prompts, z, **sampling)

    def generate(
        self,
        prompts: list[str],
        context: list[dict[str, Any]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """One response per prompt for the user whose context pairs are given."""
        z = self.user_embedding(context)
        return generate(
            self.policy,
            prompts,
            z,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )


def load_policy(directory: str | Path, device: str = "cpu") -> SteeredPolicy:
    """A trained policy folder (``policy_config.json`` + ``policy.safetensors`` [+ ``embedder.json``])."""
    from steerable.text.embedder import Embedder, load_embedder_config

    policy = ConditionalPolicy.from_pretrained(directory, device=device)
    embedder_config = load_embedder_config(directory)
    return SteeredPolicy(policy, Embedder(embedder_config) if embedder_config is not None else None)
