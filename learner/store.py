"""The learner's durable transition log (design §6, §9): what it acknowledges is on disk first.

One append-only file per (actor_id, run_id) stream under `DIR/buffer/`, named `<actor_id>@<run_id>.log` (ids match
`[A-Za-z0-9_.-]{1,64}`, so the name holds no path separator and `@` separates them unambiguously). A file is a
sequence of records:

    magic b"RRLX" | flags u8 | length u32 LE | xxh3_64 u64 LE (of the payload, seeded with flags) | payload

(Logs written before the XXH3 checksum have records `b"RRLT" | flags u8 | length u32 | crc32 u32 (of flags byte +
payload) | payload`; they read back as before, and new records are appended after them in the new layout. XXH3 checks
a 1.3 MB image chunk about ten times faster than zlib's crc32, a cost the writer pays for every stored byte.)

The payload is a `wire.Transitions` message in its wire encoding, holding exactly the transitions the learner stored
from one chunk, numbered from `first_seq`: since protocol 3 its frames joined (`wire.join_frames`: a msgpack header
and the arrays' raw bytes, no pickle), before that one msgpack frame with the arrays inline; both read back.
`flags` bit 0 marks transitions stored after the learner first went online (they count as online environment steps);
without it they were collected for Q-Estimation.

The payload of a record is the message exactly as the actor sent it when the learner stores the whole chunk (the
received frames are written as they are, never re-encoded); a chunk trimmed of duplicates is encoded anew. Records
written under protocols 1 and 2 read back unchanged (a protocol-2 Transitions message differs only by the next
observations it may leave out, which parsing rebuilds); an intact record of an unknown protocol version stops the read
with StoreError rather than being cut as damage.

Writing happens on two threads so that the learner's receive loop never waits on the disk: `append` queues a
record and returns its ticket (1, 2, ...); the writer thread writes everything queued with one `os.writev` per record
and raises the written ticket; the sync thread, whenever records are written that no fsync covers yet, notes the last
written ticket, fsyncs every file written since its previous fsync (and the directory, for new files), and only then
raises `durable()` to that ticket and makes `wake_fd` readable. An fsync covers every byte written before it began, so
the writer copies the next records into the page cache while the disk takes the previous ones, and records that
arrive during an fsync are covered by the next one, together. The learner acknowledges a chunk only when
`durable()` has reached the chunk's ticket (`HeldReplies`), so an acknowledgement never covers a byte that is not
fsync'd. `sync` waits until everything appended is durable. A write or fsync error stops both threads; every later
call raises StoreError with it, and nothing more is acknowledged.

Where the file system takes it (probed when the store first writes; `direct=` forces either way), the writer
writes with O_DIRECT: the records of a group are copied into one page-aligned staging buffer and written from it
in whole 4 KiB blocks (the last block padded with zeros, then the file cut back to its true length), so the
payloads never pass through the page cache. On a 2-core machine that copy costs far less than the kernel's copy
into the page cache and its writeback (`bench/disk.py`). The partial last block of a stream is kept and written again
with the next group, byte for byte the same where it was written before. A crash between a write and the cut leaves
zeros after the last record, which `read_back` cuts as a torn tail. Elsewhere (tmpfs, some network file systems)
records are appended through the page cache as before; both write the same bytes.

`read_back` returns every stream's records in order. A record is bad when its header is partial, its length runs past
the end of the file, its checksum or decoding fails, or its sequence number goes back in the stream. After a bad
record the read resynchronises: it scans forward for the next record that parses and verifies (magic, a length that
fits, checksum, decoding, a sequence number that does not go back).

- None follows: the bad bytes are a torn tail (a crash during a write, the expected damage). They are cut off the
  file, with a warning that says which transitions the cut record held when its header still says so, and the next
  append continues a well-formed log.
- Intact records follow: the bad bytes are damage in the middle of the log. Nothing intact is cut: the original file
  is first kept beside the log (`<name>.damaged-<UTC time>`, a hard link where the file system takes one, else a
  copy), then the log is rewritten without the bad bytes (a new file fsync'd and renamed over the old one), and an
  error says where the damage was, what was kept, which sequence numbers are missing from the stream (as far as the
  records around the damage tell) and where the copy is.

`damaged_records`, `lost_transitions`, `cut_transitions` and `damaged_copies` say what the last `read_back` found.
A stream may skip forward: after acknowledged transitions were lost from the log, the learner continues the stream
where its checkpoint saw it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import xxhash

from robot_rl.durable import fsync_directory, keep_damaged_copy, rewrite
from robot_rl.wire import (
    STORED_VERSIONS,
    Transitions,
    VersionError,
    WireError,
    decode,
    from_joined,
    is_joined_frames,
    join_frames,
    joined_buffers,
    to_frames,
)

log = logging.getLogger("robot_rl.learner")

MAGIC = b"RRLX"
HEADER = struct.Struct("<4sBIQ")
CRC32_MAGIC = b"RRLT"  # the records of logs written before XXH3 (read, never written)
# Where a record may start: either magic (they cannot overlap each other), for resynchronising after damage.
_RECORD_START = re.compile(re.escape(MAGIC) + b"|" + re.escape(CRC32_MAGIC))
CRC32_HEADER = struct.Struct("<4sBII")
FLAG_ONLINE = 0x01
SUFFIX = ".log"
# Upper bound on one record's payload when reading back (a chunk of the largest image spec stays far below it).
MAX_RECORD_BYTES = 1 << 31
# Bytes queued for the writer before `append` waits for it (the actors' windows bound it well below this).
MAX_QUEUED_BYTES = 512 << 20
# O_DIRECT: offsets, lengths and memory aligned to this (a multiple of every logical block size in use, 512 or 4096).
BLOCK = 4096
# The direct writer's staging buffer (one per store, shared by its streams): a group larger than this goes out in
# several writes.
STAGING_BYTES = 16 << 20
T = TypeVar("T")


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
    # [count - 1] bool, True where next_obs[i] is obs[i + 1] bit for bit, when the wire said so (None: unknown).
    continues: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Number of transitions in the chunk."""
        return len(self.arrays["rewards"])

    @property
    def last_seq(self) -> int:
        """Sequence number of the last transition."""
        return self.first_seq + self.count - 1

    def message(self) -> Transitions:
        """The chunk as the Transitions message it was received as (pydantic checks its fields)."""
        return Transitions(
            actor_id=self.actor_id, run_id=self.run_id, first_seq=self.first_seq, count=self.count, arrays=self.arrays
        )


