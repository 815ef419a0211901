"""The learner's durable transition log (DESIGN §6, §9): what it acknowledges is on disk first.

One append-only file per (actor_id, run_id) stream under `DIR/buffer/`, named `<actor_id>@<run_id>.log` (ids match
`[A-Za-z0-9_.-]{1,64}`, so the name holds no path separator and `@` separates them unambiguously). A file is a
sequence of records:

    magic b"RRLT" | flags u8 | length u32 LE | crc32 u32 LE (of flags byte + payload) | payload (length bytes)

The payload is a `wire.Transitions` message in its wire encoding (msgpack, arrays as raw bytes, no pickle), holding
exactly the transitions the learner stored from one chunk, numbered from `first_seq`. `flags` bit 0 marks
transitions stored after the learner first went online (they count as online environment steps); without it they
were collected for Q-Estimation.

Records written under protocol 1 read back unchanged (Transitions messages did not change in protocol 2); an intact
record of an unknown protocol version stops the read with StoreError rather than being cut as damage.

`append` writes a record and `sync` flushes and fsyncs every file written since the last sync; the learner
acknowledges a chunk only after `sync`. `read_back` returns every stream's records in order. A torn or corrupt tail
(a partial header, a length past the end of the file, a checksum or decoding failure, or a sequence number that does
not continue the stream) is cut off the file, with a warning, so the next append continues a well-formed log.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from robot_rl.wire import Transitions, VersionError, WireError, from_wire, to_wire

log = logging.getLogger("robot_rl.learner")

MAGIC = b"RRLT"
HEADER = struct.Struct("<4sBII")
FLAG_ONLINE = 0x01
SUFFIX = ".log"
# Upper bound on one record's payload when reading back (a chunk of the largest image spec stays far below it).
MAX_RECORD_BYTES = 1 << 31
# Protocol versions whose Transitions payloads this store reads (the message has not changed since version 1).
READABLE_VERSIONS = (1, 2)


class StoreError(RuntimeError):
    """The transition log cannot be written or read as it is; the message says why."""


@dataclass(frozen=True)
class StoredChunk:
    """One record read back: consecutive transitions of a stream and whether they were online steps."""

    actor_id: str
    run_id: str
    first_seq: int
    arrays: dict[str, np.ndarray]
    online: bool

    @property
    def count(self) -> int:
        """Number of transitions in the chunk."""
        return len(self.arrays["rewards"])

    @property
    def last_seq(self) -> int:
        """Sequence number of the last transition."""
        return self.first_seq + self.count - 1


def stream_file_name(actor_id: str, run_id: str) -> str:
    """File name of a stream's log (ids are checked by the wire layer: no separators, no '@')."""
    if "/" in actor_id + run_id or "@" in actor_id + run_id or os.sep in actor_id + run_id:
        raise ValueError(f"actor id {actor_id!r} / run id {run_id!r} cannot name a log file")
    return f"{actor_id}@{run_id}{SUFFIX}"


def encode_record(chunk: StoredChunk) -> bytes:
    """The bytes of one record (header + payload)."""
    message = Transitions(
        actor_id=chunk.actor_id,
        run_id=chunk.run_id,
        first_seq=chunk.first_seq,
        count=chunk.count,
        arrays=chunk.arrays,
    )
    payload = to_wire(message)
    flags = FLAG_ONLINE if chunk.online else 0
    crc = zlib.crc32(bytes([flags]) + payload)
    return HEADER.pack(MAGIC, flags, len(payload), crc) + payload


class _TornRecord(Exception):
    """The record at an offset is incomplete or corrupt; the message says how."""


