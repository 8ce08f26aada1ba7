"""Frozen Hugging Face models as embedders of options y = [x, ỹ], with an on-disk cache.

What is embedded, exactly:

* **Causal LMs** (the paper's rule, ``pooling="last-token"``): the conversation [prompt ‖ completion] is
  rendered with the tokenizer's chat template (when it has one and ``chat_template`` is on; otherwise
  the contents joined by a blank line) and the embedding is the last layer's hidden state at the last
  token. Texts longer than ``max_length`` tokens keep their *last* ``max_length`` tokens.
* **Sentence encoders** (``pooling="mean"``, e.g. all-MiniLM-L6-v2, the CPU default): the prompt and the
  completion joined by a blank line, mean of the last layer over tokens, L2-normalised (as
  sentence-transformers does). Longer texts are either cut to their first ``max_length`` tokens
  (``long_texts="truncate"``) or split into windows of ``max_length`` tokens whose token-mean embeddings are
  averaged weighted by their number of tokens (``"chunk"``: the whole text counts).

Identical texts are embedded once; texts are sorted by length before batching; the number of texts
cut by truncation is counted and reported. Vectors are cached by (model fingerprint, pooling, maximum
length, long-text rule, normalisation) and SHA-256 of the rendered text (:mod:`steerable.text.cache`).

Under ``accelerate launch`` (several processes, GPUs or machines), each process embeds its own shards
of the missing texts and then every process reads all of them; with one process nothing changes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from steerable.data.schema import PreferenceData
from steerable.data.text import Message, TextPreferences
from steerable.errors import ConfigError, SteerableError
from steerable.text.cache import EmbeddingCache, MissingVectors, default_cache_root, text_key
from steerable.text.models import ResolvedModel, resolve_model
from steerable.utils.config import option

CAUSAL_HINTS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class EmbedderConfig:
    """Which frozen model embeds options, and how (see the module docstring)."""

    model: str = option(
        "all-MiniLM-L6-v2", "model folder, hub name, 'all-MiniLM-L6-v2' or 'SmolLM2-135M-Instruct'"
    )
    pooling: str = option(
        "auto",
        "auto (last-token for causal LMs, else mean) | mean | last-token",
        choices=["auto", "mean", "last-token"],
    )
    max_length: int = option(256, "tokens per text (or per window with long_texts=chunk)")
    long_texts: str = option(
        "chunk",
        "texts over max_length: truncate, or chunk into windows and average (mean pooling)",
        choices=["truncate", "chunk"],
    )
    batch_size: int = option(32, "texts (windows) per forward pass")
    chat_template: bool = option(True, "render conversations with the tokenizer's chat template (causal LMs)")
    device: str = option("auto", "torch device; auto: the accelerate process's device, else cpu")
    cache_dir: str | None = option(
        None, "embedding cache root (default: $STEERABLE_CACHE or ~/.cache/steerable)"
    )
    shard_size: int = option(512, "texts per cache shard (the unit a killed run keeps)")

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("batch_size and shard_size must be >= 1")


@dataclass
class EmbeddingStats:
    """What the last call did."""

    texts: int = 0
    unique: int = 0
    cached: int = 0
    embedded: int = 0
    truncated: int = 0  # texts longer than max_length tokens (cut, or chunked into several windows)
    windows: int = 0
    seconds: float = 0.0
    model_load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        longer = f" ({self.truncated} longer than the limit)" if self.embedded else ""
        return (
            f"{self.texts} texts, {self.unique} unique: {self.cached} from cache, {self.embedded} embedded"
            f"{longer} in {self.seconds:.1f} s"
        )


def _process_info() -> tuple[int, int, Any]:
    """(rank, world size, state or None) of an ``accelerate launch`` run; (0, 1, None) otherwise."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from steerable.utils.distributed import process_state

    state = process_state()
    return state.process_index, state.num_processes, state


