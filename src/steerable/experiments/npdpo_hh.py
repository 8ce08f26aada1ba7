"""NP-DPO on real text (paper section 4.2, Figure 2b): users of two hidden types, a pretrained LM policy.

Data as in ``steerable experiment hh``: the offline benchmark (just-eval answers; ``length`` vs
``hedging`` users) by default, or UltraFeedback (``helpfulness`` vs ``honesty``) with ``--data``. Each
simulated user answers pairs of responses to prompts of their split (split by prompt); the options'
embeddings (MiniLM by default, through the cache) are the context encoder's input. Trained on the same
users: NP-DPO (LoRA + FiLM hypernetwork + NP encoder, conditional DPO + chosen NLL) and BTL-DPO (the same
trainer without context). Reported on held-out users and prompts: implicit-reward accuracy per type vs
N^C, BTL-DPO per type, the label-swap flip rate, and (``generation_prompts`` > 0) the measured length and
hedging of responses generated for each type's users with and without their context.

Defaults are the full study for a GPU (``accelerate launch`` spreads training over several; evaluation
runs on every process and the main one writes). ``--smoke`` shrinks everything to a CPU run of a few
minutes that shows the path works end to end; it is far too small to learn the types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.data.schema import PreferenceData
from steerable.data.text import TextPreferences
from steerable.errors import ConfigError
from steerable.experiments.common import begin_study, child_seeds, console, write_results
from steerable.experiments.policy_report import plot_policy_accuracy, plot_training, print_policy_table
from steerable.experiments.text_common import (
    TextDataConfig,
    TextStudyData,
    mode_population,
    prepare_text_study,
)
from steerable.policy.evaluation import PolicyEvaluator
from steerable.policy.generation import SteeredPolicy, generate
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.tokens import PolicyTokenizer
from steerable.policy.trainer import PolicyTrainConfig, describe_final, train_policy
from steerable.text.embedder import EmbedderConfig, save_embedder_config
from steerable.text.just_eval import response_attributes
from steerable.text.responses import simulate_pool_users
from steerable.utils.config import option


@dataclass
class NPDPOHHConfig(TextDataConfig):
    """Settings of ``steerable experiment npdpo-hh`` (defaults: the GPU study; ``--smoke`` for a CPU run)."""

    smoke: bool = option(False, "CPU smoke run: 40 prompts, 32 + 16 users, 12 steps, 160 tokens (minutes)")
    base_model: str = option("SmolLM2-135M-Instruct", "policy LM: folder, hub name or SmolLM2-135M-Instruct")
    modes: list[str] | None = option(None, "attributes defining the two types (default: dataset's first 2)")
    conflict_rate: float | None = option(1.0, "share of conflicting pairs per user (none: as they come)")
    steps: int = option(1000, "NP-DPO and BTL-DPO training steps")
    users_per_batch: int = option(8, "users per step")
    targets_per_user: int = option(2, "target pairs per user per step")
    max_context: int = option(10, "largest N^C while training")
    policy_learning_rate: float = option(2e-4, "policy learning rate (AdamW)")
    beta: float = option(0.05, "DPO β (paper: 0.05)")
    nll_weight: float = option(1.0, "chosen-NLL weight (keeps generation fluent)")
    mirror_users: bool = option(
        False,
        "NP-DPO also trains every task's mirror user (labels swapped: a user of the other type when every "
        "pair conflicts, so it needs conflict_rate 1); doubles its sequences per step",
    )
    lora_r: int = option(16, "LoRA rank")
    policy_max_length: int = option(512, "policy tokens per prompt + response")
    policy_max_prompt_length: int = option(256, "policy tokens per prompt (cut from the left)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (saves memory)")
    context_sizes: list[int] = option([0, 1, 3, 5, 10], "N^C values evaluated")
    eval_tasks: int = option(256, "evaluation tasks per N^C")
    eval_targets: int = option(
        4, "pairs per task beyond the largest N^C (each N^C scores every pair outside its context)"
    )
    generation_prompts: int = option(32, "held-out prompts generated per type (0: no generation)")
    max_new_tokens: int = option(192, "tokens per generated response")

    def __post_init__(self) -> None:
        if self.mirror_users and self.conflict_rate != 1.0:
            raise ConfigError(
                f"mirror_users needs conflict_rate 1 (a mirror is a user of the other type only when every "
                f"pair conflicts), got {self.conflict_rate}"
            )
        if self.smoke:  # every size that matters for time, shrunk together
            values = dict(
                max_prompts=40,
                train_users=32,
                val_users=1,
                test_users=16,
                pairs_per_user=8,
                steps=12,
                users_per_batch=2,
                targets_per_user=1,
                max_context=4,
                policy_max_length=160,
                policy_max_prompt_length=64,
                context_sizes=[0, 4],
                eval_tasks=8,
                eval_targets=2,
                generation_prompts=2,
                max_new_tokens=24,
            )
            for key, value in values.items():
                setattr(self, key, value)


def text_pairs(study: TextStudyData, data: PreferenceData) -> TextPreferences:
    """The text of simulated users' pairs whose options are response numbers (see ``_simulate``)."""
    table = study.table
    chosen = data.chosen[:, 0].astype(np.int64)
    rejected = data.rejected[:, 0].astype(np.int64)
    return TextPreferences(
        user_ids=data.user_ids,
        prompts=[[{"role": "user", "content": table.prompts[table.prompt_of[c]]}] for c in chosen],
        chosen=[[{"role": "assistant", "content": table.responses[c]}] for c in chosen],
        rejected=[[{"role": "assistant", "content": table.responses[r]}] for r in rejected],
        hidden_mode=data.hidden_mode,
        source=data.source,
    )


