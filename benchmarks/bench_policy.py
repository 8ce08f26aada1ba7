"""NP-DPO benchmark: wall time per trained preference pair of every path, and peak memory, in one run.

Setting: SmolLM2-135M-Instruct (offline copy), 2 preference pairs per step, 64 prompt + 192 response
tokens per sequence (4 sequences of 256 tokens), LoRA r=16 on the linear layers of the adapted blocks,
AdamW; NP-DPO with a context encoder over 4 context pairs per user (384-d embeddings, as MiniLM gives) and
FiLM on the adapted blocks. Every step is the trainer's own code (:func:`steerable.policy.trainer.step_terms`
and :func:`steerable.objectives.dpo_loss`), with the reference log-probabilities known in advance, as in
training (``cache_reference``):

* ``all-blocks``: every block adapted and run (the default, and the path for GPUs);
* ``lora-dpo-all-blocks``: the same without context (BTL-DPO), for NP-DPO's overhead;
* ``last-4-cached``: LoRA and FiLM on the last 4 blocks, the first 26 blocks' output read from the prefix
  cache, fp32;
* ``last-4-cached-bf16``: the same under bf16 autocast (policy and reference alike).

Time: the policies live in this process and their steps alternate, so machine noise hits all alike; the
median of ``--steps`` steps after 2 warm-up steps, divided by the pairs per step. The prefix cache's
one-time cost (a forward of the base model per sequence) is measured and printed separately. Memory: each
variant runs alone in a fresh subprocess; the process's peak resident set (VmHWM) over loading and steps.

Run with ``make bench`` or ``python benchmarks/bench_policy.py --out DIR``; writes ``DIR/bench_policy.json``
with ``per_pair_seconds`` per path.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from steerable.objectives import dpo_loss
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.sequences import SequenceStore, autocast_context, prefix_cache_for
from steerable.policy.tokens import TokenizedPairs, pair_batch
from steerable.policy.trainer import step_terms
from steerable.utils.numerics import denormals_flushed

MODEL = "SmolLM2-135M-Instruct"
PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS, CONTEXT_PAIRS, EMBED_DIM = 2, 64, 192, 4, 384
VARIANTS = {  # name: (conditional, blocks, precision)
    "all-blocks": (True, "all", "no"),
    "lora-dpo-all-blocks": (False, "all", "no"),
    "last-4-cached": (True, "last:4", "no"),
    "last-4-cached-bf16": (True, "last:4", "bf16"),
}


def build(conditional: bool, blocks: str, seed: int = 0) -> ConditionalPolicy:
    """A fresh policy around its own copy of the base model."""
    base, tokenizer = load_base_model(MODEL)
    config = PolicyConfig(
        base_model=MODEL, conditional=conditional, input_dim=EMBED_DIM if conditional else 0, blocks=blocks
    )
    torch.manual_seed(seed)
    return ConditionalPolicy(config, base, tokenizer).train()


def fixed_data(policy: ConditionalPolicy, seed: int = 0):
    """PAIRS pairs of random tokens (one per user) and each user's CONTEXT_PAIRS context embeddings."""
    g = torch.Generator().manual_seed(seed)
    vocab = policy.tokenizer.vocab_size

    def ids(n: int) -> list[list[int]]:
        return torch.randint(10, vocab, (PAIRS, n), generator=g).tolist()

    tokens = TokenizedPairs(ids(PROMPT_TOKENS), ids(RESPONSE_TOKENS), ids(RESPONSE_TOKENS))
    context = None
    if policy.hooks is not None:
        shape = (PAIRS, CONTEXT_PAIRS, EMBED_DIM)
        context = (
            torch.randn(shape, generator=g),
            torch.randn(shape, generator=g),
            torch.ones(PAIRS, CONTEXT_PAIRS, dtype=torch.bool),
        )
    return tokens, context


