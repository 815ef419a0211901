"""BC policies: construction, training behaviour, validation and checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import distributions as td

from robot_rl.bc import (
    BCCheckpointError,
    GaussianBCPolicy,
    GMMBCPolicy,
    bc_fingerprint,
    load_bc,
    make_bc_policy,
    save_bc,
    train_bc,
)
from robot_rl.config import BCConfig
from robot_rl.distributions import DiagGaussian, GaussianMixture
from robot_rl.obs import state_spec

torch.set_num_threads(1)

OBS_DIM, ACTION_DIM = 3, 2
OBS_LOW = np.array([-2.0, 0.0, -1.0], dtype=np.float32)
OBS_HIGH = np.array([2.0, 4.0, 1.0], dtype=np.float32)
SPEC = state_spec(OBS_DIM)


def _cfg(policy: str = "gaussian", **overrides: object) -> BCConfig:
    base = {"policy": policy, "hidden": [64, 64], "num_modes": 3, "steps": 400, "batch_size": 128, "lr": 3e-3}
    return BCConfig.model_validate(base | overrides)


def _policy(cfg: BCConfig, seed: int = 0) -> GaussianBCPolicy | GMMBCPolicy:
    torch.manual_seed(seed)
    return make_bc_policy(cfg, SPEC, ACTION_DIM, OBS_LOW, OBS_HIGH)


def _target(obs: np.ndarray) -> np.ndarray:
    """A smooth function of the observation with values well inside [-1, 1]."""
    x = (obs - OBS_LOW) / (OBS_HIGH - OBS_LOW) * 2 - 1
    return np.stack([0.7 * np.sin(2.0 * x[:, 0]) * x[:, 2], 0.5 * x[:, 1] - 0.3 * x[:, 0]], axis=1)


def _smooth_dataset(n: int, seed: int, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.uniform(OBS_LOW, OBS_HIGH, size=(n, OBS_DIM)).astype(np.float32)
    actions = np.clip(_target(obs) + noise * rng.standard_normal((n, ACTION_DIM)), -1, 1)
    return obs, actions.astype(np.float32)


def _bimodal_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each action is +0.6 or -0.6 (per dimension, at random) plus small noise: one Gaussian cannot fit it."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(OBS_LOW, OBS_HIGH, size=(n, OBS_DIM)).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], size=(n, 1))
    actions = 0.6 * signs * np.ones((1, ACTION_DIM)) + 0.05 * rng.standard_normal((n, ACTION_DIM))
    return obs, actions.astype(np.float32)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def _o(x: np.ndarray) -> dict[str, torch.Tensor]:
    """A batch of state vectors as the dict observation the policies take."""
    return {"ee_pose": _t(x)}


def _d(x: np.ndarray) -> dict[str, np.ndarray]:
    """A dataset's state vectors as the dict of arrays train_bc takes."""
    return {"ee_pose": x}


# ------------------------------------------------------------------------------------------------------------
# Construction and interface
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "cls", "dist_cls"),
    [("gaussian", GaussianBCPolicy, DiagGaussian), ("gmm", GMMBCPolicy, GaussianMixture)],
)
def test_policy_outputs_have_batch_shapes_and_bounded_parameters(kind: str, cls: type, dist_cls: type) -> None:
    cfg = _cfg(kind, min_std=0.05)
    policy = _policy(cfg)
    assert isinstance(policy, cls)
    obs = _o(np.random.default_rng(0).uniform(OBS_LOW - 5, OBS_HIGH + 5, size=(7, OBS_DIM)))
    dist = policy.dist(obs)
    assert isinstance(dist, dist_cls)
    assert policy.sample(obs, torch.Generator().manual_seed(0)).shape == (7, ACTION_DIM)
    assert policy.mode(obs).shape == (7, ACTION_DIM)
    assert policy.log_prob(obs, torch.zeros(7, ACTION_DIM)).shape == (7,)
    assert policy.entropy(obs).shape == (7,)
    means = dist.mean if isinstance(dist, DiagGaussian) else dist.means
    stds = dist.std if isinstance(dist, DiagGaussian) else dist.stds
    assert torch.all(means.abs() <= 1.0)
    assert torch.all(stds >= 0.05)
    if isinstance(dist, GaussianMixture):
        assert dist.logits.shape == (7, 3) and dist.means.shape == (7, 3, ACTION_DIM)
    policy.reset()  # a no-op, but part of the interface


