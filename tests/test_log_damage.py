"""Damage in the learner's transition log and in the actor's spill: a torn tail is cut, damage in the middle is taken
out without losing an intact record, the original is kept beside the file, and the loss is said and counted."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_store_direct import _chunk as store_chunk

from learner.store import CRC32_HEADER, CRC32_MAGIC, StoredChunk, TransitionStore, encode_payload, encode_record
from robot_rl.actor.spill import Spill

PER_CHUNK = 30


def _chunk(first: int) -> StoredChunk:
    """A chunk of PER_CHUNK transitions of stream arm@r0 whose values follow from `first` (test_store_direct's)."""
    return store_chunk(first, PER_CHUNK, 9)


def _write_log(directory: Path, records: int) -> tuple[Path, list[bytes]]:
    """A log of `records` chunks of PER_CHUNK transitions; its path and each record's bytes."""
    with TransitionStore(directory, direct=False) as store:
        for i in range(records):
            store.append(_chunk(i * PER_CHUNK))
    path = directory / "arm@r0.log"
    expected = [encode_record(_chunk(i * PER_CHUNK)) for i in range(records)]
    assert path.read_bytes() == b"".join(expected)
    return path, expected


def _seqs(chunks: list[StoredChunk]) -> list[int]:
    return [c.first_seq for c in chunks]


def _copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


@pytest.mark.parametrize("bad", [0, 4, 16])
def test_damage_in_the_middle_of_the_learner_log_keeps_every_intact_record_and_says_what_was_lost(
    tmp_path: Path, caplog, bad: int
) -> None:
    path, records = _write_log(tmp_path, 18)
    start = sum(len(r) for r in records[:bad])
    damaged = bytearray(path.read_bytes())
    for i in range(40):  # 40 flipped bytes inside record `bad`
        damaged[start + 100 + i] ^= 0x5A
    path.write_bytes(bytes(damaged))
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    store = TransitionStore(tmp_path)
    chunks = store.read_back()
    assert _seqs(chunks) == [i * PER_CHUNK for i in range(18) if i != bad]
    for got in chunks:
        np.testing.assert_array_equal(got.arrays["actions"], _chunk(got.first_seq).arrays["actions"])
    # The log is now its intact records, byte for byte; the original damaged file is kept beside it.
    assert path.read_bytes() == b"".join(r for i, r in enumerate(records) if i != bad)
    (copy,) = _copies(path)
    assert copy.read_bytes() == bytes(damaged) and store.damaged_copies == [copy]
    assert (store.damaged_records, store.lost_transitions, store.cut_transitions) == (1, PER_CHUNK, 0)
    assert store.gaps == [("arm", "r0", bad * PER_CHUNK, bad * PER_CHUNK + PER_CHUNK - 1)]
    lost = f"transitions {bad * PER_CHUNK}..{bad * PER_CHUNK + PER_CHUNK - 1} ({PER_CHUNK}) are lost"
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert str(path) in message and f"damaged bytes {start}.." in message and lost in message
    assert f"{bad} records before and {17 - bad} after are kept" in message and str(copy) in message
    assert "cutting a torn" not in caplog.text
    # Read again: whole, nothing more to repair (the hole in the stream is still said); the log goes on after it.
    caplog.clear()
    again = TransitionStore(tmp_path)
    assert _seqs(again.read_back()) == _seqs(chunks) and again.damaged_records == again.lost_transitions == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: transitions {bad * PER_CHUNK}..{bad * PER_CHUNK + PER_CHUNK - 1} are not in the log"
    ]
    assert _copies(path) == [copy]
    with TransitionStore(tmp_path, direct=False) as store:
        store.append(_chunk(18 * PER_CHUNK))
    assert _seqs(TransitionStore(tmp_path).read_back()) == [*_seqs(chunks), 18 * PER_CHUNK]


def test_a_damaged_length_and_zeroed_bytes_in_the_middle_are_found_and_the_records_after_them_kept(
    tmp_path: Path, caplog
) -> None:
    path, records = _write_log(tmp_path, 6)
    damaged = bytearray(path.read_bytes())
    second = len(records[0])
    damaged[second + 5 : second + 9] = (1 << 30).to_bytes(4, "little")  # record 1 claims a length past the end
    third = second + len(records[1])
    fourth = third + len(records[2])
    damaged[third + 40 : fourth + 40] = bytes(fourth - third)  # record 2 zeroed, and the head of record 3 with it
    path.write_bytes(bytes(damaged))
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    store = TransitionStore(tmp_path)
    assert _seqs(store.read_back()) == [0, 4 * PER_CHUNK, 5 * PER_CHUNK]
    assert (store.damaged_records, store.lost_transitions) == (1, 3 * PER_CHUNK)
    assert f"transitions {PER_CHUNK}..{4 * PER_CHUNK - 1} ({3 * PER_CHUNK}) are lost" in caplog.text
    assert path.read_bytes() == records[0] + records[4] + records[5]


