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


# Operator events as episode logs store them per step (extras/operator_event).
EVENT_CODES: dict[OperatorEvent | None, int] = {
    None: 0,
    OperatorEvent.SUCCESS: 1,
    OperatorEvent.FAILURE: 2,
    OperatorEvent.PAUSE: 3,
    OperatorEvent.RESUME: 4,
    OperatorEvent.QUIT: 5,
}
EVENTS_BY_CODE: dict[int, OperatorEvent] = {code: event for event, code in EVENT_CODES.items() if event is not None}
# The event a step logs when several came in it: the one that decided its outcome.
_LOGGED_FIRST = (OperatorEvent.SUCCESS, OperatorEvent.FAILURE, OperatorEvent.QUIT, OperatorEvent.PAUSE,
                 OperatorEvent.RESUME)  # fmt: skip


def apply_operator_events(
    events: list[OperatorEvent], reward: float, terminated: bool, truncated: bool
) -> tuple[float, bool, bool]:
    """One control step's operator events applied to its (reward, terminated, truncated): success ends the episode
    terminated with reward 1 (the operator judges success on the robot), failure or quit end it truncated; pause and
    resume only hold the loop. The outcome does not depend on the events' order: any success wins."""
    for event in events:
        if event is OperatorEvent.SUCCESS and not terminated:
            reward, terminated, truncated = 1.0, True, False
        elif event in (OperatorEvent.FAILURE, OperatorEvent.QUIT) and not terminated:
            truncated = True
    return reward, terminated, truncated


def logged_event(events: list[OperatorEvent]) -> OperatorEvent | None:
    """The one event a step's log records: of those that came in the step, the one that decided its outcome (success
    over failure over quit over pause over resume). Applied alone, it gives what all of them gave."""
    return next((event for event in _LOGGED_FIRST if event in events), None)


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
