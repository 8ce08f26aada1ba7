"""The four text studies through the CLI, on a few prompts of the shipped slice with a tiny embedder:
each writes its documented results.json and plots (the numbers themselves are measured in the README)."""

import json

import pytest

from steerable.cli import main
from steerable.text.just_eval import load_just_eval, response_attributes


def tiny(tmp_path, encoder):
    return [
        "--max-prompts",
        "30",
        "--embedder",
        encoder,
        "--max-length",
        "64",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--train-users",
        "60",
        "--val-users",
        "20",
        "--test-users",
        "30",
        "--pairs-per-user",
        "12",
    ]


def test_hh_schema(tmp_path, tiny_encoder):
    out = tmp_path / "hh"
    assert (
        main(
            [
                "experiment",
                "hh",
                "--out",
                str(out),
                "--seed",
                "0",
                *tiny(tmp_path, tiny_encoder),
                "--np-steps",
                "4",
                "--btl-steps",
                "2",
                "--eval-tasks",
                "40",
                "--context-sizes",
                "0,1,3,10",
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert r["modes"] == ["length", "hedging"]
    for model in ("btl-mixed", "btl-oracle", "np-btl"):
        assert set(r["models"][model]) == {"length", "hedging"}
        assert set(r["models"][model]["length"]) == {"0", "1", "3", "10"}
    assert set(r["silhouette"]) == {"0", "1", "3", "10"}
    # two deterministic types on fully conflicting pairs: without context Bayes is a coin flip over the
    # types (one type right, the other wrong); one answered pair identifies the type
    bayes = r["bayes"]
    assert bayes["length"]["0"] + bayes["hedging"]["0"] == pytest.approx(1.0, abs=1e-9)
    assert all(bayes[m][c] == 1.0 for m in ("length", "hedging") for c in ("1", "3", "10"))
    assert {p.name for p in out.glob("*.png")} == {"accuracy_per_mode.png", "embedding_pca.png"}
    # a second run reads every embedding from the cache
    assert (
        main(
            [
                "experiment",
                "hh",
                "--out",
                str(out),
                "--seed",
                "0",
                *tiny(tmp_path, tiny_encoder),
                "--np-steps",
                "4",
                "--btl-steps",
                "2",
                "--eval-tasks",
                "40",
                "--context-sizes",
                "0,1,3,10",
            ]
        )
        == 0
    )
    again = json.loads((out / "results.json").read_text())
    assert again["embedding"]["embedded"] == 0 and again["models"] == r["models"]


def test_three_modes_conflict_rate_and_continuous_schemas(tmp_path, tiny_encoder):
    out = tmp_path / "three"
    assert (
        main(
            [
                "experiment",
                "three-modes",
                "--out",
                str(out),
                *tiny(tmp_path, tiny_encoder),
                "--np-steps",
                "3",
                "--btl-steps",
                "2",
                "--eval-tasks",
                "30",
                "--pca-context-sizes",
                "1,10",
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["modes"] == ["length", "hedging", "structure"]
    out = tmp_path / "conflict"
    assert (
        main(
            [
                "experiment",
                "conflict-rate",
                "--out",
                str(out),
                *tiny(tmp_path, tiny_encoder),
                "--np-steps",
                "3",
                "--eval-tasks",
                "20",
                "--context-sizes",
                "1,3",
                "--context-conflict-rates",
                "0,1",
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert set(r["accuracy"]) == {
        "train_conflict_rate=0.5",
        "train_conflict_rate=0.75",
        "train_conflict_rate=1.0",
    }
    assert set(r["accuracy"]["train_conflict_rate=1.0"]) == {"0.0", "1.0"}
    out = tmp_path / "continuous"
    assert (
        main(
            [
                "experiment",
                "continuous",
                "--out",
                str(out),
                *tiny(tmp_path, tiny_encoder),
                "--np-steps",
                "3",
                "--eval-tasks",
                "40",
                "--context-sizes",
                "0,3",
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert len(r["2d"]["bins"]) == 10 and len(r["2d"]["accuracy"]["3"]) == 10
    assert set(r["3d"]["accuracy"]) == {"0", "3"} and r["3d"]["attributes"] == [
        "length",
        "hedging",
        "structure",
    ]
    assert {p.name for p in out.glob("*.png")} == {"accuracy_2d.png", "accuracy_3d.png"}


def test_attributes_by_hand():
    text = (
        "Sure.\n\n1. First item\n2. Second item\n## Notes\nHowever, you may want to consult a professional."
    )
    length, hedging, structure = response_attributes(text)
    assert length == 17 and structure == 3
    assert hedging == pytest.approx(100 * 4 / 17)  # however, may, consult, professional


def test_shipped_slice_and_split_by_prompt():
    table = load_just_eval()
    assert table.num_prompts == 300 and len(table.responses) == 3900
    cats = [i["category"] for i in table.response_info]
    assert cats.count("safety") == 60 * 13
    train, val, test = table.split_prompts((0.8, 0.1, 0.1), seed=0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(train) + len(val) + len(test) == 300


def test_text_file_through_embed_train_and_evaluate(tmp_path, tiny_encoder):
    import numpy as np

    table = load_just_eval(max_prompts=20)
    rows = []
    rng = np.random.default_rng(0)
    for user in range(12):
        mode = user % 2
        for _ in range(12):
            prompt = int(rng.integers(table.num_prompts))
            a, b = rng.choice(np.flatnonzero(table.prompt_of == prompt), size=2, replace=False)
            if table.attributes[a, mode] < table.attributes[b, mode]:
                a, b = b, a
            rows.append(
                {
                    "user_id": f"u{user}",
                    "prompt": table.prompts[prompt],
                    "chosen": table.responses[a],
                    "rejected": table.responses[b],
                    "hidden_mode": mode,
                }
            )
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = ["--embedder", tiny_encoder, "--embed-max-length", "64", "--cache-dir", str(tmp_path / "cache")]
    assert main(["embed", "--data", str(data), "--out", str(tmp_path / "vectors.parquet"), *emb]) == 0
    model = tmp_path / "model"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--model",
                "np-btl",
                "--out",
                str(model),
                "--max-steps",
                "3",
                "--eval-every",
                "3",
                "--max-context",
                "4",
                "--num-targets",
                "8",
                "--val-tasks",
                "10",
                *emb,
            ]
        )
        == 0
    )
    assert json.loads((model / "embedder.json").read_text())["model"] == tiny_encoder
    assert (
        main(
            [
                "evaluate",
                str(model),
                "--data",
                str(data),
                "--context-sizes",
                "0,2",
                "--targets",
                "8",
                "--tasks",
                "10",
                "--json",
                str(tmp_path / "e.json"),
                *emb,
            ]
        )
        == 0
    )
    assert set(json.loads((tmp_path / "e.json").read_text())["accuracy"]) == {"0", "2"}


def test_prompt_split_sets_the_shares_of_prompts_per_split(tmp_path, tiny_encoder):
    """--prompt-split: the text studies split the prompts in the given shares, disjointly; a bad split is a
    clear configuration error."""
    from steerable.errors import ConfigError
    from steerable.experiments.text_common import TextDataConfig, prepare_text_study

    def prompts_per_split(split):
        config = TextDataConfig(
            max_prompts=30,
            embedder=tiny_encoder,
            max_length=64,
            cache_dir=str(tmp_path / "cache"),
            prompt_split=split,
        )
        study = prepare_text_study(config, ["hedging", "structure"], 2, seed=0)
        for name, pool in study.pools.items():  # each pool's pairs come from its own split's prompts
            assert set(study.table.prompt_of[pool.a].tolist()) <= set(study.prompt_ids[name].tolist())
        return {name: set(ids.tolist()) for name, ids in study.prompt_ids.items()}

    default = prompts_per_split([0.8, 0.1, 0.1])
    wider = prompts_per_split([0.5, 0.1, 0.4])
    assert [len(default[k]) for k in ("train", "val", "test")] == [24, 3, 3]
    assert [len(wider[k]) for k in ("train", "val", "test")] == [15, 3, 12]
    assert not (
        wider["train"] & wider["test"] or wider["train"] & wider["val"] or wider["val"] & wider["test"]
    )
    assert len(wider["train"] | wider["val"] | wider["test"]) == 30
    with pytest.raises(ConfigError, match="sum to 1"):
        prompts_per_split([0.5, 0.1, 0.1])
    with pytest.raises(ConfigError, match="three shares"):
        prompts_per_split([0.9, 0.1])
