"""Command-line refusals: every bad argument or damaged input ends in one line `robot-rl <cmd>: ...` and exit code 2,
and nothing the user already had is overwritten. No test here trains anything."""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from robot_rl import cli
from robot_rl.cli import main
from robot_rl.config import ConfigError, load_config
from robot_rl.episodes import Episode, EpisodeWriter, read_episodes
from robot_rl.rollout import evaluate
from robot_rl.runlog import EVAL_COLUMNS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STATE = CONFIGS / "sim_peg_state.yaml"
IMAGE = CONFIGS / "sim_peg_image.yaml"
KEEP = b"precious bytes"


def error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one line the command printed on stderr, checked to start with `robot-rl <command>: `."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"robot-rl {command}: "), err
    return err


def precious(path: Path) -> Path:
    """A file the user wants kept."""
    path.write_bytes(KEEP)
    return path


def fake_bc_dir(path: Path) -> Path:
    """A directory that passes the commands' `bc.json` check (nothing loads it in these tests)."""
    path.mkdir()
    (path / "bc.json").write_text("{}")
    return path


def state_demos(path: Path, steps: int = 4, *, failed: int = 0, env: dict | None = None) -> Path:
    """A tiny demonstrations file recorded with the state config's observations (ee_pose only): one successful
    episode, then `failed` episodes cut off at the step limit. `env`: the env config it says it was recorded with."""
    rng = np.random.default_rng(0)
    pose = rng.uniform(-0.01, 0.01, size=(steps + 1, 6)).astype(np.float32)
    episode = Episode(
        obs={"ee_pose": pose[:-1]},
        next_obs={"ee_pose": pose[1:]},
        actions=rng.uniform(-1, 1, size=(steps, 6)).astype(np.float32),
        rewards=np.eye(1, steps, steps - 1, dtype=np.float32)[0],
        terminated=np.eye(1, steps, steps - 1, dtype=bool)[0],  # a demonstration ends in success
        truncated=np.zeros(steps, bool),
        attrs={"seed": 0, "success": True},
    )
    cut = dataclasses.replace(
        episode, rewards=np.zeros(steps, np.float32), terminated=np.zeros(steps, bool),
        truncated=episode.terminated.copy(), attrs={"seed": 1, "success": False},
    )  # fmt: skip
    env_args = {"env": "robot_rl/PegInsertionSim-v0"} | ({"config": env} if env is not None else {})
    with EpisodeWriter(path, env_args=env_args) as writer:
        for ep in [episode] + [cut] * failed:
            writer.add_episode(ep)
    return path


# --------------------------------------------------------------------------------------------------------------------
# 1, 2: --out
# --------------------------------------------------------------------------------------------------------------------
def out_file_args(command: str, tmp_path: Path, out: Path) -> list[str]:
    if command == "train":
        return ["train", "--config", str(STATE), "--out", str(out), "--quiet"]
    if command == "demo":
        return ["demo", "--out", str(out), "--quiet"]
    if command == "bc":
        return ["bc", "--config", str(STATE), "--demos", str(precious(tmp_path / "d.hdf5")), "--out", str(out)]
    bc = ["--bc", str(fake_bc_dir(tmp_path / "bc"))]
    if command == "actor":
        return ["actor", "--config", str(STATE), "--out", str(out), "--learner", "none", *bc, "--quiet"]
    return ["learner", "--config", str(STATE), "--out", str(out), *bc, "--quiet"]


@pytest.mark.parametrize("command", ["train", "demo", "bc", "actor", "learner"])
def test_out_that_is_a_file_is_refused_and_kept(tmp_path: Path, command: str, capsys) -> None:
    out = precious(tmp_path / "out")
    assert main(out_file_args(command, tmp_path, out)) == 2
    err = error_line(capsys, command)
    assert f"{out} exists and is a file, not a directory" in err and "--out" in err
    assert out.read_bytes() == KEEP


def test_out_under_a_file_is_refused(tmp_path: Path, capsys) -> None:
    parent = precious(tmp_path / "f")
    assert main(out_file_args("train", tmp_path, parent / "run")) == 2
    assert f"{parent} is a file, not a directory" in error_line(capsys, "train")


