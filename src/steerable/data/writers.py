"""Writers for preference data (JSON Lines or Parquet), atomic: a crash never leaves half a file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from steerable.data.schema import PreferenceData
from steerable.utils.files import atomic_path


def to_arrow(data: PreferenceData) -> pa.Table:
    """The dataset as an Arrow table with the schema's column names."""
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(data.user_ids.astype(str).tolist(), pa.string()),
        "chosen": pa.array(list(data.chosen), pa.list_(pa.float32())),
        "rejected": pa.array(list(data.rejected), pa.list_(pa.float32())),
    }
    if data.prompts is not None:
        columns["prompt"] = pa.array(data.prompts.tolist(), pa.string())
    if data.hidden_mode is not None:
        columns["hidden_mode"] = pa.array(data.hidden_mode, pa.int64())
    if data.hidden_z is not None:
        columns["hidden_z"] = pa.array(list(data.hidden_z), pa.list_(pa.float32()))
    return pa.table(columns)


def _json_rows(data: PreferenceData):
    for i in range(data.num_pairs):
        row: dict[str, object] = {
            "user_id": str(data.user_ids[i]),
            "chosen": [float(v) for v in data.chosen[i]],
            "rejected": [float(v) for v in data.rejected[i]],
        }
        if data.prompts is not None and data.prompts[i] is not None:
            row["prompt"] = data.prompts[i]
        if data.hidden_mode is not None:
            row["hidden_mode"] = int(data.hidden_mode[i])
        if data.hidden_z is not None:
            row["hidden_z"] = [float(v) for v in data.hidden_z[i]]
        yield row


def write_preferences(data: PreferenceData, path: str | Path) -> Path:
    """Write ``data`` to ``path``; the format follows the suffix (``.jsonl`` or ``.parquet``)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unknown suffix '{path.suffix}', use .jsonl or .parquet")
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(to_arrow(data), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in _json_rows(data):
                    handle.write(json.dumps(row, allow_nan=False) + "\n")
    return path
