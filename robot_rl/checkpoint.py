"""Checkpoints: tensors in safetensors, everything else in a JSON manifest (design §9). No pickle anywhere.

Optimizer state dicts are split: their tensors go to safetensors under `optim.<name>.<path>`, their plain values
(step counts, hyper-parameters, parameter ids) to the manifest, and they are merged back on load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from robot_rl.durable import file_sha256, fsync_path, save_tensors

FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
WRITE_ID = "write_id"  # in the manifest and the tensors' metadata: the two files of one save carry the same one
DIGEST = "tensors_sha256"  # in the manifest: the tensors file's SHA-256 (checkpoints saved before it lack it)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def _split(prefix: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into `tensors`, leaving a JSON-able skeleton with references."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_key(k), _split(f"{prefix}.{k}", v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_split(f"{prefix}.{i}", v, tensors) for i, v in enumerate(value)]
    return value


def _key(k: Any) -> Any:
    if not isinstance(k, str | int | float | bool) and k is not None:
        raise TypeError(f"unsupported key type in state dict: {type(k).__name__}")
    return k


def _merge(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: _merge(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_merge(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(
    directory: str | Path,
    *,
    tensors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    optimizers: dict[str, dict] | None = None,
) -> Path:
    """Write tensors + manifest durably: each to a temporary file, fsync'd, renamed into place, then the directory
    fsync'd. Both files carry one write id, so a pair torn by a crash between the two renames (new tensors, old
    manifest) is refused by load_checkpoint instead of restoring tensors and counters of different steps."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    skeletons = {name: _split(f"optim.{name}", state, all_tensors) for name, state in (optimizers or {}).items()}
    write_id = uuid.uuid4().hex
    body = {"format_version": FORMAT_VERSION, **manifest, WRITE_ID: write_id, "optimizers": skeletons}
    tmp_tensors = directory / (TENSORS_FILE + ".tmp")
    tmp_manifest = directory / (MANIFEST_FILE + ".tmp")
    save_tensors(all_tensors, tmp_tensors, metadata={WRITE_ID: write_id})
    body[DIGEST] = file_sha256(tmp_tensors)
    tmp_manifest.write_text(json.dumps(body, indent=2, sort_keys=False))
    for path in (tmp_tensors, tmp_manifest):
        fsync_path(path)
    os.replace(tmp_tensors, directory / TENSORS_FILE)
    os.replace(tmp_manifest, directory / MANIFEST_FILE)
    fsync_path(directory)
    if created:  # the new directory's entry in its parent
        fsync_path(directory.parent)
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict]]:
    """Returns (tensors, manifest, optimizer states)."""
    directory = Path(directory)
    manifest_path, tensors_path = directory / MANIFEST_FILE, directory / TENSORS_FILE
    for path in (manifest_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint manifest {manifest_path} has format_version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint tensors {tensors_path} cannot be read: {exc}") from exc
    write_id = manifest.pop(WRITE_ID, None)
    if write_id is not None and metadata.get(WRITE_ID) != write_id:
        raise CheckpointError(
            f"checkpoint {directory} is torn: {TENSORS_FILE} and {MANIFEST_FILE} come from different saves "
            "(a crash while it was written)"
        )
    digest = manifest.pop(DIGEST, None)
    if digest is not None and file_sha256(tensors_path) != digest:
        raise CheckpointError(
            f"checkpoint tensors {tensors_path} are not the bytes that were saved (their SHA-256 differs from the "
            f"one {MANIFEST_FILE} recorded): the file was damaged or changed since; use another checkpoint"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"checkpoint {directory}: tensor {name} holds NaN or inf (saved from diverged networks?); use an "
                "earlier checkpoint"
            )
    skeletons = manifest.pop("optimizers", {})
    try:
        optimizers = {name: _merge(skel, tensors) for name, skel in skeletons.items()}
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {directory} lacks optimizer tensor {exc}") from exc
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    return model_tensors, manifest, optimizers


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` periodic checkpoints (`root/step_<zero-padded step>`); `latest`, `final` and
    anything else in `root` stay. Returns what was removed."""
    steps = sorted(p for p in Path(root).glob("step_*") if p.is_dir())
    old = steps[: max(len(steps) - keep, 0)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old
