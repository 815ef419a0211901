"""The run directory (design §3): config.yaml, eval.csv, summary.json, TensorBoard scalars, curves.png, and a live
status line on the terminal."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from robot_rl.config import ConfigError
from robot_rl.durable import write_text_atomic

log = logging.getLogger("robot_rl")

EVAL_COLUMNS = (
    "env_steps",
    "learner_steps",
    "wall_s",
    "success_rate",
    "bc_action_fraction",
    "episodes",
    "phase",
)


@dataclass(frozen=True)
class EvalRow:
    env_steps: int
    learner_steps: int
    wall_s: float
    success_rate: float
    bc_action_fraction: float
    episodes: int
    phase: str


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


class RunLog:
    """Appends evaluation rows to eval.csv (flushed each row) and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, *, tensorboard: bool = True, resume: bool = False) -> None:
        """`resume` keeps an existing eval.csv and appends to it (a resumed learner); otherwise it starts anew."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._csv_path = out / "eval.csv"
        keep = resume and self._csv_path.is_file()
        self.rows: list[EvalRow] = read_eval_csv(self._csv_path) if keep else []
        self._rows_before_resume = len(self.rows) if keep else -1  # rows written before this process (resume)
        if keep and not self._csv_path.read_bytes().endswith(b"\n"):  # a row cut off by a kill: rewrite without it
            write_rows = self.rows
        elif keep:
            write_rows = None
        else:
            write_rows = []
        if write_rows is not None:
            self._rewrite(write_rows)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tb"))

    def eval_row(self, row: EvalRow) -> None:
        """Append a row. The first row after a resume replaces the last one written before it when it is the same
        evaluation done again: same kind, same env steps, no more learner steps (a learner killed after writing that
        row and before its next checkpoint redoes the evaluation, with the weights the run goes on with; a curve
        should hold one point per evaluation). Two evaluations at the same env steps within a run both stay."""
        last = self.rows[-1] if self.rows and len(self.rows) == self._rows_before_resume else None
        if (
            last is not None
            and (last.env_steps, last.phase) == (row.env_steps, row.phase)
            and row.learner_steps <= last.learner_steps
        ):
            log.warning(
                "evaluation at %d env steps (%s) done again after a restart: its row in %s replaces the earlier one "
                "(success %.2f -> %.2f)",
                row.env_steps,
                row.phase,
                self._csv_path,
                last.success_rate,
                row.success_rate,
            )
            self.rows[-1] = row
            self._rewrite(self.rows)
        else:
            self.rows.append(row)
            with self._csv_path.open("a", newline="") as f:
                csv.writer(f).writerow([getattr(row, c) for c in EVAL_COLUMNS])
        self.scalars("eval", {"success_rate": row.success_rate, "bc_action_fraction": row.bc_action_fraction}, row)

    def _rewrite(self, rows: list[EvalRow]) -> None:
        """eval.csv holding the header and `rows`, replaced whole (a kill leaves the old file or the new one)."""
        tmp = self._csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(EVAL_COLUMNS)
            writer.writerows([getattr(r, c) for c in EVAL_COLUMNS] for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._csv_path)

    def scalars(self, prefix: str, values: dict[str, float], row_or_step: EvalRow | int) -> None:
        if self._tb is None:
            return
        step = row_or_step.env_steps if isinstance(row_or_step, EvalRow) else row_or_step
        for name, value in values.items():
            self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _number(record: dict[str, str], name: str, kind: type[int] | type[float]) -> Any:
    """record[name] as `kind`; KeyError when missing, ValueError naming the column and the value when unreadable."""
    text = record[name]
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _eval_row(record: dict[str, str]) -> EvalRow:
    """One eval.csv record as an EvalRow; KeyError or ValueError when a field is missing, not a number, or out of
    its range (rates in [0, 1], counts >= 0, finite times)."""
    row = EvalRow(
        env_steps=_number(record, "env_steps", int),
        learner_steps=_number(record, "learner_steps", int),
        wall_s=_number(record, "wall_s", float),
        success_rate=_number(record, "success_rate", float),
        bc_action_fraction=_number(record, "bc_action_fraction", float),
        episodes=_number(record, "episodes", int),
        phase=record["phase"],
    )
    for name in ("success_rate", "bc_action_fraction"):
        value = getattr(row, name)
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"{name} {value} is not a rate in [0, 1]")
    for name in ("env_steps", "learner_steps", "episodes"):
        if getattr(row, name) < 0:
            raise ValueError(f"{name} {getattr(row, name)} is negative")
    if not math.isfinite(row.wall_s):
        raise ValueError(f"wall_s {row.wall_s} is not finite")
    return row


def read_eval_csv(path: Path, warn: Callable[[str], None] | None = None) -> list[EvalRow]:
    """The rows of a run's eval.csv, checked: ConfigError naming the file and line when it is not an eval.csv, a row
    before the last lacks columns (damaged), or a row holding every column has a value that is not valid (invalid:
    the message names the column and the value). A last row cut off (columns missing, or no line break at its end: a
    run stopped while writing it) is skipped with a call to `warn` (default: a logged warning)."""
    warn = warn or log.warning
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM, as a spreadsheet saving CSV writes one
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; is it a run's eval.csv?") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise ConfigError(f"{path} is empty (no header row); the run wrote no evaluation")
    header, body = rows[0], rows[1:]
    missing = [c for c in EVAL_COLUMNS if c not in header]
    if missing:
        raise ConfigError(f"{path} lacks the columns {missing} (its header is {header}); is it a run's eval.csv?")
    unterminated = bool(body) and not text.endswith(("\n", "\r"))  # every row the run writes ends with a line break
    out: list[EvalRow] = []
    for i, values in enumerate(body):
        if not values:
            continue
        last = i == len(body) - 1
        record = dict(zip(header, values, strict=False))
        try:
            if last and unterminated:
                raise ValueError("no line break at its end")
            out.append(_eval_row(record))
        except (KeyError, ValueError) as exc:
            problem = f"field {exc} missing" if isinstance(exc, KeyError) else str(exc)
            complete = all(c in record for c in EVAL_COLUMNS)
            if last and (unterminated or not complete):
                warn(f"{path} line {i + 2}: the last row is cut off ({problem}); skipping it")
            elif complete:
                raise ConfigError(f"{path} line {i + 2} is invalid ({problem}); fix or remove that line") from None
            else:
                raise ConfigError(f"{path} line {i + 2} is damaged ({problem}); fix or remove that line") from None
    return out


def curve_points(rows: list[EvalRow]) -> list[EvalRow]:
    """The points of a run's curve: its BC policy's evaluation (at 0 env steps, where the run starts from), then every
    evaluation after it, as written; the BC row only when the run has one. Empty without an evaluation after
    BC's (no curve to draw)."""
    later = [r for r in rows if r.phase != "bc"]
    if not later:
        return []
    first_bc = next((r for r in rows if r.phase == "bc"), None)
    return ([first_bc] if first_bc is not None else []) + later


