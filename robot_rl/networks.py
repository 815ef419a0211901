"""Networks of the RL agent: observation encoders, MLPs, a batched critic ensemble, the SAC actor and V_BC.

`ObsEncoder` turns a dict observation into one feature vector: the state keys normalised to [-1, 1] by fixed bounds,
then, per camera, a small CNN on the uint8 image (`CameraEncoders`). Without cameras it is the normaliser alone.

The critic ensemble is one module whose weights carry a leading member dimension, so all members run in one batched
matrix multiply instead of a Python loop over networks (the loop is bound by kernel launches, not arithmetic).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.config import EncoderConfig
from robot_rl.distributions import TanhGaussian
from robot_rl.obs import ObsSpec, image_keys, state_dim, state_keys

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class ObsNormalizer(nn.Module):
    """Maps observations from fixed bounds [low, high] to [-1, 1]; the bounds are saved with the weights."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        low_t = torch.as_tensor(np.asarray(low, dtype=np.float32).copy())
        high_t = torch.as_tensor(np.asarray(high, dtype=np.float32).copy())
        if low_t.shape != high_t.shape or low_t.ndim != 1:
            raise ValueError(f"obs bounds must be 1-D and of equal shape, got {low_t.shape} and {high_t.shape}")
        if not bool(torch.all(high_t > low_t)):
            raise ValueError("obs bounds need high > low on every dimension")
        self.register_buffer("center", (high_t + low_t) / 2)
        self.register_buffer("half_range", (high_t - low_t) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.center) / self.half_range


class CameraEncoders(nn.Module):
    """One small CNN per camera, all cameras of a size run as one grouped convolution stack.

    uint8 {camera: [B, H, W, 3]} -> features [B, cameras * feature_dim] (cameras in the given order). Per camera:
    3x3 stride-2 convs with ReLU, then Linear -> LayerNorm -> tanh (the DrQ/SAC-AE trunk). The cameras' weights are
    independent (groups = cameras, a batched trunk), exactly as separate networks would be, but each layer is one
    kernel call instead of one per camera, and the convolutions run channels-last (the images' own layout).
    """

    def __init__(self, names: list[str], height: int, width: int, cfg: EncoderConfig) -> None:
        super().__init__()
        self.names = list(names)
        self.image_size = (height, width)
        n = len(self.names)
        layers: list[nn.Module] = []
        channels = 3
        for out in cfg.channels:
            layers += [nn.Conv2d(channels * n, out * n, kernel_size=3, stride=2, groups=n), nn.ReLU()]
            channels = out
        self.convs = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        if min(height, width) < cfg.min_image_size:
            raise ValueError(
                f"a {height}x{width} image is too small for {len(cfg.channels)} stride-2 convs: at least "
                f"{cfg.min_image_size} px a side"
            )
        with torch.no_grad():
            flat = int(self.convs(torch.zeros(1, 3 * n, height, width)).numel()) // n
        self.trunk = EnsembleLinear(n, flat, cfg.feature_dim)
        self.norm = EnsembleLayerNorm(n, cfg.feature_dim)
        self.feature_dim = cfg.feature_dim

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([images[k] for k in self.names], dim=-1)  # [B, H, W, 3n]: camera c in channels 3c..3c+2
        assert x.ndim == 4 and x.shape[-1] == 3 * len(self.names), x.shape
        b = x.shape[0]
        x = x.permute(0, 3, 1, 2).float() * (1.0 / 255.0) - 0.5  # a channels-last view, no copy
        x = self.convs(x)  # [B, n * C, h, w], camera-major channel blocks
        x = x.reshape(b, len(self.names), -1).transpose(0, 1)  # [n, B, C * h * w]
        x = torch.tanh(self.norm(self.trunk(x)))  # [n, B, feature_dim]
        return x.transpose(0, 1).reshape(b, -1)


class ObsEncoder(nn.Module):
    """Dict observation -> [B, out_dim]: normalised state (state_keys order), then each camera's CNN features."""

    def __init__(self, spec: ObsSpec, state_low: np.ndarray, state_high: np.ndarray, cfg: EncoderConfig) -> None:
        super().__init__()
        self.state_keys = state_keys(spec)
        dim = state_dim(spec)
        if np.asarray(state_low).shape != (dim,):
            raise ValueError(f"state bounds must have shape ({dim},) for keys {self.state_keys}")
        self.normalizer = ObsNormalizer(state_low, state_high) if dim else None
        # Cameras of one image size share a grouped CNN stack (independent weights per camera).
        sizes: dict[tuple[int, int], list[str]] = {}
        for key in image_keys(spec):
            sizes.setdefault((spec[key][0][0], spec[key][0][1]), []).append(key)
        self.cameras = nn.ModuleList(CameraEncoders(names, h, w, cfg) for (h, w), names in sizes.items())
        self.image_keys = [k for group in self.cameras for k in group.names]  # the order of the features
        self.out_dim = dim + cfg.feature_dim * len(self.image_keys)

    def state(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The concatenated state vector, unnormalised [B, state_dim]."""
        return torch.cat([obs[k].reshape(obs[k].shape[0], -1) for k in self.state_keys], dim=-1)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.normalizer is not None:
            parts.append(self.normalizer(self.state(obs)))
        parts += [group(obs) for group in self.cameras]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ augmentation: pad [B, H, W, C] by `pad` (edge pixels repeated) and crop back at a random offset per image.

    Works on uint8 and float images alike and keeps the dtype; pad 0 returns the input.
    """
    if pad <= 0:
        return images
    device = generator.device if generator is not None else images.device
    shifts = torch.randint(0, 2 * pad + 1, (images.shape[0], 2), generator=generator, device=device)
    return shift_images(images, pad, shifts.to(images.device))


def shift_images(images: torch.Tensor, pad: int, shifts: torch.Tensor) -> torch.Tensor:
    """The crop of `images` [B, H, W, C], edge-padded by `pad`, at the offsets `shifts` [B, 2] (row, column; each in
    [0, 2 * pad]): random_shift with its draws given, so that it can run inside a compiled (graph-captured) update."""
    b, h, w, _ = images.shape
    assert shifts.shape == (b, 2), (shifts.shape, images.shape)
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")
    padded = padded.to(images.dtype).permute(0, 2, 3, 1)
    rows = (torch.arange(h, device=images.device)[None, :] + shifts[:, :1])[:, :, None]
    cols = (torch.arange(w, device=images.device)[None, :] + shifts[:, 1:])[:, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows, cols]


def augment(obs: dict[str, torch.Tensor], keys: list[str], pad: int, generator: torch.Generator | None) -> dict:
    """The observation with random_shift applied to each image key (state keys untouched)."""
    if pad <= 0 or not keys:
        return obs
    out = dict(obs)
    for key in keys:
        out[key] = random_shift(obs[key], pad, generator)
    return out


def shift_obs(obs: dict[str, torch.Tensor], keys: list[str], pad: int, shifts: torch.Tensor | None) -> dict:
    """The observation with shift_images applied to each image key, keys[i] at shifts[i] [B, 2]; `shifts` None (no
    images, or pad 0) returns it as it is."""
    if shifts is None:
        return obs
    assert shifts.shape[0] == len(keys), (shifts.shape, keys)
    out = dict(obs)
    for i, key in enumerate(keys):
        out[key] = shift_images(obs[key], pad, shifts[i])
    return out


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
