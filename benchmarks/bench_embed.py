"""Embedding benchmark: cold embedding vs a rerun that reads the cache, measured in one run.

    python benchmarks/bench_embed.py --texts 600     (part of `make bench`)

Embeds the first ``--texts`` options of the shipped just-eval slice with the default embedder
(all-MiniLM-L6-v2, windows of 256 tokens) into a fresh temporary cache, then embeds them again through a
new Embedder (as a second run of a study would) and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from steerable.text.embedder import Embedder, EmbedderConfig
from steerable.text.just_eval import load_just_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    table = load_just_eval()
    conversations = [table.option_messages(r) for r in range(min(args.texts, len(table.responses)))]
    with tempfile.TemporaryDirectory() as cache:
        config = EmbedderConfig(cache_dir=cache)
        start = time.perf_counter()
        cold_embedder = Embedder(config)
        cold = cold_embedder.embed_messages(conversations, progress=False)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = Embedder(config).embed_messages(conversations, progress=False)
        warm_s = time.perf_counter() - start
    assert np.array_equal(cold, warm)
    result = {
        "texts": len(conversations),
        "longer_than_256_tokens": cold_embedder.stats.truncated,
        "windows": cold_embedder.stats.windows,
        "cold_s": cold_s,
        "model_load_s": cold_embedder.stats.model_load_seconds,
        "warm_s": warm_s,
        "speedup": cold_s / warm_s,
        "texts_per_s_cold": len(conversations) / cold_s,
    }
    longer, windows, rate = result["longer_than_256_tokens"], result["windows"], result["texts_per_s_cold"]
    print(f"embed {result['texts']} texts ({longer} over 256 tokens, {windows} windows)")
    print(f"  cold: {cold_s:.1f} s (model load {result['model_load_s']:.1f} s, {rate:.0f} texts/s)")
    print(f"  warm: {warm_s * 1000:.0f} ms  -> {result['speedup']:.0f}x faster (target: >= 20x)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_embed.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
