"""`robot-rl replay`: real actor logs replayed through mock hardware; clean, perturbed, tampered and missing inputs.

The logs come from the actor itself (ActorService on the sim twin, no learner): one BC-only episode, and one gated
episode whose weights arrive as wire.Weights through the same swap point the learner link feeds (version 3, then
version 4 from step 20 on), so the actor's weights archive holds exactly what it acted with. Another actor only ran
BC (as `robot-rl actor --learner none` does): it never received weights, so it has no weights archive at all.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robot_rl.actor.replay import Divergence, ReplayInputError, ReplayReport, replay_log
from robot_rl.actor.service import ActorService
from robot_rl.actor.weights_archive import WeightsArchive
from robot_rl.actor.weights_loader import ReadyWeights, prepare_weights
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.checkpoint import save_checkpoint
from robot_rl.cli import main
from robot_rl.config import dump_config, load_config
from robot_rl.episodes import read_episodes
from robot_rl.obs import state_bounds, state_spec
from robot_rl.wire import Weights, pack_tensors, transition_spec

TINY = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"
SECOND_VERSION_AT = 20
VALUE_SHIFT = 3.6


class ScriptedWeights:
    """Stands in for the weights loader at the actor's swap point: hands out snapshots at given swap calls."""

    refused = 0  # broadcasts skipped for NaN (the loader's counter, in stats.json)

    def prepare_p99_s(self) -> None:  # the loader's preparation time, in stats.json: none measured here
        return None

    def __init__(self, agent: Q2RLAgent, snapshots: dict[int, Weights]) -> None:
        self.agent, self.snapshots = agent, snapshots
        self.calls = 0

    def take(self) -> ReadyWeights | None:
        weights = self.snapshots.get(self.calls)
        self.calls += 1
        return None if weights is None else prepare_weights(self.agent, weights)


def _snapshot(service: ActorService, version: int, seed: int) -> Weights:
    cfg = service.cfg
    low, high = state_bounds(service.env.observation_space)
    agent = Q2RLAgent(
        cfg.agent,
        obs_spec=service.obs_spec,
        state_low=low,
        state_high=high,
        action_dim=6,
        bc_policy=service.bc,
        seed=seed,
    )
    with torch.no_grad():
        agent.value.net[-1].bias -= VALUE_SHIFT  # brings Q^_BC down to Q_RL: both proposals get executed
    return Weights(version=version, phase="online", tensors=pack_tensors(agent.acting_state()))


def _one_gated_episode(out: Path, bc_dir: Path, overrides: list[str], *, version: int, seed: int) -> None:
    """An actor in `out` that runs one gated online episode with one weights version."""
    service = ActorService(load_config(TINY, ["actor.period_s=0", *overrides]), out, bc_dir=bc_dir, learner=None,
                           quiet=True)  # fmt: skip
    try:
        service.weights_source = ScriptedWeights(service.agent, {0: _snapshot(service, version, seed=seed)})
        service.run_episode(kind="online", gated=True, send=False, seed=10 + seed)
    finally:
        service.weights_source = None
        service._shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """An actor directory with a BC-only and a gated episode log, its weights archive and BC policy."""
    root = tmp_path_factory.mktemp("replay")
    cfg = load_config(TINY, ["actor.period_s=0"])
    bc_dir = root / "bc"
    save_bc(make_bc_policy(cfg.bc, state_spec(6), 6, -np.ones(6, np.float32), np.ones(6, np.float32)), bc_dir)
    service = ActorService(cfg, root / "actor", bc_dir=bc_dir, learner=None, quiet=True)
    try:
        service.run_episode(kind="bc_only", gated=False, send=False, seed=11)
        service.weights_source = ScriptedWeights(
            service.agent, {0: _snapshot(service, 3, seed=1), SECOND_VERSION_AT: _snapshot(service, 4, seed=2)}
        )
        service.run_episode(kind="online", gated=True, send=False, seed=12)
    finally:
        service.weights_source = None
        service._shutdown()
    # A second actor whose RL proposals are samples: the replay re-scores them instead of recomputing them.
    _one_gated_episode(root / "sampled", bc_dir, ["agent.rl_action=sample"], version=1, seed=3)
    # A third gates with compact networks (int8 linears, layers wide enough to be quantised) on two threads.
    compact = ["agent.hidden=[256,256]", "actor.gating_precision=int8", "actor.gating_threads=2"]
    _one_gated_episode(root / "compact", bc_dir, compact, version=1, seed=4)
    # Methods that gate otherwise: IBRL's critics score both proposals; SAC executes the RL proposal (no gate).
    _one_gated_episode(root / "ibrl", bc_dir, ["agent.method=ibrl"], version=1, seed=5)
    _one_gated_episode(root / "sac", bc_dir, ["agent.method=sac"], version=1, seed=6)
    # An actor without a learner: BC-only episodes, no weights ever swapped in, so no weights archive written.
    service = ActorService(cfg, root / "act_none", bc_dir=bc_dir, learner=None, quiet=True)
    try:
        service.run_episode(kind="bc_only", gated=False, send=False, seed=13)
    finally:
        service._shutdown()
    episodes = sorted((root / "actor" / "episodes").glob("episode_*.hdf5"))
    return {
        "bc_log": episodes[0],
        "gated_log": episodes[1],
        "sampled_log": next((root / "sampled" / "episodes").glob("episode_*.hdf5")),
        "compact_log": next((root / "compact" / "episodes").glob("episode_*.hdf5")),
        "ibrl_log": next((root / "ibrl" / "episodes").glob("episode_*.hdf5")),
        "sac_log": next((root / "sac" / "episodes").glob("episode_*.hdf5")),
        "act_none_log": next((root / "act_none" / "episodes").glob("episode_*.hdf5")),
        "archive": root / "actor" / "weights",
        "root": root,
    }


