"""The personalization service: a FastAPI app that stores users' preference pairs and scores, compares,
elicits and generates for them with a saved reward model (and optionally an NP-DPO policy).

>>> app = create_app("models/step", db="prefs.db")          # or: steerable serve --model models/step
>>> with ServerThread(app) as url: ...                        # uvicorn on loopback, in a background thread

Sections: limits and request/response schemas (built per model, so the OpenAPI schema states the exact
option type: vectors of ``input_dim`` numbers, or text), the engine (models, embedder, per-user cache of
personalised models), the routes, and :class:`ServerThread`. Inference runs in FastAPI's threadpool (sync
endpoints); the reward models are only read, the embedder and the policy are used under locks.
"""

import hashlib
import hmac
import json
import math
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

from steerable.data.text import ROLES
from steerable.errors import ConfigError, SteerableError
from steerable.service.store import PreferenceStore, TooManyPairs

F32_MAX = float(np.finfo(np.float32).max)
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$"
STRATEGIES = ("info-gain", "uncertainty", "random")
MIN_TEMPERATURE = 1e-3  # sampling temperatures below this decode greedily


@dataclass(frozen=True)
class Limits:
    """Size limits of requests and of what the server keeps (larger requests get a 4xx)."""

    max_pairs_per_request: int = 1000
    max_options: int = 4096  # options per score request, pairs per compare request
    max_candidates: int = 1024  # candidate pairs per next-query request
    max_context: int = 1000  # inline context pairs; also the newest stored pairs a user is conditioned on
    max_pairs_per_user: int = 100_000
    max_text_chars: int = 100_000
    max_messages: int = 64
    max_prompts: int = 16
    max_new_tokens: int = 1024
    max_body_bytes: int = 32 * 2**20
    max_page: int = 1000  # pairs per GET /v1/users/{user_id} answer
    cached_users: int = 4096  # users' personalised models kept in memory (least recently used evicted)
    cached_contexts: int = 4096  # personalised models of inline contexts kept in memory
    cached_texts: int = 50_000  # text embeddings kept in memory


# ---- errors -------------------------------------------------------------------------------------------
class APIError(Exception):
    """An answer with an HTTP error status; 422 errors name the offending field (``loc``)."""

    def __init__(self, status: int, message: str, loc: Sequence[str | int] = ("body",)) -> None:
        super().__init__(message)
        self.status, self.message, self.loc = status, message, tuple(loc)


def _where(loc: Sequence[Any]) -> str:
    """("body", "pairs", 0, "chosen") -> "pairs[0].chosen"."""
    if len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int):
        return "body"
    parts = list(loc[1:]) if len(loc) > 1 and loc[0] in ("body", "path", "query") else list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "json_invalid":  # loc ("body", character position)
        reason = (error.get("ctx") or {}).get("error", "")
        return f"invalid JSON at character {error['loc'][-1]}" + (f" ({reason})" if reason else "")
    return str(error["msg"])


OPTION_FIELDS = ("chosen", "rejected", "a", "b")


def _is_option(loc: Sequence[Any]) -> bool:
    return bool(loc) and (
        loc[-1] in OPTION_FIELDS or (len(loc) > 1 and loc[-2] == "options" and isinstance(loc[-1], int))
    )


def _numeric_message(error: dict[str, Any], dim: int) -> str | None:
    """Clearer words for a numeric option of the wrong size or kind (checked by the schema, not per option
    in Python: that would cost as much as the rest of the validation)."""
    loc, kind, given = error["loc"], error["type"], error.get("input")
    if _is_option(loc) and kind in ("too_short", "too_long"):
        got = (error.get("ctx") or {}).get("actual_length")
        return f"expected {dim} numbers (the model's input_dim), got {got}"
    if _is_option(loc) and kind == "list_type" and isinstance(given, str):
        return f"this model takes vectors of {dim} numbers, not text"
    if _is_option(loc[:-1]) and kind == "float_type" and isinstance(given, dict):
        return f"this model takes vectors of {dim} numbers, not messages"
    return None


def _validation_body(errors: list[dict[str, Any]], dim: int | None = None) -> dict[str, Any]:
    """The 422 answer: FastAPI's ``detail`` list (without echoing the input) plus a one-line ``message``;
    ``dim``: options are vectors of this size (their errors are reworded)."""
    detail = []
    for e in errors:
        msg = (_numeric_message(e, dim) if dim is not None else None) or _message(e)
        detail.append({"loc": list(e["loc"]), "msg": msg, "type": str(e["type"])})
    message = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in detail[:5])
    if len(detail) > 5:
        message += f"; and {len(detail) - 5} more errors"
    return {"detail": detail, "message": message}