def stream_file_name(actor_id: str, run_id: str) -> str:
    """File name of a stream's log (ids are checked by the wire layer: no separators, no '@')."""
    if "/" in actor_id + run_id or "@" in actor_id + run_id or os.sep in actor_id + run_id:
        raise ValueError(f"actor id {actor_id!r} / run id {run_id!r} cannot name a log file")
    return f"{actor_id}@{run_id}{SUFFIX}"


def encode_payload(chunk: StoredChunk) -> bytes:
    """The wire encoding of a chunk (a Transitions message, its frames joined), a record's payload."""
    return join_frames(to_frames(chunk.message()))


Payload = bytes | memoryview | list[bytes | memoryview]
"""A record's payload: its bytes, or the received frames of a message whose joined frames are the payload."""


def _payload_buffers(payload: Payload) -> list[memoryview]:
    """The buffers whose concatenation is the payload's bytes."""
    if isinstance(payload, list):
        return joined_buffers(payload)
    return [memoryview(payload).cast("B")]


def _checksum(flags: int, payload: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload, seed=flags)


def _crc32_checksum(flags: int, payload: bytes | memoryview) -> int:
    """The checksum of a CRC32_HEADER record: crc32 of the flags byte and the payload."""
    return zlib.crc32(payload, zlib.crc32(bytes([flags])))


def record_header(flags: int, payload: bytes | memoryview | list[memoryview]) -> bytes:
    """The header of the record of `payload`, its bytes or the buffers that make them (the checksum covers the
    payload, read in place, and the flags)."""
    buffers = payload if isinstance(payload, list) else [memoryview(payload)]
    digest = xxhash.xxh3_64(seed=flags)
    for buffer in buffers:
        digest.update(buffer)
    return HEADER.pack(MAGIC, flags, sum(memoryview(b).nbytes for b in buffers), digest.intdigest())


