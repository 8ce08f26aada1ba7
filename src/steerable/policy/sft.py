"""Supervised fine-tuning of a causal LM on (prompt, response) examples: the loss is the responses'
token NLL, prompts rendered as in DPO (:class:`~steerable.policy.tokens.PolicyTokenizer`). Used to fit a
small base model to a response distribution before preference training; also a word-level tokenizer and
a tiny Llama built from a config, for studies and tests that must run on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from steerable.policy.tokens import PolicyTokenizer, collate

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
SIMPLE_CHAT_TEMPLATE = (
    "[BOS]{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def word_tokenizer(words: list[str]) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``words`` with a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "[SEP]", "user", "assistant", "system", ":"])}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Any:
    """A randomly initialised small ``LlamaForCausalLM`` (no files needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def fit_language_model(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """SFT: minimise the responses' token NLL given their prompts; returns the loss per step."""
    encoder = PolicyTokenizer(tokenizer, max_length=256, max_prompt_length=128)
    prompt_ids = [encoder.prompt_ids(p) for p in prompts]
    response_ids = [encoder.response_ids(r, 256 - len(p)) for p, r in zip(prompt_ids, responses, strict=True)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="fit base LM", disable=not progress):
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = learning_rate * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        pick = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        ids, attention, response = collate(
            [prompt_ids[i] for i in pick], [response_ids[i] for i in pick], encoder.pad_id, device
        )
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        mask = response[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