def _simulate(
    study: TextStudyData, config: NPDPOHHConfig, seed: int
) -> dict[str, tuple[TextPreferences, Any]]:
    """Train and test users: their text pairs and the same pairs as embeddings."""
    population = mode_population(2)
    numbers = np.arange(len(study.table.responses), dtype=np.float32)[:, None]  # option = response number
    out = {}
    for (split, users), s in zip(
        (("train", config.train_users), ("test", config.test_users)), child_seeds(seed, 2), strict=True
    ):
        picks = simulate_pool_users(
            study.pools[split],
            numbers,
            population,
            users,
            config.pairs_per_user,
            config.conflict_rate,
            s,
            user_prefix=f"{split}-",
        )
        index_c, index_r = picks.chosen[:, 0].astype(np.int64), picks.rejected[:, 0].astype(np.int64)
        vectors = PreferenceData(
            user_ids=picks.user_ids,
            chosen=study.embeddings[index_c],
            rejected=study.embeddings[index_r],
            prompts=picks.prompts,
            hidden_mode=picks.hidden_mode,
            source=picks.source,
        )
        out[split] = (text_pairs(study, picks), vectors)
    return out


def run_npdpo_hh(
    out_dir: str | Path,
    seed: int = 0,
    config: NPDPOHHConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study; writes ``results.json``, ``npdpo_hh.png`` and both policies under ``out_dir``."""
    import shutil

    from steerable.utils.distributed import is_main_process

    config = config or NPDPOHHConfig()
    main_process = is_main_process()
    out = begin_study(out_dir, "npdpo-hh", "NP-DPO on real text: two user types", seed, config)
    if overwrite and main_process:
        for name in ("np-dpo", "btl-dpo"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    s_data, s_users, s_eval, s_gen = child_seeds(seed, 4)
    study = prepare_text_study(config, config.modes, 2, s_data)
    timings["embedding_s"] = study.embedding["seconds"]
    splits = _simulate(study, config, s_users)
    (train_text, train_vec), (test_text, test_vec) = splits["train"], splits["test"]
    names = list(study.aspects)
    console.print(f"  users: {config.train_users} train, {config.test_users} test; types {names}")

    policies: dict[str, ConditionalPolicy] = {}
    for name, conditional in (("np-dpo", True), ("btl-dpo", False)):
        t = time.perf_counter()
        base, tokenizer = load_base_model(config.base_model)
        policy_config = PolicyConfig(
            base_model=config.base_model,
            conditional=conditional,
            lora_r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            input_dim=train_vec.dim if conditional else 0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = ConditionalPolicy(policy_config, base, tokenizer)
        encoder = PolicyTokenizer(tokenizer, config.policy_max_length, config.policy_max_prompt_length)
        train_config = PolicyTrainConfig(
            max_steps=config.steps,
            users_per_batch=config.users_per_batch,
            targets_per_user=config.targets_per_user,
            max_context=config.max_context if conditional else 0,
            learning_rate=config.policy_learning_rate,
            warmup_steps=min(20, max(1, config.steps // 10)),
            beta=config.beta,
            nll_weight=config.nll_weight,
            mirror_users=config.mirror_users and conditional,
            max_length=config.policy_max_length,
            max_prompt_length=config.policy_max_prompt_length,
            gradient_checkpointing=config.gradient_checkpointing,
            save_every=max(1, min(50, config.steps)),
            log_every=max(1, min(10, config.steps // 4)),
            seed=seed,
        )
        summary = train_policy(
            policy, encoder.pairs(train_text), train_vec, train_config, out / name, progress
        )
        if conditional and main_process:
            save_embedder_config(
                EmbedderConfig(
                    model=config.embedder,
                    max_length=config.max_length,
                    long_texts=config.long_texts,
                    cache_dir=config.cache_dir,
                ),
                out / name,
            )
        timings[f"{name}_train_s"] = time.perf_counter() - t
        console.print(
            f"  trained [bold]{name}[/bold]: {summary['steps']} steps, {summary['seconds']:.0f} s; "
            f"{describe_final(summary)}"
        )
        policies[name] = policy

    t = time.perf_counter()
    sizes = sorted(set(config.context_sizes))
    tokens = PolicyTokenizer(
        policies["np-dpo"].tokenizer, config.policy_max_length, config.policy_max_prompt_length
    )
    test_tokens = tokens.pairs(test_text)
    evaluators = {
        name: PolicyEvaluator(p, test_tokens, test_vec, config.beta) for name, p in policies.items()
    }
    tasks = evaluators["np-dpo"].tasks(sizes, config.eval_tasks, config.eval_targets, s_eval)
    np_acc = evaluators["np-dpo"].accuracy_by_mode(tasks, names)
    btl_acc = evaluators["btl-dpo"].accuracy_by_mode({0: tasks[sizes[0]]}, names)
    btl_acc = {k: {"0": v[str(sizes[0])]} for k, v in btl_acc.items()}
    swap_nc = max(sizes)
    swap = evaluators["np-dpo"].label_swap(tasks[swap_nc]) if swap_nc > 0 else {}
    timings["evaluation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    generation = (
        _generation(policies["np-dpo"], study, test_text, test_vec, names, config, s_gen)
        if config.generation_prompts > 0
        else {}
    )
    timings["generation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    results = {
        "experiment": "npdpo-hh",
        "seed": seed,
        "smoke": config.smoke,
        "modes": names,
        "models": {
            "np-dpo": {"accuracy": {k: v for k, v in np_acc.items() if k != "all"}},
            "btl-dpo": {"accuracy": {k: v for k, v in btl_acc.items() if k != "all"}},
        },
        "label_swap_flip_rate": swap.get("share", float("nan")),
        "label_swap_flip_rate_stderr": swap.get("stderr", float("nan")),  # clustered by user
        "label_swap_context_size": swap_nc,
        "generation": generation,
        "embedding": study.embedding,
        "timings": timings,
    }
    if main_process:
        write_results(out, results)
        _plot(out, results, sizes)
    _print(results, sizes)
    return results


def _generation(
    policy: ConditionalPolicy,
    study: TextStudyData,
    test_text: TextPreferences,
    test_vec: PreferenceData,
    names: list[str],
    config: NPDPOHHConfig,
    seed: int,
) -> dict[str, Any]:
    """Responses to held-out prompts for one user of each type (their ``max(context_sizes)`` pairs as
    context) and without context (the trained empty-set embedding, the state the policy was trained in
    at N^C = 0; z = None would turn FiLM off and leave LoRA on); their mean word count and hedging rate."""
    rng = np.random.default_rng(seed)
    prompts = sorted({m[0]["content"] for m in test_text.prompts})
    prompts = [prompts[i] for i in rng.permutation(len(prompts))[: config.generation_prompts]]
    nc = max(max(config.context_sizes), 1)
    device = policy.device
    chosen, rejected = (
        torch.from_numpy(np.asarray(test_vec.chosen)),
        torch.from_numpy(np.asarray(test_vec.rejected)),
    )
    out: dict[str, Any] = {"prompts": len(prompts), "context_pairs": nc}
    settings: dict[str, torch.Tensor | None] = {}
    for mode, name in enumerate(names):
        users = sorted({u for u, m in zip(test_vec.user_ids, test_vec.hidden_mode, strict=True) if m == mode})
        rows = np.flatnonzero(test_vec.user_ids == users[0])[:nc]
        with torch.no_grad():
            settings[name] = policy.encode(
                chosen[rows][None].to(device),
                rejected[rows][None].to(device),
                torch.ones(1, len(rows), dtype=torch.bool, device=device),
            )[0]
    settings["no context"] = SteeredPolicy(policy).user_embedding([])  # the trained empty-set z: π(y | x, ∅)
    samples = {}
    for label, z in settings.items():
        texts = generate(policy, prompts, z, max_new_tokens=config.max_new_tokens, temperature=0.7, seed=seed)
        measured = np.array(
            [response_attributes(t) for t in texts]
        )  # (prompts, 3): length, hedging, structure
        out[label] = {
            "mean_words": float(measured[:, 0].mean()),
            "mean_hedging": float(measured[:, 1].mean()),
            "mean_structure": float(measured[:, 2].mean()),
        }
        samples[label] = [{"prompt": p, "response": y} for p, y in list(zip(prompts, texts, strict=True))[:3]]
    out["samples"] = samples
    return out


def _plot(out: Path, results: dict[str, Any], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    plot_policy_accuracy(ax, results["models"], results["modes"], sizes, "implicit-reward accuracy")
    ax.set_title("NP-DPO on real text" + (" (smoke run)" if results["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(out / "npdpo_hh.png", dpi=120)
    plt.close(fig)
    plot_training(out)


def _print(results: dict[str, Any], sizes: list[int]) -> None:
    title = "implicit-reward accuracy, held-out users and prompts"
    print_policy_table(title, results["models"], results["modes"], sizes)
    console.print(
        f"label swap at N^C={results['label_swap_context_size']}: {results['label_swap_flip_rate']:.1%} flip"
    )
    for label, stats in results["generation"].items():
        if isinstance(stats, dict) and "mean_words" in stats:
            console.print(
                f"  generated for {label}: {stats['mean_words']:.0f} words, "
                f"{stats['mean_hedging']:.2f} hedges per 100 words"
            )
    console.print(f"total {results['timings']['total_s']:.0f} s")
