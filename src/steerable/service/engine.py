"""The engine of the personalization service: models, embedder, policy and store behind the routes.

:class:`Engine` takes and returns plain JSON values: it turns options into vectors (text through the
model's embedder), personalises the reward models on a user's newest stored pairs and on inline contexts,
and scores, compares, picks the next query and generates. Problems a client can fix raise
:class:`~steerable.service.schemas.APIError`; a database that cannot answer raises
:class:`~steerable.service.store.StoreUnavailable` (503). :func:`build_engine` loads everything
``steerable serve`` needs (:func:`load_models`, the embedder, the policy, the store) on one torch device.

Memory: one :class:`~steerable.service.caches.ByteLRU` of ``limits.max_cache_bytes`` holds the personalised
models of users (keyed by the user and checked against the id of their newest stored pair, read from the
store on every request, so a write through any replica is seen at once) and of inline contexts (keyed by
the user's newest pair id and the context's content), and text embeddings. A user's pairs are read from
the store only when their personalised model is missing, and then only their newest ``max_context``
pairs, decoded one at a time; at most :data:`MAX_LOADS` requests read and personalise at once.
"""

import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.errors import ConfigError, SteerableError
from steerable.service.caches import ByteLRU, TextEncoder, nbytes, shared_storages
from steerable.service.schemas import (
    MIN_TEMPERATURE,
    STRATEGIES,
    APIError,
    Limits,
    as_messages,
)
from steerable.service.store import PreferenceStore, StoredPair, open_store

# Requests reading and personalising stored pairs at once: each holds its pairs' text, their vectors and the
# encoder's activations (~50 MB of peak memory for 1,000 pairs of 384 numbers). With 8 threads on 2 cores,
# 1, 2 and 4 gave the same throughput (decoding JSON holds the GIL) and peak RSS +0.02, +0.13, +0.26 GB.
MAX_LOADS = 1
QUICK_CONTEXT = 100  # inline context pairs that are personalised on the event loop (numeric, SQLite)


@dataclass
class Personalized:
    """Reward models personalised on a context of ``num_context`` pairs; ``version``: the id of the newest
    stored pair among them (0: none)."""

    version: int
    num_context: int
    models: list[Any]  # one PersonalizedRewardModel per ensemble member


