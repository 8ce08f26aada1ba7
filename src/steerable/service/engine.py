"""The engine of the personalization service: models, embedder, policy and store behind the routes.

:class:`Engine` takes and returns plain JSON values: it turns options into vectors (text through the
model's embedder, with :class:`TextEncoder`'s memory cache), personalises the reward models on a user's
newest stored pairs (cached per user in an :class:`LRU` as a :class:`UserContext` until the user's pairs
change) and on inline contexts, and scores, compares, picks the next query and generates. Problems a
client can fix raise :class:`~steerable.service.schemas.APIError`. :func:`build_engine` loads everything
``steerable serve`` needs (:func:`load_models`, the embedder, the policy, the store).
"""

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerable.errors import ConfigError, SteerableError
from steerable.service.schemas import (
    MIN_TEMPERATURE,
    STRATEGIES,
    APIError,
    ChatMessage,
    Limits,
    as_messages,
)
from steerable.service.store import PreferenceStore


# ---- caches ---------------------------------------------------------------------------------------------
class LRU:
    """A small thread-safe map that forgets its least recently used entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, key: Any) -> None:
        with self._lock:
            self._items.pop(key, None)


@dataclass
class UserContext:
    """One user's newest stored pairs as vectors and the models personalised on them."""

    version: int  # id of the newest stored pair (0: none)
    chosen: np.ndarray  # (N, D)
    rejected: np.ndarray  # (N, D)
    personalized: list[Any]  # one PersonalizedRewardModel per ensemble member