# ---- schemas --------------------------------------------------------------------------------------------
def _integral(value: Any) -> Any:
    """JSON Schema integers include 5.0: accept integral floats, but (strictly) no booleans or strings."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


Number = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-F32_MAX, le=F32_MAX)]
Seed = Annotated[int, BeforeValidator(_integral), Field(strict=True, ge=0, le=2**63 - 1)]


class ErrorOut(BaseModel):
    detail: str


class DeletedOut(BaseModel):
    user_id: str
    deleted: int = Field(description="pairs deleted")


class AddedOut(BaseModel):
    user_id: str
    added: int = Field(description="pairs stored by this request")
    num_pairs: int = Field(description="the user's pairs in total")


class ScoreOut(BaseModel):
    user_id: str | None
    rewards: list[float] = Field(description="r(y | D^C) per option, in request order")
    num_context: int = Field(description="context pairs the user was conditioned on")


class CompareOut(BaseModel):
    user_id: str | None
    probabilities: list[float] = Field(description="P(a ≻ b | D^C) per pair, in request order")
    num_context: int


class NextQueryOut(BaseModel):
    user_id: str
    index: int = Field(description="the candidate to ask next")
    strategy: str
    score: float | None = Field(description="its score (None for random)")
    scores: list[float | None] = Field(description="every candidate's score; None where not available")
    excluded: list[int] = Field(description="candidates the user has already answered")
    num_context: int


class GenerateOut(BaseModel):
    user_id: str
    responses: list[str]
    num_context: int


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    model_type: str
    ensemble_size: int
    input_dim: int
    options: Literal["text", "numeric"]
    embedder: str | None
    policy_loaded: bool
    auth_required: bool
    strategies: list[str] = Field(description="next-query strategies this model supports")
    limits: dict[str, int]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], (dict, BaseModel))


def _nonblank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank_text", "text is empty or only whitespace")
    return text


def build_schemas(text: bool, dim: int, limits: Limits) -> SimpleNamespace:
    """Request/response models for one server: options are text (str or messages) or ``dim`` numbers."""
    Text = Annotated[
        str,
        Field(min_length=1, max_length=limits.max_text_chars, json_schema_extra={"pattern": r"\S"}),
        AfterValidator(_nonblank),
    ]

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal[ROLES]  # type: ignore[valid-type]
        content: Text

    Conversation = Annotated[list[Message], Field(min_length=1, max_length=limits.max_messages)]
    Prompt = Annotated[
        Union[Annotated[Text, Tag("text")], Annotated[Conversation, Tag("messages")]],  # noqa: UP007
        Discriminator(lambda v: "messages" if isinstance(v, list) else "text"),
    ]

    def text_only(value: Any) -> Any:
        if isinstance(value, list) and value and not _is_messages(value):
            raise PydanticCustomError(
                "text_option", "this model takes text (a string or a list of messages), not numbers"
            )
        return value

    if text:
        Option = Annotated[Prompt, BeforeValidator(text_only)]
        option_help = "a completion: text, or a list of messages (the pair's prompt is prepended)"
    else:
        Option = Annotated[list[Number], Field(min_length=dim, max_length=dim)]  # see _numeric_message
        option_help = f"a vector of {dim} finite numbers"

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Pair(Strict):
        chosen: Option = Field(description=option_help)
        rejected: Option = Field(description=option_help)
        prompt: Prompt | None = Field(None, description="what both options answer (text models: embedded)")

    class OptionPair(Strict):
        a: Option = Field(description=option_help)
        b: Option = Field(description=option_help)
        prompt: Prompt | None = None

    Context = Annotated[list[Pair], Field(max_length=limits.max_context)]

    class PreferencesIn(Strict):
        pairs: list[Pair] = Field(min_length=1, max_length=limits.max_pairs_per_request)

    class ScoreIn(Strict):
        options: list[Option] = Field(min_length=1, max_length=limits.max_options, description=option_help)
        prompt: Prompt | None = Field(None, description="text models: prepended to every option")
        context: Context | None = Field(None, description="context pairs added to the stored ones")

    class CompareIn(Strict):
        pairs: list[OptionPair] = Field(min_length=1, max_length=limits.max_options)
        context: Context | None = None

    class NextQueryIn(Strict):
        candidates: list[OptionPair] = Field(min_length=1, max_length=limits.max_candidates)
        strategy: Literal[STRATEGIES] = "info-gain"  # type: ignore[valid-type]
        seed: Seed | None = Field(None, description="tie-breaking seed (default: the server's generator)")

    class GenerateIn(Strict):
        prompts: list[Prompt] = Field(min_length=1, max_length=limits.max_prompts)
        max_new_tokens: Annotated[int, BeforeValidator(_integral)] = Field(
            64, strict=True, ge=1, le=limits.max_new_tokens
        )
        temperature: float = Field(
            1.0,
            strict=True,
            ge=0.0,
            le=10.0,
            allow_inf_nan=False,
            description=f"0 (or below {MIN_TEMPERATURE}): greedy decoding",
        )
        top_p: float = Field(1.0, strict=True, gt=0.0, le=1.0, allow_inf_nan=False)
        seed: Seed | None = None

    class StoredPair(Pair):
        id: int
        created: float = Field(description="seconds since the epoch")

    class UserOut(BaseModel):
        user_id: str
        num_pairs: int = Field(description="the user's pairs in total")
        pairs: list[StoredPair] = Field(description="this page: pairs with id > after, oldest first")
        next_after: int | None = Field(description="'after' for the next page (None: this was the last)")

    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, type)})


# ---- the engine ------------------------------------------------------------------------------------------
ChatMessage = dict[str, str]


def _messages(value: Any, role: str) -> list[ChatMessage]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _dump(value: Any) -> Any:
    """Plain JSON values from pydantic models (nested in lists); lists of numbers are returned as they are."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        return [_dump(v) for v in value]
    return value


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
                    _messages(p, "user") + _messages(o, "assistant")
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
        return json.dumps(_messages(prompt, "user") + _messages(option, "assistant"))

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


