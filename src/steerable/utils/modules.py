"""Module state helpers: run a model in eval mode without leaving it there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: object) -> Iterator[None]:
    """Put every ``nn.Module`` among ``modules`` (other objects are ignored) in eval mode for the block,
    then restore each submodule's own ``training`` flag exactly as the caller had it."""
    switched = [
        m for module in modules if isinstance(module, nn.Module) for m in module.modules() if m.training
    ]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True
