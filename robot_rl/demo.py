"""`robot-rl demo`: learner and actor as two OS processes on loopback, the sim twin, CPU (design §3).

Steps: collect scripted demonstrations and train the BC policy (in this process), then start `robot-rl learner` and
`robot-rl actor` as child processes talking ZeroMQ on 127.0.0.1, show one live status line from their stats.json
files, and at the end print a table of BC vs Q2RL success and write `DIR/report.png`: success rate and BC-action
fraction against env steps, and a gating timeline of the last online episodes (which steps executed the BC action
and which the RL action). Ctrl-C stops both processes (SIGTERM, then SIGKILL after a grace period) and says where
the run directory is.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from robot_rl.config import ConfigError, dump_config, load_config
from robot_rl.durable import write_text_atomic
from robot_rl.runlog import EvalRow, StatusLine, read_eval_csv
from robot_rl.signals import SUPERVISED_ENV

# The embedded defaults of the demo: the state config's networks with the paper's Q-Estimation budget (100 BC
# rollouts, 5000 value and 20k Q-initialisation steps: the gate beats BC from the first online step, with no dip; see
# docs/algorithm.md), 4000 online steps, the actor unpaced and kept close to the learner.
DEMO_OVERRIDES = [
    "bc.demos=50",
    "qest.rollouts=100",
    "qest.value_steps=5000",
    "qest.q_init_steps=20000",
    "qest.actor_pretrain_steps=2000",
    "qest.batch_size=128",
    "agent.method=q2rl",
    "agent.hidden=[128, 128]",
    "agent.batch_size=128",
    "agent.actor_q=min",
    "train.env_steps=4000",
    "train.learner_steps_per_env_step=0.5",
    "train.eval_every=1000",
    "train.eval_episodes=20",
    "train.checkpoint_every=5000",
    "train.torch_threads=1",
    "actor.period_s=0",
    "actor.max_env_steps_ahead=150",
]


# Where free_port_pair looks first: below the kernel's ephemeral range, whose ports any outgoing connection may take
# as its source port between the check and the learner's bind (the range Linux uses unless configured otherwise).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 20_000


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p on 127.0.0.1 with p and p + 1 free (request and weights endpoints).

    Taken below the ephemeral range where there is room: a port the kernel hands out itself (bind to port 0) can be
    taken as the source port of some outgoing connection before the learner binds it ("Address already in use")."""
    rng = random.SystemRandom()
    low = _ephemeral_low()
    if low - 2 > LOWEST_PORT:
        for _ in range(50):
            port = rng.randrange(LOWEST_PORT, low - 2)
            if _bindable(port) and _bindable(port + 1):
                return port
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _bindable(port + 1):
            return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _status_fields(learner: dict[str, Any], actor: dict[str, Any], wall: float) -> dict[str, Any]:
    rate = actor.get("success_rate_recent")
    frac = actor.get("bc_fraction_recent")
    age = actor.get("weights_age_s")
    return {
        "phase": learner.get("phase", "starting"),
        "episode": actor.get("episodes", 0),
        "success(recent)": "-" if rate is None else f"{rate:.2f}",
        "bc-frac": "-" if frac is None else f"{frac:.2f}",
        "weights": f"v{actor.get('weights_version', -1)}" + ("" if age is None else f" ({age:.0f}s old)"),
        "sent/acked": f"{actor.get('sent', 0)}/{actor.get('acked', 0)}",
        "learner": learner.get("learner_steps", 0),
        "overruns": actor.get("loop", {}).get("overruns", 0),
        "wall": f"{wall:.0f}s",
    }