def test_old_crc32_records_damaged_before_new_records_are_taken_out_and_the_new_ones_kept(tmp_path: Path) -> None:
    """A log begun before the XXH3 checksum (RRLT records) and continued after it (RRLX): both layouts resync."""
    path = tmp_path / "arm@r0.log"
    old = []
    for first in (0, PER_CHUNK):
        payload = encode_payload(_chunk(first))
        old.append(CRC32_HEADER.pack(CRC32_MAGIC, 0, len(payload), zlib.crc32(bytes([0]) + payload)) + payload)
    new = encode_record(_chunk(2 * PER_CHUNK))
    damaged = bytearray(old[0] + old[1] + new)
    damaged[len(old[0]) - 5] ^= 0xFF  # the first old record's payload
    path.write_bytes(bytes(damaged))
    store = TransitionStore(tmp_path)
    assert _seqs(store.read_back()) == [PER_CHUNK, 2 * PER_CHUNK]
    assert path.read_bytes() == old[1] + new and store.lost_transitions == PER_CHUNK


def test_a_torn_tail_of_the_learner_log_is_cut_as_before_saying_which_transitions_it_held(
    tmp_path: Path, caplog
) -> None:
    path, records = _write_log(tmp_path, 3)
    path.write_bytes(path.read_bytes()[:-200])  # the last record lost its last 200 bytes
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    store = TransitionStore(tmp_path)
    assert _seqs(store.read_back()) == [0, PER_CHUNK]
    assert path.read_bytes() == records[0] + records[1] and _copies(path) == []
    assert "cutting a torn or corrupt tail" in caplog.text
    assert f"dropped the record of transitions {2 * PER_CHUNK}..{3 * PER_CHUNK - 1} ({PER_CHUNK} transitions)" in (
        caplog.text
    )
    assert (store.damaged_records, store.lost_transitions, store.cut_transitions) == (0, 0, PER_CHUNK)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_intact_learner_log_is_left_byte_for_byte(tmp_path: Path, caplog) -> None:
    path, _ = _write_log(tmp_path, 5)
    before, inode = path.read_bytes(), path.stat().st_ino
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    store = TransitionStore(tmp_path)
    assert _seqs(store.read_back()) == [i * PER_CHUNK for i in range(5)]
    assert path.read_bytes() == before and path.stat().st_ino == inode and _copies(path) == []
    assert (store.damaged_records, store.lost_transitions, store.cut_transitions) == (0, 0, 0)
    assert not caplog.records


# -- the actor's spill -------------------------------------------------------------------------------------------------
def _fill_spill(root: Path, chunks: int, count: int = 3) -> tuple[Path, list[bytes]]:
    spill = Spill(root)
    payloads = [bytes([i + 1]) * (300 + 17 * i) for i in range(chunks)]
    for i, payload in enumerate(payloads):
        spill.append(payload, first_seq=i * count, count=count)
    (segment,) = root.glob("seg_*.log")
    return segment, payloads


def _record_starts(payloads: list[bytes]) -> list[int]:
    starts, at = [], 0
    for payload in payloads:
        starts.append(at)
        at += 8 + 16 + len(payload)
    return starts


