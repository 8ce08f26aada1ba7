"""What a policy step needs of each sequence besides the policy: π_ref's log-probabilities and, when the
first blocks are frozen (``blocks last:K``), those blocks' output. Both depend on the tokens alone.

:class:`SequenceStore` serves them for the pairs of one :class:`~steerable.policy.tokens.TokenizedPairs`:

* **reference only** (every block trained): log π_ref of a pair's chosen and rejected response, computed
  the first time the pair is asked for and kept in memory (TRL's ``precompute_ref_log_probs``, lazily);
* **reference + prefix** (``prefix_cache`` given): one forward of the base model per sequence gives both
  log π_ref and the hidden states entering block s = :attr:`ConditionalPolicy.prefix_blocks`; they go to
  an on-disk :class:`PrefixCache` and a training step then runs only blocks s..L−1 and the LM head.

π_ref runs in eval mode, adapters and FiLM off, inside the caller's autocast context (``autocast``), so
the policy and its reference are computed in one precision.

:class:`PrefixCache` is laid out like the embedding cache (:mod:`steerable.text.cache`): a namespace per
(model fingerprint, s, precision, weights dtype); ``shard-*.safetensors`` files written atomically, each
with ``keys`` (n, 32) uint8 (SHA-256 of the sequence's token ids, so the text, the chat template and the
length limits are all in the key), ``offsets`` (n + 1,) int64, ``hidden`` (Σ T_i, H) and ``reference``
(n,) float32. A run killed mid-way keeps every finished shard; the rerun computes only the rest.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steerable.errors import ConfigError
from steerable.policy.tokens import TokenizedPairs, collate, pair_batch
from steerable.text.cache import namespace_id
from steerable.utils.files import atomic_path, write_json_atomic

Autocast = Callable[[], AbstractContextManager]
PREFIX_FORMAT = 1


def autocast_context(device: torch.device, precision: str) -> Autocast:
    """A factory of autocast contexts for ``precision`` (no | bf16 | fp16) on ``device``: what the trainer
    gets from accelerate, for evaluation outside a trainer."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in ("no", *dtypes):
        raise ConfigError(f"mixed precision must be no, bf16 or fp16, got {precision!r}")
    if precision == "no":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtypes[precision])


def sequence_key(prompt: list[int], response: list[int]) -> bytes:
    """32-byte SHA-256 of a sequence's token ids (prompt then response)."""
    return hashlib.sha256(np.asarray(prompt + response, dtype=np.int64).tobytes()).digest()


