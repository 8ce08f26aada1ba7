"""NP-BTL (paper eq. 4-7, 21-22) and its variational version (latent z ~ q(z | D^C), eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steerable.models.base import Latent, PreferenceOutput, RewardModel, RewardModelConfig
from steerable.models.encoders import SetEncoder
from steerable.models.mlp import mlp
from steerable.objectives import btl_log_prob, gaussian_kl, mixture_log_prob


class ConditionalRewardDecoder(nn.Module):
    """r(y | z) = MLP2([MLP1(y) ‖ z]) (eq. 22).

    MLP2's first layer W·[e ‖ z] + b is computed as W_e·e + (W_z·z + b): the user's term is computed once
    per user and broadcast over that user's options, never concatenated per option. The parameters are
    exactly those of eq. 22.
    """

    def __init__(
        self, input_dim: int, latent_dim: int, hidden_dim: int, num_layers: int, activation: str
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.option_net = mlp(input_dim, hidden_dim, hidden_dim, num_layers, activation)  # MLP1
        self.reward_net = mlp(hidden_dim + latent_dim, hidden_dim, 1, num_layers, activation)  # MLP2

    @property
    def first(self) -> nn.Linear:
        return self.reward_net[0]  # type: ignore[return-value]

    def user_bias(self, z: Tensor) -> Tensor:
        """(..., Z) -> (..., H): W_z·z + b, the user's contribution to MLP2's first layer."""
        return F.linear(z, self.first.weight[:, self.hidden_dim :], self.first.bias)

    def forward(self, options: Tensor, z: Tensor) -> Tensor:
        """Options (B, N, D) and z (..., B, Z) -> rewards (..., B, N)."""
        e = self.option_net(options)  # (B, N, H)
        h = F.linear(e, self.first.weight[:, : self.hidden_dim]) + self.user_bias(z).unsqueeze(
            -2
        )  # (..., B, N, H)
        return self.reward_net[1:](h).squeeze(-1)

    def folded(self) -> tuple[nn.Module, Tensor, Tensor]:
        """For inference: fold MLP1's last Linear (A, a) into W_e, W_e·(A·g + a) = (W_e·A)·g + W_e·a.

        Returns (the layers of MLP1 before its last Linear, folded weight (H, H_in), folded bias (H,)).
        """
        last: nn.Linear = self.option_net[-1]  # type: ignore[assignment]
        w_e = self.first.weight[:, : self.hidden_dim]
        return self.option_net[:-1], w_e @ last.weight, w_e @ last.bias


class NPBTLRewardModel(RewardModel):
    """NP-BTL: z = h(D^C) (DeepSet-mean or attention encoder), r(y | D^C) = g(y, z),
    P(y1 ≻ y2 | D^C) = σ(r(y1 | D^C) − r(y2 | D^C))."""

    model_type = "np-btl"
    conditional = True

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        self.encoder = SetEncoder(
            config.input_dim,
            config.hidden_dim,
            self.encoder_out_dim(config),
            config.num_layers,
            kind=config.encoder,
            pooling=config.pooling,
            num_heads=config.num_heads,
            dropout=config.dropout,
            activation=config.activation,
        )
        self.decoder = ConditionalRewardDecoder(
            config.input_dim, config.latent_dim, config.hidden_dim, config.num_layers, config.activation
        )

    @staticmethod
    def encoder_out_dim(config: RewardModelConfig) -> int:
        return config.latent_dim

    def encode(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Latent:
        return Latent(self.encoder(self.standardize(chosen), self.standardize(rejected), mask))  # (B, Z)

    def option_rewards(self, options: Tensor, latent: Latent | None) -> Tensor:
        assert latent is not None, "NP-BTL needs a latent (encode the context first)"
        return self.decoder(self.standardize(options), latent.mean)

    def _pair_log_probs(self, chosen: Tensor, rejected: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        n = chosen.shape[-2]
        rewards = self.decoder(self.standardize(torch.cat([chosen, rejected], dim=-2)), z)  # (..., B, 2N)
        r_c, r_r = rewards[..., :n], rewards[..., n:]
        return btl_log_prob(r_c, r_r), btl_log_prob(r_r, r_c)

    def preference(self, chosen: Tensor, rejected: Tensor, latent: Latent | None) -> PreferenceOutput:
        assert latent is not None
        return PreferenceOutput(*self._pair_log_probs(chosen, rejected, latent.mean))


class VariationalNPBTLRewardModel(NPBTLRewardModel):
    """Variational NP-BTL: q(z | D) = N(μ(D), σ(D)²) from the same set encoder.

    Trained on the negative ELBO (Garnelo et al., 2018b): E_{z ~ q(z | D^T)} [−log p(D^T | z)]
    + KL(q(z | D^T) || q(z | D^C)), with D^C ⊆ D^T; or (``vnp_objective="ml"``) on the negative log of
    the Monte Carlo predictive, −log (1/S) Σ_s p(D^T | z_s) with z_s ~ q(z | D^C), which predicted better in
    our measurements (README). Predicts with the Monte Carlo average of eq. 3,
    P(y1 ≻ y2 | D^C) ≈ (1/S) Σ_s σ(r(y1 | z_s) − r(y2 | z_s)), z_s ~ q(z | D^C). Evaluation uses a fixed
    set of S standard-normal draws, so predictions are deterministic.
    """

    model_type = "vnp-btl"

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        noise = torch.randn(config.num_samples, config.latent_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("predictive_noise", noise, persistent=False)  # (S, Z)

    @staticmethod
    def encoder_out_dim(config: RewardModelConfig) -> int:
        return 2 * config.latent_dim

    def encode(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Latent:
        features = self.encoder(self.standardize(chosen), self.standardize(rejected), mask)
        mean, raw_std = features.chunk(2, dim=-1)  # (B, Z) each
        return Latent(mean, self.config.min_std + (1 - self.config.min_std) * F.softplus(raw_std))

    def samples(self, latent: Latent, num_samples: int | None = None) -> Tensor:
        """(S, B, Z) samples of z: the fixed predictive draws, or fresh ones if ``num_samples`` is given."""
        assert latent.std is not None
        if num_samples is None:
            eps = self.predictive_noise.unsqueeze(1)  # (S, 1, Z)
        else:
            eps = torch.randn(num_samples, *latent.mean.shape, device=latent.mean.device)
        return latent.mean + latent.std * eps

    def option_rewards(self, options: Tensor, latent: Latent | None) -> Tensor:
        """Posterior mean reward E_q[r(y | z)] (B, N)."""
        assert latent is not None
        return self.decoder(self.standardize(options), self.samples(latent)).mean(dim=0)

    def preference(self, chosen: Tensor, rejected: Tensor, latent: Latent | None) -> PreferenceOutput:
        assert latent is not None
        lp_c, lp_r = self._pair_log_probs(chosen, rejected, self.samples(latent))  # (S, B, N) each
        return PreferenceOutput(mixture_log_prob(lp_c), mixture_log_prob(lp_r))

    def training_output(self, batch) -> PreferenceOutput:
        prior = self.encode_batch(batch)  # q(z | D^C)
        if self.config.vnp_objective == "ml":
            z = self.samples(prior, num_samples=self.config.train_samples)  # (S, B, Z), reparameterised
            return PreferenceOutput(*self._pair_log_probs(batch.target_chosen, batch.target_rejected, z))
        posterior = self.encode(batch.target_chosen, batch.target_rejected, batch.target_mask)  # q(z | D^T)
        z = self.samples(posterior, num_samples=1)[0]  # (B, Z), reparameterised
        lp_c, lp_r = self._pair_log_probs(batch.target_chosen, batch.target_rejected, z)
        kl = gaussian_kl(posterior.mean, posterior.std, prior.mean, prior.std)  # (B,)
        return PreferenceOutput(lp_c, lp_r, kl=kl)
