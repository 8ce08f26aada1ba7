"""Candidate pairs for active elicitation: one unanswered pair per row.

JSON Lines (``.jsonl``, ``.jsonl.gz``) or a JSON array, each row ``{"a": option, "b": option}`` with an
optional ``"prompt"``. Options are numeric vectors (all of one length) or texts: a string, or a list of
``{"role", "content"}`` messages (the prompt then is a string or a message list too). As with preference
files, every problem is one line naming the file, the row and the field.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerable.data.text import Message
from steerable.errors import DataError


@dataclass
class CandidatePool:
    """P candidate pairs: vectors (P, D) each, or texts as conversations [prompt ‖ option]."""

    a: np.ndarray | list[list[Message]]
    b: np.ndarray | list[list[Message]]
    prompts: list[list[Message]]
    source: str = "<memory>"

    @property
    def is_text(self) -> bool:
        return not isinstance(self.a, np.ndarray)

    def __len__(self) -> int:
        return len(self.a)

    def show(self, index: int, side: str) -> str:
        """One option as a person reads it (the completion's text, or the vector)."""
        option = (self.a if side == "a" else self.b)[index]
        if self.is_text:
            return "\n".join(m["content"] for m in option[len(self.prompts[index]) :])
        return np.array2string(np.asarray(option), precision=4)


def _messages(value: Any, role: str, where: str, field: str, source: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", source=source, row=where, field=field)
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(
                    "messages need string 'role' and 'content'", source=source, row=where, field=field
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError("expected a string or a list of messages", source=source, row=where, field=field)


def _vector(value: Any, where: str, field: str, source: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise DataError("expected a non-empty list of numbers", source=source, row=where, field=field)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
        raise DataError("expected numbers only", source=source, row=where, field=field)
    if not all(math.isfinite(x) and abs(x) <= 3.4e38 for x in value):
        raise DataError("contains NaN or infinity", source=source, row=where, field=field)
    return [float(x) for x in value]


def pool_from_rows(rows: list[Any], source: str = "<memory>", where_prefix: str = "row") -> CandidatePool:
    """Validate rows ``{"a", "b", "prompt"?}`` (see the module docstring)."""
    if not rows:
        raise DataError("no candidate pairs", source=source)
    text = None
    a_list, b_list, prompts = [], [], []
    for n, row in enumerate(rows, 1):
        where = f"{where_prefix} {n}"
        if not isinstance(row, dict):
            raise DataError("expected an object with fields 'a' and 'b'", source=source, row=where)
        for field in ("a", "b"):
            if field not in row:
                raise DataError("missing required field", source=source, row=where, field=field)
        row_text = isinstance(row["a"], (str, dict)) or (
            isinstance(row["a"], list) and bool(row["a"]) and isinstance(row["a"][0], dict)
        )
        if text is None:
            text = row_text
        elif text != row_text:
            raise DataError("mixes text and numeric options", source=source, row=where, field="a")
        if text:
            prompt = _messages(row["prompt"], "user", where, "prompt", source) if row.get("prompt") else []
            a_list.append(prompt + _messages(row["a"], "assistant", where, "a", source))
            b_list.append(prompt + _messages(row["b"], "assistant", where, "b", source))
            prompts.append(prompt)
        else:
            a, b = _vector(row["a"], where, "a", source), _vector(row["b"], where, "b", source)
            width = len(a_list[0]) if a_list else len(a)
            for field, v in (("a", a), ("b", b)):
                if len(v) != width:
                    raise DataError(
                        f"{len(v)} values, but row 1 has {width}: all options must have equal length",
                        source=source,
                        row=where,
                        field=field,
                    )
            a_list.append(a)
            b_list.append(b)
            prompts.append([])
    if text:
        return CandidatePool(a_list, b_list, prompts, source)
    return CandidatePool(np.asarray(a_list, np.float32), np.asarray(b_list, np.float32), prompts, source)


def load_pool(path: str | Path) -> CandidatePool:
    """Read a candidate-pair file (JSON Lines or a JSON array)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError("no such file", source=source)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            content = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ({exc})", source=source) from None
    if not content.strip():
        raise DataError("empty file", source=source)

    def strict(value: str) -> Any:
        raise ValueError(f"{value} is not a number")

    if path.suffix == ".json":
        try:
            rows = json.loads(content, parse_constant=strict)
        except ValueError as exc:
            raise DataError(f"invalid JSON ({exc})", source=source) from None
        if not isinstance(rows, list):
            raise DataError("expected a JSON array of pairs", source=source)
        return pool_from_rows(rows, source, "item")
    rows = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, parse_constant=strict))
        except ValueError as exc:
            raise DataError(f"invalid JSON ({exc})", source=source, row=f"line {n}") from None
    return pool_from_rows(rows, source, "line")
