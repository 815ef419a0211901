"""Learning benchmark: BC, Q2RL, IBRL, RLPD and SAC on the simulated peg insertion, several seeds.

    python bench/learning.py --out runs/bench [--seeds 0,1,2] [--methods q2rl,ibrl,rlpd,sac]
                             [--env-steps 20000] [--marks 5000,10000,15000,20000,25000] [--jobs 2]
                             [--config configs/sim_peg_state.yaml] [--set path=value ...]

Per seed, demonstrations are collected and one BC policy trained, shared by every method of that seed (the BC row is
that policy's success rate). Each method then runs `robot-rl train` as its own process (`--jobs` at a time, one torch
thread each). The table gives the success rate at each environment-step mark (total env steps, Q-Estimation rollouts
included) as mean ± std over seeds, from the last evaluation at or before the mark; `learning.png` shows the mean
curves with their spread. Finished runs are reused when the script is re-run with the same --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_main
import numpy as np

from robot_rl.config import ConfigError, load_config
from robot_rl.runlog import EvalRow, read_eval_csv

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}); see {log}")


def prepare_seed(out: Path, seed: int, config: str, overrides: list[str]) -> Path:
    seed_dir = out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    demos, bc = seed_dir / "demos.hdf5", seed_dir / "bc"
    robot_rl = [sys.executable, "-m", "robot_rl.cli"]
    sets = [x for o in overrides for x in ("--set", o)]
    if not demos.is_file():
        run([*robot_rl, "collect", "--config", config, *sets, "--seed", str(seed), "--episodes", "50",
             "--out", str(demos)], seed_dir / "collect.log")  # fmt: skip
    if not (bc / "bc.json").is_file():
        run([*robot_rl, "bc", "--config", config, *sets, "--seed", str(seed), "--demos", str(demos),
             "--out", str(bc)], seed_dir / "bc.log")  # fmt: skip
    return seed_dir


def train(seed_dir: Path, seed: int, method: str, args: argparse.Namespace) -> Path:
    run_dir = seed_dir / method
    if (run_dir / "summary.json").is_file():
        return run_dir
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    sets = [x for o in args.overrides for x in ("--set", o)]
    # The demonstrations go to the methods that sample them (RLPD); train refuses --demos it would ignore.
    samples_demos = load_config(args.config, [*args.overrides, f"agent.method={method}"]).agent.effective_offline_ratio
    demos = ["--demos", str(seed_dir / "demos.hdf5")] if samples_demos > 0 else []
    cmd = [sys.executable, "-m", "robot_rl.cli", "train", "--config", args.config, *sets, "--seed", str(seed),
           "--out", str(run_dir), "--bc", str(seed_dir / "bc"), *demos,
           "--env-steps", str(args.env_steps), "--quiet", "--set", f"agent.method={method}",
           "--set", "train.torch_threads=1"]  # fmt: skip
    t0 = time.monotonic()
    run(cmd, seed_dir / f"{method}.log")
    print(f"  seed {seed} {method}: done in {time.monotonic() - t0:.0f} s", flush=True)
    return run_dir


def bc_rate(rows: list[EvalRow]) -> float:
    """The BC policy's success rate: the evaluation logged in the run's `bc` phase (before any RL)."""
    bc_rows = [r for r in rows if r.phase == "bc"]
    return bc_rows[-1].success_rate if bc_rows else float("nan")


def at_mark(rows: list[EvalRow], mark: int) -> float:
    eligible = [r for r in rows if r.phase in ("start", "online") and r.env_steps <= mark]
    return eligible[-1].success_rate if eligible else float("nan")


def bc_fraction_at(rows: list[EvalRow], mark: int) -> float:
    eligible = [r for r in rows if r.phase in ("start", "online") and r.env_steps <= mark]
    return eligible[-1].bc_action_fraction if eligible else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="q2rl,ibrl,rlpd,sac")
    parser.add_argument("--env-steps", type=bench_main.positive_int, default=20_000, help="online env steps per run")
    parser.add_argument("--marks", default="5000,10000,15000,20000,25000")
    parser.add_argument("--jobs", type=bench_main.positive_int, default=2)
    parser.add_argument("--config", default="configs/sim_peg_state.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs already in --out, unfinished ones up to their last evaluation",
    )
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        marks = [int(m) for m in args.marks.split(",")]
    except ValueError as exc:
        parser.error(f"--seeds and --marks take comma-separated integers ({exc})")
    methods = args.methods.split(",")
    if args.env_steps < 1 or args.jobs < 1:
        parser.error("--env-steps and --jobs must be at least 1")
    for method in methods:  # before any demonstration is collected: a bad config or method is said at once
        try:
            load_config(args.config, [*args.overrides, f"agent.method={method}"])
        except ConfigError as exc:
            parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.report_only:
        runs = {(s, m): args.out / f"seed{s}" / m for s in seeds for m in methods}
        missing = [str(path) for path in runs.values() if not (path / "eval.csv").is_file()]
        if missing:
            raise SystemExit(f"--report-only: no eval.csv in {', '.join(missing)}")
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            prepared = pool.map(lambda s: prepare_seed(args.out, s, args.config, args.overrides), seeds)
            seed_dirs = dict(zip(seeds, prepared, strict=True))
            jobs = {(s, m): pool.submit(train, seed_dirs[s], s, m, args) for s in seeds for m in methods}
            runs = {key: job.result() for key, job in jobs.items()}

    curves = {key: read_eval_csv(path / "eval.csv") for key, path in runs.items()}
    unfinished = [key for key, path in runs.items() if not (path / "summary.json").is_file()]
    for key in unfinished:  # marks past an unfinished run's last evaluation were not reached: NaN, not its last value
        last = curves[key][-1].env_steps if curves[key] else -1
        curves[key] = [*curves[key], EvalRow(last + 1, 0, 0.0, float("nan"), float("nan"), 0, "online")]
    if unfinished:
        names = ", ".join(f"seed {s} {m}" for s, m in unfinished)
        print(f"unfinished runs (tabulated up to their last evaluation): {names}")
    bc = [bc_rate(curves[(s, methods[0])]) for s in seeds]
    header = f"{'method':<10}" + "".join(f"{f'{m / 1000:g}k':>14}" for m in marks)
    print(f"\nsuccess rate at total env steps (mean ± std over seeds {seeds}; 20 eval episodes each)")
    print(header)
    bc_mean, bc_std = float(np.nanmean(bc)), float(np.nanstd(bc))
    print(f"{'bc':<10}" + "".join(f"{f'{bc_mean:.2f} ± {bc_std:.2f}':>14}" for _ in marks))
    table = {"bc": [(bc_mean, bc_std)] * len(marks)}
    for method in methods:
        cells = []
        for mark in marks:
            values = [at_mark(curves[(s, method)], mark) for s in seeds]
            cells.append((float(np.nanmean(values)), float(np.nanstd(values))))
        table[method] = cells
        print(f"{method:<10}" + "".join(f"{f'{m:.2f} ± {s:.2f}':>14}" for m, s in cells))
    plot(curves, seeds, methods, bc_mean, args.out / "learning.png")
    (args.out / "table.json").write_text(json.dumps({"marks": marks, "seeds": seeds, "table": table}, indent=2))
    print(f"\nplot {args.out / 'learning.png'}; wall {time.monotonic() - t0:.0f} s")
    q2rl_last = table.get("q2rl", [(float("nan"), 0.0)])[-1][0]
    print(f"q2rl success at {marks[-1]} env steps: {q2rl_last:.2f} (bc {bc_mean:.2f})")


def plot(curves, seeds, methods, bc_mean, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        grid = sorted({r.env_steps for s in seeds for r in curves[(s, method)] if r.phase != "bc"})
        if not grid:
            continue
        succ = np.array([[at_mark(curves[(s, method)], g) for g in grid] for s in seeds])
        frac = np.array([[bc_fraction_at(curves[(s, method)], g) for g in grid] for s in seeds])
        mean, std = np.nanmean(succ, 0), np.nanstd(succ, 0)
        (line,) = ax_s.plot(grid, mean, label=method)
        ax_s.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax_b.plot(grid, np.nanmean(frac, 0), color=line.get_color(), label=method)
    ax_s.axhline(bc_mean, color="gray", ls="--", label="BC policy")
    ax_s.set(xlabel="environment steps (Q-Estimation included)", ylabel="success rate", ylim=(-0.02, 1.02))
    ax_b.set(xlabel="environment steps", ylabel="fraction of BC actions (eval)", ylim=(-0.02, 1.02))
    for ax in (ax_s, ax_b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"simulated peg insertion, mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    bench_main.run(main)
