"""NP-DPO vs BTL-DPO on synthetic text with a known answer (CPU, minutes).

Population: :mod:`steerable.text.synthetic_text` — ``concise`` and ``verbose`` users who conflict on
short-vs-long answers and agree on on-topic vs off-topic ones. Steps:

1. a tiny Llama (word-level tokenizer, built from a config) is fitted to the on-topic responses of the
   training prompts (short and long in equal shares), and saved as the base model ``base-model/``;
2. the users' options [prompt ‖ response] are embedded by the frozen embedder (MiniLM by default);
3. NP-DPO (LoRA + FiLM hypernetwork + NP encoder, conditional DPO + NLL) and BTL-DPO (the same trainer
   without context and FiLM) are trained on the training users;
4. on held-out users answering held-out prompts: implicit-reward accuracy on the conflicting pairs vs
   N^C per type, the label-swap flip rate per N^C (headline: the largest N^C, where a user's context
   almost surely holds a conflicting pair), and generation — one sample per (user, prompt)
   with the user's 4 context pairs and with none, classified by the type's rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.experiments.common import begin_study, child_seeds, console, write_results
from steerable.experiments.policy_report import plot_policy_accuracy, plot_training, print_policy_table
from steerable.policy.evaluation import PolicyEvaluator
from steerable.policy.generation import SteeredPolicy, generate
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.sequences import autocast_context
from steerable.policy.sft import fit_language_model, tiny_llama, word_tokenizer
from steerable.policy.tokens import PolicyTokenizer
from steerable.policy.trainer import PolicyTrainConfig, describe_final, train_policy
from steerable.text import synthetic_text as world
from steerable.text.embedder import Embedder, EmbedderConfig, embed_preferences, save_embedder_config
from steerable.utils.config import option
from steerable.utils.distributed import resolve_precision


@dataclass
class NPDPOSyntheticConfig:
    """Settings of ``steerable experiment npdpo-synthetic``."""

    train_users: int = option(256, "training users (half of each type)")
    test_users: int = option(64, "held-out users, on held-out prompts")
    pairs_per_user: int = option(16, "answered pairs per user")
    conflict_share: float = option(0.5, "share of short-vs-long (conflicting) pairs")
    test_prompt_share: float = option(0.25, "share of prompts held out")
    embedder: str = option("all-MiniLM-L6-v2", "frozen embedder of the context options")
    cache_dir: str | None = option(None, "embedding cache root")
    lm_hidden: int = option(64, "tiny base LM width")
    lm_layers: int = option(2, "tiny base LM blocks")
    sft_steps: int = option(800, "steps fitting the base LM to the responses")
    sft_batch_size: int = option(64, "responses per base-LM fitting step")
    steps: int = option(4000, "NP-DPO and BTL-DPO training steps")
    users_per_batch: int = option(8, "users per step")
    targets_per_user: int = option(2, "target pairs per user per step")
    max_context: int = option(8, "largest N^C while training")
    learning_rate: float = option(1e-3, "policy learning rate")
    beta: float = option(0.05, "DPO β")
    nll_weight: float = option(1.0, "chosen-NLL weight")
    lora_r: int = option(8, "LoRA rank")
    latent_dim: int = option(32, "z width")
    context_sizes: str = option("0,1,2,4,8", "N^C values evaluated")
    eval_tasks: int = option(256, "evaluation tasks per N^C")
    generation_context: int = option(4, "context pairs given when generating")
    generation_prompts: int = option(4, "held-out prompts per held-out user when generating")
    temperature: float = option(0.7, "sampling temperature (the generate command's default)")
    mixed_precision: str = option(
        "auto", "autocast of policy and reference in training and evaluation: auto (bf16 on GPUs) | no | bf16"
    )


def run_npdpo_synthetic(
    out_dir: str | Path,
    seed: int = 0,
    config: NPDPOSyntheticConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study; writes ``results.json``, plots and the trained policies under ``out_dir``."""
    import shutil

    config = config or NPDPOSyntheticConfig()
    out = begin_study(
        out_dir, "npdpo-synthetic", "NP-DPO on synthetic text (concise vs verbose users)", seed, config
    )
    if overwrite:
        for name in ("base-model", "np-dpo", "btl-dpo"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    s_split, s_train, s_test, s_sft, s_lm, s_eval = child_seeds(seed, 6)
    train_prompts, test_prompts = world.split_prompts(config.test_prompt_share, s_split)
    train, _ = world.simulate_users(
        train_prompts, config.train_users, config.pairs_per_user, config.conflict_share, s_train
    )
    test, test_conflict = world.simulate_users(
        test_prompts,
        config.test_users,
        config.pairs_per_user,
        config.conflict_share,
        s_test,
        first_user=10**6,
    )
    console.print(
        f"  {len(train_prompts)} training prompts, {len(test_prompts)} held-out; "
        f"{train.num_pairs} training pairs, {test.num_pairs} held-out "
        f"({int(test_conflict.sum())} conflicting)"
    )

    # 1. the base LM, fitted to the response distribution
    t = time.perf_counter()
    base_dir = out / "base-model"
    if not (base_dir / "config.json").exists():
        tokenizer = word_tokenizer(world.vocabulary())
        lm = tiny_llama(len(tokenizer), config.lm_hidden, config.lm_layers, seed=s_lm)
        xs, ys = world.sft_examples(train_prompts, copies=4, seed=s_sft)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_lm)
            losses = fit_language_model(
                lm,
                tokenizer,
                xs,
                ys,
                steps=config.sft_steps,
                batch_size=config.sft_batch_size,
                seed=s_sft,
                progress=progress,
            )
        lm.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        console.print(f"  base LM fitted: NLL {losses[0]:.2f} → {np.mean(losses[-20:]):.3f} per token")
    timings["base_lm_s"] = time.perf_counter() - t

    # 2. embeddings of the options
    t = time.perf_counter()
    embedder_config = EmbedderConfig(model=config.embedder, cache_dir=config.cache_dir)
    embedder = Embedder(embedder_config)
    train_vec = embed_preferences(train, embedder, progress=progress)
    test_vec = embed_preferences(test, embedder, progress=progress)
    timings["embedding_s"] = time.perf_counter() - t

    # 3. NP-DPO and BTL-DPO
    policies = {}
    for name, conditional in (("np-dpo", True), ("btl-dpo", False)):
        t = time.perf_counter()
        base, tokenizer = load_base_model(str(base_dir))
        policy_config = PolicyConfig(
            base_model=str(base_dir.resolve()),
            conditional=conditional,
            lora_r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            latent_dim=config.latent_dim,
            encoder_hidden=128,
            hyper_hidden=64,
            input_dim=train_vec.dim,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s_lm + 1)
            policy = ConditionalPolicy(policy_config, base, tokenizer)
            encoder = PolicyTokenizer(tokenizer, max_length=64, max_prompt_length=32)
            train_config = PolicyTrainConfig(
                max_steps=config.steps,
                users_per_batch=config.users_per_batch,
                targets_per_user=config.targets_per_user,
                max_context=config.max_context if conditional else 0,
                learning_rate=config.learning_rate,
                beta=config.beta,
                nll_weight=config.nll_weight,
                max_length=64,
                max_prompt_length=32,
                mixed_precision=config.mixed_precision,
                save_every=100,
                seed=seed,
            )
            summary = train_policy(
                policy, encoder.pairs(train), train_vec, train_config, out / name, progress
            )
        if conditional:
            save_embedder_config(embedder_config, out / name)
        timings[f"{name}_train_s"] = time.perf_counter() - t
        console.print(
            f"  trained [bold]{name}[/bold]: {summary['steps']} steps in {summary['seconds']:.0f} s; "
            f"{describe_final(summary)}"
        )
        policies[name] = policy

    # 4. evaluation on held-out users and prompts
    t = time.perf_counter()
    sizes = [int(x) for x in config.context_sizes.split(",")]
    test_tokens = PolicyTokenizer(policies["np-dpo"].tokenizer, 64, 32).pairs(test)
    accuracy: dict[str, Any] = {}
    device = policies["np-dpo"].device
    autocast = autocast_context(device, resolve_precision(config.mixed_precision, device))
    evaluators = {
        name: PolicyEvaluator(p, test_tokens, test_vec, config.beta, scored=test_conflict, autocast=autocast)
        for name, p in policies.items()
    }
    tasks = evaluators["np-dpo"].tasks(
        sizes, config.eval_tasks, targets=config.pairs_per_user - max(sizes), seed=s_eval
    )
    names = list(world.TYPES)
    np_acc = evaluators["np-dpo"].accuracy_by_mode(tasks, names)
    btl_acc = evaluators["btl-dpo"].accuracy_by_mode({0: tasks[0]}, names)
    swap_nc = max(sizes)
    swaps = {str(n): evaluators["np-dpo"].label_swap(tasks[n]) for n in sizes if n > 0}
    flips = {n: v["share"] for n, v in swaps.items()}
    flip = flips.get(str(swap_nc), float("nan"))
    agree = PolicyEvaluator(
        policies["np-dpo"], test_tokens, test_vec, config.beta, scored=~test_conflict, autocast=autocast
    )
    agree_acc = agree.accuracy_by_mode({n: tasks[n] for n in (0, swap_nc)}, names)
    accuracy = {
        "np-dpo": {"accuracy": {k: v for k, v in np_acc.items() if k != "all"}},
        "btl-dpo": {"accuracy": {k: v for k, v in btl_acc.items() if k != "all"}},
    }
    generation = _generation_study(policies["np-dpo"], embedder, test, config, seed)
    timings["evaluation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    results = {
        "experiment": "npdpo-synthetic",
        "seed": seed,
        "types": names,
        "models": accuracy,
        "agreeing_pairs_accuracy": {k: v for k, v in agree_acc.items() if k != "all"},
        "label_swap_flip_rate": flip,
        "label_swap_context_size": swap_nc,
        "label_swap_flip_rate_by_context": flips,
        "label_swap_flip_rate_stderr_by_context": {n: v["stderr"] for n, v in swaps.items()},  # by user
        "generation": generation,
        "timings": timings,
        "rules": {
            "concise": "response has the short form (no ', and it is also' clause)",
            "verbose": "response has the long form",
            "well_formed": "matches the short or long form exactly, about the prompt's adjective and noun",
        },
    }
    write_results(out, results)
    _plots(out, results, sizes)
    _print(results, sizes)
    return results


