"""NP-DPO benchmark: one training step of NP-DPO vs a plain LoRA-DPO step, time and peak memory.

Setting (issue #4): SmolLM2-135M-Instruct (offline copy), 2 preference pairs × 128 tokens per step
(64 prompt + 64 response tokens; 4 sequences), LoRA r=16 on every linear layer, AdamW. NP-DPO adds the
context encoder over 4 context pairs per user (384-d embeddings, as MiniLM gives), the FiLM hypernetwork
and its hooks on all 30 blocks; LoRA-DPO is the same trainer with ``conditional=False`` (BTL-DPO).
Both steps are the trainer's own code: :func:`steerable.policy.trainer.step_terms` (reference pass with
adapters and FiLM off, then the policy pass) and :func:`steerable.objectives.dpo_loss`.

* time: both policies live in this process (each wraps its own base copy) and their steps alternate, so
  machine noise hits both alike; the median of ``--steps`` steps after 2 warm-up steps is compared.
* memory: each variant runs alone in a fresh subprocess; the peak resident set of the steps is read from
  ``/proc/self/status`` (VmHWM, reset after loading through ``/proc/self/clear_refs``), so the ratio
  compares what a step costs on top of the loaded model, and the whole-process peak is printed too.
* one copy of the base weights: every parameter and buffer of the policy is counted once by storage; the
  total is compared with the base model's own bytes.

Run with ``make bench`` or ``python benchmarks/bench_policy.py --out DIR``; writes ``DIR/bench_policy.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from steerable.objectives import dpo_loss
from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
from steerable.policy.tokens import TokenizedPairs, pair_batch
from steerable.policy.trainer import step_terms

MODEL = "SmolLM2-135M-Instruct"
PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS, CONTEXT_PAIRS, EMBED_DIM = 2, 64, 64, 4, 384


def build(conditional: bool, seed: int = 0) -> ConditionalPolicy:
    """A fresh policy around its own copy of the base model."""
    base, tokenizer = load_base_model(MODEL)
    config = PolicyConfig(
        base_model=MODEL, conditional=conditional, input_dim=EMBED_DIM if conditional else 0
    )
    torch.manual_seed(seed)
    return ConditionalPolicy(config, base, tokenizer).train()


def fixed_batch(policy: ConditionalPolicy, seed: int = 0):
    """PAIRS pairs of random tokens (one per user) and each user's CONTEXT_PAIRS context embeddings."""
    g = torch.Generator().manual_seed(seed)
    vocab = policy.tokenizer.vocab_size

    def ids(n: int) -> list[list[int]]:
        return torch.randint(10, vocab, (PAIRS, n), generator=g).tolist()

    tokens = TokenizedPairs(ids(PROMPT_TOKENS), ids(RESPONSE_TOKENS), ids(RESPONSE_TOKENS))
    batch = pair_batch(tokens, [[i] for i in range(PAIRS)], policy.tokenizer.eos_token_id, "cpu")
    context = None
    if policy.hooks is not None:
        shape = (PAIRS, CONTEXT_PAIRS, EMBED_DIM)
        context = (
            torch.randn(shape, generator=g),
            torch.randn(shape, generator=g),
            torch.ones(PAIRS, CONTEXT_PAIRS, dtype=torch.bool),
        )
    return batch, context


