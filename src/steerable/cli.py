"""The ``steerable`` command line. Thin: every subcommand parses its arguments and calls one library
function. Input errors are reported as one line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from steerable.errors import ConfigError, SteerableError
from steerable.utils.config import add_config_arguments, config_from_args


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _matrix(text: str) -> list[list[float]]:
    try:
        return [[float(v) for v in row.split(",")] for row in text.split(";") if row.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rows like '1,0;0,1', got {text!r}") from None


# ---- simulate -----------------------------------------------------------------------------------------
def _add_simulate(p: argparse.ArgumentParser, rest: list[str] | None) -> None:
    p.add_argument(
        "--population",
        choices=["step-1d", "gaussian", "attributes"],
        default="step-1d",
        help="step-1d: Example 4.1; gaussian: Example 4.3; attributes: K attributes (modes or Dirichlet)",
    )
    p.add_argument("--rho", type=float, default=-1.0, help="gaussian: correlation of the two attributes")
    p.add_argument("--num-attributes", type=int, default=3, help="attributes: K")
    p.add_argument(
        "--modes",
        type=_matrix,
        default=None,
        help="attributes: mode weight vectors, e.g. '1,0,0;0,1,0' (default: one mode per attribute)",
    )
    p.add_argument(
        "--mode-probs",
        type=_float_list,
        default=None,
        help="attributes: mode probabilities (default: uniform)",
    )
    p.add_argument(
        "--dirichlet-alpha",
        type=_float_list,
        default=None,
        help="attributes: continuous users w ~ Dirichlet(alpha) instead of modes",
    )
    p.add_argument(
        "--correlation",
        type=float,
        default=0.0,
        help="attributes: correlation between attributes (gaussian options)",
    )
    p.add_argument(
        "--options",
        choices=["gaussian", "uniform"],
        default="gaussian",
        help="attributes: option distribution",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: deterministic choices; > 0: Bradley-Terry choices with this temperature",
    )
    p.add_argument(
        "--conflict-rate",
        type=float,
        default=None,
        help="share of conflicting pairs per user (default: as sampled)",
    )
    p.add_argument("--train-users", type=int, default=4000)
    p.add_argument("--val-users", type=int, default=500)
    p.add_argument("--test-users", type=int, default=1000)
    p.add_argument("--pairs-per-user", type=int, default=40)
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for train/val/test files and population.json"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from steerable.data.simulate import attribute_population, gaussian_population, simulate, step_population
    from steerable.data.writers import write_preferences
    from steerable.experiments.common import child_seeds
    from steerable.utils.files import write_json_atomic

    if args.population == "step-1d":
        population = step_population()
    elif args.population == "gaussian":
        population = gaussian_population(args.rho)
    else:
        population = attribute_population(
            args.num_attributes,
            modes=args.modes,
            mode_probs=args.mode_probs,
            dirichlet_alpha=args.dirichlet_alpha,
            correlation=args.correlation,
            options=args.options,
        )
    population = dataclasses.replace(
        population, temperature=args.temperature, conflict_rate=args.conflict_rate
    )
    splits = {"train": args.train_users, "val": args.val_users, "test": args.test_users}
    for (split, n), seed in zip(splits.items(), child_seeds(args.seed, 3), strict=True):
        if n <= 0:
            continue
        data = simulate(population, n, args.pairs_per_user, seed=seed, user_prefix=f"{split}-")
        path = write_preferences(data, args.out / f"{split}.{args.format}")
        print(f"{path}: {data.summary()}")
    write_json_atomic(args.out / "population.json", population.to_dict())
    print(f"{args.out / 'population.json'}: {population.name}")
    return 0


# ---- text -> vectors ----------------------------------------------------------------------------------
def _add_embedder_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding (text data)")
    g.add_argument(
        "--embedder",
        default="all-MiniLM-L6-v2",
        help="embedding model for text options: folder, hub name, "
        "all-MiniLM-L6-v2 (default) or SmolLM2-135M-Instruct",
    )
    g.add_argument(
        "--embed-max-length", type=int, default=256, help="embedder tokens per text or window (default: 256)"
    )
    g.add_argument(
        "--long-texts",
        choices=["chunk", "truncate"],
        default="chunk",
        help="texts over the limit: average over windows (default) or cut",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="cache root: embeddings, policy prefix states (default: $STEERABLE_CACHE or ~/.cache/steerable)",
    )


def _load_vectors(path: str, args: argparse.Namespace):
    """Preference pairs as vectors: numeric files as they are, text files through the embedder."""
    from steerable.data.readers import load_any
    from steerable.data.text import TextPreferences

    data = load_any(path)
    if not isinstance(data, TextPreferences):
        return data
    from steerable.text.embedder import Embedder, EmbedderConfig, embed_preferences

    embedder = Embedder(
        EmbedderConfig(
            model=args.embedder,
            max_length=args.embed_max_length,
            long_texts=args.long_texts,
            cache_dir=args.cache_dir,
        )
    )
    vectors = embed_preferences(data, embedder)
    print(f"{path}: embedded with {args.embedder}: {embedder.stats.summary()}")
    args.used_embedder = embedder
    return vectors


def _add_embed(p: argparse.ArgumentParser, rest: list[str] | None) -> None:
    p.add_argument(
        "--data", required=True, help="text pairs (.jsonl, .json, .parquet or a saved datasets folder)"
    )
    p.add_argument("--out", type=Path, required=True, help="output file (.parquet or .jsonl)")
    _add_embedder_arguments(p)
    p.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from steerable.data.writers import write_preferences

    data = _load_vectors(args.data, args)
    write_preferences(data, args.out)
    print(f"wrote {args.out}: {data.summary()}")
    return 0


# ---- train --------------------------------------------------------------------------------------------
def _add_train(p: argparse.ArgumentParser, rest: list[str] | None) -> None:
    from steerable.models.base import RewardModelConfig
    from steerable.training import TrainConfig

    p.add_argument(
        "--data", required=True, help="training pairs (.jsonl, .json, .parquet or a saved datasets folder)"
    )
    p.add_argument(
        "--val",
        default=None,
        help="validation pairs (default: hold out --val-fraction of the training users)",
    )
    p.add_argument(
        "--model", dest="model_type", default="np-btl", choices=["btl", "dpl", "np-btl", "vnp-btl"]
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (model, metrics.csv, checkpoint)")
    p.add_argument(
        "--overwrite", action="store_true", help="discard an existing run in --out instead of resuming it"
    )
    add_config_arguments(p.add_argument_group("model"), RewardModelConfig, skip=("model_type", "input_dim"))
    add_config_arguments(p.add_argument_group("training"), TrainConfig)
    _add_embedder_arguments(p)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from steerable.models.base import RewardModelConfig
    from steerable.models.registry import build_reward_model
    from steerable.training import TrainConfig, train_reward_model

    train = _load_vectors(args.data, args)
    val = _load_vectors(args.val, args) if args.val else None
    if val is not None and val.dim != train.dim:
        raise ConfigError(f"{args.val}: options have {val.dim} values but {args.data} has {train.dim}")
    from steerable.utils.distributed import is_main_process

    model_config = config_from_args(RewardModelConfig, args, input_dim=train.dim)
    train_config = config_from_args(TrainConfig, args)
    main = is_main_process()  # under torchrun / accelerate launch, only the main process writes and prints
    if main:
        print(f"train: {train.summary()}")
        if val is not None:
            print(f"val:   {val.summary()}")
    model = build_reward_model(model_config, seed=train_config.seed)
    result = train_reward_model(model, train, val, train_config, out_dir=args.out, overwrite=args.overwrite)
    if not main:
        return 0
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    if getattr(args, "used_embedder", None) is not None:  # the model reads text through this embedder
        from steerable.text.embedder import save_embedder_config

        save_embedder_config(args.used_embedder.config, args.out)
    print(
        f"best validation loss {result.best_val_loss:.4f} at step {result.best_step} of {result.steps}; "
        f"model saved in {args.out}"
    )
    return 0


# ---- evaluate -----------------------------------------------------------------------------------------
def _add_evaluate(p: argparse.ArgumentParser, rest: list[str] | None) -> None:
    p.add_argument("model_dir", type=Path, help="folder written by 'steerable train'")
    p.add_argument("--data", required=True, help="evaluation pairs (users not seen in training)")
    p.add_argument(
        "--context-sizes", type=_int_list, default=[0, 1, 2, 4, 8], help="N^C values (default: 0,1,2,4,8)"
    )
    p.add_argument(
        "--targets", type=int, default=20, help="N^T, pairs per task including the context (default: 20)"
    )
    p.add_argument("--tasks", type=int, default=4096, help="tasks per context size (default: 4096)")
    p.add_argument(
        "--population",
        type=Path,
        default=None,
        help="population.json of simulated data, for the Bayes-optimal reference (default: next to --data)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the metrics to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda (default: cpu)")
    _add_embedder_arguments(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from steerable.data.simulate import Population
    from steerable.evaluation import evaluate
    from steerable.experiments.common import print_accuracy_table
    from steerable.models.registry import load_reward_model
    from steerable.utils.files import write_json_atomic

    model = load_reward_model(args.model_dir, device=args.device)
    data = _load_vectors(args.data, args)
    if data.dim != model.config.input_dim:
        raise ConfigError(
            f"{args.data}: options have {data.dim} values, the model expects {model.config.input_dim}"
        )
    pop_path = args.population or Path(args.data).with_name("population.json")
    population = None
    if pop_path.exists():
        try:
            population = Population.from_dict(json.loads(pop_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{pop_path}: not a population description ({exc})") from None
    elif args.population is not None:
        raise ConfigError(f"{pop_path}: no such file")
    result = evaluate(
        model,
        data,
        args.context_sizes,
        num_targets=args.targets,
        num_tasks=args.tasks,
        seed=args.seed,
        population=population,
    )
    summary = {
        "model": str(args.model_dir),
        "model_type": model.model_type,
        "data": str(args.data),
        "seed": args.seed,
        **result.to_json(),
    }
    rows = {model.model_type: result.accuracy}
    if result.bayes is not None:
        rows["bayes-optimal"] = {k: v["accuracy"] for k, v in result.bayes.items()}
    print_accuracy_table("accuracy on unseen pairs (columns: N^C)", result.context_sizes, rows)
    if args.json:
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return 0


# ---- experiments --------------------------------------------------------------------------------------
def _add_experiment(p: argparse.ArgumentParser, rest: list[str] | None) -> None:
    from steerable.experiments import STUDIES

    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, study in STUDIES.items():
        q = studies.add_parser(name, help=study.help, description=study.help)
        if rest is not None and rest[:1] != [name]:  # only the study being run loads its module
            continue
        config_cls, _ = study.load()
        q.add_argument("--out", type=Path, required=True, help="output folder")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument(
            "--overwrite",
            action="store_true",
            help="retrain models instead of reusing finished ones in --out",
        )
        add_config_arguments(q, config_cls)
        q.set_defaults(run=_run_experiment, config_cls=config_cls)


def _run_experiment(args: argparse.Namespace) -> int:
    from steerable.experiments import run_study

    run_study(
        args.study,
        args.out,
        seed=args.seed,
        config=config_from_args(args.config_cls, args),
        overwrite=args.overwrite,
    )
    return 0


@dataclasses.dataclass(frozen=True)
class _Command:
    """One subcommand: its help, and the function that adds its options, given the words after the
    command (``None``: build every option)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser, list[str] | None], None]
    description: str | None = None