def _header_at(data: memoryview, offset: int) -> tuple[struct.Struct, int, int, int]:
    """The layout of the record at `offset` (HEADER or CRC32_HEADER), its flags, payload length and checksum."""
    magic = bytes(data[offset : offset + 4])
    header = {MAGIC: HEADER, CRC32_MAGIC: CRC32_HEADER}.get(magic)
    if header is None:
        raise _TornRecord(
            f"bad magic {magic!r}" if len(data) - offset >= 4 else f"partial header ({len(data) - offset} bytes)"
        )
    if len(data) - offset < header.size:
        raise _TornRecord(f"partial header ({len(data) - offset} bytes)")
    _, flags, length, checksum = header.unpack_from(data, offset)
    return header, flags, length, checksum


def _intact(header: struct.Struct, flags: int, payload: memoryview, checksum: int) -> bool:
    """Whether `checksum`, read from a header of that layout, matches `payload`."""
    if header is CRC32_HEADER:
        return _crc32_checksum(flags, payload) == checksum
    return _checksum(flags, payload) == checksum


def encode_record(chunk: StoredChunk) -> bytes:
    """The bytes of one record (header + payload)."""
    payload = encode_payload(chunk)
    return record_header(FLAG_ONLINE if chunk.online else 0, payload) + payload


class _TornRecord(Exception):
    """The record at an offset is incomplete or corrupt; the message says how."""


def _read_record(data: memoryview, offset: int, actor_id: str, run_id: str) -> tuple[StoredChunk, int]:
    """The record at `offset` of a stream file's bytes and the offset after it; _TornRecord when it is not whole."""
    header, flags, length, checksum = _header_at(data, offset)
    start = offset + header.size
    if length > MAX_RECORD_BYTES or start + length > len(data):
        raise _TornRecord(f"record of {length} bytes runs past the end of the file")
    payload = data[start : start + length]
    if not _intact(header, flags, payload, checksum):
        raise _TornRecord("checksum mismatch")
    try:
        message = from_joined(payload, max_bytes=MAX_RECORD_BYTES, versions=STORED_VERSIONS)
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
        continues=message.rows_continue,
    )
    return chunk, start + length


def _read_in_order(data: memoryview, offset: int, actor_id: str, run_id: str, next_seq: int) -> tuple[StoredChunk, int]:
    """`_read_record`, and _TornRecord when the record's sequence goes back in the stream (before `next_seq`)."""
    chunk, end = _read_record(data, offset, actor_id, run_id)
    if chunk.first_seq < next_seq:
        raise _TornRecord(f"sequence {chunk.first_seq} goes back in the stream (at {next_seq})")
    return chunk, end


def _resync(raw: bytes, start: int, actor_id: str, run_id: str, next_seq: int) -> tuple[int, StoredChunk, int] | None:
    """The first record from `start` on that parses and verifies and continues the stream: (its offset, its chunk,
    the offset after it); None when none does (the bytes from the bad record on are a torn tail)."""
    data = memoryview(raw)
    for match in _RECORD_START.finditer(raw, start):
        try:
            chunk, end = _read_in_order(data, match.start(), actor_id, run_id, next_seq)
        except _TornRecord:
            continue
        return match.start(), chunk, end
    return None


def _seqs_in_torn_record(data: memoryview, offset: int, actor_id: str, run_id: str) -> tuple[int, int] | None:
    """(first_seq, count) of the chunk a torn record held, where its header and the payload's message header are
    there to say (the checksum is not checked: the record is torn); None otherwise."""
    try:
        header, _, length, _ = _header_at(data, offset)
    except _TornRecord:
        return None
    payload = data[offset + header.size : offset + header.size + min(length, MAX_RECORD_BYTES)]
    try:
        if is_joined_frames(payload) and len(payload) >= 8:
            (frames,) = struct.unpack_from("<I", payload, 4)
            table = 8 + 8 * frames
            if not 1 <= frames <= 1 << 16 or len(payload) < table:
                return None
            (size,) = struct.unpack_from("<Q", payload, 8)
            if len(payload) < table + size:
                return None
            fields = decode(payload[table : table + size], max_bytes=MAX_RECORD_BYTES, versions=STORED_VERSIONS)
        elif len(payload) == length:  # one frame, as earlier versions logged it: only when whole
            fields = decode(payload, max_bytes=MAX_RECORD_BYTES, versions=STORED_VERSIONS)
        else:
            return None
        first, count = fields["first_seq"], fields["count"]
        if (fields.get("actor_id"), fields.get("run_id")) != (actor_id, run_id):
            return None
    except (WireError, KeyError, TypeError, ValueError, struct.error):
        return None
    if not isinstance(first, int) or not isinstance(count, int) or first < 0 or count < 1:
        return None
    return first, count


