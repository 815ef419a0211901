"""The actor's weights archive: every acting-state version the actor swapped in, kept for `robot-rl replay`.

Layout under `DIR/weights/` (one pair of files per version, safetensors only, never pickle):

    v00000012.safetensors   the acting-state tensors (RL actor, critic ensemble, V_BC, normaliser) of version 12
    v00000012.json          manifest: format, version, phase, tensor count, file name, save time
    pins.json               {"pinned": [...]}: versions an evaluation episode acted with

Writes are atomic (a temporary sibling renamed into place; the manifest is renamed last, and its presence is what
makes a version visible), so a killed actor leaves either a whole version or none. A version already archived is not
written again (dedup by version number).

Retention: the newest `keep_last` versions (50 by default) plus every pinned version; older unpinned versions are
deleted after each save. Evaluation episodes pin the versions they use, so the episodes behind a reported success
rate stay replayable for the life of the run; an online episode older than the last 50 versions is not.

`save` can hand the write to a background thread (`background=True`, as the actor does), so the control loop never
waits for the disk; `close()` drains the queue and joins the thread. At most `max_queued` versions wait for the
disk: when the writer falls further behind, the oldest waiting version is dropped (counted in `dropped`, logged), so a
slow disk cannot make the actor's memory grow without bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

from robot_rl.durable import file_hexdigest, replace_atomic, save_tensors
from robot_rl.hardware.interfaces import ClosesOnExit

log = logging.getLogger(__name__)

FORMAT = "robot_rl.weights_archive"
FORMAT_VERSION = 1
DEFAULT_KEEP_LAST = 50
DEFAULT_MAX_QUEUED = 8  # versions waiting for the background writer
PINS_FILE = "pins.json"
_VERSION_FILE = re.compile(r"^v(\d{8})\.json$")


class WeightsArchiveError(ValueError):
    """A version that is not in the archive or cannot be read; the message names the file."""


def _stem(version: int) -> str:
    return f"v{version:08d}"


DIGEST = "tensors_xxh3"  # in a version's manifest: the xxh3-64 of its tensors file (hex), checked on load


def _file_xxh3(path: Path) -> str:
    """xxh3-64 of a file (hex): a fast check of the bytes, made on the archive's writer thread."""
    return file_hexdigest(path, xxhash.xxh3_64())


