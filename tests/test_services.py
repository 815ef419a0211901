"""Actor and learner as separate processes over loopback: the demo end to end, and an actor killed mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.cli import main
from robot_rl.config import load_config
from robot_rl.demo import free_port_pair
from robot_rl.episodes import read_episodes
from robot_rl.obs import state_spec

TINY = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"


def _stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_demo_runs_learner_and_actor_as_processes_and_reports(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--config", str(TINY), "--set", "actor.period_s=0", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BC" in printed and "Q2RL (final)" in printed and "report.png" in printed
    learner, actor = _stats(out / "learner" / "stats.json"), _stats(out / "actor" / "stats.json")
    # Nothing lost, nothing doubled: what the actor produced is what it got acknowledged and what the learner stored.
    assert actor["produced"] == actor["acked"] == learner["actors"]["actor0"]["stored"] > 0
    assert learner["actors"]["actor0"]["duplicates"] == 0 and learner["refused_unidentified"] == 0
    summary = json.loads((out / "learner" / "summary.json").read_text())
    assert summary["env_steps"] == learner["env_steps"] == actor["produced"]
    assert (out / "report.png").stat().st_size > 10_000
    # Online episodes carry the weights version they acted with, and the gating record.
    online = []
    for path in sorted((out / "actor" / "episodes").glob("episode_*.hdf5")):
        ep = read_episodes(path)[0]
        if ep.attrs["kind"] == "online":
            online.append(ep)
    assert online and all(np.all(ep.extras["weights_version"] >= 1) for ep in online)
    assert all(np.all(np.isfinite(ep.extras["q_bc"])) and np.all(np.isfinite(ep.extras["q_rl"])) for ep in online)
    assert (np.diff(np.concatenate([ep.extras["weights_version"] for ep in online])) >= 0).all()


def _bc_and_endpoint(tmp_path: Path) -> tuple[Path, str]:
    """A BC policy of the tiny config's shapes in tmp_path/bc, and a free learner endpoint on loopback."""
    cfg = load_config(TINY)
    bc_dir = tmp_path / "bc"
    save_bc(make_bc_policy(cfg.bc, state_spec(6), 6, -np.ones(6, np.float32), np.ones(6, np.float32)), bc_dir)
    return bc_dir, f"tcp://127.0.0.1:{free_port_pair()}"


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "robot_rl.cli", *args], stdout=log.open("a"),
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip


def _learner_and_actor(tmp_path: Path) -> tuple[subprocess.Popen, subprocess.Popen, list[str]]:
    """A learner (600 env steps) and an actor as processes on loopback, once the actor has 150 transitions acked;
    also the actor's arguments, to restart it with the same --out."""
    bc_dir, endpoint = _bc_and_endpoint(tmp_path)
    common = ["--config", str(TINY), "--bc", str(bc_dir), "--quiet", "--set", "train.env_steps=600",
              "--set", "actor.period_s=0.002", "--set", "actor.max_env_steps_ahead=60"]  # fmt: skip
    learner = _spawn(["learner", *common, "--out", str(tmp_path / "learner"), "--bind", endpoint], tmp_path / "l.log")
    actor_args = ["actor", *common, "--out", str(tmp_path / "actor"), "--learner", endpoint]
    actor = _spawn(actor_args, tmp_path / "a.log")
    deadline = time.monotonic() + 120
    while _stats(tmp_path / "actor" / "stats.json").get("acked", 0) < 150:
        if time.monotonic() > deadline or actor.poll() is not None or learner.poll() is not None:
            for proc in (actor, learner):
                proc.kill()
            raise AssertionError((tmp_path / "a.log").read_text()[-2000:])
        time.sleep(0.2)
    return learner, actor, actor_args


def _stop_restart_and_finish(tmp_path: Path, stop: Callable[[subprocess.Popen], None]) -> tuple[dict, dict]:
    """Learner and actor as in `_learner_and_actor`; `stop(actor)`, then the actor restarted with the same --out (the
    same run continues) until the learner's run is done. The actor's and the learner's final stats."""
    learner, actor, actor_args = _learner_and_actor(tmp_path)
    try:
        stop(actor)
        actor = _spawn(actor_args, tmp_path / "a.log")
        assert learner.wait(timeout=180) == 0, (tmp_path / "l.log").read_text()[-3000:]
        assert actor.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for proc in (actor, learner):
            if proc.poll() is None:
                proc.kill()
    return _stats(tmp_path / "actor" / "stats.json"), _stats(tmp_path / "learner" / "stats.json")