def test_damage_in_the_middle_of_the_spill_keeps_every_intact_chunk_and_says_which_sequence_numbers_were_lost(
    tmp_path: Path, caplog
) -> None:
    segment, payloads = _fill_spill(tmp_path, 6)
    starts = _record_starts(payloads)
    original = segment.read_bytes()
    damaged = bytearray(original)
    for i in range(40):
        damaged[starts[2] + 50 + i] ^= 0x5A  # inside chunk 2 (sequence numbers 6..8)
    segment.write_bytes(bytes(damaged))
    caplog.set_level(logging.WARNING)
    spill = Spill(tmp_path)
    got = [(c.first_seq, c.count, data) for c, data in spill.chunks_from(0)]
    assert got == [(i * 3, 3, payloads[i]) for i in range(6) if i != 2]
    assert spill.next_seq == 18  # the numbering goes on after the last intact chunk
    assert (spill.damaged_records, spill.lost_transitions, spill.gaps, spill.cut_transitions) == (1, 3, [(6, 8)], 0)
    (copy,) = sorted(tmp_path.glob(f"{segment.name}.damaged-*"))
    assert copy.read_bytes() == bytes(damaged) and spill.damaged_copies == [copy]
    assert segment.read_bytes() == original[: starts[2]] + original[starts[3] :]
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert str(segment) in message and f"damaged bytes {starts[2]}.." in message and str(copy) in message
    assert "sequence numbers 6..8 (3 transitions) are lost" in message and "2 chunks before and 3 after" in message
    assert "torn tail" not in caplog.text
    # Reopened: whole now; appended to, and reopened again with every chunk.
    caplog.clear()
    again = Spill(tmp_path)
    assert [(c.first_seq, data) for c, data in again.chunks_from(0)] == [(s, p) for s, _, p in got]
    assert again.damaged_records == 0 and again.gaps == [] and not caplog.records
    again.append(b"next", first_seq=18, count=2)
    last = Spill(tmp_path)
    assert [c.first_seq for c, _ in last.chunks_from(0)] == [0, 3, 9, 12, 15, 18] and last.next_seq == 20


def test_a_damaged_length_in_the_middle_of_the_spill_is_not_taken_for_a_torn_tail(tmp_path: Path) -> None:
    segment, payloads = _fill_spill(tmp_path, 4)
    starts = _record_starts(payloads)
    damaged = bytearray(segment.read_bytes())
    damaged[starts[1] : starts[1] + 4] = (1 << 31).to_bytes(4, "little")  # chunk 1 claims 2 GB
    segment.write_bytes(bytes(damaged))
    spill = Spill(tmp_path)
    assert [c.first_seq for c, _ in spill.chunks_from(0)] == [0, 6, 9] and spill.gaps == [(3, 5)]


def test_a_torn_tail_of_the_spill_is_cut_as_before_saying_which_sequence_numbers_it_held(
    tmp_path: Path, caplog
) -> None:
    segment, payloads = _fill_spill(tmp_path, 5)
    starts = _record_starts(payloads)
    size = segment.stat().st_size
    segment.write_bytes(segment.read_bytes()[:-200])  # the last chunk lost its last 200 bytes
    caplog.set_level(logging.WARNING)
    spill = Spill(tmp_path)
    assert [c.first_seq for c, _ in spill.chunks_from(0)] == [0, 3, 6, 9]
    assert spill.next_seq == 12  # as before: a torn chunk was never sent, its numbers are used again
    assert segment.stat().st_size == starts[4] < size and not list(tmp_path.glob("*.damaged-*"))
    assert "cut a torn tail of" in caplog.text
    assert "dropped the chunk of sequence numbers 12..14 (3 transitions)" in caplog.text
    assert (spill.damaged_records, spill.lost_transitions, spill.cut_transitions) == (0, 0, 3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_cut_end_of_a_spill_segment_that_is_not_the_newest_is_said_as_lost_not_as_a_torn_write(
    tmp_path: Path, caplog
) -> None:
    spill = Spill(tmp_path, segment_chunks=2)
    for i in range(5):
        spill.append(bytes([i + 1]) * 400, first_seq=i * 3, count=3)
    first, *_ = sorted(tmp_path.glob("seg_*.log"))
    first.write_bytes(first.read_bytes()[:-200])  # the end of chunk 1 (sequence numbers 3..5), in the oldest segment
    caplog.set_level(logging.WARNING)
    again = Spill(tmp_path, segment_chunks=2)
    assert [c.first_seq for c, _ in again.chunks_from(0)] == [0, 6, 9, 12] and again.next_seq == 15
    assert (again.damaged_records, again.lost_transitions, again.gaps, again.cut_transitions) == (1, 3, [(3, 5)], 0)
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "not the newest" in error.getMessage() and "sequence numbers 3..5 (3 transitions)" in error.getMessage()


def test_an_intact_spill_is_left_byte_for_byte(tmp_path: Path, caplog) -> None:
    segment, payloads = _fill_spill(tmp_path, 4)
    before, inode = segment.read_bytes(), segment.stat().st_ino
    caplog.set_level(logging.WARNING)
    spill = Spill(tmp_path)
    assert [data for _, data in spill.chunks_from(0)] == payloads
    assert segment.read_bytes() == before and segment.stat().st_ino == inode
    assert (spill.damaged_records, spill.lost_transitions, spill.cut_transitions, spill.gaps) == (0, 0, 0, [])
    assert not caplog.records and sorted(p.name for p in tmp_path.iterdir()) == [segment.name]