def test_collect_refuses_an_existing_file_and_a_directory(tmp_path: Path, capsys) -> None:
    demos = precious(tmp_path / "demos.hdf5")
    args = ["collect", "--config", str(STATE), "--episodes", "1", "--out"]
    assert main([*args, str(demos)]) == 2
    err = error_line(capsys, "collect")
    assert f"demonstrations file {demos} exists; choose a new --out" in err
    assert demos.read_bytes() == KEEP
    assert main([*args, str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in error_line(capsys, "collect")


def test_bc_refuses_a_non_empty_out_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bc"
    out.mkdir()
    kept = precious(out / "bc.json")
    demos = state_demos(tmp_path / "demos.hdf5")
    assert main(["bc", "--config", str(STATE), "--demos", str(demos), "--out", str(out)]) == 2
    err = error_line(capsys, "bc")
    assert f"BC policy directory {out} exists and is not empty; choose a new --out" in err
    assert kept.read_bytes() == KEEP and sorted(p.name for p in out.iterdir()) == ["bc.json"]


# --------------------------------------------------------------------------------------------------------------------
# 3: counts
# --------------------------------------------------------------------------------------------------------------------
def count_args(case: str, tmp_path: Path) -> tuple[list[str], str]:
    out = str(tmp_path / "out")
    if case == "eval":
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        return ["eval", "--checkpoint", str(checkpoint), "--episodes", "0"], "--episodes must be at least 1, got 0"
    if case == "collect":
        return ["collect", "--episodes", "0", "--out", out], "--episodes must be at least 1, got 0"
    if case == "actor":
        bc = str(fake_bc_dir(tmp_path / "bc"))
        args = ["actor", "--out", out, "--learner", "none", "--bc", bc, "--episodes", "0"]
        return args, "--episodes must be at least 1, got 0"
    if case == "bc":
        demos = str(precious(tmp_path / "d.hdf5"))
        args = ["bc", "--demos", demos, "--out", out, "--eval-episodes", "-1"]
        return args, "--eval-episodes must be at least 0, got -1"
    return ["train", "--out", out, "--env-steps", "0"], "--env-steps must be at least 1, got 0"


@pytest.mark.parametrize("case", ["eval", "collect", "actor", "bc", "train"])
def test_counts_below_their_minimum_are_refused(tmp_path: Path, case: str, capsys) -> None:
    args, message = count_args(case, tmp_path)
    assert main(args) == 2
    assert message in error_line(capsys, args[0])
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_zero_episodes() -> None:
    with pytest.raises(ValueError, match="episodes must be at least 1"):
        evaluate(None, lambda obs: None, episodes=0, seed=0)


# --------------------------------------------------------------------------------------------------------------------
# 4: demonstrations recorded with another config
# --------------------------------------------------------------------------------------------------------------------
def test_bc_on_demos_of_another_config_names_the_missing_keys(tmp_path: Path, capsys) -> None:
    demos = state_demos(tmp_path / "demos.hdf5")
    out = tmp_path / "bc"
    assert main(["bc", "--config", str(IMAGE), "--demos", str(demos), "--out", str(out)]) == 2
    err = error_line(capsys, "bc")
    assert "lack the observation keys ['front', 'wrist']" in err
    assert "recorded with another config" in err and str(demos) in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["bc", "train"])
def test_demos_recorded_with_other_action_scales_or_camera_views_are_refused_naming_them(
    tmp_path: Path, command: str, capsys
) -> None:
    """Demonstrations whose env_args say they moved the arm by other steps or saw other crops would teach the policy
    what this env does not do: refused, naming each setting with both values. Settings that do not change what the
    demonstrations mean (the safety box, the robot's address) may differ."""
    env = load_config(STATE).env.model_dump(mode="json")
    same = state_demos(
        tmp_path / "same.hdf5", env=env | {"safety": {**env["safety"], "xyz_low": [-0.04, -0.05, -0.08]}}
    )
    env["action"]["translation_scale_m"] = 0.005
    env["task"]["control_period_s"] = 0.05
    other = state_demos(tmp_path / "other.hdf5", env=env)
    out = tmp_path / "out"
    args = {"bc": ["bc", "--config", str(STATE), "--out", str(out)],
            "train": ["train", "--config", str(STATE), "--out", str(out), "--quiet"]}  # fmt: skip
    assert main([*args[command], "--demos", str(other)]) == 2
    err = error_line(capsys, command)
    assert f"{other} was recorded with other env settings than the config's" in err
    assert "env.action.translation_scale_m: config 0.015, demonstrations 0.005" in err
    assert "env.task.control_period_s: config 0.1, demonstrations 0.05" in err and "safety" not in err
    if command == "bc":
        assert main([*args[command], "--demos", str(same), "--set", "bc.steps=2"]) == 0
    # A camera's crop: the image config's views, recorded with the front camera cropped elsewhere.
    image_env = load_config(IMAGE).env.model_dump(mode="json")
    image_env["cameras"][0]["crop"]["x"] += 8
    moved = state_demos(tmp_path / "moved.hdf5", env=image_env)
    assert main(["bc", "--config", str(IMAGE), "--demos", str(moved), "--out", str(tmp_path / "img")]) == 2
    assert f"env.cameras {image_env['cameras'][0]['name']} crop: config" in error_line(capsys, "bc")


def test_demos_without_a_step_are_one_line_for_bc_and_train(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.hdf5"
    EpisodeWriter(empty, env_args={"env": "robot_rl/PegInsertionSim-v0"}).close()  # an actor's file, no step yet
    assert main(["bc", "--config", str(STATE), "--demos", str(empty), "--out", str(tmp_path / "bc")]) == 2
    assert f"{empty}: no demonstration with a step in it" in error_line(capsys, "bc")
    args = ["train", "--config", str(STATE), "--demos", str(empty), "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--set", "agent.method=rlpd"]) == 2
    assert f"{empty}: no demonstration with a step in it" in error_line(capsys, "train")
    assert not (tmp_path / "run").exists()  # the same command runs once the demonstrations are fixed
    (tmp_path / "run").mkdir()  # made by the user, empty: kept, and left empty
    assert main([*args, "--set", "agent.method=rlpd"]) == 2
    assert list((tmp_path / "run").iterdir()) == [] and error_line(capsys, "train")


def widen_actions(demo: h5py.Group) -> None:
    """Every demo's actions one wider (the gripper of a 7-dim controller, say)."""
    for each in demo.parent.values():
        each["wide"] = np.concatenate([each["actions"][()], np.zeros((len(each["actions"]), 1), np.float32)], 1)
        del each["actions"]
        each.move("wide", "actions")


def scale_actions(demo: h5py.Group) -> None:
    demo["actions"][...] = demo["actions"][()] * 3


def add_obs_key(demo: h5py.Group) -> None:
    for group in ("obs", "next_obs"):
        demo[f"{group}/extra"] = np.zeros((len(demo["actions"]), 2), np.float32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (widen_actions, "the demonstrations' actions have 7 dimensions, the config's env takes 6"),
        (scale_actions, "the demonstrations' actions must lie in [-1, 1] (the env's normalised actions)"),
        (add_obs_key, "episode 1 has fields"),
    ],
)
@pytest.mark.parametrize("command", ["bc", "train"])
def test_demos_whose_actions_or_fields_do_not_fit_are_one_line(
    tmp_path: Path, command: str, change: Callable[[h5py.Group], None], message: str, capsys
) -> None:
    """Actions of another width used to train a BC policy of that width without a word; out of range or mixed
    fields were a ValueError traceback."""
    demos = state_demos(tmp_path / "demos.hdf5")
    with EpisodeWriter(demos, env_args={"env": "robot_rl/PegInsertionSim-v0"}, mode="a") as writer:
        writer.add_episode(read_episodes(demos)[0])
    with h5py.File(demos, "a") as f:
        change(f["data/demo_1"])
    out = tmp_path / "out"
    args = ["--config", str(STATE), "--demos", str(demos), "--out", str(out)]
    args = ["bc", *args] if command == "bc" else ["train", *args, "--quiet", "--set", "agent.method=rlpd"]
    assert main(args) == 2
    line = error_line(capsys, command)
    assert line.startswith(f"robot-rl {command}: {demos}: ") and message in line
    assert not out.exists()


