"""Core benchmark: NP-BTL training throughput, time to accuracy (the defaults and the paper's optimiser),
per-step time across a 1,000-step run, personalisation and scoring latency, peak memory.

Run with ``make bench`` (or ``python benchmarks/bench_core.py --out DIR``). Prints a table and writes
``DIR/bench.json``. Every number printed is measured by this run on this machine; no other
implementation is run or quoted here (the README quotes a side-by-side measurement of the paper's
official code as what it is). The "concat-z ablation" rows are this package's own model computing eq. 22
literally, with z concatenated to every option; they isolate what the decoder's layout buys, and say
nothing about any other implementation.
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
from steerable.training import PreferenceObjective, TrainConfig, learning_rate_schedule, train_reward_model
from steerable.utils.numerics import denormals_flushed

PAPER_OPTIMISER = {"learning_rate": 1e-4, "lr_schedule": "constant", "warmup_steps": 0, "max_grad_norm": None}


def concat_rewards(model: NPBTLRewardModel, options: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """r = MLP2([MLP1(y) ‖ z]) with z concatenated to every option: (B, N, D), (B, Z) -> (B, N)."""
    dec = model.decoder
    e = dec.option_net(model.standardize(options))  # (B, N, H)
    return dec.reward_net(torch.cat([e, z.unsqueeze(1).expand(-1, e.shape[1], -1)], dim=-1)).squeeze(-1)


def concat_training_loss(model: NPBTLRewardModel, batch) -> torch.Tensor:
    z = model.encode_batch(batch).mean
    n = batch.target_chosen.shape[1]
    r = concat_rewards(model, torch.cat([batch.target_chosen, batch.target_rejected], 1), z)
    return preference_loss(torch.nn.functional.logsigmoid(r[:, :n] - r[:, n:]), batch.target_mask)


def throughput(model: NPBTLRewardModel, sampler: TaskSampler, steps: int, concat: bool) -> float:
    """Tasks per second of forward + backward + Adam step (sampling included)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        batch = sampler.sample()
        if concat:
            loss = concat_training_loss(model, batch)
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


def training_run(
    train, val, seed: int, optimiser: dict, threshold: float = 0.97, steps: int = 1000, every: int = 25
) -> dict:
    """One training run through the trainer: when validation accuracy at N^C = 10 first reaches
    ``threshold`` and from when it stays there, and the time per step in 100-step windows.

    Times are the trainer's own clock (training steps and its validation on 64 tasks; not the probe on
    1,024 tasks at N^C = 10 that decides the threshold, nor checkpointing)."""
    model = build_reward_model(RewardModelConfig(model_type="np-btl", input_dim=1), seed=seed)
    probe_tasks = TaskSampler(val, 0, 10, 20, seed=seed + 7).fixed_tasks([10], 1024, batch_size=512)[10]
    trace: list[tuple[int, float, float]] = []

    def probe(step: int, row: dict, m) -> bool:
        with torch.no_grad():
            was = m.training
            m.eval()
            hits = n = 0.0
            for b in probe_tasks:
                out, mask = m(b), b.scored_mask
                hits += float((out.log_odds > 0)[mask].sum())
                n += float(mask.sum())
            m.train(was)
        trace.append((step, row["elapsed_s"], hits / n))
        return False

    config = TrainConfig(max_steps=steps, eval_every=every, val_tasks=64, seed=seed, **optimiser)
    train_reward_model(model, train, val, config, callbacks=(probe,), progress=False)
    stable = next(
        ((s, w) for i, (s, w, _) in enumerate(trace) if all(a >= threshold for _, _, a in trace[i:])), None
    )
    first = next(((s, w) for s, w, a in trace if a >= threshold), None)
    clock = {0: 0.0, **{s: w for s, w, _ in trace}}
    window_ms = {
        f"{s - 100}-{s}": 1000 * (clock[s] - clock[s - 100]) / 100 for s in range(100, steps + 1, 100)
    }

    def per_step(lo: int, hi: int) -> tuple[float, float]:
        """Mean and median ms/step over the ``every``-step windows in (lo, hi]: the median is robust to
        bursts of other processes on a shared machine, a slowdown of the run itself moves both."""
        ms = [1000 * (clock[s] - clock[s - every]) / every for s in range(lo + every, hi + 1, every)]
        return 1000 * (clock[hi] - clock[lo]) / (hi - lo), statistics.median(ms)

    (first_400, first_median), (last_400, last_median) = per_step(0, 400), per_step(steps - 400, steps)
    return {
        "optimiser": {k: getattr(config, k) for k in PAPER_OPTIMISER},
        "threshold": threshold,
        "stable_step": stable[0] if stable else None,
        "stable_wall_s": stable[1] if stable else None,
        "first_step": first[0] if first else None,
        "first_wall_s": first[1] if first else None,
        "final_accuracy": trace[-1][2],
        "steps": steps,
        "ms_per_step_by_window": window_ms,
        "ms_per_step_first_400": first_400,
        "ms_per_step_last_400": last_400,
        "ms_per_step_first_400_median": first_median,
        "ms_per_step_last_400_median": last_median,
        "trace": [{"step": s, "wall_s": round(w, 3), "accuracy": round(a, 5)} for s, w, a in trace],
    }


