"""Networks of the RL agent: an observation normaliser, MLPs, a batched critic ensemble, the SAC actor and V_BC.

The critic ensemble is one module whose weights carry a leading member dimension, so all members run in one batched
matrix multiply instead of a Python loop over networks (the loop is bound by kernel launches, not arithmetic).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.distributions import TanhGaussian

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class ObsNormalizer(nn.Module):
    """Maps observations from fixed bounds [low, high] to [-1, 1]; the bounds are saved with the weights."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        low_t = torch.as_tensor(np.asarray(low, dtype=np.float32))
        high_t = torch.as_tensor(np.asarray(high, dtype=np.float32))
        if low_t.shape != high_t.shape or low_t.ndim != 1:
            raise ValueError(f"obs bounds must be 1-D and of equal shape, got {low_t.shape} and {high_t.shape}")
        if not bool(torch.all(high_t > low_t)):
            raise ValueError("obs bounds need high > low on every dimension")
        self.register_buffer("center", (high_t + low_t) / 2)
        self.register_buffer("half_range", (high_t - low_t) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.center) / self.half_range


def mlp(in_dim: int, hidden: list[int], out_dim: int, *, layer_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers.append(nn.Linear(last, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: x [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        # Same distribution as nn.Linear's default initialisation, drawn independently per member.
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if members is not None:
            weight, bias = weight[members], bias[members]
        assert x.ndim == 3 and x.shape[0] == weight.shape[0], (x.shape, weight.shape)
        return torch.baddbmm(bias, x, weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with separate affine parameters per ensemble member."""

    def __init__(self, members: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, width))
        self.bias = nn.Parameter(torch.zeros(members, 1, width))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if members is not None:
            weight, bias = weight[members], bias[members]
        return F.layer_norm(x, x.shape[-1:]) * weight + bias


class CriticEnsemble(nn.Module):
    """Q_k(s, a) for k = 1..E in one module; forward returns [E, B]."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: list[int], members: int, *, layer_norm: bool = True
    ) -> None:
        super().__init__()
        self.members = members
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        last = obs_dim + action_dim
        for width in hidden:
            self.linears.append(EnsembleLinear(members, last, width))
            self.norms.append(EnsembleLayerNorm(members, width) if layer_norm else nn.Identity())
            last = width
        self.head = EnsembleLinear(members, last, 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        assert obs.ndim == 2 and actions.ndim == 2 and obs.shape[0] == actions.shape[0], (
            obs.shape,
            actions.shape,
        )
        count = self.members if members is None else int(members.shape[0])
        x = torch.cat([obs, actions], dim=-1).unsqueeze(0).expand(count, -1, -1)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = linear(x, members)
            x = norm(x, members) if isinstance(norm, EnsembleLayerNorm) else norm(x)
            x = F.relu(x)
        q = self.head(x, members).squeeze(-1)
        assert q.shape == (count, obs.shape[0]), q.shape
        return q


class Actor(nn.Module):
    """SAC actor: a tanh-squashed diagonal Gaussian over actions in (-1, 1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = mlp(obs_dim, hidden, 2 * action_dim, layer_norm=False)

    def forward(self, obs: torch.Tensor) -> TanhGaussian:
        mean, raw_log_std = self.net(obs).chunk(2, dim=-1)
        # A smooth squash keeps log_std inside [LOG_STD_MIN, LOG_STD_MAX] without dead gradients at the edges.
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw_log_std) + 1)
        return TanhGaussian(mean, log_std)


class ValueNet(nn.Module):
    """V_BC(s): the BC policy's value, regressed on Monte-Carlo returns."""

    def __init__(self, obs_dim: int, hidden: list[int], *, layer_norm: bool = True) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)