def make_step(policy: ConditionalPolicy, precision: str, cache_dir: str):
    """One optimizer step of the trainer's loss on the fixed batch; returns (step, prefix-fill seconds per
    sequence or None)."""
    tokens, context = fixed_data(policy)
    pairs = list(range(PAIRS))
    batch = pair_batch(tokens, [[i] for i in pairs], policy.tokenizer.eos_token_id, "cpu")
    autocast = autocast_context(torch.device("cpu"), precision) if precision != "no" else nullcontext
    cache = prefix_cache_for(policy, precision, cache_dir) if policy.prefix_blocks else None
    store = SequenceStore(policy, tokens, policy.tokenizer.eos_token_id, autocast, cache)
    start = time.perf_counter()
    with denormals_flushed():
        reference = store.reference(pairs)  # computed once per pair in training (the prefix cache's fill)
    fill = (time.perf_counter() - start) / (2 * PAIRS) if cache is not None else None
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, fused=True)  # as the trainer

    @denormals_flushed()
    def step() -> float:
        prefix = store.prefix(pairs, batch.input_ids.shape[1])
        with autocast():
            terms = step_terms(policy, policy, batch, context, reference, prefix, autocast)
        loss = dpo_loss(
            terms["policy_chosen"],
            terms["policy_rejected"],
            terms["reference_chosen"],
            terms["reference_rejected"],
            0.05,
            chosen_nll=-terms["policy_chosen"],
            chosen_tokens=terms["chosen_tokens"],
            nll_weight=1.0,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        policy.modulate(None)
        return float(loss.detach())

    return step, fill


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, steps: int, cache_dir: str) -> dict[str, float]:
    """Run in a subprocess: the process's peak RSS over loading one variant and ``steps`` steps."""
    conditional, blocks, precision = VARIANTS[variant]
    policy = build(conditional, blocks)
    step, _ = make_step(policy, precision, cache_dir)
    for _ in range(steps):
        step()
    return {"peak_gb": _status_kb("VmHWM") / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument("--memory-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, 3, args.cache_dir)))
        return

    cache_dir = tempfile.mkdtemp(prefix="bench-policy-cache-")
    print(f"loading {MODEL} {len(VARIANTS)} times (one copy per variant) ...", flush=True)
    policies = {name: build(c, b) for name, (c, b, _) in VARIANTS.items()}
    trainable = {name: sum(t.numel() for t in p.trainable_parameters()) for name, p in policies.items()}
    made = {name: make_step(p, VARIANTS[name][2], cache_dir) for name, p in policies.items()}
    times: dict[str, list[float]] = {name: [] for name in made}
    for i in range(args.steps + 2):
        for name, (step, _) in made.items():
            start = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    step_seconds = {name: statistics.median(t) for name, t in times.items()}
    per_pair = {name: s / PAIRS for name, s in step_seconds.items()}
    fill = {name: f for name, (_, f) in made.items() if f is not None}
    del policies, made

    memory = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", name, "--cache-dir", cache_dir]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])

    base = per_pair["all-blocks"]
    result = {
        "setting": f"{MODEL}, {PAIRS} pairs per step x {PROMPT_TOKENS + RESPONSE_TOKENS} tokens "
        f"({PROMPT_TOKENS} prompt + {RESPONSE_TOKENS} response), LoRA r=16 all-linear in the adapted blocks, "
        f"{CONTEXT_PAIRS} context pairs per user (NP-DPO), reference log-probs known in advance",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "per_pair_seconds": per_pair,
        "speedup_vs_all_blocks": {name: base / s for name, s in per_pair.items()},
        "step_seconds": step_seconds,
        "step_seconds_all": times,
        "prefix_fill_seconds_per_sequence": fill,
        "peak_rss_gb": {name: m["peak_gb"] for name, m in memory.items()},
        "trainable_parameters": trainable,
        "np_dpo_overhead": step_seconds["all-blocks"] / step_seconds["lora-dpo-all-blocks"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_policy.json").write_text(json.dumps(result, indent=2))
    print(f"\nNP-DPO training, per trained preference pair — {result['setting']}; {result['machine']}")
    for name in VARIANTS:
        extra = f"; prefix cache {fill[name]:.2f} s per sequence, once" if name in fill else ""
        print(
            f"  {name:>20}: {per_pair[name]:.3f} s per pair ({base / per_pair[name]:.1f}x all-blocks), "
            f"peak RSS {memory[name]['peak_gb']:.2f} GB, {trainable[name] / 1e6:.1f} M trained{extra}"
        )
    print(f"  NP-DPO vs LoRA-DPO (all blocks): {result['np_dpo_overhead']:.2f}x the step time")
    print(f"wrote {args.out / 'bench_policy.json'}")


if __name__ == "__main__":
    main()
