"""A tiny end-to-end `robot-rl train` through the real CLI: every stage runs and the run directory is complete."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robot_rl.checkpoint import DIGEST
from robot_rl.cli import main
from robot_rl.config import RunConfig, dump_config, load_config
from robot_rl.episodes import read_episodes
from robot_rl.train import evaluate_checkpoint

TINY = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "q2rl"
    assert main(["train", "--config", str(TINY), "--seed", "1", "--out", str(out), "--quiet"]) == 0
    return out


def test_run_directory_has_every_file(run_dir):
    for name in ("config.yaml", "eval.csv", "summary.json", "curves.png", "demos.hdf5", "bc/bc.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "final" in checkpoints and any(name.startswith("step_") for name in checkpoints)
    for ckpt in checkpoints:
        assert (run_dir / "checkpoints" / ckpt / "model.safetensors").is_file()
        assert (run_dir / "checkpoints" / ckpt / "manifest.json").is_file()
        assert (run_dir / "checkpoints" / ckpt / "bc" / "bc.safetensors").is_file()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resolved_config_reloads_and_records_the_seed(run_dir):
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert cfg.seed == 1
    assert cfg.train.env_steps == 120


def test_eval_csv_and_summary_agree(run_dir):
    rows = list(csv.DictReader((run_dir / "eval.csv").open()))
    for column in ("env_steps", "learner_steps", "wall_s", "success_rate", "bc_action_fraction", "episodes"):
        assert column in rows[0]
    assert [r["phase"] for r in rows][:2] == ["bc", "start"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "method",
        "seed",
        "bc_success_rate",
        "final_success_rate",
        "best_success_rate",
        "env_steps",
        "learner_steps",
        "wall_s",
    ):
        assert key in summary
    online = [r for r in rows if r["phase"] in ("start", "online")]
    assert summary["final_success_rate"] == pytest.approx(float(online[-1]["success_rate"]))
    assert summary["best_success_rate"] == pytest.approx(max(float(r["success_rate"]) for r in online))
    # Q-Estimation rollouts count as environment steps; online steps are exactly the budget.
    assert summary["env_steps"] == summary["qest_env_steps"] + 120
    assert summary["learner_steps"] > 0
    assert int(rows[-1]["env_steps"]) == summary["env_steps"]
    assert all(0.0 <= float(r["success_rate"]) <= 1.0 for r in rows)


def test_demonstrations_are_successful_robomimic_episodes(run_dir):
    episodes = read_episodes(run_dir / "demos.hdf5")
    assert len(episodes) == 4
    assert all(ep.success for ep in episodes)


def test_every_executed_step_is_logged_with_its_gating_record(run_dir):
    episodes = read_episodes(run_dir / "rollouts.hdf5")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(len(ep) for ep in episodes) == summary["env_steps"]
    online = [ep for ep in episodes if ep.attrs["phase"] == "online"]
    assert sum(len(ep) for ep in online) == 120
    for ep in online:
        use_bc = ep.extras["use_bc"].astype(bool)
        # The executed action is the chosen proposal, and the choice is the higher value (Eq. 10).
        chosen = np.where(use_bc[:, None], ep.extras["bc_action"], ep.extras["rl_action"])
        np.testing.assert_allclose(ep.actions, np.clip(chosen, -1, 1), atol=1e-6)
        np.testing.assert_array_equal(use_bc, ep.extras["q_bc"] > ep.extras["q_rl"])
        assert np.all(np.diff(ep.extras["weights_version"]) >= 0)


def test_checkpoint_scores_through_eval_command(run_dir, capsys):
    report = evaluate_checkpoint(run_dir / "checkpoints" / "final", episodes=2)
    assert report["method"] == "q2rl"
    assert report["episodes"] == 2
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints" / "final"), "--episodes", "1"]) == 0
    assert '"success_rate"' in capsys.readouterr().out


def test_eval_of_a_checkpoint_missing_a_tensor_is_one_line(run_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    damaged = Path(shutil.copytree(run_dir / "checkpoints" / "final", tmp_path / "final"))
    tensors = load_file(str(damaged / "model.safetensors"))
    with safe_open(str(damaged / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()  # the save's write id, kept: the file is one tensor short, not torn
    removed = next(k for k in sorted(tensors) if not k.startswith("optim."))
    save_file({k: v for k, v in tensors.items() if k != removed}, str(damaged / "model.safetensors"), metadata)
    manifest = json.loads((damaged / "manifest.json").read_text())  # the new file's digest: short, not damaged
    manifest[DIGEST] = hashlib.sha256((damaged / "model.safetensors").read_bytes()).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", "--checkpoint", str(damaged), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robot-rl eval: checkpoint {damaged} does not fit") and err.count("\n") == 1
    assert removed.split(".", 1)[1] in err  # the tensor, named within its module


def test_eval_refuses_a_checkpoint_whose_bc_policy_was_damaged_or_replaced(run_dir, tmp_path, capsys):
    from robot_rl.bc import load_bc, make_bc_policy, save_bc

    final = run_dir / "checkpoints" / "final"
    assert main(["eval", "--checkpoint", str(final), "--episodes", "1"]) == 0
    capsys.readouterr()
    damaged = Path(shutil.copytree(final, tmp_path / "damaged"))
    weights = damaged / "bc" / "bc.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x40  # a flipped bit inside a weight: still a readable, finite tensor
    weights.write_bytes(bytes(data))
    assert main(["eval", "--checkpoint", str(damaged), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert f"BC checkpoint weights {weights} are not the bytes that were saved" in err and err.count("\n") == 1
    # Another BC policy of the same shapes put in its place: intact itself, but not the agent's.
    replaced = Path(shutil.copytree(final, tmp_path / "replaced"))
    own = load_bc(replaced / "bc")
    torch.manual_seed(123)
    other = make_bc_policy(own.cfg, own.obs_spec, own.action_dim, -np.ones(6, np.float32), np.ones(6, np.float32))
    save_bc(other, replaced / "bc")
    assert main(["eval", "--checkpoint", str(replaced), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "its bc/ holds another BC policy than the one the agent was trained with" in err


def test_eval_of_a_run_directory_names_its_checkpoints(run_dir, capsys):
    for given in (run_dir, run_dir / "checkpoints"):
        assert main(["eval", "--checkpoint", str(given), "--episodes", "1"]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"robot-rl eval: --checkpoint {given} holds checkpoints, it is not one")
            and err.count("\n") == 1
        )
        assert str(run_dir / "checkpoints" / "final") in err


def test_eval_of_a_checkpoint_under_a_config_that_observes_otherwise_is_refused(run_dir, capsys):
    """A state checkpoint scored in the image config's env used to run, blind to the cameras, as if it fitted."""
    image = TINY.parent / "sim_peg_image.yaml"
    final = run_dir / "checkpoints" / "final"
    assert main(["eval", "--checkpoint", str(final), "--config", str(image), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robot-rl eval: checkpoint {final} observes other than the env of --config {image}")
    assert "front: nothing against the env's (84, 84, 3) uint8" in err and err.count("\n") == 1


def eval_report(capsys, *args: str) -> dict:
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_overrides_apply_on_top_of_the_checkpoints_own_config(run_dir, capsys):
    """An --set without --config used to evaluate in the embedded defaults' env (200-step episodes, not 60)."""
    final = str(run_dir / "checkpoints" / "final")
    report = eval_report(capsys, "--checkpoint", final, "--episodes", "1", "--set", "agent.bc_action=mode")
    assert report["mean_length"] <= 60
    report = eval_report(capsys, "--checkpoint", final, "--episodes", "1", "--set", "env.task.max_episode_steps=7")
    assert report["mean_length"] <= 7


@pytest.mark.parametrize("field", ["agent.method=sac", "agent.hidden=[8]", "bc.hidden=[8]", "seed=3"])
def test_eval_refuses_overrides_that_cannot_change_a_fixed_checkpoint(run_dir, tmp_path, capsys, field):
    for checkpoint in (run_dir / "checkpoints" / "final", run_dir / "bc"):
        assert main(["eval", "--checkpoint", str(checkpoint), "--episodes", "1", "--set", field]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"robot-rl eval: --set {field.split('=')[0]}: cannot change the evaluation of ")
        assert "env.*" in err and err.count("\n") == 1


def test_eval_of_a_bc_policy_without_config_runs_in_the_config_it_was_trained_with(run_dir, capsys):
    for bc in (run_dir / "bc", run_dir / "checkpoints" / "final" / "bc"):
        assert eval_report(capsys, "--checkpoint", str(bc), "--episodes", "1")["mean_length"] <= 60  # not 200
    report = eval_report(
        capsys, "--checkpoint", str(run_dir / "bc"), "--episodes", "1", "--set", "env.task.max_episode_steps=5"
    )
    assert report["mean_length"] <= 5


def test_eval_refuses_a_negative_seed(run_dir, capsys):
    assert main(["eval", "--checkpoint", str(run_dir / "bc"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "robot-rl eval: --seed must be at least 0, got -1\n"


@pytest.mark.parametrize("edit", ["no config", "one critic", "no action_dim"])
def test_eval_of_a_hand_edited_manifest_names_it(run_dir, tmp_path, capsys, edit):
    copy = Path(shutil.copytree(run_dir / "checkpoints" / "final", tmp_path / "final"))
    manifest = json.loads((copy / "manifest.json").read_text())
    if edit == "no config":
        del manifest["config"]
    elif edit == "one critic":
        manifest["config"]["agent"]["num_critics"] = 1
    else:
        del manifest["action_dim"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", "--checkpoint", str(copy), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robot-rl eval: {copy / 'manifest.json'}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_existing_run_directory_is_refused(run_dir, capsys):
    assert main(["train", "--config", str(TINY), "--out", str(run_dir), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_override_is_refused_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--config", str(TINY), "--out", str(out), "--set", "agent.num_critics=1"]) == 2
    assert "agent.num_critics" in capsys.readouterr().err
    assert not out.exists()


def test_missing_demo_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.hdf5"
    assert main(["bc", "--config", str(TINY), "--demos", str(missing), "--out", str(tmp_path / "bc")]) == 2
    assert "nope.hdf5" in capsys.readouterr().err


def test_malformed_demo_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    assert main(["bc", "--config", str(TINY), "--demos", str(bad), "--out", str(tmp_path / "bc")]) == 2
    assert "bad.hdf5" in capsys.readouterr().err


def test_prefetch_and_bf16_switches_learn_and_leave_no_thread_behind(run_dir, tmp_path, capsys):
    """The same run with minibatches sampled on a thread and bf16 autocast: it learns as many steps, reuses the
    BC policy, and its prefetch thread is gone when the command returns. --demos beside --bc, which q2rl would not
    read, is refused before anything starts."""
    import threading

    before = {t.name for t in threading.enumerate()}
    out = tmp_path / "switches"
    args = ["train", "--config", str(TINY), "--seed", "1", "--out", str(out), "--quiet", "--bc", str(run_dir / "bc"),
            "--set", "train.prefetch=true", "--set", "train.bf16=true"]  # fmt: skip
    assert main([*args, "--demos", str(run_dir / "demos.hdf5")]) == 2
    assert "would be ignored: the BC policy comes from --bc" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    plain, switched = (json.loads((d / "summary.json").read_text()) for d in (run_dir, out))
    assert switched["learner_steps"] == plain["learner_steps"] > 0
    assert np.isfinite(switched["final_success_rate"])
    assert "prefetch" not in {t.name for t in threading.enumerate()} - before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_on_cuda_completes_with_its_buffer_on_the_gpu(run_dir, tmp_path):
    """train.device=cuda: the BC evaluation and rollouts sample the BC policy on the GPU, the replay buffer keeps its
    copy there, and the run learns as many steps as on the CPU."""
    out = tmp_path / "cuda"
    args = ["train", "--config", str(TINY), "--seed", "1", "--out", str(out), "--quiet", "--bc", str(run_dir / "bc"),
            "--set", "train.device=cuda"]  # fmt: skip
    assert main(args) == 0
    plain, on_gpu = (json.loads((d / "summary.json").read_text()) for d in (run_dir, out))
    assert on_gpu["device"] == "cuda" and on_gpu["learner_steps"] == plain["learner_steps"] > 0
    assert np.isfinite(on_gpu["final_success_rate"])


def test_a_diverging_run_stops_with_exit_3_and_says_why(tmp_path: Path, capsys):
    """Absurd learning rates turn the networks to NaN at the first online update: the run stops there."""
    args = ["train", "--config", str(TINY), "--out", str(tmp_path / "run"), "--quiet"]
    args += ["--set", "agent.critic_lr=1e30", "--set", "agent.actor_lr=1e30"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "diverged" in err
    assert not (tmp_path / "run" / "checkpoints" / "final").exists()


@pytest.mark.parametrize("command", ["bc", "train"])
def test_a_diverging_bc_policy_is_one_line_naming_bc_lr(run_dir, tmp_path: Path, command: str, capsys):
    """An absurd BC learning rate used to end in `RuntimeError: BC loss became non-finite` and a traceback."""
    out = tmp_path / "out"
    args = [command, "--config", str(TINY), "--demos", str(run_dir / "demos.hdf5"), "--out", str(out)]
    args += ["--set", "bc.lr=1e30", "--set", "bc.steps=100"] + (["--quiet"] if command == "train" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"robot-rl {command}: BC training diverged: the loss became non-finite") and err.count("\n") == 1
    )
    assert "lower the learning rate bc.lr (now 1e+30" in err
    assert not out.exists()  # nothing of the failed command is left: the same command runs with a sane bc.lr


def test_bc_command_is_reproducible_under_its_seed(tmp_path: Path):
    """`robot-rl bc --seed S` twice on the same demonstrations gives the same policy (initial weights included)."""
    from robot_rl.bc import load_bc

    demos = tmp_path / "demos.hdf5"
    assert main(["collect", "--config", str(TINY), "--episodes", "2", "--out", str(demos)]) == 0
    policies = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        args = ["bc", "--config", str(TINY), "--seed", seed, "--demos", str(demos), "--out", str(tmp_path / name)]
        assert main(args) == 0
        policies.append(load_bc(tmp_path / name).state_dict())
    a, b, c = policies
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bc_and_rlpd_take_demonstrations_written_by_robomimic_and_say_what_they_left_out(
    run_dir, tmp_path, capsys, monkeypatch
):
    """The run's demonstrations rewritten as robomimic's own tools write them (float64, `states`, no next_obs,
    no terminated/truncated, an empty demo): BC and RLPD train on them and print each note once. A train run that
    trains its BC policy and fills RLPD's offline buffer reads the file once."""
    import h5py

    import robot_rl.train as train_lib

    reads: list[Path] = []
    read_episodes = train_lib.read_episodes
    monkeypatch.setattr(train_lib, "read_episodes", lambda path, **kw: reads.append(path) or read_episodes(path, **kw))

    foreign = tmp_path / "robomimic.hdf5"
    with h5py.File(run_dir / "demos.hdf5", "r") as src, h5py.File(foreign, "w") as f:
        data = f.create_group("data")
        for name, demo in src["data"].items():
            out = data.create_group(name)
            out.attrs["num_samples"] = demo.attrs["num_samples"]
            out["obs/ee_pose"] = demo["obs/ee_pose"][()].astype(np.float64)
            for key in ("actions", "rewards", "dones"):
                out[key] = demo[key][()].astype(np.float64 if key != "dones" else np.int64)
            out["states"] = np.zeros((demo.attrs["num_samples"], 9))
        empty = data.create_group(f"demo_{len(src['data'])}")
        empty.attrs["num_samples"] = 0
        for key, shape in (("obs/ee_pose", (0, 6)), ("actions", (0, 6)), ("rewards", (0,)), ("dones", (0,))):
            empty.create_dataset(key, shape=shape, dtype="f8")
    assert main(["bc", "--config", str(TINY), "--demos", str(foreign), "--out", str(tmp_path / "bc")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith(f"robot-rl bc: {foreign}: ") for line in err), err
    args = ["train", "--config", str(TINY), "--out", str(tmp_path / "rlpd"), "--quiet", "--demos", str(foreign)]
    reads.clear()
    assert main([*args, "--set", "agent.method=rlpd"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith(f"robot-rl train: {foreign}: ") for line in err), err
    assert reads == [foreign]


def test_demonstration_observation_keys_the_env_does_not_observe_are_named():
    from robot_rl.obs import state_spec
    from robot_rl.train import transitions_obs

    data = {"obs/ee_pose": np.zeros((3, 6)), "obs/object": np.zeros((3, 2)), "next_obs/ee_pose": np.zeros((3, 6))}
    data["next_obs/object"] = data["obs/object"]
    notes: list[str] = []
    obs = transitions_obs(data, "obs", state_spec(6), "demos.hdf5", notes.append)
    assert set(obs) == {"ee_pose"} and obs["ee_pose"].dtype == np.float32
    assert notes == ["demos.hdf5: observation keys ['object'] are not observed by the config's env and go unused"]
    transitions_obs(data, "next_obs", state_spec(6), "demos.hdf5", notes.append)
    assert len(notes) == 1  # told once, for obs


def test_demonstrations_of_a_stopped_collect_are_read_with_a_warning_that_says_how_many_are_missing(
    tmp_path, monkeypatch, capsys
):
    import robot_rl.train as train_mod

    episodes_run = []
    real_run_episode = train_mod.run_episode

    def stopped_at_the_third(*args, **kwargs):  # Ctrl-C while the third expert episode runs
        if len(episodes_run) == 2:
            raise KeyboardInterrupt
        episodes_run.append(1)
        return real_run_episode(*args, **kwargs)

    stopped, finished = tmp_path / "stopped.hdf5", tmp_path / "finished.hdf5"
    monkeypatch.setattr(train_mod, "run_episode", stopped_at_the_third)
    assert main(["collect", "--config", str(TINY), "--episodes", "5", "--out", str(stopped)]) == 130
    assert f"partial output in {stopped}" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "run_episode", real_run_episode)
    assert main(["collect", "--config", str(TINY), "--episodes", "2", "--out", str(finished)]) == 0

    said: list[str] = []
    kept = len(read_episodes(stopped))
    assert 0 < kept <= 2  # the expert keeps successful episodes only
    assert train_mod.demo_transitions(stopped, said.append)["actions"].shape[0] > 0  # still usable
    assert [line for line in said if "stopped before it finished" in line] == [
        f"{stopped}: `robot-rl collect` was stopped before it finished: the file holds {kept} of the 5 "
        "demonstrations it was asked for; training on those"
    ]
    said.clear()
    train_mod.demo_transitions(finished, said.append)
    assert not any("stopped before it finished" in line for line in said)


@pytest.mark.parametrize("command", ["collect", "train"])
def test_train_and_collect_stop_cleanly_before_a_nearly_full_disk_fails_a_write(tmp_path, monkeypatch, capsys, command):
    """Free space falls below actor.min_free_disk_mb after a few episodes: the command stops before its next episode
    with the one disk-full line and exit 2 (HDF5 writes failing midway do not always end cleanly), and what it wrote
    so far reads back."""
    import shutil as shutil_mod

    from robot_rl import durable

    checks = {"n": 0}
    real = shutil_mod.disk_usage

    def disk_usage(path):
        usage = real(path)
        if command == "train" and str(path).endswith("demos.hdf5"):  # train's own demonstrations: room for them
            return usage
        checks["n"] += 1
        free = usage.free if checks["n"] <= 2 else 100 * 10**6  # then 100 MB: below the default 256 MB
        return type(usage)(usage.total, usage.used, free)

    monkeypatch.setattr(durable.shutil, "disk_usage", disk_usage)
    out = tmp_path / ("demos.hdf5" if command == "collect" else "run")
    args = {
        "collect": ["collect", "--config", str(TINY), "--episodes", "5", "--out", str(out)],
        "train": ["train", "--config", str(TINY), "--out", str(out), "--quiet", "--set", "qest.rollouts=4"],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = f"robot-rl {command}: disk full while writing {out}: 100 MB free"
    assert line in err and "below actor.min_free_disk_mb=256" in err and "Traceback" not in err, err
    written = out if command == "collect" else out / "rollouts.hdf5"
    assert 1 <= len(read_episodes(written)) <= 2  # the episodes before the check, whole


def test_train_with_a_bc_policy_records_the_policys_bc_settings_and_says_where_the_config_differs(tmp_path, capsys):
    from robot_rl.bc import load_bc

    demos, bc_dir = tmp_path / "demos.hdf5", tmp_path / "bc"
    assert main(["collect", "--config", str(TINY), "--episodes", "2", "--out", str(demos)]) == 0
    assert main(["bc", "--config", str(TINY), "--demos", str(demos), "--out", str(bc_dir), "--set", "bc.steps=7"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    args = ["train", "--config", str(TINY), "--bc", str(bc_dir), "--out", str(out), "--quiet", "--set", "bc.steps=99"]
    assert main([*args, "--set", "train.env_steps=20", "--set", "qest.rollouts=1"]) == 0
    err = capsys.readouterr().err
    assert "its policy was trained with other BC settings" in err and "bc.steps 99 (config) / 7 (policy)" in err
    recorded = RunConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert recorded.bc == load_bc(bc_dir).cfg and recorded.bc.steps == 7


def test_eval_reproduces_the_runs_bc_row_and_takes_from_config_the_env_only(run_dir, tmp_path, capsys):
    """`robot-rl eval` of the run's bc/ gives its eval.csv BC row (same episodes, same BC samples). A --config is taken
    for the env alone: one that differs in the networks or method is refused, naming the fields; env differences
    are listed in the report."""
    with (run_dir / "eval.csv").open() as f:
        bc_row = next(row for row in csv.DictReader(f) if row["phase"] == "bc")
    assert main(["eval", "--checkpoint", str(run_dir / "bc"), "--episodes", bc_row["episodes"]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["success_rate"] == pytest.approx(float(bc_row["success_rate"]))
    own = load_config(run_dir / "config.yaml")
    other = tmp_path / "other.yaml"
    other.write_text(dump_config(own.model_copy(update={"agent": own.agent.model_copy(update={"hidden": [7, 7]})})))
    final = str(run_dir / "checkpoints" / "final")
    assert main(["eval", "--checkpoint", final, "--episodes", "1", "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "differs from the config checkpoint" in err and "agent.hidden" in err and err.count("\n") == 1
    longer = own.env.task.max_episode_steps + 5
    other.write_text(dump_config(load_config(run_dir / "config.yaml", [f"env.task.max_episode_steps={longer}"])))
    assert main(["eval", "--checkpoint", final, "--episodes", "1", "--config", str(other)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["env_differs_from_training"] == ["env.task.max_episode_steps"]
    assert report["config"] == f"--config {other}"