def test_observations_are_normalised_to_unit_box_by_the_stored_bounds() -> None:
    policy = _policy(_cfg())
    corners = _t(np.stack([OBS_LOW, OBS_HIGH, (OBS_LOW + OBS_HIGH) / 2]))
    expected = torch.tensor([[-1.0] * OBS_DIM, [1.0] * OBS_DIM, [0.0] * OBS_DIM])
    torch.testing.assert_close(policy.encoder.normalizer(corners), expected)
    assert {"encoder.normalizer.center", "encoder.normalizer.half_range"} <= set(policy.state_dict())


def test_policy_sampling_follows_the_generator_and_matches_its_distribution() -> None:
    policy = _policy(_cfg("gmm"))
    obs = _o(np.tile(OBS_LOW, (4, 1)))
    a = policy.sample(obs, torch.Generator().manual_seed(3))
    b = policy.sample(obs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not a.requires_grad
    dist = policy.dist(obs)
    reference = td.MixtureSameFamily(
        td.Categorical(logits=dist.logits), td.Independent(td.Normal(dist.means, dist.stds), 1)
    )
    torch.testing.assert_close(policy.log_prob(obs, a), reference.log_prob(a))


@pytest.mark.parametrize(
    ("low", "high", "match"),
    [
        (np.zeros(2), np.ones(2), "shape"),
        (np.zeros(3), np.array([1.0, 0.0, 1.0]), "exceed"),
        (np.zeros(3), np.array([1.0, np.inf, 1.0]), "finite"),
    ],
)
def test_bad_observation_bounds_are_refused(low: np.ndarray, high: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_bc_policy(_cfg(), SPEC, ACTION_DIM, low, high)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_training_reduces_nll_and_mode_approaches_the_function(kind: str) -> None:
    obs, actions = _smooth_dataset(2000, seed=1)
    policy = _policy(_cfg(kind))
    test_obs, _ = _smooth_dataset(500, seed=2)
    before = float(np.mean((policy.mode(_o(test_obs)).numpy() - _target(test_obs)) ** 2))
    calls: list[tuple[int, float]] = []
    stats = train_bc(policy, _d(obs), actions, policy.cfg, seed=0, progress=lambda s, v: calls.append((s, v)))
    after = float(np.mean((policy.mode(_o(test_obs)).numpy() - _target(test_obs)) ** 2))
    assert stats["final_nll"] < stats["initial_nll"] - 2.0, stats
    assert after < 0.003 and before > 0.03, (before, after)  # noise variance is 0.0025
    assert [s for s, _ in calls] == [100, 200, 300, 400]
    assert calls[-1][1] < calls[0][1]
    if kind == "gaussian":
        # The learnt std is about the data's 0.05: the entropy of N(0, 0.05^2 I_2) is about -3.15 nats.
        entropy = float(policy.entropy(_o(test_obs)).mean().detach())
        assert abs(entropy - 2 * 0.5 * np.log(2 * np.pi * np.e * 0.05**2)) < 0.3, entropy


def test_gmm_fits_bimodal_actions_better_than_a_gaussian() -> None:
    obs, actions = _bimodal_dataset(2000, seed=3)
    test_obs, test_actions = _bimodal_dataset(1000, seed=4)
    held_out = {}
    for kind in ("gaussian", "gmm"):
        policy = _policy(_cfg(kind, steps=300))
        train_bc(policy, _d(obs), actions, policy.cfg, seed=0)
        with torch.no_grad():
            held_out[kind] = float(policy.log_prob(_o(test_obs), _t(test_actions)).mean())
        if kind == "gmm":
            # Samples land near the two modes, not in the gap between them (where a Gaussian's mean is).
            draws = policy.sample(_o(test_obs), torch.Generator().manual_seed(0)).numpy()
            assert np.mean(np.abs(draws[:, 0]) < 0.3) < 0.05
    # Best single Gaussian: std ~0.6 per dim (about 1.8 nats NLL for 2 dims); the mixture reaches about -1.8.
    assert held_out["gmm"] > held_out["gaussian"] + 2.0, held_out


def test_training_is_deterministic_under_the_seed() -> None:
    obs, actions = _smooth_dataset(500, seed=5)
    cfg = _cfg("gmm", steps=30)
    runs = []
    for seed in (0, 0, 1):
        policy = _policy(cfg, seed=0)
        train_bc(policy, _d(obs), actions, cfg, seed=seed)
        runs.append(policy.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_actions_at_the_boundary_up_to_round_off_are_accepted() -> None:
    obs, actions = _smooth_dataset(64, seed=6)
    actions[0, 0] = 1.0 + 1e-7
    policy = _policy(_cfg(steps=2))
    stats = train_bc(policy, _d(obs), actions, policy.cfg, seed=0)
    assert np.isfinite(stats["final_nll"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o, a: (o.copy()[:, :2], a), r"obs\['ee_pose'\] must have shape"),
        (lambda o, a: (o, a[:, :1]), r"actions must have shape"),
        (lambda o, a: (o, a[:-1]), r"obs\['ee_pose'\] must have shape \(63, 3\), got \(64, 3\)"),
        (lambda o, a: (o[:0], a[:0]), r"empty"),
        (
            lambda o, a: (np.where(np.arange(len(o))[:, None] == 3, np.nan, o), a),
            r"obs\['ee_pose'\] has non-finite.*first: 3",
        ),
        (lambda o, a: (o, np.where(np.arange(len(a))[:, None] == 5, np.inf, a)), r"actions has non-finite"),
        (lambda o, a: (o, a * 1.5 + np.sign(a) * 0.6), r"\[-1, 1\]"),
    ],
)
def test_training_refuses_bad_data(mutate: object, match: str) -> None:
    obs, actions = _smooth_dataset(64, seed=7)
    bad_obs, bad_actions = mutate(obs, actions)  # type: ignore[operator]
    policy = _policy(_cfg(steps=2))
    with pytest.raises(ValueError, match=match):
        train_bc(policy, _d(bad_obs), bad_actions, policy.cfg, seed=0)


def test_training_refuses_observations_not_keyed_like_the_spec() -> None:
    obs, actions = _smooth_dataset(64, seed=7)
    policy = _policy(_cfg(steps=2))
    with pytest.raises(ValueError, match=r"obs must be a dict"):
        train_bc(policy, obs, actions, policy.cfg, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"obs lacks key 'ee_pose'"):
        train_bc(policy, {"joints": obs}, actions, policy.cfg, seed=0)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "gmm"])
