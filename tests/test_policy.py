"""NP-DPO policy: block discovery, FiLM identity, reference = base, per-row users, loss, checkpoints,
resume, evaluation and generation — on tiny models built from configs."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from steerable.data.schema import PreferenceData  # noqa: E402
from steerable.errors import ConfigError  # noqa: E402
from steerable.objectives import btl_log_prob, dpo_loss  # noqa: E402
from steerable.policy.blocks import find_attention, find_decoder_blocks, find_mlp  # noqa: E402
from steerable.policy.evaluation import PolicyEvaluator  # noqa: E402
from steerable.policy.generation import SteeredPolicy, generate, interpolate  # noqa: E402
from steerable.policy.model import ConditionalPolicy, PolicyConfig, select_blocks  # noqa: E402
from steerable.policy.sft import tiny_llama, word_tokenizer  # noqa: E402
from steerable.policy.tokens import PolicyTokenizer, collate  # noqa: E402
from steerable.policy.trainer import PolicyTrainConfig, train_policy  # noqa: E402
from steerable.text import synthetic_text as world  # noqa: E402


def _tiny_models():
    t = transformers
    common = dict(vocab_size=64, num_hidden_layers=3)
    return {
        "llama": t.LlamaForCausalLM(
            t.LlamaConfig(
                hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common
            )
        ),
        "qwen2": t.Qwen2ForCausalLM(
            t.Qwen2Config(
                hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common
            )
        ),
        "gpt2": t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4)),
        "gpt_neox": t.GPTNeoXForCausalLM(
            t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, **common)
        ),
        "gemma": t.GemmaForCausalLM(
            t.GemmaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                **common,
            )
        ),
    }


def _sequence_log_probs(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None])[..., 0]


def _policy(base, **kw):
    values = dict(
        base_model="tiny",
        input_dim=6,
        latent_dim=8,
        encoder_hidden=16,
        hyper_hidden=16,
        lora_r=4,
        lora_alpha=8,
    )
    values.update(kw)
    return ConditionalPolicy(PolicyConfig(**values), base)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma"])
def test_fresh_film_is_the_identity_and_reference_is_the_base(family):
    torch.manual_seed(0)
    base = _tiny_models()[family].eval()
    ids = torch.randint(0, 64, (3, 9))
    expected = _sequence_log_probs(base, ids)
    assert len(find_decoder_blocks(base)) == 3
    policy = _policy(base).eval()
    assert len(policy.hooks.modules) == 3
    context = (torch.randn(3, 2, 6), torch.randn(3, 2, 6), torch.ones(3, 2, dtype=torch.bool))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        logps, _ = policy(ids, torch.ones_like(ids), mask, context)
    assert torch.allclose(logps, expected.sum(1), atol=1e-5)
    # train-like perturbation: modulation now changes the output, the reference does not move
    torch.nn.init.normal_(policy.hypernetwork.net[-1].weight, std=0.5)
    for name, p in policy.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        moved, _ = policy(ids, torch.ones_like(ids), mask, context)
    assert (moved - expected.sum(1)).abs().max() > 1e-3
    reference = policy.reference_log_probs(ids, torch.ones_like(ids), mask)
    assert torch.allclose(reference, expected.sum(1), atol=1e-5)


def test_one_copy_of_the_base_weights():
    torch.manual_seed(0)
    base = _tiny_models()["llama"]
    storages = {p.data_ptr() for p in base.parameters()}
    policy = _policy(base)
    base_like = [
        p for n, p in policy.named_parameters() if "lora_" not in n and not n.startswith(("encoder", "hyper"))
    ]
    assert {p.data_ptr() for p in base_like} == storages


ROW_USER = torch.tensor([0, 1, 1, 0])  # a batch of 4 rows from 2 users


def _two_users_log_probs(model, ids, ctx, switched_off=None):
    """Summed log-probs (4,) of ``ids`` (4, T), row r modulated by user ``ROW_USER[r]``'s context (``ctx``
    for 2 users); ``switched_off``: a modulation's hooks disabled for the call."""
    att, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), nullcontext() if switched_off is None else switched_off.disabled():
        return model(ids, att, mask, ctx, ROW_USER)[0]


def _assert_each_row_follows_its_user(model, ids, ctx):
    """The batch of two users gives each row what that user's rows alone give."""
    together = _two_users_log_probs(model, ids, ctx)
    att, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    for u in (0, 1):
        rows = ROW_USER.eq(u).nonzero().flatten()
        with torch.no_grad():
            alone, _ = model(ids[rows], att[rows], mask[rows], tuple(c[u : u + 1] for c in ctx))
        assert torch.allclose(together[rows], alone, atol=1e-5)


def test_each_row_is_modulated_by_its_own_user():
    torch.manual_seed(1)
    policy = _policy(_tiny_models()["llama"]).eval()
    torch.nn.init.normal_(policy.hypernetwork.net[-1].weight, std=0.5)
    ids = torch.randint(0, 64, (4, 7))
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    _assert_each_row_follows_its_user(policy, ids, ctx)


