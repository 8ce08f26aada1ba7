"""The ``cache`` command of the CLI: the on-disk embedding cache (``steerable cache prune --max-size 2G``)."""

from __future__ import annotations

import argparse


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands of ``cache``."""
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prune = actions.add_parser(
        "prune",
        help="delete the least recently used shards until the cache fits in --max-size",
        description="Delete the least recently used embedding shards (of every model) until the cache "
        "takes at most --max-size on disk. Deleted vectors are computed again when next needed.",
    )
    prune.add_argument("--max-size", required=True, help="e.g. 500M, 2G, 1.5GiB (powers of 1024)")
    prune.add_argument(
        "--cache-dir", default=None, help="the cache (default: $STEERABLE_CACHE or ~/.cache/steerable)"
    )
    prune.set_defaults(run=_run_prune)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _run_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerable.errors import ConfigError
    from steerable.text.cache import default_cache_root, parse_size, prune_cache

    limit = parse_size(args.max_size)
    root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    if not (root / "embeddings").is_dir():
        raise ConfigError(f"{root}: no embedding cache here")
    report = prune_cache(root, limit)
    print(
        f"{root}: {_mib(report.before)} -> {_mib(report.after)} (limit {_mib(limit)}); removed "
        f"{report.shards_removed} shards, {report.shards_left} left"
    )
    return 0
