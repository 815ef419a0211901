"""Episode files: round trips, robomimic's layout, crash recovery and every refusal."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from robot_rl.episodes import (
    Episode,
    EpisodeFault,
    EpisodeFileError,
    EpisodeWriter,
    episodes_to_transitions,
    fault_of,
    iter_episodes,
    read_env_args,
    read_episodes,
    read_episodes_without_steps,
)

REPO = Path(__file__).resolve().parents[1]
ENV_ARGS = {
    "env_name": "PegInsertion",
    "type": 4,
    "env_kwargs": {"control_hz": 10, "cameras": ["front", "wrist"]},
}


def make_episode(steps: int = 6, *, end: str = "terminated", seed: int = 0) -> Episode:
    """A small image + state episode with a gating record, ending as `end` says: terminated/truncated/none."""
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(steps + 1, 7)).astype(np.float32)
    image = rng.integers(0, 256, size=(steps + 1, 8, 8, 3), dtype=np.uint8)
    terminated = np.zeros(steps, bool)
    truncated = np.zeros(steps, bool)
    rewards = np.zeros(steps, np.float32)
    if end == "terminated":
        terminated[-1] = True
        rewards[-1] = 1.0
    elif end == "truncated":
        truncated[-1] = True
    return Episode(
        obs={"state": state[:-1], "front": image[:-1]},
        next_obs={"state": state[1:], "front": image[1:]},
        actions=rng.uniform(-1, 1, size=(steps, 6)).astype(np.float32),
        rewards=rewards,
        terminated=terminated,
        truncated=truncated,
        extras={
            "a_bc": rng.uniform(-1, 1, size=(steps, 6)).astype(np.float32),
            "q_bc": rng.normal(size=steps),
            "used_bc": rng.integers(0, 2, size=steps).astype(bool),
            "weights_version": np.arange(steps, dtype=np.int64),
        },
        attrs={"operator": "ana", "seed": seed, "bc_only": False, "gamma": 0.99},
    )


def assert_same_episode(got: Episode, want: Episode, *, attrs: bool = True) -> None:
    for field in ("obs", "next_obs", "extras"):
        g, w = getattr(got, field), getattr(want, field)
        assert set(g) == set(w), field
        for key in w:
            assert g[key].dtype == w[key].dtype, f"{field}/{key}"
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"{field}/{key}")
    for field in ("actions", "rewards", "terminated", "truncated"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype, field
        np.testing.assert_array_equal(g, w, err_msg=field)
    if attrs:
        assert got.attrs == want.attrs
        assert {k: type(v) for k, v in got.attrs.items()} == {k: type(v) for k, v in want.attrs.items()}


def stream_episode(writer: EpisodeWriter, ep: Episode) -> int:
    with writer.begin_episode(ep.attrs) as handle:
        for t in range(len(ep)):
            handle.append(
                obs={k: v[t] for k, v in ep.obs.items()},
                action=ep.actions[t],
                reward=float(ep.rewards[t]),
                terminated=bool(ep.terminated[t]),
                truncated=bool(ep.truncated[t]),
                next_obs={k: v[t] for k, v in ep.next_obs.items()},
                extras={k: v[t] for k, v in ep.extras.items()},
            )
    return handle.index


# ----------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------


def test_whole_episode_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    episodes = [make_episode(5, seed=1), make_episode(9, end="truncated", seed=2)]
    with EpisodeWriter(path, ENV_ARGS) as w:
        assert [w.add_episode(ep) for ep in episodes] == [0, 1]
    got = read_episodes(path)
    assert len(got) == 2
    for g, want in zip(got, episodes, strict=True):
        assert_same_episode(g, want)
    assert read_env_args(path) == ENV_ARGS


def test_streamed_episode_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "log.hdf5"
    episodes = [make_episode(23, seed=3), make_episode(4, end="none", seed=4)]
    with EpisodeWriter(path, ENV_ARGS, flush_every=5) as w:
        assert [stream_episode(w, ep) for ep in episodes] == [0, 1]
    for g, want in zip(read_episodes(path), episodes, strict=True):
        assert_same_episode(g, want)
    with h5py.File(path, "r") as f:
        # Streamed datasets are chunked and growable; num_samples is set only by end().
        assert f["data/demo_0/obs/front"].chunks is not None
        assert f["data/demo_0/actions"].maxshape == (None, 6)
        assert f["data/demo_0"].attrs["num_samples"] == 23
        assert f["data"].attrs["total"] == 27


def test_terminated_and_truncated_are_kept_apart(tmp_path: Path) -> None:
    path = tmp_path / "ends.hdf5"
    success, timeout, cut = make_episode(3), make_episode(3, end="truncated"), make_episode(3, end="none")
    with EpisodeWriter(path, ENV_ARGS) as w:
        w.add_episode(success)
        stream_episode(w, timeout)
        w.add_episode(cut)
    got = read_episodes(path)
    assert [(bool(e.terminated[-1]), bool(e.truncated[-1])) for e in got] == [
        (True, False),
        (False, True),
        (False, False),
    ]
    assert [e.success for e in got] == [True, False, False]
    assert [bool(e.dones[-1]) for e in got] == [True, True, False]
    flat = episodes_to_transitions(got)
    np.testing.assert_array_equal(flat["terminated"], [0, 0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(flat["truncated"], [0, 0, 0, 0, 0, 1, 0, 0, 0])


def test_append_mode_continues_numbering(tmp_path: Path) -> None:
    path = tmp_path / "log.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        w.add_episode(make_episode(3, seed=0))
        w.add_episode(make_episode(4, seed=1))
    with EpisodeWriter(path, ENV_ARGS, mode="a") as w:
        assert w.add_episode(make_episode(5, seed=2)) == 2
        assert stream_episode(w, make_episode(2, seed=3)) == 3
    with h5py.File(path, "r") as f:
        assert sorted(f["data"]) == ["demo_0", "demo_1", "demo_2", "demo_3"]
        assert f["data"].attrs["total"] == 3 + 4 + 5 + 2
    assert [len(e) for e in read_episodes(path)] == [3, 4, 5, 2]


def test_append_creates_a_missing_file_and_refuses_other_env_args(tmp_path: Path) -> None:
    path = tmp_path / "new.hdf5"
    with EpisodeWriter(path, ENV_ARGS, mode="a") as w:
        assert w.add_episode(make_episode(2)) == 0
    with pytest.raises(EpisodeFileError, match=re.escape(str(path)) + ".*env_name"):
        EpisodeWriter(path, {**ENV_ARGS, "env_name": "Other"}, mode="a")
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    with pytest.raises(EpisodeFileError, match=re.escape(str(text)) + ".*not an HDF5 file"):
        EpisodeWriter(text, ENV_ARGS, mode="a")
    assert text.read_text() == "not hdf5"


def test_write_mode_truncates(tmp_path: Path) -> None:
    path = tmp_path / "log.hdf5"
    for _ in range(2):
        with EpisodeWriter(path, ENV_ARGS) as w:
            assert w.add_episode(make_episode(2)) == 0
    assert len(read_episodes(path)) == 1


def test_demos_read_in_numeric_order_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "many.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        for i in range(12):
            w.add_episode(make_episode(1 + i % 3, end="none", seed=i))
    seeds = [e.attrs["seed"] for e in iter_episodes(path)]
    assert seeds == list(range(12))
    assert [e.attrs["seed"] for e in read_episodes(path, limit=3)] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# robomimic's layout, read the way robomimic reads it
# ----------------------------------------------------------------------------------------------------------


def test_robomimic_layout(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    episodes = [make_episode(4, seed=0), make_episode(6, end="truncated", seed=1)]
    with EpisodeWriter(path, ENV_ARGS) as w:
        w.add_episode(episodes[0])
        stream_episode(w, episodes[1])
    with h5py.File(path, "r") as f:
        assert list(f) == ["data"]
        data = f["data"]
        # robomimic: FileUtils.get_env_metadata_from_dataset and SequenceDataset.load_dataset_in_memory.
        env_meta = json.loads(data.attrs["env_args"])
        assert env_meta == ENV_ARGS and {"env_name", "type", "env_kwargs"} <= set(env_meta)
        assert int(data.attrs["total"]) == 10
        demos = list(data.keys())
        demos = [demos[i] for i in np.argsort([int(d[5:]) for d in demos])]
        assert demos == ["demo_0", "demo_1"]
        for name, ep in zip(demos, episodes, strict=True):
            demo = data[name]
            assert int(demo.attrs["num_samples"]) == len(ep)
            assert set(demo) == {
                "obs",
                "next_obs",
                "actions",
                "rewards",
                "dones",
                "terminated",
                "truncated",
                "extras",
            }
            assert set(demo["obs"]) == set(demo["next_obs"]) == {"state", "front"}
            assert demo["obs/front"].shape == (len(ep), 8, 8, 3) and demo["obs/front"].dtype == np.uint8
            assert demo["actions"].shape == (len(ep), 6)
            assert demo["rewards"].shape == demo["dones"].shape == (len(ep),)
            np.testing.assert_array_equal(demo["dones"][()].astype("float32"), ep.dones.astype("float32"))
            assert set(np.unique(demo["dones"][()])) <= {0, 1}
            assert demo["dones"].dtype.kind == "i"


# ----------------------------------------------------------------------------------------------------------
# A writer killed mid-episode
# ----------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from robot_rl.episodes import EpisodeWriter, Episode

    path, env_args = sys.argv[1], {"env_name": "PegInsertion", "type": 4, "env_kwargs": {}}
    w = EpisodeWriter(path, env_args, flush_every=5)
    w.add_episode(Episode(
        obs={"state": np.zeros((3, 2), np.float32)}, next_obs={"state": np.ones((3, 2), np.float32)},
        actions=np.zeros((3, 1), np.float32), rewards=np.zeros(3, np.float32),
        terminated=np.array([0, 0, 1], bool), truncated=np.zeros(3, bool),
    ))
    h = w.begin_episode({"phase": "online"})
    for k in range(23):
        h.append(
            obs={"state": np.full(2, k, np.float32)}, action=np.full(1, k / 100, np.float32), reward=0.0,
            terminated=False, truncated=False, next_obs={"state": np.full(2, k + 1, np.float32)},
            extras={"q_rl": np.float64(k)},
        )
    print("ready", flush=True)
    time.sleep(60)
    """
)


