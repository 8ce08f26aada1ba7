"""Service memory benchmark: many users with many stored pairs, a capped cache, peak RSS, exact answers.

``python benchmarks/bench_service_memory.py --out DIR`` (defaults: 4,096 users × 1,000 stored pairs of
384-number options, an NP-BTL at the paper's size, cache caps of 512 MiB and 4 MiB; about 20 GB of disk
for the SQLite file, deleted at the end, and 20-30 minutes on 2 cores). Not part of ``make bench``.

1. Writes the users' pairs straight into an SQLite preference database (the service's own schema, through
   ``SQLiteStore``, then bulk inserts): each user gets ``--pairs`` pairs drawn from a pool of distinct
   random pairs (numbers with 3 decimals, as JSON, as a client would send them), so no two users share a
   context.
2. For each cap: starts ``steerable serve --max-cache-mb CAP`` and, on the same database, a reference
   server with ``--max-cache-mb 0`` (nothing cached). 8 client threads send ``--requests`` requests: first
   every user once (all cache misses), then users drawn with a skew (hot users repeat): 80 % score 100
   options with the stored context, 10 % with 5 inline context pairs added, 10 % next-query over 32
   candidates. Every 8th request is also sent to the reference server and the answers must be equal,
   byte for byte.
3. Reports the capped server's resident memory after start-up and its peak (``VmHWM`` from
   ``/proc/PID/status``), the cache's own accounting (``/v1/health``), and the reference server's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from steerable.models import RewardModelConfig, build_reward_model
from steerable.service.pgcluster import free_port
from steerable.service.store_sqlite import SQLiteStore


def fill_database(path: Path, users: int, pairs: int, dim: int, pool_size: int, seed: int) -> float:
    """``users`` × ``pairs`` stored pairs; returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    with SQLiteStore(path) as store:  # the schema, as the server makes it
        store.ensure_meta("options", f"numeric:{dim}")
    pool = []
    for _ in range(pool_size):
        chosen, rejected = (rng.normal(0, 0.05, dim).round(3).tolist() for _ in range(2))
        pool.append(json.dumps({"chosen": chosen, "rejected": rejected}, separators=(",", ":")))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=OFF")
    now = time.time()
    for u in range(users):
        rows = [(f"user{u}", pool[i], now) for i in rng.choice(pool_size, size=pairs, replace=False)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO pairs (user_id, pair, created) VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
        if u % 512 == 511:
            print(f"  {u + 1} users written", flush=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return path.stat().st_size


def start(model_dir: Path, db: Path, cap_mb: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "steerable", "serve", "--model", str(model_dir), "--db", str(db)]
    command += ["--port", str(port), "--log-level", "warning", "--max-cache-mb", str(cap_mb)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
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


def memory(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


def requests(args: argparse.Namespace, rng: np.random.Generator) -> list[tuple[str, str, dict]]:
    """(kind, path, body): every user once, then a skewed mix of score, inline score and next-query."""

    def options(n: int) -> list:
        return rng.normal(0, 0.05, (n, args.dim)).round(3).tolist()

    out = []
    cold = rng.permutation(args.users)
    for u in cold:
        out.append(("score", f"/v1/users/user{u}/score", {"options": options(args.options)}))
    hot = np.minimum(rng.zipf(1.3, args.requests) - 1, args.users - 1)  # user ranks, hot ones repeat
    names = rng.permutation(args.users)
    for rank in hot:
        user = f"user{names[rank]}"
        draw = rng.random()
        if draw < 0.8:
            out.append(("score", f"/v1/users/{user}/score", {"options": options(args.options)}))
        elif draw < 0.9:
            context = [{"chosen": c, "rejected": r} for c, r in zip(options(5), options(5), strict=True)]
            body = {"options": options(args.options), "context": context}
            out.append(("inline", f"/v1/users/{user}/score", body))
        else:
            candidates = [{"a": a, "b": b} for a, b in zip(options(32), options(32), strict=True)]
            body = {"candidates": candidates, "strategy": "uncertainty", "seed": 0}
            out.append(("next-query", f"/v1/users/{user}/next-query", body))
    return out


def run_cap(args: argparse.Namespace, model_dir: Path, db: Path, cap_mb: float) -> dict:
    """One capped server and one uncached reference server under the same load."""
    capped, url = start(model_dir, db, cap_mb)
    reference, reference_url = start(model_dir, db, 0)
    try:
        started = memory(capped.pid)
        work = requests(args, np.random.default_rng(args.seed))
        errors: list[str] = []
        compared = mismatched = 0
        lock = threading.Lock()
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append(memory(capped.pid)["rss_mib"])

        def client(k: int) -> None:
            nonlocal compared, mismatched
            with (
                httpx.Client(base_url=url, timeout=300) as http,
                httpx.Client(base_url=reference_url, timeout=300) as ref,
            ):
                for i in range(k, len(work), args.clients):
                    _, path, body = work[i]
                    answer = http.post(path, json=body)
                    if answer.status_code != 200:
                        with lock:
                            errors.append(f"{answer.status_code}: {answer.text[:200]}")
                        continue
                    if i % 8 == 0:
                        try:
                            expected = ref.post(path, json=body)
                        except httpx.TransportError:  # an idle keep-alive connection closed by the server
                            expected = ref.post(path, json=body)
                        same = expected.content == answer.content
                        with lock:
                            compared += 1
                            mismatched += not same

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        start_time = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start_time
        done.set()
        cache = httpx.get(url + "/v1/health").json()["cache"]
        result = {
            "cap_mib": cap_mb,
            "requests": len(work),
            "kinds": {k: sum(w[0] == k for w in work) for k in ("score", "inline", "next-query")},
            "seconds": wall,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "compared_with_uncached": compared,
            "mismatched": mismatched,
            "rss_after_start_mib": started["rss_mib"],
            "peak_rss_mib": memory(capped.pid)["peak_rss_mib"],
            "rss_samples_max_mib": max(samples, default=0.0),
            "cache": cache,
            "uncached_peak_rss_mib": memory(reference.pid)["peak_rss_mib"],
        }
    finally:
        for proc in (capped, reference):
            proc.terminate()
            proc.wait(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=1000, help="stored pairs per user")
    parser.add_argument("--dim", type=int, default=384, help="numbers per option")
    parser.add_argument("--pool", type=int, default=4096, help="distinct pairs the users' pairs come from")
    parser.add_argument("--requests", type=int, default=4096, help="requests after the cold pass")
    parser.add_argument("--options", type=int, default=100, help="options per score request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--caps", default="512,4", help="--max-cache-mb values to run, comma-separated")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the database (default: $TMPDIR)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = RewardModelConfig(model_type="np-btl", input_dim=args.dim)  # the paper's sizes
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        model_dir = build_reward_model(config, seed=args.seed).save_pretrained(Path(tmp) / "model")
        db = Path(tmp) / "prefs.db"
        print(f"writing {args.users} users × {args.pairs} pairs of {args.dim} numbers ...", flush=True)
        start_time = time.perf_counter()
        db_bytes = fill_database(db, args.users, args.pairs, args.dim, args.pool, args.seed)
        fill_seconds = time.perf_counter() - start_time
        print(f"  {db_bytes / 2**30:.1f} GiB in {fill_seconds:.0f} s", flush=True)
        runs = []
        for cap in [float(c) for c in args.caps.split(",")]:
            print(f"load with --max-cache-mb {cap:g} ...", flush=True)
            runs.append(run_cap(args, model_dir, db, cap))
            r = runs[-1]
            print(
                f"  {r['requests']} requests in {r['seconds']:.0f} s, {r['errors']} errors; RSS after start "
                f"{r['rss_after_start_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB (uncached server: "
                f"{r['uncached_peak_rss_mib']:.0f} MiB); cache {r['cache']['bytes'] / 2**20:.1f} MiB in "
                f"{r['cache']['entries']} entries, {r['cache']['evictions']} evicted; "
                f"{r['compared_with_uncached']} answers compared with the uncached server, "
                f"{r['mismatched']} differ",
                flush=True,
            )
    result = {
        "config": vars(args) | {"out": str(args.out), "tmp": str(args.tmp), "hidden_dim": config.hidden_dim},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()[0]},
        "database_bytes": db_bytes,
        "fill_seconds": fill_seconds,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_service_memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    if any(r["errors"] or r["mismatched"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
