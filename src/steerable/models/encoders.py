"""Context encoders: a set of preference pairs D^C -> one embedding (the NP's deterministic path).

* ``mean`` — the DeepSet of eq. 5: z = h2(mean_j h1([y_w ‖ y_l]_j)).
* ``attention`` — eq. 21: z = h2(pool_j MultiHeadAttn(W [y_w ‖ y_l])_j), self-attention across the set.

Pooling is the mean by default for both. Eq. 21 sums instead (``pooling="sum"``); with the sum, the
input scale of h2 grows with N^C and on the synthetic study 3 of 6 seeds collapsed to the context-free
(BTL) solution, against 0 of 6 with the mean (see the README's design notes).

An empty set (N^C = 0) has no mean (0/0 is NaN) and softmax over no keys is NaN too, so the pooled
representation of an empty set is a learned vector, ``empty_set``; h2 is then applied as usual. This is
exactly the prior the model predicts with when it knows nothing about the user.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from steerable.models.mlp import mlp


class SetEncoder(nn.Module):
    """Permutation-invariant encoder of (B, N, D) chosen/rejected pairs with a (B, N) mask -> (B, out_dim)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        kind: str = "mean",
        pooling: str | None = None,
        num_heads: int = 8,
        dropout: float = 0.1,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if kind not in ("mean", "attention"):
            raise ValueError(f"encoder must be 'mean' or 'attention', got {kind!r}")
        self.kind = kind
        self.pooling = pooling or "mean"
        if self.pooling not in ("mean", "sum"):
            raise ValueError(f"pooling must be 'mean' or 'sum', got {self.pooling!r}")
        pair_dim = 2 * input_dim
        if kind == "mean":
            self.pair_net = mlp(pair_dim, hidden_dim, hidden_dim, num_layers, activation)  # h_{e,1}
        else:
            self.pair_proj = nn.Linear(pair_dim, hidden_dim)  # W
            self.attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.empty_set = nn.Parameter(torch.zeros(hidden_dim))
        self.post_net = mlp(hidden_dim, hidden_dim, out_dim, num_layers, activation)  # h_{e,2}

    def pool(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Tensor:
        """(B, N, D), (B, N, D), (B, N) bool -> (B, H) pooled set representation."""
        b, n = mask.shape
        if n == 0:
            return self.empty_set.expand(b, -1)
        pairs = torch.cat([chosen, rejected], dim=-1)  # (B, N, 2D)
        counts = mask.sum(dim=1, keepdim=True)  # (B, 1)
        if self.kind == "mean":
            features = self.pair_net(pairs)  # (B, N, H)
        else:
            x = self.pair_proj(pairs)  # (B, N, H)
            ignore = ~mask
            ignore[:, 0] &= (
                counts[:, 0] > 0
            )  # empty rows attend to a dummy key (replaced below), not to nothing
            features, _ = self.attention(x, x, x, key_padding_mask=ignore, need_weights=False)  # (B, N, H)
        features = features * mask.unsqueeze(-1)
        pooled = features.sum(dim=1)  # (B, H)
        if self.pooling == "mean":
            pooled = pooled / counts.clamp(min=1)
        return torch.where(counts > 0, pooled, self.empty_set)

    def forward(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Tensor:
        """(B, N, D), (B, N, D), (B, N) bool -> (B, out_dim)."""
        return self.post_net(self.pool(chosen, rejected, mask))