def run_and_kill_writer(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        assert line.strip() == b"ready", proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_killed_writer_leaves_flushed_steps_readable(tmp_path: Path) -> None:
    path = tmp_path / "crash.hdf5"
    run_and_kill_writer(path)
    first, cut = read_episodes(path)
    assert len(first) == 3 and bool(first.terminated[-1]) and "interrupted" not in first.attrs
    # 23 steps appended, flushed every 5: the last flush held 20 steps; the 3 after it are lost.
    assert len(cut) == 20
    assert cut.attrs == {"phase": "online", "interrupted": True}
    np.testing.assert_array_equal(cut.obs["state"][:, 0], np.arange(20))
    np.testing.assert_array_equal(cut.next_obs["state"][:, 0], np.arange(1, 21))
    np.testing.assert_array_equal(cut.extras["q_rl"], np.arange(20.0))
    assert not cut.dones.any()

    # Appending seals the cut demo so robomimic (which needs num_samples) can read the file, then numbers on.
    with EpisodeWriter(path, read_env_args(path), mode="a") as w:
        assert w.add_episode(make_episode(2)) == 2
    with h5py.File(path, "r") as f:
        assert f["data/demo_1"].attrs["num_samples"] == 20
        assert bool(f["data/demo_1"].attrs["interrupted"])
        assert f["data/demo_1/actions"].shape == (20, 1)
        assert f["data"].attrs["total"] == 3 + 20 + 2
    assert [len(e) for e in read_episodes(path)] == [3, 20, 2]


def test_unfinished_demo_is_read_to_its_shortest_dataset(tmp_path: Path) -> None:
    path = tmp_path / "partial.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        w.add_episode(make_episode(6, end="none"))
        w.add_episode(make_episode(2))
    with h5py.File(path, "a") as f:
        demo = f["data/demo_0"]
        del demo.attrs["num_samples"]
        rewards = demo["rewards"][:4]
        del demo["rewards"]
        demo["rewards"] = rewards
        empty = f["data"].create_group("demo_2")
        empty.create_group("obs")
    notes: list[str] = []
    got = read_episodes(path, warn=notes.append)
    assert [len(e) for e in got] == [4, 2]
    # The demo cut short is named (it is used, but not whole); demo_2, whose writer died before a step, is not.
    assert notes == [
        f"{path}: demos whose writer died before it sealed them (no num_samples) read up to their last whole step, "
        "as interrupted (demo_0)"
    ]
    assert got[0].attrs["interrupted"] is True


# ----------------------------------------------------------------------------------------------------------
# Streaming rules
# ----------------------------------------------------------------------------------------------------------


def step(k: float = 0.0, **overrides: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        obs={"state": np.full(2, k, np.float32)},
        action=np.zeros(1, np.float32),
        reward=0.0,
        terminated=False,
        truncated=False,
        next_obs={"state": np.full(2, k + 1, np.float32)},
    )
    fields.update(overrides)
    return fields


def test_stream_refuses_steps_after_the_end_and_changed_fields(tmp_path: Path) -> None:
    with EpisodeWriter(tmp_path / "s.hdf5", ENV_ARGS) as w:
        h = w.begin_episode()
        with pytest.raises(RuntimeError, match="still open"):
            w.begin_episode()
        h.append(**step(0, obs={"state": np.zeros(3, np.float32)}, next_obs={"state": np.zeros(3, np.float32)}))
        with pytest.raises(ValueError, match=r"obs/state was float32\[3\]"):
            h.append(**step(1))
        with pytest.raises(TypeError, match="terminated must be a bool"):
            h.append(**step(1, terminated=1))
        with pytest.raises(TypeError, match="reward must be a real number"):
            h.append(**step(1, reward="1"))
        with pytest.raises(ValueError, match="action"):
            h.append(**step(1, action=np.full(1, np.nan, np.float32)))
        h.append(**step(1, obs={"state": np.zeros(3)}, next_obs={"state": np.zeros(3)}, terminated=True, reward=1))
        with pytest.raises(RuntimeError, match="call end"):
            h.append(**step(2))
        assert h.end() == 2
        with pytest.raises(RuntimeError, match="has ended"):
            h.append(**step(3))
    (ep,) = read_episodes(tmp_path / "s.hdf5")
    assert ep.success and ep.obs["state"].dtype == np.float32


def test_empty_stream_leaves_no_demo(tmp_path: Path) -> None:
    path = tmp_path / "s.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        assert w.begin_episode({"note": "operator quit"}).end() == 0
        assert w.add_episode(make_episode(2)) == 1
    with h5py.File(path, "r") as f:
        assert list(f["data"]) == ["demo_1"]


def test_stream_left_open_or_failing_is_sealed_as_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "s.hdf5"
    with (
        pytest.raises(KeyboardInterrupt),
        EpisodeWriter(path, ENV_ARGS, flush_every=100) as w,
        w.begin_episode() as h,
    ):
        h.append(**step(0))
        raise KeyboardInterrupt
    with EpisodeWriter(path, ENV_ARGS, mode="a") as w:
        # Never ended: the writer closes with the stream still open.
        w.begin_episode().append(**step(0))
    got = read_episodes(path)
    assert [len(e) for e in got] == [1, 1]
    assert all(e.attrs["interrupted"] is True for e in got)
    with h5py.File(path, "r") as f:
        assert all("num_samples" in f["data"][d].attrs for d in f["data"])


# ----------------------------------------------------------------------------------------------------------
# Episode validation
# ----------------------------------------------------------------------------------------------------------


def test_a_fault_is_recorded_with_the_command_of_the_step_it_cut_short_and_no_row_for_that_step(tmp_path: Path):
    path = tmp_path / "s.hdf5"
    fault = EpisodeFault.from_error(
        RuntimeError("camera front: no frame within 0.5 s"),
        during="step",
        step=3,
        action=np.full(1, 0.25, np.float32),
        command=[0.4, 0.0, 0.3, 1.0, 0.0, 0.0, 0.0],
    )
    with EpisodeWriter(path, ENV_ARGS, flush_every=2) as w, w.begin_episode({"kind": "online"}) as h:
        for k in range(3):
            h.append(**step(k))
        assert h.end(fault=fault) == 3
    (ep,) = read_episodes(path)
    assert len(ep) == 3 and ep.attrs["interrupted"] is True and ep.attrs["kind"] == "online"
    assert ep.fault == fault and fault.action == (0.25,) and fault.command[3] == 1.0
    assert fault.describe() == "faulted in step 3: RuntimeError: camera front: no frame within 0.5 s"
    # The cut step is in no dataset: every transition has its next observation, none is the faulted step's.
    flat = episodes_to_transitions([ep])
    assert len(flat["actions"]) == 3 and not np.any(flat["actions"] == 0.25)
    assert read_episodes_without_steps(path) == []
    with h5py.File(path, "r") as f:
        assert f["data/demo_0"].attrs["num_samples"] == 3 and "episodes_without_steps" not in f


def test_an_episode_that_faults_before_its_first_step_keeps_its_record_outside_the_demos(tmp_path: Path) -> None:
    path = tmp_path / "s.hdf5"
    fault = EpisodeFault.from_error(
        RuntimeError("cartesian reflex"), during="reset", step=0, command=[0.4, 0.0, 0.3, 1.0, 0.0, 0.0, 0.0]
    )
    with EpisodeWriter(path, ENV_ARGS) as w:
        assert w.begin_episode({"kind": "online", "seed": 7}).end(fault=fault) == 0
    assert read_episodes(path) == []  # no empty demo for any reader to trip over
    (attrs,) = read_episodes_without_steps(path)
    assert attrs["kind"] == "online" and attrs["seed"] == 7 and attrs["interrupted"] is True
    assert fault_of(attrs) == fault and fault.action is None
    assert fault.describe() == "faulted at reset: RuntimeError: cartesian reflex"
    with h5py.File(path, "r") as f:
        assert list(f["data"]) == [] and f["data"].attrs["total"] == 0
        assert list(f["episodes_without_steps"]) == ["demo_0"]
    # Appending numbers after it, and a plain empty episode still leaves nothing.
    with EpisodeWriter(path, ENV_ARGS, mode="a") as w:
        assert w.begin_episode().end(interrupted=True) == 0
        assert w.add_episode(make_episode(2)) == 2
    assert [len(e) for e in read_episodes(path)] == [2]
    assert len(read_episodes_without_steps(path)) == 1


def test_a_fault_record_is_strict_json_and_keeps_non_finite_numbers() -> None:
    fault = EpisodeFault(
        during="step", step=3, error="CameraError", message="m", action=(float("nan"), float("inf"), -float("inf"), 0.5)
    )

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    text = fault.to_attr()
    assert json.loads(text, parse_constant=refuse)["action"] == ["NaN", "Infinity", "-Infinity", 0.5]
    back = fault_of({"fault": text})
    assert back is not None and back.command is None and back.action is not None
    assert np.isnan(back.action[0]) and back.action[1:] == (float("inf"), -float("inf"), 0.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"during": "move"}, "during must be 'reset' or 'step'"),
        ({"step": -1}, "step must be an int >= 0"),
        ({"command": ["x", 0.0]}, "command must be a vector of numbers"),
        ({"action": [[0.0]]}, "action must be a vector of numbers"),
    ],
)
def test_a_fault_record_refuses(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"during": "step", "step": 0, "error": "CameraError", "message": "m"}
    with pytest.raises(ValueError, match=re.escape(message)):
        EpisodeFault(**{**base, **fields})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attr 'fault' is not a fault record"):
        fault_of({"fault": json.dumps({"during": "step"})})