class TextEncoder:
    """Options as conversations -> vectors through the model's embedder (disk cache) and a memory LRU."""

    def __init__(self, embedder: Any, capacity: int) -> None:
        self.embedder, self.capacity = embedder, capacity
        self.lock = threading.Lock()
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, conversations: list[list[ChatMessage]]) -> np.ndarray:
        with self.lock:
            texts = [self.embedder.render(c) for c in conversations]
            missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
            if missing:
                vectors = self.embedder.embed_texts(missing, progress=False)
                for t, v in zip(missing, vectors, strict=True):
                    self.memory[t] = v
            for t in texts:
                self.memory.move_to_end(t)
            out = np.stack([self.memory[t] for t in texts]).astype(np.float32, copy=False)
            while len(self.memory) > max(self.capacity, len(texts)):
                self.memory.popitem(last=False)
            return out


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
        self.encoder = TextEncoder(embedder, self.limits.cached_texts) if embedder is not None else None
        self.dim = models[0].config.input_dim
        self.seed = seed
        self.spread = has_latent_spread(models if len(models) > 1 else models[0])
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._policy_lock = threading.Lock()
        self._users = LRU(self.limits.cached_users)  # user id -> UserContext (checked against the store)
        self._contexts = LRU(self.limits.cached_contexts)  # digest of a context's vectors -> personalised
        empty = np.zeros((0, self.dim), dtype=np.float32)
        self._prior = UserContext(0, empty, empty, [m.personalize() for m in models])

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
            return self._prior.chosen, self._prior.rejected
        prompts = [p.get("prompt") for p in pairs] * 2
        both = self.vectors([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], prompts)
        return both[: len(pairs)], both[len(pairs) :]

    def option_key(self, option: Any, prompt: Any) -> str:
        """Identity of an option: its numbers (numeric models) or its whole conversation (text)."""
        if not self.text:
            return json.dumps(option)
        return json.dumps(as_messages(prompt, "user") + as_messages(option, "assistant"))

    def pair_key(self, a: Any, b: Any, prompt: Any) -> frozenset[str]:
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

    def user_context(self, user_id: str | None) -> UserContext:
        """The user's newest stored pairs and personalised models, cached until the user's pairs change."""
        if user_id is None:
            return self._prior
        version = self.store.version(user_id)
        if version == 0:
            return self._prior
        hit = self._users.get(user_id)
        if hit is not None and hit.version == version:
            return hit
        stored = self.store.pairs(user_id, last=self.limits.max_context)
        if not stored:
            return self._prior
        chosen, rejected = self.pair_vectors([s.pair for s in stored])
        entry = UserContext(
            stored[-1].id, chosen, rejected, self._personalize(chosen, rejected, ("path", "user_id"))
        )
        self._users.put(user_id, entry)
        return entry

    def context(self, user_id: str | None, inline: list[dict[str, Any]] | None) -> tuple[list[Any], int]:
        """Personalised models for the stored pairs plus inline ones (newest ``max_context`` kept)."""
        ctx = self.user_context(user_id)
        if not inline:
            return ctx.personalized, len(ctx.chosen)
        chosen, rejected = self.pair_vectors(inline)
        keep = self.limits.max_context
        chosen = np.ascontiguousarray(np.concatenate([ctx.chosen, chosen])[-keep:])
        rejected = np.ascontiguousarray(np.concatenate([ctx.rejected, rejected])[-keep:])
        key = hashlib.blake2b(chosen.tobytes() + rejected.tobytes(), digest_size=16).digest()
        personalized = self._contexts.get(key)  # clients that send the same context again
        if personalized is None:
            personalized = self._personalize(chosen, rejected, ("body", "context"))
            self._contexts.put(key, personalized)
        return personalized, len(chosen)

    def forget(self, user_id: str) -> int:
        self._users.pop(user_id)
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
        from steerable.active import select_next

        if strategy == "info-gain" and not self.spread:
            raise APIError(
                422,
                f"info-gain needs uncertainty about the user's z: a vnp-btl model or an ensemble (--model "
                f"given several times); this server has one {self.models[0].model_type} model. Use "
                f"'uncertainty' or 'random'.",
                ("body", "strategy"),
            )
        stored = (s.pair for s in self.store.pairs(user_id))
        answered = {self.pair_key(p["chosen"], p["rejected"], p.get("prompt")) for p in stored}
        keys = [self.pair_key(c["a"], c["b"], c.get("prompt")) for c in candidates]
        excluded = [i for i, key in enumerate(keys) if key in answered]
        if len(excluded) == len(candidates):
            raise APIError(422, "the user has already answered every candidate pair", ("body", "candidates"))
        ctx = self.user_context(user_id)
        prompts = [c.get("prompt") for c in candidates]
        a = self.vectors([c["a"] for c in candidates], prompts)
        b = self.vectors([c["b"] for c in candidates], prompts)
        if seed is None:
            with self._rng_lock:
                seed = int(self._rng.integers(2**63 - 1))
        has_context = len(ctx.chosen) > 0
        try:
            query = select_next(
                self.models if len(self.models) > 1 else self.models[0],
                a,
                b,
                strategy=strategy,
                rng=seed,
                context_chosen=ctx.chosen if has_context else None,
                context_rejected=ctx.rejected if has_context else None,
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
            "num_context": len(ctx.chosen),
        }

    def generate(self, user_id: str, prompts: list[Any], sampling: dict[str, Any]) -> tuple[list[str], int]:
        if self.policy is None:
            raise APIError(409, "no policy loaded: start the server with --policy DIR to generate")
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
        }

    def close(self) -> None:
        self.store.close()


# ---- loading ---------------------------------------------------------------------------------------------
def load_models(model_dirs: Sequence[str | Path]) -> tuple[list[Any], Any]:
    """Reward models (safetensors) and the embedder their folders record; one line per problem."""
    from steerable.models.registry import load_reward_model
    from steerable.text.embedder import load_embedder_config

    if not model_dirs:
        raise ConfigError("give at least one --model folder")
    models, embedders = [], []
    for directory in model_dirs:
        if not Path(directory).is_dir():
            raise ConfigError(f"{directory}: no such model folder")
        try:
            models.append(load_reward_model(directory))
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
) -> Engine:
    """Load everything ``steerable serve`` needs; configuration problems raise :class:`SteerableError`."""
    limits = limits or Limits()
    models, embedder_config = load_models(model_dirs)
    dim = models[0].config.input_dim
    embedder = _make_embedder(embedder_config, dim) if embedder_config is not None else None
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
            policy = load_policy(policy_dir)
        except SteerableError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{policy_dir}: cannot load the policy ({exc})") from None
    store = PreferenceStore(db, max_pairs_per_user=limits.max_pairs_per_user)
    kind = "text" if embedder_config is not None else f"numeric:{dim}"  # text pairs suit any text model
    try:
        store.ensure_meta("options", kind, " (start the server with another --db)")
    except SteerableError:
        store.close()
        raise
    return Engine(models, store, embedder, policy, seed=seed, limits=limits)
