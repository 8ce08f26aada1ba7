"""Readers and writers: good files in every format load the same; every malformed case is named."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steerable.data import load_preferences, simulate, step_population, write_preferences
from steerable.errors import DataError

GOOD = {"user_id": "a", "chosen": [0.1, 0.2], "rejected": [0.3, 0.4]}


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    data = simulate(step_population(), 5, 3, seed=0)
    back = load_preferences(write_preferences(data, tmp_path / "d.jsonl"))
    np.testing.assert_array_equal(back.chosen, data.chosen)
    np.testing.assert_array_equal(back.rejected, data.rejected)
    np.testing.assert_array_equal(back.hidden_mode, data.hidden_mode)
    assert list(back.user_ids) == list(data.user_ids)
    assert back.num_users == 5


def test_parquet_and_jsonl_load_identically(tmp_path):
    data = simulate(step_population(), 4, 3, seed=0)
    a = load_preferences(write_preferences(data, tmp_path / "d.jsonl"))
    b = load_preferences(write_preferences(data, tmp_path / "d.parquet"))
    np.testing.assert_array_equal(a.chosen, b.chosen)
    assert list(a.users) == list(b.users)


def test_hugging_face_dataset_in_memory_and_saved(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**GOOD, "prompt": None}, {**GOOD, "user_id": "b", "prompt": "p"}])
    data = load_preferences(ds)
    assert data.num_pairs == 2 and data.dim == 2 and list(data.prompts) == [None, "p"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved").num_pairs == 2


def test_integer_user_ids_and_optional_prompt(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl", json.dumps({**GOOD, "user_id": 7, "prompt": "hi"}), "", json.dumps(GOOD)
    )
    data = load_preferences(path)
    assert list(data.users) == ["7", "a"]
    assert list(data.prompts) == ["hi", None]


def test_byte_order_mark_and_crlf_lines_are_read(tmp_path):
    """Files from Windows tools: a UTF-8 BOM, CRLF line ends and blank lines read like plain JSONL."""
    rows = [{"user_id": "a", "chosen": [1.0, 2.0], "rejected": [0.0, 1.0]}] * 3
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n")
    data = load_preferences(path)
    assert list(data.users) == ["a"] and data.num_pairs == 3
    with pytest.raises(DataError, match="not UTF-8"):
        (tmp_path / "latin1.jsonl").write_bytes(b'{"user_id": "\xe9", "chosen": [1], "rejected": [0]}\n')
        load_preferences(tmp_path / "latin1.jsonl")


def test_json_array_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, GOOD]))
    assert load_preferences(tmp_path / "d.json").num_pairs == 2


BAD_JSONL = {
    "missing-field": (
        ['{"user_id": "b", "chosen": [0.1, 0.2]}'],
        "line 2: field 'rejected': missing required field",
    ),
    "dims-in-row": (
        ['{"user_id": "a", "chosen": [0.1], "rejected": [0.3, 0.4]}'],
        "line 2: field 'rejected'",
    ),
    "dims-across-rows": (
        ['{"user_id": "a", "chosen": [1, 2, 3], "rejected": [1, 2, 3]}'],
        "line 2: field 'chosen': 3 values, but line 1 has 2",
    ),
    "nan": (
        ['{"user_id": "c", "chosen": [NaN, 0.2], "rejected": [0.3, 0.4]}'],
        "line 2: field 'chosen': contains NaN or infinity",
    ),
    "infinity": (
        ['{"user_id": "c", "chosen": [0.1, 0.2], "rejected": [-Infinity, 0.4]}'],
        "line 2: field 'rejected': contains NaN",
    ),
    "overflow": (
        ['{"user_id": "c", "chosen": [1e39, 0.2], "rejected": [0.3, 0.4]}'],
        "line 2: field 'chosen': value too large",
    ),
    "truncated": (['{"user_id": "d", "chosen": [0.1, 0.2], "rej'], "line 2: invalid JSON"),
    "not-object": (["[1, 2]"], "line 2: expected a JSON object"),
    "string-in-vector": (
        ['{"user_id": "a", "chosen": [0.1, "x"], "rejected": [0.3, 0.4]}'],
        "line 2: field 'chosen': expected numbers",
    ),
    "bool-user": (
        ['{"user_id": true, "chosen": [0.1, 0.2], "rejected": [0.3, 0.4]}'],
        "line 2: field 'user_id'",
    ),
    "null-user": (
        ['{"user_id": null, "chosen": [0.1, 0.2], "rejected": [0.3, 0.4]}'],
        "line 2: field 'user_id': missing",
    ),
    "empty-vector": (
        ['{"user_id": "a", "chosen": [], "rejected": []}'],
        "line 2: field 'chosen': expected a non-empty list",
    ),
    "text-option": (
        ['{"user_id": "a", "chosen": "hello", "rejected": "bye"}'],
        "line 2: field 'chosen': text options",
    ),
    "prompt-type": (
        ['{"user_id": "a", "chosen": [0.1, 0.2], "rejected": [0.3, 0.4], "prompt": 3}'],
        "field 'prompt'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_malformed_jsonl_names_file_line_and_field(tmp_path, case):
    lines, expected = BAD_JSONL[case]
    path = write_lines(tmp_path / f"{case}.jsonl", json.dumps(GOOD), *lines)
    with pytest.raises(DataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert str(path) in message and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_preferences(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_preferences(tmp_path / "x.csv")


def _parquet(tmp_path, table):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_errors_name_row_and_field(tmp_path):
    base = {"user_id": ["a", "b"], "chosen": [[0.1, 0.2], [0.1, 0.2]], "rejected": [[0.3, 0.4], [0.3, 0.4]]}
    cases = {
        "missing": (
            {k: v for k, v in base.items() if k != "rejected"},
            "field 'rejected': missing required column",
        ),
        "nan": ({**base, "chosen": [[0.1, 0.2], [float("nan"), 0.2]]}, "row 2: field 'chosen': contains NaN"),
        "lengths": ({**base, "rejected": [[0.3, 0.4], [0.3]]}, "row 2: field 'rejected'"),
        "null": ({**base, "rejected": [[0.3, 0.4], None]}, "row 2: field 'rejected': missing value"),
        "null-user": ({**base, "user_id": ["a", None]}, "row 2: field 'user_id': missing value"),
    }
    for name, (columns, expected) in cases.items():
        path = _parquet(tmp_path, pa.table(columns))
        with pytest.raises(DataError) as err:
            load_preferences(path)
        assert expected in str(err.value), (name, str(err.value))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_preferences(path)


def test_write_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    data = simulate(step_population(), 3, 2, seed=0)
    path = write_preferences(data, tmp_path / "d.jsonl")
    before = path.read_bytes()
    import steerable.data.writers as writers

    def boom(_):
        raise RuntimeError("disk full")
        yield  # pragma: no cover

    monkeypatch.setattr(writers, "_json_rows", boom)
    with pytest.raises(RuntimeError):
        write_preferences(data, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary file left behind
