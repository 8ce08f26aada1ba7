"""UltraFeedback pipeline on a fixture in the exact schema, against hand-counted values
(see tests/fixtures/make_ultrafeedback_fixture.py for the counts)."""

import json
from pathlib import Path

import numpy as np
import pytest

from steerable.data.simulate import Population
from steerable.errors import DataError
from steerable.text.responses import PairPool, simulate_pool_users
from steerable.text.ultrafeedback import load_ultrafeedback

FIXTURE = Path(__file__).parent / "fixtures" / "ultrafeedback_tiny.jsonl"


def modes(k):
    return Population(name="m", dim=k, modes=np.eye(k).tolist())


@pytest.fixture(scope="module")
def table():
    return load_ultrafeedback(FIXTURE)


def test_ratings_and_skipped_instruction(table):
    assert table.num_prompts == 4  # D has a single non-empty completion
    assert len(table.responses) == 4 + 4 + 4 + 3
    assert table.attribute_names == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    assert np.isnan(table.attributes[3, 3]) and np.isnan(table.attributes[7, 0])  # "N/A"
    assert table.attributes[0].tolist() == [5, 2, 5, 4]


def test_pair_and_conflict_counts_for_two_aspects(table):
    pool = PairPool.build(table, np.arange(table.num_prompts), ["helpfulness", "honesty"])
    per_prompt = np.bincount(table.prompt_of[pool.a], minlength=4)
    assert per_prompt.tolist() == [6, 2, 5, 3]
    conflicting = pool.conflicting(modes(2))
    assert int(conflicting.sum()) == 12
    assert np.bincount(table.prompt_of[pool.a[conflicting]], minlength=4).tolist() == [6, 0, 3, 3]


def test_pair_and_conflict_counts_for_three_aspects(table):
    pool = PairPool.build(table, np.arange(table.num_prompts), ["helpfulness", "honesty", "truthfulness"])
    assert len(pool) == 12
    assert int(pool.conflicting(modes(3)).sum()) == 10


def test_split_by_prompt_never_shares_a_prompt(table):
    parts = table.split_prompts((0.5, 0.25, 0.25), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2, 3]
    pools = [PairPool.build(table, p, ["helpfulness", "honesty"]) for p in parts]
    prompts = [set(table.prompt_of[p.a].tolist()) for p in pools]
    assert all(not (prompts[i] & prompts[j]) for i in range(3) for j in range(i + 1, 3))
    assert sum(len(p) for p in pools) == 16


def test_conflict_rate_control_in_simulated_users(table):
    pool = PairPool.build(table, np.arange(table.num_prompts), ["helpfulness", "honesty"])
    embeddings = np.eye(len(table.responses), dtype=np.float32)
    for rate, expected in [(1.0, 4), (0.5, 2), (0.0, 0)]:
        users = simulate_pool_users(
            pool, embeddings, modes(2), num_users=5, pairs_per_user=4, conflict_rate=rate, seed=0
        )
        chosen, rejected = users.chosen.argmax(1), users.rejected.argmax(1)
        va, vb = table.attributes[chosen][:, :2], table.attributes[rejected][:, :2]
        conflict = modes(2).is_conflicting(va, vb).reshape(5, 4).sum(1)
        assert conflict.tolist() == [expected] * 5
        # each user's choices follow its hidden mode
        mode = users.hidden_mode
        assert (va[np.arange(20), mode] > vb[np.arange(20), mode]).all()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["completions"][0]["annotations"]["honesty"].update(Rating="7"), "outside 1..5"),
        (
            lambda r: r["completions"][1]["annotations"]["honesty"].update(Rating="high"),
            "neither 1..5 nor N/A",
        ),
        (lambda r: r["completions"][2].pop("response"), "completions[2].response"),
        (lambda r: r.pop("instruction"), "field 'instruction'"),
    ],
)
def test_malformed_rows_name_row_and_field(tmp_path, mutate, message):
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    mutate(rows[1])
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="line 2") as err:
        load_ultrafeedback(path)
    assert message in str(err.value)


def test_parquet_copy_reads_the_same(tmp_path, table):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf.parquet"))
    again = load_ultrafeedback(tmp_path / "uf.parquet")
    np.testing.assert_array_equal(
        np.nan_to_num(again.attributes, nan=-1), np.nan_to_num(table.attributes, nan=-1)
    )


def test_hh_study_runs_on_ultrafeedback_schema(tmp_path, tiny_encoder):
    from steerable.cli import main

    rng = np.random.default_rng(0)
    template = json.loads(FIXTURE.read_text().splitlines()[0])
    rows = []
    for i in range(150):
        row = json.loads(json.dumps(template))
        row["instruction"] = f"Question {i}: what about topic {rng.integers(1000)}?"
        for j, completion in enumerate(row["completions"]):
            completion["response"] = f"Answer {j} to question {i}: " + " ".join(
                rng.choice(["yes", "no", "maybe", "so"], 8)
            )
            for aspect in completion["annotations"]:
                completion["annotations"][aspect]["Rating"] = str(int(rng.integers(1, 6)))
        rows.append(row)
    data = tmp_path / "uf.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "hh"
    code = main(
        [
            "experiment",
            "hh",
            "--out",
            str(out),
            "--data",
            str(data),
            "--embedder",
            tiny_encoder,
            "--max-length",
            "64",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--train-users",
            "30",
            "--val-users",
            "10",
            "--test-users",
            "10",
            "--pairs-per-user",
            "12",
            "--np-steps",
            "3",
            "--btl-steps",
            "2",
            "--eval-tasks",
            "20",
            "--context-sizes",
            "0,1,3,10",
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["modes"] == ["helpfulness", "honesty"] and result["data"]["kind"] == "ultrafeedback"
    assert set(result["models"]["btl-oracle"]) == {"helpfulness", "honesty"}
