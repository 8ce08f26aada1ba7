"""The ``serve`` command of the CLI: the personalization service (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``serve``."""
    p.add_argument(
        "--model",
        dest="model_dirs",
        type=Path,
        action="append",
        required=True,
        help="folder written by 'steerable train'; repeat to serve an ensemble (enables info-gain)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--db",
        default="steerable.db",
        help="where users' pairs are kept: an SQLite file (default: steerable.db; one replica) or a "
        "PostgreSQL URL postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE (several replicas may share it)",
    )
    p.add_argument(
        "--db-pool-size",
        type=int,
        default=10,
        help="PostgreSQL: connections this replica keeps open at most (default: 10)",
    )
    p.add_argument(
        "--db-timeout",
        type=float,
        default=5.0,
        help="PostgreSQL: seconds a request waits for a connection before a 503 (default: 5)",
    )
    p.add_argument(
        "--max-cache-mb",
        type=float,
        default=1024,
        help="memory for cached personalised models and text embeddings, in MiB; least recently used "
        "entries are evicted beyond it (default: 1024; 0: no cache)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the models: cpu, cuda, cuda:1, mps, or auto (CUDA when available; "
        "default: cpu)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on every endpoint but /v1/health "
        "(default: $STEERABLE_TOKEN; unset: no authentication)",
    )
    p.add_argument("--policy", type=Path, default=None, help="NP-DPO policy folder, for /generate")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of random tie-breaking and sampling (default: 0)"
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=1000,
        help="a user is conditioned on at most this many of their newest pairs (default: 1000)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads per request (default: 1; requests run in parallel)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=_run_serve)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (one clear error line if the address is taken or unknown)."""
    from steerable.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _return_freed_memory() -> None:
    """glibc only: a fixed mmap threshold of 128 KiB, so that large buffers freed by requests (a user's
    pairs, the encoder's activations) go back to the system, and one malloc arena per CPU instead of 8
    (freed memory kept in many threads' arenas). glibc otherwise raises the threshold after each large
    free and keeps such buffers in its heaps: with 8 threads personalising users of 1,000 pairs, peak RSS
    was 1.26 GB with the defaults and 0.61 GB with the threshold alone."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, max(2, os.cpu_count() or 2))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _serve(app, sock: socket.socket, log_level: str) -> None:
    """Run uvicorn on the bound socket until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


def _run_serve(args: argparse.Namespace) -> int:
    import gc

    import torch

    from steerable.errors import ConfigError
    from steerable.service.app import create_app
    from steerable.service.engine import build_engine
    from steerable.service.schemas import Limits
    from steerable.service.store import describe_db

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_context < 1 or args.torch_threads < 1 or args.db_pool_size < 1:
        raise ConfigError("--max-context, --torch-threads and --db-pool-size must be >= 1")
    if not args.max_cache_mb >= 0 or not args.db_timeout > 0:
        raise ConfigError("--max-cache-mb must be >= 0 and --db-timeout > 0")
    torch.set_num_threads(args.torch_threads)
    _return_freed_memory()
    token = args.token or os.environ.get("STEERABLE_TOKEN") or None
    limits = Limits(max_context=args.max_context, max_cache_bytes=int(args.max_cache_mb * 2**20))
    engine = build_engine(
        args.model_dirs,
        args.db,
        policy_dir=args.policy,
        seed=args.seed,
        limits=limits,
        device=args.device,
        pool_size=args.db_pool_size,
        db_timeout=args.db_timeout,
    )
    try:
        sock = _listen(args.host, args.port)
        app = create_app(engine=engine, token=token)
        health = engine.health()
        print(
            f"serving {health['model_type']} ({health['options']} options, input_dim {health['input_dim']}, "
            f"ensemble of {health['ensemble_size']}, {health['device']}) on http://{args.host}:{args.port}; "
            f"pairs in {describe_db(args.db)}; cache {args.max_cache_mb:g} MiB"
            + ("; bearer token required" if token else ""),
            flush=True,
        )
        gc.collect()
        gc.freeze()  # the loaded libraries' objects: out of every later collection (shorter GC pauses)
        with sock:
            _serve(app, sock, args.log_level)
    finally:
        engine.close()
    return 0
