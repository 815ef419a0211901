"""Compact acting networks (int8 weight-only linears, bf16 convolutions) and the agent's acting precision/threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robot_rl import compact as compact_module
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy
from robot_rl.compact import (
    Bf16Convs,
    Int8EnsembleLinear,
    Int8Linear,
    compact_copy,
    joint_encoder,
    quantize_rows,
)
from robot_rl.config import AgentConfig, BCConfig, EncoderConfig
from robot_rl.networks import EnsembleLinear

SIZE = 40
SPEC = {"ee_pose": ((6,), "float32"), "front": ((SIZE, SIZE, 3), "uint8"), "wrist": ((SIZE, SIZE, 3), "uint8")}
LOW, HIGH = -np.ones(6, np.float32), np.ones(6, np.float32)
ENC = EncoderConfig(channels=[16, 32], feature_dim=32, shift_pad=2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def random_obs(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n observations of SPEC: uniform state in [-1, 1], uniform uint8 pixels."""
    out = {}
    for key, (shape, dtype) in SPEC.items():
        if dtype == "uint8":
            out[key] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        else:
            out[key] = rng.uniform(-1, 1, (n, *shape)).astype(dtype)
    return out


def make_agent(seed: int = 0, **overrides) -> Q2RLAgent:
    """Layers wide enough to be quantised (256 x 256 >= compact.MIN_INT8_WEIGHTS); the same BC policy every time."""
    torch.manual_seed(0)
    cfg = AgentConfig(hidden=[256, 256], num_critics=5, batch_size=16, encoder=ENC, **overrides)
    bc = make_bc_policy(BCConfig(hidden=[256, 256], num_modes=2, encoder=ENC), SPEC, 6, LOW, HIGH)
    agent = Q2RLAgent(cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=6, bc_policy=bc, seed=seed)
    return agent.eval()


def test_quantize_rows_bounds_the_error_by_half_a_step_and_pads_the_width():
    w = torch.randn(7, 45) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different scales
    w[3] = 0.0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == (7, 64) and bool((q[:, 45:] == 0).all())
    assert float(scales[3]) == 1.0 and bool((q[3] == 0).all())
    err = (q[:, :45].float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())
    assert int(q.abs().max()) == 127  # each row's largest weight uses the full range
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))


@pytest.fixture(params=["kernel", "fallback"])
def int8_path(request, monkeypatch):
    """Both ways of computing an int8 layer: torch's int8 kernel, or (where it is missing) the dequantised weights."""
    if request.param == "fallback":
        monkeypatch.setattr(compact_module, "_int8_kernel_works", lambda device_type: False)
    return request.param


def test_int8_linear_tracks_the_float_layer(int8_path):
    torch.manual_seed(0)
    layer = nn.Linear(300, 512)
    compact = Int8Linear(layer)
    assert compact.rows.fast == (int8_path == "kernel")
    x = torch.randn(3, 300)
    with torch.no_grad():
        ref, out = layer(x), compact(x)
    assert out.dtype == torch.float32 and out.shape == (3, 512)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.01, rel


def test_int8_ensemble_linear_matches_per_member_layers_shared_input_or_not(int8_path):
    torch.manual_seed(1)
    layer = EnsembleLinear(4, 300, 256)
    compact = Int8EnsembleLinear(layer)
    shared = torch.randn(2, 300).unsqueeze(0).expand(4, -1, -1)  # the critics' first layer: one input for all
    separate = torch.randn(4, 2, 300)
    with torch.no_grad():
        for x in (shared, separate):
            ref, out = layer(x), compact(x)
            assert out.shape == ref.shape == (4, 2, 256)
            for k in range(4):  # every member within 1% of its own float output
                assert float((out[k] - ref[k]).norm() / ref[k].norm()) < 0.01
        # The stacked product for a shared input equals the per-member product on the same values.
        np.testing.assert_allclose(compact(shared).numpy(), compact(shared.contiguous()).numpy(), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="every member"):
        compact(shared, torch.tensor([0, 1]))


