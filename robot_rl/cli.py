"""The `robot-rl` command (design §3)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from robot_rl.config import ConfigError, RunConfig, TransportConfig, load_config
from robot_rl.signals import SUPERVISED_ENV

DESCRIPTION = (
    "On-robot reinforcement learning with Q2RL: Q-Estimation from a frozen BC policy, then online SAC/REDQ with "
    "Q-gating between the BC and the RL action. Start with `robot-rl demo` (the simulated twin, CPU); README.md "
    "lists every command."
)


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--config", type=Path, required=required, help="YAML config (default: embedded defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. --set agent.method=ibrl (repeatable; VALUE is YAML)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robot-rl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Q-Estimation then online Q2RL in one process; writes a run directory")
    _add_config_args(p)
    p.add_argument("--seed", type=int, default=None, help="run seed (overrides the config's)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")
    p.add_argument("--env-steps", type=int, default=None, help="online environment steps (train.env_steps)")
    p.add_argument("--bc", type=Path, default=None, help="BC policy directory from `robot-rl bc` (else trained)")
    p.add_argument("--demos", type=Path, default=None, help="demonstrations HDF5 (else collected in the run)")
    p.add_argument("--quiet", action="store_true", help="no live status line")

    p = sub.add_parser("collect", help="record scripted-expert demonstrations to robomimic-layout HDF5")
    _add_config_args(p)
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("bc", help="train a BC policy on demonstrations")
    _add_config_args(p)
    p.add_argument("--demos", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="directory for bc.safetensors + bc.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-episodes", type=int, default=0, help="score the trained policy on this many episodes")

    p = sub.add_parser("eval", help="success rate of a checkpoint (agent or BC policy)")
    _add_config_args(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="first evaluation episode seed")

    p = sub.add_parser("cameras", help="list RealSense cameras; measure a camera or recording, write crop previews")
    _add_config_args(p)
    p.add_argument("--recording", type=Path, default=None, help="read this SDK recording (.db3) instead")
    p.add_argument("--out", type=Path, default=Path("cameras"), help="directory for <camera>.png previews")
    p.add_argument("--frames", type=int, default=30, help="frames to read from each camera")

    p = sub.add_parser("demo", help="learner + actor as two processes on loopback, sim twin; ends with a report")
    _add_config_args(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo-<time>)")
    p.add_argument("--minutes", type=float, default=15.0, help="stop after this many minutes at the latest")
    p.add_argument("--quiet", action="store_true", help="no live status line")

    p = sub.add_parser("learner", help="the learner service: buffer, Q-Estimation, SAC/REDQ updates, weights out")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="learner run directory")
    p.add_argument("--bind", default=None, help="request endpoint to bind (transport.learner), e.g. tcp://0.0.0.0:5555")
    p.add_argument("--bc", type=Path, required=True, help="BC policy directory (the same the actors use)")
    p.add_argument("--demos", type=Path, default=None, help="demonstrations HDF5 (RLPD's offline half)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: networks, counters, buffer")
    p.add_argument("--quiet", action="store_true", help="no live status line")

    p = sub.add_parser("actor", help="the actor service: episodes with Q-gating, logs, transitions to a learner")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="actor directory (reused: the run continues)")
    p.add_argument("--learner", required=True, help="learner endpoint (tcp://HOST:PORT) or `none`: BC policy alone")
    p.add_argument("--bc", type=Path, required=True, help="BC policy directory from `robot-rl bc`")
    p.add_argument("--robot", choices=["sim", "franky", "franky-sim"], default=None, help="override env.robot")
    p.add_argument("--episodes", type=int, default=None, help="stop after this many episodes")
    p.add_argument("--actor-id", default=None, help="override actor.actor_id")
    p.add_argument("--quiet", action="store_true", help="no live status line")

    p = sub.add_parser("replay", help="re-run a recorded actor episode through mock hardware; report divergences")
    p.add_argument("log", type=Path, help="episode log (DIR/episodes/episode_*.hdf5 of an actor directory)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="weights archive or learner checkpoint directory (default: DIR/weights, the archive next to the log)",
    )
    p.add_argument("--config", type=Path, default=None, help="run config (default: the actor's DIR/config.yaml)")
    p.add_argument("--bc", type=Path, default=None, help="BC policy directory (default: the one the actor recorded)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance for floats (decisions: exact)")

    from robot_rl.security import register_keys_command

    register_keys_command(sub)

    p = sub.add_parser("report", help="plot learning curves of one or more run directories")
    p.add_argument("runs", type=Path, nargs="+", help="run directories (of train, learner or demo)")
    p.add_argument("--out", type=Path, default=Path("report.png"),
                   help="the picture to write (default: report.png here; a directory: DIR/report.png)")  # fmt: skip
    return parser


def _overrides_with_seed(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The --set overrides, then the seed of --seed; and how each flag's override was given, for load_config's
    messages (a refused seed is named `--seed N`, not as a --set)."""
    overrides, flags = list(args.overrides), {}
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
        flags[overrides[-1]] = f"--seed {args.seed}"
    return overrides, flags