def _generation_study(
    policy: ConditionalPolicy, embedder: Embedder, test: Any, config: NPDPOSyntheticConfig, seed: int
) -> dict[str, Any]:
    """One sample per (held-out user, held-out prompt), with the user's context pairs and without."""
    rng = np.random.default_rng(seed + 7)
    users = sorted(set(test.user_ids.tolist()), key=lambda u: int(u[1:]))
    rows_of = {u: np.flatnonzero(test.user_ids == u) for u in users}
    vectors = embed_preferences(test, embedder, progress=False)
    chosen = torch.from_numpy(np.asarray(vectors.chosen))
    rejected = torch.from_numpy(np.asarray(vectors.rejected))
    prompts, kinds, ctx_index = [], [], []
    for u in users:
        rows = rng.permutation(rows_of[u])
        ctx, rest = rows[: config.generation_context], rows[config.generation_context :]
        for r in rest[: config.generation_prompts]:
            prompts.append(test.prompts[r][0]["content"])
            kinds.append(world.TYPES[int(test.hidden_mode[r])])
            ctx_index.append(ctx)
    idx = torch.as_tensor(np.stack(ctx_index))
    mask = torch.ones(idx.shape, dtype=torch.bool)
    device = policy.device
    with torch.no_grad():
        z = policy.encode(chosen[idx].to(device), rejected[idx].to(device), mask.to(device))
    z0 = SteeredPolicy(policy).user_embedding([])  # π(y | x, ∅): z_∅, or None with empty_context identity
    out: dict[str, Any] = {}
    samples = {}
    for label, zz in (("with_context", z), ("without_context", z0)):
        texts = generate(policy, prompts, zz, max_new_tokens=24, temperature=config.temperature, seed=seed)
        checks = [world.classify(p, y) for p, y in zip(prompts, texts, strict=True)]
        follows = [c[k] for c, k in zip(checks, kinds, strict=True)]
        out[label] = float(np.mean(follows))
        out[f"{label}_by_type"] = {
            k: float(np.mean([f for f, kk in zip(follows, kinds, strict=True) if kk == k]))
            for k in world.TYPES
        }
        out[f"{label}_well_formed"] = float(np.mean([c["well_formed"] for c in checks]))
        samples[label] = [
            {"type": k, "prompt": p, "response": y}
            for k, p, y in list(zip(kinds, prompts, texts, strict=True))[:6]
        ]
    base_texts = None
    with policy.reference():
        base_texts = generate(
            policy, prompts, None, max_new_tokens=24, temperature=config.temperature, seed=seed
        )
    base_checks = [world.classify(p, y) for p, y in zip(prompts, base_texts, strict=True)]
    out["base_model"] = float(np.mean([c[k] for c, k in zip(base_checks, kinds, strict=True)]))
    out["base_model_well_formed"] = float(np.mean([c["well_formed"] for c in base_checks]))
    out["samples"] = samples
    out["num_samples"] = len(prompts)
    return {"np-dpo": out}


