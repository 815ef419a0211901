"""`FrankySimServer`: a franky-sim server with the peg-insertion cell, in its own process.

franky-sim speaks the libfranka protocol on ports 1337 (arm) and 1338 (gripper) of one loopback address, so the real
franky client (`FrankyRobot`) drives a simulated FR3 exactly as it would drive the arm. The server must run in its own
process: in-process, its 1 kHz Python loop and the client fight over the GIL (shared/research/hardware-facts.md).

The scene is the in-process twin's (`hardware/sim/scene.py`): franky-sim's own FR3 model, the same square peg fixed
to the hand and the same board with its hole, built by the very functions that build the MuJoCo twin and grafted into
franky-sim's MJCF tree after `add_robot()` and before the server starts. As there:
- joint friction is scaled by `task.joint_friction_scale` (a real FR3 compensates most of it);
- the fingers are held closed on the peg (the gripper is not part of this task);
- the arm starts at the in-process twin's reset posture (the reference pose, solved by its inverse kinematics);
- the server's gravity compensation includes the peg, as a real arm would once its load is configured.
The client sets its end-effector frame to the peg tip (`peg_tip_offset`): poses it reads and commands are the tip's.

Run a server by hand: `python -m robot_rl.hardware.franka.sim_server --hostname 127.0.1.2` (Ctrl+C stops it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from robot_rl.config import SimTaskConfig

ROBOT_PORT = 1337  # fixed by franky-sim (libfranka's command port); the gripper uses 1338
DEFAULT_HOSTNAME = "127.0.1.2"
START_TIMEOUT_S = 30.0  # measured ~2 s to accept connections on an idle machine; generous for a loaded one
STOP_TIMEOUT_S = 5.0
POLL_S = 0.05
PROBE_TIMEOUT_S = 0.2
PARENT_CHECK_S = 0.5  # how often the server checks that the process that started it is still alive
LOG_TAIL_CHARS = 2000
READY_FILE, LOG_FILE = "ready", "server.log"  # in the work directory the parent makes for each server
ROBOT_PREFIX = "robot0_"  # franky-sim prefixes the first robot's names
HAND_BODY = f"{ROBOT_PREFIX}hand"
READY_MARK = "FRANKY_SIM_READY"


class FrankySimError(RuntimeError):
    """The franky-sim server could not be started (or died while starting); the message holds its log tail."""


# ----------------------------------------------------------------------------------------------------------------------
# The scene (runs in the server process; importable for tests without starting a server)
# ----------------------------------------------------------------------------------------------------------------------
def peg_tip_offset(task: SimTaskConfig) -> float:
    """Distance (m) from franky's nominal end effector (the hand's TCP, 0.1034 m along the hand's z) to the peg tip,
    along the same axis: the client's end-effector frame is this far further along."""
    return task.peg_length_m


def finger_width(task: SimTaskConfig) -> float:
    """Gripper width that closes both fingers' pads on the peg (the in-process twin's fixed finger placement)."""
    from robot_rl.hardware.sim.scene import FINGER_PAD_OFFSET

    return 2.0 * (task.peg_half_width_m - FINGER_PAD_OFFSET)


def reset_posture(task: SimTaskConfig) -> np.ndarray:
    """The in-process twin's joint configuration at the reference pose (its own inverse kinematics on the same arm
    model), so that both twins start alike and the franky-sim arm starts at the reference."""
    from robot_rl.config import ImpedanceConfig
    from robot_rl.hardware.sim.robot import MujocoRobot
    from robot_rl.hardware.sim.scene import build_scene

    return MujocoRobot(build_scene(task), impedance=ImpedanceConfig()).posture.copy()


def _peg_cell_mjcf(task: SimTaskConfig) -> ET.Element:
    """The peg (in a body named "hand") and the board with its hole, as MJCF, from the in-process twin's own builders
    (private there; used so that the two twins cannot drift apart)."""
    import mujoco

    from robot_rl.hardware.sim import scene

    spec = mujoco.MjSpec()
    spec.worldbody.add_body(name="hand")
    scene._add_peg(spec, task)
    hole_top = np.array([scene.HOLE_XY[0], scene.HOLE_XY[1], scene.BOARD_TOP_Z])
    scene._add_board(spec, task, hole_top, task.peg_half_width_m + task.clearance_m)
    spec.compile()  # to_xml needs a compiled spec; this also validates the geometry
    return ET.fromstring(spec.to_xml())


