"""`make_franky_env`: the RobotEnv on franky's client, against the real FR3 or the franky-sim twin (design §7).

Composition: a `FrankyRobot` (impedance tracking through franky), the task (reference pose and success detector) and
the same `TargetMapper` every RobotEnv uses (built inside `RobotEnv`). Time is the wall clock: a step waits for the
next deadline of the 10 Hz loop (`DeadlinePacer`), never for physics, and overruns are counted.

Success detector:
- franky-sim twin (`franka.sim_server: true`): `PegInsertionTask` on the measured peg tip, the in-process twin's own
  detector. The tip pose franky reports is the server's forward kinematics of the simulated joints (measured to agree
  with MuJoCo's tcp site to ~2 µm), and the hole's geometry is the one the server built.
- real arm: `OperatorJudgedTask`, a placeholder that never reports success; the operator's keys decide (the actor
  reads them). Its reference pose is the nominal cell's until the config carries the real cell's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from robot_rl.config import EnvConfig
from robot_rl.hardware.camera import Camera, close_quietly, open_cameras
from robot_rl.hardware.env import OperatorJudgedTask, RobotEnv, Task
from robot_rl.hardware.franka.robot import FrankyRobot, ee_offset_along_z
from robot_rl.hardware.franka.sim_server import FrankySimServer, peg_tip_offset
from robot_rl.hardware.sim.peg import PegInsertionTask
from robot_rl.hardware.sim.scene import build_scene

log = logging.getLogger(__name__)


class DeadlinePacer:
    """Waits for fixed-rate deadlines: the k-th `wait(period)` after `restart()` returns at start + k * period, however
    long the work between calls took. A deadline already missed is counted as an overrun and the schedule restarts
    from now (no burst of catch-up steps)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._deadline: float | None = None
        self.overruns = 0
        self.waits = 0

    def restart(self) -> None:
        """Forget the schedule (after a reset: the next step's period starts when it is commanded)."""
        self._deadline = None

    def wait(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"the control period must be positive, got {seconds}")
        now = self._clock()
        self._deadline = now + seconds if self._deadline is None else self._deadline + seconds
        self.waits += 1
        remaining = self._deadline - now
        if remaining < 0:
            self.overruns += 1
            self._deadline = now
            return
        self._sleep(remaining)


class FrankyEnv(RobotEnv):
    """RobotEnv on a FrankyRobot, paced by deadlines; `close()` stops the arm and any franky-sim server it owns.

    A `RobotFault` from `reset` or `step` means the episode failed: call `robot.recover()` (or `robot.reconnect()`
    for a `RobotConnectionLost`) and reset.
    """

    def __init__(
        self,
        *,
        robot: FrankyRobot,
        task: Task,
        config: EnvConfig,
        pacer: DeadlinePacer,
        server: FrankySimServer | None = None,
        cameras: Sequence[Camera] = (),
    ) -> None:
        super().__init__(robot=robot, task=task, config=config, wait=pacer.wait, cameras=cameras)
        self.franky_robot = robot
        self.pacer = pacer
        self.server = server

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result = super().reset(seed=seed, options=options)
        self.pacer.restart()  # the reset move took its own time; the first period starts at the first command
        return result

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        info["overruns"] = self.pacer.overruns
        return obs, reward, terminated, truncated, info

    def reconnect(self) -> None:
        """After a RobotConnectionLost: start the franky-sim server this env owns again if it has ended (its client
        could never reconnect otherwise), then rebuild the client (`FrankyRobot.reconnect`)."""
        if self.server is not None and not self.server.running:
            log.warning("the franky-sim server on %s has ended; starting it again", self.server.hostname)
            self.franky_robot.release()
            self.server.stop()  # reap the dead process and its work directory
            self.server.start()
        self.franky_robot.reconnect()

    def close(self) -> None:
        try:
            self.franky_robot.close()
        finally:
            try:
                if self.server is not None:
                    self.server.stop()
            finally:
                super().close()


def make_franky_env(cfg: EnvConfig, *, pacer: DeadlinePacer | None = None) -> FrankyEnv:
    """The env `cfg` names with `robot: franky`: connects (starting a franky-sim server first when
    `franka.sim_server`), ready for `reset()`. Close it to stop the arm and the server.

    Cameras (`cfg.cameras`) are RealSense cameras by serial, or SDK recordings; they open before the robot connects,
    and the env closes them. The franky-sim twin renders none (its scene lives in the server's process)."""
    if cfg.robot != "franky":
        raise ValueError(f"make_franky_env needs env.robot = franky, got {cfg.robot!r}")
    # The nominal cell: reference pose (peg tip above the hole) and, for the twin, the hole the detector checks.
    scene = build_scene(cfg.task)
    server = FrankySimServer(cfg.task, hostname=cfg.franka.host) if cfg.franka.sim_server else None
    robot = FrankyRobot(
        cfg.franka,
        impedance=cfg.impedance,
        # The tool-centre point is the peg tip, held straight between the fingers as in the simulated cell.
        ee_offset=ee_offset_along_z(peg_tip_offset(cfg.task)),
    )
    task: Task = PegInsertionTask(scene) if server is not None else OperatorJudgedTask(scene.reference)
    cameras: list[Camera] = []
    try:
        cameras = open_cameras(cfg.cameras, what="env.robot=franky")
        if server is not None:
            server.start()
        robot.connect()
        return FrankyEnv(
            robot=robot, task=task, config=cfg, pacer=pacer or DeadlinePacer(), server=server, cameras=cameras
        )
    except BaseException:
        close_quietly(cameras)
        robot.release()
        if server is not None:
            server.stop()
        raise
