"""`RobotEnv`: a gymnasium environment composed of a Robot, a task (success detector) and the TargetMapper.

One step (design §7): action in [-1, 1]^6 -> `TargetMapper` (scaled delta on the current target, kept near the
measured pose, at most one delta per step, clipped to the safety box last) -> world pose -> `robot.command` -> wait one
control period -> measure. Observations and targets are 6-vectors relative to the task's reference pose (xyz offset
in metres along the base axes, additive roll/pitch/yaw in radians, see `safety.py`).

With cameras (`config.cameras` non-empty) the observation also holds one image per camera under the camera's name:
the `Camera.read()` of that step, (out_size, out_size, 3) uint8 RGB, read after the wait and after the reset move (the
layout `robot_rl.wire.transition_spec` expects). The env owns its cameras and closes them in `close()`. A camera that
cannot deliver (stale frame, lost device) raises `CameraError` from `reset`/`step`; no image is ever made up. A
reset or step that raises leaves what it had commanded the arm in `unfinished_command`.

Reward is the raw sparse success signal (1.0 or 0.0; the learner transforms it). Success terminates; the step limit
truncates. Never the other way round: a truncated episode must be bootstrapped, a successful one must not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from robot_rl.config import STATE_OBS_KEY, CameraConfig, EnvConfig
from robot_rl.hardware.camera import Camera, CameraError, Frame
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


def image_space(cfg: CameraConfig) -> spaces.Box:
    """The observation space of one camera: (out_size, out_size, 3) uint8 RGB."""
    return spaces.Box(0, 255, shape=(cfg.out_size, cfg.out_size, 3), dtype=np.uint8)


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

    `cameras`: one open Camera per `config.cameras` entry, in the same order and with the same names (the twin's
    renderers, RealSense cameras or recordings; the factories open them). The env owns them from then on: `close()`
    closes them. `last_frames` holds the frames behind the latest observation (numbers, timestamps), so that a
    logger never needs to read a camera a second time.
    """

    metadata: dict[str, Any] = {"render_modes": [], "render_fps": 10}  # noqa: RUF012 (gymnasium's own attribute)

    def __init__(
        self,
        *,
        robot: Robot,
        task: Task,
        config: EnvConfig,
        wait: Callable[[float], None],
        cameras: Sequence[Camera] = (),
    ) -> None:
        super().__init__()
        names = [c.name for c in cameras]
        wanted = [c.name for c in config.cameras]
        if names != wanted:
            raise ValueError(
                f"config.cameras names {wanted} but the cameras given are {names} (same names, same order)"
            )
        self.robot = robot
        self.task = task
        self.config = config
        self.mapper = TargetMapper(action=config.action, box=config.safety)
        self._wait = wait
        low, high = widened_limits(config.safety, OBS_MARGIN_M, OBS_MARGIN_RAD)
        self._obs_low, self._obs_high = low.astype(np.float32), high.astype(np.float32)
        state_space = spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)
        obs_spaces: dict[str, spaces.Space] = {STATE_OBS_KEY: state_space}
        obs_spaces.update({c.name: image_space(c) for c in config.cameras})
        self.observation_space = spaces.Dict(obs_spaces)
        self.cameras: tuple[Camera, ...] = tuple(cameras)
        self.last_frames: dict[str, Frame] = {}
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._steps = 0
        self._measured = np.zeros(ACTION_DIM)
        # The command (world pose x, y, z, qw, qx, qy, qz) of the latest reset or step that raised after commanding
        # the arm, for the record of a step cut short (a camera that failed after the command was sent); None when
        # it raised before the arm was commanded. Set only when one raises: nothing is added to a step that does not.
        self.unfinished_command: np.ndarray | None = None

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
        command = np.concatenate([pose.pos, pose.quat])
        try:
            self.robot.move_to(pose.pos, pose.quat)
            state = self.robot.state()
            self._measured = self._relative(state)
            # The first target is the measured pose, never a remembered one: no jump at the first step.
            target = self.mapper.reset(self._measured)
            self._steps = 0
            status = self.task.evaluate(state)
            info = self._info(status, target, command)
            return self._observation(self._measured), info
        except BaseException:
            self.unfinished_command = command  # the move was commanded (the arm may have gone part of the way)
            raise

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        measured = self._measured.copy()
        target = self.mapper.step(action, measured)
        pose = relative_to_world(target, self.reference)
        command = None
        try:
            sent_pos, sent_quat = self.robot.command(pose.pos, pose.quat)
            command = np.concatenate([sent_pos, sent_quat])
            self._wait(self.config.task.control_period_s)
            state = self.robot.state()
            self._measured = self._relative(state)
            self._steps += 1
            status = self.task.evaluate(state)
            terminated = status.is_success
            truncated = not terminated and self._steps >= self.config.task.max_episode_steps
            reward = 1.0 if status.is_success else 0.0
            info = self._info(status, target, command)
            # The measured relative pose the target was computed from (before this step): what a replay feeds back.
            info["measured"] = measured
            # The arm's joints after this step (rad, rad/s), for diagnosis: limits, singularities, contact stalls.
            info["joint_pos"], info["joint_vel"] = state.joint_pos, state.joint_vel
            return self._observation(self._measured), reward, terminated, truncated, info
        except BaseException:
            self.unfinished_command = command  # None: the command itself failed, what reached the arm is unknown
            raise

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

    def close(self) -> None:
        """Close the cameras (idempotent). Every camera is closed even when one fails; the first failure is raised."""
        cameras, self.cameras = self.cameras, ()
        self.last_frames = {}
        first: BaseException | None = None
        for camera in cameras:
            try:
                camera.close()
            except Exception as exc:
                first = first or exc
        super().close()
        if first is not None:
            raise first

    def _observation(self, measured: np.ndarray) -> dict[str, np.ndarray]:
        pose = np.clip(measured.astype(np.float32), self._obs_low, self._obs_high)
        obs = {STATE_OBS_KEY: pose}
        if self.cameras:
            self.last_frames = self._read_cameras()
            obs.update({name: frame.image for name, frame in self.last_frames.items()})
        return obs

    def _read_cameras(self) -> dict[str, Frame]:
        """One new frame per camera, checked; CameraError (naming the camera) when one cannot be had."""
        self.last_frames = {}  # never leave the previous step's frames behind a failed read
        frames: dict[str, Frame] = {}
        for camera in self.cameras:
            try:
                frame = camera.read()
            except CameraError:
                raise
            except Exception as exc:  # a driver's own error: still a camera that cannot deliver
                raise CameraError(f"camera {camera.name}: read failed: {type(exc).__name__}: {exc}") from exc
            image, shape = frame.image, self.observation_space[camera.name].shape
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != shape:
                got = f"{getattr(image, 'dtype', type(image).__name__)}{list(getattr(image, 'shape', []))}"
                raise CameraError(f"camera {camera.name}: delivered {got}, expected uint8{list(shape)}")
            frames[camera.name] = frame
        return frames

    def _info(self, status: TaskStatus, target: np.ndarray, command: np.ndarray) -> dict[str, Any]:
        return {
            "is_success": bool(status.is_success),
            "insertion_depth_m": float(status.insertion_depth_m),
            "target": target,
            # World pose sent to the robot: x, y, z (m), then the quaternion w, x, y, z.
            "command": command,
            "steps": self._steps,
        }
