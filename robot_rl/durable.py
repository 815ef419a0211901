"""Durable file operations: fsync by path, and the repair of a file damaged in the middle that the transition log and
the spill share."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, the file then given the mode a plain open() gives (0o666 less the umask): save_file
    makes it 0600, which keeps other users from reading weights copied to a shared machine."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it (Linux' /proc; 0o022 where that cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def replace_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` a temporary sibling, then rename it over `path`: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through replace_atomic."""
    replace_atomic(path, lambda tmp: tmp.write_text(text))


def file_hexdigest(path: Path, digest: Any) -> str:
    """`digest` (a hashlib-like object: update, hexdigest) of a file's bytes, read in 8 MiB pieces."""
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            digest.update(piece)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (hex)."""
    return file_hexdigest(path, hashlib.sha256())


def refuse_nearly_full_disk(path: Path, min_free_mb: float, setting: str) -> None:
    """OSError(ENOSPC) naming `path` when its filesystem has less than `min_free_mb` free (0 turns the check off): said
    before a write fails midway, which HDF5 does not always survive cleanly. `setting` names the config field."""
    if min_free_mb <= 0:
        return
    free = shutil.disk_usage(path).free
    if free < min_free_mb * 1e6:
        raise OSError(
            errno.ENOSPC,
            f"{free / 1e6:.0f} MB free, below {setting}={min_free_mb:g}; stopped before a write would fail",
            str(path),
        )


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (a directory: so that entries created or renamed in it survive a
    crash); OSError where it cannot be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """fsync_path of a directory, skipped where it cannot be (some filesystems refuse a directory's fsync)."""
    with contextlib.suppress(OSError):
        fsync_path(directory)


def keep_damaged_copy(path: Path) -> Path:
    """Keep `path`'s bytes beside it as `<name>.damaged-<UTC time>` (a hard link: the file is then rewritten into a
    new one, so the linked original never changes; else a copy, fsync'd); returns the copy's path."""
    copy = path.with_name(f"{path.name}.damaged-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}")
    try:
        os.link(path, copy)
    except OSError:
        shutil.copyfile(path, copy)
        with open(copy, "rb") as f:
            os.fsync(f.fileno())
    fsync_directory(path.parent)
    return copy


def rewrite(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
    """Replace `path` atomically by the concatenation of `pieces` (a new file fsync'd, renamed over it)."""
    tmp = path.with_name(f".{path.name}.repair")
    with open(tmp, "wb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