class PrefixCache:
    """Prefix hidden states and reference log-probabilities of one namespace under ``root`` (see the
    module docstring). Any number of processes may add shards."""

    def __init__(self, root: str | Path, description: dict[str, Any]) -> None:
        self.description = {"format": PREFIX_FORMAT, **description}
        self.dir = Path(root) / "prefix" / namespace_id(self.description)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "meta.json").exists():
            write_json_atomic(self.dir / "meta.json", self.description)
        self._index: dict[bytes, tuple[Path, int]] = {}
        self._reference: dict[bytes, float] = {}
        self._offsets: dict[Path, np.ndarray] = {}
        self._handles: dict[Path, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        """Index shards written since the last call (by this or another process)."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in self._offsets:
                continue
            with safe_open(str(shard), framework="np") as handle:
                keys, reference = handle.get_tensor("keys"), handle.get_tensor("reference")
                self._offsets[shard] = handle.get_tensor("offsets")
            for row, key in enumerate(keys):
                k = key.tobytes()
                if k not in self._index:
                    self._index[k] = (shard, row)
                    self._reference[k] = float(reference[row])

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """Keys with nothing stored yet (order kept, duplicates dropped)."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def reference(self, key: bytes) -> float:
        return self._reference[key]

    def hidden(self, key: bytes) -> Tensor:
        """(T, H) prefix hidden states of one sequence (read from the memory-mapped shard)."""
        shard, row = self._index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        start, stop = self._offsets[shard][row : row + 2]
        return self._handles[shard].get_slice("hidden")[int(start) : int(stop)]

    def add(self, keys: list[bytes], hidden: list[Tensor], reference: Tensor, rank: int = 0) -> Path:
        """Write one shard (atomically) and index it. ``hidden[i]`` (T_i, H); ``reference`` (n,)."""
        if not len(keys) == len(hidden) == len(reference):
            raise ValueError(f"{len(keys)} keys, {len(hidden)} hidden states, {len(reference)} references")
        path = self.dir / f"shard-r{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        lengths = torch.tensor([0] + [len(h) for h in hidden], dtype=torch.int64)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 32),
            "offsets": lengths.cumsum(0),
            "hidden": torch.cat([h.cpu() for h in hidden]).contiguous(),
            "reference": reference.detach().float().cpu(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        self.refresh()
        return path


class SequenceStore:
    """Reference log-probabilities (and prefix hidden states) of the pairs of ``tokens`` for ``policy``
    (see the module docstring)."""

    def __init__(
        self,
        policy: Any,
        tokens: TokenizedPairs,
        pad_id: int,
        autocast: Autocast = nullcontext,
        prefix_cache: PrefixCache | None = None,
        max_pairs_per_forward: int = 16,
    ) -> None:
        if prefix_cache is not None and policy.prefix_blocks == 0:
            raise ConfigError("a prefix cache needs frozen leading blocks (blocks last:K)")
        self.policy, self.tokens, self.pad_id, self.autocast = policy, tokens, pad_id, autocast
        self.cache, self.max_pairs = prefix_cache, max_pairs_per_forward
        self._reference: dict[int, tuple[float, float]] = {}
        self._checked = False

    @property
    def uses_prefix(self) -> bool:
        return self.cache is not None

    def keys(self, pair: int) -> tuple[bytes, bytes]:
        """Cache keys of a pair's chosen and rejected sequences."""
        prompt = self.tokens.prompt[pair]
        return sequence_key(prompt, self.tokens.chosen[pair]), sequence_key(
            prompt, self.tokens.rejected[pair]
        )

    # ---- reference log-probabilities ---------------------------------------------------------------
    @torch.no_grad()
    def reference(self, pairs: list[int]) -> Tensor:
        """(2·len(pairs),): log π_ref of [chosen of every pair] + [rejected of every pair], on the policy's
        device."""
        if self.cache is not None:
            self.fill(pairs, progress=False)
            keys = [self.keys(p) for p in pairs]
            values = [self.cache.reference(k[0]) for k in keys] + [self.cache.reference(k[1]) for k in keys]
        else:
            todo = [p for p in dict.fromkeys(pairs) if p not in self._reference]
            for start in range(0, len(todo), self.max_pairs):
                chunk = todo[start : start + self.max_pairs]
                batch = pair_batch(self.tokens, [chunk], self.pad_id, self.policy.device)
                with self.autocast():
                    ref = self.policy.reference_log_probs(
                        batch.input_ids, batch.attention_mask, batch.response_mask
                    )
                for i, p in enumerate(chunk):
                    self._reference[p] = (float(ref[i]), float(ref[len(chunk) + i]))
            values = [self._reference[p][0] for p in pairs] + [self._reference[p][1] for p in pairs]
        return torch.tensor(values, dtype=torch.float32, device=self.policy.device)

    # ---- prefix hidden states ----------------------------------------------------------------------
    def prefix(self, pairs: list[int], width: int) -> Tensor | None:
        """(2·len(pairs), width, H) prefix hidden states of [chosen] + [rejected], right-padded with zeros
        like :func:`~steerable.policy.tokens.pair_batch`; None without a prefix cache."""
        if self.cache is None:
            return None
        self.fill(pairs, progress=False)
        keys = [self.keys(p) for p in pairs]
        states = [self.cache.hidden(k[0]) for k in keys] + [self.cache.hidden(k[1]) for k in keys]
        out = torch.zeros(len(states), width, states[0].shape[1], dtype=states[0].dtype)
        for row, h in enumerate(states):
            out[row, : len(h)] = h
        return out.to(self.policy.device, non_blocking=True)

    @torch.no_grad()
    def fill(
        self,
        pairs: Iterable[int],
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
        shard_size: int = 256,
    ) -> int:
        """Compute what the prefix cache lacks for ``pairs`` (this process's share of it when ``world`` > 1:
        shards are dealt round-robin; wait for the others, then :meth:`PrefixCache.refresh`). Sequences
        are length-sorted into forwards of at most ``2 · max_pairs_per_forward`` rows. Returns how many
        sequences this process computed."""
        if self.cache is None:
            return 0
        wanted: dict[bytes, tuple[list[int], list[int]]] = {}
        for p in pairs:
            for key, response in zip(
                self.keys(p), (self.tokens.chosen[p], self.tokens.rejected[p]), strict=True
            ):
                wanted.setdefault(key, (self.tokens.prompt[p], response))
        missing = self.cache.missing(wanted)
        if not missing:
            return 0
        missing.sort(key=lambda k: len(wanted[k][0]) + len(wanted[k][1]))
        shards = [missing[i : i + shard_size] for i in range(0, len(missing), shard_size)]
        mine = [s for i, s in enumerate(shards) if i % world == rank]
        from tqdm.auto import tqdm

        rows = 2 * self.max_pairs
        bar = tqdm(
            total=sum(len(s) for s in mine),
            desc="prefix cache",
            unit="seq",
            disable=not progress,
            leave=False,
        )
        for shard in mine:
            hidden: list[Tensor] = []
            reference: list[Tensor] = []
            for start in range(0, len(shard), rows):
                chunk = [wanted[k] for k in shard[start : start + rows]]
                ids, attention, response = collate(
                    [c[0] for c in chunk], [c[1] for c in chunk], self.pad_id, self.policy.device
                )
                with self.autocast():
                    ref, states = self.policy.reference_log_probs(
                        ids, attention, response, capture_prefix=True
                    )
                    if not self._checked:
                        self._check_prefix_path(ids, attention, response, ref, states)
                lengths = attention.sum(dim=1).tolist()
                hidden += [states[i, :n] for i, n in enumerate(lengths)]
                reference.append(ref)
                bar.update(len(chunk))
            self.cache.add(shard, hidden, torch.cat(reference), rank=rank)
        bar.close()
        return sum(len(s) for s in mine)

    def _check_prefix_path(
        self, ids: Tensor, attention: Tensor, response: Tensor, full: Tensor, states: Tensor
    ) -> None:
        """The model must give the same log-probabilities from its cached prefix as from the tokens
        (an architecture that changes the hidden state between blocks in an unforeseen way would not)."""
        from_prefix = self.policy.reference_log_probs(ids, attention, response, prefix_hidden=states)
        error = float((from_prefix - full).abs().max())
        scale = float(full.abs().max()) + 1.0
        if error > 1e-3 * scale:
            raise ConfigError(
                f"{type(self.policy.causal_lm).__name__} does not run from cached hidden states (log-probs "
                f"differ by {error:.3g}); train it with blocks all or without the prefix cache"
            )
        self._checked = True


def prefix_fingerprint(policy: Any) -> str:
    """SHA-256 prefix of the weights the prefix hidden states depend on: every base parameter outside
    blocks ≥ :attr:`prefix_blocks` (embeddings, the frozen blocks; LoRA excluded), in order."""
    from steerable.policy.blocks import block_list_name

    lm = policy.causal_lm
    blocks = block_list_name(lm) + "."
    digest = hashlib.sha256()
    for name, param in lm.named_parameters():
        if "lora_" in name:
            continue
        if name.startswith(blocks) and int(name[len(blocks) :].split(".", 1)[0]) >= policy.prefix_blocks:
            continue
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def prefix_cache_for(policy: Any, precision: str, cache_dir: str | Path | None = None) -> PrefixCache:
    """The prefix cache of ``policy``'s frozen blocks computed at ``precision`` (no | bf16 | fp16)."""
    from steerable.text.cache import default_cache_root

    root = Path(cache_dir) if cache_dir else default_cache_root()
    description = {
        "weights": prefix_fingerprint(policy),
        "prefix_blocks": policy.prefix_blocks,
        "precision": precision,
        "architecture": type(policy.causal_lm).__name__,
    }
    return PrefixCache(root, description)