def _check_parents(out: Path) -> None:
    """ConfigError when the nearest existing folder above `out` is a file (nothing can be created under it)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            return


def _refuse_file_out(out: Path, what: str) -> None:
    """ConfigError when --out, a directory to create or reuse, exists as a file (or lies under one)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} exists and is a file, not a directory; choose a new --out")
    _check_parents(out)


def _create_out_dir(out: Path, what: str) -> bool:
    """Create the directory --out when missing (True: this call created it); ConfigError saying why when it cannot
    be created (no permission, a read-only or special file system)."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        if _disk_full(exc) is not None:
            raise
        raise ConfigError(
            f"--out {out}: cannot create the {what} there ({exc.strerror or exc}); choose another --out"
        ) from None
    return True


def _refuse_used_out(out: Path, what: str) -> None:
    """ConfigError unless --out is a new or an empty directory."""
    _refuse_file_out(out, what)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{what} {out} exists and is not empty; choose a new --out")


# The commands whose --out ends up as text in what they write (TensorBoard, safetensors, episode attrs).
_OUT_NAMED_INSIDE = ("train", "learner", "actor", "bc", "demo")


def _refuse_undecodable_paths(args: argparse.Namespace) -> None:
    """ConfigError for an --out or --bc whose absolute path is not valid UTF-8: TensorBoard and safetensors take
    paths as UTF-8 text, and the actor records them in its episodes, so a run would fail midway (or write a BC
    policy nothing can load). Other outputs (a demonstrations file, pictures, keys) go through."""
    for name in ("out", "bc") if args.command in _OUT_NAMED_INSIDE else ("bc",):
        path = getattr(args, name, None)
        if not isinstance(path, Path):
            continue
        text = str(path.absolute())
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ConfigError(f"--{name} {shown}: the path is not valid UTF-8; rename it or choose another") from None


def _check_demos_file(demos: Path | None) -> None:
    """ConfigError unless `demos` (when given) is a regular file: a directory, a missing path and something else (a
    device, a pipe) are named as such."""
    if demos is None:
        return
    if demos.is_dir():
        raise ConfigError(f"--demos {demos} is a directory; give a demonstrations file (robomimic's HDF5 layout)")
    if not demos.exists():
        raise ConfigError(f"demonstrations file {demos} does not exist")
    if not demos.is_file():
        raise ConfigError(
            f"--demos {demos} is not a regular file (a device, pipe or socket); give a demonstrations file "
            "(robomimic's HDF5 layout)"
        )


def _check_count(value: int | None, flag: str, *, minimum: int = 1) -> None:
    """ConfigError when a count argument (--episodes, ...) given on the command line is below `minimum`."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


def _with_learner_endpoint(cfg: RunConfig, endpoint: str, flag: str, hint: str = "") -> RunConfig:
    """`cfg` with transport.learner = `endpoint`, validated as the config would; ConfigError naming `flag`."""
    from pydantic import ValidationError

    try:
        transport = TransportConfig.model_validate({**cfg.transport.model_dump(), "learner": endpoint})
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ConfigError(f"{flag} {endpoint!r} (transport.learner): {problems}{hint}") from None
    return cfg.model_copy(update={"transport": transport})