def _read_record(data: memoryview, offset: int, actor_id: str, run_id: str) -> tuple[StoredChunk, int]:
    """The record at `offset` of a stream file's bytes and the offset after it; _TornRecord when it is not whole."""
    if len(data) - offset < HEADER.size:
        raise _TornRecord(f"partial header ({len(data) - offset} bytes)")
    magic, flags, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise _TornRecord(f"bad magic {bytes(magic)!r}")
    start = offset + HEADER.size
    if length > MAX_RECORD_BYTES or start + length > len(data):
        raise _TornRecord(f"record of {length} bytes runs past the end of the file")
    payload = data[start : start + length]
    if zlib.crc32(bytes([flags]) + bytes(payload)) != crc:
        raise _TornRecord("checksum mismatch")
    try:
        message = from_wire(payload, max_bytes=MAX_RECORD_BYTES, versions=READABLE_VERSIONS)
    except VersionError as err:  # intact (the checksum holds) but written by another version: do not cut it
        raise StoreError(
            f"a record at byte {offset} of the {actor_id}@{run_id} log was written under another protocol "
            f"({err}); read it with the robot-rl version that wrote it, or move the log away"
        ) from None
    except WireError as err:
        raise _TornRecord(f"payload does not decode: {err}") from None
    if not isinstance(message, Transitions) or (message.actor_id, message.run_id) != (actor_id, run_id):
        raise _TornRecord("payload is not a transitions chunk of this stream")
    chunk = StoredChunk(
        actor_id=actor_id,
        run_id=run_id,
        first_seq=message.first_seq,
        arrays=dict(message.arrays),
        online=bool(flags & FLAG_ONLINE),
    )
    return chunk, start + length


class TransitionStore:
    """Append-only, fsync'd logs of stored transition chunks, one file per (actor_id, run_id), in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[tuple[str, str], BinaryIO] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._new_files = False

    def is_empty(self) -> bool:
        """True when no stream file holds any bytes."""
        return not any(p.stat().st_size for p in self.directory.glob(f"*{SUFFIX}"))

    def read_back(self) -> list[StoredChunk]:
        """Every stored chunk, stream by stream in sequence order; torn or corrupt tails are cut off (warning)."""
        chunks: list[StoredChunk] = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            chunks.extend(self._read_stream(path))
        return chunks

    def _read_stream(self, path: Path) -> list[StoredChunk]:
        name = path.name[: -len(SUFFIX)]
        if name.count("@") != 1:
            log.warning("ignoring %s: not a stream log name (<actor_id>@<run_id>%s)", path, SUFFIX)
            return []
        actor_id, run_id = name.split("@")
        data = memoryview(path.read_bytes())
        chunks: list[StoredChunk] = []
        offset, next_seq = 0, 0
        while offset < len(data):
            try:
                chunk, end = _read_record(data, offset, actor_id, run_id)
                if chunk.first_seq != next_seq:
                    raise _TornRecord(f"sequence {chunk.first_seq} does not continue the stream at {next_seq}")
            except _TornRecord as err:
                log.warning(
                    "%s: cutting a torn or corrupt tail at byte %d of %d (%s); %d chunks kept",
                    path,
                    offset,
                    len(data),
                    err,
                    len(chunks),
                )
                os.truncate(path, offset)
                return chunks
            chunks.append(chunk)
            offset, next_seq = end, chunk.last_seq + 1
        return chunks

    def append(self, chunk: StoredChunk) -> None:
        """Write one record (buffered); durable only after `sync`."""
        key = (chunk.actor_id, chunk.run_id)
        file = self._files.get(key)
        if file is None:
            path = self.directory / stream_file_name(*key)
            self._new_files = self._new_files or not path.exists()
            file = self._files[key] = path.open("ab")
        file.write(encode_record(chunk))
        self._dirty.add(key)

    def sync(self) -> None:
        """Flush and fsync every file appended to since the last sync (and the directory, for new files)."""
        for key in self._dirty:
            file = self._files[key]
            file.flush()
            os.fsync(file.fileno())
        self._dirty.clear()
        if self._new_files:
            _fsync_directory(self.directory)
            self._new_files = False

    def close(self) -> None:
        """Sync and close every file."""
        try:
            self.sync()
        finally:
            for file in self._files.values():
                file.close()
            self._files.clear()


def _fsync_directory(directory: Path) -> None:
    """fsync a directory so that files created in it survive a crash (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
