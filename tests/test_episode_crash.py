"""Episode logs stay readable when the actor dies mid-episode (robot_rl/episodes.py's crash guarantee).

Each test runs a real writer in a child process (EpisodeWriter.begin_episode -> EpisodeStream.append/flush),
waits until the child says how far it got, ends it (SIGKILL, SIGTERM, SIGINT, or a SIGKILL from inside a flush)
and reads the file back: exactly the flushed steps, every value and per-step extra as written, the cut episode
marked `interrupted`, and the file still appendable (which seals the cut demo for robomimic).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from robot_rl.episodes import EpisodeWriter, read_env_args, read_episodes

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 30.0

# The child's steps are a function of (global step k, step t in its episode), so the parent can check every value.
CHILD_COMMON = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    from robot_rl.episodes import EpisodeWriter

    # A child started from a background job inherits SIGINT ignored; Ctrl-C must raise KeyboardInterrupt here.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    ENV_ARGS = {"env_name": "PegInsertion", "type": 4, "env_kwargs": {}}

    def say(*words):
        print(*words, flush=True)

    def append(h, k, t, last=False):
        image = np.full((12, 16, 3), k % 256, np.uint8)
        h.append(
            obs={"state": np.full(7, k, np.float32), "front": image},
            action=np.full(6, t / 100, np.float32),
            reward=1.0 if last else 0.0,
            terminated=last,
            truncated=False,
            next_obs={"state": np.full(7, k + 1, np.float32), "front": image},
            extras={
                "q_bc": np.float32(t + 0.5),
                "q_rl": np.float32(-t),
                "used_bc": np.bool_(t % 3 == 0),
                "command": np.full(7, k / 1000, np.float64),
                "weights_version": np.int64(k // 4),
            },
        )
    """
)

# One complete episode of 5 steps, then a live one: APPENDED steps with flush_every=FLUSH_EVERY; then wait.
CHILD_MID_EPISODE = CHILD_COMMON + textwrap.dedent(
    """
    path, appended, flush_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with EpisodeWriter(path, ENV_ARGS, flush_every=flush_every) as w:
        with w.begin_episode({"phase": "online", "episode": 0}) as h:
            for t in range(5):
                append(h, t, t, last=t == 4)
            h.end()
        with w.begin_episode({"phase": "online", "episode": 1}) as h:
            for t in range(appended):
                append(h, 5 + t, t)
            say("ready", h.num_steps)
            time.sleep(60)
    """
)

# Killed from inside the writer: SIGKILL to itself at the `at`-th call of `where` during the second flush.
CHILD_KILLED_IN_FLUSH = CHILD_COMMON + textwrap.dedent(
    """
    import h5py
    import robot_rl.episodes as episodes

    path, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = {"flushes": 0, "n": 0}

    def killer(original):
        def call(*args, **kwargs):
            if calls["flushes"] == 2:
                if calls["n"] == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls["n"] += 1
            return original(*args, **kwargs)
        return call

    original_flush = episodes.EpisodeStream.flush
    def flush(self):
        calls["flushes"] += 1
        return original_flush(self)
    episodes.EpisodeStream.flush = flush
    if where == "write":
        h5py.Dataset.__setitem__ = killer(h5py.Dataset.__setitem__)
    elif where == "resize":
        h5py.Dataset.resize = killer(h5py.Dataset.resize)
    elif where == "file_flush":
        episodes.EpisodeWriter._flush = killer(episodes.EpisodeWriter._flush)
    w = EpisodeWriter(path, ENV_ARGS, flush_every=4)
    h = w.begin_episode({"phase": "online"})
    for t in range(12):
        append(h, t, t)
    say("not killed")
    """
)