def test_lora_gates_start_as_the_identity_and_give_each_user_its_own_adapters():
    """Conditional adapters: z modulates every LoRA bottleneck of the modulated blocks; fresh gates change
    nothing, trained ones change each row by its own user, the reference ignores them, and they are
    saved and loaded with the rest of the trained weights."""
    torch.manual_seed(2)
    base = _tiny_models()["llama"].eval()
    ids = torch.randint(0, 64, (4, 7))
    expected = _sequence_log_probs(base, ids).sum(1)  # before peft wraps the base in place
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    policy = _policy(base, lora_gates=True).eval()
    assert len(policy.gate_hooks.modules) == 3 * 7  # q, k, v, o, gate, up, down in each of 3 blocks
    assert all(m.out_features == 4 for m in policy.gate_hooks.modules)  # the rank-r bottleneck
    for name, p in policy.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))

    def log_probs(model, gates_on=True):
        return _two_users_log_probs(model, ids, ctx, None if gates_on else model.gate_hooks)

    assert torch.allclose(log_probs(policy), log_probs(policy, gates_on=False), atol=1e-6)
    torch.nn.init.normal_(policy.gate_network.net[-1].weight, std=0.5)
    assert (log_probs(policy) - log_probs(policy, gates_on=False)).abs().max() > 1e-2
    _assert_each_row_follows_its_user(policy, ids, ctx)  # each row by its own user's gates
    reference = policy.reference_log_probs(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    assert torch.allclose(reference, expected, atol=1e-5)
    assert any(k.startswith("gates.") for k in policy.trainable_state_dict())
    same_base = _tiny_models()["llama"].eval()
    same_base.load_state_dict(base_weights)
    fresh = _policy(same_base, lora_gates=True).eval()
    with torch.no_grad():
        fresh.load_trainable_state_dict(policy.trainable_state_dict())
    assert torch.allclose(log_probs(fresh), log_probs(policy), atol=1e-6)
    with pytest.raises(ConfigError, match="lora_gates"):
        PolicyConfig(lora_gates=True, lora_r=0)


def test_unshared_lora_gates_start_shut_off_the_zero_saddle_and_every_adapter_change_follows_z():
    """lora_shared False: the gates are Δγ'(z) ⊙ A x + β'(z), so no adapter change is shared by every user.
    Fresh, the policy is the base model (the gates are shut, B is random), yet the gates get a gradient
    (not the zero saddle); without modulation the adapters are off; trained gates change each row by its
    own user; B is saved and loaded with the rest."""
    torch.manual_seed(5)
    base = _tiny_models()["llama"].eval()
    ids = torch.randint(0, 64, (4, 7))
    expected = _sequence_log_probs(base, ids).sum(1)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    policy = _policy(base, lora_gates=True, lora_shared=False).eval()
    ups = [p for n, p in policy.lm.named_parameters() if "lora_B" in n]
    assert ups and all(p.abs().max() > 0 for p in ups)  # random, not peft's zeros
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(_two_users_log_probs(policy, ids, ctx), expected, atol=1e-5)
    att, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    logps, _ = policy(ids, att, mask, ctx, ROW_USER)
    logps.sum().backward()
    assert policy.gate_network.net[-1].weight.grad.abs().max() > 1e-4  # off the saddle
    policy.zero_grad()
    torch.nn.init.normal_(policy.gate_network.net[-1].weight, std=0.5)
    moved = _two_users_log_probs(policy, ids, ctx)
    assert (moved - expected).abs().max() > 1e-2
    _assert_each_row_follows_its_user(policy, ids, ctx)
    policy.modulate(None)
    with torch.no_grad():
        unmodulated, _ = policy(ids, att, mask)  # no user: the gates are shut, so the base model
    assert torch.allclose(unmodulated, expected, atol=1e-5)
    assert torch.allclose(policy.reference_log_probs(ids, att, mask), expected, atol=1e-5)
    same_base = _tiny_models()["llama"].eval()
    same_base.load_state_dict(base_weights)
    fresh = _policy(same_base, lora_gates=True, lora_shared=False).eval()
    with torch.no_grad():
        fresh.load_trainable_state_dict(policy.trainable_state_dict())
    assert torch.allclose(_two_users_log_probs(fresh, ids, ctx), moved, atol=1e-6)
    with pytest.raises(ConfigError, match="lora_shared"):
        PolicyConfig(lora_shared=False)


@pytest.mark.parametrize("lora_r, shared", [(0, True), (4, True), (4, False)])
def test_identity_empty_context_leaves_users_without_pairs_unmodulated(lora_r, shared):
    """empty_context identity: a user with no context pairs gets no FiLM (and no gates), exactly what the
    policy gives with modulation off (with FiLM only: the base model), while a user with pairs in the same
    batch is still modulated; the hypernetwork stays in the graph (zero gradient) for DDP. The default,
    learned, modulates the empty set by the trained z_∅."""
    torch.manual_seed(4)
    base = _tiny_models()["llama"].eval()
    ids = torch.randint(0, 64, (4, 7))
    expected = _sequence_log_probs(base, ids).sum(1)
    gates = {"lora_gates": True, "lora_shared": shared} if lora_r else {}
    policy = _policy(base, lora_r=lora_r, empty_context="identity", **gates).eval()
    learned = _policy(_tiny_models()["llama"].eval(), lora_r=lora_r, **gates).eval()
    for model in (policy, learned):
        for _, network in model._modulations():
            torch.nn.init.normal_(network.net[-1].weight, std=0.5)
            torch.nn.init.normal_(network.net[-1].bias, std=0.5)  # z_∅ modulates too
    mask = torch.tensor([[True, True, False], [False, False, False]])  # user 1 has no context pairs
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), mask)
    empty_rows = ROW_USER.eq(1)
    with torch.no_grad(), policy.hooks.disabled():
        unmodulated = policy(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))[0]
    both = _two_users_log_probs(policy, ids, ctx)
    assert torch.equal(both[empty_rows], unmodulated[empty_rows])
    assert (both[~empty_rows] - unmodulated[~empty_rows]).abs().min() > 1e-3
    if lora_r == 0 or not shared:  # nothing is left that acts without z: the base model
        assert torch.allclose(both[empty_rows], expected[empty_rows], atol=1e-5)
    with torch.no_grad(), learned.hooks.disabled():
        plain = learned(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))[0]
    assert (_two_users_log_probs(learned, ids, ctx)[empty_rows] - plain[empty_rows]).abs().min() > 1e-3
    empty = (torch.randn(2, 0, 6), torch.randn(2, 0, 6), torch.zeros(2, 0, dtype=torch.bool))
    logps, _ = policy(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), empty, ROW_USER)
    logps.sum().backward()
    grad = policy.hypernetwork.net[-1].weight.grad
    assert grad is not None and grad.abs().max() == 0
    with pytest.raises(ConfigError, match="empty_context"):
        PolicyConfig(empty_context="zero")
    assert PolicyConfig.from_json({"lora_r": 4}).empty_context == "learned"  # configs saved before it


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_film_on_the_mlp_outputs_starts_as_the_identity_and_modulates_each_row_by_its_user(family):
    """film_mlp: a second hypernetwork of z FiLM-modulates each modulated block's MLP output; fresh it
    changes nothing, trained it changes each row by its own user, the reference ignores it, and it is
    saved and loaded with the rest of the trained weights."""
    torch.manual_seed(3)
    base = _tiny_models()[family].eval()
    ids = torch.randint(0, 64, (4, 7))
    expected = _sequence_log_probs(base, ids).sum(1)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    policy = _policy(base, film_mlp=True, blocks="last:2").eval()
    blocks = find_decoder_blocks(policy.causal_lm)
    assert policy.mlp_hooks.modules == [find_mlp(blocks[i]) for i in (1, 2)]
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))

    def log_probs(model, mlp_on=True):
        return _two_users_log_probs(model, ids, ctx, None if mlp_on else model.mlp_hooks)

    assert torch.allclose(log_probs(policy), expected, atol=1e-5)  # fresh: the identity
    torch.nn.init.normal_(policy.mlp_hypernetwork.net[-1].weight, std=0.5)
    assert (log_probs(policy) - log_probs(policy, mlp_on=False)).abs().max() > 1e-2
    assert torch.allclose(log_probs(policy, mlp_on=False), expected, atol=1e-5)  # attention FiLM fresh
    _assert_each_row_follows_its_user(policy, ids, ctx)
    reference = policy.reference_log_probs(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    assert torch.allclose(reference, expected, atol=1e-5)
    assert any(k.startswith("mlp_hypernetwork.") for k in policy.trainable_state_dict())
    same_base = type(base)(base.config).eval()
    same_base.load_state_dict(base_weights)
    fresh = _policy(same_base, film_mlp=True, blocks="last:2").eval()
    with torch.no_grad():
        fresh.load_trainable_state_dict(policy.trainable_state_dict())
    assert torch.allclose(log_probs(fresh), log_probs(policy), atol=1e-6)
    with pytest.raises(ConfigError, match="film_mlp"):
        PolicyConfig(conditional=False, film_mlp=True)


def test_block_selection_and_attention_lookup():
    assert select_blocks("all", 4) == [0, 1, 2, 3]
    assert select_blocks("first:2", 4) == [0, 1]
    assert select_blocks("last:1", 4) == [3]
    assert select_blocks("0,-1", 4) == [0, 3]
    from steerable.errors import ConfigError

    with pytest.raises(ConfigError):
        select_blocks("7", 4)
    block = find_decoder_blocks(_tiny_models()["gpt2"])[0]
    assert find_attention(block) is block.attn
    with pytest.raises(ConfigError):
        find_attention(block, "nope")


def test_dpo_loss_is_btl_on_implicit_rewards_plus_nll():
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    nll = torch.rand(5)
    beta = 0.1
    manual = -btl_log_prob(beta * (pc - rc), beta * (pr - rr)).mean()
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta), manual)
    assert torch.allclose(
        dpo_loss(pc, pr, rc, rr, beta, chosen_nll=nll, nll_weight=0.5), manual + 0.5 * nll.mean()
    )
    # with lengths: Σ NLL / Σ tokens, every token weighted alike (TRL's rpo_alpha term)
    tokens = torch.tensor([2.0, 4.0, 1.0, 3.0, 10.0])
    expected = manual + 0.5 * nll.sum() / tokens.sum()
    assert torch.allclose(
        dpo_loss(pc, pr, rc, rr, beta, chosen_nll=nll, chosen_tokens=tokens, nll_weight=0.5), expected
    )
    # a masked pair counts in neither the DPO term nor the NLL term
    mask = torch.tensor([True, True, True, True, False])
    manual4 = -btl_log_prob(beta * (pc - rc), beta * (pr - rr))[:4].mean()
    got = dpo_loss(pc, pr, rc, rr, beta, mask, chosen_nll=nll, chosen_tokens=tokens, nll_weight=0.5)
    assert torch.allclose(got, manual4 + 0.5 * nll[:4].sum() / tokens[:4].sum())


