"""The actor's durable outbox: every chunk of transitions is on disk (fsync'd) before it is sent.

Chunks are wire-encoded `transitions` messages, numbered by sequence, appended to segment files under
`DIR/spill/` as records of [length u32][crc32 u32 of the body][body: first_seq i64, count i64, payload]. A segment
is deleted once the learner has acknowledged everything in it, so the outbox is bounded by what is unacknowledged.

Reopening the same directory (after a crash or a restart) recovers every intact record and continues the sequence
numbers after the last one. A record is bad when it is incomplete, its checksum fails or its sequence goes back;
after one the scan resynchronises on the next record that verifies (a length that fits, a plausible first_seq and
count, the crc32). Where none follows, the bad bytes are a torn tail (a crash during a write) and are cut off, with a
warning that says which sequence numbers the cut record held where its body still says so; a torn record was never
sent, so its numbers are used again. Where intact records follow, the bad bytes are damage in the middle of the
segment: nothing intact is cut; the original is kept beside it (`seg_*.log.damaged-<UTC time>`), the segment is
rewritten without the bad bytes (a new file fsync'd and renamed over it), and an error names the segment, the byte
offset, what was kept, the sequence numbers missing across the damage and the copy. Those numbers are a hole in the
sequence (`gaps`); `damaged_records`, `lost_transitions`, `cut_transitions` and `damaged_copies` count what was found.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_rl.durable import keep_damaged_copy, rewrite

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<II")
_SEQS = struct.Struct("<qq")  # first_seq, count: the first bytes of a record's body
# Resynchronising after a bad record: a record found by the scan holds at most this many transitions and starts less
# than SEQ_SPAN after the sequence the segment had reached (cheap tests before the crc32), and the bytes are scanned
# SCAN_WINDOW offsets at a time.
MAX_COUNT = 1 << 20
SEQ_SPAN = 1 << 40
SCAN_WINDOW = 1 << 22


@dataclass(frozen=True)
class SpilledChunk:
    """Where one chunk lies on disk."""

    first_seq: int
    count: int
    segment: Path
    offset: int
    length: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


class Spill:
    """Append-only, fsync'd chunk store with sequence numbers; thread-safe (control thread writes, network reads)."""

    def __init__(self, root: Path, *, segment_chunks: int = 100) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.segment_chunks = segment_chunks
        self._lock = threading.Lock()
        self._chunks: list[SpilledChunk] = []
        self.next_seq = 0
        self._segment: Path | None = None
        self._segment_count = 0
        # What recovery found (0 and empty when every segment was whole): stretches of damage in the middle of a
        # segment taken out (each followed by intact chunks), the sequence numbers (first, last) lost across them
        # (`gaps`; lost_transitions counts them), the transitions of chunks cut as torn tails (where their bodies
        # said), and the copies of the damaged segments.
        self.damaged_records = 0
        self.gaps: list[tuple[int, int]] = []
        self.cut_transitions = 0
        self.damaged_copies: list[Path] = []
        self._recover()

    @property
    def lost_transitions(self) -> int:
        """Transitions recovery found lost for good: those of `gaps`."""
        return sum(last - first + 1 for first, last in self.gaps)

    # -- recovery -----------------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        segments = sorted(self.root.glob("seg_*.log"))
        for segment in segments:
            self._recover_segment(segment, newest=segment == segments[-1])
        self._chunks.sort(key=lambda c: c.first_seq)
        if self._chunks:
            self.next_seq = self._chunks[-1].last_seq + 1

    def _recover_segment(self, segment: Path, *, newest: bool) -> None:
        data = segment.read_bytes()
        kept: list[tuple[int, int, int, int]] = []  # (offset, end, first_seq, count) of each intact record
        # (first bad byte, next intact record, first and last lost seq, intact records before it)
        damage: list[tuple[int, int, int, int, int]] = []
        offset, next_seq, tail = 0, 0, None
        while offset < len(data):
            record = _record_at(data, offset, next_seq)
            if record is None:
                floor = next_seq if kept else _segment_seq(segment)
                found = _resync(data, offset + 1, floor)
                if found is None:
                    tail = offset
                    break
                start, record = found
                damage.append((offset, start, floor, record[0] - 1, len(kept)))
                offset = start
            first_seq, count, end = record
            kept.append((offset, end, first_seq, count))
            offset, next_seq = end, first_seq + count
        if tail is not None:
            self._report_tail(segment, data, tail, len(kept), newest=newest)
        if damage:
            copy = self._repair(segment, data, kept)
        elif tail is not None:
            with segment.open("r+b") as f:
                f.truncate(tail)
                f.flush()
                os.fsync(f.fileno())
        at = 0  # the records' offsets in the segment as it now is
        for start, end, first_seq, count in kept:
            body = at + _HEADER.size + _SEQS.size
            self._chunks.append(SpilledChunk(first_seq, count, segment, body, end - start - _HEADER.size - _SEQS.size))
            at += end - start
        if damage:
            self._report_damage(segment, len(data), kept, damage, copy)

    def _report_tail(self, segment: Path, data: bytes, tail: int, kept: int, *, newest: bool) -> None:
        """Say what the torn tail cut at `tail` held. In the newest segment it is what a crash during a write leaves
        (a warning: the chunk was never sent). In an older one it is damage: a crash tears only the segment being
        written, and the next recovery cuts it; that chunk had been written whole (an error, counted as lost)."""
        held = None
        if tail + _HEADER.size + _SEQS.size <= len(data) and _HEADER.unpack_from(data, tail)[0] >= _SEQS.size:
            first_seq, count = _SEQS.unpack_from(data, tail + _HEADER.size)
            if first_seq >= 0 and 1 <= count <= MAX_COUNT:
                held = (first_seq, count)
        if held is None:
            what = "the sequence numbers it held are not known"
        else:
            what = (
                f"it dropped the chunk of sequence numbers {held[0]}..{held[0] + held[1] - 1} ({held[1]} transitions)"
            )
        if newest:
            self.cut_transitions += 0 if held is None else held[1]
            log.warning(
                "spill %s: cut a torn tail of %d bytes (a crash during a write) at byte %d, after %d intact chunks; %s",
                segment,
                len(data) - tail,
                tail,
                kept,
                what,
            )
            return
        self.damaged_records += 1
        if held is not None:
            self.gaps.append((held[0], held[0] + held[1] - 1))
        log.error(
            "spill %s: cut %d damaged bytes at byte %d at the end of a segment that is not the newest (not a torn "
            "write), after %d intact chunks; %s, lost unless the learner has acknowledged them",
            segment,
            len(data) - tail,
            tail,
            kept,
            what,
        )

    def _repair(self, segment: Path, data: bytes, kept: list[tuple[int, int, int, int]]) -> Path:
        """Keep the original of a segment damaged in the middle beside it, then rewrite it of its intact records."""
        copy = keep_damaged_copy(segment)
        view = memoryview(data)
        rewrite(segment, (view[start:end] for start, end, _, _ in kept))
        self.damaged_copies.append(copy)
        return copy

    def _report_damage(
        self,
        segment: Path,
        size: int,
        kept: list[tuple[int, int, int, int]],
        damage: list[tuple[int, int, int, int, int]],
        copy: Path,
    ) -> None:
        for start, end, lost_first, lost_last, before in damage:
            lost = max(0, lost_last - lost_first + 1)
            self.damaged_records += 1
            if lost:
                self.gaps.append((lost_first, lost_last))
            log.error(
                "spill %s: damaged bytes %d..%d of %d in the middle of the segment, with intact chunks after them: "
                "%d chunks before and %d after are kept, the bad bytes taken out; %s; the original segment is kept "
                "as %s",
                segment,
                start,
                end - 1,
                size,
                before,
                len(kept) - before,
                f"sequence numbers {lost_first}..{lost_last} ({lost} transitions) are lost unless the learner "
                "has acknowledged them"
                if lost
                else "no sequence number is missing around them",
                copy,
            )

    # -- writing ------------------------------------------------------------------------------------------------------
    def append(self, payload: bytes, *, first_seq: int, count: int) -> None:
        """Store one chunk durably (returns after fsync); first_seq must continue the sequence."""
        if first_seq != self.next_seq or count < 1:
            raise ValueError(f"chunk {first_seq}+{count} does not continue the sequence at {self.next_seq}")
        body = struct.pack("<qq", first_seq, count) + payload
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            if self._segment is None or self._segment_count >= self.segment_chunks:
                self._segment = self.root / f"seg_{first_seq:015d}.log"
                self._segment_count = 0
            with self._segment.open("ab") as f:
                offset = f.tell()
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            self._segment_count += 1
            self._chunks.append(SpilledChunk(first_seq, count, self._segment, offset + _HEADER.size + 16, len(payload)))
            self.next_seq = first_seq + count

    def skip_to(self, seq: int) -> None:
        """Continue the sequence at `seq` (never backwards): the learner already holds everything before it. The next
        chunk starts a new segment."""
        with self._lock:
            if seq > self.next_seq:
                self.next_seq = seq
                self._segment = None

    def discard(self, chunk: SpilledChunk) -> None:
        """Give up `chunk` (the learner refuses what it holds): it is no longer read, and its sequence numbers count as
        lost, so the next chunk tells the learner to go on past them. A restart reads it again from disk."""
        with self._lock:
            self._chunks = [c for c in self._chunks if c.first_seq != chunk.first_seq]
            self.gaps.append((chunk.first_seq, chunk.last_seq))

    def lost(self, first: int, last: int) -> bool:
        """Whether every sequence number first..last lies in a gap the recovery found (transitions lost for good)."""
        seq = first
        for lo, hi in sorted(self.gaps):
            if lo <= seq <= hi:
                seq = hi + 1
        return seq > last

    # -- reading ------------------------------------------------------------------------------------------------------
    def chunks_from(self, seq: int) -> Iterator[tuple[SpilledChunk, bytes]]:
        """Chunks whose last sequence is >= seq, oldest first, with their payloads."""
        with self._lock:
            chunks = [c for c in self._chunks if c.last_seq >= seq]
        for chunk in chunks:
            try:
                with chunk.segment.open("rb") as f:
                    f.seek(chunk.offset)
                    yield chunk, f.read(chunk.length)
            except FileNotFoundError:  # released meanwhile (acknowledged)
                continue

    def unacked(self, acked_seq: int) -> int:
        """Transitions stored here beyond acked_seq."""
        return max(0, self.next_seq - 1 - acked_seq)

    def release(self, acked_seq: int) -> None:
        """Forget chunks up to acked_seq; delete segments that hold nothing else.

        The newest segment always stays: it carries the sequence on across restarts.
        """
        with self._lock:
            keep = [c for c in self._chunks if c.last_seq > acked_seq]
            live = {c.segment for c in keep}
            if self._chunks:
                live.add(self._chunks[-1].segment)
            if self._segment is not None:
                live.add(self._segment)
            for segment in {c.segment for c in self._chunks} - live:
                segment.unlink(missing_ok=True)
            self._chunks = keep