def test_the_actor_logs_measured_poses_and_archives_the_versions_it_acted_with(run):
    ep = read_episodes(run["gated_log"])[0]
    versions = ep.extras["weights_version"]
    assert np.all(versions[:SECOND_VERSION_AT] == 3) and np.all(versions[SECOND_VERSION_AT:] == 4)
    assert WeightsArchive(run["archive"]).versions() == [3, 4]
    assert ep.attrs["weights_archive"] == str(run["archive"].resolve())
    assert ep.attrs["bc_dir"] == str((run["root"] / "bc").resolve())
    # The measured pose of the next step is what the next observation shows (float32, inside the obs bounds).
    np.testing.assert_allclose(ep.extras["measured"][1:], ep.next_obs["ee_pose"][:-1], atol=1e-6)
    # The arm's joints after each step: the sim arm moves, within the FR3's joint limits.
    joints = ep.extras["joint_pos"]
    assert joints.shape == (len(ep), 7) and np.all(np.isfinite(joints)) and np.all(np.isfinite(ep.extras["joint_vel"]))
    assert np.abs(np.diff(joints, axis=0)).max() > 1e-4 and np.all(np.abs(joints) < 3.0)
    assert np.all(np.isfinite(ep.extras["q_rl"])) and np.all(np.isfinite(ep.extras["q_bc"]))
    use_bc = ep.extras["use_bc"]
    assert 0 < use_bc.mean() < 1  # both branches of the gate were taken
    np.testing.assert_array_equal(ep.actions[use_bc], ep.extras["bc_action"][use_bc])
    np.testing.assert_array_equal(ep.actions[~use_bc], ep.extras["rl_action"][~use_bc])


@pytest.mark.parametrize("log", ["bc_log", "gated_log", "sampled_log", "compact_log", "ibrl_log", "sac_log"])
def test_a_clean_replay_reproduces_every_step_and_exits_0(run, log, capsys):
    assert main(["replay", str(run[log])]) == 0
    out = capsys.readouterr().out
    assert ": 0 divergent steps" in out and "no divergence" in out
    report = replay_log(run[log])
    assert report.ok and report.steps == len(read_episodes(run[log])[0])
    assert report.gated_steps == (0 if log == "bc_log" else report.steps)
    # The summary names what was compared, and what was not: a BC-only log has no Q-values to reproduce.
    assert {"obs", "action", "target", "command", "done", "use_bc"} <= report.compared
    if log == "bc_log":
        assert not {"rl_action", "q_bc", "q_rl"} & report.compared
        assert "not compared: rl_action (no step acted with the RL policy's mode" in out
        assert "not compared: q_bc (every step was BC-only" in out and "not compared: q_rl (every step" in out
    else:
        assert {"q_bc", "q_rl"} <= report.compared
        assert "every step was BC-only" not in out  # the reasons said are this log's
    if "bc_action" not in report.compared:  # the BC proposals were sampled (the default)
        assert "not compared: bc_action (the BC proposals were sampled" in out