def test_demos_whose_episodes_record_different_extras_still_train_bc(tmp_path: Path, capsys) -> None:
    """Per-step extras (an actor's gating record, a fault's) are not demonstrations: a log whose episodes record
    different ones (a run's rollouts.hdf5, say) serves BC. Differing observations stay refused, naming the fields."""
    demos = state_demos(tmp_path / "demos.hdf5")
    with EpisodeWriter(demos, env_args={"env": "robot_rl/PegInsertionSim-v0"}, mode="a") as writer:
        writer.add_episode(read_episodes(demos)[0])
    with h5py.File(demos, "a") as f:
        f["data/demo_1/extras/q_rl"] = np.zeros(len(f["data/demo_1/actions"]), np.float32)
    out = tmp_path / "bc"
    args = ["bc", "--config", str(STATE), "--demos", str(demos), "--out", str(out), "--set", "bc.steps=5"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "bc.json").is_file()
    with h5py.File(demos, "a") as f:
        add_obs_key(f["data/demo_1"])
    assert main([*args[:-2], "--out", str(tmp_path / "bc2"), "--set", "bc.steps=5"]) == 2
    line = error_line(capsys, "bc")
    assert "episode 1 has fields episode 0 lacks (next_obs/extra, obs/extra) and lacks fields it has (none)" in line
    assert "keep them in separate files" in line


@pytest.mark.parametrize("command", ["bc", "train", "learner"])
def test_demos_that_are_a_directory_are_named_as_such(tmp_path: Path, command: str, capsys) -> None:
    out = tmp_path / "out"
    args = [command, "--config", str(STATE), "--demos", str(tmp_path), "--out", str(out)]
    if command == "learner":
        args += ["--bc", str(fake_bc_dir(tmp_path / "bc"))]
    assert main(args) == 2
    assert f"--demos {tmp_path} is a directory; give a demonstrations file" in error_line(capsys, command)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# 5, 6: --config and --checkpoint that are the wrong kind of path
# --------------------------------------------------------------------------------------------------------------------
def test_binary_config_file_is_refused(tmp_path: Path, capsys) -> None:
    demos = state_demos(tmp_path / "demos.hdf5")
    assert main(["collect", "--config", str(demos), "--episodes", "1", "--out", str(tmp_path / "d2.hdf5")]) == 2
    err = error_line(capsys, "collect")
    assert f"config file {demos} is not a text file" in err and "YAML config" in err


def test_config_that_is_a_directory_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["collect", "--config", str(tmp_path), "--episodes", "1", "--out", str(tmp_path / "d.hdf5")]) == 2
    err = error_line(capsys, "collect")
    assert f"config file {tmp_path} is a directory, not a YAML file" in err and "does not exist" not in err


def test_eval_checkpoint_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    checkpoint = precious(tmp_path / "demos.hdf5")
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 2
    err = error_line(capsys, "eval")
    assert f"--checkpoint {checkpoint} is a file, not a checkpoint directory" in err
    assert "does not exist" not in err


def test_learner_demos_for_a_method_that_samples_none_are_refused(tmp_path: Path, capsys) -> None:
    from robot_rl.bc import make_bc_policy, save_bc
    from robot_rl.learner.service import learner_observation_space
    from robot_rl.obs import spec_from_space

    cfg = load_config(STATE)
    ones = np.ones(6, np.float32)
    policy = make_bc_policy(cfg.bc, spec_from_space(learner_observation_space(cfg)), 6, -ones, ones)
    demos, bc = state_demos(tmp_path / "demos.hdf5"), str(save_bc(policy, tmp_path / "bc"))
    out = tmp_path / "run"
    assert main(["learner", "--config", str(STATE), "--out", str(out), "--bc", bc, "--demos", str(demos)]) == 2
    err = error_line(capsys, "learner")
    assert f"--demos {demos} would be ignored" in err and "agent.offline_ratio" in err
    assert not out.exists()
    # A method that samples them takes them: it gets as far as the port (here, taken), not refused for --demos.
    args = ["learner", "--config", str(STATE), "--out", str(out), "--bc", bc, "--demos", str(demos)]
    assert main([*args, "--bind", "tcp://999.0.0.1:1", "--set", "agent.method=rlpd"]) == 2
    err = error_line(capsys, "learner")
    assert "999.0.0.1" in err and "--demos" not in err
    # Demonstrations recorded with another action scale are refused, naming it.
    env = cfg.env.model_dump(mode="json")
    env["action"]["rotation_scale_rad"] = 0.05
    other = state_demos(tmp_path / "other.hdf5", env=env)
    args = ["learner", "--config", str(STATE), "--out", str(tmp_path / "run2"), "--bc", bc, "--demos", str(other)]
    assert main([*args, "--set", "agent.method=rlpd"]) == 2
    assert "env.action.rotation_scale_rad: config 0.02625, demonstrations 0.05" in error_line(capsys, "learner")


# --------------------------------------------------------------------------------------------------------------------
# 7, 8: endpoints
# --------------------------------------------------------------------------------------------------------------------
def test_actor_learner_endpoint_error_names_the_flag(tmp_path: Path, capsys) -> None:
    bc = str(fake_bc_dir(tmp_path / "bc"))
    args = ["actor", "--config", str(STATE), "--out", str(tmp_path / "a"), "--bc", bc, "--learner", "127.0.0.1:17555"]
    assert main(args) == 2
    err = error_line(capsys, "actor")
    assert "--learner '127.0.0.1:17555'" in err and "tcp://HOST:PORT" in err
    assert "embedded defaults" not in err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("command", "flag"), [("learner", "--bind"), ("actor", "--learner")])
def test_out_of_range_port_on_the_command_line_is_refused(tmp_path: Path, command: str, flag: str, capsys) -> None:
    bc = str(fake_bc_dir(tmp_path / "bc"))
    args = [command, "--config", str(STATE), "--out", str(tmp_path / "o"), "--bc", bc, flag, "tcp://127.0.0.1:99999"]
    assert main(args) == 2
    err = error_line(capsys, command)
    assert flag in err and "port 99999 is out of range; ports are 1-65535" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field", ["transport.learner", "transport.weights"])
