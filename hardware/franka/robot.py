"""`FrankyRobot`: the Robot protocol on a Franka FR3 through franky (or on a franky-sim server, same client).

Streaming (design §7): the first `command` starts franky's client-side `CartesianImpedanceTrackingMotion`
asynchronously, seeded with the measured pose so that nothing jumps; every later `command` only swaps the motion's
reference (`set_reference`, microseconds) and the 1 kHz torque loop in franky's own thread tracks it. Gains are the
paper's (Table V): K = [1024]*3 + [100]*3, D = [64]*3 + [10]*3, unless the config says otherwise.

Errors: franky raises in the calling thread whatever stopped the motion thread, at the next `join_motion`. Every
method here turns franky's errors into two types the caller can act on:
- `RobotFault`: a reflex, a rejected command, a control error. The motion is over; show it, mark the episode failed,
  call `recover()`, then reset.
- `RobotConnectionLost` (a `RobotFault`): the robot or server is gone (libfranka's UDP receive times out after ~1 s).
  The franky `Robot` object is dead for good; `reconnect()` builds a new one.
The original franky exception is always chained (`raise ... from`).

Facts this relies on (shared/research/hardware-facts.md, re-measured with franky-control 2.0.0 and franky-sim 1.0.4):
- A running motion is watched with `is_in_control` (False once the motion thread stopped, ~1 s after a server died);
  `join_motion` then raises the stored error. `poll_motion` is not used.
- With no motion running, reading the state of a dead connection raises a bare `RuntimeError("Net Exception")` after
  ~1 s; franky's typed `NetworkException` appears on `join_motion` and TCP commands.
- `Robot.stop()` ends a torque motion with ControlException "Move command preempted"; `TorqueStopMotion` ends it
  gracefully. Switching from a torque motion to a Cartesian position motion while one runs raises
  InvalidMotionTypeException, so a reset first stops the tracking motion.
- Affine quaternions are (x, y, z, w); this module's are (w, x, y, z) like the rest of robot_rl.
- Gripper.stop() wedges forever in franky-sim: never called.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import franky
import numpy as np

from robot_rl.config import FrankaConfig, ImpedanceConfig
from robot_rl.hardware.interfaces import RobotConnectionLost, RobotFault, RobotState
from robot_rl.hardware.pose import quat_canonical

log = logging.getLogger(__name__)

T = TypeVar("T")

# While tracking, franky's `state` is the control loop's newest measurement: if its robot time stops advancing for this
# long (1000 control cycles), the loop is dead although no error reached us (a connection lost while the motion
# started was seen to hang so), and the connection counts as lost.
STATE_STALL_S = 1.0
STOP_TIMEOUT_S = 4.0  # TorqueStopMotion ramps for 0.2 s and gives up after max_duration = 2 s
MOVE_TIMEOUT_S = 15.0  # a reset move of < 0.3 m at 0.2 of the FR3's dynamics takes well under a second
SETTLE_TIMEOUT_S = 2.0  # after a reset move, wait at most this long for the joints to come to rest
AT_REST_JOINT_LAG_RAD = 0.004  # |q - q_d| at rest; franky-sim's joint PD chatters within ~2 mrad
EE_FRAME_SETTLE_S = 0.3  # robot time; see _set_end_effector
EE_FRAME_TIMEOUT_S = 3.0
# Run in a child process before franky connects in this one (see _probe_connect).
_PROBE = "import sys, franky; franky.Robot(sys.argv[1], realtime_config=franky.RealtimeConfig.Ignore)"
BACKOFF_FIRST_S = 0.5  # reconnect waits 0.5, 1, 2, 4, 5, 5 ... seconds between attempts
BACKOFF_MAX_S = 5.0
# A weak joint spring towards the posture at the start of tracking, projected into the nullspace: keeps the redundant
# elbow from drifting over an episode without touching the Cartesian task (the in-process twin uses the same value).
NULLSPACE_STIFFNESS = 10.0
# franky's error clips (its defaults, stated): a distant target never asks for unbounded force.
TRANSLATIONAL_ERROR_CLIP_M = 0.1
ROTATIONAL_ERROR_CLIP_RAD = 0.25
# The Franka Hand's limits (its datasheet): the fingers open at most 80 mm together and move at most 0.1 m/s. A
# command beyond them is a unit slip (80 for 0.08 m), refused here rather than left to the gripper to reject or clamp.
GRIPPER_MAX_WIDTH_M = 0.08
GRIPPER_MAX_SPEED_M_S = 0.1
# libfranka's NetworkException surfaces as a bare RuntimeError with this text on some state reads.
_NET_MESSAGE = "Net Exception"


def to_franky_quat(quat_wxyz: np.ndarray, *, near: np.ndarray | None = None) -> np.ndarray:
    """(w, x, y, z) -> franky's (x, y, z, w). With `near` (franky order), the sign is chosen on the same side as
    `near`: q and -q are one rotation, but franky's Cartesian motion planner interpolates the quaternion as given and
    turns the hand a full circle for a flipped sign (measured in franky-sim: a 1 cm reset move ended 0.5 m away)."""
    w, x, y, z = np.asarray(quat_wxyz, dtype=np.float64)
    q = np.array([x, y, z, w])
    if near is not None and float(np.dot(q, np.asarray(near, dtype=np.float64).reshape(4))) < 0.0:
        q = -q
    return q


def from_franky_quat(quat_xyzw: np.ndarray) -> np.ndarray:
    """franky's (x, y, z, w) -> (w, x, y, z), sign chosen with w >= 0."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64).reshape(4)
    return quat_canonical(np.array([w, x, y, z]))