def test_tokens_mark_exactly_the_response():
    tok = word_tokenizer(world.vocabulary())
    enc = PolicyTokenizer(tok, max_length=32, max_prompt_length=16)
    prompt = enc.prompt_ids("tell me about the red cat")
    response = enc.response_ids("the red cat is calm .", 32)
    assert response[-1] == tok.eos_token_id and tok.decode(response[:-1]) == "the red cat is calm ."
    ids, _att, resp = collate([prompt], [response], enc.pad_id)
    assert resp.sum() == len(response) and ids[0, len(prompt)] == response[0]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny base LM folder and a small synthetic population with random 'embeddings' that encode the
    user's type in their first coordinate (no embedder needed)."""
    folder = tmp_path_factory.mktemp("base")
    tok = word_tokenizer(world.vocabulary())
    lm = tiny_llama(len(tok), hidden=32, layers=2, seed=0)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    train_prompts, _test_prompts = world.split_prompts(0.25, seed=0)
    data, conflict = world.simulate_users(train_prompts, 12, 8, seed=1)
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=(data.num_pairs, 6)).astype(np.float32)
    rejected = rng.normal(size=(data.num_pairs, 6)).astype(np.float32)
    vectors = PreferenceData(
        user_ids=data.user_ids, chosen=chosen, rejected=rejected, hidden_mode=data.hidden_mode
    )
    return folder, data, vectors, conflict