# ---- the app -------------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                from fastapi import HTTPException

                raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the body is not UTF-8 JSON",
        401: "missing or wrong bearer token",
        404: "unknown user",
        409: "conflict (no policy loaded, or too many pairs for one user)",
        413: "request body too large",
        503: "the database is busy or the embedder failed; retry later",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


def create_app(
    model: str | Path | Sequence[str | Path] | None = None,
    db: str | Path = "steerable.db",
    token: str | None = None,
    policy: str | Path | None = None,
    seed: int = 0,
    limits: Limits | None = None,
    engine: Engine | None = None,
) -> FastAPI:
    """The FastAPI app for a saved reward model folder (several folders: an ensemble), or a built
    :class:`Engine`. ``token``: every endpoint except ``/v1/health`` needs ``Authorization: Bearer token``.
    The caller closes the store when done (``app.state.engine.close()``)."""
    if engine is None:
        if model is None:
            raise ConfigError("give a model folder (or an engine)")
        dirs = [model] if isinstance(model, (str, Path)) else list(model)
        engine = build_engine(dirs, db, policy_dir=policy, seed=seed, limits=limits)
    eng = engine
    lim = eng.limits
    s = build_schemas(eng.text, eng.dim, lim)
    app = FastAPI(
        title="steerable personalization service",
        version=eng.health()["version"],
        description="Few-shot personalised reward models: store a user's preference pairs, then score, "
        "compare, choose the next question and generate for that user.",
    )
    app.state.engine = eng
    app.add_middleware(_BodyLimit, limit=lim.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            _validation_body(list(exc.errors()), None if eng.text else eng.dim), status_code=422
        )

    @app.exception_handler(APIError)
    async def _service_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status == 422:
            body = _validation_body([{"loc": exc.loc, "msg": exc.message, "type": "value_error"}])
            return JSONResponse(body, status_code=422)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        return JSONResponse({"detail": f"database busy, retry later ({exc})"}, status_code=503)

    bearer = HTTPBearer(auto_error=False, description="the server's --token")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), (token or "").encode()):
            from fastapi import HTTPException

            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(check_token)] if token else []
    errors = (401,) if token else ()
    v1 = APIRouter(prefix="/v1", dependencies=auth, responses=_responses(*errors, 400, 413, 503))
    UserId = Annotated[str, PathParam(pattern=USER_ID_PATTERN, max_length=128, description="the user")]

    @app.get("/v1/health", response_model=HealthOut, tags=["service"])
    def health() -> HealthOut:
        """Model type, input size, text or numeric options, whether a policy is loaded."""
        values = eng.health()
        limits_out = {k: v for k, v in vars(lim).items() if isinstance(v, int)}
        return HealthOut(**values, auth_required=bool(token), limits=limits_out)

    @v1.post(
        "/users/{user_id}/preferences", response_model=AddedOut, status_code=201, responses=_responses(409)
    )
    def add_preferences(user_id: UserId, body: s.PreferencesIn) -> AddedOut:
        """Append the user's preference pairs (a new user is created by their first pairs)."""
        pairs = _dump(body.pairs)
        try:
            total = eng.store.add_pairs(user_id, pairs)
        except TooManyPairs as exc:
            raise APIError(409, str(exc)) from None
        return AddedOut(user_id=user_id, added=len(pairs), num_pairs=total)

    @v1.get("/users/{user_id}", response_model=s.UserOut, responses=_responses(404))
    def get_user(
        user_id: UserId,
        after: Annotated[int, Query(ge=0, le=2**63 - 1, description="only pairs with a larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=lim.max_page, description="pairs per page")] = lim.max_page,
    ) -> Any:
        """The user's stored pairs, oldest first, a page at a time."""
        total = eng.store.count(user_id)
        if not total:
            raise APIError(404, f"unknown user '{user_id}'")
        page = eng.store.pairs(user_id, after=after, limit=limit + 1)
        more = len(page) > limit
        pairs = [{"id": p.id, "created": p.created, **p.pair} for p in page[:limit]]
        next_after = pairs[-1]["id"] if more else None
        return {"user_id": user_id, "num_pairs": total, "pairs": pairs, "next_after": next_after}

    @v1.delete("/users/{user_id}", response_model=DeletedOut, responses=_responses(404))
    def delete_user(user_id: UserId) -> DeletedOut:
        """Forget the user and all their pairs."""
        deleted = eng.forget(user_id)
        if not deleted:
            raise APIError(404, f"unknown user '{user_id}'")
        return DeletedOut(user_id=user_id, deleted=deleted)

    # The hot endpoints answer with ready JSON: FastAPI would otherwise validate the answer again.
    def _score(user_id: str | None, body: Any) -> Response:
        rewards, n = eng.score(user_id, _dump(body.options), _dump(body.prompt), _dump(body.context))
        return _json(ScoreOut(user_id=user_id, rewards=rewards, num_context=n))

    def _compare(user_id: str | None, body: Any) -> Response:
        probs, n = eng.compare(user_id, _dump(body.pairs), _dump(body.context))
        return _json(CompareOut(user_id=user_id, probabilities=probs, num_context=n))

    @v1.post("/users/{user_id}/score", response_model=ScoreOut)
    def score_user(user_id: UserId, body: s.ScoreIn) -> Response:
        """Rewards r(y | D^C) of the options for this user (stored pairs plus any inline context; an
        unknown user has no stored pairs)."""
        return _score(user_id, body)

    @v1.post("/users/{user_id}/compare", response_model=CompareOut)
    def compare_user(user_id: UserId, body: s.CompareIn) -> Response:
        """P(a ≻ b | D^C) for this user."""
        return _compare(user_id, body)

    @v1.post("/score", response_model=ScoreOut)
    def score(body: s.ScoreIn) -> Response:
        """Rewards for a brand-new user described only by the inline context (none: the prior)."""
        return _score(None, body)

    @v1.post("/compare", response_model=CompareOut)
    def compare(body: s.CompareIn) -> Response:
        """P(a ≻ b) for a brand-new user described only by the inline context."""
        return _compare(None, body)

    @v1.post("/users/{user_id}/next-query", response_model=NextQueryOut)
    def next_query(user_id: UserId, body: s.NextQueryIn) -> NextQueryOut:
        """Which candidate pair to ask the user next (pairs the user already answered are excluded)."""
        return NextQueryOut(**eng.next_query(user_id, _dump(body.candidates), body.strategy, body.seed))

    @v1.post("/users/{user_id}/generate", response_model=GenerateOut, responses=_responses(409))
    def generate(user_id: UserId, body: s.GenerateIn) -> GenerateOut:
        """Responses of the loaded NP-DPO policy, steered by the user's stored (text) pairs."""
        sampling = body.model_dump(exclude={"prompts"})
        responses, n = eng.generate(user_id, _dump(body.prompts), sampling)
        return GenerateOut(user_id=user_id, responses=responses, num_context=n)

    app.include_router(v1, tags=["v1"])
    return app


# ---- running it ----------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` on ``host`` (a free port unless given) in a background thread.

    >>> with ServerThread(app) as url:
    ...     Client(url).health()
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
