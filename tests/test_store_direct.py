"""The transition log written with O_DIRECT: the same bytes as through the page cache, and the same recovery."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from learner import store as store_module
from learner.store import StoredChunk, StoreError, TransitionStore, encode_payload


def _chunk(first: int, count: int, width: int) -> StoredChunk:
    """A chunk of `count` transitions with observations `width` floats wide (sizes that end mid-block)."""
    seq = np.arange(first, first + count, dtype=np.float32)
    obs = (np.sin(seq[:, None] + np.arange(width)) * 0.01).astype(np.float32)
    actions = np.tanh(np.cos(seq[:, None] + np.arange(7))).astype(np.float32)
    arrays = {
        "obs/state": obs,
        "next_obs/state": obs + 0.5,
        "actions": actions,
        "bc_actions": actions.copy(),
        "rewards": seq * 0.25,
        "terminated": np.zeros(count, bool),
        "truncated": np.zeros(count, bool),
        "weights_version": np.full(count, first, np.int64),
    }
    return StoredChunk("arm", "r0", first, arrays, online=first % 2 == 1)


def _direct_works(directory: Path) -> bool:
    return store_module._direct_io_refused(directory) is None


def _write(directory: Path, direct: bool, plan: list[list[tuple[int, int, int]]]) -> bytes:
    """Write `plan` (stores opened in turn, each appending chunks (first, count, width)) and return the log's bytes."""
    for session in plan:
        with TransitionStore(directory, direct=direct) as store:
            for first, count, width in session:
                store.append(_chunk(first, count, width))
                if count % 3 == 0:
                    store.sync()  # some records in groups of their own, others queued together
            store.sync()
            assert store.direct is direct
    return (directory / "arm@r0.log").read_bytes()


def test_direct_writes_the_same_log_as_the_page_cache_across_groups_reopens_and_a_small_staging_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    # Three blocks of staging: the 7,000-byte observations make records that do not fit and go out in pieces.
    monkeypatch.setattr(store_module, "STAGING_BYTES", 3 * store_module.BLOCK)
    plan = [
        [(0, 3, 5), (3, 2, 11), (5, 1, 3)],
        [(6, 4, 1750), (10, 3, 2)],  # reopened: the file's partial last block is read and written again
        [(13, 5, 7), (18, 6, 300)],
    ]
    (tmp_path / "cached").mkdir()
    (tmp_path / "direct").mkdir()
    cached = _write(tmp_path / "cached", False, plan)
    direct = _write(tmp_path / "direct", True, plan)
    assert len(direct) % store_module.BLOCK != 0  # the file is cut back to its true length, not left padded
    assert direct == cached
    expected = [_chunk(first, count, width) for session in plan for first, count, width in session]
    assert len(direct) == sum(store_module.HEADER.size + len(encode_payload(c)) for c in expected)
    chunks = TransitionStore(tmp_path / "direct").read_back()
    assert [(c.first_seq, c.count, c.online) for c in chunks] == [(c.first_seq, c.count, c.online) for c in expected]
    for got, want in zip(chunks, expected, strict=True):
        for name, array in want.arrays.items():
            np.testing.assert_array_equal(got.arrays[name], array)


def test_zeros_after_the_last_record_are_cut_as_a_torn_tail_and_the_log_goes_on(tmp_path: Path, caplog) -> None:
    """What a crash between a padded O_DIRECT write and the cut back to the true length leaves behind."""
    direct = _direct_works(tmp_path)
    with TransitionStore(tmp_path, direct=direct) as store:
        store.append(_chunk(0, 4, 9))
        store.append(_chunk(4, 4, 9))
    path = tmp_path / "arm@r0.log"
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(store_module.BLOCK - size % store_module.BLOCK))
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    assert [c.first_seq for c in TransitionStore(tmp_path).read_back()] == [0, 4]
    assert "torn or corrupt tail" in caplog.text and path.stat().st_size == size
    with TransitionStore(tmp_path, direct=direct) as store:
        store.append(_chunk(8, 2, 9))
    assert [c.first_seq for c in TransitionStore(tmp_path).read_back()] == [0, 4, 8]


def test_a_file_system_without_o_direct_is_written_through_the_page_cache_unless_direct_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[Path] = []

    def refused(directory: Path) -> str:
        probed.append(directory)
        return "Invalid argument"

    monkeypatch.setattr(store_module, "_direct_io_refused", refused)
    with TransitionStore(tmp_path / "auto") as store:
        store.append(_chunk(0, 2, 3))
        store.sync()
        assert not store.direct
    assert probed == [tmp_path / "auto"]
    assert [c.first_seq for c in TransitionStore(tmp_path / "auto").read_back()] == [0]
    required = TransitionStore(tmp_path / "required", direct=True)
    with pytest.raises(StoreError, match="O_DIRECT: Invalid argument"):
        required.append(_chunk(0, 2, 3))
    required.close()
    assert not (tmp_path / "required" / "arm@r0.log").exists()


def test_the_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    reason = store_module._direct_io_refused(tmp_path)
    assert reason is None or (isinstance(reason, str) and reason)
    assert list(tmp_path.iterdir()) == []


def test_a_probe_file_left_by_a_killed_process_does_not_turn_o_direct_off(tmp_path: Path) -> None:
    if not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    import threading

    stale = tmp_path / f".direct-probe-{os.getpid()}-{threading.get_ident()}"
    stale.write_bytes(b"left behind")
    assert store_module._direct_io_refused(tmp_path) is None
    assert not stale.exists()
