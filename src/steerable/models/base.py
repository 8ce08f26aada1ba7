"""The reward-model interface shared by BTL, DPL, NP-BTL and variational NP-BTL, and its checkpoints.

A model maps a task batch to :class:`PreferenceOutput`, the log-probabilities of both orders of every
target pair given the task's context. Models never compute a loss: :mod:`steerable.objectives` does.
Checkpoints are a folder with ``config.json`` and ``model.safetensors`` (no pickle is ever loaded).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from steerable.errors import ConfigError, SteerableError
from steerable.utils.config import option
from steerable.utils.files import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from steerable.data.sampler import TaskBatch
    from steerable.inference import PersonalizedRewardModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RewardModelConfig:
    """Architecture of a reward model. Defaults are the paper's (appendix C): 2-layer MLPs, hidden 256,
    GELU."""

    model_type: str = option(
        "np-btl", "btl | dpl | np-btl | vnp-btl", choices=["btl", "dpl", "np-btl", "vnp-btl"]
    )
    input_dim: int = option(1, "length D of an option vector (set from the data)")
    hidden_dim: int = option(256, "width of every MLP")
    num_layers: int = option(2, "Linear layers per MLP")
    activation: str = option("gelu", "MLP activation", choices=["gelu", "relu", "silu", "tanh"])
    latent_dim: int = option(256, "size of the user embedding z (NP models)")
    encoder: str = option(
        "attention",
        "context encoder: self-attention (eq. 21) or DeepSet mean (eq. 5)",
        choices=["attention", "mean"],
    )
    pooling: str = option(
        "mean", "set pooling (eq. 21 sums; the mean is robust, see the README)", choices=["mean", "sum"]
    )
    num_heads: int = option(8, "attention heads (attention encoder)")
    dropout: float = option(0.1, "attention dropout (attention encoder)")
    num_samples: int = option(32, "samples of z averaged in the predictive of vnp-btl (eq. 3)")
    vnp_objective: str = option(
        "elbo",
        "vnp-btl training objective: NP evidence lower bound, or log of the Monte Carlo predictive",
        choices=["elbo", "ml"],
    )
    train_samples: int = option(4, "samples of z per task for the 'ml' objective")
    min_std: float = option(1e-3, "smallest standard deviation of DPL rewards and of q(z) in vnp-btl")
    standardize_inputs: bool = option(
        True, "standardise each option feature with the training data's mean and standard deviation"
    )

    def __post_init__(self) -> None:
        from steerable.models.registry import MODEL_TYPES

        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        for name in (
            "input_dim",
            "hidden_dim",
            "num_layers",
            "latent_dim",
            "num_heads",
            "num_samples",
            "train_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder == "attention" and self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class PreferenceOutput:
    """Predicted preferences for B tasks × N target pairs."""

    log_prob_chosen: Tensor  # (B, N) log P(chosen ≻ rejected | D^C); (S, B, N) per z-sample in training
    log_prob_rejected: Tensor  # (B, N) log P(rejected ≻ chosen | D^C); (S, B, N) per z-sample in training
    kl: Tensor | None = None  # (B,) KL(q(z | D^T) || q(z | D^C)), variational training only

    @property
    def log_odds(self) -> Tensor:
        """(B, N): > 0 when the model predicts the recorded choice."""
        return self.log_prob_chosen - self.log_prob_rejected

    @property
    def prob_chosen(self) -> Tensor:
        """(B, N) P(chosen ≻ rejected | D^C)."""
        return torch.sigmoid(self.log_odds)


@dataclass
class Latent:
    """A user's embedding: z (deterministic NP) or the Gaussian q(z | D^C) (variational NP)."""

    mean: Tensor  # (B, Z)
    std: Tensor | None = None  # (B, Z), None for deterministic embeddings


