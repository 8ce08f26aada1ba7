"""The policy commands of the CLI: ``train-policy``, ``evaluate-policy`` and ``generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from steerable.errors import DataError
from steerable.utils.config import add_config_arguments, config_from_args

if TYPE_CHECKING:
    import torch


def add_train_policy_arguments(p: argparse.ArgumentParser, add_embedder_arguments) -> None:
    """The options of ``train-policy``."""
    from steerable.policy.model import PolicyConfig
    from steerable.policy.trainer import PolicyTrainConfig

    p.add_argument(
        "--data", required=True, help="text preference pairs with user_id (.jsonl/.parquet/datasets)"
    )
    p.add_argument(
        "--val-data",
        help="validation users' pairs (same format, other users): with --validate-every N the policy saved "
        "is the step that scores best on them",
    )
    p.add_argument("--model", dest="policy_kind", default="np-dpo", choices=["np-dpo", "btl-dpo"])
    p.add_argument("--out", type=Path, required=True, help="output folder (policy weights, metrics.csv)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    add_config_arguments(
        p.add_argument_group("policy"),
        PolicyConfig,
        skip=("conditional", "input_dim", "max_length", "max_prompt_length", "max_response_length"),
    )
    # --cache-dir (the embedder's) is the one cache root, for the prefix cache too
    add_config_arguments(p.add_argument_group("training"), PolicyTrainConfig, skip=("cache_dir",))
    add_embedder_arguments(p)
    p.set_defaults(run=_run_train_policy)


def add_evaluate_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``evaluate-policy``."""
    p.add_argument("model_dir", type=Path, help="folder written by train-policy")
    p.add_argument("--data", required=True, help="held-out users' text pairs")
    p.add_argument("--context-sizes", default="0,1,2,4,8", help="N^C values (default: 0,1,2,4,8)")
    p.add_argument("--targets", type=int, default=8, help="scored pairs per task (default: 8)")
    p.add_argument("--tasks", type=int, default=128, help="tasks per N^C (default: 128)")
    p.add_argument("--beta", type=float, default=0.05, help="DPO β of the implicit reward (default: 0.05)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per prompt + response (default: the policy's training limits)",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    p.add_argument(
        "--mixed-precision",
        default="trained",
        choices=["trained", "no", "bf16", "fp16"],
        help="autocast of the policy and its reference alike (default: trained, the precision the policy "
        "was trained in, from its train_config.json; fp16 falls back to no on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=_run_evaluate_policy)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``generate``."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", dest="model_dir", type=Path, help="folder written by train-policy")
    source.add_argument(
        "--base-model", default=None, help="any causal LM instead (folder, hub name or SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--context", default=None, help="the user's pairs (text preference file); omit: no context"
    )
    p.add_argument(
        "--reward-model",
        type=Path,
        default=None,
        help="best-of-N: a text reward model (from steerable train on text) scoring the candidates",
    )
    p.add_argument(
        "--num-candidates", type=int, default=8, help="best-of-N: answers sampled per prompt (default: 8)"
    )
    p.add_argument("--user", default=None, help="which user of --context (default: the file's only user)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per sample")
    p.set_defaults(run=_run_generate)


def _text_data(path: str):
    from steerable.data.readers import load_any
    from steerable.data.text import TextPreferences

    data = load_any(path)
    if not isinstance(data, TextPreferences):
        raise DataError(
            "policies are trained on text pairs, but the options here are numeric vectors", source=path
        )
    return data


def _run_train_policy(args: argparse.Namespace) -> int:
    import shutil

    import numpy as np

    from steerable.data.schema import PreferenceData
    from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
    from steerable.policy.tokens import PolicyTokenizer
    from steerable.policy.trainer import PolicyTrainConfig, describe_final, train_policy
    from steerable.text.embedder import Embedder, EmbedderConfig, embed_preferences, save_embedder_config

    data = _text_data(args.data)
    val_data = _text_data(args.val_data) if args.val_data else None
    if bool(args.validate_every) != (val_data is not None):
        raise DataError(
            "checkpoint selection needs both --val-data FILE (validation users' pairs) and --validate-every N"
        )
    conditional = args.policy_kind == "np-dpo"
    embedder = None
    if conditional:
        embedder_config = EmbedderConfig(
            model=args.embedder,
            max_length=args.embed_max_length,
            long_texts=args.long_texts,
            cache_dir=args.cache_dir,
        )
        embedder = Embedder(embedder_config)

    def vectors_of(text, path: str) -> PreferenceData:
        if embedder is not None:
            vectors = embed_preferences(text, embedder)
            print(f"{path}: embedded with {args.embedder}: {embedder.stats.summary()}")
            return vectors
        zeros = np.zeros((text.num_pairs, 1), dtype=np.float32)  # the baseline never reads context
        return PreferenceData(
            user_ids=text.user_ids,
            chosen=zeros,
            rejected=zeros,
            hidden_mode=text.hidden_mode,
            source=text.source,
        )

    vectors = vectors_of(data, args.data)
    val_vectors = vectors_of(val_data, args.val_data) if val_data is not None else None
    if args.overwrite and args.out.exists():
        for name in ("checkpoint", "policy.safetensors", "policy_config.json", "metrics.csv"):
            target = args.out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    train_config = config_from_args(PolicyTrainConfig, args)
    policy_config = config_from_args(
        PolicyConfig, args, conditional=conditional, input_dim=vectors.dim if conditional else 0
    )
    import torch

    from steerable.utils.distributed import is_main_process, uses_cpu

    main = is_main_process()
    torch.manual_seed(train_config.seed)
    base, tokenizer = load_base_model(policy_config.base_model, policy_config.dtype)
    policy = ConditionalPolicy(policy_config, base, tokenizer)
    encoder = PolicyTokenizer(
        tokenizer, train_config.max_length, train_config.max_prompt_length, train_config.max_response_length
    )
    tokens = encoder.pairs(data)
    validation = None
    if val_data is not None and val_vectors is not None:
        validation = (encoder.pairs(val_data), val_vectors)
    if main:
        print(
            f"train: {data.num_pairs} pairs; {tokens.truncated} sequences cut to fit "
            f"{train_config.max_length} tokens"
        )
        if uses_cpu(train_config.device) and policy.prefix_blocks == 0 and len(policy.block_index) > 4:
            print(
                "tip: on a CPU, --blocks last:4 trains only the last 4 blocks from cached hidden states, "
                "several times faster per pair (README: NP-DPO on a CPU)"
            )
    summary = train_policy(policy, tokens, vectors, train_config, args.out, validation=validation)
    if not main:
        return 0
    if embedder is not None:
        save_embedder_config(embedder.config, args.out)
    selection = summary["selection"]
    if selection and selection["best_step"] is not None:
        print(
            f"saved step {selection['best_step']}: validation accuracy {selection['best_accuracy']:.3f} "
            f"(last step {selection['history'][-1]['accuracy']:.3f})"
        )
    print(
        f"{summary['steps']} steps ({summary['seconds']:.0f} s this run); {describe_final(summary)} (nats); "
        f"policy saved in {args.out}"
    )
    return 0


def _run_evaluate_policy(args: argparse.Namespace) -> int:
    import numpy as np

    from steerable.data.schema import PreferenceData
    from steerable.policy.evaluation import PolicyEvaluator
    from steerable.policy.generation import load_policy
    from steerable.policy.sequences import autocast_context
    from steerable.policy.tokens import PolicyTokenizer
    from steerable.text.embedder import embed_preferences
    from steerable.utils.distributed import process_state
    from steerable.utils.files import write_json_atomic

    sizes = sorted({int(x) for x in args.context_sizes.split(",")})
    device = process_state(args.device).device
    steered = load_policy(args.model_dir, device=device)
    data = _text_data(args.data)
    if steered.embedder is not None:
        vectors = embed_preferences(data, steered.embedder)
    else:
        zeros = np.zeros((data.num_pairs, 1), dtype=np.float32)
        vectors = PreferenceData(
            user_ids=data.user_ids, chosen=zeros, rejected=zeros, hidden_mode=data.hidden_mode
        )
        sizes = [0]
    config = steered.policy.config
    max_length = args.max_length or config.max_length or 256
    prompt_length = config.max_prompt_length if 0 < config.max_prompt_length < max_length else max_length // 2
    tok = PolicyTokenizer(
        steered.policy.tokenizer, max_length, prompt_length, config.max_response_length or None
    )
    precision = _evaluation_precision(args.mixed_precision, args.model_dir, device)
    autocast = autocast_context(device, precision)
    evaluator = PolicyEvaluator(steered.policy, tok.pairs(data), vectors, args.beta, autocast=autocast)
    tasks = evaluator.tasks(sizes, args.tasks, args.targets, args.seed)
    table = evaluator.accuracy_table(tasks)
    overall = table.pop("all")
    result = {
        "accuracy": {nc: v["accuracy"] for nc, v in overall.items()},
        "stderr": {nc: v["stderr"] for nc, v in overall.items()},
        "accuracy_by_mode": {m: {nc: v["accuracy"] for nc, v in row.items()} for m, row in table.items()},
        "stderr_by_mode": {m: {nc: v["stderr"] for nc, v in row.items()} for m, row in table.items()},
        "mixed_precision": precision,
    }
    if steered.policy.hooks is not None and max(sizes) > 0:
        swap = evaluator.label_swap(tasks[max(sizes)])
        result["label_swap_flip_rate"] = swap["share"]
        result["label_swap_flip_rate_stderr"] = swap["stderr"]  # clustered by user
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _evaluation_precision(choice: str, model_dir: Path, device: torch.device) -> str:
    """``choice`` (trained | no | bf16 | fp16) resolved on ``device``: ``trained`` reads the precision the
    policy was trained in from its ``train_config.json`` (``no`` when there is none); a trained fp16 falls
    back to full precision on a CPU, where autocast has no fp16."""
    from steerable.utils.distributed import resolve_precision

    if choice != "trained":
        return resolve_precision(choice, device)
    path = model_dir / "train_config.json"
    if not path.exists():
        return "no"
    try:
        trained = json.loads(path.read_text(encoding="utf-8")).get("mixed_precision", "no")
    except (json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"not a training record ({err})", source=str(path), field="mixed_precision") from None
    if trained == "fp16" and device.type == "cpu":
        print(
            "the policy was trained under fp16 autocast, which a CPU lacks: evaluating in full precision",
            file=sys.stderr,
        )
        return "no"
    return resolve_precision(trained, device)


def _run_generate(args: argparse.Namespace) -> int:
    from steerable.data.schema import user_rows
    from steerable.policy.generation import SteeredPolicy, load_policy
    from steerable.utils.distributed import process_state

    context = None
    if args.context:
        data = _text_data(args.context)
        rows = user_rows(data.user_ids, args.user, args.context)
        context = [
            {"prompt": data.prompts[i], "chosen": data.chosen[i], "rejected": data.rejected[i]} for i in rows
        ]
    device = process_state(args.device).device
    if args.model_dir is not None:
        steered = load_policy(args.model_dir, device=device)
    else:
        from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model

        base, tokenizer = load_base_model(args.base_model, device=device)
        config = PolicyConfig(base_model=args.base_model, conditional=False, lora_r=0)
        steered = SteeredPolicy(ConditionalPolicy(config, base, tokenizer).eval())
    z = steered.user_embedding(context or [])
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    if args.reward_model is not None:
        return _print_best_of_n(args, steered, prompts, context, z, sampling, device)
    texts = steered.generate_from_embedding(prompts, z, **sampling)
    for prompt, text in zip(prompts, texts, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "response": text}))
        else:
            sys.stdout.write(f"### {prompt}\n{text}\n\n")
    return 0


def _print_best_of_n(args, steered, prompts, context, z, sampling, device) -> int:
    """``generate --reward-model``: the best of ``--num-candidates`` answers per prompt for the user."""
    from steerable.errors import ConfigError
    from steerable.models.base import RewardModel
    from steerable.policy.best_of_n import best_of_n
    from steerable.text.embedder import Embedder, load_embedder_config

    embedder_config = load_embedder_config(args.reward_model)
    if embedder_config is None:
        raise ConfigError(
            f"{args.reward_model}: the reward model was not trained on text (no embedder.json); best-of-N "
            "scores text answers"
        )
    reward_model = RewardModel.from_pretrained(args.reward_model, device=device)
    result = best_of_n(
        steered.policy,
        prompts,
        reward_model,
        Embedder(embedder_config),
        context,
        args.num_candidates,
        z,
        **sampling,
    )
    for row in result.to_json():
        if args.json:
            print(json.dumps(row))
        else:
            order = sorted(range(len(row["rewards"])), key=lambda i: -row["rewards"][i])
            sys.stdout.write(f"### {row['prompt']}\n{row['best']}\n")
            sys.stdout.write("    rewards: " + ", ".join(f"{row['rewards'][i]:+.3f}" for i in order) + "\n\n")
    return 0