# Streams forever, one flush per step (the worst case for a kill landing inside HDF5's own flush).
CHILD_FOREVER = CHILD_COMMON + textwrap.dedent(
    """
    path = sys.argv[1]
    w = EpisodeWriter(path, ENV_ARGS, flush_every=1)
    k = 0
    while True:
        h = w.begin_episode({"phase": "online"})
        for t in range(40):
            append(h, k, t)
            if k == 0:
                say("ready", 1)
            k += 1
        h.end()
    """
)


def start_child(script: str, *args: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


def wait_for_ready(proc: subprocess.Popen[bytes]) -> int:
    """Blocks until the child prints `ready <steps>`; returns the steps it appended."""
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"ready"):
        proc.kill()
        proc.wait()
        pytest.fail(f"child did not get ready: {line!r} {proc.stderr.read().decode()}")
    return int(line.split()[1])


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


def assert_steps_as_written(ep, first_k: int) -> None:
    """Every row of a streamed episode holds what the child wrote for it (no zero-filled or shifted rows)."""
    steps = len(ep)
    k = np.arange(first_k, first_k + steps)
    t = np.arange(steps)
    np.testing.assert_array_equal(ep.obs["state"], np.repeat(k[:, None], 7, axis=1).astype(np.float32))
    np.testing.assert_array_equal(ep.next_obs["state"][:, 0], (k + 1).astype(np.float32))
    assert ep.obs["front"].shape == (steps, 12, 16, 3) and ep.obs["front"].dtype == np.uint8
    np.testing.assert_array_equal(
        ep.obs["front"], np.broadcast_to((k % 256).astype(np.uint8)[:, None, None, None], ep.obs["front"].shape)
    )
    np.testing.assert_array_equal(ep.actions, np.repeat((t / 100)[:, None], 6, axis=1).astype(np.float32))
    extras = ep.extras
    assert set(extras) == {"q_bc", "q_rl", "used_bc", "command", "weights_version"}
    assert extras["q_bc"].dtype == np.float32 and extras["used_bc"].dtype == np.bool_
    assert extras["command"].dtype == np.float64 and extras["weights_version"].dtype == np.int64
    np.testing.assert_array_equal(extras["q_bc"], (t + 0.5).astype(np.float32))
    np.testing.assert_array_equal(extras["q_rl"], (-t).astype(np.float32))
    np.testing.assert_array_equal(extras["used_bc"], t % 3 == 0)
    np.testing.assert_array_equal(extras["command"], np.repeat((k / 1000)[:, None], 7, axis=1))
    np.testing.assert_array_equal(extras["weights_version"], k // 4)


def assert_sealed_on_append(path: Path, lengths: list[int]) -> None:
    """Appending seals a cut demo (num_samples = its flushed length) and the file reads the same afterwards."""
    with EpisodeWriter(path, read_env_args(path), mode="a"):
        pass
    with h5py.File(path, "r") as f:
        demos = sorted(f["data"], key=lambda n: int(n.split("_")[1]))
        assert [int(f["data"][d].attrs["num_samples"]) for d in demos] == lengths
        assert int(f["data"].attrs["total"]) == sum(lengths)
    assert [len(e) for e in read_episodes(path)] == lengths


# ----------------------------------------------------------------------------------------------------------------------
# Killed between flushes: everything up to the last flush
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("appended", "flush_every"), [(10, 4), (8, 4), (3, 4), (7, 1)])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_writer_keeps_exactly_the_flushed_steps(tmp_path: Path, sig: int, appended: int, flush_every: int):
    path = tmp_path / "log.hdf5"
    proc = start_child(CHILD_MID_EPISODE, path, appended, flush_every)
    assert wait_for_ready(proc) == appended
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == -sig, err
    flushed = appended - appended % flush_every  # the steps after the last automatic flush die with the process

    episodes = read_episodes(path)
    complete = episodes[0]
    assert len(complete) == 5 and complete.success
    assert complete.attrs == {"phase": "online", "episode": 0}  # not interrupted
    assert_steps_as_written(complete, 0)
    if flushed == 0:
        # Nothing of the live episode reached the file: no empty demo is reported.
        assert len(episodes) == 1
        assert_sealed_on_append(path, [5])
        return
    cut = episodes[1]
    assert len(cut) == flushed
    assert cut.attrs == {"phase": "online", "episode": 1, "interrupted": True}
    assert not cut.terminated.any() and not cut.truncated.any()
    assert_steps_as_written(cut, 5)
    assert_sealed_on_append(path, [5, flushed])