def test_compact_copy_leaves_the_original_and_replaces_the_large_layers():
    agent = make_agent()
    before = {k: v.clone() for k, v in agent.critics.state_dict().items()}
    critics = compact_copy(agent.critics)
    encoder = compact_copy(agent.encoder)
    for k, v in agent.critics.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(isinstance(m, EnsembleLinear) for m in agent.critics.linears)  # the original keeps float layers
    assert isinstance(critics.linears[1], Int8EnsembleLinear)  # 256 x 256 per member
    # Too small to be worth it: the first layer (76 inputs x 256 per member) and the heads (256 -> 1).
    assert isinstance(critics.linears[0], EnsembleLinear) and isinstance(critics.head, EnsembleLinear)
    assert isinstance(encoder.cameras[0].convs, Bf16Convs)
    assert not any(p.requires_grad for p in critics.parameters())
    rng = np.random.default_rng(0)
    obs = agent.obs_tensors(random_obs(4, rng))
    with torch.no_grad():
        f_ref, f_out = agent.encoder(obs), encoder(obs)
        assert float((f_out - f_ref).norm() / f_ref.norm()) < 0.02
        a = torch.as_tensor(rng.uniform(-1, 1, (4, 6)).astype(np.float32))
        q_ref, q_out = agent.critics(f_ref, a), critics(f_ref, a)
        assert float((q_out - q_ref).norm() / q_ref.norm()) < 0.02


def _trained_like(agent: Q2RLAgent, seed: int) -> None:
    """Give the acting networks other weights (as a learner's broadcast would)."""
    other = make_agent(seed=seed)
    agent.load_acting_state(other.acting_state())


def test_int8_gating_agrees_with_float_gating():
    float_agent, int8_agent = make_agent(), make_agent()
    int8_agent.set_acting_precision("int8")
    rng = np.random.default_rng(2)
    obs = random_obs(64, rng)
    ref = float_agent.act(obs, rl_action="mode", bc_action="mode")
    out = int8_agent.act(obs, rl_action="mode", bc_action="mode")
    assert isinstance(int8_agent.acting_networks().critics.linears[1], Int8EnsembleLinear)
    np.testing.assert_allclose(out.rl_action, ref.rl_action, atol=0.02)
    np.testing.assert_allclose(out.bc_action, ref.bc_action, atol=0.02)
    for name in ("q_rl", "q_bc"):
        a, b = getattr(out, name), getattr(ref, name)
        assert np.abs(a - b).max() < 0.02 * np.abs(b).mean() + 0.01, name
    # Decisions agree wherever the two values are further apart than the compact error.
    clear = np.abs(ref.q_bc - ref.q_rl) > 0.05 * np.abs(ref.q_bc).mean() + 0.02
    assert clear.sum() > 10
    np.testing.assert_array_equal(out.use_bc[clear], ref.use_bc[clear])
    np.testing.assert_array_equal(out.use_bc, out.q_bc > out.q_rl)