def checked_pose(pos: np.ndarray, quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A finite position (3,) and a unit quaternion (4,) (w, x, y, z); anything else is refused with ValueError."""
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(quat, dtype=np.float64)
    if p.shape != (3,) or q.shape != (4,) or not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise ValueError(f"pose must be a finite position (3,) and quaternion (4,), got {p!r}, {q!r}")
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise ValueError(f"quaternion {q!r} has no direction")
    return p, q / norm


def ee_offset_along_z(distance_m: float) -> np.ndarray:
    """NE_T_EE (4x4) moving the end-effector frame `distance_m` along the nominal end effector's z axis (the hand's
    TCP -> the tip of a tool held straight between the fingers)."""
    if not math.isfinite(distance_m):
        raise ValueError(f"distance must be finite, got {distance_m}")
    offset = np.eye(4)
    offset[2, 3] = distance_m
    return offset


class FrankyRobot:
    """The Robot protocol through franky. Nothing connects until `connect()` (or `with`); one thread uses it.

    cfg: host, real-time kernel requirement, gripper, reconnect attempts, reset speed.
    impedance: tracking gains (x, y, z, roll, pitch, yaw).
    ee_offset: NE_T_EE (4x4 homogeneous), set on every connection so that poses read and commanded are the tool's
        (for peg insertion: the peg tip); None leaves the end effector configured in Desk.
    sleep: waits between reconnect attempts (a test can pass a fake).
    """

    def __init__(
        self,
        cfg: FrankaConfig,
        *,
        impedance: ImpedanceConfig,
        ee_offset: np.ndarray | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if ee_offset is not None:
            ee_offset = np.asarray(ee_offset, dtype=np.float64)
            if ee_offset.shape != (4, 4) or not np.all(np.isfinite(ee_offset)):
                raise ValueError(f"ee_offset must be a finite 4x4 transform, got {ee_offset!r}")
            if not np.allclose(ee_offset[3], [0.0, 0.0, 0.0, 1.0]) or not np.allclose(
                ee_offset[:3, :3] @ ee_offset[:3, :3].T, np.eye(3), atol=1e-6
            ):
                raise ValueError(f"ee_offset must be a rigid transform (rotation + translation), got {ee_offset!r}")
        self.cfg = cfg
        self._stiffness = np.array(impedance.stiffness, dtype=np.float64)
        self._damping = np.array(impedance.damping, dtype=np.float64)
        self._ee_offset = ee_offset
        self._sleep = sleep
        self._robot: franky.Robot | None = None
        self._gripper: franky.Gripper | None = None
        self._gripper_future: franky.BoolFuture | None = None
        self._motion: franky.CartesianImpedanceTrackingMotion | None = None
        self._connected_once = False
        self._last_robot_time, self._last_advance = float("nan"), 0.0  # see _check_stall

    # ------------------------------------------------------------------------------------------------------------
    # Connection
    # ------------------------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether a live franky client exists (False after a lost connection until `reconnect()`)."""
        return self._robot is not None

    @property
    def streaming(self) -> bool:
        """Whether the tracking motion was started and not stopped since."""
        return self._motion is not None

    def connect(self) -> None:
        """Connect to `cfg.host` (idempotent); raises RobotConnectionLost when nothing answers there.

        Beware: franky's constructor waits without a timeout for the server's answer, holding the GIL. A franky-sim
        server serves one client at a time, so a second client (another process, or a franky Robot this process
        still holds) hangs here. That is why no franky object is ever kept in a local variable or a closure of this
        class: a traceback would keep it, and its connection, alive after `release()`.
        """
        if self._robot is not None:
            return
        _probe_connect(self.cfg.host, self.cfg.connect_timeout_s)
        realtime = franky.RealtimeConfig.Enforce if self.cfg.realtime else franky.RealtimeConfig.Ignore
        robot: franky.Robot | None = None
        try:
            with self._translate("connect"):
                robot = franky.Robot(self.cfg.host, realtime_config=realtime)
                if self._ee_offset is not None:
                    # Set on every connection: a new server (or a rebooted arm) starts with the default end effector.
                    _set_end_effector(robot, self._ee_offset)
                self._gripper = franky.Gripper(self.cfg.host) if self.cfg.gripper else None
        except BaseException as exc:
            # Close the half-made connection now, not when the traceback is collected: drop our reference and the
            # ones in the finished frames the traceback holds (_set_end_effector's argument).
            robot = None
            self._gripper = None
            traceback.clear_frames(exc.__traceback__)
            raise
        self._robot, robot = robot, None
        self._gripper_future = None
        self._motion = None
        self._connected_once = True

    def reconnect(self) -> None:
        """Drop the (dead) client and build a new one: up to `cfg.reconnect_attempts` tries, waiting 0.5 s, 1 s,
        2 s, ... (at most 5 s) between them. Raises RobotConnectionLost, chaining the last error, when all fail."""
        self.release()
        last: RobotConnectionLost | None = None
        for attempt in range(self.cfg.reconnect_attempts):
            if attempt > 0:
                self._sleep(min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
            try:
                self.connect()
                log.warning("reconnected to %s after %d attempt(s)", self.cfg.host, attempt + 1)
                return
            except RobotFault as exc:
                last = exc if isinstance(exc, RobotConnectionLost) else RobotConnectionLost(str(exc))
                log.warning(
                    "reconnect attempt %d/%d to %s failed: %s",
                    attempt + 1,
                    self.cfg.reconnect_attempts,
                    self.cfg.host,
                    exc,
                )
        raise RobotConnectionLost(
            f"could not reconnect to {self.cfg.host} in {self.cfg.reconnect_attempts} attempt(s)"
        ) from last

    def release(self) -> None:
        """Forget the franky client and gripper without talking to them (their destructors close the sockets)."""
        self._motion = None
        self._gripper_future = None
        self._gripper = None
        self._robot = None

    def close(self) -> None:
        """Stop any motion, then release; the release happens even when stopping fails (the error propagates)."""
        try:
            if self._robot is not None:
                self.stop()
        finally:
            self.release()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # Leaving on an error: stop and release, but never let a second error replace the one that brought us here.
        try:
            self.close()
        except Exception as stop_error:  # logged; the original error propagates
            log.error("stopping the robot while leaving on %r failed: %r", exc, stop_error)

    # ------------------------------------------------------------------------------------------------------------
    # Robot protocol
    # ------------------------------------------------------------------------------------------------------------
    def state(self) -> RobotState:
        """The newest measurement: end-effector pose (w, x, y, z quaternion), joints, robot clock. Raises RobotFault
        when the tracking motion has stopped on an error since the last call."""
        self._live()
        self._check_motion()
        s = self._call("read state", lambda: self._live().state)
        self._check_stall(float(s.time.to_sec()))
        pose = s.O_T_EE
        return RobotState(
            ee_pos=np.array(pose.translation, dtype=np.float64).reshape(3),
            ee_quat=from_franky_quat(pose.quaternion),
            joint_pos=np.array(s.q, dtype=np.float64).reshape(7),
            joint_vel=np.array(s.dq, dtype=np.float64).reshape(7),
            time=float(s.time.to_sec()),
        )

    def command(self, target_pos: np.ndarray, target_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream a new impedance target; returns the (pos, unit quat w-x-y-z) sent. A non-finite or malformed target
        is refused with ValueError before anything reaches franky. Never blocks on the motion."""
        pos, quat = checked_pose(target_pos, target_quat)
        self._live()
        if self._motion is None:
            self._start_tracking()
        else:
            self._check_motion()
        measured = self._call("read pose", lambda: self._live().state.O_T_EE.quaternion)
        target = franky.CartesianReference(target=franky.Affine(pos, to_franky_quat(quat, near=measured)))
        motion = self._motion
        assert motion is not None
        self._call("set the tracking reference", lambda: motion.set_reference(target))
        return pos.copy(), quat.copy()

    def move_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        """Reset helper: stop tracking, then move in position mode (franky's `CartesianMotion`, at `cfg.reset_speed`
        of the FR3's dynamics) to the pose, and hold it. Returns once there and at rest; RobotFault when the move
        fails or does not finish within MOVE_TIMEOUT_S (the move is then stopped)."""
        pos, quat = checked_pose(pos, quat)
        self._live()
        self._stop_tracking()
        measured = self._call("read pose", lambda: self._live().state.O_T_EE.quaternion)
        motion = franky.CartesianMotion(
            franky.Affine(pos, to_franky_quat(quat, near=measured)),
            franky.ReferenceType.Absolute,
            relative_dynamics_factor=self.cfg.reset_speed,
        )
        self._call("start the reset move", lambda: self._live().move(motion, asynchronous=True))
        finished = self._call("finish the reset move", lambda: self._live().join_motion(timeout=MOVE_TIMEOUT_S))
        if not finished:
            self._preempt()
            raise RobotFault(f"reset move to {pos} did not finish within {MOVE_TIMEOUT_S:.0f} s; stopped")
        self._wait_at_rest()

    def stop(self) -> None:
        """Stop moving and hold the current pose: the tracking motion ramps out (`TorqueStopMotion`) and the robot
        holds where it came to rest. RobotFault when the motion had already stopped on an error."""
        self._live()
        self._stop_tracking()
        if self._call("check control", lambda: self._live().is_in_control):
            self._preempt()  # a reset move still running (after a timeout): preempt it

    def recover(self) -> bool:
        """Clear errors after a stop or a reflex (franky's automatic error recovery); True when the robot accepts
        commands again. The next `command` starts a new tracking motion from the measured pose."""
        self._live()
        self._motion = None
        if self._call("check control", lambda: self._live().is_in_control):
            self._preempt()
        else:
            # Collect the error that ended the last motion (franky keeps it for the next join); it is what we are
            # recovering from, already reported by command() or state().
            try:
                self._call("collect the last motion's error", lambda: self._live().join_motion(timeout=STOP_TIMEOUT_S))
            except RobotConnectionLost:
                raise
            except RobotFault as exc:
                log.info("recovering from: %s", describe(exc))
        recovered = bool(self._call("recover from errors", lambda: self._live().recover_from_errors()))
        return recovered and not bool(self._call("check errors", lambda: self._live().has_errors))

    # ------------------------------------------------------------------------------------------------------------
    # Gripper (optional, asynchronous; not used for peg insertion)
    # ------------------------------------------------------------------------------------------------------------
    def gripper_width(self) -> float:
        """The gripper's opening in metres."""
        self._live_gripper()
        return float(self._call("read the gripper", lambda: self._live_gripper().width))

    def move_gripper(self, width: float, *, speed: float = 0.05) -> None:
        """Start moving the fingers to `width` (m) at `speed` (m/s) and return; `wait_gripper` waits for it."""
        if not (math.isfinite(width) and math.isfinite(speed)) or width < 0 or speed <= 0:
            raise ValueError(f"gripper width must be >= 0 and speed > 0, got {width}, {speed}")
        if width > GRIPPER_MAX_WIDTH_M:
            raise ValueError(
                f"gripper width {width} m is beyond the Franka Hand's maximum opening {GRIPPER_MAX_WIDTH_M} m; "
                f"a width in [0, {GRIPPER_MAX_WIDTH_M}] m would be accepted"
            )
        if speed > GRIPPER_MAX_SPEED_M_S:
            raise ValueError(
                f"gripper speed {speed} m/s is above the Franka Hand's maximum {GRIPPER_MAX_SPEED_M_S} m/s; "
                f"a speed in (0, {GRIPPER_MAX_SPEED_M_S}] m/s would be accepted"
            )
        self._live_gripper()
        self._gripper_future = self._call("move the gripper", lambda: self._live_gripper().move_async(width, speed))

    def wait_gripper(self, timeout_s: float) -> bool:
        """Wait for the last gripper move; True when it finished and succeeded, False when it failed. RobotFault when
        it did not finish in time (it keeps going: franky's Gripper.stop() is never called, it wedges in sim)."""
        future = self._gripper_future
        if future is None:
            return True
        if not self._call("wait for the gripper", lambda: future.wait(timeout_s)):
            raise RobotFault(f"gripper move did not finish within {timeout_s} s")
        self._gripper_future = None
        return bool(self._call("gripper result", future.get))

    # ------------------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------------------
    def _live(self) -> franky.Robot:
        if self._robot is None:
            if self._connected_once:
                raise RobotConnectionLost(f"the connection to {self.cfg.host} was lost; call reconnect()")
            raise RuntimeError("FrankyRobot is not connected; call connect() or use it as a context manager")
        return self._robot

    def _live_gripper(self) -> franky.Gripper:
        self._live()
        if self._gripper is None:
            raise RuntimeError("no gripper: the config has franka.gripper = false")
        return self._gripper

    def _start_tracking(self) -> None:
        # Seed with the measured pose: whatever target comes next, the controller starts from where the arm is.
        s = self._call("read state", lambda: self._live().state)
        motion = franky.CartesianImpedanceTrackingMotion(
            translational_stiffness=float(self._stiffness[:3].max()),
            rotational_stiffness=float(self._stiffness[3:].max()),
            posture_task=franky.PostureTask(np.asarray(s.q, dtype=np.float64), NULLSPACE_STIFFNESS),
            translational_error_clip=np.full(3, TRANSLATIONAL_ERROR_CLIP_M),
            rotational_error_clip=np.full(3, ROTATIONAL_ERROR_CLIP_RAD),
        )
        motion.set_gains(franky.CartesianImpedanceGains.diagonal(self._stiffness, self._damping))
        motion.set_reference(franky.CartesianReference(target=s.O_T_EE))
        self._call("start the tracking motion", lambda: self._live().move(motion, asynchronous=True))
        self._motion = motion

    def _check_motion(self) -> None:
        """Raise the error that ended the tracking motion, if it ended."""
        if self._motion is None or self._call("check control", lambda: self._live().is_in_control):
            return
        self._motion = None
        # The motion thread is gone; join_motion raises what stopped it (returns at once).
        self._call("join the ended tracking motion", lambda: self._live().join_motion(timeout=STOP_TIMEOUT_S))
        raise RobotFault("the tracking motion ended without an error (nothing should end it but stop())")

    def _check_stall(self, robot_time: float) -> None:
        """RobotConnectionLost (client dropped) when the tracking loop's robot time stood still for STATE_STALL_S."""
        now = time.monotonic()
        if self._motion is None or robot_time != self._last_robot_time:
            self._last_robot_time, self._last_advance = robot_time, now
            return
        stalled = now - self._last_advance
        if stalled > STATE_STALL_S:
            self._lost()
            raise RobotConnectionLost(
                f"read state: the robot's time has not advanced for {stalled:.1f} s while tracking; the connection to "
                f"{self.cfg.host} counts as lost"
            )

    def _stop_tracking(self) -> None:
        if self._motion is None:
            return
        self._check_motion()  # an error that already ended the motion is reported, not hidden by the stop
        self._motion = None
        self._call("stop the tracking motion", lambda: self._live().move(franky.TorqueStopMotion(), asynchronous=True))
        if not self._call("join the stop", lambda: self._live().join_motion(timeout=STOP_TIMEOUT_S)):
            self._preempt()
            raise RobotFault(f"the tracking motion did not stop within {STOP_TIMEOUT_S:.0f} s; preempted")

    def _preempt(self) -> None:
        """franky's hard stop; its "Move command preempted" error is the expected outcome, not a fault."""
        self._motion = None
        self._call("stop", lambda: self._live().stop())
        try:
            self._call("join after stop", lambda: self._live().join_motion(timeout=STOP_TIMEOUT_S))
        except RobotFault as exc:
            if isinstance(exc, RobotConnectionLost) or "preempted" not in str(exc.__cause__):
                raise

    def _wait_at_rest(self) -> None:
        """Wait until the joints have caught up with the move's last commanded configuration (|q - q_d| small).

        Why: franky-sim ends a Cartesian move with the joints still ~0.02 rad and ~0.2 rad/s behind its inverse
        kinematics (its joint PD catches up in ~0.3 s); tracking started at once swung the tip by ~2 mm (measured).
        Joint speed is no test of rest there: its joint PD then chatters at ~0.08 rad/s with 2 mrad amplitude, the
        tip still. A real arm ends its motions on the commanded configuration, so this returns at once. Never a
        fault: a slow settle is logged and the reset goes on."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            s = self._call("read joints", lambda: self._live().state)
            lag = float(np.abs(np.asarray(s.q) - np.asarray(s.q_d)).max())
            if lag < AT_REST_JOINT_LAG_RAD:
                return
            if time.monotonic() > deadline:
                log.warning("joints still %.4f rad from the reset pose %.1f s after the move", lag, SETTLE_TIMEOUT_S)
                return
            time.sleep(0.01)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with self._translate(what):
            return fn()

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """franky's errors -> RobotConnectionLost (and the client is dropped) or RobotFault, original chained."""
        try:
            yield
        except RobotFault:
            raise  # already ours (a nested call)
        except franky.NetworkException as exc:
            self._lost()
            raise RobotConnectionLost(f"{what}: no connection to {self.cfg.host} ({exc})") from exc
        except RuntimeError as exc:
            if _NET_MESSAGE not in str(exc):
                raise
            self._lost()
            raise RobotConnectionLost(f"{what}: no connection to {self.cfg.host} ({exc})") from exc
        except _FRANKY_ERRORS as exc:
            raise RobotFault(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _lost(self) -> None:
        if self._robot is not None:
            log.error(
                "connection to %s lost; the franky client is dropped (reconnect() builds a new one)", self.cfg.host
            )
        self.release()


def _set_end_effector(robot: franky.Robot, ne_t_ee: np.ndarray) -> None:
    """Set NE_T_EE, then wait until the robot reports it and EE_FRAME_SETTLE_S of robot time has passed.

    Why wait: state packets already on their way still carry the old frame (measured: the first read after `set_ee`
    often does). And franky-sim differentiates the commanded pose every millisecond, so the frame's jump shows up as
    a decaying phantom velocity (the offset / 1 ms, filtered by 0.95 per ms) that franky's Cartesian motion planner
    takes as its initial velocity: a reset move started right after `set_ee` swung the arm through ~1 m. After 0.3 s
    the phantom is below a micrometre per second. A real arm has no such artefact; the wait costs it 0.3 s once.
    """
    robot.set_ee(ne_t_ee.flatten(order="F").tolist())  # column-major, as libfranka wants it
    deadline = time.monotonic() + EE_FRAME_TIMEOUT_S
    settled_at: float | None = None
    while True:
        s = robot.state
        if settled_at is None and np.allclose(np.asarray(s.NE_T_EE.matrix), ne_t_ee, atol=1e-9):
            settled_at = s.time.to_sec() + EE_FRAME_SETTLE_S
        if settled_at is not None and s.time.to_sec() >= settled_at:
            return
        if time.monotonic() > deadline:
            raise RobotFault(f"the robot did not settle on the new end-effector frame within {EE_FRAME_TIMEOUT_S} s")
        time.sleep(0.01)


# Everything franky raises for a robot-side problem (the base class covers Control, Command, Protocol, Realtime...;
# the others derive straight from Exception).
_FRANKY_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls
    for cls in (
        getattr(franky, "Exception", None),
        getattr(franky, "InvalidMotionTypeException", None),
        getattr(franky, "MotionReuseException", None),
        getattr(franky, "TorqueSignalTimeoutException", None),
        getattr(franky, "GripperException", None),
    )
    if isinstance(cls, type)
)


def describe(exc: BaseException) -> str:
    """A one-line account of a fault and its franky cause, for the operator's screen."""
    cause: Any = exc.__cause__
    return f"{type(exc).__name__}: {exc}" + (f" (cause: {type(cause).__name__}: {cause})" if cause else "")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def _probe_connect(host: str, timeout_s: float) -> None:
    """Connect once from a child process that is killed after `timeout_s`, before this process connects.

    franky's constructor waits for the robot's answer without a timeout and holds the GIL meanwhile, so a host that
    accepts the connection but never answers (an arm whose controller hangs) would freeze this process, Ctrl-C
    included. Only for robots: a loopback host is a franky-sim server, which serves one client at a time and is
    watched by its own process. RobotConnectionLost naming the host when the child does not connect in time or fails.
    """
    if timeout_s <= 0 or _is_loopback(host):
        return
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PROBE, host], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise RobotConnectionLost(
            f"no answer from the robot at {host} within {timeout_s:g} s (env.franka.connect_timeout_s): is the arm "
            "on, FCI enabled in Desk, and the address right?"
        ) from None
    if child.returncode != 0:
        lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
        raise RobotConnectionLost(
            f"cannot connect to the robot at {host}: {lines[-1] if lines else f'exit status {child.returncode}'}"
        )