def _build(folder, **kw):
    from steerable.policy.model import load_base_model

    base, tok = load_base_model(str(folder))
    values = dict(
        base_model=str(folder), input_dim=6, latent_dim=8, encoder_hidden=16, hyper_hidden=16, lora_r=4
    )
    values.update(kw)
    return ConditionalPolicy(PolicyConfig(**values), base, tok)


def _train_config(**kw):
    values = dict(
        max_steps=6,
        users_per_batch=2,
        targets_per_user=2,
        max_context=3,
        save_every=2,
        log_every=1,
        max_length=48,
        max_prompt_length=24,
        learning_rate=1e-2,
        warmup_steps=1,
    )
    values.update(kw)
    return PolicyTrainConfig(**values)


def test_training_logs_trl_metrics_and_saves_only_trained_weights(tiny_world, tmp_path):
    folder, data, vectors, _ = tiny_world
    torch.manual_seed(0)
    policy = _build(folder)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    out = tmp_path / "run"
    summary = train_policy(policy, tokens, vectors, _train_config(), out, progress=False)
    assert summary["steps"] == 6
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logratio/chosen",
    ):
        assert name in header
    from safetensors.torch import load_file

    saved = load_file(str(out / "policy.safetensors"))
    assert all(k.startswith(("lora.", "encoder.", "hypernetwork.", "input_")) for k in saved)
    assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in policy.parameters())
    assert json.loads((out / "policy_config.json").read_text())["base_model"] == str(folder)
    # reload: same log-probabilities under the same context
    again = ConditionalPolicy.from_pretrained(out)
    ids = torch.tensor([tokens.prompt[0] + tokens.chosen[0]])
    ctx = (torch.randn(1, 2, 6), torch.randn(1, 2, 6), torch.ones(1, 2, dtype=torch.bool))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        a, _ = policy.eval()(ids, torch.ones_like(ids), mask, ctx)
        b, _ = again(ids, torch.ones_like(ids), mask, ctx)
    assert torch.allclose(a, b, atol=1e-5)


def test_interrupted_training_resumes_to_the_same_weights(tiny_world, tmp_path, monkeypatch):
    folder, data, vectors, _ = tiny_world
    import steerable.policy.trainer as trainer

    def run(out, interrupt_at=None):
        torch.manual_seed(0)
        policy = _build(folder)
        tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
        original = trainer.save_checkpoint

        def save(directory, model, optimizer, rng, state):
            original(directory, model, optimizer, rng, state)
            if interrupt_at is not None and state["step"] == interrupt_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "save_checkpoint", save)
        try:
            return policy, train_policy(policy, tokens, vectors, _train_config(), out, progress=False)
        finally:
            monkeypatch.setattr(trainer, "save_checkpoint", original)

    straight, _ = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupt_at=4)
    torch.manual_seed(123)  # a different global state must not matter: the checkpoint restores it
    resumed, summary = run(tmp_path / "b")
    assert summary["resumed_from"] == 4
    for key, value in straight.trainable_state_dict().items():
        assert torch.allclose(value, resumed.trainable_state_dict()[key], atol=1e-6), key


