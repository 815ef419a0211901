"""How the services stop on signals, alone in a terminal or supervised by the demo.

A terminal's Ctrl-C reaches a whole process group: run alone, a service stops on SIGINT or SIGTERM. Started by the
demo (`SUPERVISED_ENV` set to "1" in its environment), it ignores SIGINT and the demo stops it with SIGTERM, in order:
the actor first, so that its last chunks are acknowledged while the learner still serves, then the learner.
"""

from __future__ import annotations

import signal

SUPERVISED_ENV = "ROBOT_RL_SUPERVISED"


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, and SIGINT unless it is ignored (a supervised service)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGINT, signal.SIGTERM)
