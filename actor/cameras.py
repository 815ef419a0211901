"""The actor's cameras, built from `env.cameras`: the MuJoCo twin's renders in sim, RealSense (or a recording) else.

An env that reads cameras itself (a RobotEnv whose config has cameras: its observation holds the images) is never
read twice: `open_cameras` then hands back `env_cameras(env)`, views whose `read()` returns the frame behind the env's
latest observation (no second render, no second device). Closing a view leaves the env's camera open; the env closes
its own cameras.

Each control step the actor reads the newest frame of every camera after the env step (so a sim render shows that
step's result) and logs the 84x84 image with the frame's number, device timestamp and age. A frame older than the
camera's freshness limit fails the episode (`StaleFrameError`), as a fault would: the policy must not act on it.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np

from robot_rl.config import EnvConfig
from robot_rl.hardware.camera import Camera, CameraError, Frame, close_quietly
from robot_rl.hardware.camera import open_cameras as open_device_cameras
from robot_rl.hardware.interfaces import ClosesOnExit


class EnvFrameCamera(ClosesOnExit):
    """A Camera view of one of the env's own cameras: `read()` is the frame the env's latest observation holds."""

    def __init__(self, env: gym.Env, camera: Camera) -> None:
        self._env = env.unwrapped
        self._camera = camera

    @property
    def name(self) -> str:
        return self._camera.name

    def read(self) -> Frame:
        """The frame of the latest reset/step; CameraError when the env holds none (not reset, or its read failed)."""
        frame = self._env.last_frames.get(self.name)
        if frame is None:
            raise CameraError(f"camera {self.name}: the env holds no frame (reset it; or its last read failed)")
        return frame

    def read_raw(self) -> Frame:
        """The env's camera's newest raw frame (a twin renders once more for this)."""
        return self._camera.read_raw()

    def close(self) -> None:
        """Nothing to release: the env owns the camera and closes it."""


def env_cameras(env: gym.Env) -> list[Camera]:
    """Views of the cameras `env` reads itself (empty when it reads none): no second render or device."""
    return [EnvFrameCamera(env, camera) for camera in getattr(env.unwrapped, "cameras", ())]


def open_cameras(cfg: EnvConfig, env: gym.Env) -> list[Camera]:
    """One camera per `cfg.cameras` entry; none when the list is empty. Refuses what cannot be read.

    When `env` reads its cameras itself, these are views of its frames (`env_cameras`), not new cameras.
    """
    if not cfg.cameras:
        return []
    own = env_cameras(env)
    if own:
        names = [c.name for c in own]
        if names != [c.name for c in cfg.cameras]:
            raise CameraError(f"the env reads cameras {names}, the config names {[c.name for c in cfg.cameras]}")
        return own
    twin = None
    if cfg.robot == "sim":
        from robot_rl.hardware.sim.cameras import twin_cameras

        robot = env.unwrapped.robot
        twin = twin_cameras(robot.model, robot.data)
    return open_device_cameras(cfg.cameras, twin=twin, what=f"env.robot={cfg.robot}")


def close_cameras(cameras: list[Camera]) -> None:
    close_quietly(cameras)  # closing must not hide the error that got us here


def read_cameras(cameras: list[Camera], *, images: bool = True) -> dict[str, Any]:
    """Per-step extras: `cam_<name>_image` (uint8 HxWx3; left out with images=False, when the observation holds the
    image already), `_frame_number`, `_timestamp_s`, `_age_s`."""
    extras: dict[str, Any] = {}
    for cam in cameras:
        frame = cam.read()  # raises StaleFrameError for a frame older than the camera's freshness limit
        if images:
            extras[f"cam_{cam.name}_image"] = np.asarray(frame.image, np.uint8)
        extras[f"cam_{cam.name}_frame_number"] = np.int64(frame.frame_number)
        extras[f"cam_{cam.name}_timestamp_s"] = np.float64(frame.timestamp_s)
        extras[f"cam_{cam.name}_age_s"] = np.float64(max(0.0, time.monotonic() - frame.received_s))
    return extras