@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_config_endpoints_refuse_out_of_range_ports(field: str, port: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: port {port} is out of range"):
        load_config(None, [f"{field}=tcp://127.0.0.1:{port}"])


def test_config_endpoints_accept_the_valid_forms() -> None:
    cfg = load_config(None, ["transport.learner=tcp://*:1", "transport.weights=tcp://10.0.0.2:65535"])
    assert (cfg.transport.learner, cfg.transport.weights_endpoint) == ("tcp://*:1", "tcp://10.0.0.2:65535")
    assert load_config(None, ["transport.learner=ipc:///tmp/l"]).transport.weights_endpoint == "ipc:///tmp/l.weights"
    with pytest.raises(ConfigError, match=r"transport\.learner: not a ZeroMQ endpoint; expected tcp://HOST:PORT"):
        load_config(None, ["transport.learner=127.0.0.1:5555"])


def test_request_port_65535_needs_an_explicit_weights_endpoint() -> None:
    with pytest.raises(ConfigError, match="port 65535, which leaves no port \\+ 1 for the weights endpoint"):
        load_config(None, ["transport.learner=tcp://127.0.0.1:65535"])
    load_config(None, ["transport.learner=tcp://127.0.0.1:65535", "transport.weights=tcp://127.0.0.1:6000"])


# --------------------------------------------------------------------------------------------------------------------
# 9: report
# --------------------------------------------------------------------------------------------------------------------
ROWS = [
    [0, 0, 1.0, 0.5, 1.0, 20, "bc"],
    [100, 50, 2.0, 0.6, 0.5, 20, "online"],
    [200, 100, 3.0, 0.7, 0.4, 20, "online"],
]


def run_dir(path: Path, *, header: tuple[str, ...] = EVAL_COLUMNS, tail: str = "", finished: bool = True) -> Path:
    """A run directory whose eval.csv holds ROWS under `header`, then `tail` verbatim; a finished run's has its
    summary.json."""
    path.mkdir()
    if finished:
        (path / "summary.json").write_text("{}")
    with (path / "eval.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(ROWS)
        f.write(tail)
    return path


@pytest.mark.parametrize(
    ("out", "message"),
    [("nodir/r.png", "directory {tmp}/nodir does not exist"), ("r.txt", "cannot write a .txt picture; use one of")],
)
def test_report_refuses_an_out_it_cannot_write(tmp_path: Path, out: str, message: str, capsys) -> None:
    run = run_dir(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / out)]) == 2
    assert message.format(tmp=tmp_path) in error_line(capsys, "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_report_prints_the_file_it_wrote(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / "adir")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'adir.png'}"
    assert (tmp_path / "adir.png").is_file()
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["report", str(run), "--out", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {folder / 'report.png'}"
    assert (folder / "report.png").is_file()


def test_report_marks_an_unfinished_run_and_names_a_missing_one(tmp_path: Path, capsys) -> None:
    """A run without summary.json (interrupted, or still running) is plotted as unfinished and said so; a finished
    one is not; a path that does not exist is named as such."""
    unfinished, finished = run_dir(tmp_path / "cut", finished=False), run_dir(tmp_path / "done")
    assert main(["report", str(unfinished), str(finished), "--out", str(tmp_path / "r.png")]) == 0
    err = capsys.readouterr().err
    assert f"{unfinished} has no summary.json: the run is unfinished (running, or interrupted)" in err
    assert f"its curve ends at {ROWS[-1][0]} env steps" in err and str(finished) not in err
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.png")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in error_line(capsys, "report")


def test_report_refuses_an_eval_csv_without_the_columns(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run", header=("steps", *EVAL_COLUMNS[1:]))
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert f"{run / 'eval.csv'} lacks the columns ['env_steps']" in error_line(capsys, "report")
    assert not (tmp_path / "r.png").exists()


def test_report_skips_a_cut_off_last_row_with_a_warning(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run", tail="300,150,4.0")
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {tmp_path / 'r.png'}"
    assert f"{run / 'eval.csv'} line 5: the last row is cut off" in captured.err and "skipping it" in captured.err
    assert (tmp_path / "r.png").is_file()


def test_report_refuses_a_damaged_row_before_the_last(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run", tail="300,150\r\n400,200,5.0,0.8,0.3,20,online\r\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert f"{run / 'eval.csv'} line 5 is damaged (field 'wall_s' missing)" in error_line(capsys, "report")


def test_demo_report_skips_a_cut_off_row_of_the_learner(tmp_path: Path, capsys) -> None:
    from robot_rl.demo import report

    run_dir(tmp_path / "learner", tail="300,150,4.0")
    assert report(tmp_path) == 0
    captured = capsys.readouterr().out
    assert "line 5: the last row is cut off" in captured and "Q2RL (final)     0.70" in captured
    assert (tmp_path / "report.png").is_file()


def test_a_resumed_run_log_drops_a_cut_off_row_before_it_appends(tmp_path: Path, caplog) -> None:
    from robot_rl.runlog import EvalRow, RunLog, read_eval_csv

    run = run_dir(tmp_path / "run", tail="300,150,4.0")
    kept = len(read_eval_csv(run / "eval.csv", lambda line: None))
    log = RunLog(run, tensorboard=False, resume=True)
    assert len(log.rows) == kept and "the last row is cut off" in caplog.text
    log.eval_row(EvalRow(500, 250, 6.0, 0.9, 0.2, 20, "online"))
    rows = read_eval_csv(run / "eval.csv", lambda line: pytest.fail(f"warned: {line}"))
    assert len(rows) == kept + 1 and rows[-1].env_steps == 500  # the new row is whole, not glued to the cut one


def test_an_evaluation_redone_after_a_restart_replaces_its_row_instead_of_repeating_it(tmp_path: Path, caplog) -> None:
    """A learner killed after writing an evaluation's row and before its next checkpoint redoes that evaluation when
    resumed: eval.csv keeps one row per evaluation, the newer one."""
    from robot_rl.runlog import EvalRow, RunLog, read_eval_csv

    first = RunLog(tmp_path / "run", tensorboard=False)
    first.eval_row(EvalRow(0, 0, 1.0, 0.4, 1.0, 20, "bc"))
    first.eval_row(EvalRow(500, 250, 6.0, 0.6, 0.3, 20, "online"))
    resumed = RunLog(tmp_path / "run", tensorboard=False, resume=True)
    resumed.eval_row(EvalRow(500, 200, 9.0, 0.7, 0.25, 20, "online"))  # the same evaluation, done again
    resumed.eval_row(EvalRow(1000, 450, 12.0, 0.9, 0.1, 20, "online"))
    # Within a run, evaluations at the same env steps (a fast actor overshot both targets) are distinct: both stay.
    resumed.eval_row(EvalRow(1000, 450, 13.0, 0.8, 0.1, 20, "online"))
    rows = read_eval_csv(tmp_path / "run" / "eval.csv", lambda line: pytest.fail(f"warned: {line}"))
    assert [(r.env_steps, r.phase, r.success_rate) for r in rows] == [
        (0, "bc", 0.4), (500, "online", 0.7), (1000, "online", 0.9), (1000, "online", 0.8)
    ]  # fmt: skip
    assert [r.success_rate for r in resumed.rows] == [r.success_rate for r in rows]
    assert "done again after a restart" in caplog.text and "(success 0.60 -> 0.70)" in caplog.text
    assert not (tmp_path / "run" / "eval.csv.tmp").exists()
    # After another restart, an evaluation at the last row's env steps with more learner steps is a new one.
    again = RunLog(tmp_path / "run", tensorboard=False, resume=True)
    again.eval_row(EvalRow(1000, 600, 20.0, 1.0, 0.0, 20, "online"))
    assert [r.success_rate for r in read_eval_csv(tmp_path / "run" / "eval.csv")] == [0.4, 0.7, 0.9, 0.8, 1.0]


# --------------------------------------------------------------------------------------------------------------------
# 10: disk full
# --------------------------------------------------------------------------------------------------------------------
class FakeSafetensorError(Exception):
    """Reads as safetensors' error does when a write hits a full disk."""


def raising(exc: BaseException):
    def command(args) -> int:
        raise exc

    return command


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("command", "args", "exc", "expected"),
    [
        (
            "train",
            ["--out", "RUN"],
            OSError(errno.ENOSPC, "No space left on device", "RUN/rollouts.hdf5"),
            "disk full while writing RUN/rollouts.hdf5: No space left on device; free space and rerun with a new --out",
        ),
        (
            "learner",
            ["--out", "RUN", "--bc", "BC"],
            chained(RuntimeError("writing the transition log failed"), OSError(errno.EDQUOT, "Disk quota exceeded")),
            "disk full while writing to RUN: Disk quota exceeded; free space and rerun with --resume",
        ),
        (
            "bc",
            ["--demos", "D", "--out", "RUN"],
            FakeSafetensorError("Error while serializing: No space left on device (os error 28)"),
            "disk full while writing to RUN: FakeSafetensorError: Error while serializing: No space left on device "
            "(os error 28); free space and rerun",  # RUN was left empty and removed: nothing to remove by hand
        ),
    ],
)
def test_disk_full_is_one_line_with_what_to_do(monkeypatch, capsys, command, args, exc, expected) -> None:
    monkeypatch.setitem(cli.COMMANDS, command, raising(exc))
    assert main([command, *args]) == 2
    assert expected in error_line(capsys, command)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.EROFS, "Read-only file system", "RUN/.lock"), "RUN/.lock: Read-only file system"),
        (
            chained(RuntimeError("writing the transition log failed"), OSError(errno.EACCES, "Permission denied")),
            "RUN: Permission denied",
        ),
        (
            FakeSafetensorError("Error while serializing: Read-only file system (os error 30) at path RUN/x"),
            "RUN: FakeSafetensorError: Error while serializing: Read-only file system (os error 30)",
        ),
    ],
)
def test_a_file_that_cannot_be_written_is_one_line_with_what_to_do(monkeypatch, capsys, exc, expected) -> None:
    monkeypatch.setitem(cli.COMMANDS, "learner", raising(exc))
    assert main(["learner", "--out", "RUN", "--bc", "BC"]) == 2
    line = error_line(capsys, "learner")
    assert line.startswith(f"robot-rl learner: {expected}") and "(permissions, or a read-only mount)" in line