def run_demo(*, out: Path, minutes: float, config: Path | None, overrides: list[str], quiet: bool = False) -> int:
    """Prepare BC, run learner + actor until the learner finishes (or `minutes` pass), report. Returns an exit code."""
    from robot_rl.train import collect_demos, train_bc_from_demos

    cfg = load_config(config, ([] if config else DEMO_OVERRIDES) + list(overrides))
    port = free_port_pair()
    cfg = cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"learner": f"tcp://127.0.0.1:{port}"})})
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    start = time.monotonic()
    demos, bc_dir = out / "demos.hdf5", out / "bc"
    print(f"demo: run directory {out}", flush=True)
    if not demos.is_file():
        print(f"demo: collecting {cfg.bc.demos} scripted demonstrations ...", flush=True)
        collect_demos(cfg, demos, episodes=cfg.bc.demos, seed=cfg.seed * 7919 + 1)
    if not (bc_dir / "bc.json").is_file():
        print(f"demo: training the BC policy ({cfg.bc.steps} steps) ...", flush=True)
        train_bc_from_demos(cfg, demos, bc_dir, seed=cfg.seed)
    base = [sys.executable, "-m", "robot_rl.cli"]
    common = ["--config", str(out / "config.yaml"), "--bc", str(bc_dir), "--quiet"]
    logs = {name: (out / f"{name}.log").open("a") for name in ("learner", "actor")}
    learner_cmd = [*base, "learner", *common, "--out", str(out / "learner")]
    if cfg.agent.effective_offline_ratio > 0:  # a method that samples demonstrations (RLPD)
        learner_cmd += ["--demos", str(demos)]
    actor_cmd = [*base, "actor", *common, "--out", str(out / "actor"), "--learner", cfg.transport.learner]
    # The services ignore the terminal's Ctrl-C; the demo stops them in order (_stop).
    env = {**os.environ, SUPERVISED_ENV: "1"}
    procs = {
        "learner": subprocess.Popen(learner_cmd, stdout=logs["learner"], stderr=subprocess.STDOUT, env=env),
        "actor": subprocess.Popen(actor_cmd, stdout=logs["actor"], stderr=subprocess.STDOUT, env=env),
    }
    status = StatusLine(enabled=not quiet)
    # SIGTERM stops the demo as Ctrl-C does (the CLI makes SIGINT raise KeyboardInterrupt in every command).
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    interrupted = False
    failed: str | None = None  # the service that failed on its own, if one did
    try:
        failed = _supervise(procs, out, status, start=start, minutes=minutes)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop(procs)
        status.close()
        for f in logs.values():
            f.close()
    if interrupted:
        print(f"\ndemo: interrupted; both processes stopped. Run directory: {out}", flush=True)
        return 130
    if failed is not None:
        log_path = out / f"{failed}.log"
        print(
            f"\ndemo: the {failed} exited ({procs[failed].returncode}): {_last_line(log_path)}\n"
            f"demo: see {log_path}; run directory {out}",
            flush=True,
        )
        if failed == "actor":  # the learner's results so far (a failed learner leaves nothing to report)
            report(out)
        return 1
    return report(out)


def _supervise(
    procs: dict[str, subprocess.Popen], out: Path, status: StatusLine, *, start: float, minutes: float
) -> str | None:
    """Show the status line until the learner finishes (or the actor fails, or `minutes` pass); the name of the
    service that exited with an error, if one did."""
    deadline = start + minutes * 60
    while procs["learner"].poll() is None:
        if procs["actor"].poll() is not None:
            if procs["actor"].returncode != 0:
                return "actor"
            try:  # the actor stops when the learner says the run is done; the learner then writes its results
                procs["learner"].wait(timeout=120)
            except subprocess.TimeoutExpired:
                print(f"\ndemo: the learner did not finish; see {out / 'learner.log'}", flush=True)
            break
        if time.monotonic() > deadline:
            print(f"\ndemo: {minutes} minutes reached; stopping", flush=True)
            return None
        learner, actor = _read_json(out / "learner" / "stats.json"), _read_json(out / "actor" / "stats.json")
        status.update(_status_fields(learner, actor, time.monotonic() - start))  # in logs: a line every 30 s
        time.sleep(0.5)
    return "learner" if procs["learner"].poll() not in (None, 0) else None


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ")  # "RuntimeError: ...", "torch._x.exc.Failed: ..."


