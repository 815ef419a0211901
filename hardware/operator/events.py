"""What an operator can say, and the interface every operator (keys, scripted, replayed) offers to the actor.

The actor polls once per control step; `poll` never blocks, so a person who presses nothing costs the 10 Hz loop
nothing. Events are edges, not levels: SUCCESS means "this episode just succeeded", PAUSE and RESUME come in pairs,
and `paused` says which of the two came last.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable


class OperatorEvent(enum.Enum):
    """One thing the operator says. The values are what episode logs store."""

    SUCCESS = "success"
    """The episode succeeded: end it with reward 1 (terminated, no bootstrap)."""
    FAILURE = "failure"
    """The episode failed or the scene must be reset: end it now."""
    PAUSE = "pause"
    """Hold the robot and stop acting until RESUME."""
    RESUME = "resume"
    """Continue after a PAUSE."""
    QUIT = "quit"
    """End the run: stop the robot, flush logs, exit."""


@dataclass(frozen=True)
class OperatorInput:
    """One event as it was received."""

    event: OperatorEvent
    time_s: float
    """When `poll` saw it, on the operator's clock (monotonic seconds by default)."""
    key: str | None = None
    """The key that produced it ("^C" for Ctrl-C), or None for scripted and replayed events."""


class OperatorError(RuntimeError):
    """The operator cannot work here (for example: keys were asked for but stdin is not a terminal)."""


@runtime_checkable
class Operator(Protocol):
    """A source of operator events; use it as a context manager around the actor's loop."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def poll(self) -> list[OperatorInput]:
        """Every event since the last call, oldest first; never blocks (an empty list when nothing happened)."""
        ...

    @property
    def paused(self) -> bool:
        """True between a PAUSE and the next RESUME."""
        ...

    def hint(self) -> str:
        """A short text for the actor's status line: the keys, or a pending question such as a quit confirmation."""
        ...