def test_evaluator_scores_only_targets_and_unconditional_policies_never_flip(tiny_world):
    folder, data, vectors, conflict = tiny_world
    policy = _build(folder, conditional=False)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    evaluator = PolicyEvaluator(policy, tokens, vectors, scored=conflict)
    tasks = evaluator.tasks([0, 2], num_tasks=6, targets=4, seed=0)
    acc = evaluator.accuracy_by_mode(tasks, list(world.TYPES))
    assert set(acc) >= {"all"} and set(acc["all"]) == {"0", "2"}
    assert evaluator.label_swap_flip_rate(tasks[2]) == 0.0
    # context pairs are never scored: mark each task's context pairs; no margin may be one of them
    batches = tasks[2]
    contexts = [{int(p) for p in row if p >= 0} for b in batches for row in b.pair_index[:, : b.num_context]]
    assert any(conflict[p] for c in contexts for p in c)  # a leak would be scored (and seen)
    margins = evaluator.margins(batches)
    assert len(margins.pair) > 0
    assert not [p for p, t in zip(margins.pair, margins.task, strict=True) if int(p) in contexts[int(t)]]


def test_a_share_of_targets_has_its_standard_error_clustered_by_user_and_by_prompt():
    """Two users, each always flips or never: the user-clustered error is the users' spread (0.5), not
    the 4 targets' as if independent (0.29); a prompt that splits every user has no between-prompt
    spread at all."""
    from steerable.policy.evaluation import clustered_share

    flips = np.array([1.0, 1.0, 0.0, 0.0])
    out = clustered_share(flips, users=np.array([0, 0, 1, 1]), prompts=np.array([0, 1, 0, 1]))
    assert out["share"] == 0.5 and out["num_scored"] == 4
    assert out["stderr"] == pytest.approx(0.5)
    assert out["stderr_by_prompt"] == pytest.approx(0.0)
    independent = clustered_share(flips, users=np.array([0, 1, 2, 3]))
    assert independent["stderr"] == pytest.approx(np.sqrt(4 / 3) / 4)
    assert "stderr_by_prompt" not in independent


def test_the_label_swap_splits_its_flips_into_right_for_both_and_wrong_for_both(tiny_world, monkeypatch):
    """Four targets: one right for the user that flips (right for both types), one wrong that flips
    (wrong for both), two that keep their winner; a tie after the swap counts half."""
    from steerable.policy.evaluation import TargetMargins

    folder, data, vectors, _ = tiny_world
    policy = _build(folder)
    evaluator = PolicyEvaluator(policy, PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data), vectors)

    def margins_of(values):
        n = len(values)
        return TargetMargins(np.array(values, float), *(np.arange(n) for _ in range(4)))

    before, after = [1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, 1.0, -1.0]

    def margins(batches, swap_context=False):
        return margins_of(after if swap_context else before)

    monkeypatch.setattr(evaluator, "margins", margins)
    out = evaluator.label_swap([])
    assert out["share"] == 0.5
    assert out["flips_from_right"] == 0.25 and out["flips_from_wrong"] == 0.25
    after[0] = 0.0  # a tie after the swap: still a changed winner, half of it from a right prediction
    out = evaluator.label_swap([])
    assert out["share"] == 0.5 and out["flips_from_right"] == 0.125 and out["flips_from_wrong"] == 0.25


def test_generation_is_seeded_and_steered(tiny_world):
    folder, *_ = tiny_world
    torch.manual_seed(0)
    policy = _build(folder).eval()
    torch.nn.init.normal_(policy.hypernetwork.net[-1].weight, std=2.0)
    prompts = ["tell me about the red cat", "tell me about the old train"]
    a = generate(policy, prompts, None, max_new_tokens=6, seed=3)
    assert a == generate(policy, prompts, None, max_new_tokens=6, seed=3)
    z_a, z_b = torch.randn(8), torch.randn(8)
    assert torch.allclose(interpolate(z_a, z_b, 0.0), z_a) and interpolate(
        z_a, z_b, [0.0, 0.5, 1.0]
    ).shape == (3, 8)
    # greedy decoding: an untrained LM's next-token distributions are nearly flat, so sampling with the
    # same random numbers often picks the same tokens even when the modulation moved the logits
    plain = generate(policy, prompts, None, max_new_tokens=6, temperature=0.0)
    steered = [generate(policy, prompts, z * 50, max_new_tokens=6, temperature=0.0) for z in (z_a, z_b)]
    assert steered[0] != plain or steered[1] != plain
    assert policy.hooks.gamma is None  # modulation is cleared after generating
    steered_policy = SteeredPolicy(policy)
    assert steered_policy.user_embedding([]).shape == (8,)  # learned: z_∅
    policy.config.empty_context = "identity"
    assert steered_policy.user_embedding([]) is None  # what such a policy trains with at N^C = 0