def early_vs_late_steps(
    train, seed: int, optimiser: dict, steps: int = 1000, span: int = 400, block: int = 25
) -> dict:
    """ms/step of steps 1..``span`` against steps ``steps − span + 1``..``steps`` of a training run,
    timed in alternating ``block``-step blocks of two runs (one at the start, one that has already done
    ``steps − span`` steps), so that other processes on a shared machine slow both alike. The steps are
    the trainer's (its loss, learning-rate schedule, clipping and Adam; subnormal floats flushed)."""
    config = TrainConfig(max_steps=steps, seed=seed, **optimiser)
    schedule = learning_rate_schedule(config)

    def start() -> dict:
        model = build_reward_model(RewardModelConfig(model_type="np-btl", input_dim=1), seed=seed).train()
        return {
            "objective": PreferenceObjective(model),
            "optimizer": torch.optim.Adam(model.parameters(), lr=config.learning_rate),
            "sampler": TaskSampler(train, 0, 10, 20, config.batch_size, seed=seed),
            "step": 0,
        }

    def advance(run: dict, n: int) -> None:
        for _ in range(n):
            loss = run["objective"](run["sampler"].sample())
            run["optimizer"].zero_grad(set_to_none=True)
            for group in run["optimizer"].param_groups:
                group["lr"] = schedule(run["step"])
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(run["objective"].parameters(), config.max_grad_norm)
            run["optimizer"].step()
            run["step"] += 1

    early, late = start(), start()
    advance(late, steps - span)
    times: dict[str, list[float]] = {"early": [], "late": []}
    for _ in range(span // block):
        for name, run in (("early", early), ("late", late)):
            t0 = time.perf_counter()
            advance(run, block)
            times[name].append(1000 * (time.perf_counter() - t0) / block)
    first, last = statistics.median(times["early"]), statistics.median(times["late"])
    return {"ms_per_step_first": first, "ms_per_step_last": last, "ratio": last / first, "blocks_ms": times}


def median_ms(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 20)):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def inference_latency(model: NPBTLRewardModel, seed: int) -> dict:
    """Personalising from 10 pairs and scoring 10,000 options, medians of many calls in one run."""
    model.eval()
    rng = np.random.default_rng(seed)
    ctx_c, ctx_r = rng.uniform(size=(10, 1)).astype(np.float32), rng.uniform(size=(10, 1)).astype(np.float32)
    options = rng.uniform(size=(10_000, 1)).astype(np.float32)
    user = model.personalize(ctx_c, ctx_r)
    x = torch.from_numpy(options)[None]
    with torch.inference_mode():
        z = user.latent.mean
        concat_ms = median_ms(lambda: concat_rewards(model, x, z), 100)
        np.testing.assert_allclose(
            user.rewards(options), concat_rewards(model, x, z)[0].numpy(), rtol=1e-3, atol=1e-4
        )
    mean_encoder = build_reward_model(
        RewardModelConfig(model_type="np-btl", input_dim=1, encoder="mean"), seed=seed
    ).eval()
    return {
        "personalize_ms": median_ms(lambda: model.personalize(ctx_c, ctx_r), 2000),
        "personalize_mean_encoder_ms": median_ms(lambda: mean_encoder.personalize(ctx_c, ctx_r), 2000),
        "score_10k_ms": median_ms(lambda: user.rewards(options), 100),
        "score_10k_concat_ablation_ms": concat_ms,
    }