class WeightsArchive(ClosesOnExit):
    """Versions of the actor's acting state on disk; see the module docstring for layout and retention."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last: int = DEFAULT_KEEP_LAST,
        background: bool = False,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        if keep_last < 1 or max_queued < 1:
            raise ValueError(f"keep_last and max_queued must be >= 1, got {keep_last} and {max_queued}")
        self.root = Path(root)
        self.keep_last = keep_last
        self._lock = threading.Lock()
        self._pinned: set[int] = self._read_pins() if self.root.is_dir() else set()
        self._queue: queue.Queue[tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None] | None = None
        self._worker: threading.Thread | None = None
        self.failures = 0
        self.dropped = 0  # versions dropped unwritten because the writer was max_queued versions behind
        if background:
            self._queue = queue.Queue(maxsize=max_queued)
            self._worker = threading.Thread(target=self._drain, name="weights-archive", daemon=True)
            self._worker.start()

    # -- context manager -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Write everything still queued and stop the background thread (safe to call twice)."""
        if self._worker is not None and self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    # -- writing -------------------------------------------------------------------------------------------------------
    def save(self, version: int, tensors: Mapping[str, torch.Tensor], *, phase: str = "", copy: bool = True) -> None:
        """Archive `tensors` as `version` (skipped when that version is already there), then prune.

        With a background thread the tensors are written later: `copy=True` copies them to CPU now, so the caller may
        reuse them; `copy=False` keeps references (for CPU tensors nobody writes to again, such as a decoded
        broadcast: no 61 MB copy at the actor's swap point).
        """
        if version < 0:
            raise ValueError(f"weights version must be >= 0, got {version}")
        cpu = {
            name: t.detach().to("cpu", copy=copy or t.device.type != "cpu").contiguous() for name, t in tensors.items()
        }
        meta = {"phase": phase, "saved_at": time.time()}
        if self._queue is not None and self._worker is not None:
            while True:
                try:
                    self._queue.put_nowait((version, cpu, meta))
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        dropped = self._queue.get_nowait()
                        if dropped is not None:
                            self.dropped += 1
                            log.warning("weights archive: %s behind the disk, version %s not kept", self.root,
                                        dropped[0])  # fmt: skip
        else:
            self._write(version, cpu, meta)

    def _drain(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except Exception:  # an archive failure must not stop the robot; it is logged and counted
                self.failures += 1
                log.exception("weights archive: version %s could not be written to %s", item[0], self.root)

    def _write(self, version: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            manifest_path = self.root / f"{_stem(version)}.json"
            if manifest_path.is_file():
                return
            tensors_name = f"{_stem(version)}.safetensors"
            replace_atomic(self.root / tensors_name, lambda p: save_tensors(tensors, p))
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": version,
                "tensors_file": tensors_name,
                "tensor_count": len(tensors),
                DIGEST: _file_xxh3(self.root / tensors_name),
                **meta,
            }
            replace_atomic(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
            self._prune()

    def pin(self, version: int) -> None:
        """Keep `version` whatever retention says (an evaluation episode acted with it)."""
        with self._lock:
            if version < 0 or version in self._pinned:
                return
            self._pinned.add(version)
            self.root.mkdir(parents=True, exist_ok=True)
            body = json.dumps({"pinned": sorted(self._pinned)}) + "\n"
            replace_atomic(self.root / PINS_FILE, lambda p: p.write_text(body))

    def _prune(self) -> None:
        kept = set(self.versions()[-self.keep_last :]) | self._pinned
        for version in self.versions():
            if version not in kept:
                # Manifest first: a version without its manifest is invisible, never half there.
                (self.root / f"{_stem(version)}.json").unlink(missing_ok=True)
                (self.root / f"{_stem(version)}.safetensors").unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------------------------------
    def _read_pins(self) -> set[int]:
        path = self.root / PINS_FILE
        if not path.is_file():
            return set()
        try:
            return {int(v) for v in json.loads(path.read_text())["pinned"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsArchiveError(f"weights archive pins {path} cannot be read: {exc}") from exc

    @property
    def pinned(self) -> list[int]:
        return sorted(self._pinned)

    def versions(self) -> list[int]:
        """Archived versions, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION_FILE.match, os.listdir(self.root)) if m)

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and (self.root / f"{_stem(version)}.json").is_file()

    def manifest(self, version: int) -> dict[str, Any]:
        """The manifest of `version`; WeightsArchiveError when it is missing or malformed."""
        path = self.root / f"{_stem(version)}.json"
        if not path.is_file():
            have = self.versions()
            held = f"versions {have[0]}..{have[-1]} ({len(have)})" if have else "no versions"
            raise WeightsArchiveError(
                f"weights version {version} is not in the archive {self.root} ({path.name} missing; it holds {held}; "
                f"retention keeps the last {self.keep_last} versions and every version an evaluation used)"
            )
        try:
            manifest = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsArchiveError(f"weights archive manifest {path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise WeightsArchiveError(f"weights archive manifest {path} is not a JSON object")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise WeightsArchiveError(f"{path} is not a weights archive manifest of format version {FORMAT_VERSION}")
        if manifest.get("version") != version:
            raise WeightsArchiveError(f"{path} says version {manifest.get('version')!r}, expected {version}")
        return manifest

    def load(self, version: int) -> dict[str, torch.Tensor]:
        """The acting-state tensors of `version` (for `Q2RLAgent.load_acting_state`)."""
        manifest = self.manifest(version)
        path = self.root / str(manifest.get("tensors_file", f"{_stem(version)}.safetensors"))
        if path.parent != self.root or not path.is_file():
            raise WeightsArchiveError(f"weights archive tensors {path} are missing")
        digest = manifest.get(DIGEST)  # versions archived before it was recorded lack it
        if digest is not None and _file_xxh3(path) != digest:
            raise WeightsArchiveError(
                f"weights archive tensors {path} are not the bytes that were archived (their hash differs from the "
                f"one {path.with_suffix('.json').name} recorded): the file was damaged or replaced since"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsArchiveError(f"weights archive tensors {path} cannot be read: {exc}") from exc
        bad = next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise WeightsArchiveError(f"weights archive tensors {path}: {bad} holds NaN or inf")
        return tensors
