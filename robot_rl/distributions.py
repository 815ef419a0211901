"""Batched action distributions: diagonal Gaussian and Gaussian mixture (BC), tanh-Gaussian (SAC actor).

Every tensor has leading batch dimensions and the action dimension last: parameters of shape [B, D] (mixtures
[B, K] and [B, K, D]) give samples [B, D] and log-probs / entropies [B]. Entropies and log-probs are in nats.
Random draws take an optional `torch.Generator` so that callers can be deterministic; a generator must
live on the same device as the parameters.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)

# Actions returned by TanhGaussian stay this far inside (-1, 1): float32 rounds tanh(u) to exactly +-1
# for |u| > 9, where atanh (and so log_prob) would be infinite.
TANH_EPS = 1e-6


class ActionDistribution(Protocol):
    """What a BC policy's distribution offers (Q^_BC needs log_prob and entropy)."""

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor: ...

    def entropy(self) -> torch.Tensor: ...

    def mode(self) -> torch.Tensor: ...


def _standard_normal(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def _diag_normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(std^2)) summed over the last dimension."""
    z = (x - mean) / std
    return -0.5 * (z.square() + _LOG_2PI).sum(-1) - torch.log(std).sum(-1)


def _diag_normal_entropy(std: torch.Tensor) -> torch.Tensor:
    """1/2 sum_i ln(2 pi e sigma_i^2) = sum_i (1/2 ln(2 pi e) + ln sigma_i)."""
    return (0.5 * (_LOG_2PI + 1.0) + torch.log(std)).sum(-1)


class DiagGaussian:
    """N(mean, diag(std^2)) with mean and std of shape [..., D]."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != std.shape or mean.ndim < 2:
            raise ValueError(f"mean and std must share a shape [B, ..., D], got {mean.shape} and {std.shape}")
        self.mean = mean
        self.std = std

    @property
    def action_dim(self) -> int:
        return self.mean.shape[-1]

    def rsample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw: gradients flow to mean and std."""
        return self.mean + self.std * _standard_normal(self.mean.shape, self.mean, generator)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(generator)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        assert actions.shape == self.mean.shape, (actions.shape, self.mean.shape)
        return _diag_normal_log_prob(actions, self.mean, self.std)

    def entropy(self) -> torch.Tensor:
        return _diag_normal_entropy(self.std)

    def mode(self) -> torch.Tensor:
        return self.mean


class GaussianMixture:
    """A mixture of K diagonal Gaussians: logits [..., K], means and stds [..., K, D].

    `entropy()` is NOT the exact mixture entropy (which has no closed form) but its upper bound
    H(w) + sum_k w_k H_k, the mixing weights' entropy plus the expected component entropy. This is the
    quantity the Q2RL paper uses for GMM policies (Appendix A-B2, Eq. 15-16); it is tight when the components
    barely overlap, and exceeds the true entropy by up to H(w) when they coincide.
    """

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> None:
        if means.shape != stds.shape or means.ndim < 3:
            raise ValueError(f"means and stds must share a shape [B, K, D], got {means.shape} and {stds.shape}")
        if logits.shape != means.shape[:-1]:
            raise ValueError(f"logits must have shape {tuple(means.shape[:-1])} (batch, K), got {logits.shape}")
        self.logits = logits
        self.means = means
        self.stds = stds

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def log_weights(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def _pick(self, params: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """params [..., K, D], index [...] -> params[..., index, :] of shape [..., D]."""
        gather_index = index[..., None, None].expand(*index.shape, 1, params.shape[-1])
        return params.gather(-2, gather_index).squeeze(-2)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a component by its weight, then an action from that component (not differentiable)."""
        with torch.no_grad():
            probs = self.weights.reshape(-1, self.num_components)
            component = torch.multinomial(probs, 1, generator=generator).reshape(self.logits.shape[:-1])
            mean, std = self._pick(self.means, component), self._pick(self.stds, component)
            return mean + std * _standard_normal(mean.shape, mean, generator)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """log sum_k w_k N(a; mu_k, sigma_k), by logsumexp: distant actions do not underflow to -inf."""
        expected = self.means.shape[:-2] + self.means.shape[-1:]
        assert actions.shape == expected, (actions.shape, expected)
        per_component = _diag_normal_log_prob(actions.unsqueeze(-2), self.means, self.stds)
        assert per_component.shape == self.logits.shape, (per_component.shape, self.logits.shape)
        return torch.logsumexp(self.log_weights + per_component, dim=-1)

    def entropy(self) -> torch.Tensor:
        """Upper bound on the entropy: H(w) + sum_k w_k H_k (see the class docstring)."""
        log_w = self.log_weights
        weight_entropy = -(log_w.exp() * log_w).sum(-1)
        component_entropy = _diag_normal_entropy(self.stds)
        assert component_entropy.shape == log_w.shape, (component_entropy.shape, log_w.shape)
        return weight_entropy + (log_w.exp() * component_entropy).sum(-1)

    def mode(self) -> torch.Tensor:
        """The mean of the most probable component (robomimic's deterministic GMM action)."""
        return self._pick(self.means, self.logits.argmax(dim=-1))


