"""Tracking error of franky's Cartesian impedance tracking at 10 Hz against a franky-sim server with the peg cell.

    python bench/franky_tracking.py [--ticks 15] [--friction-scale 0.1] [--hostname 127.0.1.4]

For each row the arm is reset (position mode) to the reference pose, then a target is streamed with `set_reference`
every 0.1 s of wall clock for `--ticks` ticks: a step (the target jumps once and stays), or a ramp (the target creeps
3 mm per tick, as a policy inching towards the hole does, then stays). Errors are measured on the peg tip after each
tick: mean over the ticks and final. The same rows run on the in-process MuJoCo twin (same arm model, our own
impedance law, simulated time) for comparison. The last line is the headline figure.

`--friction-scale` scales the arm's joint friction in both twins (the task config's `joint_friction_scale`, 0.1 by
default: a real FR3 compensates most of it); 1.0 is franky-sim's shipped friction (hardware-facts: ~6-8 mm lag).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import bench_main
import numpy as np

from robot_rl.config import FrankaConfig, ImpedanceConfig, SimTaskConfig
from robot_rl.hardware.franka.env import DeadlinePacer
from robot_rl.hardware.franka.robot import FrankyRobot, ee_offset_along_z
from robot_rl.hardware.franka.sim_server import FrankySimServer, peg_tip_offset
from robot_rl.hardware.interfaces import Robot
from robot_rl.hardware.pose import matrix_to_quat, quat_angle, quat_to_matrix, rpy_to_matrix
from robot_rl.hardware.sim.robot import MujocoRobot
from robot_rl.hardware.sim.scene import build_scene

PERIOD_S = 0.1
RAMP_STEP_M = 0.003


@dataclass(frozen=True)
class Row:
    """One target profile: offset (x, y, z metres; roll, pitch, yaw radians) reached as a step or as a ramp."""

    name: str
    offset: tuple[float, float, float, float, float, float]
    ramp: bool = False


ROWS = (
    Row("step +x 10 mm", (0.01, 0, 0, 0, 0, 0)),
    Row("step -y 10 mm", (0, -0.01, 0, 0, 0, 0)),
    Row("step -z 15 mm", (0, 0, -0.015, 0, 0, 0)),
    Row("step +z 15 mm", (0, 0, 0.015, 0, 0, 0)),
    Row("step xyz 10 mm", (0.01, 0.01, -0.01, 0, 0, 0)),
    Row("step yaw 0.05 rad", (0, 0, 0, 0, 0, 0.05)),
    Row("ramp -z 3 mm/tick", (0, 0, -0.03, 0, 0, 0), ramp=True),
)


@dataclass(frozen=True)
class Errors:
    mean_mm: float
    final_mm: float
    final_mrad: float


def target_at(row: Row, tick: int, start_pos: np.ndarray, start_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offset = np.array(row.offset, dtype=np.float64)
    if row.ramp:
        distance = float(np.linalg.norm(offset[:3]))
        offset = offset * min(1.0, RAMP_STEP_M * (tick + 1) / distance)
    rot = rpy_to_matrix(offset[3:]) @ quat_to_matrix(start_quat)
    return start_pos + offset[:3], matrix_to_quat(rot)


def track(
    robot: Robot, row: Row, ticks: int, wait: Callable[[float], None], start: tuple[np.ndarray, np.ndarray]
) -> Errors:
    """Reset to `start`, stream the row's targets for `ticks` periods, return the peg tip's errors."""
    robot.move_to(*start)
    errors, angles = [], []
    for tick in range(ticks):
        pos, quat = target_at(row, tick, *start)
        robot.command(pos, quat)
        wait(PERIOD_S)
        s = robot.state()
        errors.append(float(np.linalg.norm(s.ee_pos - pos)))
        angles.append(quat_angle(s.ee_quat, quat))
    return Errors(1e3 * float(np.mean(errors)), 1e3 * errors[-1], 1e3 * angles[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=bench_main.positive_int, default=15, help="10 Hz ticks streamed per row")
    parser.add_argument(
        "--friction-scale", type=bench_main.positive_float, default=None, help="joint friction scale (default: config)"
    )
    parser.add_argument("--hostname", default="127.0.1.4", help="loopback address for the franky-sim server")
    args = parser.parse_args()
    task = SimTaskConfig() if args.friction_scale is None else SimTaskConfig(joint_friction_scale=args.friction_scale)
    impedance = ImpedanceConfig()
    scene = build_scene(task)
    start = (scene.reference.pos.copy(), scene.reference.quat.copy())

    twin = MujocoRobot(scene, impedance=impedance)
    in_process = {row.name: track(twin, row, args.ticks, twin.advance, start) for row in ROWS}

    pacer = DeadlinePacer()
    franky_results: dict[str, Errors] = {}
    overruns = 0
    with (
        FrankySimServer(task, hostname=args.hostname),
        FrankyRobot(
            FrankaConfig(host=args.hostname), impedance=impedance, ee_offset=ee_offset_along_z(peg_tip_offset(task))
        ) as robot,
    ):
        for row in ROWS:
            pacer.restart()
            franky_results[row.name] = track(robot, row, args.ticks, pacer.wait, start)
        overruns = pacer.overruns
        robot.stop()

    print(
        f"franky-sim vs in-process twin, K={list(impedance.stiffness)}, D={list(impedance.damping)}, "
        f"{1 / PERIOD_S:.0f} Hz for {args.ticks} ticks, joint friction x{task.joint_friction_scale}, "
        f"{overruns} deadline overruns"
    )
    print(f"{'target':<22}{'franky mean':>12}{'final':>8}{'mrad':>7}{'twin mean':>11}{'final':>8}{'mrad':>7}")
    for row in ROWS:
        f, t = franky_results[row.name], in_process[row.name]
        print(
            f"{row.name:<22}{f.mean_mm:>10.2f}mm{f.final_mm:>6.2f}mm{f.final_mrad:>7.2f}"
            f"{t.mean_mm:>9.2f}mm{t.final_mm:>6.2f}mm{t.final_mrad:>7.2f}"
        )
    worst_final = max(r.final_mm for r in franky_results.values())
    mean = float(np.mean([r.mean_mm for r in franky_results.values()]))
    print(
        f"franky-sim 10 Hz tracking: mean error {mean:.2f} mm over all rows, worst final error {worst_final:.2f} mm "
        f"(joint friction x{task.joint_friction_scale}, {time.strftime('%Y-%m-%d')})"
    )


if __name__ == "__main__":
    bench_main.run(main)
