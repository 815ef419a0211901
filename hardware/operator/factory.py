"""`make_operator`: the operator the config asks for, built in the actor's composition root."""

from __future__ import annotations

import time
from collections.abc import Callable

from robot_rl.config import OperatorConfig
from robot_rl.hardware.operator.events import Operator
from robot_rl.hardware.operator.keys import HasFileno, TerminalOperator
from robot_rl.hardware.operator.replay import ReplayedOperator, Schedule
from robot_rl.hardware.operator.scripted import ScriptedOperator


def make_operator(
    cfg: OperatorConfig,
    *,
    stream: HasFileno | int | None = None,
    allow_no_tty: bool = False,
    clock: Callable[[], float] = time.monotonic,
    events: Schedule | None = None,
) -> Operator:
    """keys -> `TerminalOperator`, scripted -> `ScriptedOperator`, replay -> `ReplayedOperator`.

    `stream` and `allow_no_tty` concern the terminal only (`allow_no_tty` is ignored by the twins: they need none);
    `events` are the scripted events, or the logged events a replay needs. Options that cannot apply are refused.
    """
    if cfg.kind == "keys":
        if events is not None:
            raise ValueError("operator.kind=keys takes its events from the keyboard; `events` cannot apply")
        return TerminalOperator(cfg.keys, stream=stream, allow_no_tty=allow_no_tty, clock=clock)
    if stream is not None:
        raise ValueError(f"operator.kind={cfg.kind} reads no terminal; `stream` only applies to kind=keys")
    if cfg.kind == "scripted":
        return ScriptedOperator(events=() if events is None else events, clock=clock)
    if events is None:
        raise ValueError("operator.kind=replay needs the logged events (`events`: (step, OperatorEvent) pairs)")
    return ReplayedOperator(events, clock=clock)