def _commands() -> dict[str, _Command]:
    from steerable.cli_active import add_elicit_arguments
    from steerable.cli_cache import add_cache_arguments
    from steerable.cli_policy import (
        add_evaluate_policy_arguments,
        add_generate_arguments,
        add_train_policy_arguments,
    )
    from steerable.cli_service import add_serve_arguments

    return {
        "simulate": _Command(
            "write a simulated hidden-context population to train/val/test files",
            _add_simulate,
            "Simulate users with hidden preferences in the preference data format.",
        ),
        "embed": _Command(
            "turn text preference pairs into vector pairs (Parquet), through the cache",
            _add_embed,
            "Embed each option [prompt ‖ completion] of a text preference file.",
        ),
        "train": _Command(
            "train a reward model (btl, dpl, np-btl, vnp-btl)",
            _add_train,
            "Train a reward model; rerun the same command to resume an interrupted run.",
        ),
        "evaluate": _Command(
            "accuracy vs number of context pairs on unseen pairs",
            _add_evaluate,
            "Evaluate a trained model on D^T \\ D^C for several context sizes N^C.",
        ),
        "experiment": _Command(
            "reproduce one of the paper's studies",
            _add_experiment,
            "Each study writes results.json, PNG plots and a printed table into --out.",
        ),
        "train-policy": _Command(
            "train an LLM policy steered by context pairs (np-dpo) or the btl-dpo baseline",
            lambda p, rest: add_train_policy_arguments(p, _add_embedder_arguments),
            "Train NP-DPO (LoRA + FiLM hypernetwork + NP context encoder, conditional DPO) or "
            "BTL-DPO on text pairs with user ids; rerun the same command to resume.",
        ),
        "evaluate-policy": _Command(
            "implicit-reward accuracy of a policy vs N^C on held-out users, and the label-swap test",
            lambda p, rest: add_evaluate_policy_arguments(p),
        ),
        "generate": _Command(
            "generate text steered by a user's context pairs", lambda p, rest: add_generate_arguments(p)
        ),
        "elicit": _Command(
            "choose the next pair to ask a user (active elicitation), or ask interactively",
            lambda p, rest: add_elicit_arguments(p),
            "Rank a pool of candidate pairs ({'a', 'b', 'prompt'?} per JSONL row) by how much the "
            "user's answer would tell the model, given the user's answers so far.",
        ),
        "cache": _Command(
            "manage the on-disk embedding cache (prune it to a size)",
            lambda p, rest: add_cache_arguments(p),
            "The embedding cache ($STEERABLE_CACHE or ~/.cache/steerable): least recently used shards go "
            "first when it is pruned.",
        ),
        "serve": _Command(
            "serve a reward model over HTTP: store users' pairs, score, compare, next query, generate",
            lambda p, rest: add_serve_arguments(p),
            "Run the personalization service (JSON API under /v1, OpenAPI schema at /openapi.json).",
        ),
    }


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``steerable`` argument parser.

    With ``argv``, only the options of the command it names are built (the other commands are listed
    with their help), so ``steerable --help`` and light commands start without importing torch.
    """
    from steerable import __version__

    parser = argparse.ArgumentParser(prog="steerable", description=__doc__.split(".")[0] + ".")
    parser.add_argument("--version", action="version", version=f"steerable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in _commands().items():
        p = sub.add_parser(name, help=command.help, description=command.description or command.help)
        if argv is None:
            command.add_arguments(p, None)
        elif argv[:1] == [name]:
            command.add_arguments(p, list(argv[1:]))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steerable`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from steerable.utils.distributed import end_processes
    from steerable.utils.numerics import denormals_flushed

    try:
        with denormals_flushed():  # subnormal floats are slow on CPUs (utils/numerics.py)
            return int(args.run(args) or 0)
    except SteerableError as exc:
        print(f"steerable: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable paths, bad numbers that reached the library
        print(f"steerable: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerable: interrupted (rerun the same command to resume training)", file=sys.stderr)
        return 130
    finally:
        end_processes()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
