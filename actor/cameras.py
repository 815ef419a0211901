"""The actor's cameras, built from `env.cameras`: the MuJoCo twin's renders in sim, RealSense (or a recording) else.

Each control step the actor reads the newest frame of every camera after the env step (so a sim render shows that
step's result) and logs the 84x84 image with the frame's number, device timestamp and age. A frame older than the
camera's freshness limit fails the episode (`StaleFrameError`), as a fault would: the policy must not act on it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import gymnasium as gym
import numpy as np

from robot_rl.config import EnvConfig
from robot_rl.hardware.camera import Camera, CameraError


def open_cameras(cfg: EnvConfig, env: gym.Env) -> list[Camera]:
    """One camera per `cfg.cameras` entry; none when the list is empty. Refuses what cannot be read."""
    if not cfg.cameras:
        return []
    cameras: list[Camera] = []
    try:
        for cam_cfg in cfg.cameras:
            if cfg.robot == "sim" and cam_cfg.serial is None and cam_cfg.recording is None:
                from robot_rl.hardware.sim.cameras import SimCamera

                robot = env.unwrapped.robot
                cameras.append(SimCamera(robot.model, robot.data, cfg=cam_cfg))
            elif cam_cfg.serial is not None or cam_cfg.recording is not None:
                from robot_rl.hardware.realsense.camera import RealSenseCamera

                cameras.append(RealSenseCamera(cam_cfg).__enter__())
            else:
                raise CameraError(
                    f"camera {cam_cfg.name}: env.robot={cfg.robot} needs a RealSense serial or a recording for it"
                )
    except BaseException:
        close_cameras(cameras)
        raise
    return cameras


def close_cameras(cameras: list[Camera]) -> None:
    for cam in cameras:
        with contextlib.suppress(Exception):  # closing must not hide the error that got us here
            cam.close()


def read_cameras(cameras: list[Camera]) -> dict[str, Any]:
    """Per-step extras: `cam_<name>_image` (uint8 HxWx3), `_frame_number`, `_timestamp_s`, `_age_s`."""
    extras: dict[str, Any] = {}
    for cam in cameras:
        frame = cam.read()  # raises StaleFrameError for a frame older than the camera's freshness limit
        extras[f"cam_{cam.name}_image"] = np.asarray(frame.image, np.uint8)
        extras[f"cam_{cam.name}_frame_number"] = np.int64(frame.frame_number)
        extras[f"cam_{cam.name}_timestamp_s"] = np.float64(frame.timestamp_s)
        extras[f"cam_{cam.name}_age_s"] = np.float64(max(0.0, time.monotonic() - frame.received_s))
    return extras