class Engine:
    """Models, embedder, policy and store behind the routes; every method takes plain JSON values."""

    def __init__(
        self,
        models: list[Any],
        store: PreferenceStore,
        embedder: Any = None,
        policy: Any = None,
        seed: int = 0,
        limits: Limits | None = None,
    ) -> None:
        from steerable.active import has_latent_spread

        self.models, self.store, self.policy = models, store, policy
        self.limits = limits or Limits()
        self.text = embedder is not None
        self.embedder = embedder
        self.cache = ByteLRU(self.limits.max_cache_bytes)
        self.encoder = TextEncoder(embedder, self.cache) if embedder is not None else None
        self.dim = models[0].config.input_dim
        self.seed = seed
        self.spread = has_latent_spread(models if len(models) > 1 else models[0])
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._policy_lock = threading.Lock()
        self._loads = threading.BoundedSemaphore(MAX_LOADS)
        self._prior = Personalized(0, 0, [m.personalize() for m in models])
        self._shared = shared_storages(models, lambda: [m.personalize() for m in models])
        self._empty = np.zeros((0, self.dim), dtype=np.float32)

    @property
    def device(self) -> torch.device:
        """Where the models (and every tensor computed from them) live."""
        return self.models[0].device

    # ---- options -> vectors ----------------------------------------------------------------------
    def vectors(self, options: list[Any], prompts: list[Any] | None = None) -> np.ndarray:
        """(N,) options (with their prompts, text models) -> (N, D) float32."""
        if not self.text:
            return np.asarray(options, dtype=np.float32).reshape(len(options), self.dim)
        prompts = prompts if prompts is not None else [None] * len(options)
        assert self.encoder is not None
        try:
            return self.encoder(
                [
                    as_messages(p, "user") + as_messages(o, "assistant")
                    for o, p in zip(options, prompts, strict=True)
                ]
            )
        except SteerableError as exc:
            raise APIError(503, f"the embedder failed: {exc}") from None

    def pair_vectors(self, pairs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Pairs ``{"chosen", "rejected", "prompt"?}`` -> (N, D) chosen and rejected vectors."""
        if not pairs:
            return self._empty, self._empty
        prompts = [p.get("prompt") for p in pairs] * 2
        both = self.vectors([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], prompts)
        return both[: len(pairs)], both[len(pairs) :]

    def stored_vectors(
        self, stored: list[StoredPair], visit: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stored pairs -> (N, D) chosen and rejected vectors; ``visit`` sees every decoded pair. Numeric
        pairs are decoded one at a time into the arrays (no list of N decoded pairs is ever held)."""
        if self.text:
            pairs = [s.pair for s in stored]
            if visit is not None:
                for p in pairs:
                    visit(p)
            return self.pair_vectors(pairs)
        chosen = np.empty((len(stored), self.dim), dtype=np.float32)
        rejected = np.empty((len(stored), self.dim), dtype=np.float32)
        for i, s in enumerate(stored):
            p = s.pair
            chosen[i], rejected[i] = p["chosen"], p["rejected"]
            if visit is not None:
                visit(p)
        return chosen, rejected

    def option_key(self, option: Any, prompt: Any) -> bytes:
        """Identity of an option (a digest of its numbers, or of its whole conversation for text)."""
        plain = option if not self.text else as_messages(prompt, "user") + as_messages(option, "assistant")
        return hashlib.blake2b(json.dumps(plain).encode(), digest_size=16).digest()

    def pair_key(self, a: Any, b: Any, prompt: Any) -> frozenset[bytes]:
        """Identity of an unordered pair (a user who answered (a, b) has answered (b, a))."""
        return frozenset((self.option_key(a, prompt), self.option_key(b, prompt)))

    # ---- personalisation -----------------------------------------------------------------------------
    def _personalize(self, chosen: np.ndarray, rejected: np.ndarray, loc: Sequence[str | int]) -> list[Any]:
        personalized = [m.personalize(chosen, rejected) for m in self.models]
        for p in personalized:
            if p.embedding is not None and not np.isfinite(p.embedding).all():
                raise APIError(
                    422,
                    "the context pairs give a non-finite user embedding (values far outside the model's "
                    "range?)",
                    loc,
                )
        return personalized

    def _keep(self, key: tuple, entry: Personalized) -> None:
        self.cache.put(key, entry, nbytes(entry, self._shared))

    def user_models(self, user_id: str | None) -> Personalized:
        """The models personalised on the user's newest stored pairs: from the cache while the id of the
        user's newest pair is unchanged, otherwise from the pairs read (with that id) from the store."""
        if user_id is None:
            return self._prior
        version = self.store.version(user_id)
        if version == 0:
            return self._prior
        key = ("user", user_id)
        hit = self.cache.get(key)
        if hit is not None and hit.version == version:
            return hit
        with self._loads:
            hit = self.cache.peek(key)  # loaded by a concurrent request meanwhile?
            if hit is not None and hit.version == version:
                return hit
            stored = self.store.pairs(user_id, last=self.limits.max_context)
            if not stored:  # deleted meanwhile
                return self._prior
            chosen, rejected = self.stored_vectors(stored)
            models = self._personalize(chosen, rejected, ("path", "user_id"))
        entry = Personalized(stored[-1].id, len(stored), models)
        self._keep(key, entry)
        return entry

    def quick(self, user_id: str | None, num_inline: int) -> bool:
        """Whether a score or compare needs no read of stored pairs (the user's personalised model is
        cached, or there is none) and at most a small personalisation of inline pairs."""
        if num_inline > QUICK_CONTEXT:
            return False
        version = self.store.version(user_id) if user_id is not None else 0
        if version == 0 or num_inline:
            return version == 0
        hit = self.cache.peek(("user", user_id))
        return hit is not None and hit.version == version

    def context(self, user_id: str | None, inline: list[dict[str, Any]] | None) -> tuple[list[Any], int]:
        """Personalised models for the stored pairs plus inline ones (newest ``max_context`` kept)."""
        if not inline:
            entry = self.user_models(user_id)
            return entry.models, entry.num_context
        inline_chosen, inline_rejected = self.pair_vectors(inline)
        need = self.limits.max_context - len(inline)  # stored pairs that stay among the newest
        digest = hashlib.blake2b(inline_chosen.tobytes() + inline_rejected.tobytes(), digest_size=16)
        version = self.store.version(user_id) if user_id is not None and need > 0 else 0
        hit = self.cache.get(("context", user_id if version else None, version, digest.digest()))
        if hit is not None:  # clients that send the same context again
            return hit.models, hit.num_context
        with self._loads:
            stored = self.store.pairs(user_id, last=need) if version else []
            stored_chosen, stored_rejected = self.stored_vectors(stored)
            chosen = np.ascontiguousarray(np.concatenate([stored_chosen, inline_chosen]))
            rejected = np.ascontiguousarray(np.concatenate([stored_rejected, inline_rejected]))
            models = self._personalize(chosen, rejected, ("body", "context"))
        version = stored[-1].id if stored else 0
        entry = Personalized(version, len(chosen), models)
        self._keep(("context", user_id if version else None, version, digest.digest()), entry)
        return entry.models, entry.num_context

    def forget(self, user_id: str) -> int:
        self.cache.pop(("user", user_id))
        return self.store.delete_user(user_id)

    # ---- predictions -----------------------------------------------------------------------------------
    @staticmethod
    def _finite(values: np.ndarray, field: str) -> list[float]:
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            shown = ", ".join(str(i) for i in bad[:5])
            raise APIError(
                422,
                f"the model's output is not finite for {field} {shown} (values far outside its range?)",
                ("body", field, int(bad[0])),
            )
        return values.astype(float).tolist()

    def score(self, user_id: str | None, options: list[Any], prompt: Any, context: Any) -> tuple[list, int]:
        personalized, n = self.context(user_id, context)
        x = self.vectors(options, [prompt] * len(options))
        rewards = np.mean([p.rewards(x) for p in personalized], axis=0)
        return self._finite(rewards, "options"), n

    def compare(self, user_id: str | None, pairs: list[dict[str, Any]], context: Any) -> tuple[list, int]:
        personalized, n = self.context(user_id, context)
        prompts = [p.get("prompt") for p in pairs]
        a, b = self.vectors([p["a"] for p in pairs], prompts), self.vectors([p["b"] for p in pairs], prompts)
        probs = np.mean([p.compare(a, b) for p in personalized], axis=0)
        return self._finite(probs, "pairs"), n

    def next_query(
        self, user_id: str, candidates: list[dict[str, Any]], strategy: str, seed: int | None
    ) -> dict[str, Any]:
        """The candidate to ask next, given the user's newest ``max_context`` stored pairs (candidates
        among those already answered are excluded)."""
        from steerable.active import select_next

        if strategy == "info-gain" and not self.spread:
            raise APIError(
                422,
                f"info-gain needs uncertainty about the user's z: a vnp-btl model or an ensemble (--model "
                f"given several times); this server has one {self.models[0].model_type} model. Use "
                f"'uncertainty' or 'random'.",
                ("body", "strategy"),
            )
        keys = [self.pair_key(c["a"], c["b"], c.get("prompt")) for c in candidates]
        prompts = [c.get("prompt") for c in candidates]
        a = self.vectors([c["a"] for c in candidates], prompts)
        b = self.vectors([c["b"] for c in candidates], prompts)
        if seed is None:
            with self._rng_lock:
                seed = int(self._rng.integers(2**63 - 1))
        answered: set[frozenset[bytes]] = set()
        with self._loads:  # reading the pairs and conditioning on them: the memory-heavy part
            stored = self.store.pairs(user_id, last=self.limits.max_context)
            chosen, rejected = self.stored_vectors(
                stored, lambda p: answered.add(self.pair_key(p["chosen"], p["rejected"], p.get("prompt")))
            )
            excluded = [i for i, key in enumerate(keys) if key in answered]
            if len(excluded) == len(candidates):
                raise APIError(
                    422, "the user has already answered every candidate pair", ("body", "candidates")
                )
            has_context = len(chosen) > 0
            try:
                query = select_next(
                    self.models if len(self.models) > 1 else self.models[0],
                    a,
                    b,
                    strategy=strategy,
                    rng=seed,
                    context_chosen=chosen if has_context else None,
                    context_rejected=rejected if has_context else None,
                    exclude=excluded,
                )
            except ConfigError as exc:
                raise APIError(422, str(exc), ("body", "candidates")) from None
        scores = [None if math.isnan(s) else float(s) for s in query.scores.tolist()]
        if any(s is not None and not math.isfinite(s) for s in scores):
            raise APIError(
                422, "the model's output is not finite for some candidates", ("body", "candidates")
            )
        return {
            "user_id": user_id,
            "index": query.index,
            "strategy": query.strategy,
            "score": query.score,
            "scores": scores,
            "excluded": excluded,
            "num_context": len(chosen),
        }

    def generate(self, user_id: str, prompts: list[Any], sampling: dict[str, Any]) -> tuple[list[str], int]:
        if self.policy is None:
            raise APIError(409, "no policy loaded: start the server with --policy DIR to generate")
        with self._loads:
            stored = [s.pair for s in self.store.pairs(user_id, last=self.limits.max_context)]
        context = [{k: p[k] for k in ("prompt", "chosen", "rejected") if k in p} for p in stored]
        if sampling.get("seed") is None:
            sampling["seed"] = self.seed
        if sampling.get("temperature", 1.0) < MIN_TEMPERATURE:  # logits / 1e-300 overflow: decode greedily
            sampling["temperature"] = 0.0
        with self._policy_lock:
            try:
                responses = self.policy.generate(prompts, context=context, **sampling)
            except (SteerableError, ValueError) as exc:
                raise APIError(409, f"cannot generate for this user: {exc}") from None
        return responses, len(context)

    def health(self) -> dict[str, Any]:
        from steerable import __version__

        return {
            "version": __version__,
            "model_type": self.models[0].model_type,
            "ensemble_size": len(self.models),
            "input_dim": self.dim,
            "options": "text" if self.text else "numeric",
            "embedder": self.embedder.config.model if self.embedder is not None else None,
            "policy_loaded": self.policy is not None,
            "strategies": [s for s in STRATEGIES if s != "info-gain" or self.spread],
            "store": self.store.kind,
            "device": str(self.device),
            "cache": self.cache.stats(),
        }

    def close(self) -> None:
        self.store.close()


# ---- loading ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device name, checked to be usable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: unknown device {name!r} (e.g. cpu, cuda, cuda:1, mps, auto)") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here")
    return device


def load_models(
    model_dirs: Sequence[str | Path], device: str | torch.device = "cpu"
) -> tuple[list[Any], Any]:
    """Reward models (safetensors) on ``device`` and the embedder their folders record; one line per
    problem."""
    from steerable.models.registry import load_reward_model
    from steerable.text.embedder import load_embedder_config

    if not model_dirs:
        raise ConfigError("give at least one --model folder")
    models, embedders = [], []
    for directory in model_dirs:
        if not Path(directory).is_dir():
            raise ConfigError(f"{directory}: no such model folder")
        try:
            models.append(load_reward_model(directory, device=device))
            embedders.append(load_embedder_config(directory))
        except SteerableError:
            raise
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{directory}: cannot load the model ({exc})") from None
    dims = {m.config.input_dim for m in models}
    if len(dims) > 1:
        raise ConfigError(f"the --model folders take options of different sizes: {sorted(dims)}")
    if any(e != embedders[0] for e in embedders):
        raise ConfigError("the --model folders were trained on different embedders (embedder.json differs)")
    return models, embedders[0]


def _make_embedder(config: Any, dim: int) -> Any:
    from steerable.text.embedder import Embedder

    try:
        embedder = Embedder(config)
        _ = embedder.pooling, embedder.tokenizer  # fail at startup, not on the first request
        width = getattr(embedder.hf_config, "hidden_size", dim)
    except SteerableError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the embedder {config.model!r}: {str(exc).splitlines()[0]}") from None
    if width != dim:
        raise ConfigError(f"the embedder {config.model!r} gives {width} values but the model takes {dim}")
    return embedder


def build_engine(
    model_dirs: Sequence[str | Path],
    db: str | Path,
    policy_dir: str | Path | None = None,
    seed: int = 0,
    limits: Limits | None = None,
    device: str = "cpu",
    pool_size: int = 10,
    db_timeout: float = 5.0,
) -> Engine:
    """Load everything ``steerable serve`` needs on ``device`` (models, embedder, policy) and open the
    store (``db``: an SQLite file or a ``postgresql://`` URL); configuration problems raise
    :class:`SteerableError`."""
    limits = limits or Limits()
    where = resolve_device(device)
    models, embedder_config = load_models(model_dirs, where)
    dim = models[0].config.input_dim
    embedder = None
    if embedder_config is not None:
        embedder = _make_embedder(dataclasses.replace(embedder_config, device=str(where)), dim)
    policy = None
    if policy_dir is not None:
        if embedder is None:
            raise ConfigError(
                "--policy needs a text reward model: the user's stored pairs are the policy's context and "
                "must be text, but this model takes numeric vectors"
            )
        from steerable.policy.generation import load_policy

        if not Path(policy_dir).is_dir():
            raise ConfigError(f"{policy_dir}: no such policy folder")
        try:
            policy = load_policy(policy_dir, device=str(where))
        except SteerableError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{policy_dir}: cannot load the policy ({exc})") from None
    store = open_store(db, limits.max_pairs_per_user, pool_size=pool_size, timeout=db_timeout)
    kind = "text" if embedder_config is not None else f"numeric:{dim}"  # text pairs suit any text model
    try:
        store.ensure_meta("options", kind, " (start the server with another --db)")
    except SteerableError:
        store.close()
        raise
    return Engine(models, store, embedder, policy, seed=seed, limits=limits)