def make_step(policy: ConditionalPolicy):
    """One optimizer step of the trainer's loss on the fixed batch."""
    batch, context = fixed_batch(policy)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)

    def step() -> float:
        terms = step_terms(policy, policy, batch, context)
        loss = dpo_loss(
            terms["policy_chosen"],
            terms["policy_rejected"],
            terms["reference_chosen"],
            terms["reference_rejected"],
            0.05,
            chosen_nll=terms["chosen_nll"],
            chosen_tokens=terms["chosen_tokens"],
            nll_weight=1.0,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        policy.modulate(None)
        return float(loss.detach())

    return step


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, steps: int) -> dict[str, float]:
    """Run in a subprocess: peak RSS of ``steps`` training steps of one variant."""
    policy = build(variant == "np-dpo")
    step = make_step(policy)
    step()  # first step allocates optimizer state and autograd buffers: part of the cost
    loaded_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step()
    peak_kb = _status_kb("VmHWM")
    return {
        "rss_before_steps_gb": loaded_kb / 2**20,
        "peak_gb": peak_kb / 2**20,
        "step_peak_gb": (peak_kb - loaded_kb) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument("--memory-child", choices=["np-dpo", "lora-dpo"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, 3)))
        return

    print(f"loading {MODEL} twice (one copy per variant) ...", flush=True)
    policies = {"lora-dpo": build(False), "np-dpo": build(True)}
    base_bytes = {}
    for name, p in policies.items():
        base_only = sum(t.untyped_storage().nbytes() for n, t in p.lm.named_parameters() if "lora_" not in n)
        base_bytes[name] = {
            "policy_total_gb": storage_bytes(p) / 2**30,
            "base_gb": base_only / 2**30,
            "trainable_parameters": sum(t.numel() for t in p.trainable_parameters()),
            "base_parameters": sum(t.numel() for n, t in p.lm.named_parameters() if "lora_" not in n),
        }
    steps = {name: make_step(p) for name, p in policies.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 2):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    del policies, steps

    memory = {}
    for name in ("lora-dpo", "np-dpo"):
        cmd = [sys.executable, __file__, "--memory-child", name]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])

    result = {
        "setting": f"{MODEL}, {PAIRS} pairs x {PROMPT_TOKENS + RESPONSE_TOKENS} tokens, LoRA r=16 "
        f"all-linear, {CONTEXT_PAIRS} context pairs per user (NP-DPO)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "step_seconds": median,
        "step_seconds_all": times,
        "time_ratio": median["np-dpo"] / median["lora-dpo"],
        "memory": memory,
        "step_memory_ratio": memory["np-dpo"]["step_peak_gb"] / memory["lora-dpo"]["step_peak_gb"],
        "peak_memory_ratio": memory["np-dpo"]["peak_gb"] / memory["lora-dpo"]["peak_gb"],
        "weights": base_bytes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_policy.json").write_text(json.dumps(result, indent=2))
    w = base_bytes["np-dpo"]
    print(f"\nNP-DPO vs LoRA-DPO training step — {result['setting']}; {result['machine']}")
    print(
        f"  step time      : np-dpo {median['np-dpo']:.2f} s, lora-dpo {median['lora-dpo']:.2f} s "
        f"-> ratio {result['time_ratio']:.3f} (target <= 1.15)"
    )
    print(
        f"  step peak RSS  : np-dpo {memory['np-dpo']['step_peak_gb']:.3f} GB, lora-dpo "
        f"{memory['lora-dpo']['step_peak_gb']:.3f} GB above the loaded model -> ratio "
        f"{result['step_memory_ratio']:.3f}"
    )
    print(
        f"  process peak   : np-dpo {memory['np-dpo']['peak_gb']:.3f} GB, "
        f"lora-dpo {memory['lora-dpo']['peak_gb']:.3f} GB "
        f"-> ratio {result['peak_memory_ratio']:.3f} (target <= 1.15)"
    )
    print(
        f"  weights        : np-dpo policy holds {w['policy_total_gb']:.3f} GB of tensors, of which the base "
        f"model {w['base_gb']:.3f} GB: one copy (the reference is the same weights, adapters and FiLM off)"
    )
    for name, w in base_bytes.items():
        print(
            f"  trained        : {name} {w['trainable_parameters'] / 1e6:.2f} M parameters "
            f"({w['trainable_parameters'] / w['base_parameters']:.1%} of the base's "
            f"{w['base_parameters'] / 1e6:.1f} M)"
        )
    print(f"wrote {args.out / 'bench_policy.json'}")


if __name__ == "__main__":
    main()
