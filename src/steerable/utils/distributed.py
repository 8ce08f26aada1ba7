"""One process or several: the accelerator every trainer uses, which process writes, and RNG states.

Every trainer runs through accelerate: one process by default; ``torchrun`` or ``accelerate launch``
for several processes, GPUs or machines. On a CPU the process state is created with ``cpu=True``, the
only way ``torchrun --nproc_per_node N`` gives a real gloo process group (plain ``Accelerator()`` on a
CPU silently runs every rank alone). The process state is created once per process
(:func:`process_state`) and every later accelerator shares it.

``device``: ``auto`` (a GPU when there is one, else the CPU), ``cpu`` or ``cuda`` (the process's GPU,
``cuda:<local rank>`` under a launcher).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from steerable.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "no", "bf16", "fp16")


def uses_cpu(device: str) -> bool:
    """Whether ``device`` (auto | cpu | cuda) means the CPU on this machine."""
    if device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if device == "auto":
        return not torch.cuda.is_available()
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA device is available (use --device cpu or auto)")
        return False
    raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")


def process_state(device: str = "auto") -> Any:
    """accelerate's ``PartialState`` of this process (created on first use, then shared)."""
    from accelerate import PartialState

    if PartialState._shared_state:  # already created, by us or by the caller's own accelerator
        return PartialState()
    return PartialState(cpu=uses_cpu(device))


def is_main_process() -> bool:
    """True in the process that writes files (the only process when not launched in parallel)."""
    return bool(process_state().is_main_process)


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, full precision otherwise."""
    if choice not in PRECISIONS:
        raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(device: str = "auto", mixed_precision: str = "no", grad_accum: int = 1) -> Any:
    """An ``Accelerator`` on ``device`` with the given precision (auto | no | bf16 | fp16).

    Precision is a property of each training run, not of the process: an earlier run's settings in the
    same process (a study that trains several models, a test session) are reset, the process group kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cpu = uses_cpu(device)
    state = process_state(device)
    if cpu and state.device.type != "cpu":
        raise ConfigError(
            f"this process already runs on {state.device}; a CPU run needs its own process "
            "(or ACCELERATE_USE_CPU=1)"
        )
    precision = resolve_precision(mixed_precision, state.device)
    if precision == "fp16" and state.device.type == "cpu":
        raise ConfigError("fp16 mixed precision needs a GPU; on a CPU use bf16 or no")
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=grad_accum)


def end_processes() -> None:
    """Shut this process's process group down, if it has one (the last call of a launched process).

    Without it a launched process can abort as it exits ("terminate called without an active
    exception", SIGABRT, about one run in ten on 2 busy cores): a gloo thread still releasing the last
    collective needs the GIL while the interpreter finalizes (cpython#87135). Collecting the DDP wrappers
    left in reference cycles and destroying the group first lets that thread finish while Python runs.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # a single process: nothing to shut down (and no collection on every CLI exit)
    import gc

    from accelerate import PartialState

    gc.collect()
    PartialState().destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A seed per process: ``seed`` itself in process 0 (a single process reproduces earlier runs)."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def rng_states(sampler_states: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the sampler's, torch's CPU generator and (on a GPU) CUDA's."""
    states = {**sampler_states, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def gather_rng_states(accelerator: Any, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's RNG states, keyed ``name`` (one process) or ``name.rank`` (several).

    A collective call: every process must make it."""
    if accelerator.num_processes == 1:
        return states
    from accelerate.utils import gather_object

    mine = {k: v.cpu().numpy().tobytes() for k, v in states.items()}
    everyone = gather_object([mine])
    return {
        f"{name}.{rank}": torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        for rank, entry in enumerate(everyone)
        for name, blob in entry.items()
    }


def restore_rng_states(
    saved: dict[str, torch.Tensor], accelerator: Any, sampler: Any, device: torch.device
) -> None:
    """Inverse of :func:`gather_rng_states` for this process: sampler, torch and CUDA generators."""
    if accelerator.num_processes == 1:
        mine = saved
    else:
        suffix = f".{accelerator.process_index}"
        mine = {k[: -len(suffix)]: v for k, v in saved.items() if k.endswith(suffix)}
    sampler.set_state({k: v for k, v in mine.items() if k.startswith("sampler")})
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)