def test_a_demo_whose_learner_fails_says_why_and_exits_1(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--config", str(TINY), "--set", "actor.period_s=0", "--out", str(out), "--quiet"]
    assert main([*args, "--set", "train.buffer_capacity=4000000000"]) == 1  # more memory than any CI machine has
    printed = capsys.readouterr().out
    assert "demo: the learner exited (2): robot-rl learner: train.buffer_capacity=4000000000 needs" in printed
    assert str(out / "learner.log") in printed and "Q2RL" not in printed  # no table of a run that never ran


def test_actor_killed_and_restarted_loses_and_doubles_nothing(tmp_path: Path):
    def kill(actor: subprocess.Popen) -> None:
        actor.send_signal(signal.SIGKILL)
        actor.wait()
        assert len(list((tmp_path / "actor" / "spill").glob("seg_*.log"))) >= 1

    a, lstats = _stop_restart_and_finish(tmp_path, kill)
    stored = lstats["actors"]["actor0"]["stored"]
    assert a["produced"] == a["acked"] == stored, (a, lstats)
    assert lstats["env_steps"] == stored  # every stored transition counted once


def test_an_actor_whose_spill_lost_acknowledged_chunks_numbers_new_ones_after_what_the_learner_holds(tmp_path: Path):
    """The spill's records carry the run's sequence across restarts. With them cut away (a damaged or emptied spill),
    the learner's welcome says how far the run got: new chunks continue after it instead of repeating numbers the
    learner would drop as duplicates."""
    acked_before = []

    def stop_and_damage_the_spill(actor: subprocess.Popen) -> None:
        actor.send_signal(signal.SIGTERM)  # a clean stop: everything produced is acknowledged
        assert actor.wait(timeout=60) == 0
        acked_before.append(_stats(tmp_path / "actor" / "stats.json")["acked"])
        for segment in (tmp_path / "actor" / "spill").glob("seg_*.log"):
            os.truncate(segment, 100)  # the records are gone, a torn piece of the first one stays

    a, lstats = _stop_restart_and_finish(tmp_path, stop_and_damage_the_spill)
    stored = lstats["actors"]["actor0"]["stored"]
    assert a["produced"] == a["acked"] == stored > acked_before[0], (a, lstats)
    assert lstats["actors"]["actor0"]["duplicates"] == 0 and lstats["env_steps"] == stored
    assert "spill damaged or removed" in (tmp_path / "a.log").read_text()


@pytest.mark.parametrize("bad", ["tcp://127.0.0.1", "ftp://x:1"])
def test_learner_refuses_a_malformed_bind(tmp_path: Path, bad: str, capsys):
    cfg = load_config(TINY)
    bc_dir = tmp_path / "bc"
    save_bc(make_bc_policy(cfg.bc, state_spec(6), 6, -np.ones(6, np.float32), np.ones(6, np.float32)), bc_dir)
    args = ["learner", "--config", str(TINY), "--bc", str(bc_dir), "--out", str(tmp_path / "l"), "--bind", bad]
    assert main(args) == 2
    assert "transport.learner" in capsys.readouterr().err


def test_learner_killed_and_resumed_with_two_actors_keeps_every_transition_once(tmp_path: Path):
    bc_dir, endpoint = _bc_and_endpoint(tmp_path)
    common = ["--config", str(TINY), "--bc", str(bc_dir), "--quiet", "--set", "train.env_steps=900",
              "--set", "actor.period_s=0.002", "--set", "actor.max_env_steps_ahead=60"]  # fmt: skip
    learner_args = ["learner", *common, "--out", str(tmp_path / "learner"), "--bind", endpoint]
    learner = _spawn(learner_args, tmp_path / "l.log")
    actors = {
        name: _spawn(
            ["actor", *common, "--out", str(tmp_path / name), "--learner", endpoint, "--actor-id", name],
            tmp_path / f"{name}.log",
        )
        for name in ("arm_a", "arm_b")
    }
    try:
        deadline = time.monotonic() + 120
        while sum(_stats(tmp_path / n / "stats.json").get("acked", 0) for n in actors) < 300:
            assert time.monotonic() < deadline, (tmp_path / "l.log").read_text()[-2000:]
            assert learner.poll() is None and all(p.poll() is None for p in actors.values())
            time.sleep(0.2)
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        time.sleep(1.0)  # the actors keep acting and spilling meanwhile
        learner = _spawn([*learner_args, "--resume"], tmp_path / "l.log")
        assert learner.wait(timeout=240) == 0, (tmp_path / "l.log").read_text()[-3000:]
        for name, proc in actors.items():
            assert proc.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in (learner, *actors.values()):
            if proc.poll() is None:
                proc.kill()
    lstats = _stats(tmp_path / "learner" / "stats.json")
    total = 0
    for name in actors:
        a = _stats(tmp_path / name / "stats.json")
        assert a["produced"] == a["acked"] == lstats["actors"][name]["stored"], (name, a, lstats)
        total += a["produced"]
    assert lstats["env_steps"] == total


@pytest.mark.slow
def test_a_learner_stopped_under_a_fast_and_a_slow_actor_is_reported_by_both_and_resumed_without_loss(tmp_path: Path):
    """Two actors at different rates, the slow one joining once the learner is online; SIGTERM to the learner: each
    actor says the learner is stopping (or silent) and what waits unacknowledged, keeps it, and hands it over after
    --resume."""
    bc_dir, endpoint = _bc_and_endpoint(tmp_path)
    common = ["--config", str(TINY), "--bc", str(bc_dir), "--quiet", "--set", "train.env_steps=300",
              "--set", "actor.max_env_steps_ahead=60"]  # fmt: skip
    learner_args = ["learner", *common, "--out", str(tmp_path / "learner"), "--bind", endpoint]
    learner = _spawn(learner_args, tmp_path / "l.log")
    rates = {"fast": "0.002", "slow": "0.01"}
    actors: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        args = ["actor", *common, "--out", str(tmp_path / name), "--learner", endpoint, "--actor-id", name]
        actors[name] = _spawn([*args, "--set", f"actor.period_s={rates[name]}"], tmp_path / f"{name}.log")

    def until(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 120
        while not done():
            assert time.monotonic() < deadline, (what, (tmp_path / "l.log").read_text()[-2000:])
            time.sleep(0.2)

    try:
        start("fast")
        until(lambda: _stats(tmp_path / "learner" / "stats.json").get("phase") == "online", "online")
        start("slow")
        until(lambda: _stats(tmp_path / "slow" / "stats.json").get("acked", 0) >= 30, "the slow actor's first acks")
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(timeout=60) == 130
        for name in actors:
            # The stopping learner says so (the actor tells at once); were that word lost, its silence is told.
            said = ("says it is stopping", "no word from the learner")
            until(lambda n=name, s=said: any(w in (tmp_path / f"{n}.log").read_text() for w in s), f"{name} says")
            assert "transitions wait unacknowledged" in (tmp_path / f"{name}.log").read_text()
        learner = _spawn([*learner_args, "--resume"], tmp_path / "l.log")
        assert learner.wait(timeout=240) == 0, (tmp_path / "l.log").read_text()[-3000:]
        for name, proc in actors.items():
            assert proc.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            assert "the learner is back" in (tmp_path / f"{name}.log").read_text()
    finally:
        for proc in (learner, *actors.values()):
            if proc.poll() is None:
                proc.kill()
    lstats = _stats(tmp_path / "learner" / "stats.json")
    for name in actors:
        a = _stats(tmp_path / name / "stats.json")
        assert a["produced"] == a["acked"] == lstats["actors"][name]["stored"] > 0, (name, a, lstats)
        assert lstats["actors"][name]["runs"][a["run_id"]]["stored"] == a["produced"]
    assert lstats["env_steps"] == sum(_stats(tmp_path / n / "stats.json")["produced"] for n in actors)


def test_sigterm_on_the_actor_flushes_and_waits_for_the_last_acks(tmp_path: Path):
    bc_dir, endpoint = _bc_and_endpoint(tmp_path)
    common = ["--config", str(TINY), "--bc", str(bc_dir), "--quiet", "--set", "train.env_steps=5000",
              "--set", "actor.period_s=0.005", "--set", "actor.max_env_steps_ahead=60"]  # fmt: skip
    learner = _spawn(["learner", *common, "--out", str(tmp_path / "learner"), "--bind", endpoint], tmp_path / "l.log")
    actor = _spawn(["actor", *common, "--out", str(tmp_path / "actor"), "--learner", endpoint], tmp_path / "a.log")
    try:
        deadline = time.monotonic() + 120
        while _stats(tmp_path / "actor" / "stats.json").get("acked", 0) < 100:
            assert time.monotonic() < deadline and actor.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
            time.sleep(0.1)
        actor.send_signal(signal.SIGTERM)  # mid-episode: the cut episode's steps must still arrive
        assert actor.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()[-2000:]
        a = _stats(tmp_path / "actor" / "stats.json")
        assert a["produced"] == a["acked"] > 100
        stored = -1
        for _ in range(50):  # the learner rewrites its stats.json at least once a second
            stored = _stats(tmp_path / "learner" / "stats.json").get("actors", {}).get("actor0", {}).get("stored", -1)
            if stored == a["produced"]:
                break
            time.sleep(0.1)
        assert stored == a["produced"]
    finally:
        for proc in (actor, learner):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_ctrl_c_stops_the_demo_and_both_processes_and_names_the_run_directory(tmp_path: Path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "robot_rl.cli", "demo", "--config", str(TINY), "--out", str(out), "--quiet",
           "--set", "actor.period_s=0.01", "--set", "train.env_steps=100000"]  # fmt: skip
    # Its own process group, as a terminal's Ctrl-C reaches the demo and its children together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _stats(out / "actor" / "stats.json").get("acked", 0) < 60:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "interrupted" in output and str(out) in output
    learner, actor = _stats(out / "learner" / "stats.json"), _stats(out / "actor" / "stats.json")
    assert actor["produced"] == actor["acked"] == learner["actors"]["actor0"]["stored"]
    assert (out / "learner" / "checkpoints" / "latest").is_dir()  # the learner can --resume this run


def test_demo_with_cameras_learns_from_images_across_the_two_processes(tmp_path: Path, capsys):
    """The image path end to end: demonstrations, BC, Q-Estimation and online RL on camera images, over the wire."""
    cam = "width: 64, height: 48, crop: {x: 8, y: 0, width: 48, height: 48}, out_size: 24"
    sets = [f"env.cameras=[{{name: front, {cam}}}, {{name: wrist, {cam}}}]", "actor.period_s=0",
            "agent.encoder={channels: [8, 8], feature_dim: 8}", "bc.encoder={channels: [8, 8], feature_dim: 8}",
            "train.env_steps=60"]  # fmt: skip
    out = tmp_path / "demo"
    args = ["demo", "--config", str(TINY), "--out", str(out), "--quiet"]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    learner, actor = _stats(out / "learner" / "stats.json"), _stats(out / "actor" / "stats.json")
    assert actor["produced"] == actor["acked"] == learner["actors"]["actor0"]["stored"] > 0
    assert json.loads((out / "learner" / "summary.json").read_text())["learner_steps"] > 0
    online = [ep for p in sorted((out / "actor" / "episodes").glob("episode_*.hdf5")) for ep in read_episodes(p)
              if ep.attrs["kind"] == "online"]  # fmt: skip
    assert online
    for ep in online:
        for name in ("front", "wrist"):
            assert ep.obs[name].dtype == np.uint8 and ep.obs[name].shape == (len(ep), 24, 24, 3)
        assert np.all(np.isfinite(ep.extras["q_bc"])) and np.all(ep.extras["weights_version"] >= 1)
    # The weights the actor gated with carry the camera encoders (trained by the learner, not the initial ones).
    from safetensors.numpy import load_file

    versions = sorted((out / "actor" / "weights").glob("*.safetensors"))
    first, last = load_file(str(versions[0])), load_file(str(versions[-1]))
    key = next(k for k in last if k.startswith("encoder.cameras.0.convs."))
    assert not np.array_equal(first[key], last[key])


def test_an_actor_says_when_it_is_refused_or_its_learner_falls_silent_and_what_stays_unacknowledged(tmp_path: Path):
    bc_dir, endpoint = _bc_and_endpoint(tmp_path)
    common = ["--config", str(TINY), "--bc", str(bc_dir), "--quiet", "--set", "actor.period_s=0.002",
              "--set", "actor.weights_staleness_s=1", "--set", "actor.stop_wait_s=1"]  # fmt: skip
    learner_args = ["learner", *common, "--out", str(tmp_path / "learner"), "--bind", endpoint]
    learner = _spawn([*learner_args, "--set", "train.env_steps=100000"], tmp_path / "l.log")  # not done meanwhile
    actor = None
    try:
        # Another config: refused at the handshake, one line naming the field, exit 2.
        refused = _spawn(["actor", *common, "--out", str(tmp_path / "a1"), "--learner", endpoint,
                          "--set", "agent.num_critics=5"], tmp_path / "a1.log")  # fmt: skip
        assert refused.wait(timeout=60) == 2
        text = (tmp_path / "a1.log").read_text()
        assert "robot-rl actor: the learner refused this actor" in text and "agent.num_critics" in text
        assert "Traceback" not in text
        # The learner killed: the actor says it acts with BC alone, and on its stop what is left unacknowledged.
        actor = _spawn(["actor", *common, "--out", str(tmp_path / "a2"), "--learner", endpoint], tmp_path / "a2.log")
        deadline = time.monotonic() + 120
        while _stats(tmp_path / "a2" / "stats.json").get("acked", 0) < 60:
            assert time.monotonic() < deadline and actor.poll() is None, (tmp_path / "a2.log").read_text()[-2000:]
            time.sleep(0.2)
        # Both services say, with the time, that they found each other (also under --quiet: it is their log).
        said = (tmp_path / "a2.log").read_text()
        assert re.search(rf"^\d{{4}}-\d\d-\d\d [\d:,]+ INFO .*connected to the learner at {endpoint} ", said, re.M), (
            said
        )
        assert re.search(r"INFO .*welcomed actor actor0", (tmp_path / "l.log").read_text())
        learner.kill()
        learner.wait()
        while "acting with the BC policy alone" not in (tmp_path / "a2.log").read_text():
            assert time.monotonic() < deadline and actor.poll() is None, (tmp_path / "a2.log").read_text()[-2000:]
            time.sleep(0.2)
        while (
            _stats(tmp_path / "a2" / "stats.json").get("produced", 0) <= _stats(tmp_path / "a2" / "stats.json")["acked"]
        ):
            assert time.monotonic() < deadline, (tmp_path / "a2.log").read_text()[-2000:]
            time.sleep(0.2)
        actor.send_signal(signal.SIGTERM)
        assert actor.wait(timeout=60) == 1
        assert "transitions are not acknowledged by the learner yet" in (tmp_path / "a2.log").read_text()
    finally:
        for proc in (actor, learner):
            if proc is not None and proc.poll() is None:
                proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "headline"),
    [
        (
            "reliability.py",
            ["--kills", "3"],
            r"headline: 3 \+ 3 SIGKILLs: 0 lost, 0 stored twice, 0 skipped, 0 invalid",
        ),
        ("fuzz.py", ["--messages", "5000"], r"headline: 5,000 hostile messages: learner crashes 0, bad rows stored 0"),
    ],
)
def test_the_kill_and_fuzz_benches_lose_and_store_nothing_wrong(script: str, args: list[str], headline: str):
    bench = Path(__file__).resolve().parents[1] / "bench"
    out = subprocess.run([sys.executable, str(bench / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.match(headline, last), out.stdout[-3000:]
    if script == "fuzz.py":  # the real actor's transitions kept arriving during the fuzz
        assert int(last.rsplit(": ", 1)[1].split()[0]) > 0, last


def test_a_failed_service_is_summed_up_by_its_exception_not_by_advice_printed_after_it(tmp_path: Path):
    from robot_rl.demo import _last_line

    log = tmp_path / "learner.log"
    log.write_text(
        "learner: phase qest_fit\n"
        "Traceback (most recent call last):\n"
        '  File "agent.py", line 479, in _critic_step\n'
        "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\n"
        "InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')\n"
        "\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a bug "
        'to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"\n'
    )
    assert _last_line(log).startswith("InvalidCxxCompiler: No working C++ compiler found")
    log.write_text("learner: phase eval\nrobot-rl learner: run directory runs/x exists and is not empty\n")
    assert _last_line(log) == "robot-rl learner: run directory runs/x exists and is not empty"
