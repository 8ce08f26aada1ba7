"""Prompt + response token ids for policy training, evaluation and generation.

The prompt is rendered with the tokenizer's chat template and the generation prompt (the assistant
header) when the tokenizer has a template; otherwise its messages' contents are joined by blank lines,
followed by a blank line, with the tokenizer's own special tokens (e.g. BOS). The response is the
completion's text followed by the EOS token (SEP for tokenizers without one), tokenized on its own, so
the boundary between prompt and response is exact. Prompts are cut from the left and responses from the
right to fit the limits (``max_length`` for both, ``max_prompt_length``, and ``max_response_length``, as
TRL's ``max_completion_length``); a cut response has no EOS (it goes on). Cuts are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerable.data.text import Message, TextPreferences


@dataclass
class TokenizedPairs:
    """Token ids of every pair's prompt, chosen and rejected response (lists indexed by pair)."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated: int = 0  # sequences cut to fit the limits
    meta: dict[str, Any] = field(default_factory=dict)

    def select_rows(self, rows: Sequence[int] | np.ndarray) -> TokenizedPairs:
        """The pairs ``rows`` (as :meth:`PreferenceData.select_rows` picks the same pairs' embeddings)."""
        pick = lambda seqs: [seqs[int(i)] for i in rows]  # noqa: E731
        return TokenizedPairs(pick(self.prompt), pick(self.chosen), pick(self.rejected))


class PolicyTokenizer:
    """Turns prompts and responses into ids (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        max_prompt_length: int = 128,
        max_response_length: int | None = None,
    ) -> None:
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})"
            )
        if max_response_length is not None and max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.max_response_length = max_response_length
        # a response ends with EOS; encoder-style tokenizers (e.g. BERT's) have [SEP] instead
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has neither an EOS nor a SEP token; responses need an end")
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad
        self.truncated = 0
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, messages: list[Message] | str) -> list[int]:
        """Ids of a prompt (messages or a string), ready for the response to follow."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        key = repr(messages)
        if key not in self._prompts:
            tok = self.tokenizer
            if not messages:
                start = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
                ids = [start]
            elif getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                text = "\n\n".join(m["content"] for m in messages) + "\n\n"
                ids = tok(text)["input_ids"]
            if len(ids) > self.max_prompt_length:
                ids = ids[-self.max_prompt_length :]
                self.truncated += 1
            self._prompts[key] = list(ids)
        return self._prompts[key]

    def response_ids(self, messages: list[Message] | str, room: int) -> list[int]:
        """Ids of a response followed by EOS, cut to ``room`` tokens."""
        text = messages if isinstance(messages, str) else "\n\n".join(m["content"] for m in messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        if len(ids) > room:
            ids = ids[:room]
            self.truncated += 1
        return ids

    def pairs(self, data: TextPreferences) -> TokenizedPairs:
        """Tokenize every pair of ``data``."""
        start = self.truncated
        prompts, chosen, rejected = [], [], []
        for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True):
            ids = self.prompt_ids(p)
            room = self.max_length - len(ids)
            if self.max_response_length is not None:
                room = min(room, self.max_response_length)
            prompts.append(ids)
            chosen.append(self.response_ids(c, room))
            rejected.append(self.response_ids(r, room))
        return TokenizedPairs(prompts, chosen, rejected, truncated=self.truncated - start)


def collate(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (R, T) input ids, attention mask and response mask (the response's tokens)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    response = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        response[i, len(p) : len(p) + len(r)] = True
    return ids.to(device), attention.to(device), response.to(device)


@dataclass
class PairBatch:
    """The sequences of some pairs: chosen rows then rejected rows, and the users they belong to."""

    input_ids: Tensor  # (2·pairs, T)
    attention_mask: Tensor  # (2·pairs, T)
    response_mask: Tensor  # (2·pairs, T) bool: the response's tokens
    rows_per_user: Tensor  # (B,) pairs per user (rows of each half)
    num_pairs: int


def pair_batch(tokens: TokenizedPairs, pair_rows: list[list[int]], pad_id: int, device: Any) -> PairBatch:
    """Sequences for the given pairs of each user: [chosen of all pairs] + [rejected of all pairs]."""
    flat = [i for rows in pair_rows for i in rows]
    prompts = [tokens.prompt[i] for i in flat] * 2
    responses = [tokens.chosen[i] for i in flat] + [tokens.rejected[i] for i in flat]
    ids, attention, response = collate(prompts, responses, pad_id, device)
    counts = torch.tensor([len(r) for r in pair_rows], device=device)
    return PairBatch(ids, attention, response, counts, len(flat))
