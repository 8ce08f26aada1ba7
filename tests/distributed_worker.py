"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2``: trains a tiny reward model or
policy through the library, recording in ``OUT/rank<r>.json`` what this process saw — the tasks it
sampled, which process wrote checkpoints — and a checksum of its parameters after training.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py reward OUT [KILL_AT]
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py policy OUT BASE_FOLDER
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py encoder OUT

``encoder``: one DDP step per process with N^C = 0 in process 0 and N^C = 3 in process 1 (NP-BTL and the
policy's set encoder), which must not fail and must leave the processes' parameters equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def record_sampler(log: list) -> None:
    """Wrap TaskSampler.sample to log (N^C, users) of every batch this process draws."""
    from steerable.data import sampler

    original = sampler.TaskSampler.sample

    def sample(self, num_context=None, batch_size=None):
        batch = original(self, num_context, batch_size)
        log.append([int(batch.num_context), batch.user_index.tolist()])
        return batch

    sampler.TaskSampler.sample = sample


def record_checkpoints(module, writers: list) -> None:
    original = module.save_checkpoint

    def save(*args, **kwargs):
        writers.append(int(os.environ.get("RANK", "0")))
        return original(*args, **kwargs)

    module.save_checkpoint = save


def reward(out: Path, kill_at: int | None = None) -> dict:
    import steerable.training as training
    from steerable.data.simulate import attribute_population, simulate
    from steerable.models.base import RewardModelConfig
    from steerable.models.registry import build_reward_model

    samples, writers = [], []
    record_sampler(samples)
    record_checkpoints(training, writers)
    pop = attribute_population(2)
    train, val = simulate(pop, 40, 16, seed=0), simulate(pop, 10, 16, seed=1)
    config = RewardModelConfig(
        model_type="np-btl", input_dim=train.dim, hidden_dim=16, latent_dim=8, num_heads=2
    )
    model = build_reward_model(config, seed=0)
    train_config = training.TrainConfig(
        max_steps=12, batch_size=8, eval_every=4, val_tasks=22, warmup_steps=1, num_targets=8, max_context=4
    )
    callbacks = ()
    if kill_at is not None:  # a crash mid-run: process 0 is killed, torchrun stops the other

        def die(step, row, model):
            if step == kill_at and int(os.environ["RANK"]) == 0:
                os.kill(os.getpid(), 9)  # torchrun then stops the other process
            return False

        callbacks = (die,)
    result = training.train_reward_model(
        model, train, val, train_config, out_dir=out / "run", progress=False, callbacks=callbacks
    )
    # the last weights (every process trained them) and the selected best model
    return {
        "samples": samples,
        "checkpoint_writers": writers,
        "params": checksum(model.state_dict()),
        "best": checksum(result.model.state_dict()),
    }


def policy(out: Path, base_folder: str) -> dict:
    import steerable.policy.trainer as trainer
    from steerable.data.schema import PreferenceData
    from steerable.policy.model import ConditionalPolicy, PolicyConfig, load_base_model
    from steerable.policy.tokens import PolicyTokenizer
    from steerable.text import synthetic_text as world

    samples, writers = [], []
    record_sampler(samples)
    record_checkpoints(trainer, writers)
    prompts, _ = world.split_prompts(0.25, seed=0)
    data, _ = world.simulate_users(prompts, 12, 8, seed=1)
    rng = np.random.default_rng(0)
    vectors = PreferenceData(
        user_ids=data.user_ids,
        chosen=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        rejected=rng.normal(size=(data.num_pairs, 6)).astype(np.float32),
        hidden_mode=data.hidden_mode,
    )
    base, tok = load_base_model(base_folder)
    torch.manual_seed(0)
    config = PolicyConfig(
        base_model=base_folder, input_dim=6, latent_dim=8, encoder_hidden=16, hyper_hidden=16, lora_r=4
    )
    model = ConditionalPolicy(config, base, tok)
    tokens = PolicyTokenizer(tok, 48, 24).pairs(data)
    train_config = trainer.PolicyTrainConfig(
        max_steps=6,
        users_per_batch=4,
        targets_per_user=1,
        min_context=0,
        max_context=2,
        save_every=3,
        log_every=1,
        max_length=48,
        max_prompt_length=24,
        learning_rate=1e-2,
        warmup_steps=1,
    )
    trainer.train_policy(model, tokens, vectors, train_config, out / "run", progress=False)
    return {
        "samples": samples,
        "checkpoint_writers": writers,
        "params": checksum(model.trainable_state_dict()),
    }


def encoder(out: Path) -> dict:
    """N^C = 0 in process 0, 3 in process 1, through DDP (find_unused_parameters=False)."""
    from accelerate.utils import DistributedDataParallelKwargs  # noqa: F401  (accelerate's default is used)

    from steerable.models.base import RewardModelConfig
    from steerable.models.encoders import SetEncoder
    from steerable.models.registry import build_reward_model
    from steerable.training import PreferenceObjective
    from steerable.utils.distributed import make_accelerator

    accelerator = make_accelerator("cpu")
    rank = accelerator.process_index
    nc = 0 if rank == 0 else 3
    g = torch.Generator().manual_seed(rank)
    found = {}
    for name, kind in (("np-btl", "attention"), ("policy-encoder", "mean")):
        torch.manual_seed(0)
        if name == "np-btl":
            config = RewardModelConfig(
                model_type="np-btl", input_dim=2, hidden_dim=16, latent_dim=8, num_heads=2
            )
            module = PreferenceObjective(build_reward_model(config, seed=0))
        else:
            module = SetEncoder(2, 16, 8, kind=kind)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        wrapped, optimizer = accelerator.prepare(module, optimizer)
        for _ in range(2):
            chosen, rejected = torch.randn(4, nc, 2, generator=g), torch.randn(4, nc, 2, generator=g)
            mask = torch.ones(4, nc, dtype=torch.bool)
            if name == "np-btl":
                from steerable.data.sampler import make_task_batch

                targets = torch.randn(4, 5, 2, generator=g), torch.randn(4, 5, 2, generator=g)
                loss = wrapped(make_task_batch(chosen, rejected, *targets, context_mask=mask))
            else:
                loss = wrapped(chosen, rejected, mask).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        found[name] = checksum(dict(accelerator.unwrap_model(wrapped).named_parameters()))
    return {"params": found, "num_processes": accelerator.num_processes}


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        "reward": lambda: reward(out, int(sys.argv[3]) if len(sys.argv) > 3 else None),
        "policy": lambda: policy(out, sys.argv[3]),
        "encoder": lambda: encoder(out),
    }
    result = runs[mode]()
    rank = int(os.environ.get("RANK", "0"))
    result["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    from steerable.utils.distributed import end_processes

    end_processes()  # as the CLI does: a process exiting with its gloo group up can abort
