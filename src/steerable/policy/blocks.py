"""Find the decoder blocks of any Hugging Face causal LM, and each block's self-attention module.

No model family's attribute names are hard-coded as the only way: the blocks are the longest
``nn.ModuleList`` whose entries all have the same class and whose length is the config's layer count
(``num_hidden_layers`` / ``n_layer``) when the config states one — this finds ``model.layers`` (Llama,
Qwen2, Gemma, Mistral, Phi), ``transformer.h`` (GPT-2, GPT-J, Falcon, BLOOM) and ``gpt_neox.layers``
alike, also under a peft wrapper. A block's attention is its direct child named like an attention
module (``self_attn``, ``attn``, ``attention``, ``self_attention``, …); ``attention_name`` overrides
the guess for unusual architectures. Its MLP (feed-forward) child is found the same way (``mlp``,
``feed_forward``, ``ffn``; ``mlp_name`` overrides).
"""

from __future__ import annotations

import re

from torch import nn

from steerable.errors import ConfigError

ATTENTION_NAME = re.compile(r"(^|_)(self_?)?att(n|ention)$", re.IGNORECASE)
MLP_NAME = re.compile(r"(^|_)(mlp|ffn|feed_?forward)$", re.IGNORECASE)


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks in order (see the module docstring)."""
    return list(model.get_submodule(block_list_name(model)))


def block_list_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the list of decoder blocks and the attribute it is held under."""
    name = block_list_name(model)
    parent, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attribute


def block_list_name(model: nn.Module) -> str:
    """Dotted name of the ``nn.ModuleList`` of decoder blocks (see the module docstring)."""
    expected = _layer_count(model)
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                candidates.append((len(module), name, module))
    if expected is not None:
        exact = [c for c in candidates if c[0] == expected]
        if exact:
            candidates = exact
    if not candidates:
        raise ConfigError(f"{type(model).__name__}: found no list of decoder blocks to modulate")
    candidates.sort(key=lambda c: (-c[0], c[1].count(".")))
    return candidates[0][1]


def find_attention(block: nn.Module, attention_name: str | None = None) -> nn.Module:
    """The self-attention module of one decoder block (see the module docstring)."""
    return _find_child(block, ATTENTION_NAME, "attention", attention_name)


def find_mlp(block: nn.Module, mlp_name: str | None = None) -> nn.Module:
    """The MLP (feed-forward) module of one decoder block (see the module docstring)."""
    return _find_child(block, MLP_NAME, "mlp", mlp_name)


def _find_child(block: nn.Module, pattern: re.Pattern, kind: str, name: str | None) -> nn.Module:
    children = dict(block.named_children())
    if name is not None:
        if name not in children:
            raise ConfigError(
                f"{type(block).__name__} has no child {name!r} (children: {', '.join(children)})"
            )
        return children[name]
    matches = [n for n in children if pattern.search(n) and "cross" not in n.lower()]
    if len(matches) != 1:
        raise ConfigError(
            f"cannot tell the {kind} module of {type(block).__name__} (children: {', '.join(children)}); "
            f"name it with {kind}_name"
        )
    return children[matches[0]]
