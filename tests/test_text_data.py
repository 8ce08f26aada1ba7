"""Text preference rows (TRL standard and conversational forms) and their validation."""

import json

import pytest

from steerable.data.readers import load_any, load_preferences
from steerable.data.text import TextPreferences
from steerable.errors import DataError

STANDARD = {"user_id": "u1", "prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Go away."}
CONVERSATIONAL = {
    "user_id": 2,
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
    "chosen": [{"role": "assistant", "content": "Hi!"}],
    "rejected": [{"role": "assistant", "content": "Hello, how may I help you today?"}],
}


def write(tmp_path, *rows, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_and_conversational_rows_normalise_to_messages(tmp_path):
    data = load_any(write(tmp_path, STANDARD, CONVERSATIONAL))
    assert isinstance(data, TextPreferences) and data.num_pairs == 2
    chosen, rejected = data.option_messages()
    assert chosen[0] == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there!"},
    ]
    assert [m["role"] for m in rejected[1]] == ["system", "user", "assistant"]
    assert list(data.user_ids) == ["u1", "2"]
    assert data.prompt_strings()[0] == "user: Say hi."


def test_prompt_is_optional(tmp_path):
    data = load_any(write(tmp_path, {k: v for k, v in STANDARD.items() if k != "prompt"}))
    assert data.prompts == [[]] and data.option_messages()[0][0] == [
        {"role": "assistant", "content": "Hi there!"}
    ]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({**STANDARD, "chosen": "  "}, "line 2: field 'chosen': empty text"),
        ({**STANDARD, "rejected": 5}, "line 2: field 'rejected': expected text or a list of messages"),
        ({**STANDARD, "rejected": [0.1, 0.2]}, "field 'rejected': message 1: expected an object"),
        (
            {k: v for k, v in STANDARD.items() if k != "rejected"},
            "line 2: field 'rejected': missing required field",
        ),
        (
            {**CONVERSATIONAL, "chosen": [{"role": "robot", "content": "x"}]},
            "field 'chosen': message 1: role must be one of",
        ),
        (
            {**CONVERSATIONAL, "chosen": [{"role": "assistant"}]},
            "field 'chosen': message 1: 'content' must be non-empty text",
        ),
        ({**STANDARD, "prompt": {"text": "hi"}}, "field 'prompt': expected text or a list of messages"),
        ({**STANDARD, "user_id": None}, "field 'user_id': missing required field"),
    ],
)
def test_malformed_text_rows_name_line_and_field(tmp_path, row, expected):
    with pytest.raises(DataError) as err:
        load_any(write(tmp_path, STANDARD, row))
    assert expected in str(err.value), str(err.value)


def test_vector_reader_points_text_files_to_an_embedder(tmp_path):
    with pytest.raises(DataError, match="holds text options: embed them first"):
        load_preferences(write(tmp_path, STANDARD))


def test_text_parquet_and_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([STANDARD, {**STANDARD, "user_id": "u2"}])
    assert load_any(ds).num_pairs == 2
    ds.to_parquet(str(tmp_path / "t.parquet"))
    data = load_any(tmp_path / "t.parquet")
    assert isinstance(data, TextPreferences) and data.chosen[1] == [
        {"role": "assistant", "content": "Hi there!"}
    ]
    bad = datasets.Dataset.from_list([STANDARD, {**STANDARD, "chosen": ""}])
    with pytest.raises(DataError, match="row 2: field 'chosen': empty text"):
        load_any(bad)
