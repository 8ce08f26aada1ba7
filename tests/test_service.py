"""The personalization service through a real uvicorn server on loopback and the real HTTP client:
storage and restarts, concurrent writers, auth, validation, agreement with the library, next query, text
options, generation, the CLI, and a schemathesis fuzz run against the OpenAPI schema."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from conftest import tiny_config
from steerable.active import select_next
from steerable.cli import main
from steerable.models import build_reward_model, load_reward_model
from steerable.service import Client, Limits, ServerThread, ServiceError, create_app, open_store


# ---- helpers ------------------------------------------------------------------------------------------
def _save(folder: Path, model_type: str = "np-btl", seed: int = 0, input_dim: int = 2) -> Path:
    model = build_reward_model(tiny_config(model_type, input_dim=input_dim), seed=seed)
    with torch.no_grad():  # a fitted standardisation, so that it is part of what must match
        model.input_shift.copy_(torch.linspace(-0.5, 0.5, input_dim))
        model.input_scale.copy_(torch.linspace(0.5, 2.0, input_dim))
    model.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def serving(model, db: Path, **kw):
    """A real server for ``model`` (a folder or several) on loopback; yields (url, client)."""
    app = create_app(model, db=db, **kw)
    server = ServerThread(app)
    url = server.start()
    client = Client(url, token=kw.get("token"))
    try:
        yield url, client
    finally:
        client.close()
        server.stop()
        app.state.engine.close()


def _pairs(rng: np.random.Generator, n: int, dim: int = 2) -> list[dict]:
    return [
        {"chosen": rng.normal(size=dim).round(4).tolist(), "rejected": rng.normal(size=dim).round(4).tolist()}
        for _ in range(n)
    ]


def _arrays(pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([p["chosen"] for p in pairs], dtype=np.float32),
        np.array([p["rejected"] for p in pairs], dtype=np.float32),
    )


@pytest.fixture(scope="module")
def np_model(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("np-btl"))


@pytest.fixture
def server(np_model, tmp_path):
    with serving(np_model, tmp_path / "prefs.db") as running:
        yield running


# ---- storage ------------------------------------------------------------------------------------------
def test_health_describes_the_model(server):
    _, client = server
    health = client.health()
    assert health["model_type"] == "np-btl" and health["input_dim"] == 2
    assert health["options"] == "numeric" and health["embedder"] is None
    assert health["policy_loaded"] is False and health["auth_required"] is False
    assert health["strategies"] == ["uncertainty", "random"]  # no info-gain for one deterministic model


def test_pairs_are_appended_in_order_and_users_can_be_forgotten(server):
    _, client = server
    rng = np.random.default_rng(0)
    first, second = _pairs(rng, 3), _pairs(rng, 2)
    second[0]["prompt"] = "which is better?"
    assert client.add_preferences("alice", first) == {"user_id": "alice", "added": 3, "num_pairs": 3}
    assert client.add_preferences("alice", second)["num_pairs"] == 5
    client.add_preferences("bob", _pairs(rng, 1))
    user = client.get_user("alice")
    assert user["num_pairs"] == 5
    assert [(p["chosen"], p["rejected"]) for p in user["pairs"]] == [
        (p["chosen"], p["rejected"]) for p in first + second
    ]
    assert user["pairs"][3]["prompt"] == "which is better?"
    ids = [p["id"] for p in user["pairs"]]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert abs(user["pairs"][0]["created"] - time.time()) < 60
    assert client.delete_user("alice") == {"user_id": "alice", "deleted": 5}
    for call in (lambda: client.get_user("alice"), lambda: client.delete_user("alice")):
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.status == 404 and "alice" in err.value.message
    assert client.get_user("bob")["num_pairs"] == 1


def test_a_restart_loses_nothing(np_model, tmp_path):
    db = tmp_path / "prefs.db"
    rng = np.random.default_rng(1)
    options = rng.normal(size=(7, 2)).tolist()
    with serving(np_model, db) as (_, client):
        for user in ("u1", "u2"):
            for _ in range(3):
                client.add_preferences(user, _pairs(rng, 4))
        before = {u: client.get_user(u) for u in ("u1", "u2")}
        scores = client.score(options, user_id="u1")
    with serving(np_model, db) as (_, client):
        assert {u: client.get_user(u) for u in ("u1", "u2")} == before
        assert client.score(options, user_id="u1") == scores
        assert client.add_preferences("u1", _pairs(rng, 1))["num_pairs"] == 13


def test_eight_concurrent_writers_leave_exactly_800_pairs(server):
    url, client = server
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(k: int) -> None:
        try:
            with Client(url) as own:
                barrier.wait()
                for start in range(0, 100, 4):  # 25 requests (transactions) of 4 pairs each
                    batch = [{"chosen": [k, i], "rejected": [-k, -i]} for i in range(start, start + 4)]
                    own.add_preferences("shared", batch)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pairs = client.all_pairs("shared")
    first = client.get_user("shared", limit=300)
    assert (
        first["num_pairs"] == 800 and len(first["pairs"]) == 300 and first["next_after"] == pairs[299]["id"]
    )
    last = client.get_user("shared", after=pairs[-2]["id"])
    assert last["pairs"] == pairs[-1:] and last["next_after"] is None
    assert len(pairs) == 800
    assert len({p["id"] for p in pairs}) == 800
    for k in range(8):  # every writer's pairs, each exactly once and in the order it sent them
        assert [p["chosen"][1] for p in pairs if p["chosen"][0] == k] == [float(i) for i in range(100)]


# ---- auth and validation -----------------------------------------------------------------------------
def test_a_token_guards_every_endpoint_but_health(np_model, tmp_path):
    with serving(np_model, tmp_path / "db", token="s3cret") as (url, client):
        assert client.add_preferences("alice", [{"chosen": [1, 2], "rejected": [0, 0]}])["added"] == 1
        assert client.score([[0, 0]], user_id="alice")["num_context"] == 1
        calls = [
            ("GET", "/v1/users/alice", None),
            ("DELETE", "/v1/users/alice", None),
            ("POST", "/v1/users/alice/preferences", {"pairs": [{"chosen": [1, 2], "rejected": [0, 0]}]}),
            ("POST", "/v1/users/alice/score", {"options": [[0, 0]]}),
            ("POST", "/v1/score", {"options": [[0, 0]]}),
            ("POST", "/v1/compare", {"pairs": [{"a": [0, 0], "b": [1, 1]}]}),
            ("POST", "/v1/users/alice/next-query", {"candidates": [{"a": [0, 0], "b": [1, 1]}]}),
            ("POST", "/v1/users/alice/generate", {"prompts": ["hi"]}),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for method, path, body in calls:
                response = httpx.request(method, url + path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/health").json()["auth_required"] is True
        assert client.get_user("alice")["num_pairs"] == 1  # nothing was written by the refused calls
        assert "HTTPBearer" in json.dumps(httpx.get(url + "/openapi.json").json()["components"])


BAD_REQUESTS = [
    ("/v1/users/alice/score", '{"options": [[1, 2, 3]]}', "options[0]", "expected 2 numbers"),
    ("/v1/users/alice/score", '{"options": ["some text"]}', "options[0]", "not text"),
    (
        "/v1/users/alice/score",
        '{"options": [[{"role": "user", "content": "hi"}]]}',
        "options[0][0]",
        "messages",
    ),
    ("/v1/users/alice/score", '{"options": [[NaN, 1]]}', "options[0][0]", "finite"),
    ("/v1/users/alice/score", '{"options": [[Infinity, 1]]}', "options[0][0]", "finite"),
    ("/v1/users/alice/score", '{"options": [[1e39, 1]]}', "options[0][0]", "less than"),
    ("/v1/users/alice/score", '{"options": [[true, 1]]}', "options[0][0]", "number"),
    ("/v1/users/alice/score", '{"options": [["1", 1]]}', "options[0][0]", "number"),
    ("/v1/users/alice/score", '{"options": []}', "options", "at least 1"),
    ("/v1/users/alice/score", '{"options": [[1, 2]], "extra": 1}', "extra", "not permitted"),
    ("/v1/users/alice/score", '{"opts": [[1, 2]]}', "options", "Field required"),
    (
        "/v1/users/alice/score",
        '{"options": [[1, 2]], "context": [{"chosen": [1]}]}',
        "context[0]",
        "2 numbers",
    ),
    ("/v1/score", json.dumps({"options": [[0, 0]] * 4097}), "options", "at most 4096"),
    ("/v1/users/alice/preferences", '{"pairs": []}', "pairs", "at least 1"),
    ("/v1/users/alice/preferences", '{"pairs": [{"chosen": [1, 2]}]}', "pairs[0].rejected", "required"),
    (
        "/v1/users/alice/preferences",
        '{"pairs": [{"chosen": [1, 2], "rejected": [1, 2], "prompt": " "}]}',
        "pairs[0].prompt",
        "whitespace",
    ),
    ("/v1/users/alice/compare", '{"pairs": [{"a": [1, 2], "b": [1]}]}', "pairs[0].b", "expected 2"),
    (
        "/v1/users/alice/next-query",
        '{"candidates": [{"a": [1, 2], "b": [0, 1]}], "strategy": "best"}',
        "strategy",
        "info-gain",
    ),
    ("/v1/users/alice/next-query", '{"candidates": [{"a": [1, 2], "b": [0, 1]}]}', "strategy", "vnp-btl"),
    ("/v1/users/alice/generate", '{"prompts": ["hi"], "top_p": 0}', "top_p", "greater than 0"),
    ("/v1/users/bad%20id/score", '{"options": [[1, 2]]}', "user_id", "pattern"),
    ("/v1/users/" + "x" * 129 + "/score", '{"options": [[1, 2]]}', "user_id", "at most 128"),
    ("/v1/users/alice/score", '{"options": [[1, 2]', "body", "invalid JSON at character 19"),
    ("/v1/users/alice/score", '{"options": [[1e308, 1e308]]}', "options[0][0]", "less than"),
    ("/v1/users/alice/score", '{"options": [[3e38, -3e38]]}', "options[0]", "not finite"),
]


@pytest.mark.parametrize("path, body, field, words", BAD_REQUESTS)
def test_bad_input_is_a_422_naming_the_field(server, path, body, field, words):
    url, _ = server
    response = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert field in message and words in message, message
    assert all({"loc", "msg", "type"} <= set(e) for e in response.json()["detail"])


def test_oversized_and_non_json_bodies_are_4xx(np_model, tmp_path):
    small = Limits(max_body_bytes=1000)
    with serving(np_model, tmp_path / "db", limits=small) as (url, _):
        big = json.dumps({"options": [[0.123456, 0.654321]] * 100})
        assert httpx.post(url + "/v1/score", content=big).status_code == 413

        def chunks():  # no Content-Length: the streamed body is counted
            yield big.encode()

        assert httpx.post(url + "/v1/score", content=chunks()).status_code == 413
        response = httpx.post(url + "/v1/score", content="options=1", headers={"Content-Type": "text/plain"})
        assert 400 <= response.status_code < 500
        assert httpx.post(url + "/v1/score", content="[" * 50 + "]" * 50).status_code == 422


# ---- predictions agree with the library ---------------------------------------------------------------
def test_scores_and_comparisons_match_the_model(np_model, server):
    _, client = server
    model = load_reward_model(np_model)
    rng = np.random.default_rng(2)
    stored, inline = _pairs(rng, 6), _pairs(rng, 3)
    options = rng.normal(size=(100, 2)).astype(np.float32)
    a, b = rng.normal(size=(20, 2)).astype(np.float32), rng.normal(size=(20, 2)).astype(np.float32)
    pairs = [{"a": x, "b": y} for x, y in zip(a, b, strict=True)]

    def check(user, context, expected_pairs):
        user_model = model.personalize(*_arrays(expected_pairs)) if expected_pairs else model.personalize()
        got = client.score(options, user_id=user, context=context)
        assert got["num_context"] == len(expected_pairs)
        np.testing.assert_allclose(got["rewards"], user_model.rewards(options), rtol=1e-5, atol=1e-6)
        probs = client.compare(pairs, user_id=user, context=context)["probabilities"]
        np.testing.assert_allclose(probs, user_model.compare(a, b), rtol=1e-5, atol=1e-6)

    check(None, None, [])  # a brand-new user: the prior
    check(None, inline, inline)  # stateless, inline context only
    check("carol", None, [])  # unknown user: no stored pairs
    client.add_preferences("carol", stored)
    check("carol", None, stored)
    check("carol", None, stored)  # cached personalisation
    check("carol", inline, stored + inline)  # stored plus inline
    client.add_preferences("carol", inline)  # a write invalidates the cache
    check("carol", None, stored + inline)
    client.delete_user("carol")
    check("carol", None, [])
    check(None, inline, inline)  # the same inline context again: from the context cache
    check(None, inline[:2], inline[:2])


def test_only_the_newest_pairs_condition_the_user(np_model, tmp_path):
    model = load_reward_model(np_model)
    rng = np.random.default_rng(3)
    stored = _pairs(rng, 9)
    options = rng.normal(size=(5, 2))
    with serving(np_model, tmp_path / "db", limits=Limits(max_context=4)) as (_, client):
        client.add_preferences("dave", stored)
        got = client.score(options, user_id="dave")
        assert got["num_context"] == 4
        expected = model.personalize(*_arrays(stored[-4:])).rewards(options)
        np.testing.assert_allclose(got["rewards"], expected, rtol=1e-5, atol=1e-6)


# ---- next query ---------------------------------------------------------------------------------------
def test_next_query_excludes_answered_pairs_and_matches_select_next(np_model, server):
    _, client = server
    model = load_reward_model(np_model)
    rng = np.random.default_rng(4)
    stored = _pairs(rng, 3)
    client.add_preferences("erin", stored)
    pool = [{"a": p["chosen"], "b": p["rejected"]} for p in _pairs(rng, 12)]
    pool[2] = {"a": stored[0]["rejected"], "b": stored[0]["chosen"]}  # answered, in the other order
    pool[7] = {"a": stored[1]["chosen"], "b": stored[1]["rejected"], "prompt": "same pair"}
    got = client.next_query("erin", pool, strategy="uncertainty", seed=5)
    assert got["excluded"] == [2, 7] and got["num_context"] == 3
    assert 0 <= got["index"] < 12 and got["index"] not in (2, 7)
    assert [i for i, s in enumerate(got["scores"]) if s is None] == [2, 7]
    a, b = (np.array([c[k] for c in pool], dtype=np.float32) for k in "ab")
    direct = select_next(
        model,
        a,
        b,
        strategy="uncertainty",
        rng=5,
        context_chosen=_arrays(stored)[0],
        context_rejected=_arrays(stored)[1],
        exclude=[2, 7],
    )
    assert got["index"] == direct.index
    np.testing.assert_allclose(got["score"], direct.score, rtol=1e-6)
    random_pick = client.next_query("erin", pool, strategy="random", seed=1)
    assert random_pick["index"] not in (2, 7) and random_pick["score"] is None
    with pytest.raises(ServiceError) as err:
        client.next_query("erin", [pool[2], pool[7]], strategy="uncertainty")
    assert err.value.status == 422 and "already answered" in err.value.message


@pytest.mark.parametrize("kind", ["ensemble", "vnp-btl"])
def test_info_gain_with_a_vnp_model_or_an_ensemble(kind, np_model, tmp_path):
    if kind == "ensemble":
        models = [np_model, _save(tmp_path / "second", seed=1)]
    else:
        models = _save(tmp_path / "vnp", "vnp-btl")
    rng = np.random.default_rng(5)
    pool = [{"a": p["chosen"], "b": p["rejected"]} for p in _pairs(rng, 10)]
    with serving(models, tmp_path / "db") as (_, client):
        assert "info-gain" in client.health()["strategies"]
        client.add_preferences("fay", _pairs(rng, 2))
        got = client.next_query("fay", pool, strategy="info-gain", seed=0)
        assert 0 <= got["index"] < 10 and got["excluded"] == []
        scores = np.array(got["scores"], dtype=float)
        assert np.all(scores >= -1e-9) and got["score"] == pytest.approx(scores.max(), abs=1e-6)


# ---- text options and generation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_world(tiny_encoder, tmp_path_factory):
    """A text reward model and an NP-DPO policy, both reading context through a tiny BERT embedder."""
    from steerable.policy.model import ConditionalPolicy, PolicyConfig
    from steerable.policy.sft import tiny_llama, word_tokenizer
    from steerable.text import synthetic_text as world
    from steerable.text.embedder import EmbedderConfig, save_embedder_config

    root = tmp_path_factory.mktemp("text")
    config = EmbedderConfig(model=tiny_encoder)
    reward = _save(root / "reward", input_dim=32)
    save_embedder_config(config, reward)
    tok = word_tokenizer(world.vocabulary())
    base = tiny_llama(len(tok), hidden=32, layers=2, seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    policy_config = PolicyConfig(
        base_model=str(root / "base"),
        input_dim=32,
        latent_dim=8,
        encoder_hidden=16,
        hyper_hidden=16,
        lora_r=4,
    )
    ConditionalPolicy(policy_config, base, tok).save_pretrained(root / "policy")
    save_embedder_config(config, root / "policy")
    return reward, root / "policy", config


TEXT_PAIRS = [
    {"prompt": "tell me about the red cat", "chosen": "the red cat is calm .", "rejected": "it is a train ."},
    {
        "prompt": [{"role": "user", "content": "tell me about the old train"}],
        "chosen": [{"role": "assistant", "content": "the old train is fast , and it is also loud ."}],
        "rejected": "the old train is fast .",
    },
]


def test_text_options_are_embedded_with_the_models_embedder(text_world, tmp_path, monkeypatch):
    from steerable.text.embedder import Embedder

    monkeypatch.setenv("STEERABLE_CACHE", str(tmp_path / "cache"))
    reward, _, config = text_world
    model = load_reward_model(reward)
    embedder = Embedder(config)

    def embed(pairs: list[tuple]) -> np.ndarray:  # (prompt, completion) in the server's own forms
        def turns(value, role):
            return [{"role": role, "content": value}] if isinstance(value, str) else value

        return embedder.embed_messages([turns(p, "user") + turns(c, "assistant") for p, c in pairs])

    with serving(reward, tmp_path / "db") as (_, client):
        health = client.health()
        assert health["options"] == "text" and health["embedder"] == config.model
        client.add_preferences("gus", TEXT_PAIRS)
        assert client.get_user("gus")["pairs"][1]["chosen"] == TEXT_PAIRS[1]["chosen"]
        prompt = "tell me about the red cat"
        options = ["the red cat is calm .", "the red cat is calm , and it is also small ."]
        got = client.score(options, user_id="gus", prompt=prompt)
        chosen = embed([(p["prompt"], p["chosen"]) for p in TEXT_PAIRS])
        rejected = embed([(p["prompt"], p["rejected"]) for p in TEXT_PAIRS])
        expected = model.personalize(chosen, rejected).rewards(embed([(prompt, o) for o in options]))
        np.testing.assert_allclose(got["rewards"], expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ServiceError) as err:
            client.score([[0.0] * 32], user_id="gus")
        assert err.value.status == 422 and "not numbers" in err.value.message
        messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
        assert len(client.compare([{"a": messages[0], "b": "bye"}], user_id="gus")["probabilities"]) == 1
        with pytest.raises(ServiceError) as err:
            client.add_preferences("gus", [{"chosen": [{"role": "robot", "content": "x"}], "rejected": "y"}])
        assert err.value.status == 422 and "role" in err.value.message


def test_generation_is_steered_by_the_users_text_pairs(text_world, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERABLE_CACHE", str(tmp_path / "cache"))
    reward, policy, _ = text_world
    with serving(reward, tmp_path / "db", policy=policy) as (_, client):
        assert client.health()["policy_loaded"] is True
        client.add_preferences("hal", TEXT_PAIRS)
        prompts = ["tell me about the red cat", [{"role": "user", "content": "tell me about the old train"}]]
        got = client.generate("hal", prompts, max_new_tokens=5, temperature=0.7, seed=3)
        assert len(got["responses"]) == 2 and got["num_context"] == 2
        assert all(isinstance(r, str) for r in got["responses"])
        assert client.generate("hal", prompts, max_new_tokens=5, temperature=0.7, seed=3) == got
        greedy = client.generate("nobody", prompts, max_new_tokens=5, temperature=0.0)
        assert greedy["num_context"] == 0
        assert client.generate("nobody", prompts, max_new_tokens=5, temperature=1e-300, seed=9) == greedy


# ---- the command line ---------------------------------------------------------------------------------
def test_serve_reports_bad_folders_in_one_line(np_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[1, 2]")
    three = _save(tmp_path / "three", input_dim=3)
    db = tmp_path / "prefs.db"
    with serving(np_model, db):
        pass  # the database now holds numeric pairs of length 2
    other = ["--db", str(tmp_path / "other.db")]
    cases = [
        (["--model", str(tmp_path / "missing"), *other], "no such model folder"),
        (["--model", str(tmp_path), *other], "config.json"),
        (["--model", str(broken), *other], "cannot load"),
        (["--model", str(np_model), "--model", str(three), *other], "different sizes"),
        (["--model", str(three), "--db", str(db)], "numeric:2"),
        (["--model", str(np_model), "--policy", str(tmp_path), *other], "text reward model"),
    ]
    for args, words in cases:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("steerable: error:") and words in err and err.count("\n") == 1, err
        assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_builds_the_app_from_its_flags(np_model, tmp_path, monkeypatch):
    from steerable import cli_service

    seen = {}

    def fake_serve(app, sock, log_level):  # serve the app the command built on a free port instead
        seen.update(address=sock.getsockname(), threads=torch.get_num_threads())
        with ServerThread(app) as url, Client(url, token="from-env") as client:
            assert httpx.get(url + "/v1/users/x").status_code == 401
            seen["added"] = client.add_preferences("x", [{"chosen": [1, 2], "rejected": [0, 0]}])
            seen["health"] = client.health()

    monkeypatch.setenv("STEERABLE_TOKEN", "from-env")
    monkeypatch.setattr(cli_service, "_serve", fake_serve)
    port = _free_port()
    threads = torch.get_num_threads()
    try:
        args = ["serve", "--model", str(np_model), "--model", str(np_model), "--db", str(tmp_path / "cli.db")]
        assert main([*args, "--port", str(port), "--torch-threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen["address"] == ("127.0.0.1", port) and seen["threads"] == 1
    assert seen["added"]["num_pairs"] == 1
    assert seen["health"]["auth_required"] is True and seen["health"]["ensemble_size"] == 2
    assert "info-gain" in seen["health"]["strategies"]
    with open_store(tmp_path / "cli.db") as store:
        assert store.count("x") == 1


def test_serve_refuses_a_taken_port_in_one_line(np_model, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--model", str(np_model), "--db", str(tmp_path / "db"), "--port", str(port)]
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"steerable: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


@pytest.mark.slow
def test_serve_command_runs_the_service_with_a_token_from_the_environment(np_model, tmp_path):
    port = _free_port()
    env = {**os.environ, "STEERABLE_TOKEN": "from-env"}
    command = [sys.executable, "-m", "steerable", "serve", "--model", str(np_model), "--port", str(port)]
    command += ["--db", str(tmp_path / "cli.db"), "--log-level", "warning"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/v1/health").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.1)
        assert health["auth_required"] is True
        assert httpx.get(url + "/v1/users/x").status_code == 401
        with Client(url, token="from-env") as client:
            assert client.add_preferences("x", [{"chosen": [1, 2], "rejected": [0, 0]}])["num_pairs"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with open_store(tmp_path / "cli.db") as store:
        assert store.count("x") == 1


# ---- property-based fuzzing against the OpenAPI schema -------------------------------------------------
OPERATIONS = [
    ("GET", "/v1/health"),
    ("POST", "/v1/users/{user_id}/preferences"),
    ("GET", "/v1/users/{user_id}"),
    ("DELETE", "/v1/users/{user_id}"),
    ("POST", "/v1/users/{user_id}/score"),
    ("POST", "/v1/users/{user_id}/compare"),
    ("POST", "/v1/score"),
    ("POST", "/v1/compare"),
    ("POST", "/v1/users/{user_id}/next-query"),
    ("POST", "/v1/users/{user_id}/generate"),
]


REJECTIONS = [400, 401, 404, 405, 409, 413, 415, 422]  # 413: a schema-violating body may be too large
FUZZ_CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)


@pytest.fixture(scope="module")
def api_schema(np_model, tmp_path_factory):
    small = Limits(max_options=64, max_candidates=64, max_context=64, max_text_chars=2000, max_messages=8)
    app = create_app(np_model, db=tmp_path_factory.mktemp("fuzz") / "fuzz.db", limits=small)
    app.state.engine.store.add_pairs("alice", _pairs(np.random.default_rng(6), 3))
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=FUZZ_CONFIG)
    app.state.engine.close()


@pytest.fixture(scope="module")
def text_api_schema(text_world, tmp_path_factory):
    reward, policy, _ = text_world
    root = tmp_path_factory.mktemp("text-fuzz")
    small = Limits(
        max_options=8, max_candidates=8, max_context=8, max_text_chars=200, max_messages=4, max_new_tokens=4
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERABLE_CACHE", str(root / "cache"))
        app = create_app(reward, db=root / "fuzz.db", policy=policy, limits=small)
    app.state.engine.store.add_pairs("alice", TEXT_PAIRS)
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=FUZZ_CONFIG)
    app.state.engine.close()


def test_every_operation_is_fuzzed(api_schema):
    found = [(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()]
    assert sorted(found) == sorted(OPERATIONS)


FUZZ_EXAMPLES = int(os.environ.get("STEERABLE_FUZZ_EXAMPLES", "10"))  # per operation and mode
FUZZ_CASES = [
    (*op, mode) for op in OPERATIONS for mode in GenerationMode if op[1] != "/v1/health" or mode.is_positive
]


@pytest.mark.parametrize("options", ["numeric", "text"])
@pytest.mark.parametrize("method, path, mode", FUZZ_CASES)
def test_fuzzing_never_gives_a_server_error(request, options, method, path, mode):
    """Schema-valid and schema-violating requests: never a 5xx, only documented status codes and answers
    that match their schemas, and schema-violating requests are refused. Schema-valid requests may get a
    422 by design (rules the schema cannot state: info-gain with a deterministic model, options so large
    the model's output overflows), so schemathesis's positive_data_acceptance check is left out."""

    schema = request.getfixturevalue("api_schema" if options == "numeric" else "text_api_schema")

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case):
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    run()