@denormals_flushed()  # as the CLI does
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
    ours = throughput(model, TaskSampler(train, seed=args.seed), args.steps, concat=False)
    concat = throughput(
        build_reward_model(paper, seed=args.seed), TaskSampler(train, seed=args.seed), args.steps, concat=True
    )
    results["train_tasks_per_s"] = ours
    results["train_tasks_per_s_concat_ablation"] = concat
    print(
        "measuring time to accuracy: defaults, then the paper's optimiser (1,000 steps each) ...", flush=True
    )
    runs = {
        "defaults": training_run(train, val, args.seed, {}),
        "paper optimiser": training_run(train, val, args.seed, PAPER_OPTIMISER),
    }
    results["training_runs"] = runs
    print("measuring steps 1-400 against steps 601-1,000, in alternating blocks ...", flush=True)
    results["early_vs_late_steps"] = {
        "defaults": early_vs_late_steps(train, args.seed, {}),
        "paper optimiser": early_vs_late_steps(train, args.seed, PAPER_OPTIMISER),
    }
    print("measuring inference latency ...", flush=True)
    results.update(inference_latency(model, args.seed))
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    rows = [
        (
            "training throughput (tasks/s)",
            f"{ours:,.0f}",
            f"concat-z ablation: {concat:,.0f} ({ours / concat:.2f}x)",
        )
    ]
    for name, run in runs.items():
        label = (
            "lr 1e-3, 50 warm-up steps, cosine, clip 1.0"
            if name == "defaults"
            else "Adam lr 1e-4 constant, no warm-up, no clipping"
        )
        stable = f"{run['stable_wall_s']:.1f}" if run["stable_wall_s"] is not None else "never"
        rows.append(
            (
                f"time to stably >= 0.97 at N^C=10 (s), {name}",
                stable,
                f"{label}; step {run['stable_step']} (first >= 0.97: step {run['first_step']}, "
                f"{run['first_wall_s']:.1f} s); final {run['final_accuracy']:.4f}",
            )
        )
        rows.append(
            (
                f"ms/step, first 400 of 1,000 (mean / median), {name}",
                f"{run['ms_per_step_first_400']:.1f} / {run['ms_per_step_first_400_median']:.1f}",
                f"last 400: {run['ms_per_step_last_400']:.1f} / {run['ms_per_step_last_400_median']:.1f} "
                f"(ratio {run['ms_per_step_last_400'] / run['ms_per_step_first_400']:.2f} / "
                f"{run['ms_per_step_last_400_median'] / run['ms_per_step_first_400_median']:.2f}); "
                "per 100 steps: " + " ".join(f"{v:.0f}" for v in run["ms_per_step_by_window"].values()),
            )
        )
    for name, cmp in results["early_vs_late_steps"].items():
        rows.append(
            (
                f"ms/step, steps 1-400 vs 601-1,000 interleaved, {name}",
                f"{cmp['ms_per_step_first']:.1f}",
                f"steps 601-1,000: {cmp['ms_per_step_last']:.1f} (ratio {cmp['ratio']:.2f}; medians of 16 "
                "alternating 25-step blocks)",
            )
        )
    rows += [
        (
            "personalise from 10 pairs (ms, median of 2,000)",
            f"{results['personalize_ms']:.3f}",
            f"attention encoder; DeepSet-mean encoder: {results['personalize_mean_encoder_ms']:.3f}",
        ),
        (
            "score 10,000 options (ms, median of 100)",
            f"{results['score_10k_ms']:.2f}",
            f"concat-z ablation: {results['score_10k_concat_ablation_ms']:.2f}",
        ),
        ("peak RSS (GB)", f"{results['peak_rss_gb']:.2f}", "this process"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric (this run, this machine)':<{width}}  {'value':>10}  detail")
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:>10}  {detail}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
