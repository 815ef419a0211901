"""Behaviour-cloning policies (diagonal Gaussian and Gaussian mixture), their training and their checkpoints.

The policies follow robomimic: an MLP on observations normalised to [-1, 1] by fixed bounds, tanh-bounded
means and softplus stds with a floor. The action distribution itself is not squashed, so log-probs and
entropies are those of a plain Gaussian / mixture; the environment clips executed actions to [-1, 1].

A checkpoint is a directory with `bc.safetensors` (every tensor, the observation bounds included) and
`bc.json` (a manifest: format version, policy kind, BCConfig, observation and action sizes). Nothing is
pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robot_rl.config import BCConfig
from robot_rl.distributions import ActionDistribution, DiagGaussian, GaussianMixture

WEIGHTS_FILE = "bc.safetensors"
MANIFEST_FILE = "bc.json"
FORMAT = "robot_rl.bc"
FORMAT_VERSION = 1

# Demonstrated actions may exceed [-1, 1] by this much (float round-off in recording); they are then clipped.
ACTION_TOLERANCE = 1e-5


class BCCheckpointError(ValueError):
    """A BC checkpoint that is missing or cannot be read; the message names the file."""


def _mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def _check_obs_bounds(obs_low: np.ndarray, obs_high: np.ndarray, obs_dim: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(obs_low, dtype=np.float64)
    high = np.asarray(obs_high, dtype=np.float64)
    if low.shape != (obs_dim,) or high.shape != (obs_dim,):
        raise ValueError(f"obs_low and obs_high must have shape ({obs_dim},), got {low.shape} and {high.shape}")
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ValueError("obs_low and obs_high must be finite (derive bounds from data for unbounded observations)")
    bad = np.flatnonzero(~(high > low))
    if bad.size:
        raise ValueError(f"obs_high must exceed obs_low on every dimension; it does not on {bad.tolist()}")
    return low.astype(np.float32), high.astype(np.float32)


class BCPolicy(nn.Module):
    """Shared part of the BC policies: the observation normaliser, the MLP trunk and the batched interface."""

    kind: ClassVar[str]

    def __init__(
        self,
        cfg: BCConfig,
        obs_dim: int,
        action_dim: int,
        obs_low: np.ndarray,
        obs_high: np.ndarray,
        head_dim: int,
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"obs_dim and action_dim must be positive, got {obs_dim} and {action_dim}")
        low, high = _check_obs_bounds(obs_low, obs_high, obs_dim)
        self.cfg = cfg.model_copy(deep=True)
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.register_buffer("obs_low", torch.from_numpy(low))
        self.register_buffer("obs_high", torch.from_numpy(high))
        self.net = _mlp(obs_dim, list(cfg.hidden), head_dim)

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """[B, obs_dim] -> the same in [-1, 1] where obs lies within the bounds (not clipped outside them)."""
        assert obs.ndim == 2 and obs.shape[1] == self.obs_dim, (obs.shape, self.obs_dim)
        return 2.0 * (obs - self.obs_low) / (self.obs_high - self.obs_low) - 1.0

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize_obs(obs))

    def _std(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + self.cfg.min_std

    def dist(self, obs: torch.Tensor) -> ActionDistribution:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions [B, action_dim] drawn from the (unsquashed) policy; may leave [-1, 1], the env clips."""
        return self.dist(obs).sample(generator)

    @torch.no_grad()
    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.dist(obs).mode()

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) in nats, [B]; differentiable (training uses it)."""
        return self.dist(obs).log_prob(actions)

    def entropy(self, obs: torch.Tensor) -> torch.Tensor:
        """H(pi(.|s)) in nats, [B] (for the GMM: the upper bound, see GaussianMixture)."""
        return self.dist(obs).entropy()

    def reset(self) -> None:
        """Start of an episode: a no-op for feed-forward policies (recurrent ones reset hidden state)."""


class GaussianBCPolicy(BCPolicy):
    """Diagonal Gaussian head: mean = tanh(.), std = softplus(.) + min_std."""

    kind: ClassVar[str] = "gaussian"

    def __init__(self, cfg: BCConfig, obs_dim: int, action_dim: int, obs_low: np.ndarray, obs_high: np.ndarray) -> None:
        super().__init__(cfg, obs_dim, action_dim, obs_low, obs_high, head_dim=2 * action_dim)

    def dist(self, obs: torch.Tensor) -> DiagGaussian:
        raw_mean, raw_std = self._features(obs).chunk(2, dim=-1)
        return DiagGaussian(torch.tanh(raw_mean), self._std(raw_std))


class GMMBCPolicy(BCPolicy):
    """Mixture of K = num_modes diagonal Gaussians: K logits, K tanh-bounded means, K stds >= min_std."""

    kind: ClassVar[str] = "gmm"

    def __init__(self, cfg: BCConfig, obs_dim: int, action_dim: int, obs_low: np.ndarray, obs_high: np.ndarray) -> None:
        k = cfg.num_modes
        super().__init__(cfg, obs_dim, action_dim, obs_low, obs_high, head_dim=k + 2 * k * action_dim)
        self.num_modes = k

    def dist(self, obs: torch.Tensor) -> GaussianMixture:
        out = self._features(obs)
        k, d = self.num_modes, self.action_dim
        logits = out[:, :k]
        raw_means, raw_stds = out[:, k:].reshape(-1, k, 2 * d).chunk(2, dim=-1)
        return GaussianMixture(logits, torch.tanh(raw_means), self._std(raw_stds))


_POLICIES: dict[str, type[BCPolicy]] = {"gaussian": GaussianBCPolicy, "gmm": GMMBCPolicy}


def make_bc_policy(cfg: BCConfig, obs_dim: int, action_dim: int, obs_low: np.ndarray, obs_high: np.ndarray) -> BCPolicy:
    """The policy named by cfg.policy; its weights come from torch's global RNG (seed it to reproduce)."""
    return _POLICIES[cfg.policy](cfg, obs_dim, action_dim, obs_low, obs_high)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
