"""``steerable elicit``: which candidate pair to ask a user next (or ask them, one at a time)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from steerable.errors import ConfigError


def add_elicit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``elicit``."""
    from steerable.active import STRATEGIES

    p.add_argument(
        "--model",
        dest="model_dirs",
        action="append",
        type=Path,
        required=True,
        help="trained reward model folder; repeat to use an ensemble (info-gain on deterministic np-btl)",
    )
    p.add_argument(
        "--pool", required=True, help="candidate pairs: JSONL (or JSON array) of {'a', 'b', 'prompt'?}"
    )
    p.add_argument("--context", default=None, help="the user's answered pairs (preference file)")
    p.add_argument("--user", default=None, help="which user of --context (default: the file's only user)")
    p.add_argument("--strategy", default="info-gain", choices=[s for s in STRATEGIES if s != "bayes-greedy"])
    p.add_argument("--top", type=int, default=5, help="candidates listed (default: 5)")
    p.add_argument("--interactive", action="store_true", help="ask the pairs here, one at a time")
    p.add_argument("--num-queries", type=int, default=5, help="pairs asked with --interactive (default: 5)")
    p.add_argument("--out", type=Path, default=None, help="--interactive: append the answers to this file")
    p.add_argument("--user-id", default="me", help="--interactive: user_id written with the answers")
    p.add_argument("--seed", type=int, default=0, help="breaks exact ties (default: 0)")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    p.set_defaults(run=_run_elicit)


def _load_models(dirs: list[Path]) -> tuple[list[Any], Any]:
    from steerable.models.registry import load_reward_model
    from steerable.text.embedder import Embedder, load_embedder_config

    models = [load_reward_model(d) for d in dirs]
    config = load_embedder_config(dirs[0])
    return models, (Embedder(config) if config is not None else None)


def _context(args: argparse.Namespace, embedder: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if args.context is None:
        return None, None
    from steerable.data.readers import load_any
    from steerable.data.schema import user_rows
    from steerable.data.text import TextPreferences

    data = load_any(args.context)
    rows = user_rows(data.user_ids, args.user, args.context)
    if isinstance(data, TextPreferences):
        if embedder is None:
            raise ConfigError(
                "the context holds text, but the model was not trained on text (no embedder.json)"
            )
        from steerable.text.embedder import embed_preferences

        data = embed_preferences(data, embedder, progress=False)
    return np.asarray(data.chosen)[rows], np.asarray(data.rejected)[rows]


def _run_elicit(args: argparse.Namespace) -> int:
    from steerable.active import select_next
    from steerable.data.pool import load_pool

    models, embedder = _load_models(args.model_dirs)
    pool = load_pool(args.pool)
    if pool.is_text:
        if embedder is None:
            raise ConfigError(
                f"{args.pool} holds text, but the model was not trained on text (no embedder.json)"
            )
        vectors_a = embedder.embed_messages(pool.a, progress=False)
        vectors_b = embedder.embed_messages(pool.b, progress=False)
    else:
        vectors_a, vectors_b = pool.a, pool.b
    context_chosen, context_rejected = _context(args, embedder)
    predictor = models[0] if len(models) == 1 else models
    rng = np.random.default_rng(args.seed)
    if not args.interactive:
        query = select_next(
            predictor, vectors_a, vectors_b, strategy=args.strategy, rng=rng,
            context_chosen=context_chosen, context_rejected=context_rejected,
        )  # fmt: skip
        order = [query.index] + [
            int(i) for i in np.argsort(-np.nan_to_num(query.scores, nan=-np.inf)) if int(i) != query.index
        ]
        ranking = [
            {
                "index": i,
                "score": None if np.isnan(query.scores[i]) else float(query.scores[i]),
                "prompt": pool.prompts[i][-1]["content"] if pool.prompts[i] else None,
                "a": pool.show(i, "a"),
                "b": pool.show(i, "b"),
            }
            for i in order[: max(1, args.top)]
        ]
        if args.json:
            print(json.dumps({"strategy": args.strategy, "next": ranking[0], "ranking": ranking}))
        else:
            print(f"ask next (strategy {args.strategy}): pair {query.index}")
            for item in ranking:
                score = "—" if item["score"] is None else f"{item['score']:.4f}"
                print(
                    f"  #{item['index']:<5} score {score}\n    a: {item['a'][:200]}\n    b: {item['b'][:200]}"
                )
        return 0
    return _interactive(args, pool, predictor, vectors_a, vectors_b, context_chosen, context_rejected, rng)


def _interactive(args, pool, predictor, vectors_a, vectors_b, context_chosen, context_rejected, rng) -> int:
    """Ask up to ``--num-queries`` pairs on the terminal; answers are appended to ``--out``."""
    from steerable.active import select_next

    asked: list[int] = []
    answers: list[bool] = []
    skipped: list[int] = []
    rows = []
    for n in range(min(args.num_queries, len(pool))):
        try:
            query = select_next(
                predictor, vectors_a, vectors_b, asked, answers, args.strategy, rng,
                context_chosen=context_chosen, context_rejected=context_rejected, exclude=skipped,
            )  # fmt: skip
        except ConfigError:
            break  # nothing left to ask
        i = query.index
        prompt = pool.prompts[i][-1]["content"] if pool.prompts[i] else None
        print(f"\nquestion {n + 1} (pair {i}){': ' + prompt if prompt else ''}")
        print(f"  [a] {pool.show(i, 'a')}\n  [b] {pool.show(i, 'b')}")
        reply = ""
        while reply not in ("a", "b", "s", "q"):
            print("which do you prefer? a / b (s: skip, q: quit) > ", end="", flush=True)
            line = sys.stdin.readline()
            reply = line.strip().lower() if line else "q"
        if reply == "q":
            break
        if reply == "s":
            skipped.append(i)
            continue
        asked.append(i)
        answers.append(reply == "a")
        first, second = (pool.a[i], pool.b[i]) if reply == "a" else (pool.b[i], pool.a[i])
        row: dict[str, Any] = {"user_id": args.user_id}
        if pool.is_text:
            cut = len(pool.prompts[i])
            row.update(prompt=pool.prompts[i], chosen=first[cut:], rejected=second[cut:])
        else:
            row.update(chosen=np.asarray(first).tolist(), rejected=np.asarray(second).tolist())
        rows.append(row)
    if args.out is not None and rows:
        _append_rows(args.out, rows)
        print(f"\nappended {len(rows)} answered pairs to {args.out}")
    print(f"asked {len(asked)} pairs: {asked}")
    return 0


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Existing lines + the new rows, written atomically."""
    from steerable.utils.files import atomic_path

    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(old + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
