"""Context encoders: a set of preference pairs D^C -> one embedding (the NP's deterministic path).

* ``mean`` — the DeepSet of eq. 5: z = h2(mean_j h1([y_w ‖ y_l]_j)).
* ``attention`` — eq. 21: z = h2(pool_j MultiHeadAttn(W [y_w ‖ y_l])_j), self-attention across the set.

Pooling is the mean by default for both. Eq. 21 sums instead (``pooling="sum"``); with the sum, the
input scale of h2 grows with N^C and on the synthetic study 3 of 6 seeds collapsed to the context-free
(BTL) solution, against 0 of 6 with the mean (see the README's design notes).

An empty set (N^C = 0) has no mean (0/0 is NaN) and softmax over no keys is NaN too, so the pooled
representation of an empty set is a learned vector, ``empty_set``; h2 is then applied as usual. This is
exactly the prior the model predicts with when it knows nothing about the user.

Without a mask (every pair present, e.g. personalising one user) the attention path is computed in a few
fused ops (one QKV projection, one scaled-dot-product call, the output projection applied once to the
pooled rows, since it commutes with the mean); the result equals the masked path up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def pool(self, chosen: Tensor, rejected: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, D), (B, N, D), (B, N) bool or None (every pair present) -> (B, H) pooled set
        representation."""
        if mask is None:
            if chosen.shape[1]:
                return self._pool_complete(chosen, rejected)
            mask = torch.ones(chosen.shape[:2], dtype=torch.bool, device=chosen.device)
        b, n = mask.shape
        if n == 0:
            # One masked dummy pair instead of none: the set path stays in the autograd graph (with zero
            # gradient), which DDP needs when one process draws N^C = 0; the rows become empty_set below.
            chosen = chosen.new_zeros(b, 1, chosen.shape[-1])
            rejected = rejected.new_zeros(b, 1, rejected.shape[-1])
            mask = mask.new_zeros(b, 1)
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

    def _pool_complete(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        """(B, N, D) ×2 with N ≥ 1 and no padding -> (B, H): :meth:`pool` in fewer, fused ops."""
        pairs = torch.cat([chosen, rejected], dim=-1)  # (B, N, 2D)
        n = pairs.shape[1]
        if self.kind == "mean":
            features = self.pair_net(pairs)  # (B, N, H)
            return features.sum(dim=1) if self.pooling == "sum" else features.mean(dim=1)
        attn = self.attention
        b, heads = pairs.shape[0], attn.num_heads
        qkv = F.linear(self.pair_proj(pairs), attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3H)
        q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, N, H/heads) each
        dropout = attn.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, heads, N, H/heads)
        # out_proj is affine: Σ_j (W o_j + b) = W Σ_j o_j + N b, and the mean likewise
        pooled = (o.sum(dim=2) if self.pooling == "sum" else o.mean(dim=2)).reshape(b, -1)  # (B, H)
        bias = attn.out_proj.bias * n if self.pooling == "sum" else attn.out_proj.bias
        return F.linear(pooled, attn.out_proj.weight, bias)

    def forward(self, chosen: Tensor, rejected: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, D), (B, N, D), (B, N) bool or None (every pair present) -> (B, out_dim)."""
        return self.post_net(self.pool(chosen, rejected, mask))