def test_save_load_round_trip_gives_identical_outputs(kind: str, tmp_path: Path) -> None:
    obs, actions = _smooth_dataset(300, seed=8)
    policy = _policy(_cfg(kind, steps=20, min_std=0.02))
    train_bc(policy, _d(obs), actions, policy.cfg, seed=0)
    save_bc(policy, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"bc.safetensors", "bc.json"}
    loaded = load_bc(tmp_path / "ckpt")
    assert type(loaded) is type(policy)
    assert loaded.cfg == policy.cfg and not loaded.training
    for name in ("center", "half_range"):
        assert torch.equal(getattr(loaded.encoder.normalizer, name), getattr(policy.encoder.normalizer, name))
    probe = _o(np.random.default_rng(9).uniform(OBS_LOW - 1, OBS_HIGH + 1, size=(16, OBS_DIM)))
    probe_actions = _t(np.random.default_rng(10).uniform(-1, 1, size=(16, ACTION_DIM)))
    assert torch.equal(loaded.mode(probe), policy.mode(probe))
    assert torch.equal(loaded.log_prob(probe, probe_actions), policy.log_prob(probe, probe_actions))
    assert torch.equal(loaded.entropy(probe), policy.entropy(probe))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(loaded.sample(probe, g1), policy.sample(probe, g2))


