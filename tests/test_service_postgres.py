"""The service on PostgreSQL through real HTTP: two replicas share one database (a write through one is
used at once by the other, whose cache held the user's older pairs), a database that is down gives 503
with Retry-After (never a 500) and the replica recovers by itself, and ``steerable serve --db
postgresql://...`` works from the command line."""

from __future__ import annotations

import contextlib
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import tiny_config
from pgfixture import pg_cluster_fixture, pg_url_fixture, require_postgres  # noqa: F401
from steerable.cli import main
from steerable.models import build_reward_model, load_reward_model
from steerable.service import Client, ServerThread, ServiceError, create_app
from steerable.service.engine import build_engine
from steerable.service.pgcluster import TempCluster, free_port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = build_reward_model(tiny_config("np-btl", input_dim=2), seed=0)
    return model.save_pretrained(tmp_path_factory.mktemp("np-btl"))


@contextlib.contextmanager
def replica(model_dir, db: str, db_timeout: float = 5.0):
    """One server process's worth of service (its own engine, cache and connection pool) on loopback."""
    engine = build_engine([model_dir], db, db_timeout=db_timeout)
    server = ServerThread(create_app(engine=engine))
    url = server.start()
    try:
        with Client(url) as client:
            yield url, client
    finally:
        server.stop()
        engine.close()


def _pairs(rng, n):
    return [
        {"chosen": rng.normal(size=2).tolist(), "rejected": rng.normal(size=2).tolist()} for _ in range(n)
    ]


def test_two_replicas_share_one_database_and_never_answer_from_stale_pairs(model_dir, pg_url):
    model = load_reward_model(model_dir)
    rng = np.random.default_rng(0)
    options = rng.normal(size=(5, 2)).tolist()
    first, second = _pairs(rng, 3), _pairs(rng, 2)

    def expected(pairs):
        chosen = np.array([p["chosen"] for p in pairs], dtype=np.float32)
        rejected = np.array([p["rejected"] for p in pairs], dtype=np.float32)
        return model.personalize(chosen, rejected).rewards(options)

    with replica(model_dir, pg_url) as (_, one), replica(model_dir, pg_url) as (_, two):
        assert one.health()["store"] == "postgresql"
        assert one.add_preferences("ann", first)["num_pairs"] == 3
        got = two.score(options, user_id="ann")  # replica 2 now caches ann's three pairs
        np.testing.assert_allclose(got["rewards"], expected(first), rtol=1e-5)
        assert one.add_preferences("ann", second) == {"user_id": "ann", "added": 2, "num_pairs": 5}
        got = two.score(options, user_id="ann")  # right after the write through replica 1
        assert got["num_context"] == 5
        np.testing.assert_allclose(got["rewards"], expected(first + second), rtol=1e-5)
        page = two.get_user("ann", limit=2)
        assert (
            page["num_pairs"] == 5
            and len(page["pairs"]) == 2
            and page["next_after"] == page["pairs"][1]["id"]
        )
        assert [p["chosen"] for p in two.all_pairs("ann")] == [p["chosen"] for p in first + second]
        assert two.delete_user("ann")["deleted"] == 5
        with pytest.raises(ServiceError) as err:
            one.get_user("ann")
        assert err.value.status == 404
        assert one.score(options, user_id="ann")["num_context"] == 0  # replica 1's cached model is not used


def test_a_database_that_is_down_is_a_503_with_retry_after_and_the_replica_recovers(model_dir):
    require_postgres()
    with TempCluster() as cluster, replica(model_dir, cluster.create_database("prefs"), 1.0) as (url, client):
        body = {"pairs": [{"chosen": [1.0, 2.0], "rejected": [0.0, 0.0]}]}
        assert httpx.post(url + "/v1/users/bo/preferences", json=body).status_code == 201
        cluster.stop()
        calls = [
            ("POST", "/v1/users/bo/preferences", body),
            ("POST", "/v1/users/bo/score", {"options": [[0.0, 0.0]]}),
            ("GET", "/v1/users/bo", None),
            ("DELETE", "/v1/users/bo", None),
        ]
        for method, path, json in calls:
            response = httpx.request(method, url + path, json=json, timeout=30)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "1" and "unavailable" in response.json()["detail"]
        assert httpx.get(url + "/v1/health").status_code == 200  # the replica itself is up
        cluster.start()
        deadline = time.monotonic() + 20
        while (status := httpx.post(url + "/v1/users/bo/preferences", json=body).status_code) == 503:
            assert time.monotonic() < deadline, "the replica did not recover"
            time.sleep(0.2)
        assert status == 201 and client.get_user("bo")["num_pairs"] == 2


