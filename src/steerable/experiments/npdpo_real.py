"""NP-DPO steering a real pretrained LM on real text, on a CPU (paper Figure 2b, measured end to end).

Policy: SmolLM2-135M-Instruct. Users of two types from the offline just-eval benchmark, ``hedging``
(prefers the answer with more hedges and caveats per 100 words) and ``structure`` (prefers the answer laid
out in list items and headings), each answering only pairs on which the two types disagree (100 %
conflicting), split by prompt; the test users answer held-out prompts. Both attributes show from an
answer's first lines, so they survive the token budget the policy trains on (``response_tokens``; a cut
answer has no end token); "long vs short" would survive only through the end-of-answer token. The users
judge the answer as the policy sees it: attributes are measured on the first ``response_tokens`` tokens.

Trained with one trainer (``blocks last:K``: LoRA and FiLM on the last K blocks, the first blocks' hidden
states cached once per sequence, bf16 autocast): NP-DPO on every training user, BTL-DPO on the same
pairs without context, and one oracle DPO per type on that type's users only. Reported on held-out users
and prompts, with standard errors clustered by user:

* implicit-reward accuracy per type vs N^C for NP-DPO, BTL-DPO and the oracles (Figure 2b), and the
  label-swap flip rate vs N^C;
* generation on held-out prompts, for users of each type (their context pairs), with no context (the
  trained empty-set embedding, π(y | x, ∅)) and from the base model: each type's attribute (mean ±
  standard error over prompts) and fluency, the base model's NLL per token of the answers;
* best-of-N with a text NP-BTL (trained on the same users' pairs) over base-model samples, conditioned on
  the same users' context pairs: the steering NP-DPO has to beat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerable.data.schema import PreferenceData
from steerable.data.text import TextPreferences
from steerable.evaluation import evaluate
from steerable.experiments.common import begin_study, child_seeds, console, train_model, write_results
from steerable.experiments.policy_report import plot_training, print_policy_table
from steerable.experiments.text_common import TextDataConfig, mode_population, prepare_text_study
from steerable.objectives import prediction_hits
from steerable.policy.best_of_n import sample_candidates, score_candidates
from steerable.policy.evaluation import PolicyEvaluator
from steerable.policy.generation import SteeredPolicy, generate
from steerable.policy.model import EMPTY_CONTEXTS, ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.sequences import autocast_context, prefix_cache_for
from steerable.policy.tokens import PolicyTokenizer, TokenizedPairs, collate
from steerable.policy.trainer import PolicyTrainConfig, describe_final, train_policy
from steerable.text.embedder import Embedder, EmbedderConfig, save_embedder_config
from steerable.text.just_eval import ATTRIBUTES, response_attributes
from steerable.text.responses import ResponseTable, simulate_pool_users
from steerable.training import TrainConfig
from steerable.utils.config import option
from steerable.utils.distributed import is_main_process

MODELS = ("np-dpo", "btl-dpo", "oracle-dpo", "oracle-dpo-mirrored")
# the two oracle families: results key, folder prefix of each type's oracle
ORACLES = {"oracle-dpo": "oracle", "oracle-dpo-mirrored": "oracle-mirrored"}


@dataclass
class NPDPORealConfig(TextDataConfig):
    """Settings of ``steerable experiment npdpo-real`` (defaults: the CPU study, ~1 h on 2 cores)."""

    smoke: bool = option(False, "a run of minutes that shows the path works (far too small to learn)")
    base_model: str = option("SmolLM2-135M-Instruct", "policy LM: folder, hub name or SmolLM2-135M-Instruct")
    types: list[str] = option(["hedging", "structure"], "the two attributes that define the user types")
    models: list[str] = option(
        ["np-dpo", "btl-dpo", "oracle-dpo"],
        "policies to train (np-dpo is always trained); oracle-dpo-mirrored: each oracle also trains on the "
        "other type's pairs with the labels swapped, as NP-DPO's mirror users do (not in the default: "
        "see the README)",
    )
    train_users: int = option(96, "simulated training users (half of each type)")
    val_users: int = option(
        100, "simulated validation users, on their own prompts (the NP-BTL's and NP-DPO's best step)"
    )
    test_users: int = option(64, "simulated held-out users, on held-out prompts")
    pairs_per_user: int = option(24, "answered pairs per user (all conflicting)")
    blocks: str = option("last:4", "blocks with LoRA and FiLM (all: the GPU path)")
    init_encoder: bool = option(
        True, "start NP-DPO's context encoder from the study's NP-BTL (trained first on the same users)"
    )
    freeze_encoder: bool = option(
        False,
        "keep NP-DPO's context encoder as the NP-BTL trained it (default: it starts there and trains "
        "with the policy, which did better on seed 1; see the README)",
    )
    mirror_users: bool = option(
        True,
        "NP-DPO also trains every task's mirror user (the same pairs, labels swapped: a user of the other "
        "type, since every pair of these users conflicts); a step trains twice the sequences, so NP-DPO "
        "takes half the steps by default (see the README)",
    )
    lora_r: int = option(16, "LoRA rank (alpha = 2 r)")
    np_dpo_lora_r: int | None = option(
        None,
        "NP-DPO's own LoRA rank (default: lora_r; BTL-DPO and the oracles keep lora_r). 0: FiLM only, "
        "with --no-lora-gates (on the larger prompt split it raised the label swap: see the README)",
    )
    lora_gates: bool = option(
        True,
        "NP-DPO's z also modulates each LoRA adapter's rank bottleneck (conditional adapters; without them "
        "the policy acts on z through FiLM on attention outputs only)",
    )
    lora_shared: bool = option(
        False,
        "with lora_gates: --lora-shared keeps a part of NP-DPO's adapters shared by every user (the default "
        "until 2026-12-03); default: every adapter contribution is gated by z (beyond the paper; see the "
        "README, 'Unshared LoRA gates'); without gates there is nothing to unshare",
    )
    empty_context: str = option(
        "learned",
        "NP-DPO for a user with no context pairs: learned = the trained empty-set embedding z_∅ (paper); "
        "identity = no modulation, so with --np-dpo-lora-r 0 that user gets the base model and NP-DPO "
        "trains on N^C >= 1 only (nothing is trained at N^C = 0); see the README",
        choices=list(EMPTY_CONTEXTS),
    )
    film_mlp: bool = option(
        False, "NP-DPO's FiLM also modulates the MLP outputs of its blocks (beyond the paper; see the README)"
    )
    steps: int = option(300, "training steps of BTL-DPO and the oracles (and NP-DPO's without np_dpo_steps)")
    np_dpo_steps: int | None = option(
        None,
        "NP-DPO's training steps (default: steps, halved with mirror_users, so that NP-DPO trains as many "
        "sequences as BTL-DPO). Without mirrors, 600 moved seed 0's hedging users +0.13 and seed 1's -0.11 "
        "(see the README)",
    )
    validate_every: int = option(
        0,
        "steps between scoring NP-DPO on the validation users (implicit-reward accuracy at N^C = "
        "max_context, on their own prompts) to keep its best step (0: the last step). With 600 steps it "
        "kept steps that did worse on the test users than the default on average (see the README)",
    )
    val_tasks: int = option(64, "validation tasks of NP-DPO's checkpoint selection (users cycle)")
    select_baselines: bool = option(
        False,
        "also keep BTL-DPO's and each oracle's best step on the validation users (an oracle: its own "
        "type's); default: they train a fixed --steps",
    )
    policy_seed: int | None = option(
        None,
        "seed of the policies' training only (LoRA init, task order); default: --seed. Another value "
        "retrains on the same users, prompts and split: what one training run's luck is worth",
    )
    users_per_batch: int = option(4, "users per step")
    targets_per_user: int = option(2, "target pairs per user per step")
    max_context: int = option(10, "largest N^C while training NP-DPO")
    policy_learning_rate: float = option(5e-4, "policy learning rate (AdamW, cosine)")
    beta: float = option(0.1, "DPO β")
    nll_weight: float = option(
        1.0, "chosen-NLL weight (keeps generation fluent; at 0.2 the chosen log-ratio sank to -45 nats)"
    )
    prompt_tokens: int = option(64, "prompt budget (cut from the left)")
    response_tokens: int = option(128, "answer budget: answers are cut here and judged on what is left")
    mixed_precision: str = option(
        "bf16", "autocast of policy and reference: no | bf16", choices=["no", "bf16"]
    )
    reward_users: int = option(
        1000, "simulated users (training prompts) the NP-BTL learns from: embeddings only, so cheap"
    )
    reward_steps: int = option(600, "training steps of the NP-BTL (best-of-N judge, NP-DPO's encoder)")
    reward_hidden: int = option(
        32, "NP-BTL width, and NP-DPO's encoder's (256 memorises the ~160 training prompts' answers)"
    )
    learning_rate: float = option(3e-4, "NP-BTL learning rate (Adam; the policies': policy_learning_rate)")
    context_sizes: list[int] = option([0, 1, 3, 5, 10], "N^C values evaluated")
    eval_tasks: int = option(96, "evaluation tasks per N^C (users cycle)")
    eval_targets: int = option(
        4, "pairs per task beyond the largest N^C (each N^C scores every pair outside its context)"
    )
    generation_prompts: int = option(32, "held-out prompts answered per condition (0: no generation)")
    generation_context: int = option(10, "context pairs of each generating user")
    best_of: int = option(8, "candidates per prompt for best-of-N (0: skip)")
    temperature: float = option(0.7, "sampling temperature")

    def __post_init__(self) -> None:
        if len(self.types) != 2:
            raise ValueError(f"npdpo-real needs two user types, got {self.types}")
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise ValueError(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
        if self.steps < 1 or (self.np_dpo_steps is not None and self.np_dpo_steps < 1):
            raise ValueError("steps and np_dpo_steps must be >= 1")
        if self.np_dpo_lora_r is not None and self.np_dpo_lora_r < 0:
            raise ValueError(f"np_dpo_lora_r must be >= 0, got {self.np_dpo_lora_r}")
        if self.lora_gates and self.policy_lora_r(conditional=True) == 0:
            raise ValueError("NP-DPO without LoRA (rank 0) has no adapters to gate: add --no-lora-gates")
        if self.validate_every < 0 or self.val_tasks < 1:
            raise ValueError("validate_every must be >= 0 and val_tasks >= 1")
        if self.smoke:
            values = dict(
                max_prompts=150,
                train_users=8,
                val_users=4,
                test_users=4,
                pairs_per_user=8,
                steps=3,
                users_per_batch=2,
                targets_per_user=1,
                max_context=3,
                response_tokens=32,
                prompt_tokens=32,
                reward_steps=20,
                reward_users=8,
                context_sizes=[0, 3],
                eval_tasks=4,
                eval_targets=2,
                generation_prompts=2,
                generation_context=3,
                best_of=2,
                val_tasks=4,
            )
            for key, value in values.items():
                setattr(self, key, value)

    def policy_lora_r(self, conditional: bool) -> int:
        """LoRA rank of NP-DPO (``conditional``) or of BTL-DPO and the oracles."""
        if conditional and self.np_dpo_lora_r is not None:
            return self.np_dpo_lora_r
        return self.lora_r

    def policy_min_context(self, conditional: bool) -> int:
        """Smallest N^C NP-DPO trains on: 1 when it has nothing to train at N^C = 0 (no modulation without
        context, and no adapter that acts without z, i.e. FiLM only or unshared gates: the base model),
        else 0."""
        unshared = self.policy_lora_r(conditional=True) == 0 or self.unshared_gates(conditional)
        return 1 if conditional and unshared and self.empty_context == "identity" else 0

    def unshared_gates(self, conditional: bool) -> bool:
        """Whether NP-DPO's (``conditional``) LoRA gates gate every adapter contribution by z."""
        return conditional and self.lora_gates and not self.lora_shared

    def policy_steps(self, conditional: bool) -> int:
        """Training steps of NP-DPO (``conditional``) or of BTL-DPO and the oracles. A mirrored step trains
        twice the sequences, so by default NP-DPO with mirror users takes half the steps."""
        if not conditional:
            return self.steps
        if self.np_dpo_steps is not None:
            return self.np_dpo_steps
        return max(1, self.steps // 2) if self.mirror_users else self.steps


def budget_table(table: ResponseTable, tokenizer: Any, tokens: int) -> ResponseTable:
    """The table as the policy sees it: every answer cut to its first ``tokens`` tokens, and the
    benchmark's attributes measured on what is left."""
    cut = []
    for text in table.responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut.append(text if len(ids) <= tokens else tokenizer.decode(ids[:tokens]))
    attributes = table.attributes.copy()
    columns = [table.attribute_names.index(a) for a in ATTRIBUTES[:3]]  # length, hedging, structure
    attributes[:, columns] = np.array([response_attributes(t) for t in cut])
    return ResponseTable(
        table.prompts,
        table.prompt_of,
        cut,
        attributes,
        table.attribute_names,
        f"{table.source}, answers cut at {tokens} tokens",
        table.response_info,
    )


def _pairs_text(data: PreferenceData, table: ResponseTable, responses: list[str]) -> TextPreferences:
    """Text pairs of users whose options are response numbers; ``responses`` are the whole answers (the
    tokenizer cuts them, so a cut answer has no end token)."""
    chosen, rejected = data.chosen[:, 0].astype(np.int64), data.rejected[:, 0].astype(np.int64)
    return TextPreferences(
        user_ids=data.user_ids,
        prompts=[[{"role": "user", "content": table.prompts[table.prompt_of[c]]}] for c in chosen],
        chosen=[[{"role": "assistant", "content": responses[c]}] for c in chosen],
        rejected=[[{"role": "assistant", "content": responses[r]}] for r in rejected],
        hidden_mode=data.hidden_mode,
        source=data.source,
    )


def _simulate(study: Any, config: NPDPORealConfig, seed: int, responses: list[str]) -> dict[str, Any]:
    """Users of each split: their pairs as text (whole answers), as embeddings and as response numbers.
    The NP-BTL's users ("reward") answer the training prompts, like the policies' users."""
    population = mode_population(2)
    numbers = np.arange(len(study.table.responses), dtype=np.float32)[:, None]
    sizes = {
        "train": config.train_users,
        "val": config.val_users,
        "test": config.test_users,
        "reward": config.reward_users,
    }
    out = {}
    for (split, users), s in zip(sizes.items(), child_seeds(seed, 4), strict=True):
        picks = simulate_pool_users(
            study.pools["train" if split == "reward" else split],
            numbers,
            population,
            users,
            config.pairs_per_user,
            1.0,
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
        out[split] = (_pairs_text(picks, study.table, responses), vectors, picks)
    return out


def _rows_of_mode(data: Any, mode: int) -> np.ndarray:
    return np.flatnonzero(np.asarray(data.hidden_mode) == mode)


def _select_text(data: TextPreferences, rows: np.ndarray) -> TextPreferences:
    return TextPreferences(
        user_ids=data.user_ids[rows],
        prompts=[data.prompts[i] for i in rows],
        chosen=[data.chosen[i] for i in rows],
        rejected=[data.rejected[i] for i in rows],
        hidden_mode=None if data.hidden_mode is None else data.hidden_mode[rows],
        source=data.source,
    )


def run_npdpo_real(
    out_dir: str | Path,
    seed: int = 0,
    config: NPDPORealConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study; writes ``results.json``, ``npdpo_real.png``, ``generation.png``, the training curves
    and every policy under ``out_dir``."""
    import shutil

    from transformers import AutoTokenizer

    from steerable.text.models import resolve_model

    config = config or NPDPORealConfig()
    main = is_main_process()
    out = begin_study(out_dir, "npdpo-real", "NP-DPO steering a real LM on real text (CPU)", seed, config)
    if overwrite and main:
        oracles = [f"{prefix}-{t}" for prefix in ORACLES.values() for t in config.types]
        for name in ("np-dpo", "btl-dpo", *oracles, "np-btl"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    s_data, s_users, s_eval, s_gen, s_model = child_seeds(seed, 5)
    names = list(config.types)

    # data: answers cut to the budget, users of two types, embeddings of what they judged
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.base_model).path)
    whole: list[str] = []

    def transform(table: ResponseTable) -> ResponseTable:
        whole.extend(table.responses)
        return budget_table(table, tokenizer, config.response_tokens)

    study = prepare_text_study(config, names, 2, s_data, transform=transform)
    timings["data_and_embedding_s"] = time.perf_counter() - t
    splits = _simulate(study, config, s_users, whole)
    (train_text, train_vec, _), (val_text, val_vec, _), (test_text, test_vec, test_picks) = (
        splits["train"],
        splits["val"],
        splits["test"],
    )
    console.print(
        f"  users: {config.train_users} train, {config.test_users} test (held-out prompts); types {names}; "
        f"answers cut at {config.response_tokens} tokens"
    )
    encoder = PolicyTokenizer(
        tokenizer, config.prompt_tokens + config.response_tokens, config.prompt_tokens, config.response_tokens
    )
    train_tokens = encoder.pairs(train_text)
    validation = (encoder.pairs(val_text), val_vec) if config.validate_every else None

    # the text NP-BTL: best-of-N's judge and (init_encoder) where NP-DPO's context encoder starts
    reward_model = None
    if config.init_encoder or (config.generation_prompts > 0 and config.best_of > 0):
        t = time.perf_counter()
        reward_vec = splits["reward"][1]
        reward_model = _reward_model(reward_vec, val_vec, config, out / "np-btl", s_model, overwrite)
        timings["np-btl_train_s"] = time.perf_counter() - t

    reward_accuracy: dict[str, Any] = {}
    if reward_model is not None:
        reward_accuracy = _reward_accuracy(reward_model, test_vec, names, config, s_eval)

    # the policies: one trainer, several datasets
    # name: (conditional, training pairs as tokens and embeddings, their rows, validation rows)
    every, every_val = np.arange(train_vec.num_pairs), np.arange(val_vec.num_pairs)
    runs: dict[str, tuple[bool, TokenizedPairs, PreferenceData, np.ndarray, np.ndarray]] = {
        "np-dpo": (True, train_tokens, train_vec, every, every_val)
    }
    if "btl-dpo" in config.models:
        runs["btl-dpo"] = (False, train_tokens, train_vec, every, every_val)
    for mode, name in enumerate(names):
        own_val = _rows_of_mode(val_vec, mode)
        if "oracle-dpo" in config.models:
            runs[f"oracle-{name}"] = (False, train_tokens, train_vec, _rows_of_mode(train_vec, mode), own_val)
        if "oracle-dpo-mirrored" in config.models:
            # every pair conflicts: the other type's pairs with the labels swapped are this type's choices
            others = np.flatnonzero(np.asarray(train_vec.hidden_mode) != mode)
            tokens, vectors = swap_labels(train_tokens, train_vec, others, mode)
            runs[f"oracle-mirrored-{name}"] = (False, tokens, vectors, every, own_val)
    policies: dict[str, ConditionalPolicy] = {}
    training: dict[str, Any] = {}
    train_seed = seed if config.policy_seed is None else config.policy_seed
    for name, (conditional, tokens, vectors, rows, val_rows) in runs.items():
        t = time.perf_counter()
        encoder_from = out / "np-btl" if conditional and config.init_encoder else None
        policies[name], training[name] = _train(
            name,
            conditional,
            rows,
            tokens,
            vectors,
            config,
            out,
            train_seed,
            progress,
            encoder_from,
            (validation[0].select_rows(val_rows), validation[1].select_rows(val_rows))
            if validation and (conditional or config.select_baselines)
            else None,
        )
        timings[f"{name}_train_s"] = time.perf_counter() - t
    if main:
        save_embedder_config(_embedder_config(config), out / "np-dpo")

    # implicit-reward accuracy on held-out users and prompts
    t = time.perf_counter()
    device = policies["np-dpo"].device
    autocast = autocast_context(device, config.mixed_precision)
    test_tokens = encoder.pairs(test_text)
    sizes = sorted(set(config.context_sizes))

    def evaluator(policy: ConditionalPolicy) -> PolicyEvaluator:
        cache = (
            prefix_cache_for(policy, config.mixed_precision, config.cache_dir)
            if policy.prefix_blocks
            else None
        )
        return PolicyEvaluator(
            policy, test_tokens, test_vec, config.beta, autocast=autocast, prefix_cache=cache
        )

    np_eval = evaluator(policies["np-dpo"])
    tasks = np_eval.tasks(sizes, config.eval_tasks, config.eval_targets, s_eval)
    # one line per phase: the progress bars stay silent in a log file, and this phase takes minutes
    tables = {"np-dpo": np_eval.accuracy_table(tasks, names)}
    console.print(f"  evaluated np-dpo at N^C {sizes}: {time.perf_counter() - t:.0f} s")
    swaps = {str(n): np_eval.label_swap(tasks[n]) for n in sizes if n > 0}
    probe = np_eval.type_probe(tasks)
    console.print(f"  label swap and type probe: {time.perf_counter() - t:.0f} s")
    if "btl-dpo" in policies:
        tables["btl-dpo"] = evaluator(policies["btl-dpo"]).accuracy_table({0: tasks[sizes[0]]}, names)
    # each oracle scores every user's targets: its accuracy is read on its own type's users, and the
    # two oracles' disagreement is the label swap's yardstick (below)
    oracle_swaps: dict[str, dict[str, dict[str, float]]] = {}
    for family, prefix in ORACLES.items():
        oracle_winners: dict[str, dict[int, float]] = {}
        for name in names:
            if f"{prefix}-{name}" not in policies:
                continue
            oracle_eval = evaluator(policies[f"{prefix}-{name}"])
            table = oracle_eval.accuracy_table({0: tasks[sizes[0]]}, names)
            tables.setdefault(family, {})[name] = table[name]
            margins = oracle_eval.margins(tasks[sizes[0]])
            hits = prediction_hits(margins.margin).tolist()
            oracle_winners[name] = dict(zip(margins.pair.tolist(), hits, strict=True))
        if len(oracle_winners) == 2:
            for n in swaps:
                m = np_eval.margins(tasks[int(n)])  # kept from the accuracy table: not scored again
                disagree = oracle_disagreement(m.pair, *oracle_winners.values())
                oracle_swaps.setdefault(family, {})[n] = np_eval.share(disagree, m)
    timings["evaluation_s"] = time.perf_counter() - t
    console.print(f"  evaluation: {timings['evaluation_s']:.0f} s")

    # generation: NP-DPO per user type, no context, base; best-of-N with NP-BTL
    t = time.perf_counter()
    generation: dict[str, Any] = {}
    if config.generation_prompts > 0:
        generation = _generation(
            policies["np-dpo"], reward_model, study, test_vec, test_picks, names, config, s_gen
        )
    timings["generation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    models = {
        name: {
            "accuracy": {
                m: {nc: v["accuracy"] for nc, v in row.items()} for m, row in table.items() if m != "all"
            },
            "stderr": {
                m: {nc: v["stderr"] for nc, v in row.items()} for m, row in table.items() if m != "all"
            },
            # the test users share a few held-out prompts: the prompts' luck, which "stderr" leaves out
            "stderr_by_prompt": {
                m: {nc: v.get("stderr_by_prompt") for nc, v in row.items()}
                for m, row in table.items()
                if m != "all"
            },
            "num_prompts": {
                m: {nc: v.get("num_prompts") for nc, v in row.items()}
                for m, row in table.items()
                if m != "all"
            },
        }
        for name, table in tables.items()
    }
    results = {
        "experiment": "npdpo-real",
        "seed": seed,
        "smoke": config.smoke,
        "types": names,
        "base_model": config.base_model,
        "models": models,
        "num_scored": {
            name: {m: {nc: v["num_scored"] for nc, v in row.items()} for m, row in table.items()}
            for name, table in tables.items()
        },
        "label_swap_flip_rate_by_context": {n: v["share"] for n, v in swaps.items()},
        # its standard error clustered by user, and by prompt (the held-out prompts are few)
        "label_swap_flip_rate_stderr_by_context": {n: v["stderr"] for n, v in swaps.items()},
        "label_swap_flip_rate_stderr_by_prompt_by_context": {
            n: v.get("stderr_by_prompt") for n, v in swaps.items()
        },
        # how the flips split (every pair conflicts): right for both types / wrong for both; the rest of
        # the targets get one winner whatever the context says
        "label_swap_flips_from_right_by_context": {n: v["flips_from_right"] for n, v in swaps.items()},
        "label_swap_flips_from_wrong_by_context": {n: v["flips_from_wrong"] for n, v in swaps.items()},
        # the same targets' flip rate for a policy that becomes each type's oracle: the two oracles'
        # predicted winners differ (its ceiling: both oracles right, or both wrong)
        "label_swap_flip_rate_of_oracles_by_context": {
            n: v["share"] for n, v in oracle_swaps.get("oracle-dpo", {}).items()
        },
        "label_swap_flip_rate_of_oracles_stderr_by_context": {
            n: v["stderr"] for n, v in oracle_swaps.get("oracle-dpo", {}).items()
        },
        # the same for the oracles that also learned from the other type's pairs, labels swapped
        "label_swap_flip_rate_of_mirrored_oracles_by_context": {
            n: v["share"] for n, v in oracle_swaps.get("oracle-dpo-mirrored", {}).items()
        },
        "label_swap_flip_rate_of_mirrored_oracles_stderr_by_context": {
            n: v["stderr"] for n, v in oracle_swaps.get("oracle-dpo-mirrored", {}).items()
        },
        "user_embedding_type_probe": probe,
        "reward_model": reward_accuracy,
        "generation": generation,
        "training": training,
        "data": {
            "table": study.table.source,
            "pairs": {split: len(pool) for split, pool in study.pools.items()},
            "prompts": {split: len(ids) for split, ids in study.prompt_ids.items()},
            "train_pairs": int(train_vec.num_pairs),
            "test_pairs": int(test_vec.num_pairs),
            "sequences_cut": int(train_tokens.truncated),
        },
        "embedding": study.embedding,
        "timings": timings,
    }
    if main:
        write_results(out, results)
        _plots(out, results, sizes)
    _print(results, sizes)
    return results


def swap_labels(
    tokens: TokenizedPairs, vectors: PreferenceData, rows: np.ndarray, mode: int
) -> tuple[TokenizedPairs, PreferenceData]:
    """Copies of the pairs (as tokens and embeddings) whose ``rows`` have chosen and rejected exchanged
    and are marked as users of ``mode``: for users whose every pair conflicts, another type's choices
    made this type's."""
    flip = np.zeros(vectors.num_pairs, dtype=bool)
    flip[rows] = True
    chosen = [r if f else c for c, r, f in zip(tokens.chosen, tokens.rejected, flip, strict=True)]
    rejected = [c if f else r for c, r, f in zip(tokens.chosen, tokens.rejected, flip, strict=True)]
    hidden_mode = None if vectors.hidden_mode is None else np.where(flip, mode, vectors.hidden_mode)
    swapped = replace(
        vectors,
        chosen=np.where(flip[:, None], vectors.rejected, vectors.chosen),
        rejected=np.where(flip[:, None], vectors.chosen, vectors.rejected),
        hidden_mode=hidden_mode,
    )
    return replace(tokens, chosen=chosen, rejected=rejected), swapped


def oracle_disagreement(
    pairs: np.ndarray, winners_a: dict[int, float], winners_b: dict[int, float]
) -> np.ndarray:
    """Whether two unconditional policies pick different winners on each of ``pairs`` (M,) (their
    prediction hits per pair, a tie ½), as floats (M,): what the label swap of a policy that becomes
    oracle A under A's context and oracle B under B's would flip."""
    return np.array([winners_a[int(p)] != winners_b[int(p)] for p in pairs], np.float64)


def _reward_accuracy(
    model: Any, test: PreferenceData, names: list[str], config: NPDPORealConfig, seed: int
) -> dict[str, Any]:
    """The NP-BTL's accuracy per type vs N^C on the held-out users (over both types: with its standard
    error, clustered by user)."""
    sizes = sorted(set(config.context_sizes))
    targets = min(sizes[-1] + config.eval_targets, config.pairs_per_user)
    result = evaluate(model, test, sizes, num_targets=targets, num_tasks=4 * config.eval_tasks, seed=seed)
    summary = result.to_json()
    return {
        "accuracy": {names[int(m)]: row for m, row in summary.get("accuracy_by_mode", {}).items()},
        "accuracy_all": summary["accuracy"],
        "stderr_all": summary["stderr"],
        "num_targets": targets,
    }


def _embedder_config(config: NPDPORealConfig) -> EmbedderConfig:
    return EmbedderConfig(
        model=config.embedder,
        max_length=config.max_length,
        long_texts=config.long_texts,
        cache_dir=config.cache_dir,
    )


def _train(
    name: str,
    conditional: bool,
    rows: np.ndarray,
    tokens: Any,
    vectors: PreferenceData,
    config: NPDPORealConfig,
    out: Path,
    seed: int,
    progress: bool,
    encoder_from: Path | None = None,
    validation: tuple[TokenizedPairs, PreferenceData] | None = None,
) -> tuple[ConditionalPolicy, dict[str, Any]]:
    """One policy trained by the common trainer (resumes from ``out/name`` if a run is there); with
    ``validation`` (the validation users' tokens and embeddings) it keeps its best step on them."""
    base, tokenizer = load_base_model(config.base_model)
    rank = config.policy_lora_r(conditional)
    policy_config = PolicyConfig(
        base_model=config.base_model,
        conditional=conditional,
        lora_r=rank,
        lora_alpha=max(1, 2 * rank),
        lora_gates=config.lora_gates and conditional,
        lora_shared=not config.unshared_gates(conditional),
        film_mlp=config.film_mlp and conditional,
        empty_context=config.empty_context if conditional else "learned",
        blocks=config.blocks,
        input_dim=vectors.dim if conditional else 0,
        # the NP-BTL's encoder (attention, its width, z of 256), so that it can start from it
        encoder="attention",
        encoder_hidden=config.reward_hidden,
        latent_dim=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = ConditionalPolicy(policy_config, base, tokenizer)
    steps = config.policy_steps(conditional)
    train_config = PolicyTrainConfig(
        max_steps=steps,
        users_per_batch=config.users_per_batch,
        targets_per_user=config.targets_per_user,
        min_context=config.policy_min_context(conditional),
        max_context=config.max_context if conditional else 0,
        learning_rate=config.policy_learning_rate,
        warmup_steps=min(20, max(1, steps // 10)),
        beta=config.beta,
        nll_weight=config.nll_weight,
        max_length=config.prompt_tokens + config.response_tokens,
        max_prompt_length=config.prompt_tokens,
        max_response_length=config.response_tokens,
        mixed_precision=config.mixed_precision,
        cache_dir=config.cache_dir,
        init_encoder=str(encoder_from) if encoder_from is not None else None,
        freeze_encoder=config.freeze_encoder and encoder_from is not None,
        mirror_users=config.mirror_users and conditional,
        save_every=max(1, min(50, steps)),
        log_every=max(1, min(10, steps // 4)),
        validate_every=config.validate_every if validation is not None else 0,
        val_tasks=config.val_tasks,
        val_targets=config.eval_targets,
        seed=seed,
    )
    summary = train_policy(
        policy,
        tokens.select_rows(rows),
        vectors.select_rows(rows),
        train_config,
        out / name,
        progress,
        label=name,
        validation=validation,
    )
    total, resumed = summary["total_seconds"], summary["resumed_from"]
    took = (
        "time not recorded"
        if total is None
        else f"{total:.0f} s, {total / max(1, summary['steps']):.2f} s/step"
    )
    took += f", resumed at step {resumed}" if resumed else ""
    selection = summary["selection"]
    if selection and selection["best_step"] is not None:
        took += (
            f"; kept step {selection['best_step']} (validation accuracy {selection['best_accuracy']:.3f}, "
            f"last {selection['history'][-1]['accuracy']:.3f})"
        )
    console.print(
        f"  trained [bold]{name}[/bold] on {len(rows)} pairs: {summary['steps']} steps ({took}); "
        f"{describe_final(summary)}"
    )
    return policy.eval(), {
        "pairs": len(rows),
        "steps": summary["steps"],
        "seconds": summary["total_seconds"],  # training, over every run that made this checkpoint
        "seconds_this_run": summary["seconds"],
        "final": summary["final"],  # the last metrics.csv row, the mean over final_steps
        "final_steps": list(summary["final_steps"]),
        "timings": summary["timings"],
        "selection": selection,
    }


def _reward_model(
    train: PreferenceData, val: PreferenceData, config: NPDPORealConfig, out: Path, seed: int, overwrite: bool
) -> Any:
    """The text NP-BTL that picks the best of N (as ``steerable train`` would train it on the same pairs)."""
    train_config = TrainConfig(
        max_steps=config.reward_steps,
        learning_rate=config.learning_rate,
        max_context=10,
        eval_every=50,
        seed=seed,
    )
    if config.smoke:
        train_config = TrainConfig(
            max_steps=config.reward_steps,
            max_context=3,
            num_targets=8,
            eval_every=10,
            val_tasks=16,
            seed=seed,
        )
    result = train_model(
        "np-btl", train, val, out, train_config, {"hidden_dim": config.reward_hidden}, overwrite=overwrite
    )
    if is_main_process():
        save_embedder_config(_embedder_config(config), out)
    return result.model


def generation_prompts(groups: list[set[str]], count: int, seed: int) -> list[str]:
    """``count`` prompts to answer, drawn from ``groups`` in order (each in a seeded random order) until
    there are enough: the prompts the test users answered, the other test prompts, the validation
    prompts; held out from the policies' training, all of them."""
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    for group in groups:
        fresh = sorted(group - set(prompts))
        prompts += [fresh[i] for i in rng.permutation(len(fresh))[: count - len(prompts)]]
        if len(prompts) >= count:
            break
    return prompts


def _generation(
    policy: ConditionalPolicy,
    reward_model: Any,
    study: Any,
    test_vec: PreferenceData,
    test_picks: PreferenceData,
    names: list[str],
    config: NPDPORealConfig,
    seed: int,
) -> dict[str, Any]:
    """Answers to held-out prompts per condition; each type's attribute and the base model's NLL per
    token, mean ± standard error over prompts; a few samples per condition."""
    table = study.table
    answered = {table.prompts[table.prompt_of[int(c)]] for c in test_picks.chosen[:, 0]}
    test, val = ({table.prompts[p] for p in table.prompt_of[study.pools[s].a]} for s in ("test", "val"))
    prompts = generation_prompts([answered, test, val], config.generation_prompts, seed)
    if len(prompts) < config.generation_prompts:
        console.print(
            f"  [yellow]warning[/yellow]: only {len(prompts)} held-out prompts to answer "
            f"(--generation-prompts {config.generation_prompts})"
        )
    device = policy.device
    sampling = {"max_new_tokens": config.response_tokens, "temperature": config.temperature, "top_p": 0.95}
    chosen, rejected = np.asarray(test_vec.chosen), np.asarray(test_vec.rejected)
    texts: dict[str, list[str]] = {}
    contexts: dict[str, list[np.ndarray]] = {}
    for mode, name in enumerate(names):  # prompt i is answered for the i-th user of the type (cycling)
        users = sorted({u for u, m in zip(test_vec.user_ids, test_vec.hidden_mode, strict=True) if m == mode})
        rows = [
            np.flatnonzero(test_vec.user_ids == users[i % len(users)])[: config.generation_context]
            for i in range(len(prompts))
        ]
        contexts[name] = rows
        with torch.no_grad():
            mask = torch.ones(len(prompts), len(rows[0]), dtype=torch.bool, device=device)
            z = policy.encode(
                torch.from_numpy(np.stack([chosen[r] for r in rows])).to(device),
                torch.from_numpy(np.stack([rejected[r] for r in rows])).to(device),
                mask,
            )
        texts[f"user:{name}"] = generate(policy, prompts, z, seed=seed, **sampling)
    empty = SteeredPolicy(policy).user_embedding([])  # π(y | x, ∅): z_∅, or None (identity)
    texts["no-context"] = generate(policy, prompts, empty, seed=seed, **sampling)
    best_of = max(1, config.best_of)
    with policy.reference():
        candidates = sample_candidates(policy, prompts, best_of, None, seed=seed, **sampling)
    texts["base"] = [c[0] for c in candidates]
    best_index: dict[str, list[int]] = {}
    if reward_model is not None and config.best_of > 0:
        embedder = Embedder(_embedder_config(config))
        for name in names:
            users = [reward_model.personalize(chosen[r], rejected[r]) for r in contexts[name]]
            rewards = score_candidates(users, embedder, prompts, candidates)
            best_index[name] = rewards.argmax(axis=1).tolist()
            texts[f"best-of-{config.best_of}:{name}"] = [
                c[i] for c, i in zip(candidates, best_index[name], strict=True)
            ]
    nll = _base_nll(policy, prompts, texts, config)
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "context_pairs": config.generation_context,
        "sampling": sampling,
    }
    for label, answers in texts.items():
        measured = np.array([response_attributes(a) for a in answers])  # (P, 3): length, hedging, structure
        stats = {"words": _mean_se(measured[:, 0])}
        for name in names:
            stats[name] = _mean_se(measured[:, ATTRIBUTES.index(name)])
        stats["nll_per_token"] = _mean_se(nll[label])
        stats["values"] = {name: measured[:, ATTRIBUTES.index(name)].tolist() for name in names}
        out[label] = stats
    out["samples"] = {
        label: [{"prompt": p, "response": a} for p, a in list(zip(prompts, answers, strict=True))[:3]]
        for label, answers in texts.items()
    }
    return out


def _mean_se(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "stderr": se}


@torch.no_grad()
def _base_nll(
    policy: ConditionalPolicy, prompts: list[str], texts: dict[str, list[str]], config: NPDPORealConfig
) -> dict[str, np.ndarray]:
    """The base model's NLL per token of every answer given its prompt (the answer's end token counts
    when the answer ended)."""
    encoder = PolicyTokenizer(
        policy.tokenizer,
        config.prompt_tokens + config.response_tokens,
        config.prompt_tokens,
        config.response_tokens,
    )
    prompt_ids = [encoder.prompt_ids(p) for p in prompts]
    out = {}
    for label, answers in texts.items():
        response_ids = [encoder.response_ids(a, config.response_tokens) for a in answers]
        values = []
        for start in range(0, len(prompts), 16):
            ids, attention, response = collate(
                prompt_ids[start : start + 16],
                response_ids[start : start + 16],
                encoder.pad_id,
                policy.device,
            )
            logps = policy.reference_log_probs(ids, attention, response)
            values.append((-logps / response[:, 1:].sum(dim=1).clamp(min=1)).cpu().numpy())
        out[label] = np.concatenate(values)
    return out


def _plots(out: Path, results: dict[str, Any], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steerable.experiments.policy_report import plot_policy_accuracy

    fig, (ax, swap_ax) = plt.subplots(1, 2, figsize=(10.5, 4.2), width_ratios=(3, 2))
    plot_policy_accuracy(
        ax, results["models"], results["types"], sizes, "implicit-reward accuracy", errors=True
    )
    ax.set_title(
        "NP-DPO on SmolLM2-135M, held-out users and prompts" + (" (smoke)" if results["smoke"] else ""),
        fontsize=10,
    )
    for key, stderr_key, label, style in (
        (
            "label_swap_flip_rate_by_context",
            "label_swap_flip_rate_stderr_by_context",
            "NP-DPO: label swap flip rate",
            "o-",
        ),
        (
            "label_swap_flip_rate_of_oracles_by_context",
            "label_swap_flip_rate_of_oracles_stderr_by_context",
            "the two oracles disagree",
            "s--",
        ),
        (
            "label_swap_flip_rate_of_mirrored_oracles_by_context",
            "label_swap_flip_rate_of_mirrored_oracles_stderr_by_context",
            "the two mirrored oracles disagree",
            "d-.",
        ),
        ("user_embedding_type_probe", None, "type read from z (probe)", "^:"),
    ):
        row = results.get(key) or {}
        stderr = (results.get(stderr_key) if stderr_key else None) or {}
        if row:  # error bars: ± 1 s.e. clustered by user, where known
            errors = [stderr.get(k) if stderr.get(k) is not None else np.nan for k in row]
            swap_ax.errorbar(
                [int(k) for k in row], list(row.values()), yerr=errors, fmt=style, capsize=2, label=label
            )
    swap_ax.set(xlabel="N^C (context pairs)", ylabel="share", ylim=(0, 1.02), title="label swap, and z")
    swap_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "npdpo_real.png", dpi=120)
    plt.close(fig)
    generation = results["generation"]
    if generation:
        labels = [k for k in generation if isinstance(generation[k], dict) and "values" in generation[k]]
        fig, axes = plt.subplots(1, len(results["types"]), figsize=(5 * len(results["types"]), 3.8))
        for ax, name in zip(np.atleast_1d(axes), results["types"], strict=True):
            ax.boxplot([generation[k]["values"][name] for k in labels], showmeans=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(f"{name} of generated answers")
        fig.tight_layout()
        fig.savefig(out / "generation.png", dpi=120)
        plt.close(fig)
    oracles = [f"{prefix}-{t}" for prefix in ORACLES.values() for t in results["types"]]
    plot_training(out, runs=["np-dpo", "btl-dpo", *oracles])


def _pm(stderr: float | None) -> str:
    """The text ' ± s' for a known standard error, '' otherwise."""
    return "" if stderr is None or not np.isfinite(stderr) else f" ± {stderr:.2f}"


def _print(results: dict[str, Any], sizes: list[int]) -> None:
    print_policy_table(
        "implicit-reward accuracy, held-out users and prompts", results["models"], results["types"], sizes
    )
    reward = results.get("reward_model") or {}
    for name, row in reward.get("accuracy", {}).items():
        console.print(
            f"NP-BTL (best-of-N judge), {name} users: "
            + ", ".join(f"N^C={k}: {v:.3f}" for k, v in row.items() if v is not None)
        )
    for key, label in (
        ("label_swap_flip_rate", "label swap flip rate"),
        ("label_swap_flip_rate_of_oracles", "  the two oracles disagree on"),
        ("label_swap_flip_rate_of_mirrored_oracles", "  the two mirrored oracles disagree on"),
    ):
        share = results.get(f"{key}_by_context") or {}
        stderr = results.get(f"{key}_stderr_by_context") or {}
        if share:
            console.print(
                f"{label} (± s.e. by user): "
                + ", ".join(f"N^C={k}: {v:.2f}{_pm(stderr.get(k))}" for k, v in share.items())
            )
    right = results.get("label_swap_flips_from_right_by_context") or {}
    wrong = results.get("label_swap_flips_from_wrong_by_context") or {}
    if right and wrong:
        console.print(
            "  flips: right for both types / wrong for both (the rest: one winner whatever the context): "
            + ", ".join(f"N^C={k}: {v:.2f} / {wrong[k]:.2f}" for k, v in right.items())
        )
    probe = results.get("user_embedding_type_probe") or {}
    if probe:
        console.print(
            "type read from NP-DPO's z (linear probe, users held out): "
            + ", ".join(f"N^C={k}: {v:.2f}" for k, v in probe.items())
        )
    for label, stats in results["generation"].items():
        if isinstance(stats, dict) and "nll_per_token" in stats:
            parts = [f"{t} {stats[t]['mean']:.2f} ± {stats[t]['stderr']:.2f}" for t in results["types"]]
            console.print(
                f"  {label:>22}: " + ", ".join(parts) + f"; NLL/token {stats['nll_per_token']['mean']:.2f}"
            )
    console.print(f"total {results['timings']['total_s']:.0f} s")
