"""Each likelihood and loss against values computed by hand."""

import math

import torch

from steerable.objectives import btl_log_prob, dpl_log_prob, gaussian_kl, mixture_log_prob, preference_loss


def test_btl_log_prob_matches_sigmoid_of_reward_difference():
    r_c, r_r = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    expected = [math.log(1 / (1 + math.exp(-1.0))), math.log(0.5), math.log(1 / (1 + math.exp(2.0)))]
    torch.testing.assert_close(btl_log_prob(r_c, r_r), torch.tensor([expected]))


def test_btl_log_prob_is_stable_for_large_margins():
    out = btl_log_prob(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([-1000.0, 0.0]))


def test_dpl_log_prob_is_gaussian_cdf_of_standardised_difference():
    # mu_c - mu_r = 1, sigma^2 = 0.75^2 + 1^2 = 1.5625 -> sigma = 1.25, z = 0.8, Phi(0.8) = 0.7881446
    out = dpl_log_prob(torch.tensor([1.5]), torch.tensor([0.75]), torch.tensor([0.5]), torch.tensor([1.0]))
    torch.testing.assert_close(out.exp(), torch.tensor([0.7881446]), atol=1e-6, rtol=0)


def test_dpl_probabilities_of_both_orders_sum_to_one():
    m1, s1, m2, s2 = torch.randn(5), torch.rand(5) + 0.1, torch.randn(5), torch.rand(5) + 0.1
    total = dpl_log_prob(m1, s1, m2, s2).exp() + dpl_log_prob(m2, s2, m1, s1).exp()
    torch.testing.assert_close(total, torch.ones(5))


def test_mixture_log_prob_averages_probabilities_not_logs():
    lp = torch.log(torch.tensor([[0.9], [0.1]]))  # two samples of z
    torch.testing.assert_close(mixture_log_prob(lp).exp(), torch.tensor([0.5]))


def test_gaussian_kl_hand_values():
    # KL(N(1, 1) || N(0, 1)) = 0.5; KL(N(0, 2^2) || N(0, 1)) = 0.5 (4 - 1 - ln 4)
    torch.testing.assert_close(
        gaussian_kl(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])),
        torch.tensor(0.5),
    )
    expected = 0.5 * (4 - 1 - math.log(4))
    torch.testing.assert_close(
        gaussian_kl(torch.zeros(1), torch.tensor([2.0]), torch.zeros(1), torch.ones(1)),
        torch.tensor(expected),
    )
    # summed over the latent dimension, zero for identical distributions
    assert float(gaussian_kl(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3))) == 0.0


def test_preference_loss_counts_only_masked_pairs_and_adds_kl_per_pair():
    log_prob = torch.log(torch.tensor([[0.5, 0.25], [0.125, 0.9]]))
    mask = torch.tensor([[True, True], [True, False]])
    expected = (math.log(2) + math.log(4) + math.log(8)) / 3
    torch.testing.assert_close(preference_loss(log_prob, mask), torch.tensor(expected))
    with_kl = preference_loss(log_prob, mask, kl=torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(with_kl, torch.tensor(expected + 0.9 / 3))


def test_per_sample_log_probs_give_the_log_of_the_monte_carlo_predictive():
    # two samples of z, one task with two counted pairs and one padded pair
    p = torch.tensor([[[0.9, 0.8, 0.1]], [[0.5, 0.5, 0.1]]])  # (S=2, B=1, N=3)
    mask = torch.tensor([[True, True, False]])
    expected = -math.log(0.5 * (0.9 * 0.8) + 0.5 * (0.5 * 0.5)) / 2
    torch.testing.assert_close(preference_loss(p.log(), mask), torch.tensor(expected))
