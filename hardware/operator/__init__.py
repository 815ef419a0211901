"""The operator: who says an episode succeeded, must be reset, is paused, or that the run is over (design §7).

- `TerminalOperator`: a person at the actor's terminal (keys, non-blocking, works over SSH with no X server).
- `ScriptedOperator`: the simulation's twin, fed by the env's success detector.
- `ReplayedOperator`: events from a log, released at the steps they happened.

`make_operator` builds the one the config asks for.
"""

from robot_rl.hardware.operator.events import (
    EVENT_CODES,
    EVENTS_BY_CODE,
    Operator,
    OperatorError,
    OperatorEvent,
    OperatorInput,
    apply_operator_events,
    logged_event,
)
from robot_rl.hardware.operator.factory import make_operator
from robot_rl.hardware.operator.keys import TerminalOperator
from robot_rl.hardware.operator.replay import ReplayedOperator
from robot_rl.hardware.operator.scripted import ScriptedOperator

__all__ = [
    "EVENTS_BY_CODE",
    "EVENT_CODES",
    "Operator",
    "OperatorError",
    "OperatorEvent",
    "OperatorInput",
    "ReplayedOperator",
    "ScriptedOperator",
    "TerminalOperator",
    "apply_operator_events",
    "logged_event",
    "make_operator",
]