def plot_curves(
    runs: dict[str, list[EvalRow]], path: Path, *, bc_success: float | None = None, title: str = ""
) -> Path:
    """Success rate and BC-action fraction against environment steps, one line per run, each from its BC policy's
    evaluation (curve_points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        rows = curve_points(rows)
        if not rows:
            continue
        steps = [r.env_steps for r in rows]
        ax_s.plot(steps, [r.success_rate for r in rows], marker="o", ms=3, label=label)
        ax_b.plot(steps, [r.bc_action_fraction for r in rows], marker="o", ms=3, label=label)
    if bc_success is not None:
        ax_s.axhline(bc_success, color="gray", ls="--", label="BC policy")
    ax_s.set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02), title="success rate")
    ax_b.set(xlabel="environment steps", ylabel="fraction of BC actions", ylim=(-0.02, 1.02), title="BC actions")
    for ax in (ax_s, ax_b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without online evaluations draws no line
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class StatusLine:
    """One live status line on a terminal (rich). Elsewhere (logs, pipes, services under a supervisor) plain lines: one
    when an update is forced (notable moments) and one every `plain_every_s` seconds, so a log shows the run going on.
    """

    def __init__(self, *, enabled: bool = True, plain_every_s: float = 30.0) -> None:
        self.enabled = enabled
        self.interactive = enabled and sys.stdout.isatty()
        self.plain_every_s = plain_every_s
        self._live = None
        self._last = 0.0
        self._last_plain = time.monotonic()  # the first periodic line comes plain_every_s after the start
        self._last_line = ""
        if self.interactive:
            from rich.live import Live
            from rich.text import Text

            self._text = Text
            self._live = Live(Text(""), refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, fields: dict[str, Any], *, force: bool = False) -> None:
        if not self.enabled:
            return
        line = "  ".join(f"{k} {v}" for k, v in fields.items())
        now = time.monotonic()
        if self._live is not None:
            if force or now - self._last > 0.25:
                self._live.update(self._text(line))
                self._last = now
        elif (force and line != self._last_line) or now - self._last_plain >= self.plain_every_s:
            print(line, flush=True)  # a forced line that says nothing new is left out (the periodic one is kept)
            self._last_plain, self._last_line = now, line

    def say(self, message: str) -> None:
        """A line that stays (an event: connected, lost, refused), above the live line on a terminal."""
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def summary_dict(**fields: Any) -> dict[str, Any]:
    return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in fields.items()}
