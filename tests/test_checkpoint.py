"""Checkpoint files: a save is durable and whole, and a pair of files from two saves is refused."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from robot_rl.checkpoint import CheckpointError, load_checkpoint, prune_checkpoints, save_checkpoint


def _save(path: Path, value: float, step: int) -> Path:
    weight = torch.full((4, 3), value)
    optimizer = torch.optim.Adam([torch.nn.Parameter(weight.clone())])
    return save_checkpoint(
        path, tensors={"w": weight}, manifest={"step": step}, optimizers={"adam": optimizer.state_dict()}
    )


def test_a_checkpoint_reads_back_what_was_saved_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", 2.0, 7)
    tensors, manifest, optimizers = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((4, 3), 2.0)) and manifest["step"] == 7
    assert optimizers["adam"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    _save(path, 3.0, 8)  # overwritten in place by the next save
    tensors, manifest, _ = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((4, 3), 3.0)) and manifest["step"] == 8


@pytest.mark.parametrize("kept", ["model.safetensors", "manifest.json"])
def test_files_of_two_saves_are_refused_as_torn(tmp_path: Path, kept: str) -> None:
    """A crash between the two renames of a save leaves one file new and the other old: refused, not restored."""
    old, new = _save(tmp_path / "old", 1.0, 1), _save(tmp_path / "new", 2.0, 2)
    shutil.copy(old / kept, new / kept)
    with pytest.raises(CheckpointError, match="torn"):
        load_checkpoint(new)


def test_a_checkpoint_of_an_earlier_format_without_a_write_id_still_loads(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", 1.5, 3)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["write_id"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    tensors, manifest, _ = load_checkpoint(path)
    assert manifest["step"] == 3 and torch.equal(tensors["w"], torch.full((4, 3), 1.5))


def test_a_checkpoint_saved_before_the_digest_still_loads(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", 1.5, 3)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["write_id"], manifest["tensors_sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    tensors, manifest, _ = load_checkpoint(path)
    assert manifest["step"] == 3 and torch.equal(tensors["w"], torch.full((4, 3), 1.5))


def test_damaged_tensor_bytes_are_refused(tmp_path: Path) -> None:
    """Bytes changed inside the tensor data still parse as safetensors (other numbers): the digest refuses them."""
    path = _save(tmp_path / "ckpt", 1.5, 3)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-20] ^= 0x01  # the low bit of a float32 in the last tensor's data
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors are not the bytes that were saved"):
        load_checkpoint(path)


def test_a_checkpoint_of_diverged_networks_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", float("nan"), 3)
    with pytest.raises(CheckpointError, match=r"tensor w holds NaN or inf"):
        load_checkpoint(path)


def test_pruning_keeps_the_newest_periodic_checkpoints_and_every_other_one(tmp_path: Path) -> None:
    for step in (900, 1000, 200, 10_000, 5000):
        _save(tmp_path / f"step_{step:08d}", 1.0, step)
    for name in ("latest", "final"):
        _save(tmp_path / name, 1.0, 0)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000200", "step_00000900", "step_00001000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "latest", "step_00005000", "step_00010000"]
    assert prune_checkpoints(tmp_path, keep=2) == []


def test_weights_files_get_the_mode_the_umask_gives_not_owner_only(tmp_path: Path) -> None:
    """safetensors writes 0600; checkpoints and BC policies are copied between machines and users, so their weights
    files get what a plain open() would give under the umask, as the JSON beside them does."""
    import numpy as np

    from robot_rl.bc import make_bc_policy, save_bc
    from robot_rl.config import BCConfig
    from robot_rl.obs import state_spec

    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "ckpt", tensors={"w": torch.ones(2)}, manifest={})
        policy = make_bc_policy(BCConfig(hidden=[8]), state_spec(6), 6, -np.ones(6, np.float32), np.ones(6, np.float32))
        save_bc(policy, tmp_path / "bc")
    finally:
        os.umask(old)
    for path in (tmp_path / "ckpt" / "model.safetensors", tmp_path / "bc" / "bc.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
