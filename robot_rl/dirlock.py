"""One process per run directory: an exclusive lock on `DIR/.lock`, held for the process's life.

Two actors writing one `--out` would share a run id, a spill and episode numbers (the second one's first episode log
collides with the first one's, and the running actor, the one driving the arm, is the one that fails). Two learners
on one run directory would interleave their transition logs. The lock is an advisory `flock`: the kernel drops it
when the process exits, however it exits, so a killed process never leaves a stale lock behind. The file holds the
holder's pid and command for the refusal message; its content is never trusted for the decision.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import IO

from robot_rl.config import ConfigError

LOCK_FILE = ".lock"


class DirectoryInUse(ConfigError):
    """Another process holds the run directory; the message names it and says what to do."""


class DirectoryLock:
    """The exclusive lock on one directory (created if missing); `release` (or process exit) frees it."""

    def __init__(self, directory: Path, *, what: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_FILE
        self._file: IO[str] | None = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise DirectoryInUse(
                f"{directory} is in use by {holder}: one {what} per directory. Stop that process first, or give "
                "this one another directory"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])})\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_only_the_lock(directory: Path) -> bool:
    """Whether `directory` holds nothing but (at most) the lock file: a run that wrote nothing yet."""
    return not any(p.name != LOCK_FILE for p in directory.iterdir())
