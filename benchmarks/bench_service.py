"""Service benchmark: latency and throughput of ``/score`` under concurrent clients.

Run with ``make bench`` (or ``python benchmarks/bench_service.py --out DIR``). Starts ``steerable serve`` in
a subprocess on loopback with a fresh NP-BTL at the paper's size (hidden 256, latent 256, attention
encoder; ``--input-dim`` numeric options), stores ``--context`` pairs for one user, then runs a bounded
load test: ``--clients`` threads, each with its own HTTP connection, send ``--requests`` score requests of
``--options`` numeric options one after another. Scenarios:

* ``stored``: ``POST /v1/users/{id}/score`` — the user's stored pairs are the context (the personalised
  model is cached until the user's pairs change);
* ``inline``: ``POST /v1/score`` with the same pairs inline (the personalised model is cached by the
  context's content);
* ``fresh``: ``POST /v1/score`` with new random context pairs in every request — personalised every time;
* ``single``: the stored scenario with one client (the latency floor).

Latency is measured by the client (request sent to answer decoded), so it includes HTTP, JSON and the
client threads' share of the CPU. Prints a table and writes ``DIR/bench_service.json``.
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


def start_server(model_dir: Path, db: Path, torch_threads: int) -> tuple[subprocess.Popen, str]:
    """``steerable serve`` in a subprocess; returns it and its URL once /v1/health answers."""
    port = free_port()
    command = [sys.executable, "-m", "steerable", "serve", "--model", str(model_dir), "--db", str(db)]
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


def load_test(url: str, path: str, bodies: list[list[bytes]], warmup: int) -> dict:
    """Each client thread sends its bodies one after another; latencies in ms and overall throughput."""
    clients = len(bodies)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    headers = {"Content-Type": "application/json"}

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for body in bodies[k][:warmup]:
                http.post(path, content=body, headers=headers)
            barrier.wait()
            for body in bodies[k][warmup:]:
                start = time.perf_counter()
                response = http.post(path, content=body, headers=headers)
                response.json()
                latencies[k].append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
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
        "options_per_s": len(flat) * len(json.loads(bodies[0][-1])["options"]) / wall,
    }


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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    config = RewardModelConfig(model_type="np-btl", input_dim=args.input_dim)  # the paper's sizes
    model = build_reward_model(config, seed=args.seed)

    def random_pairs() -> list[dict]:
        shape = (args.context, args.input_dim)
        chosen, rejected = rng.normal(size=shape).round(6), rng.normal(size=shape).round(6)
        return [{"chosen": c.tolist(), "rejected": r.tolist()} for c, r in zip(chosen, rejected, strict=True)]

    def bodies(clients: int, context: str) -> list[list[bytes]]:
        """Request bodies per client; context: "stored" (none inline), "inline" (the user's), "fresh"."""
        out = []
        for _ in range(clients):
            rows = []
            for _ in range(args.warmup + args.requests):
                body: dict = {"options": rng.normal(size=(args.options, args.input_dim)).round(6).tolist()}
                if context != "stored":
                    body["context"] = pairs if context == "inline" else random_pairs()
                rows.append(json.dumps(body).encode())
            out.append(rows)
        return out

    pairs = random_pairs()
    load_before = os.getloadavg()[0]  # other work on the machine shares its cores with the test
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.save_pretrained(Path(tmp) / "model")
        proc, url = start_server(model_dir, Path(tmp) / "bench.db", args.torch_threads)
        try:
            httpx.post(url + "/v1/users/bench/preferences", json={"pairs": pairs}).raise_for_status()
            check = rng.normal(size=(args.options, args.input_dim)).astype(np.float32)
            served = httpx.post(url + "/v1/users/bench/score", json={"options": check.tolist()}).json()
            chosen = np.array([p["chosen"] for p in pairs], dtype=np.float32)
            rejected = np.array([p["rejected"] for p in pairs], dtype=np.float32)
            expected = model.personalize(chosen, rejected).rewards(check)
            max_diff = float(np.abs(np.array(served["rewards"]) - expected).max())
            scenarios = {
                "stored": load_test(
                    url, "/v1/users/bench/score", bodies(args.clients, "stored"), args.warmup
                ),
                "inline": load_test(url, "/v1/score", bodies(args.clients, "inline"), args.warmup),
                "fresh": load_test(url, "/v1/score", bodies(args.clients, "fresh"), args.warmup),
                "single": load_test(url, "/v1/users/bench/score", bodies(1, "stored"), args.warmup),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)

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
    }
    print(
        f"score {args.options} options of {args.input_dim} numbers, user with {args.context} pairs "
        f"(np-btl, hidden {config.hidden_dim}); {os.cpu_count()} CPUs, client threads on the same machine, "
        f"load average {load_before:.1f} before the test"
    )
    columns = ("clients", "p50 ms", "p90 ms", "p99 ms", "req/s", "errors")
    print(f"{'scenario':<10} " + " ".join(f"{c:>8}" for c in columns))
    for name, s in scenarios.items():
        print(
            f"{name:<10} {s['clients']:>8} {s['p50_ms']:>8.2f} {s['p90_ms']:>8.2f} {s['p99_ms']:>8.2f} "
            f"{s['throughput_rps']:>8.0f} {s['errors']:>8}"
        )
    verdict = "met" if result["target_met"] else "NOT met"
    print(f"target p99 < {TARGET_P99_MS:.0f} ms at {args.clients} clients (stored): {verdict}")
    print(f"served rewards vs the library: max |diff| {max_diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_service.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    if any(s["errors"] for s in scenarios.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
