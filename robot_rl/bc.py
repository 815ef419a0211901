"""Behaviour-cloning policies (diagonal Gaussian and Gaussian mixture), their training and their checkpoints.

The policies follow robomimic: an MLP on observations normalised to [-1, 1] by fixed bounds, tanh-bounded
means and softplus stds with a floor. The action distribution itself is not squashed, so log-probs and
entropies are those of a plain Gaussian / mixture; the environment clips executed actions to [-1, 1].

A checkpoint is a directory with `bc.safetensors` (every tensor, the observation bounds included) and
`bc.json` (a manifest: format version, policy kind, BCConfig, observation and action sizes). Nothing is
pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from robot_rl import obs as obs_lib
from robot_rl.config import BCConfig
from robot_rl.distributions import ActionDistribution, DiagGaussian, GaussianMixture
from robot_rl.durable import file_sha256, replace_atomic, save_tensors
from robot_rl.networks import ObsEncoder, augment
from robot_rl.obs import ObsSpec, state_dim

WEIGHTS_FILE = "bc.safetensors"
MANIFEST_FILE = "bc.json"
DIGEST = "tensors_sha256"  # in bc.json: the SHA-256 of bc.safetensors
FORMAT = "robot_rl.bc"
FORMAT_VERSION = 2

# Demonstrated actions may exceed [-1, 1] by this much (float round-off in recording); they are then clipped.
ACTION_TOLERANCE = 1e-5


class BCCheckpointError(ValueError):
    """A BC checkpoint that is missing or cannot be read; the message names the file."""


class BCDiverged(RuntimeError):
    """BC training's loss became non-finite; the message names bc.lr, the usual cause, and what to do."""


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
    """Shared part of the BC policies: the observation encoder, the MLP trunk and the batched interface.

    Observations are dicts (robot_rl.obs): the state keys are normalised by fixed bounds, each camera image goes
    through its own small CNN (trained with DrQ random shifts when the dataset has images).
    """

    kind: ClassVar[str]

    def __init__(
        self,
        cfg: BCConfig,
        obs_spec: ObsSpec,
        action_dim: int,
        state_low: np.ndarray,
        state_high: np.ndarray,
        head_dim: int,
    ) -> None:
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be positive, got {action_dim}")
        self.obs_spec = obs_lib.check_spec(obs_spec)
        low, high = _check_obs_bounds(state_low, state_high, state_dim(self.obs_spec))
        self.cfg = cfg.model_copy(deep=True)
        self.action_dim = action_dim
        self.encoder = ObsEncoder(self.obs_spec, low, high, cfg.encoder)
        self.net = _mlp(self.encoder.out_dim, list(cfg.hidden), head_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def head(self, encoded: torch.Tensor) -> ActionDistribution:
        """The action distribution from `encoder(obs)` (callers that need the encoding too compute it once)."""
        raise NotImplementedError

    def _std(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + self.cfg.min_std

    def dist(self, obs: dict[str, torch.Tensor]) -> ActionDistribution:
        """The action distribution at a batch of observations (dict of [B, ...] tensors, unnormalised)."""
        return self.head(self.encoder(obs))

    @torch.no_grad()
    def sample(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions [B, action_dim] drawn from the (unsquashed) policy; may leave [-1, 1], the env clips."""
        return self.dist(obs).sample(generator)

    @torch.no_grad()
    def mode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dist(obs).mode()

    def log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) in nats, [B]; differentiable (training uses it)."""
        return self.dist(obs).log_prob(actions)

    def entropy(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """H(pi(.|s)) in nats, [B] (for the GMM: the upper bound, see GaussianMixture)."""
        return self.dist(obs).entropy()

    def reset(self) -> None:
        """Start of an episode: a no-op for feed-forward policies (recurrent ones reset hidden state)."""


class GaussianBCPolicy(BCPolicy):
    """Diagonal Gaussian head: mean = tanh(.), std = softplus(.) + min_std."""

    kind: ClassVar[str] = "gaussian"

    def __init__(self, cfg: BCConfig, obs_spec: ObsSpec, action_dim: int, low: np.ndarray, high: np.ndarray) -> None:
        super().__init__(cfg, obs_spec, action_dim, low, high, head_dim=2 * action_dim)

    def head(self, encoded: torch.Tensor) -> DiagGaussian:
        raw_mean, raw_std = self.net(encoded).chunk(2, dim=-1)
        return DiagGaussian(torch.tanh(raw_mean), self._std(raw_std))


class GMMBCPolicy(BCPolicy):
    """Mixture of K = num_modes diagonal Gaussians: K logits, K tanh-bounded means, K stds >= min_std."""

    kind: ClassVar[str] = "gmm"

    def __init__(self, cfg: BCConfig, obs_spec: ObsSpec, action_dim: int, low: np.ndarray, high: np.ndarray) -> None:
        k = cfg.num_modes
        super().__init__(cfg, obs_spec, action_dim, low, high, head_dim=k + 2 * k * action_dim)
        self.num_modes = k

    def head(self, encoded: torch.Tensor) -> GaussianMixture:
        out = self.net(encoded)
        k, d = self.num_modes, self.action_dim
        logits = out[:, :k]
        raw_means, raw_stds = out[:, k:].reshape(-1, k, 2 * d).chunk(2, dim=-1)
        return GaussianMixture(logits, torch.tanh(raw_means), self._std(raw_stds))


_POLICIES: dict[str, type[BCPolicy]] = {"gaussian": GaussianBCPolicy, "gmm": GMMBCPolicy}


def make_bc_policy(
    cfg: BCConfig, obs_spec: ObsSpec, action_dim: int, state_low: np.ndarray, state_high: np.ndarray
) -> BCPolicy:
    """The policy named by cfg.policy for observations of `obs_spec` (state bounds: the concatenated state keys);
    its weights come from torch's global RNG (seed it to reproduce)."""
    return _POLICIES[cfg.policy](cfg, obs_spec, action_dim, state_low, state_high)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
def _validate_dataset(
    policy: BCPolicy, obs: dict[str, np.ndarray], actions: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if not isinstance(obs, dict):
        raise ValueError(f"obs must be a dict of arrays keyed like {sorted(policy.obs_spec)}, got {type(obs).__name__}")
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != policy.action_dim:
        raise ValueError(f"actions must have shape (N, {policy.action_dim}), got {actions.shape}")
    if actions.shape[0] == 0:
        raise ValueError("the BC dataset is empty")
    if not np.issubdtype(actions.dtype, np.number):
        raise ValueError(f"actions must be numeric, got dtype {actions.dtype}")
    bad_rows = np.flatnonzero(~np.isfinite(actions).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"actions has non-finite values in {bad_rows.size} rows (first: {bad_rows[0]})")
    converted = {key: _validate_obs_key(obs, key, shape, dtype, len(actions)) for key, (shape, dtype) in
                 policy.obs_spec.items()}  # fmt: skip
    worst = float(np.abs(actions).max())
    if worst > 1.0 + ACTION_TOLERANCE:
        raise ValueError(f"actions must lie in [-1, 1]; the largest magnitude is {worst}")
    return converted, np.clip(actions, -1.0, 1.0).astype(np.float32)


def _validate_obs_key(obs: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: str, n: int) -> np.ndarray:
    if key not in obs:
        raise ValueError(f"obs lacks key {key!r} (it has {sorted(obs)})")
    array = np.asarray(obs[key])
    if array.shape != (n, *shape):
        raise ValueError(f"obs[{key!r}] must have shape {(n, *shape)}, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"obs[{key!r}] must be numeric, got dtype {array.dtype}")
    if np.dtype(dtype) == np.uint8:
        if array.dtype != np.uint8:
            raise ValueError(f"obs[{key!r}] is an image and must be uint8, got {array.dtype}")
        return array
    bad_rows = np.flatnonzero(~np.isfinite(array.reshape(n, -1)).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"obs[{key!r}] has non-finite values in {bad_rows.size} rows (first: {bad_rows[0]})")
    return array.astype(np.float32)


@torch.no_grad()
def _mean_nll(policy: BCPolicy, obs: dict[str, torch.Tensor], actions: torch.Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for start in range(0, actions.shape[0], chunk):
        part = {k: v[start : start + chunk].to(policy.device) for k, v in obs.items()}
        total -= float(policy.log_prob(part, actions[start : start + chunk]).sum())
    return total / actions.shape[0]


def train_bc(
    policy: BCPolicy,
    obs: dict[str, np.ndarray],
    actions: np.ndarray,
    cfg: BCConfig,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
    *,
    progress_every: int = 100,
) -> dict[str, float]:
    """Fit the policy by maximum likelihood (Adam on the mean NLL of minibatches drawn with replacement).

    obs: dict of [N, ...] arrays (images uint8). Images are randomly shifted (DrQ, cfg.encoder.shift_pad) in every
    minibatch. Deterministic given the seed and the policy's initial weights. `progress(step, loss)` is called every
    `progress_every` steps and after the last, with the mean minibatch NLL since the previous call. Returns initial
    and final full-dataset NLL (nats per sample, unaugmented), the mean minibatch loss of the last window, the step
    count and the dataset size.
    """
    obs_np, actions_np = _validate_dataset(policy, obs, actions)
    if progress_every < 1:
        raise ValueError(f"progress_every must be positive, got {progress_every}")
    device = policy.device
    # The dataset stays on the CPU (images can be large); minibatches move to the device.
    obs_t = obs_lib.to_tensors(obs_np, "cpu")
    actions_t = torch.from_numpy(actions_np)
    # Indices and shifts are drawn on the CPU so the batches do not depend on the device.
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    initial_nll = _mean_nll(policy, obs_t, actions_t)
    policy.train()
    pad = cfg.encoder.shift_pad
    running, count, window_loss = torch.zeros((), device=device), 0, float("nan")
    for step in range(1, cfg.steps + 1):
        index = torch.randint(actions_t.shape[0], (cfg.batch_size,), generator=generator)
        batch = augment({k: v[index] for k, v in obs_t.items()}, policy.encoder.image_keys, pad, generator)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = -policy.log_prob(batch, actions_t[index].to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device and read back once per window: a .item() per step would stall a GPU.
        running, count = running + loss.detach(), count + 1
        if step % progress_every == 0 or step == cfg.steps:
            window_loss = float(running) / count
            if not np.isfinite(window_loss):
                default = BCConfig.model_fields["lr"].default
                raise BCDiverged(
                    f"BC training diverged: the loss became non-finite ({window_loss}) by step {step} of {cfg.steps}; "
                    f"lower the learning rate bc.lr (now {cfg.lr:g}, default {default:g}), e.g. --set "
                    f"bc.lr={min(cfg.lr / 10, default):g}, and rerun"
                )
            if progress is not None:
                progress(step, window_loss)
            running, count = torch.zeros((), device=device), 0
    policy.eval()
    return {
        "initial_nll": initial_nll,
        "final_nll": _mean_nll(policy, obs_t, actions_t),
        "final_window_loss": window_loss,
        "steps": float(cfg.steps),
        "num_samples": float(actions_np.shape[0]),
    }


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------
def save_bc(policy: BCPolicy, directory: str | Path) -> Path:
    """Write bc.safetensors and bc.json into `directory` (created if needed); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in policy.state_dict().items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": policy.kind,
        "obs_spec": obs_lib.spec_to_json(policy.obs_spec),
        "action_dim": policy.action_dim,
        "config": policy.cfg.model_dump(mode="json"),
    }

    replace_atomic(out / WEIGHTS_FILE, lambda p: save_tensors(tensors, p))
    manifest[DIGEST] = file_sha256(out / WEIGHTS_FILE)  # what load_bc checks: damaged or exchanged bytes are refused
    replace_atomic(out / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
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
    value = manifest.get("action_dim")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BCCheckpointError(f"{path}: action_dim must be a positive integer, got {value!r}")
    manifest["obs_spec"] = _manifest_spec(path, manifest.get("obs_spec"))
    return manifest


def _manifest_spec(path: Path, raw: Any) -> ObsSpec:
    """The manifest's {key: [shape, dtype]} as an ObsSpec; BCCheckpointError when malformed."""
    if not isinstance(raw, dict) or not raw:
        raise BCCheckpointError(f"{path}: obs_spec must be a non-empty mapping, got {raw!r}")
    spec: ObsSpec = {}
    for key, entry in raw.items():
        try:
            shape, dtype = entry
            shape = tuple(int(d) for d in shape)
            dtype = np.dtype(dtype).name
        except (TypeError, ValueError) as exc:
            raise BCCheckpointError(f"{path}: obs_spec[{key!r}] is not [shape, dtype]: {entry!r}") from exc
        if any(d < 1 for d in shape) or dtype not in ("float32", "uint8"):
            raise BCCheckpointError(f"{path}: obs_spec[{key!r}] has shape {shape} and dtype {dtype}")
        spec[str(key)] = (shape, dtype)
    return spec


def _manifest_config(path: Path, manifest: dict[str, Any]) -> BCConfig:
    try:
        cfg = BCConfig.model_validate(manifest.get("config"))
    except ValidationError as exc:
        raise BCCheckpointError(f"{path}: the BC config is invalid: {exc}") from exc
    if manifest.get("kind") != cfg.policy:
        raise BCCheckpointError(f"{path}: kind {manifest.get('kind')!r} disagrees with config.policy {cfg.policy!r}")
    return cfg


BC_FINGERPRINT_KEY = "bc.weights"


def bc_fingerprint(policy: nn.Module) -> dict[str, str]:
    """{BC_FINGERPRINT_KEY: a hash of the policy's tensors (names, dtypes, shapes, values)}: an entry of the wire's
    config fingerprint, so that an actor whose --bc policy is not the learner's is refused at the handshake (its
    rollouts would estimate Q of another policy). The same policy saved and loaded again hashes the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {BC_FINGERPRINT_KEY: digest.hexdigest()[:16]}


def load_bc(directory: str | Path, device: str | torch.device = "cpu") -> BCPolicy:
    """Rebuild a policy saved by save_bc, in eval mode, on `device`."""
    root = Path(directory)
    manifest_path, weights_path = root / MANIFEST_FILE, root / WEIGHTS_FILE
    manifest = _read_manifest(manifest_path)
    cfg = _manifest_config(manifest_path, manifest)
    if not weights_path.is_file():
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} are missing")
    digest = manifest.get(DIGEST)  # policies saved before it was recorded lack it
    if digest is not None and file_sha256(weights_path) != digest:
        raise BCCheckpointError(
            f"BC checkpoint weights {weights_path} are not the bytes that were saved (their SHA-256 differs from the "
            f"one {MANIFEST_FILE} recorded): the file was damaged or replaced since; train or copy the policy again"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} cannot be read: {exc}") from exc
    spec, action_dim = manifest["obs_spec"], manifest["action_dim"]
    dim = state_dim(spec)
    # Placeholder bounds: the saved normaliser buffers overwrite them below.
    try:
        policy = make_bc_policy(cfg, spec, action_dim, -np.ones(dim), np.ones(dim))
    except ValueError as exc:
        raise BCCheckpointError(f"{manifest_path}: cannot build the policy it describes: {exc}") from exc
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path} do not match {manifest_path}: {exc}") from exc
    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path}: {bad} holds NaN or inf; train the policy again")
    normalizer = policy.encoder.normalizer
    bounds_ok = normalizer is None or bool((normalizer.half_range > 0).all() and normalizer.center.isfinite().all())
    if not bounds_ok:
        raise BCCheckpointError(f"BC checkpoint weights {weights_path}: bad observation bounds")
    return policy.to(device).eval()
