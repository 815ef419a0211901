"""`ScriptedOperator`: the simulation's operator, fed by the env's success detector.

On the robot a person presses "success"; in simulation the task knows. The actor calls `observe(info)` after every
`env.step` and polls as it would poll the keys, so the actor's code path is the same for both. Optional scripted
events at given steps let tests pause, fail or quit a run without a person.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from robot_rl.hardware.interfaces import ClosesOnExit
from robot_rl.hardware.operator.events import OperatorEvent, OperatorInput
from robot_rl.hardware.operator.replay import Schedule, StepSchedule, track_pause


class ScriptedOperator(ClosesOnExit):
    """SUCCESS when `info[success_key]` becomes true; scripted `events` at step numbers (the number of `observe`
    calls so far, 0 before the first); never pauses unless scripted to.
    """

    def __init__(
        self,
        *,
        events: Schedule = (),
        clock: Callable[[], float] = time.monotonic,
        success_key: str = "is_success",
    ) -> None:
        self._schedule = StepSchedule(events)
        self._clock = clock
        self._success_key = success_key
        self._step = 0
        self._succeeded = False
        self._queue: list[OperatorInput] = []
        self._paused = False

    def close(self) -> None:
        """Nothing to release (`with` works through ClosesOnExit)."""

    @property
    def step(self) -> int:
        """How many steps were observed."""
        return self._step

    def observe(self, info: Mapping[str, Any]) -> None:
        """One env step happened; `info` is what `env.step` returned."""
        if self._success_key not in info:
            # A missing key would otherwise mean "never succeeds", silently: every episode would run to the limit.
            raise KeyError(f"ScriptedOperator needs info[{self._success_key!r}] from the env, got keys {sorted(info)}")
        self._step += 1
        success = bool(info[self._success_key])
        if success and not self._succeeded:  # the edge, not the level: one SUCCESS per success
            self._queue.append(OperatorInput(OperatorEvent.SUCCESS, self._clock()))
        self._succeeded = success

    def new_episode(self) -> None:
        """The env was reset: a success on the very first step of the next episode counts again."""
        self._succeeded = False

    @property
    def paused(self) -> bool:
        return self._paused

    def poll(self) -> list[OperatorInput]:
        now = self._clock()
        inputs = self._queue + [OperatorInput(event, now) for event in self._schedule.due(self._step)]
        self._queue = []
        for i in inputs:
            self._paused = track_pause(self._paused, i.event)
        return inputs

    def hint(self) -> str:
        return "PAUSED (scripted operator)" if self._paused else "scripted operator (sim success detector)"
