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
        type=Path,
        default=Path("steerable.db"),
        help="SQLite file of users' pairs (default: steerable.db)",
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

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_context < 1 or args.torch_threads < 1:
        raise ConfigError("--max-context and --torch-threads must be >= 1")
    torch.set_num_threads(args.torch_threads)
    token = args.token or os.environ.get("STEERABLE_TOKEN") or None
    limits = Limits(max_context=args.max_context)
    engine = build_engine(args.model_dirs, args.db, policy_dir=args.policy, seed=args.seed, limits=limits)
    try:
        sock = _listen(args.host, args.port)
        app = create_app(engine=engine, token=token)
        health = engine.health()
        print(
            f"serving {health['model_type']} ({health['options']} options, input_dim {health['input_dim']}, "
            f"ensemble of {health['ensemble_size']}) on http://{args.host}:{args.port}; pairs in {args.db}"
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
