"""`ReplayedOperator`: operator events from an episode log, released at the step numbers they were logged at.

`robot-rl replay` runs a recorded run back through mock hardware; the operator's presses have to land on the same
steps as they did on the robot, or the replayed episodes end in different places. The step number is whatever counter
the actor logged the events with: call `advance(step)` with the same counter, then `poll()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from robot_rl.hardware.interfaces import ClosesOnExit
from robot_rl.hardware.operator.events import OperatorEvent, OperatorInput

Schedule = Mapping[int, OperatorEvent] | Iterable[tuple[int, OperatorEvent]]
"""Events by step: a mapping {step: event}, or (step, event) pairs when one step holds several events."""


class StepSchedule:
    """Events due at step numbers, released once each, in step order (events of one step keep their given order)."""

    def __init__(self, events: Schedule) -> None:
        pairs = list(events.items()) if isinstance(events, Mapping) else list(events)
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"operator events must be (step, OperatorEvent) pairs, got {pair!r}")
            step, event = pair
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"operator event step must be an int >= 0, got {step!r}")
            if not isinstance(event, OperatorEvent):
                raise ValueError(f"operator event at step {step} must be an OperatorEvent, got {event!r}")
        self._pairs: list[tuple[int, OperatorEvent]] = sorted(pairs, key=lambda p: p[0])  # stable
        self._next = 0

    def due(self, step: int) -> list[OperatorEvent]:
        """The events at steps <= `step` not released before."""
        start = self._next
        while self._next < len(self._pairs) and self._pairs[self._next][0] <= step:
            self._next += 1
        return [event for _, event in self._pairs[start : self._next]]

    @property
    def remaining(self) -> int:
        """Events not released yet."""
        return len(self._pairs) - self._next


def track_pause(paused: bool, event: OperatorEvent) -> bool:
    """Whether the operator is paused after `event`."""
    if event is OperatorEvent.PAUSE:
        return True
    if event is OperatorEvent.RESUME:
        return False
    return paused


class ReplayedOperator(ClosesOnExit):
    """Replays logged operator events; `advance(step)` to the actor's step, then `poll()`.

    The step starts at 0, so events logged at step 0 come with the first poll.
    """

    def __init__(self, events: Schedule, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._schedule = StepSchedule(events)
        self._clock = clock
        self._step = 0
        self._paused = False

    def close(self) -> None:
        """Nothing to release (`with` works through ClosesOnExit)."""

    @property
    def step(self) -> int:
        return self._step

    @property
    def remaining(self) -> int:
        """Logged events not replayed yet (non-zero at the end: the replay stopped before the log did)."""
        return self._schedule.remaining

    def advance(self, step: int) -> None:
        """Move to the actor's step `step`; steps never go back (a replay that rewinds is a bug in the caller)."""
        if step < self._step:
            raise ValueError(f"ReplayedOperator.advance: step {step} is before the current step {self._step}")
        self._step = step

    @property
    def paused(self) -> bool:
        return self._paused

    def poll(self) -> list[OperatorInput]:
        now = self._clock()
        inputs = [OperatorInput(event, now) for event in self._schedule.due(self._step)]
        for i in inputs:
            self._paused = track_pause(self._paused, i.event)
        return inputs

    def hint(self) -> str:
        state = "PAUSED " if self._paused else ""
        return f"{state}replaying operator events (step {self._step}, {self.remaining} left)"