def test_serve_takes_a_postgres_url(model_dir, pg_url, monkeypatch, capsys):
    from steerable import cli_service

    seen = {}

    def fake_serve(app, sock, log_level):
        with ServerThread(app) as url, Client(url) as client:
            seen["added"] = client.add_preferences("x", [{"chosen": [1, 2], "rejected": [0, 0]}])
            seen["health"] = client.health()

    monkeypatch.setattr(cli_service, "_serve", fake_serve)
    threads = torch.get_num_threads()
    try:
        args = [
            "serve",
            "--model",
            str(model_dir),
            "--db",
            pg_url,
            "--port",
            str(free_port()),
            "--max-cache-mb",
            "64",
        ]
        assert main([*args, "--device", "cpu", "--db-pool-size", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen["added"]["num_pairs"] == 1 and seen["health"]["store"] == "postgresql"
    assert seen["health"]["cache"]["max_bytes"] == 64 * 2**20 and seen["health"]["device"] == "cpu"
    assert f"pairs in {pg_url}" in capsys.readouterr().out
    bad = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    assert main(["serve", "--model", str(model_dir), "--db", bad]) == 2
    err = capsys.readouterr().err
    assert "no_such_database: cannot open the preference database" in err and err.count("\n") == 1


@pytest.mark.slow
def test_replica_killed_and_database_restarted_under_8_clients_lose_nothing(model_dir):
    """The issue's fault drill: two ``steerable serve`` processes on one PostgreSQL, 8 clients writing and
    scoring through both; replica 1 is killed with SIGKILL after 3 s and PostgreSQL restarted after 5 s.
    Every acknowledged batch must be stored once and whole, no answer may be a 5xx other than 503, and a
    score right after an acknowledged write, through the other replica, must use that write."""
    import signal
    import subprocess
    import sys
    import threading

    require_postgres()
    with TempCluster(durable=True) as cluster:
        db = cluster.create_database("prefs")
        procs, urls = [], []
        for _ in range(2):
            port = free_port()
            command = [sys.executable, "-m", "steerable", "serve", "--model", str(model_dir), "--db", db]
            procs.append(subprocess.Popen([*command, "--port", str(port), "--log-level", "warning"]))
            urls.append(f"http://127.0.0.1:{port}")
        try:
            for url in urls:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        httpx.get(url + "/v1/health").raise_for_status()
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, "a replica did not start"
                        time.sleep(0.2)
            acked: list[tuple[str, int, int]] = []
            bad: list[str] = []
            checked = {"scores": 0, "other_replica": 0, "stale": 0}
            lock = threading.Lock()
            dead = threading.Event()

            def post(k: int, which: int, path: str, body: dict) -> tuple[int, httpx.Response | None]:
                """(replica used, answer or None); a dead replica's clients move to the other one."""
                if dead.is_set() and which == 0:
                    which = 1
                try:
                    return which, httpx.post(urls[which] + path, json=body, timeout=15)
                except httpx.TransportError:
                    return which, None

            def client(k: int) -> None:
                end, i = time.monotonic() + 14, 0
                while time.monotonic() < end:
                    i += 1
                    batch, size = k * 100_000 + i, 1 + i % 3
                    user = "shared" if i % 2 else f"c{k}"
                    pairs = [
                        {"chosen": [float(batch), float(j)], "rejected": [0.0, -1.0]} for j in range(size)
                    ]
                    used, answer = post(k, k % 2, f"/v1/users/{user}/preferences", {"pairs": pairs})
                    if answer is None or answer.status_code != 201:
                        if answer is not None and answer.status_code >= 500 and answer.status_code != 503:
                            with lock:
                                bad.append(f"{answer.status_code} {answer.text[:100]}")
                        time.sleep(0.2)
                        continue
                    with lock:
                        acked.append((user, batch, size))
                    if user == "shared":
                        continue
                    total = answer.json()["num_pairs"]  # only this client writes its own user
                    other, scored = post(k, 1 - used, f"/v1/users/{user}/score", {"options": [[0.0, 0.0]]})
                    if scored is not None and scored.status_code == 200:
                        with lock:
                            checked["scores"] += 1
                            checked["other_replica"] += other != used
                            checked["stale"] += scored.json()["num_context"] != min(total, 1000)
                    elif scored is not None and scored.status_code >= 500 and scored.status_code != 503:
                        with lock:
                            bad.append(f"{scored.status_code} {scored.text[:100]}")

            def faults() -> None:
                time.sleep(3)
                procs[0].send_signal(signal.SIGKILL)
                dead.set()
                time.sleep(2)
                cluster.stop("fast")
                time.sleep(2)
                cluster.start()

            threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
            drill = threading.Thread(target=faults)
            for t in [*threads, drill]:
                t.start()
            for t in [*threads, drill]:
                t.join()
            with Client(urls[1]) as survivor:
                stored = {u: survivor.all_pairs(u) for u in {u for u, _, _ in acked}}
            lost = partial = duplicated = 0
            for user, batch, size in acked:
                n = sum(p["chosen"][0] == batch for p in stored[user])
                lost += n == 0
                partial += 0 < n < size
                duplicated += n > size
            print(
                f"{len(acked)} acknowledged batches; lost {lost}, partial {partial}, "
                f"duplicated {duplicated}; 5xx other than 503: {len(bad)}; scores right after a write: "
                f"{checked['scores']} ({checked['other_replica']} through the other replica), "
                f"stale: {checked['stale']}"
            )
            assert acked and lost == partial == duplicated == 0 and not bad, bad[:3]
            assert checked["other_replica"] > 0 and checked["stale"] == 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
