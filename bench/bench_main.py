"""The bench scripts' entry point: an input mistake (a missing or invalid config, an unusable log or file) is one line
on stderr and exit 2, as the robot-rl commands say theirs; anything else keeps its traceback."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robot_rl.actor.replay import ReplayInputError
from robot_rl.config import ConfigError
from robot_rl.episodes import EpisodeFileError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, ReplayInputError, EpisodeFileError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _checked(kind: type, ok: Callable[[Any], bool], refusal: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, refused with `refusal` (formatted with the value) unless `ok` holds."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(refusal.format(value))
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "{} is not a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "{} is negative")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "{} is not a positive number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "{} is not a number of at least 0")