def with_fields(**changes: object) -> Callable[[], Episode]:
    def build() -> Episode:
        ep = make_episode(4)
        fields = {name: getattr(ep, name) for name in ("obs", "next_obs", "actions", "rewards")}
        fields.update(terminated=ep.terminated, truncated=ep.truncated, extras=ep.extras, attrs=ep.attrs)
        fields.update(changes)
        return Episode(**fields)  # type: ignore[arg-type]

    return build


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (with_fields(rewards=np.zeros(5, np.float32)), "every array needs 4 steps"),
        (with_fields(extras={"q": np.zeros(3)}), "extras/q"),
        (
            with_fields(
                obs={"s": np.zeros((0, 2))},
                next_obs={"s": np.zeros((0, 2))},
                actions=np.zeros((0, 1)),
                rewards=np.zeros(0),
                terminated=np.zeros(0, bool),
                truncated=np.zeros(0, bool),
                extras={},
            ),
            "at least one step",
        ),
        (with_fields(actions=np.full((4, 6), np.inf)), "actions has a non-finite value"),
        (with_fields(rewards=np.array([0, np.nan, 0, 0])), "rewards has a non-finite value"),
        (with_fields(actions=np.zeros((4, 6), np.int64)), "actions must be floating point"),
        (with_fields(actions=np.zeros(4)), "actions must have 2 dimension"),
        (with_fields(terminated=np.array([1, 0, 0, 0])), "terminated must be bool"),
        (with_fields(terminated=np.array([True, False, False, True])), "terminated is set at step 0"),
        (with_fields(truncated=np.array([False, False, True, False])), "truncated is set at step 2"),
        (with_fields(next_obs={"state": np.zeros((4, 7), np.float32)}), "next_obs keys"),
        (
            with_fields(obs={"state": np.zeros((4, 7)), "front": np.zeros((4, 8, 8, 3), np.uint8)}),
            "obs/state is",
        ),
        (with_fields(obs={"a/b": np.zeros((4, 1))}), "'a/b'"),
        (
            with_fields(obs={"state": np.full((4, 7), "x"), "front": np.zeros((4, 8, 8, 3))}),
            "numeric or bool",
        ),
        (with_fields(attrs={"num_samples": 3}), "set by the writer"),
        (with_fields(attrs={"pose": [1, 2]}), "must be str, int, float or bool"),
    ],
)
def test_episode_refuses(build: Callable[[], Episode], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_episode_accepts_nan_extras_and_converts() -> None:
    ep = with_fields(actions=np.zeros((4, 6)), extras={"q_rl": np.full(4, np.nan)}, attrs={"v": np.int64(3)})()
    assert ep.actions.dtype == np.float32 and ep.attrs == {"v": 3} and type(ep.attrs["v"]) is int
    assert "T=4" in repr(ep)


def test_episodes_to_transitions() -> None:
    episodes = [make_episode(3, seed=0), make_episode(2, end="truncated", seed=1)]
    flat = episodes_to_transitions(episodes)
    expected = {"obs/state", "obs/front", "next_obs/state", "next_obs/front", "actions", "rewards"}
    expected |= {"terminated", "truncated", "episode_index", "step_index"}
    expected |= {f"extras/{k}" for k in episodes[0].extras}
    assert set(flat) == expected
    assert flat["obs/front"].shape == (5, 8, 8, 3) and flat["obs/front"].dtype == np.uint8
    np.testing.assert_array_equal(flat["actions"], np.concatenate([e.actions for e in episodes]))
    np.testing.assert_array_equal(flat["next_obs/state"][3:], episodes[1].next_obs["state"])
    np.testing.assert_array_equal(flat["episode_index"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(flat["step_index"], [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="at least one"):
        episodes_to_transitions([])
    other = make_episode(2)
    other.extras = {}
    with pytest.raises(ValueError, match="episode 1 has fields"):
        episodes_to_transitions([episodes[0], other])


# ----------------------------------------------------------------------------------------------------------
# Files that cannot be read: EpisodeFileError naming the file and the problem
# ----------------------------------------------------------------------------------------------------------


def good_file(path: Path) -> None:
    with EpisodeWriter(path, ENV_ARGS) as w:
        w.add_episode(make_episode(5))


def edit(change: Callable[[h5py.Group], None]) -> Callable[[Path], None]:
    """A valid file, then `change` applied to its demo_0 group."""

    def build(path: Path) -> None:
        good_file(path)
        with h5py.File(path, "a") as f:
            change(f["data/demo_0"])

    return build


def replace(name: str, value: np.ndarray) -> Callable[[h5py.Group], None]:
    def change(demo: h5py.Group) -> None:
        if name in demo:
            del demo[name]
        demo[name] = value

    return change


def set_value(name: str, index: tuple[int, ...], value: float) -> Callable[[h5py.Group], None]:
    def change(demo: h5py.Group) -> None:
        arr = demo[name][()]
        arr[index] = value
        demo[name][...] = arr

    return change


def delete(*names: str) -> Callable[[h5py.Group], None]:
    def change(demo: h5py.Group) -> None:
        for name in names:
            del demo[name]

    return change


def no_data_group(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_group("episodes")


def bare_data_group(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_group("data")


def broken_env_args(path: Path) -> None:
    good_file(path)
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = "{oops"


def stray_member(path: Path) -> None:
    good_file(path)
    with h5py.File(path, "a") as f:
        f["data"].create_group("mask")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"hello, not hdf5"), "not an HDF5 file"),
        (lambda p: p.mkdir(), "is a directory"),
        (no_data_group, "no 'data' group"),
        (stray_member, "not demo_<i> groups: ['mask']"),
        (edit(delete("actions")), "demo_0: missing the 'actions' dataset"),
        (edit(delete("rewards")), "missing the 'rewards' dataset"),
        (edit(delete("obs")), "missing the 'obs' group"),
        (edit(delete("next_obs")), "missing the 'next_obs' group"),
        (edit(delete("terminated", "dones")), "missing both 'terminated' and 'dones'"),
        (edit(replace("rewards", np.zeros(7, np.float32))), "num_samples is 5 but these datasets differ"),
        (edit(replace("obs/front", np.zeros((4, 8, 8, 3), np.uint8))), "'obs/front': 4"),
        (
            edit(set_value("actions", (2, 1), np.nan)),
            "actions has a non-finite value (first at index (2, 1))",
        ),
        (edit(set_value("obs/state", (0, 0), np.inf)), "obs/state has a non-finite value"),
        (edit(set_value("rewards", (1,), -np.inf)), "rewards has a non-finite value"),
        (edit(replace("actions", np.zeros((5, 6), np.int32))), "actions must be floating point"),
        (edit(replace("terminated", np.zeros(5, np.float32))), "terminated must be bool"),
        (edit(replace("obs/state", np.array([b"abc"] * 5))), "obs/state must be numeric or bool"),
        (edit(replace("dones", np.array(["x"] * 5, dtype="S1"))), "dones must be numeric"),
        (edit(replace("dones", np.zeros(5, np.int64))), "dones disagrees with terminated | truncated"),
        (edit(replace("terminated", np.array([1, 0, 0, 0, 1], bool))), "terminated is set at step 0"),
        (edit(replace("surprise", np.zeros(5))), "unexpected datasets ['surprise']"),
    ],
)
def test_unreadable_files_raise_episode_file_error(tmp_path: Path, build: Callable[[Path], None], message: str) -> None:
    path = tmp_path / "bad.hdf5"
    build(path)
    with pytest.raises(EpisodeFileError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        read_episodes(path)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: None, "no such file"),
        (no_data_group, "no 'data' group"),
        (bare_data_group, "no env_args attribute"),
        (broken_env_args, "not valid JSON"),
    ],
)
def test_unreadable_env_args(tmp_path: Path, build: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "bad.hdf5"
    build(path)
    with pytest.raises(EpisodeFileError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        read_env_args(path)


def test_foreign_robomimic_file_without_our_flags_reads_dones_as_terminal(tmp_path: Path) -> None:
    path = tmp_path / "robomimic.hdf5"
    good_file(path)
    with h5py.File(path, "a") as f:
        for name in ("terminated", "truncated", "extras"):
            del f["data/demo_0"][name]
    (ep,) = read_episodes(path)
    assert bool(ep.terminated[-1]) and not ep.truncated.any()


def robomimic_file(path: Path, lengths: tuple[int, ...], *, next_obs: bool = True) -> None:
    """Demos as robomimic's own tools write them: float64 arrays, `states` and `action_dict/...` next to the
    observations, dones set on every step from the success on, no terminated/truncated of ours."""
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        data.attrs["total"] = sum(lengths)
        for i, steps in enumerate(lengths):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = steps
            demo.attrs["model_file"] = "<mujoco/>"
            pose = rng.normal(size=(steps + 1, 6))
            demo["obs/ee_pose"] = pose[:-1]
            if next_obs:
                demo["next_obs/ee_pose"] = pose[1:]
            demo["actions"] = rng.uniform(-1, 1, size=(steps, 6))
            demo["action_dict/abs_pos"] = rng.normal(size=(steps, 3))
            demo["states"] = rng.normal(size=(steps, 32))
            success = np.arange(steps) >= steps - 3 if steps else np.zeros(0, bool)
            demo["rewards"] = success.astype(np.float64)
            demo["dones"] = success.astype(np.int64)
        f.create_group("mask").create_dataset("train", data=np.array([b"demo_0"]))


def test_a_robomimic_file_with_its_own_members_reads_with_one_note_per_kind(tmp_path: Path) -> None:
    path = tmp_path / "robomimic.hdf5"
    robomimic_file(path, (7, 0, 5))
    notes: list[str] = []
    got = read_episodes(path, warn=notes.append)
    assert [len(ep) for ep in got] == [7, 5]
    for ep in got:
        assert ep.actions.dtype == np.float32 and set(ep.obs) == set(ep.next_obs) == {"ee_pose"}
        assert ep.terminated.tolist() == [False] * (len(ep) - 1) + [True] and not ep.truncated.any()
        assert ep.success and ep.extras == {}
    assert len(notes) == 3 and all(n.startswith(f"{path}: ") for n in notes)
    text = "\n".join(notes)
    assert "ignored datasets robot_rl does not use: ['action_dict/abs_pos', 'states'] (demo_0, demo_2)" in text
    assert "dones set before the last step" in text and "skipped demos with no steps (demo_1)" in text


def test_a_robomimic_file_without_next_obs_takes_it_from_the_following_step(tmp_path: Path) -> None:
    path = tmp_path / "robomimic.hdf5"
    robomimic_file(path, (4,), next_obs=False)
    notes: list[str] = []
    (ep,) = read_episodes(path, warn=notes.append)
    np.testing.assert_array_equal(ep.next_obs["ee_pose"][:-1], ep.obs["ee_pose"][1:])
    np.testing.assert_array_equal(ep.next_obs["ee_pose"][-1], ep.obs["ee_pose"][-1])
    assert any("no next_obs: each step's next_obs taken from the following step's obs" in n for n in notes)
    with h5py.File(path, "a") as f:  # a writer that died before sealing: still read, still without next_obs
        del f["data/demo_0"].attrs["num_samples"]
    (cut,) = read_episodes(path, warn=notes.append)
    assert len(cut) == 4 and cut.attrs["interrupted"] is True


def test_a_file_another_process_is_writing_is_refused_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "recording.hdf5"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, h5py
            f = h5py.File({str(path)!r}, "w")
            f.create_group("data")
            f.flush()
            print("open", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(EpisodeFileError, match="another process has it open for writing"):
            read_episodes(path)
    finally:
        writer.communicate("", timeout=30)
    assert read_episodes(path) == []


def test_a_damaged_chunk_is_an_episode_file_error_naming_the_dataset(tmp_path: Path) -> None:
    """HDF5 meets a damaged compressed chunk only when reading it: that OSError used to escape as a traceback."""
    path = tmp_path / "damaged.hdf5"
    good_file(path)
    with h5py.File(path, "a") as f:
        demo = f["data/demo_0"]
        rewards = demo["rewards"][()]
        del demo["rewards"]
        demo.create_dataset("rewards", data=rewards, compression="gzip", chunks=(len(rewards),))
        offset = demo["rewards"].id.get_chunk_info(0).byte_offset
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)
    message = f"{path}: demo_0: rewards cannot be read, the file is damaged"
    with pytest.raises(EpisodeFileError, match=re.escape(message)):
        read_episodes(path)


def test_a_damaged_file_is_refused_naming_it_whatever_part_of_it_is_damaged(tmp_path: Path) -> None:
    """Bits flipped anywhere in a log (its structure, attributes or data): every read either gives the episodes or
    an EpisodeFileError naming the file, never HDF5's own error from deep inside a read."""
    path = tmp_path / "log.hdf5"
    with EpisodeWriter(path, ENV_ARGS) as w:
        for i in range(2):
            w.add_episode(make_episode(8, seed=i))
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.hdf5"
    said: list[str] = []
    for offset in rng.integers(0, len(original), 300):
        data = bytearray(original)
        data[offset] ^= 1 << int(rng.integers(0, 8))
        damaged.write_bytes(bytes(data))
        try:
            read_episodes(damaged, warn=lambda line: None)
        except EpisodeFileError as err:
            assert str(err).startswith(str(damaged)), err
            said.append(str(err))
    assert any(": damaged, cannot be read (" in line for line in said), said  # reads deep inside the file failed too
