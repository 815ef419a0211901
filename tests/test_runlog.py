"""eval.csv as read back for plots and resumes: every row checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robot_rl.config import ConfigError
from robot_rl.runlog import EVAL_COLUMNS, read_eval_csv

GOOD = {
    "env_steps": "100",
    "learner_steps": "50",
    "wall_s": "12.5",
    "success_rate": "0.5",
    "bc_action_fraction": "0.25",
    "episodes": "20",
    "phase": "online",
}


def _csv(path: Path, *rows: dict[str, str]) -> Path:
    lines = [",".join(EVAL_COLUMNS)] + [",".join(row[c] for c in EVAL_COLUMNS) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("success_rate", "nan", "success_rate nan is not a rate in [0, 1]"),
        ("success_rate", "7.5", "success_rate 7.5 is not a rate in [0, 1]"),
        ("bc_action_fraction", "-0.1", "bc_action_fraction -0.1 is not a rate in [0, 1]"),
        ("episodes", "-3", "episodes -3 is negative"),
        ("wall_s", "inf", "wall_s inf is not finite"),
    ],
)
def test_a_row_out_of_range_is_named_not_plotted(tmp_path: Path, field: str, value: str, said: str) -> None:
    path = _csv(tmp_path / "eval.csv", GOOD, {**GOOD, field: value}, GOOD)
    with pytest.raises(ConfigError, match=rf"line 3 is damaged \({re.escape(said)}\)"):
        read_eval_csv(path)
    rows = read_eval_csv(_csv(tmp_path / "good.csv", GOOD, {**GOOD, "success_rate": "1.0"}))
    assert [r.success_rate for r in rows] == [0.5, 1.0]