def _last_line(path: Path) -> str:
    """The line of a service's log that says why it failed: its one-line error, or the exception line of a traceback
    (a library's advice printed after it, such as torch's, is not the reason); else its last non-empty line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    if not lines:
        return "(the log is empty)"
    if "Traceback (most recent call last):" in lines:
        after = lines[len(lines) - 1 - lines[::-1].index("Traceback (most recent call last):") :]
        exceptions = [line for line in after if _EXCEPTION_LINE.match(line)]
        if exceptions:
            return exceptions[-1]
    return lines[-1]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM the actor first (it flushes and waits for its last acks), then the learner; SIGKILL after a grace."""
    for name in ("actor", "learner"):
        proc = procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def gating_timeline(
    episode_dir: Path, *, count: int = 12, warn: Callable[[str], None] = print
) -> tuple[np.ndarray, list[str]]:
    """[episodes, max_steps] with 1 = BC action executed, 0 = RL action, NaN = no step, for `count` online episodes
    spread evenly over the run (the first and the last included), so the picture shows the gate's choices changing.
    Only the drawn episodes are read whole (a long image run holds gigabytes of frames). Episode files that cannot be
    read (being written, damaged) are left out, with one line to `warn`."""
    from robot_rl.episodes import EpisodeFileError, first_episode_kind, read_episodes

    unreadable: list[str] = []
    online: list[Path] = []
    for path in sorted(episode_dir.glob("episode_*.hdf5")):
        try:
            if first_episode_kind(path) == "online":
                online.append(path)
        except (EpisodeFileError, OSError) as exc:  # being written (HDF5's lock), damaged
            unreadable.append(str(exc))
    if len(online) > count:
        picks = np.unique(np.linspace(0, len(online) - 1, count).round().astype(int))
        online = [online[i] for i in picks]
    drawn: list[tuple[Path, Any]] = []
    for path in online:
        try:
            episodes = read_episodes(path, warn=lambda line: None)  # one cut by a kill is drawn as far as it got
        except (EpisodeFileError, OSError) as exc:  # OSError: a damaged chunk, met while reading the data
            unreadable.append(str(exc))
            continue
        if episodes:
            drawn.append((path, episodes[0]))
    if unreadable:
        warn(f"{len(unreadable)} episode file(s) left out of the gating timeline, unreadable (first: {unreadable[0]})")
    rows = [np.asarray(ep.extras["use_bc"], float) for _, ep in drawn]
    labels = [f"#{int(p.stem[-6:])} {'success' if ep.terminated[-1] else 'fail'}" for p, ep in drawn]
    width = max((len(r) for r in rows), default=0)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid, labels


def report(out: Path) -> int:
    """The demo's table and report.png from the learner's eval.csv and the actor's episode logs."""
    eval_csv = out / "learner" / "eval.csv"
    rows: list[EvalRow] = []
    if eval_csv.is_file():
        try:
            rows = read_eval_csv(eval_csv, lambda line: print(f"demo: {line}", flush=True))
        except ConfigError as exc:
            print(f"demo: {exc}; the report shows no evaluations", flush=True)
    bc = [r for r in rows if r.phase == "bc"]
    online = [r for r in rows if r.phase != "bc"]
    bc_rate = bc[-1].success_rate if bc else float("nan")
    print("\n  policy        success   episodes   env steps")
    print(f"  BC            {bc_rate:7.2f}   {bc[-1].episodes if bc else 0:8d}   {'-':>9}")
    if online:
        last, best = online[-1], max(online, key=lambda r: r.success_rate)
        print(f"  Q2RL (final)  {last.success_rate:7.2f}   {last.episodes:8d}   {last.env_steps:9d}")
        print(f"  Q2RL (best)   {best.success_rate:7.2f}   {best.episodes:8d}   {best.env_steps:9d}")
    else:
        print("  Q2RL          no evaluation yet")
    path = plot_report(rows, out / "actor" / "episodes", out / "report.png", bc_rate=bc_rate)
    print(f"\nreport {path}; run directory {out}", flush=True)
    return 0


def plot_report(rows: list[EvalRow], episode_dir: Path, path: Path, *, bc_rate: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, (ax_s, ax_b, ax_g) = plt.subplots(1, 3, figsize=(16, 4.2))
    online = [r for r in rows if r.phase != "bc"]
    steps = [r.env_steps for r in online]
    ax_s.plot(steps, [r.success_rate for r in online], marker="o", ms=3, label="Q2RL (gated)")
    if np.isfinite(bc_rate):
        ax_s.axhline(bc_rate, color="gray", ls="--", label="BC policy")
    ax_b.plot(steps, [r.bc_action_fraction for r in online], marker="o", ms=3, color="tab:orange")
    ax_s.set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02), title="success rate (eval)")
    ax_b.set(xlabel="environment steps", ylabel="fraction", ylim=(-0.02, 1.02), title="BC actions executed (eval)")
    for ax in (ax_s, ax_b):
        ax.grid(alpha=0.3)
    ax_s.legend(fontsize=8)
    grid, labels = gating_timeline(episode_dir, warn=lambda line: print(f"demo: {line}", flush=True))
    if grid.size:
        ax_g.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(["tab:blue", "tab:orange"]),
                    vmin=0, vmax=1)  # fmt: skip
        ax_g.set_yticks(range(len(labels)), labels, fontsize=7)
    ax_g.set(xlabel="step in episode", ylabel="online episode (top: first)")
    ax_g.set_title("gating: orange = BC action, blue = RL action")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
