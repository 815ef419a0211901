"""Image observations in the networks: the CNN encoders, DrQ shifts, image BC, and what trains which encoder."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robot_rl.agent import Q2RLAgent
from robot_rl.bc import load_bc, make_bc_policy, save_bc, train_bc
from robot_rl.buffer import TransitionBatch
from robot_rl.config import AgentConfig, BCConfig, ConfigError, EncoderConfig, load_config
from robot_rl.networks import CriticEnsemble, ObsEncoder, random_shift
from robot_rl.prefetch import to_tensors
from robot_rl.train import resolve_device, warn_image_learner_on_cpu

SIZE = 24
SPEC = {"ee_pose": ((6,), "float32"), "front": ((SIZE, SIZE, 3), "uint8"), "wrist": ((SIZE, SIZE, 3), "uint8")}
LOW, HIGH = -np.ones(6, np.float32), np.ones(6, np.float32)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENC = EncoderConfig(channels=[8, 8], feature_dim=16, shift_pad=2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def random_obs(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "ee_pose": rng.uniform(-1, 1, (n, 6)).astype(np.float32),
        "front": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
    }


def make_agent(**overrides) -> Q2RLAgent:
    cfg = AgentConfig(**{"hidden": [32, 32], "num_critics": 4, "batch_size": 16, "encoder": ENC, **overrides})
    bc = make_bc_policy(BCConfig(hidden=[32], num_modes=2, encoder=ENC), SPEC, 6, LOW, HIGH)
    return Q2RLAgent(cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=6, bc_policy=bc, seed=0)


def random_batch(n: int = 16, seed: int = 0) -> TransitionBatch:
    rng = np.random.default_rng(seed)
    return TransitionBatch(
        obs=random_obs(n, rng),
        actions=rng.uniform(-1, 1, (n, 6)).astype(np.float32),
        rewards=(rng.random(n) < 0.3).astype(np.float32),
        next_obs=random_obs(n, rng),
        terminated=rng.random(n) < 0.3,
        bc_actions=rng.uniform(-1, 1, (n, 6)).astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Encoders and the DrQ shift
# ---------------------------------------------------------------------------------------------------------------------
def test_obs_encoder_concatenates_normalised_state_and_one_cnn_per_camera():
    enc = ObsEncoder(SPEC, LOW * 2, HIGH * 2, ENC)
    assert enc.image_keys == ["front", "wrist"] and enc.state_keys == ["ee_pose"]
    assert enc.out_dim == 6 + 2 * ENC.feature_dim
    obs = {k: torch.as_tensor(v) for k, v in random_obs(5, np.random.default_rng(0)).items()}
    out = enc(obs)
    assert out.shape == (5, enc.out_dim)
    torch.testing.assert_close(out[:, :6], obs["ee_pose"] / 2)  # bounds ±2 -> [-1, 1]
    # Reference math: each camera through its own slice of the grouped weights, as a separate network would run.
    group = enc.cameras[0]
    convs = [m for m in group.convs if isinstance(m, torch.nn.Conv2d)]
    for c, name in enumerate(group.names):
        x = obs[name].permute(0, 3, 1, 2).float() / 255.0 - 0.5
        for conv in convs:
            out_c = conv.out_channels // 2
            w, b = conv.weight[c * out_c : (c + 1) * out_c], conv.bias[c * out_c : (c + 1) * out_c]
            x = F.conv2d(x, w, b, stride=2).relu()
        y = F.linear(x.flatten(1), group.trunk.weight[c].T, group.trunk.bias[c, 0])
        y = torch.tanh(F.layer_norm(y, y.shape[-1:], group.norm.weight[c, 0], group.norm.bias[c, 0]))
        start = 6 + ENC.feature_dim * enc.image_keys.index(name)
        torch.testing.assert_close(out[:, start : start + ENC.feature_dim], y, rtol=1e-4, atol=1e-5)
    # Each camera's features depend on its own image only.
    changed = dict(obs, wrist=255 - obs["wrist"])
    out2 = enc(changed)
    torch.testing.assert_close(out2[:, :22], out[:, :22])
    assert not torch.allclose(out2[:, 22:], out[:, 22:])


def test_random_shift_crops_a_window_of_the_edge_padded_image():
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8))
    pad = 2
    shifted = random_shift(images, pad, torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    padded = np.pad(images.numpy(), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = []
    for i in range(len(images)):
        found = [
            (dy, dx)
            for dy, dx in itertools.product(range(2 * pad + 1), repeat=2)
            if np.array_equal(shifted[i].numpy(), padded[i, dy : dy + 10, dx : dx + 12])
        ]
        assert found, f"image {i} is not a window of its padded original"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # per-image offsets, not one for the batch
    assert torch.equal(random_shift(images, 0), images)


def test_a_learner_steps_draws_are_uniform_and_used_where_they_say():
    """`_draws` for one learner step: DrQ offsets uniform over [0, 2 * pad] per camera, row and axis; the TD subsets
    distinct members drawn uniformly; and an update crops each image exactly at its drawn offset."""
    agent = make_agent(num_critics=4, critic_subsample=2)
    d = agent._draws(3000, critic=2, actor=True)
    pad = ENC.shift_pad
    assert d["noise"].shape == (3, 3000, 6) and d["members"].shape == (2, 2)
    assert d["shifts"].shape == (5, 2, 3000, 2)  # obs, next_obs per critic update, then the actor's obs
    counts = torch.bincount(d["shifts"].flatten(), minlength=2 * pad + 1).double()
    assert len(counts) == 2 * pad + 1
    assert float((counts / counts.sum() - 1 / (2 * pad + 1)).abs().max()) < 0.01
    pairs = [tuple(sorted(agent._draws(1, critic=1, actor=False)["members"][0].tolist())) for _ in range(600)]
    assert all(a != b for a, b in pairs)
    assert set(pairs) == set(itertools.combinations(range(4), 2))  # every pair comes up
    # The inputs an update learns from: each image the crop of its padded original at the drawn offset.
    batch = to_tensors(random_batch(4, seed=3), "cpu")
    d = agent._draws(4, critic=1, actor=False)
    t = agent.learning_inputs(batch, d["shifts"][0], d["shifts"][1])
    for which, shifts in (("obs", d["shifts"][0]), ("next_obs", d["shifts"][1])):
        for c, key in enumerate(agent.image_keys):
            padded = np.pad(batch[which][key].numpy(), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
            for i, (dy, dx) in enumerate(shifts[c].tolist()):
                np.testing.assert_array_equal(t[which][key][i].numpy(), padded[i, dy : dy + SIZE, dx : dx + SIZE])


def test_ensemble_matches_a_loop_over_members_with_plain_layers():
    """Reference math: each member is Linear -> LayerNorm(affine) -> ReLU ... -> Linear, computed one at a time."""
    torch.manual_seed(0)
    ens = CriticEnsemble(7, 3, [16, 8], members=5)
    with torch.no_grad():
        for norm in ens.norms:
            norm.weight.normal_()
            norm.bias.normal_()
    obs, act = torch.randn(9, 7), torch.randn(9, 3)
    got = ens(obs, act)
    for k in range(5):
        x = torch.cat([obs, act], -1)
        for linear, norm in zip(ens.linears, ens.norms, strict=True):
            x = F.linear(x, linear.weight[k].T, linear.bias[k, 0])
            x = F.layer_norm(x, x.shape[-1:], norm.weight[k, 0], norm.bias[k, 0]).relu()
        q = F.linear(x, ens.head.weight[k].T, ens.head.bias[k, 0]).squeeze(-1)
        torch.testing.assert_close(got[k], q, rtol=1e-5, atol=1e-5)


def test_device_auto_falls_back_to_cpu_without_cuda():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_an_image_config_learning_on_the_cpu_is_told_how_long_it_will_take():
    image = load_config(CONFIGS / "sim_peg_image.yaml", ["train.env_steps=7000", "train.learner_steps_per_env_step=1"])
    said: list[str] = []
    warn_image_learner_on_cpu(image, torch.device("cpu"), said.append)
    assert len(said) == 1 and "7000 online learner steps" in said[0] and "about 3 h" in said[0]
    short = load_config(CONFIGS / "sim_peg_image.yaml", ["train.env_steps=200", "train.learner_steps_per_env_step=1"])
    warn_image_learner_on_cpu(short, torch.device("cpu"), said.append)
    assert "about 5 min or more" in said.pop()  # 200 steps at 0.7 a second: minutes, not "0 h"
    assert "(train.device is auto and torch sees no CUDA device here)" in said[0]  # the config asks for auto
    # Smaller sizes than those measured: no figure in hours claimed for them, the basis said instead.
    small = load_config(CONFIGS / "sim_peg_image.yaml", ["agent.batch_size=16", "agent.hidden=[64, 64]"])
    warn_image_learner_on_cpu(small, torch.device("cpu"), said.append)
    assert "about" not in said[-1] and "at sim_peg_image.yaml's sizes (batch_size 256" in said.pop()
    warn_image_learner_on_cpu(image, torch.device("cuda"), said.append)
    warn_image_learner_on_cpu(load_config(CONFIGS / "sim_peg_state.yaml"), torch.device("cpu"), said.append)
    assert len(said) == 1  # a GPU learner, or a state config on the CPU, is not warned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gating_and_a_value_update_on_cuda_match_cpu():
    import copy

    from robot_rl.config import QEstimationConfig
    from robot_rl.qestimation import fit_value

    cpu = make_agent(encoder=ENC.model_copy(update={"shift_pad": 0}))  # no random draws in what is compared
    gpu = copy.deepcopy(cpu).to("cuda")
    gpu.device = torch.device("cuda")
    obs = random_obs(32, np.random.default_rng(4))
    d_cpu = cpu.act(obs, rl_action="mode", bc_action="mode")
    d_gpu = gpu.act(obs, rl_action="mode", bc_action="mode")
    for name in ("bc_action", "rl_action", "q_bc", "q_rl"):
        np.testing.assert_allclose(getattr(d_gpu, name), getattr(d_cpu, name), rtol=1e-4, atol=1e-4)
    returns = np.random.default_rng(5).uniform(-50, 0, 32).astype(np.float32)
    cfg = QEstimationConfig(value_steps=3, batch_size=32)
    fit_value(cpu, obs, returns, cfg, np.random.default_rng(6))
    fit_value(gpu, obs, returns, cfg, np.random.default_rng(6))
    with torch.no_grad():
        v_cpu = cpu.v_bc(cpu.obs_tensors(obs)).numpy()
        v_gpu = gpu.v_bc(gpu.obs_tensors(obs)).cpu().numpy()
    np.testing.assert_allclose(v_gpu, v_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("compile", "cuda_graph"), [("off", False), ("reduce-overhead", False), ("off", True), ("default", True)]
)
def test_a_learner_step_on_cuda_matches_cpu(compile, cuda_graph):
    """Learner steps (utd critic updates, the actor and temperature update, DrQ shifts included) on the GPU, eager,
    compiled with torch's CUDA graphs, or captured whole in one CUDA graph (train.cuda_graph, eager or compiled
    kernels), give the CPU's statistics and weights, through warm-up, capture and replays. Optimiser states loaded
    midway (an earlier snapshot, so that stale state would show) are what the next steps use. The GPU agent replays
    the CPU agent's random draws (their generators differ by device); TF32 is off."""
    import copy

    cpu = make_agent()
    gpu = Q2RLAgent(cpu.cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=6,
                    bc_policy=copy.deepcopy(cpu.bc_policy), seed=0, device="cuda", compile=compile,
                    cuda_graph=cuda_graph)  # fmt: skip
    gpu.load_state_dict(cpu.state_dict())
    draws: list = []
    cpu_draws = cpu._draws
    cpu._draws = lambda rows, **kw: draws.append(cpu_draws(rows, **kw)) or draws[-1]
    replay = iter(draws)
    gpu._draws = lambda rows, **kw: {k: None if v is None else v.to("cuda") for k, v in next(replay).items()}
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    snapshot = None
    try:
        for step in range(12):  # graphs record on the first calls and replay after; loaded state: capture again
            if step == 1:
                snapshot = copy.deepcopy(cpu.optimizer_states())
            if step == 6:  # a CPU agent's states (not capturable): the GPU agent keeps its own kind
                cpu.load_optimizer_states(copy.deepcopy(snapshot))
                gpu.load_optimizer_states(copy.deepcopy(snapshot))
                capturable = cuda_graph or compile == "reduce-overhead"
                for opt in (gpu.actor_opt, gpu.critic_opt, gpu.alpha_opt):
                    assert all(group["capturable"] == capturable for group in opt.param_groups)
                    steps = [state["step"].device.type for state in opt.state.values()]
                    assert steps and set(steps) == {"cuda" if capturable else "cpu"}
            batches = [random_batch(16, seed=10 * step + i) for i in range(cpu.cfg.utd)]
            a = cpu.update(batches)
            b = gpu.update(batches)
            for name, value in a.as_dict().items():
                assert b.as_dict()[name] == pytest.approx(value, rel=1e-3, abs=1e-4), (step, name)
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    if cuda_graph:
        assert gpu._step_graph.captured and gpu._step_graph.captures == 2  # before and after the loaded states
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert p.device.type == "cpu" and q.device.type == "cuda", name
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_cuda_graph_step_is_refused_on_the_cpu_and_beside_torchs_own_cuda_graphs(mode):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Q2RLAgent(make_agent().cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=6, bc_policy=None,
                  device="cpu", cuda_graph=True)  # fmt: skip
    with pytest.raises(ConfigError, match=rf"{mode} mode makes CUDA graphs of its own .* use train\.compile=default"):
        load_config(CONFIGS / "sim_peg_state.yaml", ["train.cuda_graph=true", f"train.compile={mode}"])
    assert load_config(CONFIGS / "sim_peg_state.yaml", ["train.cuda_graph=true"]).train.cuda_graph


