"""Observations as dicts of arrays: state vectors (float32) and camera images (uint8, H x W x 3), kept apart.

An observation is `{key: array}` as RobotEnv returns it; a batch of them is the same dict with a leading dimension.
Images stay uint8 from the camera to the GPU (a quarter of float32's bytes in the buffer, on the wire and in
transfers); networks convert them (robot_rl.networks.ObsEncoder). `ObsSpec` names each key's per-row shape and dtype,
the same layout as the wire's TransitionSpec.obs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch

from robot_rl.config import STATE_OBS_KEY

ObsSpec = dict[str, tuple[tuple[int, ...], str]]
Obs = dict[str, np.ndarray]


def is_image(shape: Sequence[int], dtype: str) -> bool:
    """An image is a uint8 H x W x 3 array; everything else is state."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3 and shape[-1] == 3


def check_spec(spec: Mapping[str, tuple[Sequence[int], str]]) -> ObsSpec:
    """The spec with tuple shapes and canonical dtype names; ValueError naming the key that is not valid."""
    if not spec:
        raise ValueError("obs_spec is empty")
    out: ObsSpec = {}
    for key, (shape, dtype) in spec.items():
        shape = tuple(int(d) for d in shape)
        if any(d < 1 for d in shape):
            raise ValueError(f"obs_spec[{key!r}] has shape {shape}; every dimension must be positive")
        if np.dtype(dtype).kind not in "biuf":
            raise ValueError(f"obs_spec[{key!r}] has dtype {dtype}; expected a bool, integer or float dtype")
        out[key] = (shape, np.dtype(dtype).name)
    return out


def spec_to_json(spec: ObsSpec) -> dict[str, list]:
    """The spec as JSON for manifests: {key: [shape list, dtype name]} (check_spec reads it back)."""
    return {k: [list(shape), dtype] for k, (shape, dtype) in spec.items()}


def spec_from_space(space: gym.spaces.Dict) -> ObsSpec:
    """The ObsSpec of a Dict observation space of Boxes (keys in the space's order)."""
    if not isinstance(space, gym.spaces.Dict):
        raise ValueError(f"observation space must be a gymnasium Dict, got {type(space).__name__}")
    spec: ObsSpec = {}
    for key, sub in space.spaces.items():
        if not isinstance(sub, gym.spaces.Box) or sub.dtype is None:
            raise ValueError(f"observation {key!r} must be a Box, got {sub}")
        spec[key] = (tuple(int(d) for d in sub.shape), np.dtype(sub.dtype).name)
    if not spec:
        raise ValueError("observation space is empty")
    return spec


def state_keys(spec: ObsSpec) -> list[str]:
    """Keys of the state part, sorted (their concatenation is the state vector the networks normalise)."""
    return sorted(k for k, (shape, dtype) in spec.items() if not is_image(shape, dtype))


def image_keys(spec: ObsSpec) -> list[str]:
    """Keys of the camera images, sorted."""
    return sorted(k for k, (shape, dtype) in spec.items() if is_image(shape, dtype))


def state_dim(spec: ObsSpec) -> int:
    return sum(int(np.prod(spec[k][0])) for k in state_keys(spec))


def state_bounds(space: gym.spaces.Dict) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the concatenated state vector (state_keys order), from the space's Boxes."""
    keys = state_keys(spec_from_space(space))
    if not keys:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    low = np.concatenate([np.asarray(space[k].low, np.float32).reshape(-1) for k in keys])
    high = np.concatenate([np.asarray(space[k].high, np.float32).reshape(-1) for k in keys])
    return low, high


def stack(rows: Sequence[Mapping[str, np.ndarray]]) -> Obs:
    """A list of single observations -> one batched observation."""
    if not rows:
        raise ValueError("cannot stack an empty list of observations")
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def concat(batches: Sequence[Mapping[str, np.ndarray]]) -> Obs:
    """Batched observations -> one, in order."""
    if not batches:
        raise ValueError("cannot concatenate an empty list of observations")
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def take(obs: Mapping[str, np.ndarray], index: np.ndarray | slice | int) -> Obs:
    """Rows `index` of a batched observation (an int keeps a batch of one)."""
    if isinstance(index, int | np.integer):
        index = slice(int(index), int(index) + 1)
    return {k: v[index] for k, v in obs.items()}


def batch1(obs: Mapping[str, np.ndarray]) -> Obs:
    """A single observation -> a batch of one."""
    return {k: np.asarray(v)[None] for k, v in obs.items()}


def to_tensors(obs: Mapping[str, np.ndarray | torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Batched arrays -> tensors on `device`: images stay uint8, state becomes float32. No copy on the CPU when the
    dtype already fits."""
    out: dict[str, torch.Tensor] = {}
    for key, value in obs.items():
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()  # camera frames are read-only; torch wants memory it may write
        t = torch.as_tensor(value)
        if t.dtype != torch.uint8 and t.dtype != torch.float32:
            t = t.to(torch.float32)
        out[key] = t.to(device, non_blocking=True)
    return out


def state_spec(dim: int, key: str = STATE_OBS_KEY) -> ObsSpec:
    """The spec of a state-only observation: one float32 vector of `dim` values under `key`."""
    return {key: ((int(dim),), "float32")}