def add_peg_cell(scene_root: ET.Element, worldbody: ET.Element, task: SimTaskConfig) -> None:
    """Graft the peg onto franky-sim's hand, add the board, and scale the arm's joint friction, in franky-sim's MJCF
    tree (after `add_robot()`, before the server starts)."""
    cell = _peg_cell_mjcf(task).find("worldbody")
    if cell is None:
        raise FrankySimError("the peg cell's MJCF has no worldbody")
    hand = worldbody.find(f".//body[@name='{HAND_BODY}']")
    if hand is None:
        raise FrankySimError(f"franky-sim's scene has no body {HAND_BODY!r}; was add_robot() called?")
    for element in cell:
        if element.tag == "body" and element.get("name") == "hand":
            hand.extend(list(element))  # the peg geom and the tcp site, in the hand's frame
        elif element.tag == "geom" and element.get("type") == "plane":
            continue  # franky-sim has its own ground plane
        else:
            worldbody.append(element)  # the board and the table
    _scale_joint_friction(scene_root, worldbody, task.joint_friction_scale)


def _scale_joint_friction(scene_root: ET.Element, worldbody: ET.Element, scale: float) -> None:
    # The arm's joints take frictionloss from the "fr3" default class unless they set their own (joints 5-7 do).
    for default in scene_root.iter("default"):
        if default.get("class") == "fr3":
            joint = default.find("joint")
            if joint is not None and joint.get("frictionloss") is not None:
                joint.set("frictionloss", repr(float(joint.get("frictionloss", "0")) * scale))
    for joint in worldbody.iter("joint"):
        if joint.get("name", "").startswith(ROBOT_PREFIX) and joint.get("frictionloss") is not None:
            joint.set("frictionloss", repr(float(joint.get("frictionloss", "0")) * scale))


def _robot_parameters(task: SimTaskConfig) -> Any:
    """franky-sim's end-effector parameters with the peg's mass added (the server compensates the gravity of the mass
    it knows of; a real arm is told its load in Desk or with `set_load`)."""
    from franky_sim import RobotParameters

    from robot_rl.hardware.sim.scene import HAND_TCP_Z, PEG_GRIP_LENGTH

    base = RobotParameters()
    peg_mass = 0.05  # as the in-process twin's peg geom
    peg_com = np.array([0.0, 0.0, (HAND_TCP_Z - PEG_GRIP_LENGTH + HAND_TCP_Z + task.peg_length_m) / 2])
    mass = base.ee_mass + peg_mass
    com = (base.ee_mass * np.array(base.ee_com) + peg_mass * peg_com) / mass
    return RobotParameters(
        gravity=base.gravity,
        ee_mass=mass,
        ee_com=tuple(float(c) for c in com),
        ee_tcp_xyz=base.ee_tcp_xyz,
        ee_tcp_rpy=base.ee_tcp_rpy,
        ee_inertia=base.ee_inertia,
    )


def build_simulator(task: SimTaskConfig) -> Any:
    """A franky-sim MuJoCo simulator holding the peg cell (not yet started)."""
    from franky_sim.mujoco_simulator import MujocoSimulator

    sim = MujocoSimulator(enable_visualization=False)
    sim.add_robot(
        initial_q=tuple(float(q) for q in reset_posture(task)),
        initial_hand_width=finger_width(task),
        robot_parameters=_robot_parameters(task),
    )
    add_peg_cell(sim.scene, sim.worldbody, task)
    return sim


def scene_xml(task: SimTaskConfig) -> str:
    """The MJCF the server compiles (for tests and inspection)."""
    return ET.tostring(build_simulator(task).scene, encoding="unicode")


