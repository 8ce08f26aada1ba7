"""Reward models: shapes, empty contexts, invariances, fast inference path, save/load, gradient flow."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from steerable.data import TaskSampler
from steerable.models import build_reward_model, load_reward_model
from steerable.models.base import RewardModel
from steerable.objectives import preference_loss

MODEL_TYPES = ["btl", "dpl", "np-btl", "vnp-btl"]
NP_VARIANTS = [("np-btl", "attention"), ("np-btl", "mean"), ("vnp-btl", "attention"), ("vnp-btl", "mean")]


@pytest.fixture(scope="module")
def batch(step_data):
    _, train, _ = step_data
    return TaskSampler(train, 0, 6, 12, batch_size=8, seed=0).sample(num_context=4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_shapes_and_probabilities_sum_to_one(model_type, batch):
    model = build_reward_model(tiny_config(model_type), seed=0).eval()
    out = model(batch)
    assert out.log_prob_chosen.shape == (8, 12)
    torch.testing.assert_close(out.log_prob_chosen.exp() + out.log_prob_rejected.exp(), torch.ones(8, 12))


@pytest.mark.parametrize("model_type, encoder", NP_VARIANTS)
def test_empty_context_is_finite_and_learnable(model_type, encoder, step_data):
    _, train, _ = step_data
    batch = TaskSampler(train, 0, 4, 12, batch_size=4, seed=0).sample(num_context=0)
    model = build_reward_model(tiny_config(model_type, encoder=encoder), seed=0)
    out = model.training_output(batch)
    assert torch.isfinite(out.log_prob_chosen).all()
    preference_loss(out.log_prob_chosen, batch.target_mask, out.kl).backward()
    assert model.encoder.empty_set.grad is not None and model.encoder.empty_set.grad.abs().sum() > 0
    # one padded context slot per task, all masked: same as no context at all
    pad = torch.zeros(4, 1, 1)
    z_empty = model.encode(pad[:, :0], pad[:, :0], torch.zeros(4, 0, dtype=torch.bool)).mean
    z_masked = model.encode(pad, pad, torch.zeros(4, 1, dtype=torch.bool)).mean
    torch.testing.assert_close(z_empty, z_masked)


@pytest.mark.parametrize("encoder", ["attention", "mean"])
def test_encoder_is_permutation_invariant_and_ignores_padding(encoder, batch):
    model = build_reward_model(tiny_config("np-btl", encoder=encoder), seed=0).eval()
    c, r, m = batch.context_chosen, batch.context_rejected, batch.context_mask
    z = model.encode(c, r, m).mean
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model.encode(c[:, perm], r[:, perm], m[:, perm]).mean, z, atol=1e-5, rtol=1e-5)
    noise = torch.randn(8, 3, 1)
    padded = model.encode(
        torch.cat([c, noise], 1),
        torch.cat([r, noise], 1),
        torch.cat([m, torch.zeros(8, 3, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(padded.mean, z, atol=1e-5, rtol=1e-5)


def test_context_changes_the_np_prediction(batch):
    model = build_reward_model(tiny_config("np-btl"), seed=0).eval()
    with_context = model(batch).log_prob_chosen
    batch_no_ctx = type(batch)(**{**batch.__dict__, "context_mask": torch.zeros_like(batch.context_mask)})
    assert not torch.allclose(with_context, model(batch_no_ctx).log_prob_chosen)


STEP_CASES = [(m, {}) for m in MODEL_TYPES] + [("vnp-btl", {"vnp_objective": "ml"})]


@pytest.mark.parametrize("model_type, extra", STEP_CASES)
def test_every_parameter_changes_after_one_step(model_type, extra, batch):
    model = build_reward_model(tiny_config(model_type, dropout=0.0, **extra), seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model.training_output(batch)
    preference_loss(out.log_prob_chosen, batch.target_mask, out.kl).backward()
    opt.step()
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    # Not expected to move: the empty-set vector (it learns from tasks without context) and the reward
    # head's final bias (a constant shift of every reward cancels in r(y1) - r(y2), so its gradient is 0).
    exempt = {"encoder.empty_set", "reward_net.2.bias", "decoder.reward_net.2.bias"}
    unchanged = [k for k in unchanged if k not in exempt]
    assert not unchanged, unchanged


@pytest.mark.parametrize("model_type, encoder", [*NP_VARIANTS, ("btl", "mean"), ("dpl", "mean")])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, model_type, encoder, batch):
    model = build_reward_model(tiny_config(model_type, encoder=encoder), seed=3).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_reward_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    torch.testing.assert_close(loaded(batch).log_prob_chosen, model(batch).log_prob_chosen)


def test_loading_a_non_model_folder_is_a_clear_error(tmp_path):
    from steerable.errors import SteerableError

    with pytest.raises(SteerableError, match="not a saved steerable model"):
        RewardModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_personalized_scoring_matches_the_batched_model(model_type, batch):
    model = build_reward_model(tiny_config(model_type), seed=1).eval()
    user = model.personalize(batch.context_chosen[0].numpy(), batch.context_rejected[0].numpy())
    options = np.random.default_rng(0).uniform(size=(50, 1)).astype(np.float32)
    with torch.no_grad():
        latent = model.encode(batch.context_chosen[:1], batch.context_rejected[:1], batch.context_mask[:1])
        expected = model.option_rewards(torch.from_numpy(options)[None], latent)[0].numpy()
        pairs = (
            model.preference(batch.target_chosen[:1], batch.target_rejected[:1], latent)
            .prob_chosen[0]
            .numpy()
        )
    np.testing.assert_allclose(user.rewards(options), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        user.compare(batch.target_chosen[0].numpy(), batch.target_rejected[0].numpy()),
        pairs,
        rtol=1e-5,
        atol=1e-6,
    )


def test_new_user_without_context_and_bad_shapes(batch):
    model = build_reward_model(tiny_config("np-btl"), seed=0)
    user = model.personalize()
    assert user.num_context == 0 and user.rewards(np.zeros((3, 1))).shape == (3,)
    assert user.embedding.shape == (8,)
    with pytest.raises(ValueError, match="shape"):
        user.rewards(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        user.rewards(np.array([[np.nan]]))


def test_variational_model_is_deterministic_in_eval_and_has_posterior_std(batch):
    model = build_reward_model(tiny_config("vnp-btl"), seed=0).eval()
    torch.testing.assert_close(model(batch).log_prob_chosen, model(batch).log_prob_chosen)
    user = model.personalize(batch.context_chosen[0].numpy(), batch.context_rejected[0].numpy())
    assert user.embedding_std is not None and (user.embedding_std > 0).all()
    out = model.training_output(batch)
    assert out.kl is not None and out.kl.shape == (8,) and (out.kl >= 0).all()


@pytest.mark.parametrize("encoder", ["attention", "mean"])
@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_unpadded_encoder_path_equals_the_masked_path(encoder, pooling, batch):
    """The personalisation path (no mask: fused QKV, one attention call, out_proj after pooling) gives the
    numbers of the masked path used in training and evaluation, for one user and for a batch."""
    model = build_reward_model(tiny_config("vnp-btl", encoder=encoder, pooling=pooling), seed=2).eval()
    c, r = batch.context_chosen, batch.context_rejected
    full = torch.ones(c.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        for sl in (slice(0, 1), slice(None)):
            masked, fast = model.encode(c[sl], r[sl], full[sl]), model.encode(c[sl], r[sl], None)
            torch.testing.assert_close(fast.mean, masked.mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fast.std, masked.std, atol=1e-6, rtol=1e-5)
        empty = model.encode(c[:, :0], r[:, :0], None).mean
        torch.testing.assert_close(empty, model.encode(c[:, :0], r[:, :0], full[:, :0]).mean)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_personalize_and_scoring_restore_the_callers_mode(model_type, batch):
    model = build_reward_model(tiny_config(model_type), seed=0).train()
    ctx = batch.context_chosen[0].numpy(), batch.context_rejected[0].numpy()
    user = model.personalize(*ctx)
    assert all(m.training for m in model.modules())
    user.rewards(np.zeros((3, 1))), user.compare(np.zeros((3, 1)), np.ones((3, 1)))
    assert all(m.training for m in model.modules())
    # a mixed state comes back exactly as it was; and the result is the eval-mode one
    model.eval()
    first = next(iter(model.children()))
    first.train()
    before = {name: m.training for name, m in model.named_modules()}
    again = model.personalize(*ctx)
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    np.testing.assert_array_equal(
        again.rewards(np.zeros((3, 1))), model.personalize(*ctx).rewards(np.zeros((3, 1)))
    )


def _reference_rewards(model, ctx, options):
    """Rewards by the training-time decoder (no folding, no cache)."""
    with torch.no_grad():
        latent = model.encode(torch.from_numpy(ctx[0])[None], torch.from_numpy(ctx[1])[None], None)
        return model.option_rewards(torch.from_numpy(options)[None].to(latent.mean.dtype), latent)[0].numpy()


def test_folded_weight_cache_follows_every_kind_of_weight_change(batch, tmp_path):
    """The folded decoder weights are cached across users; a dtype/device move, load_state_dict and an
    in-place edit through .data (which bumps no version counter) must each recompute them."""
    model = build_reward_model(tiny_config("np-btl"), seed=0).eval()
    ctx = batch.context_chosen[0].numpy(), batch.context_rejected[0].numpy()
    options = np.random.default_rng(0).uniform(size=(20, 1)).astype(np.float32)

    def check() -> None:
        np.testing.assert_allclose(
            model.personalize(*ctx).rewards(options),
            _reference_rewards(model, ctx, options),
            rtol=1e-4,
            atol=1e-5,
        )

    check()  # fills the cache
    layer = model.decoder.option_net[-1]
    with torch.no_grad():
        layer.weight.data.mul_(-2.0)  # .data: the version counter does not move
    check()
    with torch.no_grad():
        layer.bias.data[3] += 1.0  # one element
    check()
    other = build_reward_model(tiny_config("np-btl"), seed=5)
    model.load_state_dict(other.state_dict())
    check()
    model.double()  # a move to another dtype (a device move replaces the storage the same way)
    np.testing.assert_allclose(
        model.personalize(*ctx).rewards(options),
        _reference_rewards(model, ctx, options),
        rtol=1e-6,
        atol=1e-7,
    )
    model.float()
    check()
    with torch.no_grad():
        model.decoder.first.weight.data[0, :2] = model.decoder.first.weight.data[0, :2].flip(0)  # a swap
    check()
