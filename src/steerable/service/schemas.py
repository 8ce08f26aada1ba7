"""Limits, errors and request/response schemas of the personalization service.

:class:`Limits` bounds the size of requests and of what the server keeps; :class:`APIError` is an answer
with an HTTP error status, and :func:`validation_body` words 422 answers (FastAPI's ``detail`` list plus a
one-line ``message``). The response models (:class:`ErrorOut` ... :class:`HealthOut`) are fixed, while
:func:`build_schemas` builds the request models per model, so the OpenAPI schema states the exact option
type: vectors of ``input_dim`` numbers, or text. :func:`as_messages` and :func:`dump` turn validated
requests back into plain JSON values for the engine.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

from steerable.data.text import ROLES

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
    max_cache_bytes: int = 1024 * 2**20  # personalised models and text embeddings kept in memory (LRU)


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


def validation_body(errors: list[dict[str, Any]], dim: int | None = None) -> dict[str, Any]:
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
    store: Literal["sqlite", "postgresql"] = Field(description="where users' pairs are stored")
    device: str = Field(description="the torch device of the models")
    cache: dict[str, int] = Field(
        description="the memory cache: max_bytes, bytes, entries, hits, misses, evictions"
    )


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


# ---- requests -> plain values ------------------------------------------------------------------------
ChatMessage = dict[str, str]


def as_messages(value: Any, role: str) -> list[ChatMessage]:
    """A prompt or option (None, text or messages) -> chat messages; text gets ``role``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def dump(value: Any) -> Any:
    """Plain JSON values from pydantic models (nested in lists); lists of numbers are returned as they are."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        return [dump(v) for v in value]
    return value
