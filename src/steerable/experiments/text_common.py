"""What the text studies share: which data, which attributes, the embeddings, splits and users."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steerable.data.schema import PreferenceData
from steerable.data.simulate import Population
from steerable.errors import ConfigError, DataError
from steerable.experiments.common import child_seeds, console
from steerable.text.embedder import Embedder, EmbedderConfig
from steerable.text.just_eval import load_just_eval
from steerable.text.responses import PairPool, ResponseTable, simulate_pool_users, standardise
from steerable.text.ultrafeedback import HUB_NAME, load_ultrafeedback
from steerable.utils.config import option

DEFAULT_MODES = {
    "just-eval": ["length", "hedging", "structure"],
    "ultrafeedback": ["helpfulness", "honesty", "truthfulness"],
}


@dataclass
class TextDataConfig:
    """Where the text comes from and how it is embedded (shared by every text study)."""

    data: str = option(
        "just-eval",
        "just-eval (the shipped slice), a just-eval folder, an UltraFeedback file or folder, or a hub name",
    )
    max_prompts: int | None = option(None, "use at most this many prompts (stratified for just-eval)")
    prompt_split: list[float] = option(
        [0.8, 0.1, 0.1],
        "shares of the prompts for training, validation and test users (split by prompt; they sum to 1)",
    )
    embedder: str = option(
        "all-MiniLM-L6-v2", "embedding model: folder, hub name, all-MiniLM-L6-v2 or SmolLM2-135M-Instruct"
    )
    max_length: int = option(256, "embedder tokens per text (per window when chunking)")
    long_texts: str = option(
        "chunk",
        "texts over max_length: chunk into windows (whole text) or truncate",
        choices=["chunk", "truncate"],
    )
    cache_dir: str | None = option(
        None, "embedding cache root (default: $STEERABLE_CACHE or ~/.cache/steerable)"
    )
    train_users: int = option(2000, "simulated training users")
    val_users: int = option(300, "simulated validation users")
    test_users: int = option(600, "simulated test users")
    pairs_per_user: int = option(30, "answered pairs per simulated user")
    learning_rate: float = option(
        1e-4,
        "Adam learning rate of every model (the paper's; 1e-3 overfits ~3k training answers by step 200)",
    )


def load_table(data: str, max_prompts: int | None, seed: int) -> tuple[ResponseTable, str]:
    """The response table and its kind (``just-eval`` or ``ultrafeedback``)."""
    if data in ("just-eval", "just_eval"):
        return load_just_eval(None, max_prompts=max_prompts, seed=seed), "just-eval"
    path = Path(data)
    if path.is_dir() and (path / "outputs").is_dir():
        return load_just_eval(path, max_prompts=max_prompts, seed=seed), "just-eval"
    if path.suffix == ".gz" and path.name.endswith(".jsonl.gz") and "just" in path.name:
        return load_just_eval(path, max_prompts=max_prompts, seed=seed), "just-eval"
    if path.exists() or data == HUB_NAME or "/" in data:
        return load_ultrafeedback(data, max_prompts=max_prompts), "ultrafeedback"
    raise DataError(
        "not a dataset: give 'just-eval', a just-eval folder, or an UltraFeedback file or hub name",
        source=data,
    )


@dataclass
class TextStudyData:
    """A response table embedded once, split by prompt, with a pair pool per split."""

    table: ResponseTable
    kind: str
    aspects: list[str]
    embeddings: np.ndarray  # (R, D)
    pools: dict[str, PairPool]  # train / val / test
    embedding: dict[str, Any]  # what the embedding step did (for results.json)
    prompt_ids: dict[str, np.ndarray]  # train / val / test: the prompts of each split (disjoint)


def prepare_text_study(
    config: TextDataConfig,
    aspects: list[str] | None,
    num_modes: int,
    seed: int,
    standardize: bool = False,
    transform: Callable[[ResponseTable], ResponseTable] | None = None,
) -> TextStudyData:
    """Load, split by prompt, build pools on ``aspects`` (default: the dataset's first ``num_modes``
    attributes) and embed every response (through the cache). ``transform`` rewrites the table first
    (e.g. answers cut to what a policy sees)."""
    table, kind = load_table(config.data, config.max_prompts, seed)
    if transform is not None:
        table = transform(table)
    aspects = list(aspects) if aspects else DEFAULT_MODES[kind][:num_modes]
    if standardize:
        table = standardise(table, aspects)
    console.print(
        f"  data: {table.source} ({kind}): {table.num_prompts} prompts, {len(table.responses)} responses; "
        f"attributes {aspects}"
    )
    if len(config.prompt_split) != 3:
        raise ConfigError(f"prompt_split: three shares (train, val, test), got {config.prompt_split}")
    parts = table.split_prompts(tuple(config.prompt_split), seed=seed)
    splits = dict(zip(("train", "val", "test"), parts, strict=True))
    pools = {name: PairPool.build(table, ids, aspects) for name, ids in splits.items()}
    console.print(
        "  pairs (untied on the attributes): " + ", ".join(f"{k} {len(v)}" for k, v in pools.items())
    )
    embedder = Embedder(
        EmbedderConfig(
            model=config.embedder,
            max_length=config.max_length,
            long_texts=config.long_texts,
            cache_dir=config.cache_dir,
        )
    )
    start = time.perf_counter()
    embeddings = embedder.embed_messages([table.option_messages(r) for r in range(len(table.responses))])
    stats = embedder.stats
    console.print(
        f"  embeddings ({embedder.resolved.display_name}, {embedder.pooling} pooling, {config.long_texts}): "
        f"{stats.summary()}"
    )
    embedding = {
        "model": embedder.resolved.display_name,
        "namespace": embedder.namespace(),
        "texts": stats.unique,
        "from_cache": stats.cached,
        "embedded": stats.embedded,
        "longer_than_max_length": stats.truncated,
        "seconds": time.perf_counter() - start,
        "dim": int(embeddings.shape[1]),
    }
    return TextStudyData(table, kind, aspects, embeddings, pools, embedding, splits)


def mode_population(num_modes: int, only: int | None = None) -> Population:
    """Discrete users, one mode per attribute (or only mode ``only``: the oracle's single-mode data)."""
    weights = np.eye(num_modes)
    if only is not None:
        return Population(name=f"mode{only}", dim=num_modes, modes=[weights[only].tolist()])
    return Population(name=f"{num_modes}modes", dim=num_modes, modes=weights.tolist())


def simulate_splits_from_pools(
    study: TextStudyData,
    population: Population,
    config: TextDataConfig,
    conflict_rate: float | None,
    seed: int,
    tag: str = "",
    reference: Population | None = None,
) -> dict[str, PreferenceData]:
    """Train/val/test users of ``population`` answering their split's pairs; conflicts are judged by
    ``reference`` (default: ``population``)."""
    sizes = {"train": config.train_users, "val": config.val_users, "test": config.test_users}
    out = {}
    for (split, n), s in zip(sizes.items(), child_seeds(seed, 3), strict=True):
        try:
            out[split] = simulate_pool_users(
                study.pools[split],
                study.embeddings,
                population,
                n,
                config.pairs_per_user,
                conflict_rate,
                seed=s,
                user_prefix=f"{tag}{split}-",
                reference=reference,
            )
        except DataError as exc:
            prompts = len(set(study.table.prompt_of[study.pools[split].a].tolist()))
            raise DataError(
                f"{split} split ({prompts} prompts): {exc.reason}; lower --pairs-per-user or add prompts",
                source=study.table.source,
            ) from None
    return out