class RewardModel(nn.Module):
    """Base class: ``encode`` the context, score options, and predict pairs."""

    model_type: ClassVar[str]
    conditional: ClassVar[bool] = False

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__()
        self.config = config
        # Per-feature standardisation of every option the model sees, fitted on the training data
        # (fit_standardization) and saved with the weights. Text embeddings are unit vectors dominated by
        # the shared prompt; standardised, the small differences between two answers become visible.
        self.register_buffer("input_shift", torch.zeros(config.input_dim))
        self.register_buffer("input_scale", torch.ones(config.input_dim))

    def standardize(self, options: Tensor) -> Tensor:
        """(..., D) raw options -> (..., D) standardised options (the identity until fitted)."""
        return (options - self.input_shift) / self.input_scale

    @torch.no_grad()
    def fit_standardization(self, data: Any) -> None:
        """Set the standardisation from the options (chosen and rejected) of ``data``."""
        if not self.config.standardize_inputs:
            return
        options = torch.from_numpy(np.concatenate([data.chosen, data.rejected])).double()
        std = options.std(dim=0)
        self.input_shift.copy_(options.mean(dim=0))
        self.input_scale.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    # ---- to implement --------------------------------------------------------------------------
    def encode(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Latent | None:
        """Context pairs (B, Nc, D) ×2 and mask (B, Nc) -> the users' embeddings (None if unconditional)."""
        return None

    def preference(self, chosen: Tensor, rejected: Tensor, latent: Latent | None) -> PreferenceOutput:
        """Predictive log-probabilities for target pairs (B, N, D) ×2 given the users' embeddings."""
        raise NotImplementedError

    def option_rewards(self, options: Tensor, latent: Latent | None) -> Tensor:
        """(B, N, D) options -> (B, N) rewards (the mean reward for DPL and vnp-btl)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    def encode_batch(self, batch: TaskBatch) -> Latent | None:
        return self.encode(batch.context_chosen, batch.context_rejected, batch.context_mask)

    def forward(self, batch: TaskBatch) -> PreferenceOutput:
        """Predict every target pair of the batch from the batch's context."""
        return self.preference(batch.target_chosen, batch.target_rejected, self.encode_batch(batch))

    def training_output(self, batch: TaskBatch) -> PreferenceOutput:
        """What the training loss is computed from (the predictive, except for variational models)."""
        return self(batch)

    def personalize(
        self, context_chosen: Any = None, context_rejected: Any = None
    ) -> PersonalizedRewardModel:
        """Condition once on one user's context pairs ((Nc, D) arrays; none for a brand-new user) and
        return an object that scores any number of options or pairs cheaply."""
        from steerable.inference import PersonalizedRewardModel

        return PersonalizedRewardModel(self, context_chosen, context_rejected)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically)."""
        from steerable import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"model_type": self.model_type})
        write_json_atomic(directory / CONFIG_NAME, {**asdict(self.config), "steerable_version": __version__})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        """Load a model saved by :meth:`save_pretrained` (any model type when called on the base class)."""
        from steerable.models.registry import MODEL_TYPES

        config = read_model_config(directory)
        model_cls = MODEL_TYPES[config.model_type]
        if cls is not RewardModel and not issubclass(model_cls, cls):
            raise SteerableError(f"{directory}: holds a {config.model_type} model, not a {cls.model_type}")
        model = model_cls(config)
        try:
            state = load_file(str(Path(directory) / WEIGHTS_NAME))
        except FileNotFoundError:
            raise SteerableError(f"{directory}: no {WEIGHTS_NAME} (not a saved steerable model)") from None
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise SteerableError(f"{directory}/{WEIGHTS_NAME}: unreadable weights ({exc})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SteerableError(
                f"{directory}: weights do not match the config "
                f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
            )
        return model.to(device).eval()


def read_model_config(directory: str | Path) -> RewardModelConfig:
    """The :class:`RewardModelConfig` stored in a model folder."""
    path = Path(directory) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteerableError(f"{directory}: no {CONFIG_NAME} (not a saved steerable model)") from None
    except json.JSONDecodeError as exc:
        raise SteerableError(f"{path}: invalid JSON ({exc.msg})") from None
    return RewardModelConfig.from_dict(values)