def _validate_dataset(policy: BCPolicy, obs: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs = np.asarray(obs)
    actions = np.asarray(actions)
    if obs.ndim != 2 or obs.shape[1] != policy.obs_dim:
        raise ValueError(f"obs must have shape (N, {policy.obs_dim}), got {obs.shape}")
    if actions.ndim != 2 or actions.shape[1] != policy.action_dim:
        raise ValueError(f"actions must have shape (N, {policy.action_dim}), got {actions.shape}")
    if obs.shape[0] != actions.shape[0]:
        raise ValueError(f"obs and actions disagree on N: {obs.shape[0]} vs {actions.shape[0]}")
    if obs.shape[0] == 0:
        raise ValueError("the BC dataset is empty")
    for name, array in (("obs", obs), ("actions", actions)):
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if bad_rows.size:
            raise ValueError(f"{name} has non-finite values in {bad_rows.size} rows (first: {bad_rows[0]})")
    worst = float(np.abs(actions).max())
    if worst > 1.0 + ACTION_TOLERANCE:
        raise ValueError(f"actions must lie in [-1, 1]; the largest magnitude is {worst}")
    return obs.astype(np.float32), np.clip(actions, -1.0, 1.0).astype(np.float32)


@torch.no_grad()
def _mean_nll(policy: BCPolicy, obs: torch.Tensor, actions: torch.Tensor, chunk: int = 8192) -> float:
    total = 0.0
    for start in range(0, obs.shape[0], chunk):
        total -= float(policy.log_prob(obs[start : start + chunk], actions[start : start + chunk]).sum())
    return total / obs.shape[0]


def train_bc(
    policy: BCPolicy,
    obs: np.ndarray,
    actions: np.ndarray,
    cfg: BCConfig,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
    *,
    progress_every: int = 100,
) -> dict[str, float]:
    """Fit the policy by maximum likelihood (Adam on the mean NLL of minibatches drawn with replacement).

    Deterministic given the seed and the policy's initial weights. `progress(step, loss)` is called every
    `progress_every` steps and after the last, with the mean minibatch NLL since the previous call.
    Returns initial and final full-dataset NLL (nats per sample), the mean minibatch loss of the last
    window, the step count and the dataset size.
    """
    obs_np, actions_np = _validate_dataset(policy, obs, actions)
    if progress_every < 1:
        raise ValueError(f"progress_every must be positive, got {progress_every}")
    device = policy.obs_low.device
    obs_t = torch.from_numpy(obs_np).to(device)
    actions_t = torch.from_numpy(actions_np).to(device)
    # Indices are drawn on the CPU so the batches do not depend on the device.
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    initial_nll = _mean_nll(policy, obs_t, actions_t)
    policy.train()
    running, count, window_loss = torch.zeros((), device=device), 0, float("nan")
    for step in range(1, cfg.steps + 1):
        index = torch.randint(obs_t.shape[0], (cfg.batch_size,), generator=generator).to(device)
        loss = -policy.log_prob(obs_t[index], actions_t[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device and read back once per window: a .item() per step would stall a GPU.
        running, count = running + loss.detach(), count + 1
        if step % progress_every == 0 or step == cfg.steps:
            window_loss = float(running) / count
            if not np.isfinite(window_loss):
                raise RuntimeError(f"BC loss became non-finite ({window_loss}) by step {step}")
            if progress is not None:
                progress(step, window_loss)
            running, count = torch.zeros((), device=device), 0
    policy.eval()
    return {
        "initial_nll": initial_nll,
        "final_nll": _mean_nll(policy, obs_t, actions_t),
        "final_window_loss": window_loss,
        "steps": float(cfg.steps),
        "num_samples": float(obs_np.shape[0]),
    }


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary sibling and rename, so a crash never leaves a half-written checkpoint file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_bc(policy: BCPolicy, directory: str | Path) -> Path:
    """Write bc.safetensors and bc.json into `directory` (created if needed); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in policy.state_dict().items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": policy.kind,
        "obs_dim": policy.obs_dim,
        "action_dim": policy.action_dim,
        "config": policy.cfg.model_dump(mode="json"),
    }
    _write_atomic(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    _write_atomic(out / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BCCheckpointError(f"BC checkpoint manifest {path} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BCCheckpointError(f"BC checkpoint manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BCCheckpointError(f"{path} is not a BC checkpoint manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BCCheckpointError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("obs_dim", "action_dim"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BCCheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    return manifest


def _manifest_config(path: Path, manifest: dict[str, Any]) -> BCConfig:
    try:
        cfg = BCConfig.model_validate(manifest.get("config"))
    except ValidationError as exc:
        raise BCCheckpointError(f"{path}: the BC config is invalid: {exc}") from exc
    if manifest.get("kind") != cfg.policy:
        raise BCCheckpointError(f"{path}: kind {manifest.get('kind')!r} disagrees with config.policy {cfg.policy!r}")
    return cfg


def load_bc(directory: str | Path, device: str | torch.device = "cpu") -> BCPolicy:
    """Rebuild a policy saved by save_bc, in eval mode, on `device`."""
    root = Path(directory)
    manifest_path, weights_path = root / MANIFEST_FILE, root / WEIGHTS_FILE
    manifest = _read_manifest(manifest_path)
    cfg = _manifest_config(manifest_path, manifest)
    if not weights_path.is_file():
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} are missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} cannot be read: {exc}") from exc
    obs_dim, action_dim = manifest["obs_dim"], manifest["action_dim"]
    # Placeholder bounds: the saved obs_low / obs_high buffers overwrite them below.
    policy = make_bc_policy(cfg, obs_dim, action_dim, -np.ones(obs_dim), np.ones(obs_dim))
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} do not match {manifest_path}: {exc}") from exc
    try:
        _check_obs_bounds(policy.obs_low.numpy(), policy.obs_high.numpy(), obs_dim)
    except ValueError as exc:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path}: bad observation bounds: {exc}") from exc
    return policy.to(device).eval()