def _saved(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    save_bc(_policy(_cfg("gmm")), directory)
    return directory


def test_missing_checkpoint_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BCCheckpointError, match=r"bc\.json is missing"):
        load_bc(tmp_path / "nowhere")
    directory = _saved(tmp_path)
    (directory / "bc.safetensors").unlink()
    with pytest.raises(BCCheckpointError, match=r"bc\.safetensors are missing"):
        load_bc(directory)


def test_corrupted_weights_name_the_file(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    weights = directory / "bc.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BCCheckpointError, match=r"bc\.safetensors are not the bytes that were saved"):
        load_bc(directory)
    # A policy saved before bc.json recorded the weights' digest: the read itself fails, naming the file.
    manifest = json.loads((directory / "bc.json").read_text())
    del manifest["tensors_sha256"]
    (directory / "bc.json").write_text(json.dumps(manifest))
    with pytest.raises(BCCheckpointError, match=r"bc\.safetensors cannot be read"):
        load_bc(directory)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(BCCheckpointError, match=r"bc\.safetensors cannot be read"):
        load_bc(directory)


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    """A policy that learned NaN (or a damaged file) would sample NaN actions, or fail deep inside torch."""
    directory = _saved(tmp_path)
    policy = load_bc(directory)
    tensors = policy.state_dict()
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 1 and "normalizer" not in n)
    with torch.no_grad():
        tensors[name].view(-1)[0] = float("nan")  # the policy's own tensor: saved as it learned it
    save_bc(policy, directory)
    with pytest.raises(BCCheckpointError, match=rf"bc\.safetensors: {re.escape(name)} holds NaN or inf"):
        load_bc(directory)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: "{not json", r"bc\.json is not valid JSON"),
        (lambda m: json.dumps(m | {"format_version": 99}), r"format_version 99"),
        (lambda m: json.dumps(m | {"format": "other"}), r"not a BC checkpoint"),
        (lambda m: json.dumps(m | {"kind": "gaussian"}), r"disagrees with config.policy"),
        (lambda m: json.dumps(m | {"config": m["config"] | {"num_modes": 0}}), r"BC config is invalid"),
        (lambda m: json.dumps(m | {"obs_spec": "3"}), r"obs_spec must be a non-empty mapping"),
        (lambda m: json.dumps(m | {"obs_spec": {"ee_pose": 3}}), r"obs_spec\['ee_pose'\] is not \[shape, dtype\]"),
        (lambda m: json.dumps(m | {"obs_spec": {"ee_pose": [[0], "float32"]}}), r"obs_spec\['ee_pose'\] has shape"),
        (lambda m: json.dumps(m | {"obs_spec": {"ee_pose": [[4], "float32"]}}), r"bc\.safetensors do not match"),
        (lambda m: json.dumps(m | {"action_dim": 4}), r"bc\.safetensors do not match"),
    ],
)
def test_malformed_manifest_names_the_file(tmp_path: Path, edit: object, match: str) -> None:
    directory = _saved(tmp_path)
    manifest_path = directory / "bc.json"
    manifest_path.write_text(edit(json.loads(manifest_path.read_text())))  # type: ignore[operator]
    with pytest.raises(BCCheckpointError, match=match):
        load_bc(directory)


def test_the_fingerprint_survives_save_and_load_and_tells_policies_apart(tmp_path: Path) -> None:
    policy = _policy(_cfg("gmm"))
    loaded = load_bc(save_bc(policy, tmp_path / "bc"))
    assert bc_fingerprint(loaded) == bc_fingerprint(policy)
    assert bc_fingerprint(_policy(_cfg("gmm"), seed=1)) != bc_fingerprint(policy)
    with torch.no_grad():
        next(loaded.parameters()).view(-1)[0] += 1e-6  # one value, barely changed
    assert bc_fingerprint(loaded) != bc_fingerprint(policy)
