"""`RobotEnv`: a gymnasium environment composed of a Robot, a task (success detector) and the TargetMapper.

One step (DESIGN §7): action in [-1, 1]^6 -> `TargetMapper` (scaled delta on the current target, kept near the
measured pose, at most one delta per step, clipped to the safety box last) -> world pose -> `robot.command` -> wait one
control period -> measure. Observations and targets are 6-vectors relative to the task's reference pose (xyz offset
in metres along the base axes, additive roll/pitch/yaw in radians, see `safety.py`).

Reward is the raw sparse success signal (1.0 or 0.0; the learner transforms it). Success terminates; the step limit
truncates. Never the other way round: a truncated episode must be bootstrapped, a successful one must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from robot_rl.config import EnvConfig
from robot_rl.hardware.interfaces import Pose, Robot, RobotState
from robot_rl.hardware.safety import (
    ACTION_DIM,
    TargetMapper,
    box_limits,
    relative_to_world,
    widened_limits,
    world_to_relative,
)

# The measured pose may leave the safety box (contacts, tracking lag); observations keep a generous margin.
OBS_MARGIN_M = 0.05
OBS_MARGIN_RAD = 0.2


@dataclass(frozen=True)
class TaskStatus:
    """What the success detector says about one measurement."""

    is_success: bool
    insertion_depth_m: float


class Task(Protocol):
    """A task: where its reference pose is and whether a measured state counts as success."""

    @property
    def reference(self) -> Pose:
        """The pose targets and observations are relative to (for peg insertion: the peg tip above the hole)."""
        ...

    def evaluate(self, state: RobotState) -> TaskStatus:
        """Success and progress for a measured state."""
        ...


class OperatorJudgedTask:
    """A task whose success only the operator can judge (the real arm; a replay): never reports success by itself."""

    def __init__(self, reference: Pose) -> None:
        self._reference = reference

    @property
    def reference(self) -> Pose:
        return self._reference

    def evaluate(self, state: RobotState) -> TaskStatus:
        return TaskStatus(is_success=False, insertion_depth_m=0.0)


class RobotEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """Delta-pose control of a Robot around a task's reference pose, with a sparse success reward.

    `wait(seconds)` lets one control period pass: a simulated twin advances its physics; a real robot waits for the
    next deadline of the fixed-rate loop.
    """

    metadata: dict[str, Any] = {"render_modes": [], "render_fps": 10}  # noqa: RUF012 (gymnasium's own attribute)

    def __init__(self, *, robot: Robot, task: Task, config: EnvConfig, wait: Callable[[float], None]) -> None:
        super().__init__()
        self.robot = robot
        self.task = task
        self.config = config
        self.mapper = TargetMapper(action=config.action, box=config.safety)
        self._wait = wait
        low, high = widened_limits(config.safety, OBS_MARGIN_M, OBS_MARGIN_RAD)
        self._obs_low, self._obs_high = low.astype(np.float32), high.astype(np.float32)
        self.observation_space = spaces.Dict({"ee_pose": spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._steps = 0
        self._measured = np.zeros(ACTION_DIM)

    @property
    def reference(self) -> Pose:
        """The task's reference pose (targets and observations are relative to it)."""
        return self.task.reference

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The paper's randomised reset: the reference plus a uniform offset within ±reset ranges per axis.

        options: {"offset": 6-vector} places the end effector at that offset instead (still clipped to the box).
        """
        super().reset(seed=seed)
        offset = self._reset_offset(options)
        pose = relative_to_world(offset, self.reference)
        self.robot.move_to(pose.pos, pose.quat)
        state = self.robot.state()
        self._measured = self._relative(state)
        # The first target is the measured pose, never a remembered one: no jump at the first step.
        target = self.mapper.reset(self._measured)
        self._steps = 0
        status = self.task.evaluate(state)
        info = self._info(status, target, np.concatenate([pose.pos, pose.quat]))
        return self._observation(self._measured), info

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        measured = self._measured.copy()
        target = self.mapper.step(action, measured)
        pose = relative_to_world(target, self.reference)
        sent_pos, sent_quat = self.robot.command(pose.pos, pose.quat)
        self._wait(self.config.task.control_period_s)
        state = self.robot.state()
        self._measured = self._relative(state)
        self._steps += 1
        status = self.task.evaluate(state)
        terminated = status.is_success
        truncated = not terminated and self._steps >= self.config.task.max_episode_steps
        reward = 1.0 if status.is_success else 0.0
        info = self._info(status, target, np.concatenate([sent_pos, sent_quat]))
        # The measured relative pose the target was computed from (before this step): what a replay feeds back.
        info["measured"] = measured
        return self._observation(self._measured), reward, terminated, truncated, info

    def _reset_offset(self, options: dict[str, Any] | None) -> np.ndarray:
        low, high = box_limits(self.config.safety)
        if options and options.get("offset") is not None:
            offset = np.asarray(options["offset"], dtype=np.float64)
            if offset.shape != (ACTION_DIM,) or not np.all(np.isfinite(offset)):
                raise ValueError(f"options['offset'] must be 6 finite numbers, got {offset!r}")
        else:
            task = self.config.task
            ranges = np.array([task.reset_xyz_range_m] * 3 + [task.reset_rpy_range_rad] * 3)
            n = task.reset_deltas  # a sum of n random deltas (the paper's reset applies three delta actions)
            offset = sum(self.np_random.uniform(-ranges / n, ranges / n) for _ in range(n))
        return np.clip(offset, low, high)

    def _relative(self, state: RobotState) -> np.ndarray:
        return world_to_relative(state.ee_pos, state.ee_quat, self.reference)

    def _observation(self, measured: np.ndarray) -> dict[str, np.ndarray]:
        pose = np.clip(measured.astype(np.float32), self._obs_low, self._obs_high)
        return {"ee_pose": pose}

    def _info(self, status: TaskStatus, target: np.ndarray, command: np.ndarray) -> dict[str, Any]:
        return {
            "is_success": bool(status.is_success),
            "insertion_depth_m": float(status.insertion_depth_m),
            "target": target,
            # World pose sent to the robot: x, y, z (m), then the quaternion w, x, y, z.
            "command": command,
            "steps": self._steps,
        }
