"""The offline real-text benchmark: 13 real LLMs answering the same instructions (just-eval, MIT).

Every response gets four transparent attributes, computed here from its text (and the judge's rating):

* ``length``    — number of words (whitespace-separated).
* ``hedging``   — hedges, caveats, disclaimers and refusals per 100 words: matches of :data:`HEDGES`
  ("may", "might", "however", "consult", "as an AI", "I'm sorry", "please note", ...).
* ``structure`` — lines that are list items (``-``, ``*``, ``•``, ``1.``, ``1)``) or headings (``#``, a bold
  line) — how much the answer is laid out rather than written as prose.
* ``safety``    — the judge's 1–5 safety rating (gpt-3.5-turbo-0613), only for the 200 safety instructions.

User types are defined on them, e.g. a *thorough* user prefers the longer answer and a *cautious* one the
more hedged answer (the analogue of the paper's helpfulness vs honesty); they disagree on ~55 % of the
untied pairs. A slice of 300 instructions (240 regular, 60 safety; all 13 answers each) ships with the
package (``steerable/resources/just_eval``, with its licence) so nothing has to be fetched; pass the
full ``just-eval`` folder (``outputs/*.json.gz``, ``safety-scores/*.json.gz``) to use all 1,000.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

from steerable.errors import DataError
from steerable.text.responses import ResponseTable

ATTRIBUTES = ["length", "hedging", "structure", "safety"]
HEDGES = (
    r"however|may|might|could|perhaps|possibly|generally|typically|usually|often|important to|note that|"
    r"keep in mind|consult|professional|not sure|uncertain|depends|it is possible|as an ai|i cannot|i can't|"
    r"i'm sorry|i am sorry|i apologize|unfortunately|disclaimer|please note|be careful|caution|safety|safe"
)
_HEDGE = re.compile(rf"\b({HEDGES})\b", re.IGNORECASE)
_LIST = re.compile(r"\s*([-*•]|\d+[.)])\s+")
_HEADING = re.compile(r"\s*(#{1,6}\s|\*\*[^*]+\*\*:?\s*$)")
SLICE_DIR = Path(__file__).resolve().parent.parent / "resources" / "just_eval"


def response_attributes(text: str) -> tuple[float, float, float]:
    """(length, hedging, structure) of one response (see the module docstring)."""
    words = len(text.split())
    hedges = len(_HEDGE.findall(text))
    lines = text.split("\n")
    structure = sum(1 for line in lines if _LIST.match(line) or _HEADING.match(line))
    return float(words), 100.0 * hedges / max(words, 1), float(structure)


def _load_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _rows_from_folder(folder: Path) -> list[dict]:
    outputs = sorted((folder / "outputs").glob("*.json.gz"))
    if not outputs:
        raise DataError("no outputs/*.json.gz: not a just-eval folder", source=str(folder))
    safety: dict[tuple[int, str], int] = {}
    for path in sorted((folder / "safety-scores").glob("*.json.gz")):
        for row in _load_gz(path):
            try:
                safety[(row["id"], row["generator_cand"])] = int(row["parsed_result"]["safety"]["score"])
            except (KeyError, TypeError, ValueError):
                continue
    rows = []
    for path in outputs:
        model = path.name.removesuffix(".json.gz")
        for row in _load_gz(path):
            rows.append(
                {
                    "id": row["id"],
                    "instruction": row["instruction"],
                    "category": row.get("category") or ("safety" if row["id"] >= 800 else "regular"),
                    "model": model,
                    "output": row["output"],
                    "safety": safety.get((row["id"], row["generator"])),
                }
            )
    return rows


def _rows_from_slice(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def load_just_eval(
    source: str | Path | None = None, max_prompts: int | None = None, seed: int = 0
) -> ResponseTable:
    """The benchmark as a :class:`ResponseTable` with attributes ``length, hedging, structure, safety``.

    ``source``: None for the shipped slice, a just-eval folder, or a slice file (``.jsonl.gz``).
    ``max_prompts`` keeps a random subset of instructions (all their answers), stratified by category.
    Empty answers are dropped.
    """
    path = SLICE_DIR / "slice.jsonl.gz" if source is None else Path(source)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    rows = _rows_from_folder(path) if path.is_dir() else _rows_from_slice(path)
    rows = [r for r in rows if r["output"].strip()]
    ids = sorted({r["id"] for r in rows})
    if max_prompts is not None and max_prompts < len(ids):
        category = {r["id"]: r["category"] for r in rows}
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for cat in sorted(set(category.values())):
            members = [i for i in ids if category[i] == cat]
            share = round(max_prompts * len(members) / len(ids))
            keep += list(rng.choice(members, size=min(share, len(members)), replace=False))
        ids = sorted(int(i) for i in keep)
    position = {i: p for p, i in enumerate(ids)}
    rows = [r for r in rows if r["id"] in position]
    prompts = [""] * len(ids)
    for r in rows:
        prompts[position[r["id"]]] = r["instruction"]
    attributes = np.array(
        [
            (*response_attributes(r["output"]), np.nan if r["safety"] is None else float(r["safety"]))
            for r in rows
        ]
    )
    return ResponseTable(
        prompts=prompts,
        prompt_of=np.array([position[r["id"]] for r in rows], dtype=np.int64),
        responses=[r["output"] for r in rows],
        attributes=attributes,
        attribute_names=list(ATTRIBUTES),
        source=str(source) if source is not None else "just-eval (shipped slice)",
        response_info=[{"id": r["id"], "model": r["model"], "category": r["category"]} for r in rows],
    )