def test_film_only_policy_with_identity_empty_context_samples_the_base_model_without_context(tiny_world):
    """π(y | x, ∅) of a FiLM-only policy with empty_context identity is the base model: the same samples
    as its reference for the same seed, while a user's z still moves them."""
    folder, *_ = tiny_world
    torch.manual_seed(0)
    policy = _build(folder, lora_r=0, empty_context="identity").eval()
    torch.nn.init.normal_(policy.hypernetwork.net[-1].bias, std=2.0)  # z_∅ would modulate if used
    prompts = ["tell me about the red cat", "tell me about the old train"]
    steered = SteeredPolicy(policy)
    no_context = steered.generate_from_embedding(prompts, steered.user_embedding([]), max_new_tokens=6)
    with policy.reference():
        base = generate(policy, prompts, None, max_new_tokens=6)
    assert no_context == base
    z_empty = policy.encode(torch.zeros(1, 0, 6), torch.zeros(1, 0, 6), torch.zeros(1, 0, dtype=torch.bool))
    assert generate(policy, prompts, z_empty[0] * 50, max_new_tokens=6, temperature=0.0) != generate(
        policy, prompts, None, max_new_tokens=6, temperature=0.0
    )


def test_fresh_policy_equals_its_reference_under_bf16(tiny_world, tmp_path):
    """One precision per comparison: with bf16 autocast the reference runs in bf16 too, so the implicit
    rewards of a fresh policy are exactly 0 (an fp32 reference gave |margins| ~ 1e-3)."""
    folder, data, vectors, _ = tiny_world
    torch.manual_seed(0)
    policy = _build(folder)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    config = _train_config(max_steps=1, mixed_precision="bf16", device="cpu", users_per_batch=4)
    summary = train_policy(policy, tokens, vectors, config, tmp_path / "run", progress=False)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert summary["final"][key] == 0.0, key
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["mixed_precision"] == "bf16"


def test_resume_refuses_other_data_and_keeps_the_schedule(tiny_world, tmp_path):
    from steerable.errors import ConfigError
    from steerable.policy.trainer import learning_rate_at

    folder, data, vectors, _ = tiny_world
    tokens = PolicyTokenizer(_build(folder).tokenizer, 48, 24).pairs(data)
    train_policy(_build(folder), tokens, vectors, _train_config(max_steps=4), tmp_path, progress=False)
    other = PreferenceData(
        user_ids=vectors.user_ids,
        chosen=vectors.chosen + 1,
        rejected=vectors.rejected,
        hidden_mode=vectors.hidden_mode,
    )
    with pytest.raises(ConfigError, match="training data"):
        train_policy(_build(folder), tokens, other, _train_config(max_steps=8), tmp_path, progress=False)
    first = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["train_seconds"]
    longer = train_policy(
        _build(folder), tokens, vectors, _train_config(max_steps=8), tmp_path, progress=False
    )
    assert longer["resumed_from"] == 4
    # the time reported for the checkpoint counts the first run's steps too, not only this run's
    assert first > 0 and longer["total_seconds"] == pytest.approx(first + longer["seconds"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[-1]) for r in rows]
    config = _train_config(max_steps=4)
    assert lrs[:4] == pytest.approx([learning_rate_at(s, config) for s in range(4)])
    assert lrs[4:] == pytest.approx([0.1 * config.learning_rate] * 4)  # past the first run's horizon


def test_context_encoder_starts_from_a_trained_np_btl(tiny_world, tmp_path):
    from steerable.errors import ConfigError
    from steerable.models import RewardModelConfig, build_reward_model
    from steerable.training import TrainConfig, train_reward_model

    folder, _data, vectors, _ = tiny_world
    config = RewardModelConfig(model_type="np-btl", input_dim=6, hidden_dim=16, latent_dim=8, num_heads=8)
    train_reward_model(
        build_reward_model(config, seed=0),
        vectors,
        None,
        TrainConfig(max_steps=3, batch_size=4, num_targets=4, max_context=2, val_tasks=8, eval_every=3),
        out_dir=tmp_path / "rm",
    )
    rm = build_reward_model(config, seed=0).from_pretrained(tmp_path / "rm")
    policy = _build(folder, encoder="attention", encoder_hidden=16, latent_dim=8)
    policy.init_encoder_from(tmp_path / "rm")
    ctx = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.allclose(policy.eval().encode(*ctx), rm.encode(*ctx).mean, atol=1e-5)
    with pytest.raises(ConfigError, match="does not match"):
        _build(folder, encoder="mean", encoder_hidden=16, latent_dim=8).init_encoder_from(tmp_path / "rm")


def test_disable_dropout_reaches_the_context_encoders_attention(tiny_world):
    """Training mode with dropout disabled: the (attention) encoder gives the same z twice; its
    nn.MultiheadAttention keeps its dropout as a float, which an nn.Dropout-only switch missed."""
    from steerable.policy.trainer import disable_dropout

    folder, *_ = tiny_world
    policy = _build(folder, encoder="attention", encoder_hidden=16, latent_dim=8)
    disable_dropout(policy)
    policy.train()
    ctx = (torch.randn(4, 5, 6), torch.randn(4, 5, 6), torch.ones(4, 5, dtype=torch.bool))
    ctx[2][:, 3:] = False  # padded sets take the masked attention path
    with torch.no_grad():
        assert torch.equal(policy.encode(*ctx), policy.encode(*ctx))


