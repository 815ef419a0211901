"""Disk ceiling for the learner's transition log: chunks of image transitions written and fsync'd in groups.

    python bench/disk.py [--dir DIR] [--seconds 4] [--groups 1,4,16] [--window 16]

Writes chunks of 30 two-camera transitions (30 x 43,859 bytes, the wire size of a chunk of consecutive steps) to a
file in DIR (default: the current directory, where a run directory would be), and syncs after every `group` chunks:
appended and fsync'd on one thread, and into a preallocated file with fdatasync for comparison. The last two rows
drive the learner's own store (learner.store.TransitionStore: a writer thread appends, a sync thread fsyncs what is
written meanwhile, checksums included) with at most --window chunks not yet durable, as an actor's window allows:
through the page cache ("cached"), then as the learner runs it (O_DIRECT where the file system takes it).
Files are deleted afterwards. Before the disk rows, the CPU cost of checksumming one chunk: XXH3 (what the store
writes since the log's "RRLX" records) against zlib's crc32 (the earlier "RRLT" records). The last line is the
headline: what the disk allows the store.
"""

from __future__ import annotations

import argparse
import os
import select
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_main

from robot_rl.learner.store import FLAG_ONLINE, StoredChunk, TransitionStore, _checksum, _crc32_checksum

CHUNK_TRANSITIONS = 30
TRANSITION_BYTES = 43_859  # two 84x84x3 uint8 cameras + the pose, next observation shared (bench/transport.py)


def measure(directory: str, seconds: float, group: int, *, preallocate: bool) -> float:
    """Transitions per second written and synced."""
    chunk = os.urandom(CHUNK_TRANSITIONS * TRANSITION_BYTES)
    sync: Callable[[int], None] = os.fdatasync if preallocate else os.fsync
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".disk-bench-") as f:
        fd = f.fileno()
        if preallocate:
            os.posix_fallocate(fd, 0, 16 << 30)
        chunks, offset = 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(group):
                if preallocate:
                    os.pwrite(fd, chunk, offset)
                else:
                    os.write(fd, chunk)
                offset += len(chunk)
                chunks += 1
            sync(fd)
        elapsed = time.perf_counter() - start
    return chunks * CHUNK_TRANSITIONS / elapsed


def checksum_ms(name: str, repeats: int = 200) -> float:
    """Milliseconds to checksum one chunk's bytes, best of three rounds (`name`: "xxh3" or "crc32")."""
    chunk = os.urandom(CHUNK_TRANSITIONS * TRANSITION_BYTES)
    fn = {"xxh3": _checksum, "crc32": _crc32_checksum}[name]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(FLAG_ONLINE, chunk)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def measure_store(directory: str, seconds: float, window: int, *, direct: bool | None = None) -> float:
    """Transitions per second made durable by the learner's TransitionStore, at most `window` chunks pending
    (`direct`: the store's O_DIRECT choice; None lets it probe the file system, as the learner does)."""
    payload = os.urandom(CHUNK_TRANSITIONS * TRANSITION_BYTES)
    chunk = StoredChunk("bench", "disk", 0, {}, online=True)  # the record's stream and flags; the payload is given
    with (
        tempfile.TemporaryDirectory(dir=directory, prefix=".disk-bench-") as where,
        TransitionStore(Path(where), direct=direct) as store,
    ):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if store.appended - store.durable() >= window:
                select.select([store.wake_fd], [], [], 1.0)  # until a sync completes (durable() empties the pipe)
                continue
            store.append(chunk, payload)
        store.sync()
        elapsed = time.perf_counter() - start
        return store.durable() * CHUNK_TRANSITIONS / elapsed


def _store_writes_direct(directory: str) -> bool:
    """Whether the learner's store writes with O_DIRECT in `directory` (what its probe finds)."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".disk-bench-") as where:
        store = TransitionStore(Path(where))
        try:
            store.append(StoredChunk("bench", "probe", 0, {}, online=True), b"x")
            return store.direct
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".", help="Directory on the disk to measure.")
    parser.add_argument("--seconds", type=bench_main.positive_float, default=4.0, help="Seconds per row.")
    parser.add_argument("--groups", default="1,4,16", help="Chunks per sync, comma-separated.")
    parser.add_argument(
        "--window", type=bench_main.positive_int, default=16, help="Chunks pending at most in the store row."
    )
    args = parser.parse_args()
    where = os.path.abspath(args.dir)
    print(f"chunks of {CHUNK_TRANSITIONS} x {TRANSITION_BYTES:,} B in {where}, {args.seconds:g} s per row")
    for name in ("xxh3", "crc32"):
        ms = checksum_ms(name)
        print(f"checksum {name:<6} {ms:.3f} ms per chunk ({CHUNK_TRANSITIONS * TRANSITION_BYTES / ms / 1e6:.1f} GB/s)")
    print(f"{'chunks per sync':>15} {'how':<22} {'transitions/s':>14} {'MB/s':>8}")
    best = 0.0
    for group in (int(g) for g in args.groups.split(",")):
        for preallocate, how in ((False, "append + fsync"), (True, "prealloc + fdatasync")):
            rate = measure(args.dir, args.seconds, group, preallocate=preallocate)
            if not preallocate:  # what the store does
                best = max(best, rate)
            print(f"{group:>15} {how:<22} {rate:>14,.0f} {rate * TRANSITION_BYTES / 1e6:>8.0f}")
    buffered = measure_store(args.dir, args.seconds, args.window, direct=False)
    mb = buffered * TRANSITION_BYTES / 1e6
    print(f"{args.window:>15} {'TransitionStore cached':<22} {buffered:>14,.0f} {mb:>8.0f}")
    rate = measure_store(args.dir, args.seconds, args.window)
    how = "TransitionStore" + (" direct" if _store_writes_direct(args.dir) else "")
    print(f"{args.window:>15} {how:<22} {rate:>14,.0f} {rate * TRANSITION_BYTES / 1e6:>8.0f}")
    print(
        f"headline: the learner's store makes {rate:,.0f} two-camera transitions/s durable "
        f"(one thread writing and syncing in turn: {best:,.0f}/s at best)"
    )


if __name__ == "__main__":
    bench_main.run(main)