def test_int8_copies_follow_new_weights():
    agent, reference = make_agent(), make_agent(seed=5)
    agent.set_acting_precision("int8")
    obs = random_obs(8, np.random.default_rng(3))
    first = agent.act(obs, rl_action="mode", bc_action="mode")
    _trained_like(agent, seed=5)  # an in-place load: the copies are rebuilt at the next act
    second = agent.act(obs, rl_action="mode", bc_action="mode")
    ref = reference.act(obs, rl_action="mode", bc_action="mode")
    assert np.abs(second.q_rl - first.q_rl).max() > 0.05
    assert np.abs(second.q_rl - ref.q_rl).max() < 0.02 * np.abs(ref.q_rl).mean() + 0.01


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_prepared_weights_change_nothing_until_swapped_in(precision):
    agent, reference = make_agent(), make_agent(seed=7)
    agent.set_acting_precision(precision)
    reference.set_acting_precision(precision)
    obs = random_obs(8, np.random.default_rng(4))
    before = agent.act(obs, rl_action="mode", bc_action="mode")
    prepared = agent.prepare_acting(reference.acting_state())
    unchanged = agent.act(obs, rl_action="mode", bc_action="mode")
    np.testing.assert_array_equal(unchanged.q_rl, before.q_rl)
    agent.use_acting(prepared)
    after = agent.act(obs, rl_action="mode", bc_action="mode")
    ref = reference.act(obs, rl_action="mode", bc_action="mode")
    np.testing.assert_allclose(after.q_rl, ref.q_rl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.q_bc, ref.q_bc, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="acting state mismatch"):
        agent.prepare_acting({k: v for k, v in reference.acting_state().items() if not k.startswith("value.")})


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_bc_branch_on_a_second_thread_gives_the_same_decisions(precision):
    one, two = make_agent(), make_agent()
    for agent in (one, two):
        agent.set_acting_precision(precision)
    two.set_acting_threads(2)
    rng = np.random.default_rng(5)
    try:
        for _ in range(5):  # sampled proposals: the random streams must match too
            obs = random_obs(2, rng)
            a, b = one.act(obs), two.act(obs)
            for name in ("bc_action", "rl_action", "q_bc", "q_rl", "use_bc", "action"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    finally:
        two.set_acting_threads(1)
    assert two._bc_branch_pool is None


def test_acting_settings_refuse_unknown_values():
    agent = make_agent()
    with pytest.raises(ValueError, match="precision"):
        agent.set_acting_precision("fp8")
    with pytest.raises(ValueError, match="threads"):
        agent.set_acting_threads(3)


def test_joint_encoder_computes_both_encodings_as_the_separate_encoders_do():
    agent = make_agent(seed=1)  # critics' encoder initialised unlike the BC policy's
    joint = joint_encoder(agent.encoder, agent.bc_policy.encoder)
    assert joint is not None and len(joint.groups) == 1 and len(joint.groups[0].names) == 4
    obs = agent.obs_tensors(random_obs(4, np.random.default_rng(6)))
    with torch.no_grad():
        features, bc_encoded = joint(obs)
        for out, float_encoder in ((features, agent.encoder), (bc_encoded, agent.bc_policy.encoder)):
            ref, alone = float_encoder(obs), compact_copy(float_encoder)(obs)
            assert out.shape == ref.shape
            np.testing.assert_allclose(out.numpy(), alone.numpy(), atol=2e-2)  # same math, other kernel blocking
            assert float((out - ref).norm() / ref.norm()) < 0.02
        # The halves are not interchangeable: each holds its own encoder's weights.
        assert float((features[:, 6:] - bc_encoded[:, 6:]).abs().mean()) > 0.05
    assert agent.set_acting_precision("int8") is None and agent.acting_networks().joint is not None


def test_encoders_of_other_shapes_are_not_joined():
    agent = make_agent()
    other = make_bc_policy(BCConfig(hidden=[32], encoder=EncoderConfig(channels=[16, 16])), SPEC, 6, LOW, HIGH)
    assert joint_encoder(agent.encoder, other.encoder) is None
    state_only = {"ee_pose": ((6,), "float32")}
    bc = make_bc_policy(BCConfig(hidden=[32]), state_only, 6, LOW, HIGH)
    assert joint_encoder(bc.encoder, bc.encoder) is None  # no cameras: nothing to join


def test_weights_prepared_in_float32_are_compacted_when_the_agent_gates_in_int8():
    """A broadcast prepared before the precision changed still ends up in the compact networks gating reads."""
    agent, first, reference = make_agent(), make_agent(seed=7), make_agent(seed=8)
    agent.use_acting(agent.prepare_acting(first.acting_state()))  # modules loaded once, as the next ones will be
    prepared = agent.prepare_acting(reference.acting_state())  # float32: no compact copies made
    agent.set_acting_precision("int8")
    obs = random_obs(8, np.random.default_rng(9))
    agent.act(obs, rl_action="mode", bc_action="mode")  # builds int8 copies of the old weights
    agent.use_acting(prepared)
    after = agent.act(obs, rl_action="mode", bc_action="mode")
    ref = reference.act(obs, rl_action="mode", bc_action="mode")
    assert np.abs(after.q_rl - ref.q_rl).max() < 0.02 * np.abs(ref.q_rl).mean() + 0.01