def test_a_report_counts_divergent_camera_images_beside_the_other_fields():
    report = ReplayReport(log=Path("episode.hdf5"), steps=4, episodes=1)
    for step, name in ((1, "obs/front"), (1, "action"), (2, "obs"), (3, "obs/wrist")):
        report.divergences.append(Divergence(0, step, name, np.zeros(2), np.ones(2)))
    assert report.per_field() == {"obs": 1, "obs/front": 1, "obs/wrist": 1, "action": 1}
    lines = list(report.lines())
    assert "divergent steps per field: obs 1, obs/front 1, obs/wrist 1, action 1" in lines
    assert "first divergence: step 1 field obs/front" in lines
    # An image's divergence is one short line: how many values differ, by how much, where first.
    logged = np.zeros((84, 84, 3), np.uint8)
    replayed = logged.copy()
    replayed[5, 6, 1], replayed[70, 1, 0] = 200, 3
    line = Divergence(0, 3, "obs/front", logged, replayed).line()
    assert line == "step 3 obs/front: 2 of 21168 values of uint8[84, 84, 3] differ, by up to 200, first at [5, 6, 1]"


def test_compact_gating_replays_with_its_own_networks_not_the_float_ones(run, tmp_path: Path):
    """The replay scores with the precision the actor gated with; scored in float32 the values differ (~1%)."""
    cfg = load_config(run["root"] / "compact" / "config.yaml", ["actor.gating_precision=float32"])
    float_config = tmp_path / "config.yaml"
    float_config.write_text(dump_config(cfg))
    archive = run["root"] / "compact" / "weights"
    report = replay_log(run["compact_log"], checkpoint=archive, config=float_config)
    assert not report.ok
    # Nearly every step's value moves by more than atol (a step whose int8 and float32 values happen to agree within
    # it can occur: the weights come from a learner whose pace against the actor is not deterministic).
    assert report.per_field()["q_rl"] >= 0.9 * report.steps
    assert replay_log(run["compact_log"]).ok


def _archive_other_weights(archive: Path, version: int, tensors: dict) -> None:
    """Replace `version`'s tensors in `archive` by other weights, as if the actor had acted with those: the manifest
    gets their hash (tensors changed without it are refused as damaged)."""
    from robot_rl.actor.weights_archive import DIGEST, _file_xxh3

    path = archive / f"v{version:08d}.safetensors"
    save_file(tensors, str(path))
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, DIGEST: _file_xxh3(path)}))


def test_a_changed_critic_is_reported_at_the_first_step_that_used_it(run, tmp_path: Path, capsys):
    changed = tmp_path / "weights"
    shutil.copytree(run["archive"], changed)
    tensors = load_file(str(changed / "v00000003.safetensors"))
    name = next(k for k in sorted(tensors) if k.startswith("critics.") and k.endswith("weight"))
    tensors[name] = tensors[name] + 0.5 * torch.ones_like(tensors[name])
    _archive_other_weights(changed, 3, tensors)

    assert main(["replay", str(run["gated_log"]), "--checkpoint", str(changed)]) == 1
    out = capsys.readouterr().out
    assert "first divergence: step 0 field q_rl" in out
    assert out.splitlines()[0].startswith("step 0 q_rl: logged ")
    report = replay_log(run["gated_log"], checkpoint=changed)
    steps = {d.step for d in report.divergences}
    # Version 3 served steps 0..19; version 4, untouched, reproduces exactly.
    assert steps == set(range(SECOND_VERSION_AT))
    assert {d.field for d in report.divergences} <= {"q_rl", "q_bc", "rl_action", "use_bc", "action", "target",
                                                      "command"}  # fmt: skip
    assert report.per_field()["q_rl"] == SECOND_VERSION_AT


