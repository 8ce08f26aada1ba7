"""Readers for preference data: JSON Lines, JSON, Parquet, and Hugging Face ``datasets``.

Every reader validates as it goes and raises :class:`~steerable.errors.DataError` with the file,
the row and the field of the first problem: missing field, wrong type, vectors of differing lengths,
NaN/inf (JSON's ``NaN``/``Infinity`` literals included), invalid or truncated JSON, empty input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerable.data.schema import OPTION_FIELDS, REQUIRED_FIELDS, PreferenceData
from steerable.data.text import TextPreferences, TextRowBuilder, is_text_row
from steerable.errors import DataError

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def load_any(source: Any) -> PreferenceData | TextPreferences:
    """Load and validate preference pairs from a path (``.jsonl``, ``.json``, ``.parquet``, a saved
    ``datasets`` folder) or an in-memory ``datasets.Dataset`` / ``pyarrow.Table``: numeric options give
    :class:`PreferenceData`, text options (strings or message lists) :class:`TextPreferences`."""
    if isinstance(source, pa.Table):
        return _from_table(source, "<pyarrow.Table>")
    if hasattr(source, "data") and hasattr(source.data, "table"):  # datasets.Dataset, without importing it
        return _from_table(source.data.table, "<datasets.Dataset>")
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise DataError("no such file or directory", source=name)
    if path.is_dir():
        return _from_table(_read_saved_dataset(path), name)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz"):
        return _from_rows(iter_json_rows(path), name)
    if suffix in (".parquet", ".pq"):
        return _from_table(_read_parquet_table(path), name)
    raise DataError(f"unknown file type '{path.suffix}': use .jsonl, .json or .parquet", source=name)


def load_preferences(source: Any) -> PreferenceData:
    """Like :func:`load_any`, for numeric options only (features or precomputed embeddings)."""
    data = load_any(source)
    if isinstance(data, TextPreferences):
        raise DataError(
            "holds text options: embed them first (steerable.text.embed_preferences, or pass --embedder)",
            source=data.source,
        )
    return data


def _from_rows(rows: Iterator[tuple[str, Any]], source: str) -> PreferenceData | TextPreferences:
    first = next(rows, None)
    if first is None:
        raise DataError("file is empty: no preference pairs", source=source)
    builder = TextRowBuilder(source) if is_text_row(first[1]) else _RowBuilder(source)
    builder.add(first[1], first[0])
    for where, row in rows:
        builder.add(row, where)
    return builder.build()


def _from_table(table: pa.Table, source: str) -> PreferenceData | TextPreferences:
    if "chosen" in table.column_names:
        kind = table.column("chosen").type
        nested = getattr(kind, "value_type", None)
        if (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or (nested is not None and pa.types.is_struct(nested))
        ):
            if table.num_rows == 0:
                raise DataError("no rows: no preference pairs", source=source)
            rows = ((f"row {i + 1}", row) for i, row in enumerate(table.to_pylist()))
            return _from_rows(rows, source)
    return from_arrow(table, source)


# ----------------------------------------------------------------------------------------------------
# JSON Lines / JSON: validated row by row, errors name the line.
# ----------------------------------------------------------------------------------------------------
def _open_text(path: Path):
    """UTF-8 text; a leading byte-order mark (as some Windows tools write) is skipped."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def iter_json_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (``"line N"`` or ``"item N"``, parsed row) from a JSON Lines or JSON-array file.

    ``NaN``/``Infinity`` literals parse to non-finite floats (and are rejected by the validators);
    invalid or truncated JSON raises :class:`DataError` naming the line.
    """
    path = Path(path)
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    try:
        with _open_text(path) as handle:
            if suffix == ".json":
                text = handle.read()
                if not text.strip():
                    return
                try:
                    rows = json.loads(text, parse_constant=_NON_FINITE.__getitem__)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", source=str(path)
                    ) from None
                if not isinstance(rows, list):
                    raise DataError(
                        "expected a JSON array of objects (or use .jsonl: one object per line)",
                        source=str(path),
                    )
                yield from ((f"item {n}", row) for n, row in enumerate(rows, start=1))
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line, parse_constant=_NON_FINITE.__getitem__)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"invalid JSON ({exc.msg} at column {exc.colno})",
                        source=str(path),
                        row=f"line {number}",
                    ) from None
                yield f"line {number}", row
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", source=str(path)) from None


def read_jsonl(path: str | Path) -> PreferenceData:
    """Read one JSON object per line; blank lines are skipped."""
    builder = _RowBuilder(str(path))
    for where, row in iter_json_rows(path):
        builder.add(row, where)
    return builder.build()


read_json = read_jsonl  # a JSON array of row objects: same rows, named "item N"


class _RowBuilder:
    """Validates rows one at a time and collects them into columns."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.user_ids: list[str] = []
        self.chosen: list[np.ndarray] = []
        self.rejected: list[np.ndarray] = []
        self.prompts: list[str | None] = []
        self.modes: list[int] = []
        self.hidden_z: list[np.ndarray] = []
        self.dim: int | None = None
        self.z_dim: int | None = None
        self.first_where = ""

    def _error(self, message: str, where: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, row=where, field=field)

    def _vector(self, value: Any, where: str, field: str) -> np.ndarray:
        if isinstance(value, str):
            raise self._error(
                "text options are not supported by this reader yet: give numeric vectors "
                "(features or precomputed embeddings)",
                where,
                field,
            )
        if not isinstance(value, list) or not value:
            raise self._error(f"expected a non-empty list of numbers, got {_describe(value)}", where, field)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            bad = next(v for v in value if isinstance(v, bool) or not isinstance(v, (int, float)))
            raise self._error(f"expected numbers, found {_describe(bad)}", where, field)
        vector = np.asarray(value, dtype=np.float64)
        if not np.isfinite(vector).all():
            raise self._error("contains NaN or infinity", where, field)
        if np.abs(vector).max() > np.finfo(np.float32).max:
            raise self._error("value too large for float32", where, field)
        return vector.astype(np.float32)

    def add(self, row: Any, where: str) -> None:
        if not isinstance(row, dict):
            raise self._error(f"expected a JSON object, got {_describe(row)}", where)
        for field in REQUIRED_FIELDS:
            if field not in row or row[field] is None:
                raise self._error("missing required field", where, field)
        user = row["user_id"]
        if isinstance(user, bool) or not isinstance(user, (str, int)) or (isinstance(user, str) and not user):
            raise self._error(
                f"expected a non-empty string or an integer, got {_describe(user)}", where, "user_id"
            )
        chosen = self._vector(row["chosen"], where, "chosen")
        rejected = self._vector(row["rejected"], where, "rejected")
        if len(chosen) != len(rejected):
            raise self._error(
                f"{len(rejected)} values but 'chosen' has {len(chosen)}: options must have equal length",
                where,
                "rejected",
            )
        if self.dim is None:
            self.dim, self.first_where = len(chosen), where
        elif len(chosen) != self.dim:
            raise self._error(
                f"{len(chosen)} values, but {self.first_where} has {self.dim}: options need equal lengths",
                where,
                "chosen",
            )
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise self._error(f"expected a string, got {_describe(prompt)}", where, "prompt")
        mode = row.get("hidden_mode")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)):
            raise self._error(f"expected an integer, got {_describe(mode)}", where, "hidden_mode")
        z = row.get("hidden_z")
        if z is not None:
            z = self._vector(z, where, "hidden_z")
            if self.z_dim is None:
                self.z_dim = len(z)
            elif len(z) != self.z_dim:
                raise self._error(f"{len(z)} values, expected {self.z_dim}", where, "hidden_z")
        if (self.hidden_z and z is None) or (not self.hidden_z and z is not None and self.user_ids):
            raise self._error("present in some rows but not in others", where, "hidden_z")
        self.user_ids.append(str(user))
        self.chosen.append(chosen)
        self.rejected.append(rejected)
        self.prompts.append(prompt)
        self.modes.append(-1 if mode is None else mode)
        if z is not None:
            self.hidden_z.append(z)

    def build(self) -> PreferenceData:
        if not self.user_ids:
            raise DataError("file is empty: no preference pairs", source=self.source)
        return PreferenceData(
            user_ids=np.array(self.user_ids, dtype=object),
            chosen=np.stack(self.chosen),
            rejected=np.stack(self.rejected),
            prompts=None if all(p is None for p in self.prompts) else np.array(self.prompts, dtype=object),
            hidden_mode=None if all(m < 0 for m in self.modes) else np.array(self.modes, dtype=np.int64),
            hidden_z=np.stack(self.hidden_z) if self.hidden_z else None,
            source=self.source,
        )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) else type(value).__name__
    kind = {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)
    return kind if isinstance(value, (list, dict)) else f"{kind} {text[:40]}"