# ---------------------------------------------------------------------------------------------------------------------
# What trains which encoder
# ---------------------------------------------------------------------------------------------------------------------
def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_critic_loss_trains_the_encoder_and_the_actor_loss_does_not():
    agent = make_agent()
    enc = _params(agent.encoder)
    agent.critic_update(random_batch(seed=1))
    assert _changed(enc, agent.encoder)
    enc, actor, bc_enc = _params(agent.encoder), _params(agent.actor), _params(agent.bc_policy.encoder)
    agent.actor_update(random_batch(seed=2))
    assert _changed(actor, agent.actor)
    assert not _changed(enc, agent.encoder)  # the actor uses the critic's features detached
    assert not _changed(bc_enc, agent.bc_policy.encoder)
    # The target encoder follows the encoder softly, never jumps to it.
    gap = [
        (t - p).detach().abs().max()
        for t, p in zip(agent.target_encoder.parameters(), agent.encoder.parameters(), strict=True)
    ]
    assert max(float(g) for g in gap) > 0


def test_gating_encodes_each_image_twice_per_step():
    agent = make_agent()
    calls = {"encoder": 0, "bc": 0}
    agent.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    agent.bc_policy.encoder.register_forward_hook(lambda *a: calls.__setitem__("bc", calls["bc"] + 1))
    d = agent.act(random_obs(3, np.random.default_rng(0)))
    assert calls == {"encoder": 1, "bc": 1}  # V_BC reads the BC encoding: two image encodings per step
    np.testing.assert_array_equal(d.use_bc, d.q_bc > d.q_rl)
    # The recorded Q^_BC is what q_bc_hat says for the executed BC proposal.
    with torch.no_grad():
        obs_t = agent.obs_tensors(random_obs(3, np.random.default_rng(0)))
        np.testing.assert_allclose(d.q_bc, agent.q_bc_hat(obs_t, torch.as_tensor(d.bc_action)).numpy(), rtol=1e-5)


