"""FiLM modulation of a causal LM's attention outputs by a user embedding z (paper eq. 23).

o'_m = γ_m(z) ⊙ o_m + β_m(z) on the output o_m of block m's self-attention, for every modulated block.
:class:`FiLMHypernetwork` maps z to all (γ, β) at once; its last layer starts at zero and γ = 1 + Δγ,
so a fresh hypernetwork is exactly the identity and training starts from the base model.
:class:`FiLMHooks` applies them with forward hooks, one row of (γ, β) per row of the batch (each row
may be a different user). Hooks live on the attention modules of this one model object: never
``deepcopy`` a hooked model (the copy would carry the hooks); the reference policy is the same model
with the hooks switched off (:meth:`FiLMHooks.disabled`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from steerable.models.mlp import mlp


class FiLMHypernetwork(nn.Module):
    """z (B, L) -> γ, β (B, M, H) for M modulated blocks of width H, γ = ``gamma_offset`` + Δγ(z): the
    identity when fresh (offset 1; offset 0 gives a gate that starts shut, γ = 0)."""

    def __init__(
        self,
        latent_dim: int,
        num_blocks: int,
        width: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        gamma_offset: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_blocks, self.width, self.gamma_offset = num_blocks, width, gamma_offset
        self.net = mlp(latent_dim, hidden_dim, 2 * num_blocks * width, num_layers)
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(z).view(z.shape[0], 2, self.num_blocks, self.width)
        return self.gamma_offset + out[:, 0], out[:, 1]


class FiLMHooks:
    """Forward hooks on attention modules that apply the current (γ, β) (see the module docstring).

    ``rest_gamma``: γ whenever no (γ, β) is applied (cleared or disabled), the hypernetwork's
    ``gamma_offset``: 1 leaves the output as it is; 0 (gates that shut without a user, ``lora_shared``
    False) multiplies it by 0, so that it stays in the graph."""

    def __init__(self, attention_modules: list[nn.Module], rest_gamma: float = 1.0) -> None:
        self.modules = attention_modules
        self.rest_gamma = rest_gamma
        self.gamma: Tensor | None = None  # (R, M, H)
        self.beta: Tensor | None = None
        self.enabled = True
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(attention_modules)]

    def set(self, gamma: Tensor | None, beta: Tensor | None) -> None:
        """Modulate the next forward passes with per-row (R, M, H) parameters (None: no modulation)."""
        self.gamma, self.beta = gamma, beta

    def clear(self) -> None:
        self.set(None, None)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unmodulated model inside the block (the DPO reference)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output):
            if not self.enabled or self.gamma is None:
                if self.rest_gamma == 1.0:
                    return output
                if isinstance(output, tuple):
                    return (output[0] * self.rest_gamma, *output[1:])
                return output * self.rest_gamma
            hidden = output[0] if isinstance(output, tuple) else output
            gamma, beta = self.gamma[:, index], self.beta[:, index]  # (R, H)
            rows = hidden.shape[0]
            if rows != gamma.shape[0]:
                if rows % gamma.shape[0]:
                    raise RuntimeError(
                        f"FiLM parameters for {gamma.shape[0]} rows, but the batch has {rows} rows"
                    )
                repeat = rows // gamma.shape[0]  # e.g. num_return_sequences in generate()
                gamma, beta = gamma.repeat_interleave(repeat, 0), beta.repeat_interleave(repeat, 0)
            shape = (rows,) + (1,) * (hidden.ndim - 2) + (hidden.shape[-1],)
            modulated = gamma.to(hidden.dtype).view(shape) * hidden + beta.to(hidden.dtype).view(shape)
            if isinstance(output, tuple):
                return (modulated, *output[1:])
            return modulated

        return hook


def zeros_like_film(rows: int, num_blocks: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Identity FiLM parameters (γ = 1, β = 0) for ``rows`` rows."""
    return torch.ones(rows, num_blocks, width, device=device), torch.zeros(
        rows, num_blocks, width, device=device
    )