# ----------------------------------------------------------------------------------------------------
# Parquet / Arrow / datasets: validated column-wise, errors name the (1-based) row.
# ----------------------------------------------------------------------------------------------------
def _read_parquet_table(path: str | Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({exc})", source=str(path)) from None


def read_parquet(path: str | Path) -> PreferenceData:
    """Read a Parquet file of numeric options with the columns of :mod:`steerable.data.schema`."""
    return from_arrow(_read_parquet_table(path), str(path))


def _read_saved_dataset(path: Path) -> pa.Table:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dev dependency
        raise DataError(
            "a folder is read as a saved Hugging Face dataset: pip install datasets", source=str(path)
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"not a saved Hugging Face dataset ({exc})", source=str(path)) from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"holds splits {sorted(dataset)}: pass one split's folder", source=str(path))
    return dataset.data.table


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _option_matrix(table: pa.Table, field: str, source: str) -> np.ndarray:
    column = table.column(field).combine_chunks()
    where = lambda i: f"row {i + 1}"  # noqa: E731
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        raise DataError(
            "text options are not supported by this reader yet: give numeric vectors",
            source=source,
            field=field,
        )
    if not (
        pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
        or pa.types.is_fixed_size_list(column.type)
    ):
        raise DataError(
            f"expected a list of numbers, column type is {column.type}", source=source, field=field
        )
    value_type = column.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        raise DataError(f"expected numbers, list items are {value_type}", source=source, field=field)
    if column.null_count:
        raise DataError(
            "missing value",
            source=source,
            row=where(_first_true(column.is_null().to_numpy(zero_copy_only=False))),
            field=field,
        )
    lengths = pc.list_value_length(column).to_numpy()
    if (lengths == 0).any():
        raise DataError("empty list", source=source, row=where(_first_true(lengths == 0)), field=field)
    if (lengths != lengths[0]).any():
        i = _first_true(lengths != lengths[0])
        raise DataError(
            f"{lengths[i]} values, but row 1 has {lengths[0]}: all options must have equal length",
            source=source,
            row=where(i),
            field=field,
        )
    flat = pc.list_flatten(column)
    if flat.null_count:
        i = _first_true(flat.is_null().to_numpy(zero_copy_only=False)) // int(lengths[0])
        raise DataError("contains a null value", source=source, row=where(i), field=field)
    values = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), int(lengths[0]))
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise DataError(
            "contains NaN or infinity", source=source, row=where(_first_true(~finite)), field=field
        )
    return values