@dataclass(frozen=True)
class _Damage:
    """A stretch of bad bytes in the middle of a log, followed by an intact record."""

    start: int  # its first byte
    end: int  # the offset of the intact record after it
    why: str  # what was wrong with the record at `start`
    lost_first: int  # the sequence numbers missing across it (none when lost_last < lost_first)
    lost_last: int
    kept_before: int  # records kept before it


@dataclass(frozen=True)
class _Record:
    key: tuple[str, str]
    flags: int
    payload: list[memoryview]  # the buffers whose concatenation is the payload
    size: int
    ticket: int


class TransitionStore:
    """Append-only, fsync'd logs of stored transition chunks, one file per (actor_id, run_id), in `directory`.

    `append` queues, a writer thread writes and fsyncs in groups; `durable()` says up to which ticket. Use it as a
    context manager or call `close`.
    """

    def __init__(self, directory: Path, *, fsync: Callable[[int], None] = os.fsync, direct: bool | None = None) -> None:
        self.directory = Path(directory)
        self._fsync = fsync  # replaceable to hold a group at its fsync in tests
        # O_DIRECT writing: None probes the file system when the writer starts; True refuses to write without it.
        self._direct_wanted = direct
        self._direct: _DirectWriter | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appended = 0  # tickets handed out
        self._written = 0  # the last ticket written (in the page cache; durable once an fsync covers it)
        self._durable = 0
        self._dirty: dict[tuple[str, str], int] = {}  # stream -> fd of the files written since the last fsync began
        self._new_files = False  # a file was created since the last fsync began: its directory needs one too
        self._queue: list[_Record] = []
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._fds: dict[tuple[str, str], int] = {}
        self._wake_r = self._wake_w = -1  # a pipe, made with the writer (a store that only reads holds no fds)
        self._writer: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        self._writer_finished = False  # the writer has written its last record (closing) or failed
        # What the last read_back found (0 when every log was whole): stretches of damage in the middle of a log taken
        # out (each followed by intact records), the sequence numbers lost across them (`gaps`; lost_transitions
        # counts them), the transitions of records cut as torn tails (where their headers said), and the copies of
        # the damaged originals.
        self.damaged_records = 0
        self.gaps: list[tuple[str, str, int, int]] = []  # (actor_id, run_id, first, last lost sequence number)
        self.cut_transitions = 0
        self.damaged_copies: list[Path] = []

    def __enter__(self) -> TransitionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_empty(self) -> bool:
        """True when no stream file holds any bytes."""
        return not any(p.stat().st_size for p in self.directory.glob(f"*{SUFFIX}"))

    @property
    def lost_transitions(self) -> int:
        """Transitions the last read_back lost to damage in the middle of a log: those of `gaps`."""
        return sum(last - first + 1 for _, _, first, last in self.gaps)

    def read_back(self) -> list[StoredChunk]:
        """Every stored chunk, stream by stream in sequence order. A torn tail is cut off (warning); damage in the
        middle of a log is taken out of it, the original kept beside it (error): see the module's docstring."""
        self.damaged_records = self.cut_transitions = 0
        self.gaps, self.damaged_copies = [], []
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
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read the transition log {path}: {err.strerror or err}") from err
        data = memoryview(raw)
        chunks: list[StoredChunk] = []
        kept: list[tuple[int, int]] = []  # the byte spans of the records read
        damage: list[_Damage] = []
        tail: tuple[int, str] | None = None  # where a torn tail begins, and what is wrong with it
        offset, next_seq = 0, 0
        while offset < len(data):
            try:
                chunk, end = _read_in_order(data, offset, actor_id, run_id, next_seq)
                start = offset
                if chunk.first_seq > next_seq:  # the learner continued the stream past transitions lost earlier
                    log.warning("%s: transitions %d..%d are not in the log", path, next_seq, chunk.first_seq - 1)
            except _TornRecord as err:
                found = _resync(raw, offset + 1, actor_id, run_id, next_seq)
                if found is None:
                    tail = (offset, str(err))
                    break
                start, chunk, end = found
                damage.append(_Damage(offset, start, str(err), next_seq, chunk.first_seq - 1, len(chunks)))
            chunks.append(chunk)
            kept.append((start, end))
            offset, next_seq = end, chunk.last_seq + 1
        if tail is not None:
            self._report_tail(path, data, tail, len(chunks), actor_id, run_id)
        if damage:
            if (actor_id, run_id) in self._fds:
                raise StoreError(f"{path} is damaged in the middle and open for writing: read_back before appending")
            self._repair(path, data, kept, damage)
            lost = [(bad.lost_first, bad.lost_last) for bad in damage if bad.lost_last >= bad.lost_first]
            self.gaps += [(actor_id, run_id, first, last) for first, last in lost]
        elif tail is not None:
            os.truncate(path, tail[0])
        return chunks

    def _report_tail(
        self, path: Path, data: memoryview, tail: tuple[int, str], kept: int, actor_id: str, run_id: str
    ) -> None:
        """Warn of the torn tail at `tail[0]` that is cut, saying which transitions its record held where it says."""
        offset, why = tail
        held = _seqs_in_torn_record(data, offset, actor_id, run_id)
        if held is None:
            dropped = "the transitions it held are not known"
        else:
            first, count = held
            self.cut_transitions += count
            dropped = f"it dropped the record of transitions {first}..{first + count - 1} ({count} transitions)"
        log.warning(
            "%s: cutting a torn or corrupt tail at byte %d of %d (%s); %d chunks kept; %s",
            path,
            offset,
            len(data),
            why,
            kept,
            dropped,
        )

    def _repair(self, path: Path, data: memoryview, kept: list[tuple[int, int]], damage: list[_Damage]) -> None:
        """Keep the original of a log damaged in the middle beside it, then rewrite it of its intact records alone."""
        try:
            copy = keep_damaged_copy(path)
            rewrite(path, (data[start:end] for start, end in kept))
        except OSError as err:
            raise StoreError(
                f"{path} is damaged in the middle ({len(damage)} stretch(es) of bad bytes, the first at byte "
                f"{damage[0].start}) and cannot be repaired: {err.strerror or err}"
            ) from err
        self.damaged_copies.append(copy)
        for bad in damage:
            lost = max(0, bad.lost_last - bad.lost_first + 1)
            self.damaged_records += 1
            log.error(
                "%s: damaged bytes %d..%d of %d (%s) in the middle of the log, with intact records after them: "
                "%d records before and %d after are kept, the bad bytes taken out; %s; the original file is kept "
                "as %s",
                path,
                bad.start,
                bad.end - 1,
                len(data),
                bad.why,
                bad.kept_before,
                len(kept) - bad.kept_before,
                f"transitions {bad.lost_first}..{bad.lost_last} ({lost}) are lost from the stream"
                if lost
                else "no sequence number is missing around them",
                copy,
            )

    def append(self, chunk: StoredChunk, payload: Payload | None = None) -> int:
        """Queue one record and return its ticket; it is durable once `durable()` reaches the ticket.

        `payload`, when given, must be the wire encoding of exactly this chunk: the received frames of a chunk stored
        whole (a list, written joined) or one frame; it is written as is and must not change until written. Without
        it the chunk is encoded here.
        """
        buffers = _payload_buffers(encode_payload(chunk) if payload is None else payload)
        size = sum(b.nbytes for b in buffers)
        with self._cond:
            self._raise_error()
            if self._closing:
                raise StoreError("the transition store is closed")
            if self._writer is None:
                self._start_direct()
                self._open_pipe()
                self._writer = threading.Thread(target=self._write_loop, name="transition-store", daemon=True)
                self._syncer = threading.Thread(target=self._sync_loop, name="transition-sync", daemon=True)
                self._writer.start()
                self._syncer.start()
            while self._queued_bytes and self._queued_bytes + size > MAX_QUEUED_BYTES and self._error is None:
                self._cond.wait()  # the disk is behind: the receive loop waits rather than queueing without bound
            self._raise_error()
            self.appended += 1
            flags = FLAG_ONLINE if chunk.online else 0
            self._queue.append(_Record((chunk.actor_id, chunk.run_id), flags, buffers, size, self.appended))
            self._queued_bytes += size
            self._cond.notify_all()
            return self.appended

    @property
    def direct(self) -> bool:
        """Whether records are written with O_DIRECT (known once the first append started the writer)."""
        return self._direct is not None

    def _start_direct(self) -> None:
        if self._direct_wanted is False:
            return
        reason = _direct_io_refused(self.directory)
        if reason is None:
            self._direct = _DirectWriter()
        elif self._direct_wanted:
            raise StoreError(f"cannot write {self.directory} with O_DIRECT: {reason}")
        else:
            log.info("transition log in %s written through the page cache (O_DIRECT: %s)", self.directory, reason)

    def durable(self) -> int:
        """The highest ticket whose record, and every one before it, is written and fsync'd; StoreError when the
        writer failed. Also empties `wake_fd`."""
        if self._wake_r >= 0:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        with self._cond:
            self._raise_error()
            return self._durable

    @property
    def wake_fd(self) -> int:
        """A file descriptor that becomes readable when `durable()` has risen (poll it with the sockets)."""
        with self._cond:
            self._open_pipe()
            return self._wake_r

    def _open_pipe(self) -> None:
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)

    def sync(self) -> None:
        """Wait until everything appended so far is durable (StoreError if the writer fails meanwhile)."""
        with self._cond:
            target = self.appended
            while self._durable < target and self._error is None:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        """Write and fsync what is queued, stop both threads and close every file (idempotent)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = (self._writer, self._syncer)
        for thread in threads:
            if thread is not None:
                thread.join()
        self._writer = self._syncer = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._direct is not None:
            self._direct.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._cond:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing the transition log failed: {self._error}") from self._error

    # -- the writer and sync threads ---------------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        """Record the first error of either thread (surfaced by the next append/durable/sync/close) and stop both."""
        log.error("transition log write failed: %s", err)
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()
        self._wake()

    def _write_loop(self) -> None:
        """Write what is queued, group by group; the sync thread makes it durable."""
        while True:
            with self._cond:
                while not self._queue and not self._closing and self._error is None:
                    self._cond.wait()
                if not self._queue or self._error is not None:
                    self._writer_finished = True  # closing with nothing left to write, or failed
                    self._cond.notify_all()
                    return
                group, self._queue = self._queue, []
            try:
                written, new_files = self._write_group(group)
            except BaseException as err:
                self._fail(err)
                return
            with self._cond:
                self._written = group[-1].ticket
                self._dirty.update(written)
                self._new_files = self._new_files or new_files
                self._queued_bytes -= sum(r.size for r in group)
                self._cond.notify_all()

    def _write_group(self, group: list[_Record]) -> tuple[dict[tuple[str, str], int], bool]:
        """Write every record of the group; returns the files written (stream -> fd) and whether one was created."""
        written: dict[tuple[str, str], int] = {}
        new_files = False
        by_stream: dict[tuple[str, str], list[_Record]] = {}
        for record in group:
            by_stream.setdefault(record.key, []).append(record)
        for key, records in by_stream.items():
            fd = self._fds.get(key)
            if fd is None:
                path = self.directory / stream_file_name(*key)
                new_files = new_files or not path.exists()
                if self._direct is not None:
                    fd = self._direct.open(path)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._fds[key] = fd
            buffers: list[bytes | memoryview] = []
            for record in records:
                buffers += [record_header(record.flags, record.payload), *record.payload]
            if self._direct is not None:
                self._direct.write(fd, buffers)
            else:
                _write_all(fd, buffers)
            written[key] = fd
        return written, new_files

    def _sync_loop(self) -> None:
        """fsync what is written and not yet covered, then raise `durable()` to the last ticket written before."""
        while True:
            with self._cond:
                while self._written == self._durable and self._error is None and not self._writer_finished:
                    self._cond.wait()
                if self._error is not None or self._written == self._durable:
                    return  # failed, or closing with everything written made durable
                target, fds, new_files = self._written, list(self._dirty.values()), self._new_files
                self._dirty, self._new_files = {}, False
            try:
                for fd in fds:
                    self._fsync(fd)
                if new_files:
                    fsync_directory(self.directory)
            except BaseException as err:
                self._fail(err)
                return
            with self._cond:
                self._durable = target
                self._cond.notify_all()
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe is awake already
            os.write(self._wake_w, b"\0")


class HeldReplies(Generic[T]):
    """Replies held back until the store has made durable every record appended before each was made.

    `hold(reply)` right after handling the request that made it; `release()` returns, in order, the replies whose
    records are fsync'd. An Ack made after an append is therefore never sent before that append is on disk, and a
    reply that follows it (a Welcome with the acknowledged sequence, a Refuse) never overtakes it.
    """

    def __init__(self, store: TransitionStore) -> None:
        self.store = store
        self._held: deque[tuple[int, T]] = deque()

    def hold(self, reply: T) -> None:
        self._held.append((self.store.appended, reply))

    def release(self) -> list[T]:
        durable = self.store.durable()  # also when nothing is held: it empties the store's wake_fd
        out: list[T] = []
        while self._held and self._held[0][0] <= durable:
            out.append(self._held.popleft()[1])
        return out

    def __len__(self) -> int:
        return len(self._held)


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """os.writev until every byte is written (a regular file may take fewer bytes than asked)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        done = os.writev(fd, views)
        while views and done >= views[0].nbytes:
            done -= views[0].nbytes
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


