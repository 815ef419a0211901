"""The actor's durable outbox: every chunk of transitions is on disk (fsync'd) before it is sent.

Chunks are wire-encoded `transitions` messages, numbered by sequence, appended to segment files under
`DIR/spill/` as records of [length u32][crc32 u32][payload]. A segment is deleted once the learner has acknowledged
everything in it, so the outbox is bounded by what is unacknowledged. Reopening the same directory (after a crash or
a restart) recovers every complete record, cuts a torn tail, and continues the sequence numbers.
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

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<II")


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
        self._recover()

    # -- recovery -----------------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        for segment in sorted(self.root.glob("seg_*.log")):
            data = segment.read_bytes()
            offset, good = 0, 0
            while offset + _HEADER.size <= len(data):
                length, crc = _HEADER.unpack_from(data, offset)
                body = data[offset + _HEADER.size : offset + _HEADER.size + length]
                if len(body) < length or zlib.crc32(body) != crc or length < 16:
                    break
                first_seq, count = struct.unpack_from("<qq", body, 0)
                self._chunks.append(SpilledChunk(first_seq, count, segment, offset + _HEADER.size + 16, length - 16))
                offset += _HEADER.size + length
                good = offset
            if good < len(data):
                log.warning("spill %s: cut a torn tail of %d bytes (a crash during a write)", segment, len(data) - good)
                with segment.open("r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._chunks.sort(key=lambda c: c.first_seq)
        if self._chunks:
            self.next_seq = self._chunks[-1].last_seq + 1

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