def _scripted_scores(monkeypatch, scores):
    """Validation accuracies in the order the selector asks for them (the real scores of a tiny policy
    rarely peak before the last step)."""
    import steerable.policy.selection as selection

    queue = list(scores)
    monkeypatch.setattr(selection, "balanced_accuracy", lambda margins: queue.pop(0))


def test_checkpoint_selection_saves_the_best_validation_step(tiny_world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import steerable.policy.trainer as trainer

    folder, data, vectors, _ = tiny_world
    policy = _build(folder)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    weights_at: dict[int, dict[str, torch.Tensor]] = {}
    original = trainer.save_checkpoint

    def save(directory, model, optimizer, rng, state):
        weights_at[state["step"]] = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        original(directory, model, optimizer, rng, state)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    _scripted_scores(monkeypatch, [0.5, 0.9, 0.7])  # steps 2, 4, 6
    out = tmp_path / "run"
    summary = train_policy(
        policy,
        tokens,
        vectors,
        _train_config(validate_every=2),
        out,
        progress=False,
        validation=(tokens, vectors),
    )
    assert [row["step"] for row in summary["selection"]["history"]] == [2, 4, 6]
    assert summary["selection"]["best_step"] == 4
    saved = load_file(str(out / "policy.safetensors"))
    for key, value in weights_at[4].items():
        assert torch.equal(saved[key], value), key
    assert any(not torch.equal(weights_at[6][k], weights_at[4][k]) for k in weights_at[4])
    # the checkpoint keeps the last step (a longer run continues from there), and the best step's copy
    last = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(last[k], weights_at[6][k]) for k in weights_at[6])
    assert all(torch.equal(last["best." + k], weights_at[4][k]) for k in weights_at[4])
    assert json.loads((out / "train_config.json").read_text())["selection"]["best_step"] == 4
    with pytest.raises(ConfigError, match="validation"):
        train_policy(_build(folder), tokens, vectors, _train_config(validate_every=2), None, progress=False)


def test_a_resumed_run_keeps_the_best_step_of_the_runs_before_it(tiny_world, tmp_path, monkeypatch):
    import steerable.policy.trainer as trainer

    folder, data, vectors, _ = tiny_world
    tokens = PolicyTokenizer(_build(folder).tokenizer, 48, 24).pairs(data)
    config = _train_config(validate_every=2)

    def run(out, scores, interrupt_at=None):
        torch.manual_seed(0)
        policy = _build(folder)
        _scripted_scores(monkeypatch, scores)
        original = trainer.save_checkpoint

        def save(directory, model, optimizer, rng, state):
            original(directory, model, optimizer, rng, state)
            if state["step"] == interrupt_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "save_checkpoint", save)
        try:
            return policy, train_policy(
                policy, tokens, vectors, config, out, False, validation=(tokens, vectors)
            )
        finally:
            monkeypatch.setattr(trainer, "save_checkpoint", original)

    straight, expected = run(tmp_path / "a", [0.5, 0.9, 0.7])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [0.5, 0.9], interrupt_at=4)
    resumed, summary = run(tmp_path / "b", [0.7])  # only step 6 is scored again
    assert summary["selection"] == expected["selection"]
    for key, value in straight.trainable_state_dict().items():
        assert torch.allclose(value, resumed.trainable_state_dict()[key], atol=1e-6), key


def test_selection_scores_are_the_policys_validation_accuracy(tiny_world, tmp_path):
    """Unscripted: the saved policy, scored again on the same validation tasks, gets the best score."""
    from steerable.policy.selection import CheckpointSelector

    folder, data, vectors, _ = tiny_world
    policy = _build(folder)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    config = _train_config(validate_every=3)
    summary = train_policy(
        policy, tokens, vectors, config, tmp_path, progress=False, validation=(tokens, vectors)
    )
    selection = summary["selection"]
    assert [row["step"] for row in selection["history"]] == [3, 6]
    assert selection["best_accuracy"] == max(row["accuracy"] for row in selection["history"])
    again = CheckpointSelector(
        ConditionalPolicy.from_pretrained(tmp_path),
        tokens,
        vectors,
        context=config.max_context,
        num_tasks=config.val_tasks,
        targets=config.val_targets,
        beta=config.beta,
        seed=config.seed * 1000 + 3,
        autocast=nullcontext,
        prefix_cache=None,
    )
    again.validate(0)
    assert again.history[0]["accuracy"] == pytest.approx(selection["best_accuracy"], abs=1e-6)


