"""Core benchmark: NP-BTL training throughput, time-to-accuracy, inference latency, peak memory.

Run with ``make bench`` (or ``python benchmarks/bench_core.py --out DIR``). Prints a table and writes
``DIR/bench.json``. Ratios compare, in the same run, this package's decoder (the user's z enters MLP2's
first layer once per user; at inference MLP1's last layer is folded into it) with the naive decoder that
concatenates z to every option, as the paper's eq. 22 is usually written and as the official code does.
The official implementation's own numbers, measured by the maintainers on this kind of 2-core machine with
paper settings (issue #2), are printed for reference; they were not re-measured here.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from steerable.data import TaskSampler, simulate, step_population
from steerable.models import RewardModelConfig, build_reward_model
from steerable.models.neural_process import NPBTLRewardModel
from steerable.objectives import preference_loss
from steerable.training import TrainConfig, train_reward_model

OFFICIAL = {  # issue #2: official implementation, paper settings, 2-core CPU
    "train_tasks_per_s": 337.0,
    "time_to_097_s": 190.0,
    "personalize_ms": 0.31,
    "score_10k_ms": 28.0,
    "peak_rss_gb": 0.6,
}


def naive_rewards(model: NPBTLRewardModel, options: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """r = MLP2([MLP1(y) ‖ z]) with z concatenated to every option: (B, N, D), (B, Z) -> (B, N)."""
    dec = model.decoder
    e = dec.option_net(options)  # (B, N, H)
    return dec.reward_net(torch.cat([e, z.unsqueeze(1).expand(-1, e.shape[1], -1)], dim=-1)).squeeze(-1)


def naive_training_loss(model: NPBTLRewardModel, batch) -> torch.Tensor:
    z = model.encode_batch(batch).mean
    n = batch.target_chosen.shape[1]
    r = naive_rewards(model, torch.cat([batch.target_chosen, batch.target_rejected], 1), z)
    return preference_loss(torch.nn.functional.logsigmoid(r[:, :n] - r[:, n:]), batch.target_mask)


def throughput(model: NPBTLRewardModel, sampler: TaskSampler, steps: int, naive: bool) -> float:
    """Tasks per second of forward + backward + Adam step (sampling included)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        batch = sampler.sample()
        if naive:
            loss = naive_training_loss(model, batch)
        else:
            out = model.training_output(batch)
            loss = preference_loss(out.log_prob_chosen, batch.target_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * sampler.batch_size / (time.perf_counter() - start)


def time_to_accuracy(
    train, val, seed: int, threshold: float = 0.97, max_steps: int = 1500, every: int = 50
) -> dict:
    """Wall time until validation accuracy at N^C = 10 stays >= threshold for the rest of the run."""
    model = build_reward_model(RewardModelConfig(model_type="np-btl", input_dim=1), seed=seed)
    val_tasks = TaskSampler(val, 0, 10, 20, seed=seed + 7).fixed_tasks([10], 1024, batch_size=512)[10]
    trace, overhead = [], [0.0]
    start = time.perf_counter()

    def probe(step: int, row: dict, m) -> bool:
        t0 = time.perf_counter()
        with torch.no_grad():
            m.eval()
            hits = n = 0.0
            for b in val_tasks:
                out, mask = m(b), b.scored_mask
                hits += float((out.log_odds > 0)[mask].sum())
                n += float(mask.sum())
            m.train()
        trace.append((step, time.perf_counter() - start - overhead[0], hits / n))
        overhead[0] += time.perf_counter() - t0
        return False

    config = TrainConfig(max_steps=max_steps, eval_every=every, seed=seed)
    train_reward_model(model, train, val, config, callbacks=(probe,), progress=False)
    stable = None
    for i, (step, wall, _) in enumerate(trace):
        if all(acc >= threshold for _, _, acc in trace[i:]):
            stable = (step, wall)
            break
    first = next(((s, w) for s, w, a in trace if a >= threshold), None)
    return {
        "threshold": threshold,
        "stable_step": stable[0] if stable else None,
        "stable_wall_s": stable[1] if stable else None,
        "first_step": first[0] if first else None,
        "first_wall_s": first[1] if first else None,
        "final_accuracy": trace[-1][2],
        "steps": max_steps,
        "trace": [{"step": s, "wall_s": round(w, 3), "accuracy": round(a, 5)} for s, w, a in trace],
    }


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def inference_latency(model: NPBTLRewardModel, seed: int) -> dict:
    model.eval()
    rng = np.random.default_rng(seed)
    ctx_c, ctx_r = rng.uniform(size=(10, 1)).astype(np.float32), rng.uniform(size=(10, 1)).astype(np.float32)
    options = rng.uniform(size=(10_000, 1)).astype(np.float32)
    user = model.personalize(ctx_c, ctx_r)
    x = torch.from_numpy(options)[None]
    with torch.inference_mode():
        z = user.latent.mean
        naive = median_ms(lambda: naive_rewards(model, x, z), 50)
        np.testing.assert_allclose(
            user.rewards(options), naive_rewards(model, x, z)[0].numpy(), rtol=1e-3, atol=1e-4
        )
    mean_encoder = build_reward_model(
        RewardModelConfig(model_type="np-btl", input_dim=1, encoder="mean"), seed=seed
    )
    return {
        "personalize_ms": median_ms(lambda: model.personalize(ctx_c, ctx_r), 200),
        "personalize_mean_encoder_ms": median_ms(lambda: mean_encoder.personalize(ctx_c, ctx_r), 200),
        "score_10k_ms": median_ms(lambda: user.rewards(options), 50),
        "score_10k_naive_ms": naive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per throughput measurement")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    pop = step_population()
    train, val = simulate(pop, 4000, 40, seed=args.seed), simulate(pop, 500, 40, seed=args.seed + 1)
    paper = RewardModelConfig(model_type="np-btl", input_dim=1)  # hidden 256, 2-layer MLPs, GELU
    results: dict = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu": platform.processor(),
        }
    }
    print("measuring training throughput ...", flush=True)
    model = build_reward_model(paper, seed=args.seed)
    ours = throughput(model, TaskSampler(train, seed=args.seed), args.steps, naive=False)
    naive = throughput(
        build_reward_model(paper, seed=args.seed), TaskSampler(train, seed=args.seed), args.steps, naive=True
    )
    results["train_tasks_per_s"] = ours
    results["train_tasks_per_s_naive_decoder"] = naive
    print("measuring time to accuracy ...", flush=True)
    results["time_to_accuracy"] = time_to_accuracy(train, val, args.seed)
    print("measuring inference latency ...", flush=True)
    results.update(inference_latency(model, args.seed))
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    results["official_reference"] = OFFICIAL

    tta = results["time_to_accuracy"]
    naive_ms = results["score_10k_naive_ms"]
    rows = [
        (
            "training throughput (tasks/s)",
            f"{ours:,.0f}",
            f"{ours / naive:.2f}x naive-decoder ({naive:,.0f})",
            f"{ours / OFFICIAL['train_tasks_per_s']:.1f}x official (337)",
        ),
        (
            "time to stably >= 0.97 at N^C=10 (s)",
            f"{tta['stable_wall_s']:.1f}" if tta["stable_wall_s"] else "never",
            f"step {tta['stable_step']} (first >= 0.97: step {tta['first_step']})",
            "official: 190 s (1,000 steps)",
        ),
        (
            "personalize from 10 pairs (ms)",
            f"{results['personalize_ms']:.3f}",
            f"attention encoder; DeepSet-mean encoder: {results['personalize_mean_encoder_ms']:.3f}",
            "official: 0.31 ms",
        ),
        (
            "score 10,000 options (ms)",
            f"{results['score_10k_ms']:.2f}",
            f"{naive_ms / results['score_10k_ms']:.2f}x faster than naive ({naive_ms:.2f})",
            "official: 28 ms",
        ),
        ("peak RSS (GB)", f"{results['peak_rss_gb']:.2f}", "", "official: 0.6 GB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'value':>10}  in-run ratio / detail")
    for name, value, ratio, ref in rows:
        print(f"{name:<{width}}  {value:>10}  {ratio}  [{ref}]")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