def _remove_unstarted_run(out: Path, *, keep_dir: bool) -> None:
    """Empty (and remove, unless `keep_dir`: it was there, empty, before) the run directory of a `train` that refused
    its inputs, so that the same command runs once they are fixed; kept when it holds anything of a run (a
    checkpoint, an evaluation row)."""
    from robot_rl.runlog import read_eval_csv

    if (out / "checkpoints").exists():
        return
    try:
        rows = read_eval_csv(out / "eval.csv") if (out / "eval.csv").is_file() else []
    except ConfigError:
        return
    if rows:
        return
    shutil.rmtree(out, ignore_errors=True)
    if keep_dir:
        out.mkdir(exist_ok=True)


def cmd_train(args: argparse.Namespace) -> int:
    from robot_rl.train import run_training

    _check_count(args.env_steps, "--env-steps")
    overrides, flags = _overrides_with_seed(args)
    if args.env_steps is not None:
        overrides.append(f"train.env_steps={args.env_steps}")
        flags[overrides[-1]] = f"--env-steps {args.env_steps}"
    cfg = load_config(args.config, overrides, flags=flags)
    _refuse_used_out(args.out, "run directory")
    if args.bc is not None and not args.bc.exists():
        raise ConfigError(f"--bc directory {args.bc} does not exist")
    _check_demos_file(args.demos)
    if args.bc is not None and not (args.bc / "bc.json").is_file():  # before the run directory is made
        raise ConfigError(f"--bc {args.bc}: no BC policy there (bc.json missing); train one with `robot-rl bc`")
    from robot_rl.bc import BCCheckpointError, BCDiverged
    from robot_rl.episodes import EpisodeFileError
    from robot_rl.train import refuse_unreachable_sim_server

    refuse_unreachable_sim_server(cfg)
    existed = not _create_out_dir(args.out, "run directory")  # then empty: _refuse_used_out refused anything else
    try:
        summary = run_training(cfg, args.out, bc_dir=args.bc, demos=args.demos, quiet=args.quiet)
    except (ConfigError, EpisodeFileError, BCCheckpointError, BCDiverged):  # the run's set-up failed
        _remove_unstarted_run(args.out, keep_dir=existed)
        raise
    bc = summary["bc_success_rate"]
    print(
        f"{summary['method']} seed {summary['seed']}: BC success {'-' if bc is None else f'{bc:.2f}'}, "
        f"final {summary['final_success_rate']:.2f}, best {summary['best_success_rate']:.2f} "
        f"after {summary['env_steps']} env steps, {summary['learner_steps']} learner steps, "
        f"{summary['wall_s']:.0f} s; run directory {args.out}"
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from robot_rl.security import cmd_keys as run_keys

    return run_keys(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from robot_rl.demo import run_demo

    if not math.isfinite(args.minutes) or args.minutes <= 0:
        raise ConfigError(f"--minutes must be a positive number, got {args.minutes}")
    out = args.out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")  # messages name it too
    _refuse_used_out(out, "run directory")
    return run_demo(out=out, minutes=args.minutes, config=args.config, overrides=args.overrides, quiet=args.quiet)


def cmd_learner(args: argparse.Namespace) -> int:
    from robot_rl.learner.service import run_learner

    cfg = load_config(args.config, args.overrides)
    if args.bind is not None:
        cfg = _with_learner_endpoint(cfg, args.bind, "--bind")
    _refuse_file_out(args.out, "run directory")
    if not (args.bc / "bc.json").is_file():
        raise ConfigError(f"--bc {args.bc}: no BC policy there (bc.json missing); train one with `robot-rl bc`")
    _check_demos_file(args.demos)
    return run_learner(cfg, args.out, bc_dir=args.bc, demos=args.demos, resume=args.resume, quiet=args.quiet)


def cmd_actor(args: argparse.Namespace) -> int:
    from robot_rl.actor.service import run_actor
    from robot_rl.train import refuse_unreachable_sim_server

    overrides = list(args.overrides)
    if args.robot == "franky-sim":
        robot = ["env.robot=franky", "env.franka.sim_server=true"]
    elif args.robot == "franky":  # the real arm at env.franka.host
        robot = ["env.robot=franky", "env.franka.sim_server=false"]
    else:
        robot = [] if args.robot is None else [f"env.robot={args.robot}"]
    overrides += robot
    flags = {text: f"--robot {args.robot}" for text in robot}
    if args.actor_id is not None:
        overrides.append(f"actor.actor_id={args.actor_id}")
        flags[overrides[-1]] = f"--actor-id {args.actor_id}"
    cfg = load_config(args.config, overrides, flags=flags)
    refuse_unreachable_sim_server(cfg)
    if not (args.bc / "bc.json").is_file():
        raise ConfigError(f"--bc {args.bc}: no BC policy there (bc.json missing); train one with `robot-rl bc`")
    _check_count(args.episodes, "--episodes")
    _refuse_file_out(args.out, "actor directory")
    learner = None if args.learner == "none" else args.learner
    if learner is not None:
        cfg = _with_learner_endpoint(cfg, learner, "--learner", "; or none for the BC policy alone")
    return run_actor(cfg, args.out, bc_dir=args.bc, learner=learner, episodes=args.episodes, quiet=args.quiet)


def cmd_collect(args: argparse.Namespace) -> int:
    from robot_rl.train import ExpertFailed, collect_demos

    overrides, flags = _overrides_with_seed(args)
    cfg = load_config(args.config, overrides, flags=flags)
    _check_count(args.episodes, "--episodes")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give the path of a new HDF5 file, e.g. demos.hdf5")
    if args.out.exists():
        raise ConfigError(
            f"demonstrations file {args.out} exists; choose a new --out (collect neither overwrites nor appends)"
        )
    _check_parents(args.out)
    try:
        kept, attempted = collect_demos(cfg, args.out, episodes=args.episodes, seed=cfg.seed)
    except ExpertFailed:
        args.out.unlink(missing_ok=True)  # it did not exist before: so that the same command runs once fixed
        raise
    print(f"wrote {kept} demonstrations to {args.out} ({kept}/{attempted} expert episodes kept)")
    return 0


def cmd_bc(args: argparse.Namespace) -> int:

    from robot_rl.envs import make_env
    from robot_rl.rollout import bc_policy_fn, evaluate
    from robot_rl.train import BC_EVAL_SEED, EVAL_SEED, refuse_unreachable_sim_server, train_bc_from_demos

    overrides, flags = _overrides_with_seed(args)
    cfg = load_config(args.config, overrides, flags=flags)
    _check_count(args.eval_episodes, "--eval-episodes", minimum=0)
    if args.eval_episodes > 0:
        refuse_unreachable_sim_server(cfg)
    _check_demos_file(args.demos)
    _refuse_used_out(args.out, "BC policy directory")
    created = _create_out_dir(args.out, "BC policy directory")
    try:
        policy = train_bc_from_demos(
            cfg, args.demos, args.out, seed=cfg.seed, warn=lambda line: print(f"robot-rl bc: {line}", file=sys.stderr)
        )
    except BaseException:
        if created and not any(args.out.iterdir()):  # nothing written: leave no trace of the failed command
            args.out.rmdir()
        raise
    print(f"BC policy ({cfg.bc.policy}) written to {args.out}")
    args.complete_output = True  # an interruption from here on cuts the evaluation only
    if args.eval_episodes > 0:
        env = make_env(cfg.env)
        result = evaluate(
            env,
            bc_policy_fn(policy, mode=cfg.agent.bc_action, seed=BC_EVAL_SEED),
            episodes=args.eval_episodes,
            seed=EVAL_SEED,
        )
        env.close()
        print(f"BC success rate {result.success_rate:.2f} over {result.episodes} episodes")
    return 0


def _refuse_run_directory(directory: Path) -> None:
    """ConfigError naming the checkpoints to choose from when `directory` is a run directory or its checkpoints/
    folder rather than one checkpoint (neither manifest.json nor bc.json in it)."""
    if (directory / "manifest.json").exists() or (directory / "bc.json").exists():
        return
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    names = sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file())
    if names:
        steps = [n for n in names if n.startswith("step_")]
        shown = [n for n in names if n not in steps] + steps[-1:]  # final, latest, the newest step_*
        more = f" ({len(steps)} step_* checkpoints in all)" if len(steps) > 1 else ""
        raise ConfigError(
            f"--checkpoint {directory} holds checkpoints, it is not one; pass one of them: "
            + ", ".join(str(folder / n) for n in shown)
            + more
        )


def _bc_run_config(directory: Path) -> RunConfig | None:
    """The run config a BC policy directory records it was trained with (`robot-rl bc` writes it), else None."""
    from robot_rl.train import BC_RUN_CONFIG

    path = directory / BC_RUN_CONFIG
    return load_config(path) if path.is_file() else None


def cmd_eval(args: argparse.Namespace) -> int:

    from robot_rl.bc import load_bc
    from robot_rl.envs import make_env
    from robot_rl.rollout import bc_policy_fn, evaluate
    from robot_rl.train import (
        BC_EVAL_SEED,
        EVAL_SEED,
        eval_config,
        evaluate_checkpoint,
        refuse_eval_overrides,
        refuse_other_obs,
    )

    seed = EVAL_SEED if args.seed is None else args.seed
    _check_count(args.episodes, "--episodes")
    _check_count(args.seed, "--seed", minimum=0)
    if args.checkpoint.exists() and not args.checkpoint.is_dir():
        raise ConfigError(
            f"--checkpoint {args.checkpoint} is a file, not a checkpoint directory; pass a run's "
            "checkpoints/<name> directory or a BC policy directory from `robot-rl bc`"
        )
    if not args.checkpoint.is_dir():
        raise ConfigError(f"checkpoint directory {args.checkpoint} does not exist")
    _refuse_run_directory(args.checkpoint)
    if (args.checkpoint / "bc.json").is_file():
        what = f"BC policy {args.checkpoint}"
        refuse_eval_overrides(args.overrides, what)
        own = None if args.config is not None else _bc_run_config(args.checkpoint)
        cfg, source = eval_config(own, args.config, args.overrides, what)
        bc = load_bc(args.checkpoint)
        env = make_env(cfg.env)
        refuse_other_obs(env, bc.obs_spec, what, source, "the policy was trained with")
        policy = bc_policy_fn(bc, mode=cfg.agent.bc_action, seed=BC_EVAL_SEED)  # as train evaluates it
        result = evaluate(env, policy, episodes=args.episodes, seed=seed)
        env.close()
        report = {"checkpoint": str(args.checkpoint), "method": "bc", "config": source, **result.__dict__}
    else:
        report = evaluate_checkpoint(
            args.checkpoint,
            episodes=args.episodes,
            seed=seed,
            config_path=args.config,
            overrides=args.overrides,
        )
    print(json.dumps(report, indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from robot_rl.actor.replay import run_replay

    return run_replay(
        args.log,
        checkpoint=args.checkpoint,
        config=args.config,
        bc_dir=args.bc,
        atol=args.atol,
        print_fn=lambda line: print(line, flush=True),
        error_fn=lambda line: print(line, file=sys.stderr),
    )


def _report_path(out: Path) -> Path:
    """The picture file `report --out` names: OUT/report.png for a directory, OUT.png without a suffix; ConfigError
    for a format matplotlib cannot write or a missing folder."""
    from matplotlib.backend_bases import FigureCanvasBase

    if out.is_dir():
        return out / "report.png"
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(f"--out {out}: cannot write a {out.suffix} picture; use one of .{', .'.join(formats)}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist; create it or choose another --out")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from robot_rl.runlog import plot_curves, read_eval_csv

    out = _report_path(args.out)
    seen: dict[Path, Path] = {}
    for run in args.runs:
        same = seen.setdefault(run.resolve(), run)
        if same is not run:
            also = "" if str(same) == str(run) else f" (also as {run})"
            raise ConfigError(f"run directory {same} is given twice{also}; give each run once")
    runs = {}
    for run in args.runs:
        csv_path = run / "eval.csv"
        if not csv_path.is_file() and (run / "learner" / "eval.csv").is_file():
            csv_path = run / "learner" / "eval.csv"  # a demo's (or a learner beside its actor's) run directory
        if not run.exists():
            raise ConfigError(f"{run} does not exist")
        if not csv_path.is_file():
            raise ConfigError(f"{run} has no eval.csv: not a run directory of train, learner or demo")
        rows = read_eval_csv(csv_path, lambda line: print(f"robot-rl report: {line}", file=sys.stderr))
        if any(row.phase != "bc" for row in rows):  # the curves start at the first evaluation after BC's
            label = str(run)
            if not (csv_path.parent / "summary.json").is_file():  # written when a run finishes
                label += " (unfinished)"
                print(
                    f"robot-rl report: {run} has no summary.json: the run is unfinished (running, or interrupted); "
                    f"its curve ends at {rows[-1].env_steps} env steps",
                    file=sys.stderr,
                )
            runs[label] = rows
        else:
            print(f"robot-rl report: {csv_path} has no evaluation after BC's yet; {run} is left out", file=sys.stderr)
    if not runs:
        raise ConfigError("no run has an evaluation to plot (every eval.csv holds at most the BC policy's row)")
    try:
        written = plot_curves(runs, out)
    except OSError as exc:
        if _disk_full(exc) is not None:
            raise
        raise ConfigError(f"--out {out}: cannot write the picture: {exc.strerror or exc}") from exc
    print(f"wrote {written}")
    return 0


def cmd_cameras(args: argparse.Namespace) -> int:
    from robot_rl.cameras_cmd import format_report, run_cameras

    report = run_cameras(args.config, args.overrides, args.recording, args.out, args.frames)
    print(format_report(report))
    return 0


COMMANDS = {
    "keys": cmd_keys,
    "demo": cmd_demo,
    "learner": cmd_learner,
    "actor": cmd_actor,
    "train": cmd_train,
    "collect": cmd_collect,
    "bc": cmd_bc,
    "eval": cmd_eval,
    "report": cmd_report,
    "replay": cmd_replay,
    "cameras": cmd_cameras,
}


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How disk-full errors read when the OSError itself is gone: safetensors' Rust errors ("os error 28"), HDF5's
# ("errno = 28"), and messages that quote the C library's text.
_DISK_FULL_TEXT = re.compile(
    "|".join(
        [re.escape(os.strerror(e)) for e in _DISK_FULL_ERRNOS]
        + [rf"(os error|errno =|Os \{{ code:) {e}\b" for e in _DISK_FULL_ERRNOS]
        + ["StorageFull", "QuotaExceeded"]
    )
)
# What to do after freeing space, per command (--out is substituted).
_DISK_FULL_ADVICE = {
    "learner": "rerun with --resume to continue the run in {out}",
    "actor": "rerun the same command (the actor continues in {out})",
    "train": "rerun with a new --out (train cannot resume; {out} holds the partial run)",
    "demo": "rerun with a new --out ({out} holds the partial run)",
    "bc": "remove {out} or choose a new --out, then rerun",
    "collect": "remove the partial {out} or choose a new --out, then rerun",
}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, then its __cause__ and __context__ exceptions, recursively, each once."""
    chain: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if any(e is seen for seen in chain):
            continue
        chain.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return chain


def _os_error_in(exc: BaseException, errnos: tuple[int, ...], text: re.Pattern) -> tuple[str | None, str] | None:
    """(path or None, error text) when `exc` or an exception in its chain is an OSError of one of `errnos`, or (the
    OSError gone, e.g. inside safetensors or HDF5) says so in words `text` finds."""
    chain = _exception_chain(exc)
    for e in chain:
        if isinstance(e, OSError) and e.errno in errnos:
            return (None if e.filename is None else os.fsdecode(e.filename)), e.strerror or str(e)
    for e in chain:
        if text.search(str(e)):
            return None, " ".join(f"{type(e).__name__}: {e}".split())
    return None


def _disk_full(exc: BaseException) -> tuple[str | None, str] | None:
    """What `exc` says when the disk or the quota is full (see _os_error_in)."""
    return _os_error_in(exc, _DISK_FULL_ERRNOS, _DISK_FULL_TEXT)


_UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
# The same when only the text is left: safetensors' Rust errors ("os error 30") and the C library's words.
_UNWRITABLE_TEXT = re.compile(
    "|".join([re.escape(os.strerror(e)) for e in _UNWRITABLE_ERRNOS] + [rf"os error {e}\b" for e in _UNWRITABLE_ERRNOS])
)


def _unwritable(exc: BaseException) -> tuple[str | None, str] | None:
    """What `exc` says when a file could not be written or read for lack of permission, or written on a read-only
    filesystem (see _os_error_in)."""
    return _os_error_in(exc, _UNWRITABLE_ERRNOS, _UNWRITABLE_TEXT)


def _failure(args: argparse.Namespace, exc: Exception) -> int | None:
    """Print a one-line message for an expected failure and return the exit code; None for an unexpected one."""
    from robot_rl.agent import TrainingDiverged
    from robot_rl.bc import BCCheckpointError, BCDiverged
    from robot_rl.checkpoint import CheckpointError
    from robot_rl.episodes import EpisodeFileError
    from robot_rl.hardware.camera import CameraError
    from robot_rl.hardware.interfaces import RobotFault
    from robot_rl.security import SecurityError

    full = _disk_full(exc)
    if full is not None:
        path, error = full
        out = getattr(args, "out", None)
        where = f" {path}" if path else (f" to {out}" if out else "")
        gone = out is not None and args.command in ("bc", "collect") and not Path(out).exists()  # removed, empty
        advice = "rerun" if gone else _DISK_FULL_ADVICE.get(args.command, "rerun").format(out=out)
        print(
            f"robot-rl {args.command}: disk full while writing{where}: {error}; free space and {advice}",
            file=sys.stderr,
        )
        return 2
    unwritable = _unwritable(exc)
    if unwritable is not None:
        path, error = unwritable
        out = getattr(args, "out", None)
        where = path or out or "its files"
        print(
            f"robot-rl {args.command}: {where}: {error} (permissions, or a read-only mount); fix that and run the same "
            "command again",
            file=sys.stderr,
        )
        return 2
    from robot_rl.learner.store import StoreError

    known = (ConfigError, EpisodeFileError, BCCheckpointError, BCDiverged, CheckpointError, SecurityError, CameraError,
             StoreError)  # fmt: skip
    if isinstance(exc, RobotFault):  # unreachable, or lost and not reconnected: the actor has stopped it
        print(f"robot-rl {args.command}: robot: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if isinstance(exc, known):
        print(f"robot-rl {args.command}: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, TrainingDiverged):  # a failed run, not a usage error: the last checkpoint is kept
        print(f"robot-rl {args.command}: {exc}", file=sys.stderr)
        return 3
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a job scheduler's stop) received by a command that stops on it as on Ctrl-C."""


# The one-shot commands that stop on SIGTERM as on Ctrl-C, with a line saying what they left (the services have
# their own orderly stop).
_TERMINABLE = ("train", "collect", "bc")
# Long-running services: their log says what happens (actors welcomed, gaps, evaluations), with the time of each line.
_SERVICES = ("learner", "actor")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a live status line redirects it to print above itself)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _configure_logging(command: str) -> None:
    """robot_rl's messages to stderr: services from INFO up with a timestamp, other commands warnings as bare lines.
    Left alone when the process already has logging set up (an embedding program, pytest)."""
    ours = logging.getLogger("robot_rl")
    if logging.getLogger().handlers or ours.handlers:
        return
    handler = _StderrHandler()
    service = command in _SERVICES
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if service else "%(message)s")
    )
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if service else logging.WARNING)
    ours.propagate = False  # printed once, by this handler


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.command)
    if threading.current_thread() is threading.main_thread():
        if os.environ.get(SUPERVISED_ENV) == "1":
            # A service the demo started: the terminal's Ctrl-C reaches it too, but the demo stops it in order
            # (actor first, so that its last chunks are acknowledged, then the learner) with SIGTERM.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            # Ctrl-C interrupts every command, also one started with SIGINT ignored (a background job of a shell).
            signal.signal(signal.SIGINT, signal.default_int_handler)
    catch_term = threading.current_thread() is threading.main_thread() and args.command in _TERMINABLE
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated) if catch_term else None  # restored on return
    try:
        _refuse_undecodable_paths(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        out = getattr(args, "out", None)
        left = out is not None and out.exists() and not (out.is_dir() and not any(out.iterdir()))
        terminated = isinstance(exc, Terminated)
        if getattr(args, "complete_output", False):
            what = f"; {out} is complete, what came after writing it was cut short"
        else:
            what = f"; partial output in {out}" if left else ""
            if left and args.command == "train":  # its checkpoints are for eval: a train run does not resume
                what += " (train does not resume: start again with a new --out; learner and actor resume)"
        print(
            f"\nrobot-rl {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}{what}",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM if terminated else 130
    except Exception as exc:
        code = _failure(args, exc)
        if code is None:
            raise
        return code
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_term is None else previous_term)


if __name__ == "__main__":
    sys.exit(main())
