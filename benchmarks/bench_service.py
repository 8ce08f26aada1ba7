"""Service benchmark: latency and throughput under concurrent clients, on SQLite and on PostgreSQL.

Run with ``make bench`` (or ``python benchmarks/bench_service.py --out DIR``). Starts ``steerable serve`` in
subprocesses on loopback with a fresh NP-BTL at the paper's size (hidden 256, latent 256, attention
encoder; ``--input-dim`` numeric options), stores ``--context`` pairs for one user, then runs bounded
load tests: ``--clients`` threads, each with its own HTTP connection, send ``--requests`` requests one
after another. On one replica with SQLite (the embedded default):

* ``stored``: ``POST /v1/users/{id}/score`` of ``--options`` options — the user's stored pairs are the
  context (the personalised model is cached until the user's pairs change);
* ``inline``: ``POST /v1/score`` with the same pairs inline (cached by the context's content);
* ``fresh``: ``POST /v1/score`` with new random context pairs in every request — personalised every time;
* ``single``: the stored scenario with one client (the latency floor);
* ``write``: ``POST /v1/users/{id}/preferences`` of one pair (one transaction each), a user per client.

Then ``stored`` and ``write`` again with two replicas sharing one PostgreSQL server (a throw-away cluster
with fsync on, started by the benchmark; clients alternate between the replicas), against one replica on
SQLite: what several replicas cost on this machine, not a speed-up (the replicas, the database and the
client threads all share its cores). Skipped with a message when PostgreSQL is not installed.

Latency is measured by the client (request sent to answer decoded), so it includes HTTP, JSON and the
client threads' share of the CPU. Prints tables and writes ``DIR/bench_service.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from steerable.models import RewardModelConfig, build_reward_model

TARGET_P99_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, db: str, torch_threads: int) -> tuple[subprocess.Popen, str]:
    """``steerable serve`` in a subprocess (``db``: a file or a PostgreSQL URL); returns it and its URL
    once /v1/health answers."""
    port = free_port()
    command = [sys.executable, "-m", "steerable", "serve", "--model", str(model_dir), "--db", db]
    command += ["--port", str(port), "--log-level", "warning", "--torch-threads", str(torch_threads)]
    env = {k: v for k, v in os.environ.items() if k != "STEERABLE_TOKEN"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/v1/health").raise_for_status()
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def load_test(urls: str | list[str], path: str, bodies: list[list[bytes]], warmup: int) -> dict:
    """Each client thread sends its bodies one after another (client k to ``urls[k % len(urls)]``; ``{k}``
    in ``path`` is the client's number); latencies in ms and overall throughput."""
    urls = [urls] if isinstance(urls, str) else urls
    clients = len(bodies)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    headers = {"Content-Type": "application/json"}

    def client(k: int) -> None:
        where = path.format(k=k)
        with httpx.Client(base_url=urls[k % len(urls)], timeout=60) as http:
            for body in bodies[k][:warmup]:
                http.post(where, content=body, headers=headers)
            barrier.wait()
            for body in bodies[k][warmup:]:
                start = time.perf_counter()
                response = http.post(where, content=body, headers=headers)
                response.json()
                latencies[k].append((time.perf_counter() - start) * 1000)
                if response.status_code not in (200, 201):
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = np.array([x for per_client in latencies for x in per_client])
    return {
        "clients": clients,
        "requests": len(flat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": float(np.percentile(flat, 50)),
        "p90_ms": float(np.percentile(flat, 90)),
        "p99_ms": float(np.percentile(flat, 99)),
        "mean_ms": float(flat.mean()),
        "max_ms": float(flat.max()),
        "throughput_rps": len(flat) / wall,
    }


def print_table(title: str, scenarios: dict[str, dict]) -> None:
    columns = ("clients", "p50 ms", "p90 ms", "p99 ms", "req/s", "errors")
    print(f"{title:<31} " + " ".join(f"{c:>8}" for c in columns))
    for name, s in scenarios.items():
        print(
            f"{name:<31} {s['clients']:>8} {s['p50_ms']:>8.2f} {s['p90_ms']:>8.2f} {s['p99_ms']:>8.2f} "
            f"{s['throughput_rps']:>8.0f} {s['errors']:>8}"
        )


def stop(servers: list[subprocess.Popen]) -> None:
    for proc in servers:
        proc.terminate()
    for proc in servers:
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250, help="measured requests per client")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per client first")
    parser.add_argument("--options", type=int, default=100, help="options per score request")
    parser.add_argument("--context", type=int, default=10, help="the user's stored context pairs")
    parser.add_argument("--input-dim", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's --torch-threads")
    parser.add_argument("--replicas", type=int, default=2, help="replicas sharing one PostgreSQL")
    parser.add_argument("--no-postgres", action="store_true", help="only the SQLite scenarios")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    config = RewardModelConfig(model_type="np-btl", input_dim=args.input_dim)  # the paper's sizes
    model = build_reward_model(config, seed=args.seed)

    def random_pairs(n: int = args.context) -> list[dict]:
        shape = (n, args.input_dim)
        chosen, rejected = rng.normal(size=shape).round(6), rng.normal(size=shape).round(6)
        return [{"chosen": c.tolist(), "rejected": r.tolist()} for c, r in zip(chosen, rejected, strict=True)]

    def bodies(clients: int, context: str) -> list[list[bytes]]:
        """Request bodies per client; context: "stored" (none inline), "inline" (the user's), "fresh";
        "write": one new pair."""
        out = []
        for _ in range(clients):
            rows = []
            for _ in range(args.warmup + args.requests):
                if context == "write":
                    rows.append(json.dumps({"pairs": random_pairs(1)}).encode())
                    continue
                body: dict = {"options": rng.normal(size=(args.options, args.input_dim)).round(6).tolist()}
                if context != "stored":
                    body["context"] = pairs if context == "inline" else random_pairs()
                rows.append(json.dumps(body).encode())
            out.append(rows)
        return out

    def check(url: str) -> float:
        """Max |served - library| rewards for the stored user."""
        probe = rng.normal(size=(args.options, args.input_dim)).astype(np.float32)
        served = httpx.post(url + "/v1/users/bench/score", json={"options": probe.tolist()}).json()
        chosen = np.array([p["chosen"] for p in pairs], dtype=np.float32)
        rejected = np.array([p["rejected"] for p in pairs], dtype=np.float32)
        expected = model.personalize(chosen, rejected).rewards(probe)
        return float(np.abs(np.array(served["rewards"]) - expected).max())

    pairs = random_pairs()
    load_before = os.getloadavg()[0]  # other work on the machine shares its cores with the test
    score_path, write_path = "/v1/users/bench/score", "/v1/users/writer{k}/preferences"
    replicas: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.save_pretrained(Path(tmp) / "model")
        proc, url = start_server(model_dir, str(Path(tmp) / "bench.db"), args.torch_threads)
        try:
            httpx.post(url + "/v1/users/bench/preferences", json={"pairs": pairs}).raise_for_status()
            max_diff = check(url)
            scenarios = {
                "stored": load_test(url, score_path, bodies(args.clients, "stored"), args.warmup),
                "inline": load_test(url, "/v1/score", bodies(args.clients, "inline"), args.warmup),
                "fresh": load_test(url, "/v1/score", bodies(args.clients, "fresh"), args.warmup),
                "single": load_test(url, score_path, bodies(1, "stored"), args.warmup),
                "write": load_test(url, write_path, bodies(args.clients, "write"), args.warmup),
            }
        finally:
            stop([proc])
        replicas["sqlite, 1 replica"] = {"score": scenarios["stored"], "write": scenarios["write"]}
        postgres_note = run_postgres(args, model_dir, pairs, bodies, check, replicas)

    result = {
        "config": vars(args)
        | {"out": str(args.out), "hidden_dim": config.hidden_dim, "encoder": config.encoder},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
        },
        "max_abs_diff_vs_library": max_diff,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": scenarios["stored"]["p99_ms"] < TARGET_P99_MS,
        "scenarios": scenarios,
        "replicas": replicas,
        "postgres": postgres_note,
    }
    print(
        f"score {args.options} options of {args.input_dim} numbers, user with {args.context} pairs "
        f"(np-btl, hidden {config.hidden_dim}); {os.cpu_count()} CPUs, client threads on the same machine, "
        f"load average {load_before:.1f} before the test"
    )
    print_table("scenario (sqlite)", scenarios)
    verdict = "met" if result["target_met"] else "NOT met"
    print(f"target p99 < {TARGET_P99_MS:.0f} ms at {args.clients} clients (stored): {verdict}")
    print(f"served rewards vs the library: max |diff| {max_diff:.2e}")
    print_table(
        f"{args.clients} clients", {f"{k}: {op}": v for k, ops in replicas.items() for op, v in ops.items()}
    )
    print(postgres_note)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_service.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    every = [*scenarios.values(), *(v for ops in replicas.values() for v in ops.values())]
    if any(s["errors"] for s in every):
        sys.exit(1)


def run_postgres(args, model_dir: Path, pairs, bodies, check, replicas: dict) -> str:
    """The stored-score and write scenarios on ``--replicas`` replicas sharing one PostgreSQL server."""
    from steerable.service.pgcluster import TempCluster, find_bindir

    if args.no_postgres:
        return "PostgreSQL: skipped (--no-postgres)"
    if find_bindir() is None:
        return "PostgreSQL: skipped (no server binaries; make test installs Debian's postgresql package)"
    with TempCluster(durable=True) as cluster:
        db = cluster.create_database("bench")
        servers, urls = [], []
        try:
            for _ in range(args.replicas):
                proc, url = start_server(model_dir, db, args.torch_threads)
                servers.append(proc)
                urls.append(url)
            httpx.post(urls[0] + "/v1/users/bench/preferences", json={"pairs": pairs}).raise_for_status()
            diffs = [check(url) for url in urls]
            score_path, write_path = "/v1/users/bench/score", "/v1/users/writer{k}/preferences"
            score = load_test(urls, score_path, bodies(args.clients, "stored"), args.warmup)
            write = load_test(urls, write_path, bodies(args.clients, "write"), args.warmup)
            replicas[f"postgresql, {args.replicas} replicas"] = {"score": score, "write": write}
        finally:
            stop(servers)
    return (
        f"PostgreSQL {cluster.bindir.parent.name} (fsync on) on the same machine; served rewards vs the "
        f"library on each replica: max |diff| {max(diffs):.2e}"
    )


if __name__ == "__main__":
    main()