class Embedder:
    """Embeds texts or conversations with a frozen model, through the cache. The model is loaded only
    when some text is missing from the cache."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self.resolved: ResolvedModel = resolve_model(self.config.model)
        self._model = None
        self._tokenizer = None
        self._hf_config = None
        self.stats = EmbeddingStats()
        self.rank, self.world, self._state = _process_info()
        cache_root = Path(self.config.cache_dir) if self.config.cache_dir else default_cache_root()
        self.cache = EmbeddingCache(cache_root, self.namespace())

    # ---- model ---------------------------------------------------------------------------------
    @property
    def hf_config(self):
        if self._hf_config is None:
            from transformers import AutoConfig

            try:
                self._hf_config = AutoConfig.from_pretrained(self.resolved.path)
            except OSError as exc:
                raise SteerableError(
                    f"cannot load model '{self.config.model}': {exc}".split("\n")[0]
                ) from None
        return self._hf_config

    @property
    def pooling(self) -> str:
        if self.config.pooling != "auto":
            return self.config.pooling
        architectures = getattr(self.hf_config, "architectures", None) or []
        causal = getattr(self.hf_config, "is_decoder", False) or any(
            h in a for a in architectures for h in CAUSAL_HINTS
        )
        return "last-token" if causal else "mean"

    @property
    def max_length(self) -> int:
        """Tokens per text or window: ``max_length``, or fewer when the model has fewer positions."""
        positions = getattr(self.hf_config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < self.config.max_length:
            return positions
        return self.config.max_length

    def namespace(self) -> dict[str, Any]:
        """Everything besides the text that determines a vector (the cache namespace)."""
        return {
            "model": self.resolved.fingerprint,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "long_texts": self.config.long_texts if self.pooling == "mean" else "keep-last",
            "normalize": self.pooling == "mean",
            "dtype": "float32",
            "format": 1,
        }

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
            self._tokenizer.model_max_length = 1 << 30  # long texts are windowed here, not by the tokenizer
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        if self.config.device != "auto":
            return torch.device(self.config.device)
        return self._state.device if self._state is not None else torch.device("cpu")

    def _load_model(self):
        if self._model is None:
            from transformers import AutoModel

            start = time.perf_counter()
            try:
                self._model = (
                    AutoModel.from_pretrained(self.resolved.path, dtype=torch.float32).to(self.device).eval()
                )
            except OSError as exc:
                raise SteerableError(
                    f"cannot load model '{self.config.model}': {exc}".split("\n")[0]
                ) from None
            self.stats.model_load_seconds += time.perf_counter() - start
        return self._model

    # ---- rendering -------------------------------------------------------------------------------
    def render(self, messages: list[Message]) -> str:
        """The exact text embedded for one option (see the module docstring)."""
        if (
            self.pooling == "last-token"
            and self.config.chat_template
            and getattr(self.tokenizer, "chat_template", None)
        ):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    # ---- embedding -------------------------------------------------------------------------------
    def embed_messages(self, conversations: list[list[Message]], progress: bool | None = None) -> np.ndarray:
        """(N,) conversations -> (N, D) float32."""
        return self.embed_texts([self.render(c) for c in conversations], progress=progress)

    def embed_texts(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        """(N,) texts -> (N, D) float32, reading the cache and embedding only what is missing."""
        start = time.perf_counter()
        keys = self.fill_cache(texts, progress=progress)
        if self._state is not None:  # every process waits for the others' shards, then reads them
            self._state.wait_for_everyone()
            self.cache.refresh()
        try:
            vectors = self.cache.get(keys) if keys else np.zeros((0, 0), dtype=np.float32)
        except MissingVectors:  # a shard was pruned meanwhile (size cap, another process): embed it again
            if self._state is not None:
                raise
            self.cache.refresh()
            vectors = self.cache.get(self.fill_cache(texts, progress=progress))
        self.stats.seconds = time.perf_counter() - start
        return vectors

    def fill_cache(self, texts: list[str], progress: bool | None = None) -> list[bytes]:
        """Embed this process's share of the texts missing from the cache (shards are dealt round-robin
        to the ``world`` processes); returns every text's cache key."""
        self.stats = EmbeddingStats(texts=len(texts))
        keys = [text_key(t) for t in texts]
        unique = dict(zip(keys, texts, strict=True))
        self.stats.unique = len(unique)
        missing = self.cache.missing(unique)
        self.stats.cached = len(unique) - len(missing)
        shards = [
            missing[i : i + self.config.shard_size] for i in range(0, len(missing), self.config.shard_size)
        ]
        mine = [s for n, s in enumerate(shards) if n % self.world == self.rank]
        self._embed_into_cache([(k, unique[k]) for shard in mine for k in shard], progress)
        self.stats.embedded = sum(len(s) for s in mine)
        return keys

    @property
    def _affixes(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (e.g. [CLS] ... [SEP])."""
        if not hasattr(self, "_affix_cache"):
            plain = self.tokenizer("hello", add_special_tokens=False)["input_ids"]
            full = self.tokenizer("hello", add_special_tokens=True)["input_ids"]
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
            self._affix_cache = (full[:at], full[at + len(plain) :])
        return self._affix_cache

    @property
    def room(self) -> int:
        """Text tokens per window (``max_length`` minus the special tokens)."""
        prefix, suffix = self._affixes
        return self.max_length - len(prefix) - len(suffix)

    def _windows(self, ids: list[int]) -> list[list[int]]:
        """Token windows of one text, special tokens added, per the long-text rule."""
        (prefix, suffix), room = self._affixes, self.room
        if self.pooling == "last-token":
            pieces = [ids[-room:]]
        elif self.config.long_texts == "truncate" or len(ids) <= room:
            pieces = [ids[:room]]
        else:
            pieces = [ids[i : i + room] for i in range(0, len(ids), room)]
        return [prefix + p + suffix for p in pieces]

    @torch.inference_mode()
    def _embed_into_cache(self, items: list[tuple[bytes, str]], progress: bool | None) -> None:
        if not items:
            return
        model, tok = self._load_model(), self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        room = self.room
        bar = tqdm(
            total=len(items),
            desc=f"embed ({self.resolved.display_name})",
            unit="text",
            disable=(not progress) if progress is not None else None,
            leave=False,
            dynamic_ncols=True,
        )
        for start in range(0, len(items), self.config.shard_size):  # one cache shard at a time
            chunk = items[start : start + self.config.shard_size]
            token_ids = tok([t for _, t in chunk], add_special_tokens=False)["input_ids"]
            self.stats.truncated += sum(len(ids) > room for ids in token_ids)
            windows = [(i, w) for i, ids in enumerate(token_ids) for w in self._windows(ids)]
            self.stats.windows += len(windows)
            order = sorted(range(len(windows)), key=lambda j: len(windows[j][1]))
            sums = np.zeros((len(chunk), model.config.hidden_size), dtype=np.float64)
            weights = np.zeros(len(chunk), dtype=np.float64)
            for b in range(0, len(order), self.config.batch_size):
                batch = [windows[j] for j in order[b : b + self.config.batch_size]]
                width = max(len(w) for _, w in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, w) in enumerate(batch):
                    input_ids[r, : len(w)] = torch.tensor(w)
                    mask[r, : len(w)] = 1
                hidden = model(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
                hidden, mask = hidden.float().cpu(), mask.cpu()
                if self.pooling == "last-token":
                    pooled = hidden[torch.arange(len(batch)), mask.sum(1) - 1]  # (b, H)
                    counts = torch.ones(len(batch))
                else:
                    counts = mask.sum(1).float()
                    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / counts.unsqueeze(
                        -1
                    )  # token mean per window
                for r, (i, _) in enumerate(batch):
                    sums[i] += pooled[r].double().numpy() * float(counts[r])
                    weights[i] += float(counts[r])
            vectors = sums / weights[:, None]
            if self.pooling == "mean":
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
            self.cache.add([k for k, _ in chunk], vectors.astype(np.float32), rank=self.rank)
            bar.update(len(chunk))
        bar.close()

    def describe(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "namespace": self.namespace(), "stats": asdict(self.stats)}


def embed_preferences(
    data: TextPreferences, embedder: Embedder, progress: bool | None = None
) -> PreferenceData:
    """Turn text pairs into vector pairs (each option is [prompt ‖ completion], see the module docstring)."""
    chosen, rejected = data.option_messages()
    vectors = embedder.embed_messages(chosen + rejected, progress=progress)
    n = data.num_pairs
    return PreferenceData(
        user_ids=data.user_ids,
        chosen=vectors[:n],
        rejected=vectors[n:],
        prompts=data.prompt_strings(),
        hidden_mode=data.hidden_mode,
        hidden_z=data.hidden_z,
        source=data.source,
    )


EMBEDDER_NAME = "embedder.json"


def save_embedder_config(config: EmbedderConfig, model_dir: str | Path) -> Path:
    """Record, next to a reward model, which embedder turns text into its inputs."""
    from steerable.utils.files import write_json_atomic

    path = Path(model_dir) / EMBEDDER_NAME
    write_json_atomic(path, {k: v for k, v in asdict(config).items() if k not in ("cache_dir", "device")})
    return path


def load_embedder_config(model_dir: str | Path) -> EmbedderConfig | None:
    """The embedder recorded next to a reward model (None for models trained on vectors)."""
    import json

    path = Path(model_dir) / EMBEDDER_NAME
    if not path.exists():
        return None
    return EmbedderConfig(**json.loads(path.read_text(encoding="utf-8")))
