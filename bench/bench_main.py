"""The bench scripts' entry point: an input mistake (a missing or invalid config, an unusable log or file) is one line
on stderr and exit 2, as the robot-rl commands say theirs; anything else keeps its traceback."""

from __future__ import annotations

import argparse
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


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a number of at least 0")
    return value