def _log_one_minus_tanh_sq(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), finite even where tanh(u) rounds to +-1."""
    return 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))


class TanhGaussian:
    """a = tanh(u), u ~ N(mean, diag(exp(log_std)^2)), for the SAC actor; mean and log_std [..., D].

    The caller bounds log_std (the actor squashes it into a range). There is no closed-form entropy; SAC uses
    -log_prob of a reparameterised sample, and `entropy_estimate` averages that over several draws.
    """

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor) -> None:
        if mean.shape != log_std.shape or mean.ndim < 2:
            raise ValueError(f"mean and log_std must share a shape [B, ..., D], got {mean.shape} and {log_std.shape}")
        self.mean = mean
        self.log_std = log_std

    @property
    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    def _log_prob_pre_tanh(self, u: torch.Tensor) -> torch.Tensor:
        return _diag_normal_log_prob(u, self.mean, self.std) - _log_one_minus_tanh_sq(u).sum(-1)

    def rsample_with_log_prob(
        self, generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in (-1, 1) and its log-density, computed from the pre-tanh draw u.

        noise: the standard-normal draw to use (shaped like the mean), drawn by the caller; by default drawn here."""
        if noise is None:
            noise = _standard_normal(self.mean.shape, self.mean, generator)
        assert noise.shape == self.mean.shape, (noise.shape, self.mean.shape)
        u = self.mean + self.std * noise
        action = torch.tanh(u)
        # Keep the value strictly inside (-1, 1) but pass tanh's own gradient through (straight-through
        # clamp): the clamp only bites where |u| > 7.25, and a hard clamp would zero the gradient there.
        clamped = action.clamp(-1.0 + TANH_EPS, 1.0 - TANH_EPS)
        action = action + (clamped - action).detach()
        return action, self._log_prob_pre_tanh(u)

    def rsample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.rsample_with_log_prob(generator)[0]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(generator)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Log-density of given actions, clamped to +-(1 - TANH_EPS) first so that atanh stays finite."""
        assert actions.shape == self.mean.shape, (actions.shape, self.mean.shape)
        u = torch.atanh(actions.clamp(-1.0 + TANH_EPS, 1.0 - TANH_EPS))
        return self._log_prob_pre_tanh(u)

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError(
            "a tanh-Gaussian has no closed-form entropy; use entropy_estimate() or minus the log-prob"
            " from rsample_with_log_prob()"
        )

    def entropy_estimate(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Monte-Carlo entropy, -mean log p(a) over `num_samples` draws per batch element (no gradient)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        with torch.no_grad():
            total = torch.zeros(self.mean.shape[:-1], dtype=self.mean.dtype, device=self.mean.device)
            for _ in range(num_samples):
                total -= self.rsample_with_log_prob(generator)[1]
            return total / num_samples

    def mode(self) -> torch.Tensor:
        return torch.tanh(self.mean)
