"""Resumable training state in safetensors + JSON: model, optimizer, RNG states and counters.

Nothing is pickled. The optimizer's tensors are stored flat (``optim.<param>.<key>``) and its
hyper-parameters as JSON. A checkpoint folder is written to a staging folder and swapped in whole,
so a crash leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerable.errors import SteerableError
from steerable.utils.files import recover_dir, replace_dir_atomic

STATE_NAME = "trainer_state.json"


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Write ``model`` + ``optimizer`` + RNG states + JSON ``state`` to ``directory`` atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(staging / "model.safetensors"),
        )
        optim = optimizer.state_dict()
        tensors, scalars = {}, {}
        for param_id, values in optim["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{param_id}.{key}"] = value
        tensors.update({f"rng.{k}": v.contiguous() for k, v in rng.items()})
        save_file(tensors, str(staging / "optimizer.safetensors"))
        meta = {**state, "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars}}
        (staging / STATE_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        replace_dir_atomic(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Restore ``model`` and ``optimizer`` in place; returns (JSON state, RNG states) or None if absent."""
    if recover_dir(directory) is None:
        return None
    try:
        meta = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise SteerableError(f"{directory}: damaged checkpoint ({exc}); rerun with --overwrite") from None
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["optimizer"]["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    rng = {name[4:]: value for name, value in tensors.items() if name.startswith("rng.")}
    return meta, rng