class _DirectWriter:
    """Writes with O_DIRECT through one page-aligned staging buffer, knowing each file's partial last block.

    `open(path)` opens a stream file for it (O_DIRECT, not O_APPEND) and reads the file's partial last block.
    `write(fd, buffers)` appends the buffers: that block and the buffers are copied into the staging buffer, written
    in whole blocks from the block the file ends in (the last one padded with zeros), and the file is cut back to its
    true length. Only the writer thread calls it.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, STAGING_BYTES)  # anonymous, so page-aligned as O_DIRECT needs
        self._view = memoryview(self._map)
        self._ends: dict[int, tuple[int, bytes]] = {}  # fd -> (offset of its last, partial block; that block's bytes)

    def open(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            size = os.fstat(fd).st_size
            start = size - size % BLOCK
            with open(path, "rb") as f:
                f.seek(start)
                tail = f.read(size - start)
            if len(tail) != size - start:
                raise OSError(errno.EIO, f"{path} shrank while opened")
        except BaseException:
            os.close(fd)
            raise
        self._ends[fd] = (start, tail)
        return fd

    def write(self, fd: int, buffers: list[bytes | memoryview]) -> None:
        start, tail = self._ends[fd]
        view = self._view
        used = len(tail)
        view[:used] = tail
        for buffer in buffers:
            data = memoryview(buffer).cast("B")
            pos = 0
            while pos < data.nbytes:
                n = min(data.nbytes - pos, STAGING_BYTES - used)
                view[used : used + n] = data[pos : pos + n]
                used, pos = used + n, pos + n
                if used == STAGING_BYTES:  # a multiple of BLOCK: written whole, nothing of it kept
                    _pwrite_all(fd, view[:used], start)
                    start, used = start + used, 0
        whole = used - used % BLOCK
        padded = whole + BLOCK if used % BLOCK else whole
        view[used:padded] = bytes(padded - used)
        if padded:
            _pwrite_all(fd, view[:padded], start)
        os.ftruncate(fd, start + used)
        self._ends[fd] = (start + whole, bytes(view[whole:used]))

    def close(self) -> None:
        self._ends.clear()
        self._view.release()
        self._map.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written; O_DIRECT needs every partial write to end on a block boundary."""
    while data.nbytes:
        done = os.pwrite(fd, data, offset)
        if done <= 0 or (done < data.nbytes and done % BLOCK):
            raise OSError(errno.EIO, f"short O_DIRECT write ({done} of {data.nbytes} bytes)")
        data, offset = data[done:], offset + done


def _direct_io_refused(directory: Path) -> str | None:
    """Why files in `directory` cannot be written with O_DIRECT (a block written and removed), or None if they can."""
    if not hasattr(os, "O_DIRECT"):
        return "not available on this platform"
    probe = directory / f".direct-probe-{os.getpid()}-{threading.get_ident()}"
    with contextlib.suppress(OSError):
        probe.unlink()  # one left by a process killed mid-probe whose pid this one got (a container's pid 1)
    block = mmap.mmap(-1, BLOCK)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            _pwrite_all(fd, memoryview(block), 0)
        finally:
            os.close(fd)
    except OSError as err:
        return err.strerror or str(err)
    finally:
        block.close()
        with contextlib.suppress(OSError):
            probe.unlink()
    return None
