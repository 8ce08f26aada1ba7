"""UltraFeedback (openbmb/UltraFeedback, the paper's data) as a :class:`ResponseTable`.

The exact schema: one row per instruction with ``source``, ``instruction``, ``models`` and ``completions``,
a list of (usually 4) objects with ``model``, ``principle``, ``response``, ``custom_system_prompt``,
``overall_score``, ``critique``, ``fine-grained_score`` and ``annotations``:
``{"helpfulness": {"Rating": "1".."5" or "N/A", "Rationale": ..., ...}, "honesty": {...},
"instruction_following": {...}, "truthfulness": {...}}``. Ratings become integers; "N/A" (and a missing
aspect) becomes unknown, so pairs needing it are dropped. Reads a local ``.jsonl``/``.json``/``.parquet``/
``.arrow`` file, a saved ``datasets`` folder, or — when online — a hub name (``openbmb/UltraFeedback``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from steerable.errors import DataError
from steerable.text.responses import ResponseTable

ASPECTS = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
HUB_NAME = "openbmb/UltraFeedback"


def _rating(value: Any, source: str, where: str, field: str) -> float:
    if value is None:
        return np.nan
    rating = value.get("Rating") if isinstance(value, dict) else None
    if rating is None or (isinstance(rating, str) and rating.strip().upper() == "N/A"):
        return np.nan
    try:
        number = int(str(rating).strip())
    except ValueError:
        raise DataError(
            f"rating {rating!r} is neither 1..5 nor N/A", source=source, row=where, field=field
        ) from None
    if not 1 <= number <= 5:
        raise DataError(f"rating {number} is outside 1..5", source=source, row=where, field=field)
    return float(number)


def _rows(source: str | Path | Any) -> tuple[Iterator[tuple[str, Any]], str]:
    if hasattr(source, "data") and hasattr(source.data, "table"):
        return ((f"row {i + 1}", r) for i, r in enumerate(source)), "<datasets.Dataset>"
    path = Path(str(source))
    if path.exists():
        name = str(path)
        if path.is_dir() or path.suffix == ".arrow":
            import datasets

            ds = datasets.load_from_disk(name) if path.is_dir() else datasets.Dataset.from_file(name)
            return ((f"row {i + 1}", r) for i, r in enumerate(ds)), name
        if path.suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return ((f"row {i + 1}", r) for i, r in enumerate(table.to_pylist())), name
        from steerable.data.readers import iter_json_rows

        return iter_json_rows(path), name
    if "/" in str(source) and not str(source).startswith((".", "/")):
        try:
            import datasets

            ds = datasets.load_dataset(str(source), split="train")
        except Exception as exc:  # offline, unknown name, ...
            raise DataError(
                f"cannot load from the hub ({type(exc).__name__}: {exc})".split("\n")[0], source=str(source)
            ) from None
        return ((f"row {i + 1}", r) for i, r in enumerate(ds)), str(source)
    raise DataError("no such file or directory", source=str(source))


def load_ultrafeedback(source: str | Path | Any = HUB_NAME, max_prompts: int | None = None) -> ResponseTable:
    """Read UltraFeedback rows into a :class:`ResponseTable` with the four aspect ratings as attributes.

    Validation names the row and field of the first malformed row (missing ``instruction``/``completions``,
    a completion without ``response``, a rating that is neither 1..5 nor N/A).
    """
    rows, name = _rows(source)
    prompts: list[str] = []
    prompt_of: list[int] = []
    responses: list[str] = []
    attributes: list[list[float]] = []
    info: list[dict] = []
    for where, row in rows:
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
        if not isinstance(row, dict):
            raise DataError("expected an object", source=name, row=where)
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError("missing or empty", source=name, row=where, field="instruction")
        completions = row.get("completions")
        if not isinstance(completions, list):
            raise DataError("missing or not a list", source=name, row=where, field="completions")
        usable = []
        for j, completion in enumerate(completions):
            field = f"completions[{j}]"
            if not isinstance(completion, dict):
                raise DataError("expected an object", source=name, row=where, field=field)
            response = completion.get("response")
            if not isinstance(response, str):
                raise DataError("missing or not text", source=name, row=where, field=f"{field}.response")
            if not response.strip():
                continue
            annotations = completion.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise DataError("expected an object", source=name, row=where, field=f"{field}.annotations")
            ratings = [
                _rating(annotations.get(a), name, where, f"{field}.annotations.{a}.Rating") for a in ASPECTS
            ]
            usable.append((response, ratings, completion.get("model")))
        if len(usable) < 2:
            continue  # no pair can be formed
        prompts.append(instruction)
        for response, ratings, model in usable:
            prompt_of.append(len(prompts) - 1)
            responses.append(response)
            attributes.append(ratings)
            info.append({"model": model, "source": row.get("source")})
    if not prompts:
        raise DataError("no instruction with at least two non-empty completions", source=name)
    return ResponseTable(
        prompts=prompts,
        prompt_of=np.array(prompt_of, dtype=np.int64),
        responses=responses,
        attributes=np.array(attributes, dtype=np.float64),
        attribute_names=list(ASPECTS),
        source=name,
        response_info=info,
    )
