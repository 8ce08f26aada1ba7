"""Text preference pairs: TRL's standard and conversational forms, plus ``user_id``.

Standard form: ``prompt``, ``chosen`` and ``rejected`` are strings. Conversational form: each is a list
of messages ``{"role": ..., "content": ...}`` (``prompt`` usually ends with a user turn, ``chosen`` and
``rejected`` hold the assistant's turn). Rows are normalised to message lists: a string prompt becomes
one user message and a string completion one assistant message. An option y = [x, ỹ] is the prompt's
messages followed by the completion's (:meth:`TextPreferences.option_messages`); how an option becomes a
vector is the embedder's business (:mod:`steerable.text.embedder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from steerable.data.schema import REQUIRED_FIELDS
from steerable.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")


def is_text_row(row: Any) -> bool:
    """Whether a raw row holds text options (a string, or a list of message objects)."""
    if not isinstance(row, dict):
        return False
    chosen = row.get("chosen")
    return isinstance(chosen, str) or (
        isinstance(chosen, list) and bool(chosen) and isinstance(chosen[0], dict)
    )


def prompt_key(messages: list[Message]) -> str:
    """One string per prompt, used to group and split pairs by prompt."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


@dataclass(frozen=True, eq=False)
class TextPreferences:
    """Validated text preference pairs (see the module docstring). Lists have one entry per pair."""

    user_ids: np.ndarray  # (N,) str
    prompts: list[list[Message]]  # [] when the row has no prompt
    chosen: list[list[Message]]
    rejected: list[list[Message]]
    hidden_mode: np.ndarray | None = None  # (N,) int64
    hidden_z: np.ndarray | None = None  # (N, K) float32
    source: str = "<memory>"

    @property
    def num_pairs(self) -> int:
        return len(self.user_ids)

    def option_messages(self) -> tuple[list[list[Message]], list[list[Message]]]:
        """The chosen and rejected options as full conversations [prompt ‖ completion]."""
        return (
            [p + c for p, c in zip(self.prompts, self.chosen, strict=True)],
            [p + r for p, r in zip(self.prompts, self.rejected, strict=True)],
        )

    def prompt_strings(self) -> np.ndarray:
        """(N,) object: each pair's prompt as one string (None when absent)."""
        return np.array([prompt_key(p) if p else None for p in self.prompts], dtype=object)


class TextRowBuilder:
    """Validates text rows one at a time (same contract as the vector reader)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.user_ids: list[str] = []
        self.prompts: list[list[Message]] = []
        self.chosen: list[list[Message]] = []
        self.rejected: list[list[Message]] = []
        self.modes: list[int] = []
        self.hidden_z: list[list[float]] = []

    def _error(self, message: str, where: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, row=where, field=field)

    def _messages(self, value: Any, where: str, field: str, role: str) -> list[Message]:
        if isinstance(value, str):
            if not value.strip():
                raise self._error("empty text", where, field)
            return [{"role": role, "content": value}]
        if not isinstance(value, list) or not value:
            kind = "a number list (vector options)" if isinstance(value, list) else type(value).__name__
            raise self._error(f"expected text or a list of messages, got {kind}", where, field)
        out = []
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise self._error(
                    f"message {i + 1}: expected an object with 'role' and 'content'", where, field
                )
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise self._error(
                    f"message {i + 1}: role must be one of {', '.join(ROLES)}, got {role!r}", where, field
                )
            if not isinstance(content, str) or not content.strip():
                raise self._error(f"message {i + 1}: 'content' must be non-empty text", where, field)
            out.append({"role": role, "content": content})
        return out

    def add(self, row: Any, where: str) -> None:
        if not isinstance(row, dict):
            raise self._error("expected a JSON object", where)
        for field in REQUIRED_FIELDS:
            if field not in row or row[field] is None:
                raise self._error("missing required field", where, field)
        user = row["user_id"]
        if isinstance(user, bool) or not isinstance(user, (str, int)) or (isinstance(user, str) and not user):
            raise self._error("expected a non-empty string or an integer", where, "user_id")
        prompt = row.get("prompt")
        self.prompts.append([] if prompt is None else self._messages(prompt, where, "prompt", "user"))
        self.chosen.append(self._messages(row["chosen"], where, "chosen", "assistant"))
        self.rejected.append(self._messages(row["rejected"], where, "rejected", "assistant"))
        mode = row.get("hidden_mode")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)):
            raise self._error("expected an integer", where, "hidden_mode")
        self.modes.append(-1 if mode is None else mode)
        z = row.get("hidden_z")
        if z is not None:
            self.hidden_z.append([float(v) for v in z])
        self.user_ids.append(str(user))

    def build(self) -> TextPreferences:
        if not self.user_ids:
            raise DataError("file is empty: no preference pairs", source=self.source)
        if self.hidden_z and len(self.hidden_z) != len(self.user_ids):
            raise DataError("field 'hidden_z' is present in some rows but not in others", source=self.source)
        return TextPreferences(
            user_ids=np.array(self.user_ids, dtype=object),
            prompts=self.prompts,
            chosen=self.chosen,
            rejected=self.rejected,
            hidden_mode=None if all(m < 0 for m in self.modes) else np.array(self.modes, dtype=np.int64),
            hidden_z=np.array(self.hidden_z, dtype=np.float32) if self.hidden_z else None,
            source=self.source,
        )