def test_ctrl_c_ends_the_episode_with_every_appended_step(tmp_path: Path) -> None:
    """SIGINT raises KeyboardInterrupt in the child: the stream's `with` block flushes the pending steps too and
    seals the demo (num_samples set), marked interrupted."""
    path = tmp_path / "log.hdf5"
    proc = start_child(CHILD_MID_EPISODE, path, 10, 4)
    assert wait_for_ready(proc) == 10
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code != 0 and "KeyboardInterrupt" in err
    complete, cut = read_episodes(path)
    assert len(complete) == 5 and "interrupted" not in complete.attrs
    assert len(cut) == 10  # the 2 steps after the last automatic flush were flushed on the way out
    assert cut.attrs == {"phase": "online", "episode": 1, "interrupted": True}
    assert_steps_as_written(cut, 5)
    with h5py.File(path, "r") as f:
        assert int(f["data/demo_1"].attrs["num_samples"]) == 10  # sealed by the child itself
        assert int(f["data"].attrs["total"]) == 15


# ----------------------------------------------------------------------------------------------------------------------
# Killed inside a flush
# ----------------------------------------------------------------------------------------------------------------------
# The live episode's datasets: obs/state, obs/front, next_obs x2, actions, rewards, terminated, truncated, 5 extras,
# dones = 14. The second flush (steps 4..7) resizes and writes each in turn, then flushes the file.
@pytest.mark.parametrize(
    ("where", "at"),
    [("resize", 0), ("resize", 7), ("write", 0), ("write", 7), ("write", 13), ("file_flush", 0)],
)
def test_writer_killed_inside_a_flush_keeps_the_previous_flush(tmp_path: Path, where: str, at: int) -> None:
    """Datasets resized or written but the file not yet flushed: the reader gets the previous flush's 4 steps,
    intact; nothing half-written shows."""
    path = tmp_path / "log.hdf5"
    proc = start_child(CHILD_KILLED_IN_FLUSH, path, where, at)
    code, err = finish(proc)
    assert code == -signal.SIGKILL, err
    (cut,) = read_episodes(path)
    assert len(cut) == 4
    assert cut.attrs == {"phase": "online", "interrupted": True}
    assert_steps_as_written(cut, 0)
    assert_sealed_on_append(path, [4])


def test_writer_killed_at_random_moments_leaves_a_consistent_file(tmp_path: Path) -> None:
    """One flush per step, killed at moments spread over a second of writing (so some kills land inside HDF5's own
    flush): every time the file reads, its episodes are whole rows as written, and it can be appended to."""
    for i, delay in enumerate([0.0, 0.07, 0.19, 0.33, 0.52]):
        path = tmp_path / f"log{i}.hdf5"
        proc = start_child(CHILD_FOREVER, path)
        wait_for_ready(proc)
        time.sleep(delay)
        proc.kill()
        code, err = finish(proc)
        assert code == -signal.SIGKILL, err
        episodes = read_episodes(path)
        assert episodes, "at least the first step was flushed before the child said ready"
        k = 0
        for ep in episodes[:-1]:
            assert len(ep) == 40 and "interrupted" not in ep.attrs
            assert_steps_as_written(ep, k)
            k += 40
        last = episodes[-1]
        assert 1 <= len(last) <= 40
        assert_steps_as_written(last, k)
        assert last.attrs.get("interrupted") is True or len(last) == 40
        assert_sealed_on_append(path, [len(e) for e in episodes])