def test_a_transition_log_that_fails_is_one_line(monkeypatch, capsys) -> None:
    from robot_rl.learner.store import StoreError

    monkeypatch.setitem(cli.COMMANDS, "learner", raising(StoreError("the transition log RUN/buffer/a.log is damaged")))
    assert main(["learner", "--out", "RUN", "--bc", "BC"]) == 2
    assert error_line(capsys, "learner") == "robot-rl learner: the transition log RUN/buffer/a.log is damaged"


def test_disk_full_inside_a_config_error_is_reported_as_disk_full(monkeypatch, capsys) -> None:
    exc = chained(ConfigError("cannot open"), OSError(errno.ENOSPC, "No space left on device", "X.hdf5"))
    monkeypatch.setitem(cli.COMMANDS, "collect", raising(exc))
    assert main(["collect", "--episodes", "1", "--out", "X.hdf5"]) == 2
    assert "disk full while writing X.hdf5" in error_line(capsys, "collect")


def test_other_errors_still_raise(monkeypatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "train", raising(OSError(errno.EIO, "Input/output error", "x")))
    with pytest.raises(OSError, match="Input/output error"):
        main(["train", "--out", "RUN"])


def test_train_refuses_a_bc_directory_without_a_policy_before_making_the_run_directory(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    out = tmp_path / "run"
    assert main(["train", "--config", str(STATE), "--bc", str(junk), "--out", str(out), "--quiet"]) == 2
    assert "no BC policy there (bc.json missing)" in error_line(capsys, "train")
    assert not out.exists()  # the corrected command can use the same --out


def test_eval_of_a_bc_policy_that_observes_cameras_the_config_lacks_is_refused(tmp_path: Path, capsys) -> None:
    from robot_rl.bc import make_bc_policy, save_bc
    from robot_rl.wire import transition_spec

    cfg = load_config(IMAGE, ["bc.encoder={channels: [8, 8], feature_dim: 8}"])
    policy = make_bc_policy(cfg.bc, transition_spec(cfg).obs, 6, -np.ones(6, np.float32), np.ones(6, np.float32))
    bc_dir = save_bc(policy, tmp_path / "bc")
    assert main(["eval", "--checkpoint", str(bc_dir), "--episodes", "1"]) == 2
    line = error_line(capsys, "eval")
    assert "observes other than the env of" in line and "pass --config with the config" in line
    assert "front: (84, 84, 3) uint8 against the env's nothing" in line
    # The same keys at another image size: the shapes are what differ, and they are named.
    cameras = "env.cameras=[{name: front, out_size: 64}, {name: wrist, out_size: 64}]"
    assert main(["eval", "--checkpoint", str(bc_dir), "--config", str(IMAGE), "--set", cameras]) == 2
    line = error_line(capsys, "eval")
    assert "front: (84, 84, 3) uint8 against the env's (64, 64, 3) uint8; wrist: (84, 84, 3) uint8" in line


def test_report_names_runs_with_nothing_to_plot_and_refuses_when_no_run_has_anything(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run")
    fresh = tmp_path / "fresh"  # a run stopped right after evaluating the BC policy
    fresh.mkdir()
    (fresh / "eval.csv").write_text(",".join(EVAL_COLUMNS) + "\n0,0,1.0,0.4,1.0,20,bc\n")
    assert main(["report", str(run), str(fresh), "--out", str(tmp_path / "r.png")]) == 0
    captured = capsys.readouterr()
    assert (
        captured.err.strip()
        == f"robot-rl report: {fresh / 'eval.csv'} has no evaluation after BC's yet; {fresh} is left out"
    )
    assert (tmp_path / "r.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "eval.csv").write_text(",".join(EVAL_COLUMNS) + "\n")
    assert main(["report", str(fresh), str(empty), "--out", str(tmp_path / "none.png")]) == 2
    assert "no run has an evaluation to plot" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("command", ["train", "bc", "actor"])
def test_an_out_or_bc_path_that_is_not_utf8_is_refused_before_anything_is_written(
    tmp_path: Path, command: str, capsys
) -> None:
    """TensorBoard and safetensors cannot take such a path: train died in a traceback after making the run
    directory, bc wrote a policy nothing could load."""
    bad = tmp_path / os.fsdecode(b"caf\xe9")  # a Latin-1 name on a UTF-8 system
    demos = state_demos(tmp_path / "demos.hdf5")
    args = {
        "train": ["train", "--config", str(STATE), "--out", str(bad / "run"), "--quiet"],
        "bc": ["bc", "--config", str(STATE), "--demos", str(demos), "--out", str(bad / "bc")],
        "actor": ["actor", "--config", str(STATE), "--out", str(tmp_path / "a"), "--learner", "none",
                  "--bc", str(bad / "bc"), "--quiet"],
    }[command]  # fmt: skip
    assert main(args) == 2
    flag = "--bc" if command == "actor" else "--out"
    line = error_line(capsys, command)
    assert f"{flag} {tmp_path}/caf\\udce9/" in line and "the path is not valid UTF-8" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.hdf5"]


def test_report_of_a_demo_directory_plots_its_learners_eval_csv(tmp_path: Path, capsys) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    run_dir(demo / "learner")
    assert main(["report", str(demo), "--out", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r.png'}"


def test_demo_report_names_episode_files_it_could_not_read(tmp_path: Path, capsys) -> None:
    from robot_rl.demo import report

    run_dir(tmp_path / "learner")
    episodes = tmp_path / "actor" / "episodes"
    episodes.mkdir(parents=True)
    (episodes / "episode_000000.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)  # cut right after its header
    state_demos(episodes / "episode_000001.hdf5")
    assert report(tmp_path) == 0
    out = capsys.readouterr().out
    assert "demo: 1 episode file(s) left out of the gating timeline, unreadable (first: " in out
    assert str(episodes / "episode_000000.hdf5") in out and (tmp_path / "report.png").is_file()


def test_the_gating_timeline_reads_only_the_episodes_it_draws(tmp_path: Path, monkeypatch) -> None:
    import robot_rl.episodes as episodes_module
    from robot_rl.demo import gating_timeline

    episodes = tmp_path / "episodes"
    episodes.mkdir()
    for i in range(30):
        episode = Episode(
            obs={"ee_pose": np.zeros((i + 1, 6), np.float32)},
            next_obs={"ee_pose": np.zeros((i + 1, 6), np.float32)},
            actions=np.zeros((i + 1, 6), np.float32),
            rewards=np.zeros(i + 1, np.float32),
            terminated=np.arange(i + 1) == i,
            truncated=np.zeros(i + 1, bool),
            extras={"use_bc": np.arange(i + 1) % 2 == 0},
            attrs={"kind": "online" if i % 3 else "qest_rollouts"},
        )
        with EpisodeWriter(episodes / f"episode_{i:06d}.hdf5", env_args={"env": "x"}) as writer:
            writer.add_episode(episode)
    read = []
    real = episodes_module.read_episodes
    monkeypatch.setattr(episodes_module, "read_episodes", lambda path, **kw: read.append(path) or real(path, **kw))
    grid, labels = gating_timeline(episodes, count=5)
    online = [i for i in range(30) if i % 3]  # 20 online episodes: the first, the last and three between are drawn
    drawn = [online[j] for j in np.unique(np.linspace(0, 19, 5).round().astype(int))]
    assert [int(p.stem[-6:]) for p in read] == drawn and labels == [f"#{i} success" for i in drawn]
    assert grid.shape == (5, drawn[-1] + 1) and grid[0, 0] == 1.0 and np.isnan(grid[0, drawn[0] + 1 :]).all()


def test_report_reads_an_eval_csv_saved_by_a_spreadsheet(tmp_path: Path, capsys) -> None:
    """A byte-order mark and CRLF line ends: the header used to lack 'env_steps' (it read '\\ufeffenv_steps')."""
    run = run_dir(tmp_path / "run")
    text = (run / "eval.csv").read_text()
    (run / "eval.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\r\n", "\n").replace("\n", "\r\n").encode())
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------------------------------
# Damaged demonstrations, a failing expert, an --out that cannot be made, franky settings, SIGTERM
# --------------------------------------------------------------------------------------------------------------------
def damage_num_samples(path: Path) -> str:
    with h5py.File(path, "r+") as f:
        f["data/demo_0"].attrs["num_samples"] = "abc"
    return "demo_0: num_samples must be a whole number of steps, got 'abc'"


def link_to_nothing(path: Path) -> str:
    with h5py.File(path, "r+") as f:
        f["data/demo_1"] = h5py.SoftLink("/nowhere")
    return "demo_1 cannot be opened, the file is damaged"


def damage_header(member: str) -> Callable[[Path], str]:
    def damage(path: Path) -> str:
        with h5py.File(path, "r") as f:
            address = h5py.h5o.get_info(f[member].id).addr
        with path.open("r+b") as f:  # the object header's version byte and what follows: HDF5 cannot open it
            f.seek(address)
            f.write(b"\xff" * 16)
        return "cannot be opened, the file is damaged"

    return damage


@pytest.mark.parametrize(
    "damage",
    [damage_num_samples, link_to_nothing, damage_header("data/demo_0"), damage_header("data/demo_0/obs/ee_pose")],
    ids=["num_samples-text", "link-to-nothing", "demo-header", "dataset-header"],
)
def test_demos_with_a_damaged_demo_are_one_line_naming_file_and_demo(tmp_path: Path, damage, capsys) -> None:
    demos = state_demos(tmp_path / "demos.hdf5")
    expected = damage(demos)
    out = tmp_path / "bc"
    assert main(["bc", "--config", str(STATE), "--demos", str(demos), "--out", str(out)]) == 2
    err = error_line(capsys, "bc")
    assert str(demos) in err and expected in err and "demo_" in err
    assert not out.exists()  # the directory it made for the policy is gone: the same command runs once fixed


FAILING_EXPERT = ["--config", str(STATE), "--set", "env.task.max_episode_steps=1"]


def test_collect_whose_expert_fails_is_one_line_and_leaves_no_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demos.hdf5"
    for _ in range(2):  # the second run says the same, not that the file exists
        assert main(["collect", *FAILING_EXPERT, "--episodes", "1", "--out", str(out)]) == 2
        err = error_line(capsys, "collect")
        assert "the scripted expert succeeded in only 0 of 40 episodes" in err and "max_episode_steps is 1" in err
        assert not out.exists()


def test_train_whose_expert_fails_leaves_no_run_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", *FAILING_EXPERT, "--set", "bc.demos=1", "--out", str(out), "--quiet"]) == 2
    assert "the scripted expert succeeded in only 0 of 40 episodes" in error_line(capsys, "train")
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be created")
@pytest.mark.parametrize("command", ["train", "bc"])
def test_an_out_that_cannot_be_created_is_one_line(tmp_path: Path, command: str, capsys) -> None:
    out = Path("/proc/robot-rl-never")
    args = out_file_args(command, tmp_path, out)
    if command == "bc":
        args[args.index("--demos") + 1] = str(state_demos(tmp_path / "demos.hdf5"))
    assert main(args) == 2
    assert error_line(capsys, command).startswith(f"robot-rl {command}: --out {out}: cannot create the ")


@pytest.mark.parametrize(
    "args",
    [
        ["actor", "--out", "OUT", "--learner", "none", "--bc", "BC", "--robot", "franky-sim"],
        ["collect", "--episodes", "1", "--out", "OUT", "--set", "env.robot=franky", "--set", "env.franka.sim_server=1"],
        ["train", "--out", "OUT", "--set", "env.robot=franky", "--set", "env.franka.sim_server=true", "--quiet"],
    ],
    ids=["actor", "collect", "train"],
)
def test_franky_sim_at_an_address_it_cannot_bind_is_refused_before_anything_starts(tmp_path: Path, args, capsys):
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else str(fake_bc_dir(tmp_path / "bc")) if a == "BC" else a for a in args]
    assert main([*args, "--config", str(STATE)]) == 2
    err = error_line(capsys, args[0])
    assert "env.franka.host is '172.16.0.2'" in err and "--set env.franka.host=127.0.1.2" in err
    assert not out.exists()


def test_collect_refuses_the_real_arm_before_connecting(tmp_path: Path, monkeypatch, capsys) -> None:
    import robot_rl.envs

    monkeypatch.setattr(robot_rl.envs, "make_env", raising(AssertionError("connected")))
    out = tmp_path / "demos.hdf5"
    assert main(["collect", "--episodes", "1", "--out", str(out), "--set", "env.robot=franky"]) == 2
    assert "simulation only" in error_line(capsys, "collect") and not out.exists()


def killed(signum: int, leave: Callable[[Path], None] | None = None):
    """A command that leaves something in its --out (or nothing), then receives `signum`."""

    def command(args) -> int:
        if leave is not None:
            leave(args.out)
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the command")

    return command


@pytest.mark.parametrize("command", ["collect", "train", "bc"])
def test_sigterm_stops_a_command_as_ctrl_c_does_with_a_line(tmp_path: Path, monkeypatch, command, capsys) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    extra = {"collect": ["--episodes", "1"], "bc": ["--demos", "D"]}.get(command, [])
    args = [command, "--out", str(out), *extra]
    monkeypatch.setitem(cli.COMMANDS, command, killed(signal.SIGTERM, lambda out: out.write_bytes(b"partial")))
    assert main(args) == 143
    resume = " (train does not resume: start again with a new --out; learner and actor resume)" * (command == "train")
    assert capsys.readouterr().err == f"\nrobot-rl {command}: terminated (SIGTERM); partial output in {out}{resume}\n"
    assert signal.getsignal(signal.SIGTERM) is before  # main called in-process gives the handler back
    out.unlink()
    monkeypatch.setitem(cli.COMMANDS, command, killed(signal.SIGTERM, lambda out: out.mkdir()))
    assert main(args) == 143
    assert capsys.readouterr().err == f"\nrobot-rl {command}: terminated (SIGTERM)\n"  # an empty directory: nothing


def test_an_interrupt_that_left_nothing_does_not_point_at_partial_output(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.COMMANDS, "bc", raising(KeyboardInterrupt()))
    assert main(["bc", "--demos", "D", "--out", str(tmp_path / "never")]) == 130
    assert capsys.readouterr().err == "\nrobot-rl bc: interrupted\n"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "learner"])
def test_a_cuda_device_without_cuda_is_one_line_and_leaves_no_run(tmp_path: Path, command: str, capsys) -> None:
    out = tmp_path / "run"
    args = [command, "--config", str(STATE), "--out", str(out), "--bc", str(fake_bc_dir(tmp_path / "bc"))]
    assert main([*args, "--set", "train.device=cuda"]) == 2
    assert "train.device is 'cuda' but torch sees no CUDA device" in error_line(capsys, command)
    assert not out.exists()  # the same command with train.device=auto runs in it


@pytest.mark.parametrize("command", ["train", "learner"])
def test_compile_without_a_compiler_is_refused_at_start(tmp_path: Path, command: str, capsys, monkeypatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # a machine without c++, g++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "run"
    args = [command, "--config", str(STATE), "--out", str(out), "--bc", str(fake_bc_dir(tmp_path / "bc"))]
    assert main([*args, "--set", "train.compile=default", "--set", "train.device=cpu"]) == 2
    err = error_line(capsys, command)
    assert "train.compile=default needs a C++ compiler on PATH (c++, g++, clang++ or $CXX)" in err
    assert "or set train.compile=off" in err and not out.exists()


def test_an_interrupted_bc_evaluation_says_the_policy_is_complete(tmp_path: Path, monkeypatch, capsys) -> None:
    import robot_rl.rollout

    def evaluate(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robot_rl.rollout, "evaluate", evaluate)
    out = tmp_path / "bc"
    args = ["bc", "--config", str(STATE), "--demos", str(state_demos(tmp_path / "d.hdf5")), "--out", str(out)]
    assert main([*args, "--eval-episodes", "3", "--set", "bc.steps=5"]) == 130
    assert capsys.readouterr().err.endswith(f"robot-rl bc: interrupted; {out} is complete, what came after writing it "
                                            "was cut short\n")  # fmt: skip
    assert (out / "bc.safetensors").is_file() and (out / "bc.json").is_file()


def test_bc_says_when_its_demonstrations_hold_episodes_that_did_not_succeed(tmp_path: Path, capsys) -> None:
    """A run's rollouts.hdf5 passed as demonstrations trains BC on failures too: said, not refused."""
    for failed, out in ((0, "clean"), (2, "mixed")):
        args = ["bc", "--config", str(STATE), "--demos", str(state_demos(tmp_path / f"{out}.hdf5", failed=failed))]
        assert main([*args, "--out", str(tmp_path / out), "--set", "bc.steps=5"]) == 0
        err = capsys.readouterr().err
        assert ("2 of 3 episodes do not end in success" in err) == (failed == 2), err


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf"])
def test_demo_refuses_minutes_that_are_not_a_positive_number(tmp_path: Path, minutes: str, capsys) -> None:
    assert main(["demo", "--minutes", minutes, "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    assert f"--minutes must be a positive number, got {float(minutes)}" in error_line(capsys, "demo")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------------------------------------
# A new user's review: seeds, --demos that is no file, empty configs, runs given twice, where a bad value came from
# --------------------------------------------------------------------------------------------------------------------
def config_error(capsys: pytest.CaptureFixture[str], command: str) -> list[str]:
    """The lines of an invalid-configuration message: the header naming the source, then one per field."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith(f"robot-rl {command}: invalid configuration ("), err
    return err.splitlines()


@pytest.mark.parametrize("command", ["collect", "bc", "train"])
def test_a_seed_beyond_31_bits_is_refused_before_anything_starts(tmp_path: Path, command: str, capsys) -> None:
    out = tmp_path / "out"
    args = {
        "collect": ["collect", "--episodes", "1"],
        "bc": ["bc", "--demos", str(state_demos(tmp_path / "demos.hdf5"))],
        "train": ["train", "--quiet"],
    }[command]
    assert main([*args, "--config", str(STATE), "--seed", "99999999999999999999", "--out", str(out)]) == 2
    assert config_error(capsys, command) == [
        f"robot-rl {command}: invalid configuration (--seed 99999999999999999999):",
        "  seed: Input should be less than or equal to 2147483647 (got 99999999999999999999)",
    ]
    assert not out.exists()  # train left no config.yaml behind


@pytest.mark.parametrize("command", ["bc", "train", "learner"])
@pytest.mark.parametrize("kind", ["device", "pipe"])
def test_demos_that_are_not_a_regular_file_are_named_as_such(tmp_path: Path, command: str, kind: str, capsys) -> None:
    if kind == "pipe":
        demos = tmp_path / "fifo"
        os.mkfifo(demos)  # what `--demos <(cat demos.hdf5)` passes
    else:
        demos = Path(os.devnull)
    out = tmp_path / "out"
    args = [command, "--config", str(STATE), "--demos", str(demos), "--out", str(out)]
    if command == "learner":
        args += ["--bc", str(fake_bc_dir(tmp_path / "bc"))]
    assert main(args) == 2
    assert error_line(capsys, command) == (
        f"robot-rl {command}: --demos {demos} is not a regular file (a device, pipe or socket); give a "
        "demonstrations file (robomimic's HDF5 layout)"
    )
    assert not out.exists()


def test_an_empty_config_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    out = tmp_path / "demos.hdf5"
    assert main(["collect", "--config", str(empty), "--episodes", "1", "--out", str(out)]) == 2
    assert error_line(capsys, "collect") == (
        f"robot-rl collect: config file {empty} holds no settings (it is empty or only comments); leave out --config "
        "to run on the embedded defaults"
    )
    assert not out.exists()
    bc = fake_bc_dir(tmp_path / "bc")
    (bc / "config.yaml").write_text("# nothing\n")  # the run config a BC policy directory records it was trained with
    assert main(["eval", "--checkpoint", str(bc), "--episodes", "1"]) == 2
    assert f"config file {bc / 'config.yaml'} holds no settings" in error_line(capsys, "eval")


def test_report_refuses_a_run_given_twice(tmp_path: Path, capsys) -> None:
    run, other = run_dir(tmp_path / "run"), run_dir(tmp_path / "other")
    assert main(["report", str(run), str(other), str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert error_line(capsys, "report") == f"robot-rl report: run directory {run} is given twice; give each run once"
    again = tmp_path / "other" / ".." / "run"  # the same directory, written another way
    assert main(["report", str(run), str(again), "--out", str(tmp_path / "r.png")]) == 2
    assert f"run directory {run} is given twice (also as {again}); give each run once" in error_line(capsys, "report")
    assert not (tmp_path / "r.png").exists()


def test_report_refuses_a_complete_last_row_with_an_invalid_value(tmp_path: Path, capsys) -> None:
    run = run_dir(tmp_path / "run", tail="300,150,4.0,nan,0.3,20,online\n")
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 2
    assert error_line(capsys, "report") == (
        f"robot-rl report: {run / 'eval.csv'} line 5 is invalid (success_rate nan is not a rate in [0, 1]); fix or "
        "remove that line"
    )


def test_a_bad_value_names_the_set_or_flag_that_gave_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", str(STATE), "--out", str(out), "--quiet", "--set", "agent.utd=2"]
    assert main([*args, "--set", "agent.num_critics=1"]) == 2
    assert config_error(capsys, "train") == [
        "robot-rl train: invalid configuration (--set agent.num_critics=1):",
        "  agent.num_critics: Input should be greater than or equal to 2 (got 1)",
    ]
    assert main([*args, "--set", "env.safety.xyz_low=[0.1, 0.0, 0.0]"]) == 2
    assert config_error(capsys, "train")[0] == f"robot-rl train: invalid configuration ({STATE} with --set overrides):"
    actor = ["actor", "--config", str(STATE), "--out", str(out), "--learner", "none", "--bc", str(tmp_path)]
    assert main([*actor, "--actor-id", "a b", "--quiet"]) == 2
    assert config_error(capsys, "actor")[0] == "robot-rl actor: invalid configuration (--actor-id a b):"
    assert not out.exists()