def test_acting_state_carries_the_encoders():
    a, b = make_agent(), make_agent(critic_lr=1e-3)
    for p in b.encoder.parameters():
        torch.nn.init.normal_(p)
    obs = random_obs(4, np.random.default_rng(3))
    assert not np.allclose(a.act(obs, rl_action="mode").q_rl, b.act(obs, rl_action="mode").q_rl)
    b.load_acting_state(a.acting_state())
    np.testing.assert_allclose(a.act(obs, rl_action="mode").q_rl, b.act(obs, rl_action="mode").q_rl, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Image BC
# ---------------------------------------------------------------------------------------------------------------------
def _bright_square_dataset(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The action points at a bright square's position in the front image; the state and wrist carry no signal."""
    rng = np.random.default_rng(seed)
    obs = {
        "ee_pose": np.zeros((n, 6), np.float32),
        "front": np.full((n, SIZE, SIZE, 3), 20, np.uint8),
        "wrist": np.full((n, SIZE, SIZE, 3), 20, np.uint8),
    }
    cells = rng.integers(0, 2, (n, 2))
    for i, (cy, cx) in enumerate(cells):
        y, x = 3 + cy * 12, 3 + cx * 12
        obs["front"][i, y : y + 6, x : x + 6] = 250
    actions = np.zeros((n, 6), np.float32)
    actions[:, :2] = (cells * 2 - 1) * 0.6
    return obs, actions


def test_image_bc_learns_from_pixels_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = BCConfig(policy="gaussian", hidden=[64], steps=300, batch_size=64, lr=1e-3, encoder=ENC)
    policy = make_bc_policy(cfg, SPEC, 6, LOW, HIGH)
    obs, actions = _bright_square_dataset(256, seed=0)
    stats = train_bc(policy, obs, actions, cfg, seed=0)
    assert stats["final_nll"] < stats["initial_nll"] - 3.0
    test_obs, test_actions = _bright_square_dataset(64, seed=1)
    obs_t = {k: torch.as_tensor(v) for k, v in test_obs.items()}
    error = (policy.mode(obs_t)[:, :2] - torch.as_tensor(test_actions[:, :2])).abs().mean()
    assert float(error) < 0.1  # ignoring the images, the best mean is 0 (error 0.6)
    save_bc(policy, tmp_path / "bc")
    loaded = load_bc(tmp_path / "bc")
    assert loaded.obs_spec == policy.obs_spec
    torch.testing.assert_close(loaded.mode(obs_t), policy.mode(obs_t))


def test_image_bc_refuses_float_images_and_wrong_sizes():
    policy = make_bc_policy(BCConfig(hidden=[8], encoder=ENC), SPEC, 6, LOW, HIGH)
    obs, actions = _bright_square_dataset(8, seed=2)
    with pytest.raises(ValueError, match=r"obs\['front'\] is an image and must be uint8"):
        train_bc(policy, {**obs, "front": obs["front"].astype(np.float32)}, actions, policy.cfg, seed=0)
    with pytest.raises(ValueError, match=r"obs\['wrist'\] must have shape"):
        train_bc(policy, {**obs, "wrist": obs["wrist"][:, :10]}, actions, policy.cfg, seed=0)
    with pytest.raises(ValueError, match="lacks key 'front'"):
        train_bc(policy, {k: v for k, v in obs.items() if k != "front"}, actions, policy.cfg, seed=0)


def test_bf16_autocast_update_tracks_the_float32_update():
    fp32, bf16 = make_agent(), make_agent()
    bf16.amp = True
    fp32.generator.manual_seed(9)
    bf16.generator.manual_seed(9)
    batch = random_batch(seed=4)
    loss32, q32 = fp32.critic_update(batch)
    loss16, q16 = bf16.critic_update(batch)
    assert np.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)
    assert q16 == pytest.approx(q32, rel=0.05, abs=0.05)
    # Weights and optimiser state stay float32 under autocast.
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    stats = bf16.update([random_batch(seed=s) for s in range(4)])
    assert np.isfinite(stats.critic_loss) and np.isfinite(stats.actor_loss)