def serve(task: SimTaskConfig, hostname: str, *, parent_pid: int | None = None, ready_file: Path | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, or until the process that started it is gone (server process only)."""
    from franky_sim import SimulationServer

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with build_simulator(task) as sim, SimulationServer(sim, hostname_candidates=[hostname]) as server:
        print(f"{READY_MARK} {hostname}", flush=True)
        if ready_file is not None:
            ready_file.write_text(hostname)
        next_check = time.monotonic()
        orphaned = False
        while not stop.is_set() and not orphaned:
            server.run_once(True)  # True: paced at 1 kHz, so simulated time follows the wall clock
            now = time.monotonic()
            if parent_pid is not None and now >= next_check:
                next_check = now + PARENT_CHECK_S
                orphaned = os.getppid() != parent_pid  # never outlive whoever started us
    if orphaned and ready_file is not None:
        _remove_workdir(ready_file.parent)


def _remove_workdir(workdir: Path) -> None:
    """Remove the parent's work directory for this server (its ready file and log), which a parent that died without
    stopping us could not; anything else in it is left, and so is the directory then."""
    for name in (READY_FILE, LOG_FILE):
        with contextlib.suppress(OSError):
            (workdir / name).unlink()
    with contextlib.suppress(OSError):
        workdir.rmdir()


# ----------------------------------------------------------------------------------------------------------------------
# The parent's handle
# ----------------------------------------------------------------------------------------------------------------------
def accepts_connections(hostname: str, port: int = ROBOT_PORT, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections there (a franky-sim server does once it is listening)."""
    try:
        with socket.create_connection((hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float, owner_pid: int) -> None:
    """SIGTERM, wait, then SIGKILL: no server is ever left behind (also run by the finalizer at exit). Only the
    process that started the server stops it: a forked child running its exit handlers must not."""
    if os.getpid() != owner_pid or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)


class FrankySimServer:
    """A franky-sim server with the peg cell, in a child process; a context manager.

    `start()` returns once the server accepts connections on `hostname` (port 1337); `stop()` ends it (SIGTERM, then
    SIGKILL after `stop_timeout_s`). A finalizer, also run at interpreter exit, stops a server that was never stopped;
    the server itself exits when the process that started it is gone. Several servers can run on different
    127.0.1.x addresses (the ports are fixed), but each idle server eats about half a core.
    """

    def __init__(
        self,
        task: SimTaskConfig,
        *,
        hostname: str = DEFAULT_HOSTNAME,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        if not hostname.startswith("127."):
            raise ValueError(f"a franky-sim server binds a loopback address (127.x.y.z), got {hostname!r}")
        if start_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.task = task
        self.hostname = hostname
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the server process and wait until it accepts connections."""
        if self.running:
            raise RuntimeError(f"the franky-sim server on {self.hostname} is already running")
        # A server left on this address (ours or another's) would take our client: refuse rather than share it.
        if accepts_connections(self.hostname):
            raise FrankySimError(f"something already listens on {self.hostname}:{ROBOT_PORT}; pick another 127.0.1.x")
        self._workdir = tempfile.TemporaryDirectory(prefix="franky_sim_")
        workdir = Path(self._workdir.name)
        ready_file = workdir / READY_FILE
        command = [
            sys.executable,
            "-m",
            __name__,
            "--hostname",
            self.hostname,
            "--task-json",
            self.task.model_dump_json(),
            "--parent-pid",
            str(os.getpid()),
            "--ready-file",
            str(ready_file),
        ]
        # One thread per library in the server: the machine's cores are shared with training.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(workdir / LOG_FILE, "wb") as log:
            # A log file, not a pipe: nobody reads a pipe while the server runs, and a full pipe would block it.
            # A new session: a Ctrl+C meant for the parent does not reach the server; the parent stops it.
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self._stop_timeout_s, os.getpid())
        try:
            self._wait_ready(ready_file)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, ready_file: Path) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise FrankySimError(
                    f"franky-sim server on {self.hostname} exited with code {self._proc.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            if ready_file.exists() and accepts_connections(self.hostname):
                return
            if time.monotonic() > deadline:
                raise FrankySimError(
                    f"franky-sim server on {self.hostname} did not accept connections within "
                    f"{self._start_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once; later calls do nothing
            self._finalizer = None
        self._proc = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would; for tests of a lost connection."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=self._stop_timeout_s)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's output (for error messages)."""
        if self._workdir is None:
            return "<no log>"
        path = Path(self._workdir.name) / LOG_FILE
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="franky-sim server with the FR3 peg-insertion cell.")
    parser.add_argument("--hostname", default=DEFAULT_HOSTNAME, help="Loopback address to bind (127.x.y.z).")
    parser.add_argument("--task-json", default=None, help="SimTaskConfig as JSON (default: the defaults).")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process is no longer the parent.")
    parser.add_argument("--ready-file", type=Path, default=None, help="Written once the server listens.")
    args = parser.parse_args(argv)
    task = SimTaskConfig() if args.task_json is None else SimTaskConfig.model_validate_json(args.task_json)
    serve(task, args.hostname, parent_pid=args.parent_pid, ready_file=args.ready_file)


if __name__ == "__main__":
    _main()