def test_accuracy_table_gives_a_standard_error_clustered_by_prompt(tiny_world):
    """The users of a split share its prompts: the table adds the error clustered by prompt."""
    from steerable.evaluation import clustered_stderr
    from steerable.objectives import prediction_hits

    folder, data, vectors, _ = tiny_world
    prompts = np.array([str(p) for p in data.prompts], dtype=object)
    with_prompts = PreferenceData(
        user_ids=vectors.user_ids,
        chosen=vectors.chosen,
        rejected=vectors.rejected,
        hidden_mode=vectors.hidden_mode,
        prompts=prompts,
    )
    policy = _build(folder)
    torch.nn.init.normal_(policy.hypernetwork.net[-1].weight, std=2.0)  # margins that are not all zero
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    evaluator = PolicyEvaluator(policy, tokens, with_prompts)
    tasks = evaluator.tasks([2], num_tasks=12, targets=4, seed=0)
    row = evaluator.accuracy_table(tasks)["all"]["2"]
    m = evaluator.margins(tasks[2])
    hits = prediction_hits(m.margin)
    _, by_prompt = np.unique(prompts[m.pair].astype(str), return_inverse=True)
    assert row["num_prompts"] == len(np.unique(by_prompt)) > 2
    assert row["stderr_by_prompt"] == pytest.approx(clustered_stderr(hits, np.ones_like(hits), by_prompt))
    assert row["stderr"] == pytest.approx(clustered_stderr(hits, np.ones_like(hits), m.user))
    assert (
        "stderr_by_prompt" not in PolicyEvaluator(policy, tokens, vectors).accuracy_table(tasks)["all"]["2"]
    )


def test_a_moved_np_btl_folder_still_resumes_but_other_weights_do_not(tiny_world, tmp_path):
    import shutil

    from steerable.errors import ConfigError
    from steerable.models import RewardModelConfig, build_reward_model
    from steerable.training import TrainConfig, train_reward_model

    folder, data, vectors, _ = tiny_world
    config = RewardModelConfig(model_type="np-btl", input_dim=6, hidden_dim=16, latent_dim=8, num_heads=8)
    for name, seed in (("rm", 0), ("other", 1)):
        train_reward_model(
            build_reward_model(config, seed=seed),
            vectors,
            None,
            TrainConfig(max_steps=2, batch_size=4, num_targets=4, max_context=2, val_tasks=8, eval_every=2),
            out_dir=tmp_path / name,
        )
    shutil.copytree(tmp_path / "rm", tmp_path / "moved")
    tokens = PolicyTokenizer(_build(folder).tokenizer, 48, 24).pairs(data)

    def run(encoder_from: str, steps: int):
        policy = _build(folder, encoder="attention", encoder_hidden=16, latent_dim=8)
        settings = _train_config(max_steps=steps, init_encoder=str(tmp_path / encoder_from))
        return train_policy(policy, tokens, vectors, settings, tmp_path / "run", progress=False)

    run("rm", 2)
    assert run("moved", 4)["resumed_from"] == 2
    with pytest.raises(ConfigError, match="init_encoder"):
        run("other", 6)


def test_a_mirror_user_is_trained_on_the_same_pairs_with_every_label_swapped(tiny_world, tmp_path):
    """``mirror_users``: the terms of a task's mirror are those of a user whose context and target pairs
    have chosen and rejected exchanged (checked against a batch built that way by hand)."""
    from steerable.policy.tokens import TokenizedPairs, pair_batch
    from steerable.policy.trainer import mirror_context, mirror_terms, step_terms

    folder, data, vectors, _ = tiny_world
    torch.manual_seed(0)
    policy = _build(folder, lora_gates=True).eval()
    for net in (policy.hypernetwork.net[-1], policy.gate_network.net[-1]):
        torch.nn.init.normal_(net.weight, std=0.5)  # so that a context matters
    for name, p in policy.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    tokens = PolicyTokenizer(policy.tokenizer, 48, 24).pairs(data)
    swapped = TokenizedPairs(tokens.prompt, tokens.rejected, tokens.chosen)
    pad = policy.tokenizer.pad_token_id
    rows = [[0, 1], [5]]
    real = 3
    context = (torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    with torch.no_grad():
        both = pair_batch(tokens, rows + rows, pad, "cpu")
        mirrored = mirror_terms(step_terms(policy, policy, both, mirror_context(context)), real)
        own = step_terms(policy, policy, pair_batch(tokens, rows, pad, "cpu"), context)
        by_hand = step_terms(
            policy, policy, pair_batch(swapped, rows, pad, "cpu"), (context[1], context[0], context[2])
        )
    for key in ("policy_chosen", "policy_rejected", "reference_chosen", "chosen_tokens"):
        assert torch.allclose(mirrored[key][:real], own[key], atol=1e-5), key
        assert torch.allclose(mirrored[key][real:], by_hand[key], atol=1e-5), key
    # the mirror's preference is the real user's reversed only through z: its margin is not simply negated
    margin = mirrored["policy_chosen"] - mirrored["policy_rejected"]
    assert not torch.allclose(margin[real:], -margin[:real], atol=1e-3)
    # a BTL-DPO policy has no context to mirror
    with pytest.raises(ConfigError, match="mirror_users"):
        train_policy(
            _build(folder, conditional=False),
            tokens,
            vectors,
            _train_config(mirror_users=True),
            tmp_path / "btl",
            progress=False,
        )
    summary = train_policy(
        _build(folder),
        tokens,
        vectors,
        _train_config(mirror_users=True, max_steps=2),
        tmp_path / "np",
        progress=False,
    )
    assert summary["steps"] == 2
