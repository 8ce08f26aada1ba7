"""NP-DPO's conditional policy π(y | x, D^C): a causal LM with LoRA adapters (peft) whose attention outputs
are FiLM-modulated per user by a hypernetwork of the user's context embedding z (paper section 3.2).

z = NP set encoder over the user's context pairs, each pair given as the frozen embedder's vectors of
the chosen and rejected options (the same encoder as NP-BTL). γ, β = hypernetwork(z) for every modulated
block. With ``lora_gates`` (beyond the paper) z also FiLM-modulates every LoRA adapter's r-wide bottleneck,
h = A x -> γ'(z) ⊙ h + β'(z) before B: the adapters become a z-dependent mix of rank-1 updates, so users
of different kinds can get different weight updates, not only different attention outputs (identity when
fresh, like FiLM). With ``lora_shared`` False the gate is Δγ'(z) ⊙ h + β'(z): no part of the adapters is
shared by every user, each contribution is driven by z; B then starts random rather than zero (the shut
gate keeps the fresh policy the base model, and training does not start at the zero saddle where neither
B nor the gate gets a gradient). With ``film_mlp`` (beyond the paper) FiLM also modulates each modulated
block's MLP output, by a hypernetwork of its own. With ``conditional=False`` there is no encoder and no
FiLM: the same class is the BTL-DPO baseline (plain LoRA-DPO).

The reference policy π_ref is this very model with the adapters disabled, FiLM off and dropout off
(:meth:`ConditionalPolicy.reference_log_probs`): one copy of the base weights in memory.

``blocks`` chooses the blocks that are adapted (LoRA) and modulated (FiLM). With ``last:K`` the first
L − K blocks are the frozen base model, so their output depends on the tokens alone: it can be computed
once per sequence (with the reference log-probabilities, :mod:`steerable.policy.sequences`) and a
training step runs only the last K blocks from it (``prefix_hidden``). Log-probabilities are computed
from logits at the response's positions only (the LM head is most of a small model's cost).

Saved with :meth:`save_pretrained`: only what training changes (LoRA, encoder, hypernetwork, input
standardisation) in ``policy.safetensors`` plus ``policy_config.json`` naming the base model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steerable.errors import ConfigError, SteerableError
from steerable.models.encoders import SetEncoder
from steerable.policy.blocks import (
    block_list_name,
    block_list_owner,
    find_attention,
    find_decoder_blocks,
    find_mlp,
)
from steerable.policy.film import FiLMHooks, FiLMHypernetwork
from steerable.utils.config import option

CONFIG_NAME = "policy_config.json"
WEIGHTS_NAME = "policy.safetensors"
EMPTY_CONTEXTS = ("learned", "identity")  # PolicyConfig.empty_context: z_∅, or no modulation
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PolicyConfig:
    """The conditional policy's architecture (saved as ``policy_config.json``)."""

    base_model: str = option(
        "SmolLM2-135M-Instruct", "causal LM: folder, hub name or SmolLM2-135M-Instruct (offline)"
    )
    conditional: bool = option(True, "NP-DPO (True) or the BTL-DPO baseline without context (False)")
    lora_r: int = option(16, "LoRA rank (0: no adapters, FiLM only); paper 512, official code 128")
    lora_alpha: int = option(32, "LoRA alpha (scale alpha/r)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_targets: str = option(
        "all-linear", "linear layers adapted in each block: all-linear or comma-separated names"
    )
    blocks: str = option(
        "all",
        "blocks adapted by LoRA and modulated by FiLM: all, first:K, last:K or indices like 0,2,4; with "
        "last:K training runs only the last K blocks from cached hidden states (on a CPU: try last:4)",
    )
    attention_name: str | None = option(None, "attention child of a block (default: found by name)")
    film_mlp: bool = option(
        False, "FiLM also on each modulated block's MLP output (beyond the paper: attention outputs only)"
    )
    mlp_name: str | None = option(None, "MLP child of a block, for film_mlp (default: found by name)")
    latent_dim: int = option(128, "user embedding z width")
    encoder: str = option(
        "mean", "context encoder: mean (DeepSet) or attention", choices=["mean", "attention"]
    )
    encoder_hidden: int = option(256, "context encoder width")
    hyper_hidden: int = option(256, "FiLM hypernetwork width")
    lora_gates: bool = option(
        False,
        "z also modulates each LoRA adapter's rank bottleneck (conditional adapters; beyond the paper)",
    )
    lora_shared: bool = option(
        True,
        "with lora_gates: the adapters keep a part shared by every user (B A x, gates γ' = 1 + Δγ'(z)); "
        "False: every adapter contribution is gated by z (γ' = Δγ'(z), B starts random; beyond the paper)",
    )
    empty_context: str = option(
        "learned",
        "a user with no context pairs (N^C = 0): learned = the encoder's trained empty-set embedding z_∅ "
        "(paper); identity = no modulation (FiLM and gates at rest), so with lora_r 0 that user gets "
        "the base model exactly",
        choices=list(EMPTY_CONTEXTS),
    )
    input_dim: int = option(0, "width of the context options' embeddings (set from the data)")
    dtype: str = option("float32", "base model weights: float32 | bfloat16 | float16", choices=list(DTYPES))
    max_length: int = option(0, "tokens per prompt + response it was trained on (set by the trainer)")
    max_prompt_length: int = option(0, "tokens per prompt it was trained on (set by the trainer)")
    max_response_length: int = option(0, "tokens per response it was trained on (set by the trainer; 0: any)")

    def __post_init__(self) -> None:
        if self.lora_r < 0 or self.lora_alpha <= 0:
            raise ConfigError(f"need lora_r >= 0 and lora_alpha > 0, got {self.lora_r}, {self.lora_alpha}")
        if self.latent_dim < 1 or self.encoder_hidden < 1 or self.hyper_hidden < 1:
            raise ConfigError("latent_dim, encoder_hidden and hyper_hidden must be >= 1")
        if self.lora_gates and (not self.conditional or self.lora_r < 1):
            raise ConfigError("lora_gates needs a conditional policy with LoRA (lora_r >= 1)")
        if not self.lora_shared and not self.lora_gates:
            raise ConfigError("lora_shared False needs lora_gates (z drives the adapters through them)")
        if self.film_mlp and not self.conditional:
            raise ConfigError("film_mlp needs a conditional policy (FiLM is modulated by z)")
        if self.empty_context not in EMPTY_CONTEXTS:
            raise ConfigError(f"empty_context must be one of {EMPTY_CONTEXTS}, got {self.empty_context!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> PolicyConfig:
        values = dict(values)
        legacy = values.pop("film_blocks", None)  # before 0.2: FiLM on these blocks, LoRA on every block
        if legacy is not None:
            if legacy != "all":
                raise ConfigError(
                    f"{CONFIG_NAME}: saved by an older version with FiLM on blocks {legacy!r} and LoRA on "
                    "every block; retrain it (LoRA now follows 'blocks')"
                )
            values.setdefault("blocks", "all")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{CONFIG_NAME}: unknown fields {', '.join(unknown)}")
        return cls(**values)


def select_blocks(spec: str, count: int) -> list[int]:
    """Indices of the modulated blocks from ``all``, ``first:K``, ``last:K`` or ``0,2,4`` (negatives count
    from the end)."""
    spec = spec.strip().lower()
    try:
        if spec == "all":
            chosen = list(range(count))
        elif spec.startswith("first:"):
            chosen = list(range(min(count, int(spec[6:]))))
        elif spec.startswith("last:"):
            chosen = list(range(max(0, count - int(spec[5:])), count))
        else:
            chosen = sorted({int(x) % count if -count <= int(x) < count else int(x) for x in spec.split(",")})
    except ValueError:
        raise ConfigError(f"blocks: cannot read {spec!r} (all, first:K, last:K or 0,2,4)") from None
    if not chosen or any(not 0 <= i < count for i in chosen):
        raise ConfigError(f"blocks {spec!r}: the model has blocks 0..{count - 1}")
    return chosen


def load_base_model(name: str, dtype: str = "float32", device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a folder, a hub name or an offline alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerable.text.models import resolve_model

    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise SteerableError(f"cannot load the causal LM {name!r}: {str(exc).splitlines()[0]}") from None
    return model.to(device), tokenizer


def lora_target_modules(base: nn.Module, blocks: list[int], targets: str) -> str | list[str]:
    """peft ``target_modules``: ``targets`` (all-linear or layer names) inside the chosen blocks only.

    Every block chosen: the spec as it is (peft matches names anywhere in the model). Otherwise the full
    names of the matching linear layers in those blocks, so the other blocks stay the frozen base."""
    wanted = None if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if sorted(blocks) == list(range(len(find_decoder_blocks(base)))):
        return "all-linear" if wanted is None else wanted
    prefix = block_list_name(base) + "."
    names = []
    for name, module in base.named_modules():
        linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if not linear or not name.startswith(prefix):
            continue
        index = int(name[len(prefix) :].split(".", 1)[0])
        if index in blocks and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            names.append(name)
    if not names:
        raise ConfigError(f"no linear layer matching {targets!r} in blocks {blocks}")
    return names


def lora_bottlenecks(blocks: list[nn.Module]) -> list[nn.Module]:
    """Every LoRA down-projection A (in -> r) inside ``blocks``, in order: where the LoRA gates act."""
    from peft.tuners.lora import LoraLayer

    found = [
        layer.lora_A[adapter]
        for block in blocks
        for layer in block.modules()
        if isinstance(layer, LoraLayer)
        for adapter in layer.active_adapters
        if adapter in layer.lora_A
    ]
    if not found:
        raise ConfigError("lora_gates: no LoRA adapter in the modulated blocks")
    return found


def _randomize_lora_up_projections(model: nn.Module) -> None:
    """Start every LoRA up-projection B as peft starts A (Kaiming uniform) instead of at zero."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for up in layer.lora_B.values():
                nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))


def _uses_conv1d(base: nn.Module) -> bool:
    """GPT-2-style models store linear weights transposed (transformers' ``Conv1D``); LoRA must know."""
    return any(type(m).__name__ == "Conv1D" for m in base.modules())


class ConditionalPolicy(nn.Module):
    """See the module docstring. ``base`` is a loaded causal LM; it is wrapped in place."""

    def __init__(self, config: PolicyConfig, base: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        for p in base.parameters():
            p.requires_grad_(False)
        self.block_index = select_blocks(config.blocks, len(find_decoder_blocks(base)))
        if config.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=lora_target_modules(base, self.block_index, config.lora_targets),
                task_type="CAUSAL_LM",
                fan_in_fan_out=_uses_conv1d(base),
            )
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
                )
                base = get_peft_model(base, lora)
            if not config.lora_shared:
                _randomize_lora_up_projections(base)
        self.lm = base
        self.hooks: FiLMHooks | None = None
        self.gate_hooks: FiLMHooks | None = None
        self.mlp_hooks: FiLMHooks | None = None
        if config.conditional:
            if config.input_dim < 1:
                raise ConfigError("a conditional policy needs input_dim (the context embeddings' width)")
            blocks = find_decoder_blocks(base)
            width = _hidden_size(base)
            self.encoder = SetEncoder(
                config.input_dim, config.encoder_hidden, config.latent_dim, kind=config.encoder
            )
            self.hypernetwork = FiLMHypernetwork(
                config.latent_dim, len(self.block_index), width, config.hyper_hidden
            )
            self.register_buffer("input_shift", torch.zeros(config.input_dim))
            self.register_buffer("input_scale", torch.ones(config.input_dim))
            attention = [find_attention(blocks[i], config.attention_name) for i in self.block_index]
            self.hooks = FiLMHooks(attention)
            if config.lora_gates:
                bottlenecks = lora_bottlenecks([blocks[i] for i in self.block_index])
                self.gate_network = FiLMHypernetwork(
                    config.latent_dim,
                    len(bottlenecks),
                    config.lora_r,
                    config.hyper_hidden,
                    gamma_offset=1.0 if config.lora_shared else 0.0,
                )
                self.gate_hooks = FiLMHooks(bottlenecks, rest_gamma=self.gate_network.gamma_offset)
            if config.film_mlp:
                self.mlp_hypernetwork = FiLMHypernetwork(
                    config.latent_dim, len(self.block_index), width, config.hyper_hidden
                )
                self.mlp_hooks = FiLMHooks([find_mlp(blocks[i], config.mlp_name) for i in self.block_index])

    # ---- context -> FiLM ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face causal LM (LoRA layers injected), without peft's wrapper."""
        return self.lm.get_base_model() if self.config.lora_r > 0 else self.lm

    @property
    def prefix_blocks(self) -> int:
        """Leading blocks with neither LoRA nor FiLM: their output depends on the tokens alone."""
        return min(self.block_index)

    def fit_standardization(self, options: Tensor) -> None:
        """Standardise context embeddings with the training options' mean and std (per dimension)."""
        if self.hooks is None:
            return
        options = options.float()
        self.input_shift.copy_(options.mean(dim=0))
        self.input_scale.copy_(options.std(dim=0).clamp(min=1e-6))

    def init_encoder_from(self, reward_model_dir: str | Path) -> None:
        """Start the context encoder from a trained NP-BTL's set encoder and input standardisation (the
        policy's encoder settings must match the reward model's: same kind, width and latent size)."""
        from steerable.models.base import RewardModel

        model = RewardModel.from_pretrained(reward_model_dir)
        encoder = getattr(model, "encoder", None)
        if self.hooks is None or encoder is None or model.model_type != "np-btl":
            raise ConfigError(f"{reward_model_dir}: init_encoder needs an np-btl model and an NP-DPO policy")
        theirs = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in self.encoder.state_dict().items()}
        same_function = (
            encoder.kind == self.encoder.kind
            and encoder.pooling == self.encoder.pooling
            and model.config.activation == "gelu"  # the policy's SetEncoder default
            and (encoder.kind != "attention" or _heads(encoder) == _heads(self.encoder))
        )
        if theirs != mine or not same_function or model.config.input_dim != self.config.input_dim:
            c, p = model.config, self.config
            raise ConfigError(
                f"{reward_model_dir}: its encoder ({c.encoder}, hidden {c.hidden_dim}, latent "
                f"{c.latent_dim}, input {c.input_dim}) does not match the policy's ({p.encoder}, hidden "
                f"{p.encoder_hidden}, latent {p.latent_dim}, input {p.input_dim})"
            )
        self.encoder.load_state_dict(encoder.state_dict())
        self.input_shift.copy_(model.input_shift.float())
        self.input_scale.copy_(model.input_scale.float())

    def encode(self, chosen: Tensor, rejected: Tensor, mask: Tensor) -> Tensor:
        """(B, Nc, D) context pairs + (B, Nc) mask -> z (B, L)."""
        if self.hooks is None:
            raise ConfigError("an unconditional (BTL-DPO) policy has no context encoder")
        chosen = (chosen.float() - self.input_shift) / self.input_scale
        rejected = (rejected.float() - self.input_shift) / self.input_scale
        return self.encoder(chosen, rejected, mask)

    def modulate(
        self, z: Tensor | None, row_user: Tensor | None = None, has_context: Tensor | None = None
    ) -> None:
        """Set FiLM for the next forward passes: row r of the batch is modulated by user ``row_user[r]``'s
        z (default: row r by z[r]). None: no FiLM. ``has_context`` (B,) bool: with ``empty_context``
        identity, users without context pairs get γ = 1, β = 0 (multiplied in, so the hypernetworks stay in
        the graph with zero gradient, as DDP needs)."""
        identity_rows = has_context is not None and self.config.empty_context == "identity"
        for hooks, network in self._modulations():
            if z is None:
                hooks.clear()
                continue
            gamma, beta = network(z)
            if identity_rows:
                keep, off = has_context.to(gamma.dtype).view(-1, 1, 1), network.gamma_offset
                gamma, beta = off + keep * (gamma - off), keep * beta
            if row_user is not None:
                gamma, beta = gamma[row_user], beta[row_user]
            hooks.set(gamma, beta)

    def _modulations(self) -> list[tuple[FiLMHooks, FiLMHypernetwork]]:
        """(hooks, the hypernetwork that sets them): FiLM, then the LoRA gates and FiLM on the MLPs when
        there are any."""
        out = [] if self.hooks is None else [(self.hooks, self.hypernetwork)]
        if self.gate_hooks is not None:
            out.append((self.gate_hooks, self.gate_network))
        if self.mlp_hooks is not None:
            out.append((self.mlp_hooks, self.mlp_hypernetwork))
        return out

    # ---- log-probabilities -------------------------------------------------------------------------
    def response_log_probs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prefix_hidden: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Summed log π(response | prompt) (R,) and response lengths (R,) under the current modulation.

        (R, T) ids and masks, right-padded. Logits are computed only where a response token is predicted.
        ``prefix_hidden`` (R, T, H): the input of block :attr:`prefix_blocks` (cached); the blocks before it
        are then skipped."""
        lm = self.causal_lm
        with self._from_prefix(prefix_hidden):
            hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state  # (R, T, H), final norm applied
        predicts = response_mask[:, 1:]  # (R, T-1): position t predicts response token t+1
        logits = self._head(hidden[:, :-1][predicts])  # (N, V)
        token = -F.cross_entropy(logits, input_ids[:, 1:][predicts], reduction="none")  # (N,)
        rows = torch.arange(len(input_ids), device=token.device)[:, None].expand_as(predicts)[predicts]
        summed = torch.zeros(len(input_ids), dtype=token.dtype, device=token.device).index_add(0, rows, token)
        return summed, predicts.sum(dim=1).to(token.dtype)

    def _head(self, hidden: Tensor) -> Tensor:
        """The LM head on (N, H) final hidden states -> (N, V) float32 logits (Gemma-2-style soft-capping
        included)."""
        logits = self.causal_lm.get_output_embeddings()(hidden).float()
        cap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @contextmanager
    def _from_prefix(self, prefix_hidden: Tensor | None) -> Iterator[None]:
        """Inside the block, the model skips its first :attr:`prefix_blocks` blocks and the next block
        reads ``prefix_hidden`` instead of what came before (embeddings are still computed: they are
        cheap, and whatever the model does between them and its first block still happens)."""
        if prefix_hidden is None:
            yield
            return
        start = self.prefix_blocks
        if start == 0:
            raise ConfigError("prefix hidden states need frozen leading blocks (blocks last:K)")
        owner, attribute = block_list_owner(self.causal_lm)
        blocks = getattr(owner, attribute)

        def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (prefix_hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": prefix_hidden.to(kwargs["hidden_states"].dtype)}

        handle = blocks[start].register_forward_pre_hook(replace, with_kwargs=True)
        setattr(owner, attribute, nn.ModuleList(list(blocks)[start:]))
        try:
            yield
        finally:
            setattr(owner, attribute, blocks)
            handle.remove()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        context: tuple[Tensor, Tensor, Tensor] | None = None,
        row_user: Tensor | None = None,
        prefix_hidden: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Summed response log-probabilities (R,) and response lengths (R,) under π(· | D^C).

        ``context`` = (chosen (B, Nc, D), rejected (B, Nc, D), mask (B, Nc)) of B users; row r of the
        batch belongs to user ``row_user[r]``. Without context the policy is unmodulated (BTL-DPO); a user
        whose mask is all False gets z_∅ or, with ``empty_context`` identity, no modulation.
        ``prefix_hidden``: see :meth:`response_log_probs`. FiLM stays set after the call (activation
        checkpointing recomputes the forward during backward); call :meth:`modulate` with None when done."""
        if context is not None and self.hooks is not None:
            self.modulate(self.encode(*context), row_user, has_context=context[2].any(dim=1))
        return self.response_log_probs(input_ids, attention_mask, response_mask, prefix_hidden)

    @torch.no_grad()
    def reference_log_probs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prefix_hidden: Tensor | None = None,
        capture_prefix: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Summed response log-probabilities (R,) under π_ref (see :meth:`reference`), computed in the
        caller's autocast context. ``capture_prefix``: also return the input of block
        :attr:`prefix_blocks` (R, T, H), what :meth:`response_log_probs` accepts as ``prefix_hidden``."""
        captured: list[Tensor] = []
        handle = None
        if capture_prefix:
            block = find_decoder_blocks(self.causal_lm)[self.prefix_blocks]

            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured.append((args[0] if args else kwargs["hidden_states"]).detach())

            handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with self.reference():
                logps, _ = self.response_log_probs(input_ids, attention_mask, response_mask, prefix_hidden)
        finally:
            if handle is not None:
                handle.remove()
        return (logps, captured[0]) if capture_prefix else logps

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside the block the model is π_ref: the base model with adapters disabled, FiLM off and in
        eval mode (no dropout); the previous state is restored after."""
        was_training = self.training
        self.eval()
        with ExitStack() as stack:
            if self.config.lora_r > 0:
                stack.enter_context(self.lm.disable_adapter())
            for hooks, _ in self._modulations():
                stack.enter_context(hooks.disabled())
            try:
                yield
            finally:
                self.train(was_training)

    # ---- trained state -----------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything training changes: LoRA weights, encoder, hypernetwork, input standardisation."""
        state: dict[str, Tensor] = {}
        if self.config.lora_r > 0:
            from peft import get_peft_model_state_dict

            state.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.lm).items()})
        if self.hooks is not None:
            for prefix, module in self._trained_modules():
                state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
            state["input_shift"], state["input_scale"] = self.input_shift, self.input_scale
        return {k: v.detach() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict` (every key must match)."""
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise SteerableError(
                f"policy weights do not match the configuration "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        if self.config.lora_r > 0:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        if self.hooks is not None:
            for prefix, module in self._trained_modules():
                n = len(prefix) + 1
                module.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")})
            self.input_shift.copy_(state["input_shift"])
            self.input_scale.copy_(state["input_scale"])

    def _trained_modules(self) -> list[tuple[str, nn.Module]]:
        modules = [("encoder", self.encoder), ("hypernetwork", self.hypernetwork)]
        if self.gate_hooks is not None:
            modules.append(("gates", self.gate_network))
        if self.mlp_hooks is not None:
            modules.append(("mlp_hypernetwork", self.mlp_hypernetwork))
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``policy.safetensors`` + ``policy_config.json`` atomically; the base is named only."""
        from safetensors.torch import save_file

        from steerable.utils.files import atomic_path, write_json_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_json_atomic(directory / CONFIG_NAME, self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ConditionalPolicy:
        """Load the base model named in the config, wrap it, and load the trained weights."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.exists():
            raise SteerableError(f"{directory}: not a policy folder (no {CONFIG_NAME})")
        try:
            config = PolicyConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise SteerableError(f"{path}: invalid JSON ({exc})") from None
        base, tokenizer = load_base_model(config.base_model, config.dtype, device)
        policy = cls(config, base, tokenizer).to(device)
        policy.load_trainable_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return policy.eval()


def _heads(encoder: SetEncoder) -> int:
    return encoder.attention.num_heads


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{type(model).__name__}: cannot tell the hidden size from its config")
