"""eval.csv as read back for plots and resumes: every row checked; the status line outside a terminal."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from robot_rl.config import ConfigError
from robot_rl.runlog import EVAL_COLUMNS, StatusLine, curve_points, read_eval_csv

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
        ("env_steps", "12x", "env_steps '12x' is not an integer"),
        ("wall_s", "soon", "wall_s 'soon' is not a number"),
    ],
)
def test_a_row_out_of_range_is_named_not_plotted(tmp_path: Path, field: str, value: str, said: str) -> None:
    path = _csv(tmp_path / "eval.csv", GOOD, {**GOOD, field: value}, GOOD)
    with pytest.raises(ConfigError, match=rf"line 3 is invalid \({re.escape(said)}\); fix or remove that line"):
        read_eval_csv(path)
    # The last row too: every column is there, so it is no row cut off by a kill.
    last = _csv(tmp_path / "last.csv", GOOD, {**GOOD, field: value})
    with pytest.raises(ConfigError, match=rf"line 3 is invalid \({re.escape(said)}\)"):
        read_eval_csv(last, lambda line: pytest.fail(f"warned: {line}"))
    rows = read_eval_csv(_csv(tmp_path / "good.csv", GOOD, {**GOOD, "success_rate": "1.0"}))
    assert [r.success_rate for r in rows] == [0.5, 1.0]


def test_only_a_last_row_with_columns_missing_or_no_line_break_is_cut_off(tmp_path: Path) -> None:
    warned: list[str] = []
    head = ",".join(EVAL_COLUMNS) + "\n" + ",".join(GOOD[c] for c in EVAL_COLUMNS) + "\n"
    missing = tmp_path / "missing.csv"
    missing.write_text(head + "200,100,3.0\n")  # columns missing, even with its line break
    assert len(read_eval_csv(missing, warned.append)) == 1
    assert warned == [f"{missing} line 3: the last row is cut off (field 'success_rate' missing); skipping it"]
    unterminated = tmp_path / "unterminated.csv"
    unterminated.write_text(head + "200,100,3.0,0.5,0.25,20,onl")  # every column, but the write stopped mid-row
    assert len(read_eval_csv(unterminated, warned.append)) == 1
    assert warned[-1] == f"{unterminated} line 3: the last row is cut off (no line break at its end); skipping it"


def test_a_status_line_outside_a_terminal_prints_forced_updates_and_one_line_per_period(capsys):
    status = StatusLine(plain_every_s=0.3)  # pytest's captured stdout is not a terminal
    assert not status.interactive
    status.update({"phase": "online", "episodes": 1})
    assert capsys.readouterr().out == ""  # not forced, period not over
    status.update({"phase": "online", "episodes": 2}, force=True)
    assert capsys.readouterr().out == "phase online  episodes 2\n"
    status.update({"phase": "online", "episodes": 2}, force=True)
    assert capsys.readouterr().out == ""  # forced again with nothing new: not repeated
    status.update({"phase": "online", "episodes": 3})
    assert capsys.readouterr().out == ""  # the forced line restarted the period
    time.sleep(0.35)
    status.update({"phase": "eval", "episodes": 4})
    status.update({"phase": "eval", "episodes": 5})
    assert capsys.readouterr().out == "phase eval  episodes 4\n"
    StatusLine(enabled=False, plain_every_s=0.0).update({"phase": "x"}, force=True)
    assert capsys.readouterr().out == ""


def test_a_curve_starts_at_its_bc_policys_evaluation(tmp_path: Path) -> None:
    """`robot-rl report` and curves.png draw each run from the BC policy it improves on (its row at 0 env steps),
    then its evaluations as written; a run with nothing after BC's has no curve."""
    bc = GOOD | {"env_steps": "0", "learner_steps": "0", "success_rate": "0.4", "bc_action_fraction": "1.0",
                 "phase": "bc"}  # fmt: skip
    later = [GOOD | {"env_steps": str(n), "success_rate": str(r)} for n, r in ((300, 0.8), (600, 0.9))]
    rows = read_eval_csv(_csv(tmp_path / "eval.csv", bc, *later))
    points = curve_points(rows)
    assert [(p.env_steps, p.success_rate, p.phase) for p in points] == [(0, 0.4, "bc"), (300, 0.8, "online"),
                                                                          (600, 0.9, "online")]  # fmt: skip
    assert curve_points(read_eval_csv(_csv(tmp_path / "only_bc.csv", bc))) == []
    assert [p.env_steps for p in curve_points(read_eval_csv(_csv(tmp_path / "no_bc.csv", *later)))] == [300, 600]
