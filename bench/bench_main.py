"""The bench scripts' entry point: an input mistake (a missing or invalid config, an unusable log or file) is one line
on stderr and exit 2, as the robot-rl commands say theirs; anything else keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from robot_rl.actor.replay import ReplayInputError
from robot_rl.config import ConfigError
from robot_rl.episodes import EpisodeFileError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, ReplayInputError, EpisodeFileError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
