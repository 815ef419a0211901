"""The robot interface every arm implementation (MuJoCo twin, franky, replay) offers to `RobotEnv` (design §7).

Poses are in the robot's base frame: positions in metres, orientations as unit quaternions (w, x, y, z). The
end-effector point is the tool-centre point the task cares about (for peg insertion: the peg tip).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np


class ClosesOnExit:
    """`with thing:` gives the thing and calls its `close()` on the way out; an exception passes through."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RobotState:
    """One measurement of the arm."""

    ee_pos: np.ndarray
    """Tool-centre point position (3,), metres, base frame."""
    ee_quat: np.ndarray
    """Tool-centre point orientation (4,), unit quaternion (w, x, y, z), base frame."""
    joint_pos: np.ndarray
    """Joint positions (7,), radians."""
    joint_vel: np.ndarray
    """Joint velocities (7,), radians per second."""
    time: float
    """Seconds on the robot's clock (simulated time for a twin)."""


@dataclass(frozen=True)
class Pose:
    """A target or reference pose: position (3,) in metres and unit quaternion (w, x, y, z)."""

    pos: np.ndarray
    quat: np.ndarray


@runtime_checkable
class Robot(Protocol):
    """An arm that follows streamed Cartesian targets with an impedance law.

    `command` only sets the target the controller tracks; it never blocks. The caller keeps the control rate (the
    real robot runs in real time; a simulated twin also offers `advance(seconds)` to move its clock).
    """

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def state(self) -> RobotState:
        """The newest measurement."""
        ...

    def command(self, target_pos: np.ndarray, target_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream a new impedance target; returns the (pos, quat) actually sent after any clipping."""
        ...

    def move_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        """Bring the end effector to a pose and hold it there (for resets); returns once it is there."""
        ...

    def stop(self) -> None:
        """Stop moving and hold the current pose."""
        ...

    def recover(self) -> bool:
        """Clear errors after a stop or a reflex; True when the robot accepts commands again."""
        ...


class RobotFault(RuntimeError):
    """The robot stopped: a reflex, a control error, or a rejected command. The episode failed; call `recover()`
    (or `reconnect()` for a `RobotConnectionLost`) and reset. A driver chains its own exception as `__cause__`."""


class RobotConnectionLost(RobotFault):
    """The robot (or its simulator server) is unreachable; the client is dead. Call `reconnect()`."""