def from_arrow(table: pa.Table, source: str = "<arrow>") -> PreferenceData:
    """Validate an Arrow table (from Parquet or ``datasets``) and convert it to :class:`PreferenceData`."""
    if table.num_rows == 0:
        raise DataError("no rows: no preference pairs", source=source)
    for field in REQUIRED_FIELDS:
        if field not in table.column_names:
            raise DataError(
                f"missing required column (columns: {', '.join(table.column_names)})",
                source=source,
                field=field,
            )
    users = table.column("user_id").combine_chunks()
    if not (
        pa.types.is_integer(users.type)
        or pa.types.is_string(users.type)
        or pa.types.is_large_string(users.type)
    ):
        raise DataError(
            f"expected strings or integers, column type is {users.type}", source=source, field="user_id"
        )
    if users.null_count:
        raise DataError(
            "missing value",
            source=source,
            row=f"row {_first_true(users.is_null().to_numpy(zero_copy_only=False)) + 1}",
            field="user_id",
        )
    user_ids = np.array([str(u) for u in users.to_pylist()], dtype=object)
    chosen, rejected = (_option_matrix(table, f, source) for f in OPTION_FIELDS)
    if chosen.shape[1] != rejected.shape[1]:
        raise DataError(
            f"{rejected.shape[1]} values but 'chosen' has {chosen.shape[1]}",
            source=source,
            row="row 1",
            field="rejected",
        )
    prompts = None
    if "prompt" in table.column_names:
        column = table.column("prompt")
        if not (
            pa.types.is_string(column.type)
            or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)
        ):
            raise DataError(f"expected strings, column type is {column.type}", source=source, field="prompt")
        values = column.to_pylist()
        prompts = None if all(v is None for v in values) else np.array(values, dtype=object)
    hidden_mode = None
    if "hidden_mode" in table.column_names:
        column = table.column("hidden_mode")
        if not pa.types.is_integer(column.type):
            raise DataError(
                f"expected integers, column type is {column.type}", source=source, field="hidden_mode"
            )
        hidden_mode = np.asarray(column.fill_null(-1).to_numpy(), dtype=np.int64)
    hidden_z = _option_matrix(table, "hidden_z", source) if "hidden_z" in table.column_names else None
    return PreferenceData(
        user_ids=user_ids,
        chosen=chosen,
        rejected=rejected,
        prompts=prompts,
        hidden_mode=hidden_mode,
        hidden_z=hidden_z,
        source=source,
    )