def _plots(out: Path, results: dict[str, Any], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ylabel = "implicit-reward accuracy (conflicting pairs)"
    plot_policy_accuracy(axes[0], results["models"], results["types"], sizes, ylabel)
    axes[0].set_title("held-out users and prompts")
    gen = results["generation"]["np-dpo"]
    ax = axes[1]
    labels = ["base model", "NP-DPO, no context", "NP-DPO, 4 context pairs"]
    values = [gen["base_model"], gen["without_context"], gen["with_context"]]
    ax.bar(labels, values, color=["grey", "C7", "C2"])
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set(ylabel="samples following the user's type", ylim=(0, 1))
    ax.set_title(f"steered generation (well-formed: {gen['with_context_well_formed']:.0%})")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "npdpo_synthetic.png", dpi=120)
    plt.close(fig)
    plot_training(out)


def _print(results: dict[str, Any], sizes: list[int]) -> None:
    title = "implicit-reward accuracy on conflicting pairs, held-out users and prompts"
    print_policy_table(title, results["models"], results["types"], sizes)
    gen = results["generation"]["np-dpo"]
    console.print(
        "label swap (share of predictions that flip): "
        + ", ".join(f"N^C={n}: {v:.1%}" for n, v in results["label_swap_flip_rate_by_context"].items())
    )
    console.print(
        f"generation follows the user's type: {gen['with_context']:.1%} with context, "
        f"{gen['without_context']:.1%} "
        f"without, base model {gen['base_model']:.1%}; well-formed {gen['with_context_well_formed']:.1%} "
        f"(with context), {gen['without_context_well_formed']:.1%} (without), {gen['num_samples']} samples"
    )
    console.print(f"total {results['timings']['total_s']:.0f} s")
