"""From a policy action to the next end-effector target, with the safety box as the last word (design §7).

The target is six numbers relative to a reference pose: xyz offset in metres along the base axes and roll, pitch, yaw
in radians (additive per axis). World orientation = R(rpy) @ R_reference, i.e. the angles rotate the tool about the
base axes at the reference, so the box's "yaw ±20°" means about the vertical whatever the tool's own axes are.

Every action from every source goes through `TargetMapper.step`: NaN and infinities included. Invariant: each new
target is inside the safety box and differs from the previous target by at most one scaled action per axis.
"""

from __future__ import annotations

import math

import numpy as np

from robot_rl.config import ActionConfig, SafetyBoxConfig
from robot_rl.hardware.interfaces import Pose
from robot_rl.hardware.pose import matrix_to_quat, matrix_to_rpy, quat_to_matrix, rpy_to_matrix

ACTION_DIM = 6


def sanitize_action(action: np.ndarray) -> np.ndarray:
    """NaN -> 0, +inf -> +1, -inf -> -1, then clip to [-1, 1]. Refuses a wrong shape (a bug, not noise)."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {a.shape}")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(a, -1.0, 1.0)


def box_limits(box: SafetyBoxConfig) -> tuple[np.ndarray, np.ndarray]:
    """The box as (low, high) 6-vectors, xyz in metres and rpy in radians."""
    low = np.array([*box.xyz_low, *np.radians(box.rpy_low_deg)])
    high = np.array([*box.xyz_high, *np.radians(box.rpy_high_deg)])
    return low, high


class TargetMapper:
    """Turns actions in [-1, 1]^6 into targets relative to the reference pose; holds the current target."""

    def __init__(self, *, action: ActionConfig, box: SafetyBoxConfig) -> None:
        self._step_size = np.array([action.translation_scale_m] * 3 + [action.rotation_scale_rad] * 3)
        self._max_error = np.array([action.max_target_error_m] * 3 + [action.max_target_error_rad] * 3)
        self.low, self.high = box_limits(box)
        self._target: np.ndarray | None = None

    @property
    def step_size(self) -> np.ndarray:
        """The largest move of the target per step and axis (the action scale)."""
        return self._step_size.copy()

    @property
    def target(self) -> np.ndarray:
        """The current target (6,), relative to the reference; a copy."""
        if self._target is None:
            raise RuntimeError("TargetMapper.reset(measured) must be called before the first step")
        return self._target.copy()

    def reset(self, measured: np.ndarray) -> np.ndarray:
        """Seed the target from the measured pose (relative 6-vector), clipped into the box."""
        self._target = np.clip(_finite(measured, "measured pose"), self.low, self.high)
        return self.target

    def step(self, action: np.ndarray, measured: np.ndarray) -> np.ndarray:
        """The next target for `action` given the measured relative pose; stored and returned (a copy)."""
        previous = self.target
        meas = _finite(measured, "measured pose")
        desired = previous + sanitize_action(action) * self._step_size
        # A blocked peg would otherwise let `target += delta` run away and the push force grow without bound.
        desired = np.clip(desired, meas - self._max_error, meas + self._max_error)
        # The previous clip may jump when the measured pose moved; never move more than one action per step.
        desired = np.clip(desired, previous - self._step_size, previous + self._step_size)
        # The box is the last word (previous is inside it, so this cannot undo the step limit).
        self._target = np.clip(desired, self.low, self.high)
        return self.target


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (ACTION_DIM,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be 6 finite numbers, got {v!r}")
    return v


def relative_to_world(target: np.ndarray, reference: Pose) -> Pose:
    """World pose of a 6-vector target (xyz offset, additive rpy) relative to the reference pose."""
    t = np.asarray(target, dtype=np.float64)
    rot = rpy_to_matrix(t[3:]) @ quat_to_matrix(reference.quat)
    return Pose(pos=np.asarray(reference.pos, dtype=np.float64) + t[:3], quat=matrix_to_quat(rot))


def world_to_relative(pos: np.ndarray, quat: np.ndarray, reference: Pose) -> np.ndarray:
    """Inverse of `relative_to_world`: the 6-vector of a world pose relative to the reference."""
    rot = quat_to_matrix(quat) @ quat_to_matrix(reference.quat).T
    offset = np.asarray(pos, dtype=np.float64) - np.asarray(reference.pos, dtype=np.float64)
    return np.concatenate([offset, matrix_to_rpy(rot)])


def widened_limits(box: SafetyBoxConfig, margin_m: float, margin_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """The box grown by a margin on every side (observation bounds: the measured pose may leave the box)."""
    low, high = box_limits(box)
    margin = np.array([margin_m] * 3 + [margin_rad] * 3)
    if not (math.isfinite(margin_m) and math.isfinite(margin_rad)) or np.any(margin < 0):
        raise ValueError(f"margins must be finite and non-negative, got {margin_m}, {margin_rad}")
    return low - margin, high + margin
