"""The MLP used everywhere: ``num_layers`` Linear layers with an activation between them."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, activation: str = "gelu"
) -> nn.Sequential:
    """Linear → act → … → Linear (``num_layers`` Linear layers; paper: 2 layers, hidden 256, GELU)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