def test_a_tampered_command_is_reported_at_exactly_that_step(run, tmp_path: Path, capsys):
    log = tmp_path / "episode.hdf5"
    shutil.copy(run["gated_log"], log)
    with h5py.File(log, "r+") as f:
        f["data/demo_0/extras/command"][17, 0] += 1e-3
    # --checkpoint and --config: the copy lies outside the actor directory.
    args = [
        "replay",
        str(log),
        "--checkpoint",
        str(run["archive"]),
        "--config",
        str(run["root"] / "actor" / "config.yaml"),
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "first divergence: step 17 field command" in out
    report = replay_log(log, checkpoint=run["archive"], config=run["root"] / "actor" / "config.yaml")
    assert [(d.step, d.field) for d in report.divergences] == [(17, "command")]
    assert report.divergences[0].logged[0] == pytest.approx(report.divergences[0].replayed[0] + 1e-3, abs=1e-9)


def test_a_logged_target_holding_nan_is_a_divergence_and_a_note_not_a_crash(run, tmp_path: Path):
    log = tmp_path / "episode.hdf5"
    shutil.copy(run["gated_log"], log)
    with h5py.File(log, "r+") as f:
        f["data/demo_0/extras/target"][9, 2] = np.nan
    report = replay_log(log, checkpoint=run["archive"], config=run["root"] / "actor" / "config.yaml")
    assert [(d.step, d.field) for d in report.divergences] == [(9, "target")]  # the next steps replay as logged
    assert any("step 9: the logged target holds NaN or inf" in note for note in report.notes)


def test_a_measured_pose_holding_nan_is_named_as_such_not_as_an_older_log(run, tmp_path: Path):
    log = tmp_path / "episode.hdf5"
    shutil.copy(run["bc_log"], log)
    with h5py.File(log, "r+") as f:
        f["data/demo_0/extras/measured"][5, 2] = np.nan
    report = replay_log(log, config=run["root"] / "actor" / "config.yaml", bc_dir=run["root"] / "bc")
    notes = [n for n in report.notes if "obs/ee_pose" in n]
    assert len(notes) == 1 and notes[0].startswith("extras/measured holds NaN or inf at 1 steps (first: step 5;")


def test_a_tampered_decision_is_reported_as_use_bc(run, tmp_path: Path):
    log = tmp_path / "episode.hdf5"
    shutil.copy(run["gated_log"], log)
    with h5py.File(log, "r+") as f:
        f["data/demo_0/extras/use_bc"][33] = not f["data/demo_0/extras/use_bc"][33]
    report = replay_log(log, checkpoint=run["archive"], config=run["root"] / "actor" / "config.yaml")
    assert [(d.step, d.field) for d in report.divergences] == [(33, "use_bc")]


def test_a_missing_weights_version_or_an_unreadable_log_exits_2_naming_the_file(run, tmp_path: Path, capsys):
    partial = tmp_path / "weights"
    shutil.copytree(run["archive"], partial)
    (partial / "v00000004.json").unlink()
    assert main(["replay", str(run["gated_log"]), "--checkpoint", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "weights version 4 is not in the archive" in err and "v00000004.json" in err

    garbage = tmp_path / "episode_000009.hdf5"
    garbage.write_bytes(b"not hdf5 at all")
    assert main(["replay", str(garbage)]) == 2
    assert str(garbage) in capsys.readouterr().err


def test_the_archive_keeps_the_newest_and_the_pinned_versions_and_never_rewrites_one(tmp_path: Path):
    archive = WeightsArchive(tmp_path / "w", keep_last=3)
    for version in range(1, 7):
        archive.save(version, {"x": torch.full((2,), float(version))}, phase="online")
        if version == 2:
            archive.pin(2)  # an evaluation acted with it
    assert archive.versions() == [2, 4, 5, 6]
    archive.save(5, {"x": torch.zeros(2)})  # dedup: version 5 stays what it was
    assert torch.equal(archive.load(5)["x"], torch.full((2,), 5.0))
    assert WeightsArchive(tmp_path / "w").pinned == [2]  # pins survive a restart
    assert not list((tmp_path / "w").glob("*.tmp"))
    with WeightsArchive(tmp_path / "bg", background=True) as background:
        background.save(7, {"x": torch.ones(3)})
    assert WeightsArchive(tmp_path / "bg").versions() == [7]


def test_a_background_archive_behind_the_disk_drops_the_oldest_waiting_versions(tmp_path: Path, monkeypatch):
    archive = WeightsArchive(tmp_path / "w", background=True, max_queued=2)
    release, writing = threading.Event(), threading.Event()
    write = archive._write

    def slow_write(*args):  # a disk that stalls on the first write
        writing.set()
        release.wait(10)
        write(*args)

    monkeypatch.setattr(archive, "_write", slow_write)
    with archive:
        reused = torch.full((2,), 1.0)
        archive.save(1, {"x": reused})  # copied now: the caller may reuse its tensor
        assert writing.wait(10)  # the writer holds version 1; the queue is empty again
        reused += 100.0
        for version in range(2, 6):
            archive.save(version, {"x": torch.full((2,), float(version))}, copy=False)
        assert archive.dropped == 2  # 2 and 3 dropped for 4 and 5; the control loop never waited
        release.set()
    assert archive.versions() == [1, 4, 5]
    assert torch.equal(archive.load(1)["x"], torch.full((2,), 1.0)) and torch.equal(
        archive.load(5)["x"], torch.full((2,), 5.0)
    )


def test_the_other_methods_logs_show_their_own_gate(run):
    """IBRL's critics score the BC proposal (a finite q_bc); SAC has no gate (q_bc NaN, every action the RL one)."""
    ibrl, sac = read_episodes(run["ibrl_log"])[0], read_episodes(run["sac_log"])[0]
    assert np.all(np.isfinite(ibrl.extras["q_bc"])) and np.all(
        ibrl.extras["use_bc"] == (ibrl.extras["q_bc"] > ibrl.extras["q_rl"])
    )
    assert np.all(np.isnan(sac.extras["q_bc"])) and not sac.extras["use_bc"].any()
    np.testing.assert_array_equal(sac.actions, sac.extras["rl_action"])


def test_a_bc_only_log_of_an_actor_without_weights_replays_without_a_checkpoint(run, capsys):
    """`robot-rl actor --learner none` writes no weights archive: its BC-only episodes need none to replay."""
    log = run["act_none_log"]
    assert not (run["root"] / "act_none" / "weights").exists()
    assert np.all(read_episodes(log)[0].extras["weights_version"] == -1)
    assert main(["replay", str(log)]) == 0
    out = capsys.readouterr().out
    assert "(0 gated, BC only)" in out and ": 0 divergent steps" in out
    report = replay_log(log)
    assert report.ok and report.versions == [] and report.steps == len(read_episodes(log)[0])
    assert main(["replay", str(log), "--checkpoint", str(run["archive"])]) == 0  # weights it never acted with
    assert f"so --checkpoint {run['archive']} is not used" in capsys.readouterr().out


def test_a_config_whose_env_differs_from_the_logs_is_named_with_the_divergence_it_explains(run, tmp_path, capsys):
    """The same log under a config with a longer step limit: the step the actor truncated at diverges in `done`,
    and a note names the field, so the divergence is not taken for the actor's."""
    log = run["act_none_log"]
    cfg = load_config(log.parents[1] / "config.yaml", ["env.task.max_episode_steps=500"])
    other = tmp_path / "other.yaml"
    other.write_text(dump_config(cfg))
    assert main(["replay", str(log), "--config", str(other)]) == 1
    out = capsys.readouterr().out
    steps = len(read_episodes(log)[0])
    assert f"note: config {other} differs from the env the log was recorded with" in out
    assert f"env.task.max_episode_steps: config 500, log {steps}" in out and "field done" in out
    assert main(["replay", str(log)]) == 0
    assert "note: config" not in capsys.readouterr().out


def test_an_actor_directory_given_as_the_log_names_its_episode_files(run, capsys):
    for given in (run["root"] / "actor", run["root"] / "actor" / "episodes"):
        assert main(["replay", str(given)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"robot-rl replay: episode log {given} is a directory; replay takes one of its 2 ")
        assert err.endswith(f"episode files, e.g. {run['gated_log']}\n")


def test_an_episode_cut_short_by_a_killed_actor_replays_its_logged_steps_and_says_so(run, tmp_path: Path, capsys):
    """SIGKILL mid-episode leaves the demo unsealed (no num_samples): the replay covers its flushed steps and a note
    says the end of the episode is not in the log."""
    log = tmp_path / "actor" / "episodes" / "episode_000000.hdf5"
    log.parent.mkdir(parents=True)
    shutil.copy(run["act_none_log"], log)
    shutil.copy(run["root"] / "act_none" / "config.yaml", tmp_path / "actor" / "config.yaml")
    with h5py.File(log, "r+") as f:
        steps = int(f["data/demo_0"].attrs.pop("num_samples"))
    assert main(["replay", str(log)]) == 0
    out = capsys.readouterr().out
    assert f"note: demo_0 was cut short after {steps} logged steps (its actor stopped or was killed in it)" in out
    assert f"replayed {steps} steps" in out and ": 0 divergent steps" in out


def test_a_run_directory_given_as_checkpoint_names_its_checkpoints(run, tmp_path: Path, capsys):
    """It used to be read as an empty weights archive: 'weights version 3 is not in the archive'."""
    learner = tmp_path / "learner"
    shutil.copytree(run["archive"], learner / "checkpoints" / "final")  # stands in for a checkpoint directory
    (learner / "checkpoints" / "final" / "manifest.json").write_text("{}")
    assert main(["replay", str(run["gated_log"]), "--checkpoint", str(learner)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"robot-rl replay: --checkpoint {learner} is a run directory; pass one of its checkpoints, "
        f"{learner / 'checkpoints'}/<name> (final)\n"
    )


def test_a_gated_log_without_its_weights_archive_still_asks_for_a_checkpoint(run, tmp_path: Path, capsys):
    log = tmp_path / "actor" / "episodes" / "episode_000001.hdf5"
    log.parent.mkdir(parents=True)
    shutil.copy(run["gated_log"], log)
    shutil.copy(run["root"] / "actor" / "config.yaml", tmp_path / "actor" / "config.yaml")
    with h5py.File(log, "r+") as f:
        f["data/demo_0"].attrs["weights_archive"] = str(tmp_path / "gone")
    assert main(["replay", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist (pass --checkpoint DIR)" in err
    assert main(["replay", str(log), "--checkpoint", str(run["archive"])]) == 0


def test_a_copied_actor_directory_replays_with_its_own_archive_and_says_which_inputs_it_used(
    run, tmp_path: Path, capsys
):
    """The episode attr names the archive where the actor wrote it; a copy (or a moved directory whose old place was
    reused) replays with the archive next to its log, which is what the copy holds."""
    copy = tmp_path / "copy"
    shutil.copytree(run["root"] / "actor", copy)
    tensors = load_file(str(copy / "weights" / "v00000003.safetensors"))
    name = next(k for k in sorted(tensors) if k.startswith("critics.") and k.endswith("weight"))
    _archive_other_weights(copy / "weights", 3, {**tensors, name: tensors[name] + 0.5})
    log = copy / "episodes" / run["gated_log"].name
    assert main(["replay", str(log)]) == 1  # the copy's own (changed) archive, not the original it names
    out = capsys.readouterr().out
    assert f"note: replayed with config {copy / 'config.yaml'}, BC policy {run['root'] / 'bc'}" in out
    assert f"weights {copy / 'weights'}" in out and "first divergence: step 0 field q_rl" in out
    # The BC policy the actor acted with is checked by its weights: another one at the recorded place is refused.
    state = json.loads((copy / "actor_state.json").read_text())
    (copy / "actor_state.json").write_text(json.dumps({**state, "bc_weights": "0" * 16}))
    assert main(["replay", str(run["bc_log"]).replace(str(run["root"] / "actor"), str(copy))]) == 2
    assert "is not the one this actor acted with" in capsys.readouterr().err
    # Named with --bc, the same policy is checked the same way: what the actor recorded decides.
    assert main(["replay", str(copy / "episodes" / run["bc_log"].name), "--bc", str(run["root"] / "bc")]) == 2
    assert f"BC policy {run['root'] / 'bc'} (--bc) is not the one this actor acted with" in capsys.readouterr().err
    (copy / "actor_state.json").write_text(json.dumps(state))
    assert main(["replay", str(copy / "episodes" / run["bc_log"].name), "--bc", str(run["root"] / "bc")]) == 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["agent.hidden=[16,16]"], "actor.net.0.weight: weights [32, 6], config [16, 6]"),
        (["agent.num_critics=2"], "critics.linears.0.weight: weights [4, 12, 32], config [2, 12, 32]"),
        (["agent.hidden=[32,32,32]"], "missing from the weights"),
    ],
)
def test_weights_that_do_not_fit_the_configs_networks_exit_2_naming_config_and_tensors(
    run, tmp_path: Path, capsys, overrides: list[str], named: str
):
    """A replay with another config than the actor's is an input error (exit 2), not a divergence (exit 1)."""
    other = tmp_path / "other.yaml"
    other.write_text(dump_config(load_config(run["root"] / "actor" / "config.yaml", overrides)))
    assert main(["replay", str(run["gated_log"]), "--config", str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"robot-rl replay: weights version 3 of weights archive {run['archive']} ")
    assert f"do not fit the networks of config {other}" in captured.err and named in captured.err
    with pytest.raises(ReplayInputError, match="do not fit"):
        replay_log(run["gated_log"], config=other)
    # A learner checkpoint in place of the archive is refused the same way.
    checkpoint = save_checkpoint(tmp_path / "ckpt", tensors=WeightsArchive(run["archive"]).load(3), manifest={})
    assert main(["replay", str(run["gated_log"]), "--config", str(other), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"the weights of checkpoint {checkpoint}" in err and named in err
    # With the actor's config the checkpoint fits: it reproduces the steps that acted with version 3.
    report = replay_log(run["gated_log"], checkpoint=checkpoint)
    assert report.divergences and min(d.step for d in report.divergences) >= SECOND_VERSION_AT


def test_a_bc_policy_that_does_not_fit_the_config_exits_2(run, tmp_path: Path, capsys):
    cfg = load_config(TINY)
    other_bc = tmp_path / "bc5"
    save_bc(make_bc_policy(cfg.bc, state_spec(6), 5, -np.ones(6, np.float32), np.ones(6, np.float32)), other_bc)
    assert main(["replay", str(run["bc_log"]), "--bc", str(other_bc)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"BC policy {other_bc} takes observations" in err and "5-dim actions" in err


def test_a_log_of_an_actor_that_observes_cameras_replays_with_the_logged_images(tmp_path: Path, capsys):
    cam = "width: 64, height: 48, crop: {x: 8, y: 0, width: 48, height: 48}, out_size: 24"
    small = "{channels: [8, 8], feature_dim: 8}"
    overrides = [f"env.cameras=[{{name: front, {cam}}}, {{name: wrist, {cam}}}]", "env.task.max_episode_steps=12",
                 f"agent.encoder={small}", f"bc.encoder={small}"]  # fmt: skip
    cfg = load_config(TINY, overrides)
    bc_dir = tmp_path / "bc"
    spec = transition_spec(cfg).obs
    save_bc(make_bc_policy(cfg.bc, spec, 6, -np.ones(6, np.float32), np.ones(6, np.float32)), bc_dir)
    _one_gated_episode(tmp_path / "actor", bc_dir, overrides, version=1, seed=7)
    log = next((tmp_path / "actor" / "episodes").glob("episode_*.hdf5"))
    ep = read_episodes(log)[0]
    assert ep.obs["front"].shape == (len(ep), 24, 24, 3) and np.all(ep.extras["weights_version"] == 1)
    assert main(["replay", str(log)]) == 0
    out = capsys.readouterr().out
    assert ": 0 divergent steps" in out
    # The images are not said to be reproduced: they are fed from the log.
    reproduced = next(line for line in out.splitlines() if line.startswith("no divergence: "))
    assert "obs/front" not in reproduced and "action" in reproduced
    assert "fed from the log: obs/front, obs/wrist (camera images" in out
    # The images are inputs, not checked outputs: another image changes what the policies propose.
    frames = ep.obs["front"].copy()
    frames[3] = 255 - frames[3]
    tampered = tmp_path / "tampered.hdf5"
    shutil.copy(log, tampered)
    with h5py.File(tampered, "r+") as f:
        f["data/demo_0/obs/front"][...] = frames
    report = replay_log(tampered, bc_dir=bc_dir, config=tmp_path / "actor" / "config.yaml")
    assert not report.ok and min(d.step for d in report.divergences) == 3
    # A config whose cameras make other images than the log holds is refused, naming the camera and both shapes.
    other, other_bc = tmp_path / "other.yaml", tmp_path / "other_bc"
    other_cfg = load_config(TINY, [o.replace("out_size: 24", "out_size: 32") for o in overrides])
    other.write_text(dump_config(other_cfg))
    other_spec = transition_spec(other_cfg).obs
    save_bc(make_bc_policy(other_cfg.bc, other_spec, 6, -np.ones(6, np.float32), np.ones(6, np.float32)), other_bc)
    with pytest.raises(  # (the log on its own: its actor directory would first refuse a BC policy not its own)
        ReplayInputError, match=r"obs/front is uint8\[24, 24, 3\], the config's policies take uint8\[32"
    ):
        replay_log(shutil.copy(log, tmp_path / "log.hdf5"), bc_dir=other_bc, config=other)


def test_a_damaged_weights_archive_is_unusable_input_not_a_divergence(run, tmp_path: Path, capsys):
    """Damaged archive files (pins, a manifest, the tensors' bytes) and archived weights holding NaN are refused with
    one line and exit 2: a replay on them would report the damage as the actor having acted otherwise."""
    cases = {}
    for name in ("pins", "manifest", "bytes", "nan"):
        archive = Path(shutil.copytree(run["archive"], tmp_path / name))
        cases[name] = archive
    (cases["pins"] / "pins.json").write_text("{bad")
    (cases["manifest"] / "v00000003.json").write_text("[]")
    tensors_file = cases["bytes"] / "v00000003.safetensors"
    data = bytearray(tensors_file.read_bytes())
    data[-100] ^= 0x40
    tensors_file.write_bytes(bytes(data))
    tensors = load_file(str(cases["nan"] / "v00000003.safetensors"))
    name = next(k for k in sorted(tensors) if k.startswith("critics.") and k.endswith("weight"))
    tensors[name][0, 0] = float("nan")
    _archive_other_weights(cases["nan"], 3, tensors)
    expected = {
        "pins": "pins.json cannot be read",
        "manifest": "v00000003.json is not a JSON object",
        "bytes": "v00000003.safetensors are not the bytes that were archived",
        "nan": f"v00000003.safetensors: {name} holds NaN or inf",
    }
    for case, archive in cases.items():
        assert main(["replay", str(run["gated_log"]), "--checkpoint", str(archive)]) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected[case] in err and "Traceback" not in err, (case, err)
    # A BC-only log does not open a --checkpoint at all: it has no step that acted with weights.
    assert main(["replay", str(run["bc_log"]), "--checkpoint", str(tmp_path / "nowhere")]) == 0
    assert f"--checkpoint {tmp_path / 'nowhere'} is not used" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "make", "said"),
    [
        ("weights_version", lambda a: np.where(np.arange(len(a)) == 3, np.nan, a).astype(np.float64), "float64[]"),
        ("operator_event", lambda a: a.astype(np.float32), "float32[]"),
        ("target", lambda a: a[:, :3], "float64[3]"),
        ("bc_action", lambda a: a[:, 0], "float32[]"),
        ("operator_event", lambda a: np.where(np.arange(len(a)) == 2, 99, a).astype(a.dtype), "codes [99]"),
    ],
)
def test_an_extra_of_another_form_than_an_actor_logs_is_refused_in_one_line(run, tmp_path: Path, capsys, extra, make,
                                                                            said):  # fmt: skip
    log = tmp_path / "episode.hdf5"
    shutil.copy(run["gated_log"], log)
    with h5py.File(log, "r+") as f:
        group = f["data/demo_0/extras"]
        value = make(group[extra][...])
        del group[extra]
        group[extra] = value
    assert main(["replay", str(log), "--config", str(run["root"] / "actor" / "config.yaml")]) == 2
    err = capsys.readouterr().err
    shown = (
        f"extras/{extra} holds {said} that no operator event has"
        if said.startswith("codes")
        else (f"extras/{extra} is {said} per step, an actor logs")
    )
    assert err.count("\n") == 1 and f"demo_0 {shown}" in err, err


def test_a_divergence_below_the_digits_shown_says_by_how_much():
    tiny = Divergence(0, 3, "target", np.array([0.25, -0.5]), np.array([0.25, -0.5 + 2e-12])).line()
    assert tiny.startswith("step 3 target: logged [ 0.25, -0.5 ] replayed [ 0.25, -0.5 ]") and "differ by 2e-12" in tiny
    plain = Divergence(0, 3, "q_rl", np.float32(1.5), np.float32(2.5)).line()
    assert plain == "step 3 q_rl: logged 1.5 replayed 2.5"