def _record_at(data: bytes, offset: int, next_seq: int) -> tuple[int, int, int] | None:
    """(first_seq, count, end) of the record at `offset` when it is whole, verifies and does not go back before
    `next_seq`; None otherwise."""
    if offset + _HEADER.size + _SEQS.size > len(data):
        return None
    length, crc = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if length < _SEQS.size or end > len(data):
        return None
    first_seq, count = _SEQS.unpack_from(data, offset + _HEADER.size)
    if first_seq < next_seq or count < 1:
        return None
    if zlib.crc32(memoryview(data)[offset + _HEADER.size : end]) != crc:
        return None
    return first_seq, count, end


def _resync(data: bytes, start: int, min_seq: int) -> tuple[int, tuple[int, int, int]] | None:
    """The offset of the first record from `start` on that verifies and starts at `min_seq` or later (within
    SEQ_SPAN, at most MAX_COUNT transitions), with what _record_at says of it; None when there is none. Every offset's
    length, first_seq and count are tested at once (numpy views at a stride of one byte), and the crc32 only where
    those are plausible."""
    last = len(data) - _HEADER.size - _SEQS.size  # the last offset a header and the sequence fields fit after
    pos = start
    while pos <= last:
        n = min(SCAN_WINDOW, last - pos + 1)
        lengths = np.ndarray((n,), "<u4", data, pos, (1,))
        firsts = np.ndarray((n,), "<i8", data, pos + _HEADER.size, (1,))
        counts = np.ndarray((n,), "<i8", data, pos + _HEADER.size + 8, (1,))
        room = len(data) - _HEADER.size - pos - np.arange(n, dtype=np.int64)  # bytes a body may take at each offset
        plausible = (
            (lengths >= _SEQS.size)
            & (lengths <= room)
            & (counts >= 1)
            & (counts <= MAX_COUNT)
            & (firsts >= min_seq)
            & (firsts < min_seq + SEQ_SPAN)
        )
        for i in np.flatnonzero(plausible):
            record = _record_at(data, pos + int(i), min_seq)
            if record is not None:
                return pos + int(i), record
        pos += n
    return None


def _segment_seq(segment: Path) -> int:
    """The first sequence number of a segment, from its name (seg_<first_seq>.log); 0 when the name says none."""
    try:
        return max(0, int(segment.name[len("seg_") : -len(".log")]))
    except ValueError:
        return 0
