"""Distributions against independent references: torch.distributions, hand formulas, Monte-Carlo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import distributions as td

from robot_rl.distributions import DiagGaussian, GaussianMixture, TanhGaussian

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian_params(batch: int = 4, dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    mean = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand(batch, dim, generator=g, dtype=torch.float64)
    return mean, std


def _mc_entropy(dist: DiagGaussian | GaussianMixture, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """-mean log p over n draws per batch element (batched on a leading axis), and its standard error."""
    if isinstance(dist, DiagGaussian):
        many = DiagGaussian(dist.mean.expand(n, *dist.mean.shape), dist.std.expand(n, *dist.std.shape))
    else:
        many = GaussianMixture(*(p.expand(n, *p.shape) for p in (dist.logits, dist.means, dist.stds)))
    logps = many.log_prob(many.sample(_gen(seed)))
    return -logps.mean(0), logps.std(0) / math.sqrt(n)


# ------------------------------------------------------------------------------------------------------------
# DiagGaussian
# ------------------------------------------------------------------------------------------------------------
def test_gaussian_log_prob_matches_torch_and_hand_formula() -> None:
    mean, std = _gaussian_params()
    actions = torch.randn(4, 3, generator=_gen(5), dtype=torch.float64)
    ours = DiagGaussian(mean, std).log_prob(actions)
    reference = td.Normal(mean, std).log_prob(actions).sum(-1)
    # Paper Eq. 8 with the sign it should carry: -1/2 sum [(a-mu)^2/sigma^2 + log(2 pi sigma^2)].
    by_hand = -0.5 * (((actions - mean) / std) ** 2 + torch.log(2 * math.pi * std**2)).sum(-1)
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours, by_hand)


def test_gaussian_entropy_closed_form_and_monte_carlo() -> None:
    mean, std = _gaussian_params()
    dist = DiagGaussian(mean, std)
    by_hand = 0.5 * torch.log(2 * math.pi * math.e * std**2).sum(-1)
    torch.testing.assert_close(dist.entropy(), by_hand)
    torch.testing.assert_close(dist.entropy(), td.Normal(mean, std).entropy().sum(-1))
    mc, se = _mc_entropy(dist, 100_000)
    assert torch.all((mc - dist.entropy()).abs() < 5 * se + 1e-3), (mc, dist.entropy(), se)


def test_gaussian_samples_have_the_right_moments_and_follow_the_generator() -> None:
    mean, std = _gaussian_params(batch=2, dim=2)
    dist = DiagGaussian(mean, std)
    g = _gen(3)
    draws = torch.stack([dist.sample(g) for _ in range(20_000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=4 * std.max().item() / math.sqrt(20_000), rtol=0)
    torch.testing.assert_close(draws.std(0), std, rtol=0.03, atol=0)
    assert torch.equal(dist.sample(_gen(7)), dist.sample(_gen(7)))
    assert not torch.equal(dist.sample(_gen(7)), dist.sample(_gen(8)))
    assert torch.equal(dist.mode(), mean)


def test_gaussian_rsample_carries_gradients_and_sample_does_not() -> None:
    mean = torch.zeros(3, 2, requires_grad=True)
    std = torch.ones(3, 2, requires_grad=True)
    dist = DiagGaussian(mean, std)
    dist.rsample(_gen()).sum().backward()
    assert mean.grad is not None and torch.all(mean.grad == 1.0)
    assert std.grad is not None and std.grad.abs().sum() > 0
    assert not dist.sample(_gen()).requires_grad


def test_gaussian_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="share a shape"):
        DiagGaussian(torch.zeros(3, 2), torch.ones(3, 1))
    with pytest.raises(ValueError, match="share a shape"):
        DiagGaussian(torch.zeros(2), torch.ones(2))  # no batch dimension
    with pytest.raises(AssertionError):
        DiagGaussian(torch.zeros(3, 2), torch.ones(3, 2)).log_prob(torch.zeros(1, 2))


# ------------------------------------------------------------------------------------------------------------
# GaussianMixture
# ------------------------------------------------------------------------------------------------------------
def _mixture_params(
    batch: int = 3, k: int = 4, dim: int = 2, spread: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    logits = torch.randn(batch, k, generator=g, dtype=torch.float64)
    means = spread * torch.randn(batch, k, dim, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.5 * torch.rand(batch, k, dim, generator=g, dtype=torch.float64)
    return logits, means, stds


def _torch_mixture(logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> td.MixtureSameFamily:
    return td.MixtureSameFamily(td.Categorical(logits=logits), td.Independent(td.Normal(means, stds), 1))


def test_gmm_log_prob_matches_mixture_same_family() -> None:
    logits, means, stds = _mixture_params()
    actions = torch.randn(3, 2, generator=_gen(9), dtype=torch.float64)
    ours = GaussianMixture(logits, means, stds).log_prob(actions)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, _torch_mixture(logits, means, stds).log_prob(actions))


def test_gmm_log_prob_is_finite_far_from_every_component() -> None:
    logits, means, stds = _mixture_params()
    far = torch.full((3, 2), 50.0, dtype=torch.float64)
    ours = GaussianMixture(logits, means, stds).log_prob(far)
    assert torch.all(torch.isfinite(ours))
    torch.testing.assert_close(ours, _torch_mixture(logits, means, stds).log_prob(far))


def test_gmm_entropy_bound_is_at_least_the_true_entropy() -> None:
    logits, means, stds = _mixture_params(spread=0.3)
    dist = GaussianMixture(logits, means, stds)
    mc, se = _mc_entropy(dist, 50_000)
    assert torch.all(dist.entropy() >= mc - 5 * se), (dist.entropy(), mc, se)
    # The components overlap, so this is a bound and not the entropy itself.
    assert torch.all(dist.entropy() > mc + 20 * se), (dist.entropy(), mc, se)


def test_gmm_entropy_bound_gap_equals_weight_entropy_for_identical_components() -> None:
    # All components equal: the mixture is one Gaussian, so the bound exceeds the truth by exactly H(w).
    logits = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64)
    means = torch.tensor([[0.1, -0.4]], dtype=torch.float64).expand(1, 3, 2)
    stds = torch.tensor([[0.3, 0.5]], dtype=torch.float64).expand(1, 3, 2)
    dist = GaussianMixture(logits, means, stds)
    weight_entropy = td.Categorical(logits=logits).entropy()
    true_entropy = DiagGaussian(means[:, 0], stds[:, 0]).entropy()
    torch.testing.assert_close(dist.entropy(), true_entropy + weight_entropy)
    mc, se = _mc_entropy(dist, 50_000)
    assert torch.all((mc - true_entropy).abs() < 5 * se + 1e-3)


def test_gmm_entropy_bound_is_tight_for_separated_components() -> None:
    logits, _, _ = _mixture_params()
    centres = torch.tensor([[-30.0, 0.0], [0.0, 30.0], [30.0, 0.0], [0.0, -30.0]], dtype=torch.float64)
    means = centres.expand(3, 4, 2)
    stds = torch.full((3, 4, 2), 0.5, dtype=torch.float64)
    dist = GaussianMixture(logits, means, stds)
    mc, se = _mc_entropy(dist, 50_000)
    assert torch.all((dist.entropy() - mc).abs() < 5 * se + 1e-3), (dist.entropy(), mc, se)


def test_gmm_samples_pick_components_by_weight() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    means = torch.tensor([[[-10.0], [0.0], [10.0]]], dtype=torch.float64)
    stds = torch.full((1, 3, 1), 0.1, dtype=torch.float64)
    dist = GaussianMixture(logits, means, stds)
    g = _gen(4)
    draws = torch.cat([dist.sample(g) for _ in range(4000)]).squeeze(-1)
    freq = torch.stack([(draws < -5).double().mean(), (draws.abs() < 5).double().mean(), (draws > 5).double().mean()])
    se = torch.sqrt(torch.tensor([0.2 * 0.8, 0.5 * 0.5, 0.3 * 0.7]) / 4000)
    assert torch.all((freq - torch.tensor([0.2, 0.5, 0.3])).abs() < 5 * se), freq
    assert torch.equal(dist.mode(), torch.tensor([[0.0]], dtype=torch.float64))
    assert torch.equal(dist.sample(_gen(1)), dist.sample(_gen(1)))


def test_gmm_mode_is_the_mean_of_the_heaviest_component_per_batch_row() -> None:
    logits = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    means = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    dist = GaussianMixture(logits, means, torch.ones(2, 2, 2))
    assert torch.equal(dist.mode(), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_gmm_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 4, 1), torch.ones(2, 4, 1))
    with pytest.raises(ValueError, match="share a shape"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.ones(2, 3, 2))


# ------------------------------------------------------------------------------------------------------------
# TanhGaussian
# ------------------------------------------------------------------------------------------------------------
def _torch_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor) -> td.Distribution:
    base = td.Independent(td.Normal(mean, log_std.exp()), 1)
    return td.TransformedDistribution(base, [td.TanhTransform()])


def test_tanh_log_prob_matches_torch_transformed_distribution() -> None:
    mean, std = _gaussian_params()
    log_std = std.log()
    dist = TanhGaussian(mean, log_std)
    actions = torch.tanh(torch.randn(4, 3, generator=_gen(6), dtype=torch.float64))
    torch.testing.assert_close(dist.log_prob(actions), _torch_tanh_gaussian(mean, log_std).log_prob(actions))
    action, logp = dist.rsample_with_log_prob(_gen(2))
    torch.testing.assert_close(logp, _torch_tanh_gaussian(mean, log_std).log_prob(action))
    torch.testing.assert_close(logp, dist.log_prob(action))


def test_tanh_density_matches_sample_histogram() -> None:
    # One dimension: the probability of each bin, integrating exp(log_prob), against sample frequencies.
    dist = TanhGaussian(
        torch.tensor([[0.6]], dtype=torch.float64), torch.tensor([[math.log(0.8)]], dtype=torch.float64)
    )
    n = 40_000
    draws = TanhGaussian(dist.mean.expand(n, 1), dist.log_std.expand(n, 1)).sample(_gen(11)).squeeze(-1)
    edges = torch.linspace(-0.99, 0.99, 12, dtype=torch.float64)
    for lo, hi in itertools.pairwise(edges.tolist()):
        grid = torch.linspace(lo, hi, 201, dtype=torch.float64)
        expected = float(torch.trapezoid(_density_1d(dist, grid), grid))
        observed = float(((draws >= lo) & (draws < hi)).double().mean())
        se = math.sqrt(expected * (1 - expected) / n)
        assert abs(observed - expected) < 5 * se + 1e-4, (lo, hi, observed, expected)


def _density_1d(dist: TanhGaussian, grid: torch.Tensor) -> torch.Tensor:
    expanded = TanhGaussian(dist.mean.expand(grid.shape[0], 1), dist.log_std.expand(grid.shape[0], 1))
    return expanded.log_prob(grid[:, None]).exp()


def test_tanh_density_integrates_to_one() -> None:
    dist = TanhGaussian(torch.tensor([[-0.4]], dtype=torch.float64), torch.tensor([[0.2]], dtype=torch.float64))
    grid = torch.tanh(torch.linspace(-12, 12, 20_001, dtype=torch.float64))
    assert abs(float(torch.trapezoid(_density_1d(dist, grid), grid)) - 1.0) < 1e-4


def test_tanh_samples_stay_inside_the_open_interval_and_log_prob_stays_finite() -> None:
    mean = torch.tensor([[0.0, 20.0, -20.0, 3.0]])
    dist = TanhGaussian(mean, torch.full((1, 4), 0.5))
    g = _gen(0)
    for _ in range(200):
        action, logp = dist.rsample_with_log_prob(g)
        assert torch.all(action.abs() < 1.0), action
        assert torch.all(torch.isfinite(logp)), logp
        assert torch.all(torch.isfinite(dist.log_prob(action)))
    assert torch.all(torch.isfinite(dist.log_prob(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))))


def test_tanh_stable_log_jacobian_is_finite_where_the_naive_one_is_not() -> None:
    # At u = 20 float32 tanh(u) == 1 exactly: log(1 - tanh^2) is -inf; the stable form is finite and right.
    mean = torch.tensor([[20.0]])
    dist = TanhGaussian(mean, torch.tensor([[-10.0]]))  # std ~ 4.5e-5: u stays ~20
    _, logp = dist.rsample_with_log_prob(_gen())
    assert torch.isfinite(logp).all()
    assert float(torch.tanh(mean)) == 1.0
    expected_jacobian = -2.0 * math.log(math.cosh(20.0))  # 1 - tanh^2 = sech^2, computed another way
    expected = float(td.Normal(mean.double(), math.exp(-10.0)).log_prob(mean.double()).sum() - expected_jacobian)
    # The draw sits within a few std of the mean, so the Gaussian part differs by at most a few nats.
    assert abs(float(logp) - expected) < 10.0


def test_tanh_rsample_gradient_flows_and_mode_is_tanh_of_mean() -> None:
    mean = torch.tensor([[0.3, -0.2], [8.5, -9.5]], requires_grad=True)
    log_std = torch.zeros(2, 2, requires_grad=True)
    dist = TanhGaussian(mean, log_std)
    action, logp = dist.rsample_with_log_prob(_gen())
    (action.sum() + logp.sum()).backward()
    assert mean.grad is not None and torch.all(torch.isfinite(mean.grad)) and mean.grad[0].abs().sum() > 0
    assert log_std.grad is not None and torch.all(torch.isfinite(log_std.grad))
    torch.testing.assert_close(dist.mode(), torch.tanh(mean))


def test_tanh_entropy_estimate_matches_monte_carlo_and_entropy_refuses() -> None:
    mean, std = _gaussian_params(batch=2, dim=2)
    dist = TanhGaussian(mean, std.log())
    estimate = dist.entropy_estimate(4000, _gen(1))
    # Independent check: H(tanh u) = H(u) + E[log(1 - tanh(u)^2)], the expectation over torch's own draws.
    u = td.Normal(mean, std).sample((4000,))
    independent = DiagGaussian(mean, std).entropy() + torch.log1p(-(torch.tanh(u) ** 2)).sum(-1).mean(0)
    torch.testing.assert_close(estimate, independent, atol=0.1, rtol=0)
    with pytest.raises(NotImplementedError):
        dist.entropy()
