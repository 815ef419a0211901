"""The Q2RL math against independent computations: returns, Q^_BC, gating, REDQ target, UTD, BC loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from robot_rl.agent import Q2RLAgent, TrainingDiverged
from robot_rl.bc import make_bc_policy
from robot_rl.buffer import ReplayBuffer, TransitionBatch
from robot_rl.config import AgentConfig, BCConfig, QEstimationConfig
from robot_rl.obs import state_spec
from robot_rl.prefetch import to_tensors
from robot_rl.qestimation import Rollout, initialise_critics, mc_returns, run_q_estimation

OBS, ACT = 6, 6
LOW, HIGH = -np.ones(OBS, np.float32), np.ones(OBS, np.float32)
SPEC = state_spec(OBS)


def obs_dict(x):
    """A state observation as the dict the agent takes."""
    return {"ee_pose": x}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def make_agent(method: str = "q2rl", **overrides) -> Q2RLAgent:
    cfg = AgentConfig(method=method, hidden=[32, 32], num_critics=10, batch_size=32, **overrides)
    bc = make_bc_policy(BCConfig(policy="gmm", hidden=[32], num_modes=3), SPEC, ACT, LOW, HIGH)
    return Q2RLAgent(cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=ACT, bc_policy=bc, seed=3)


def random_batch(n: int = 32, seed: int = 0) -> TransitionBatch:
    rng = np.random.default_rng(seed)
    return TransitionBatch(
        obs=obs_dict(rng.uniform(-1, 1, (n, OBS)).astype(np.float32)),
        actions=rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
        rewards=(rng.random(n) < 0.3).astype(np.float32),
        next_obs=obs_dict(rng.uniform(-1, 1, (n, OBS)).astype(np.float32)),
        terminated=rng.random(n) < 0.3,
        bc_actions=rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Monte-Carlo returns
# ---------------------------------------------------------------------------------------------------------------------
def test_mc_returns_terminal_episode_matches_direct_sum():
    rewards = np.array([-1.0, -1.0, -1.0, 9.0])
    got = mc_returns(rewards, terminated=True, discount=0.9, bootstrap=123.0)
    for t in range(4):
        expected = sum(0.9 ** (k - t) * rewards[k] for k in range(t, 4))
        assert got[t] == pytest.approx(expected, rel=1e-6)


def test_mc_returns_truncated_episode_adds_discounted_bootstrap():
    rewards = np.array([-1.0, -1.0, -1.0])
    bootstrap = -50.0
    got = mc_returns(rewards, terminated=False, discount=0.99, bootstrap=bootstrap)
    for t in range(3):
        expected = sum(0.99 ** (k - t) * -1.0 for k in range(t, 3)) + 0.99 ** (3 - t) * bootstrap
        assert got[t] == pytest.approx(expected, rel=1e-6)
    # The same rewards terminated ignore the bootstrap: the difference is exactly the discounted tail.
    terminal = mc_returns(rewards, terminated=True, discount=0.99, bootstrap=bootstrap)
    assert got[0] - terminal[0] == pytest.approx(0.99**3 * bootstrap, rel=1e-5)


def test_mc_returns_rejects_empty():
    with pytest.raises(ValueError):
        mc_returns(np.array([]), terminated=True, discount=0.99)


# ---------------------------------------------------------------------------------------------------------------------
# Q^_BC and gating
# ---------------------------------------------------------------------------------------------------------------------
def test_q_bc_hat_is_value_plus_alpha_logprob_plus_entropy():
    agent = make_agent()
    agent.qest_alpha = 0.7
    obs = obs_dict(torch.rand(16, OBS) * 2 - 1)
    actions = torch.rand(16, ACT) * 2 - 1
    dist = agent.bc_policy.dist(obs)
    # Independent: mixture log-density by hand, entropy bound H(w) + sum_k w_k H_k by hand.
    w = torch.softmax(dist.logits, -1)
    comp = torch.distributions.Normal(dist.means, dist.stds)
    log_p = torch.logsumexp(torch.log(w) + comp.log_prob(actions[:, None, :]).sum(-1), dim=-1)
    h = -(w * torch.log(w)).sum(-1) + (w * comp.entropy().sum(-1)).sum(-1)
    v = agent.value(agent.bc_policy.encoder.normalizer(obs["ee_pose"]))  # V_BC reads the BC policy's encoding
    expected = v + 0.7 * (log_p + h)
    torch.testing.assert_close(agent.q_bc_hat(obs, actions), expected, rtol=1e-5, atol=1e-5)


def _set_value_bias(agent: Q2RLAgent, bias: float) -> None:
    last = agent.value.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(bias)


def test_gate_executes_the_higher_rated_action():
    agent = make_agent()
    obs = obs_dict(np.random.default_rng(0).uniform(-1, 1, (64, OBS)).astype(np.float32))
    d = agent.act(obs)
    np.testing.assert_array_equal(d.use_bc, d.q_bc > d.q_rl)
    np.testing.assert_array_equal(d.action, np.where(d.use_bc[:, None], d.bc_action, d.rl_action))
    # Force the frozen Q^_BC far above / below every critic: the gate follows.
    _set_value_bias(agent, 1e4)
    assert agent.act(obs).use_bc.all()
    _set_value_bias(agent, -1e4)
    d = agent.act(obs)
    assert not d.use_bc.any()
    np.testing.assert_allclose(d.action, d.rl_action)


def test_gate_never_executes_a_non_finite_rl_proposal_when_bc_has_one():
    agent = make_agent()
    obs = obs_dict(np.random.default_rng(0).uniform(-1, 1, (8, OBS)).astype(np.float32))
    _set_value_bias(agent, -1e4)  # Q^_BC far below the critics: the gate would pick RL everywhere
    with torch.no_grad():
        agent.critics.head.bias[0, 0, 0] = float("nan")  # one critic gone bad: q_rl (their minimum) NaN
    d = agent.act(obs)
    assert np.isnan(d.q_rl).all() and d.use_bc.all()
    np.testing.assert_allclose(d.action, d.bc_action)
    # The rule itself, row by row: a NaN action or value on the RL side, a NaN BC proposal (no gating) on the other.
    nan = float("nan")
    a_bc = torch.tensor([[0.1, 0.2], [0.1, 0.2], [nan, nan], [0.1, 0.2]])
    a_rl = torch.tensor([[0.3, nan], [0.3, 0.4], [0.3, 0.4], [0.3, 0.4]])
    q_bc, q_rl = torch.tensor([-5.0, -5.0, nan, -5.0]), torch.tensor([1.0, float("inf"), 1.0, 1.0])
    assert Q2RLAgent.gate(q_bc, q_rl, a_bc, a_rl).tolist() == [True, True, False, False]


def test_gate_scores_bc_proposal_clipped_to_action_range():
    agent = make_agent()
    obs = obs_dict(np.zeros((256, OBS), np.float32))
    d = agent.act(obs)
    assert np.all(np.abs(d.bc_action) <= 1.0)


def test_shared_gating_scores_both_with_q_rl_and_sac_never_uses_bc():
    ibrl = make_agent("ibrl")
    obs = obs_dict(np.random.default_rng(1).uniform(-1, 1, (32, OBS)).astype(np.float32))
    d = ibrl.act(obs)
    with torch.no_grad():
        expected = ibrl.q_rl_min(ibrl.obs_tensors(obs), torch.as_tensor(d.bc_action)).numpy()
    np.testing.assert_allclose(d.q_bc, expected, rtol=1e-5)
    sac = make_agent("sac")
    assert not sac.act(obs).use_bc.any()


# ---------------------------------------------------------------------------------------------------------------------
# REDQ target
# ---------------------------------------------------------------------------------------------------------------------
def _constant_target_critics(agent: Q2RLAgent, values: list[float]) -> None:
    """Make target critic k output the constant values[k] (zero weights, bias = value)."""
    with torch.no_grad():
        for p in agent.target_critics.parameters():
            p.zero_()
        for norm in agent.target_critics.norms:
            if hasattr(norm, "weight"):
                norm.weight.fill_(1.0)
        agent.target_critics.head.bias[:, 0, 0] = torch.tensor(values)


def test_td_target_is_min_over_a_random_pair_of_target_critics():
    agent = make_agent(init_temperature=1e-8)  # no entropy term: the target is r + gamma * min(pair)
    values = [float(v) for v in range(10)]
    _constant_target_critics(agent, values)
    rewards, not_done, next_obs = torch.zeros(8), torch.ones(8), obs_dict(torch.zeros(8, OBS))
    counts = np.zeros(10)
    for _ in range(3000):
        y = agent.td_target(rewards, not_done, next_obs) / agent.cfg.discount
        picked = round(float(y[0]))
        assert torch.allclose(y, y[0].expand_as(y), atol=1e-4)  # one subset per minibatch
        counts[picked] += 1
    # P(min of a random 2-subset of 0..9 equals k) = (9 - k) / C(10, 2).
    expected = np.array([(9 - k) / math.comb(10, 2) for k in range(10)])
    assert counts[9] == 0
    assert np.abs(counts / counts.sum() - expected).max() < 0.03


@pytest.mark.parametrize("method", ["ibrl", "q2rl"])
def test_ibrl_bootstraps_from_the_better_of_the_rl_and_bc_proposals(method):
    agent = make_agent(method, init_temperature=1e-8)
    n = 256
    next_obs = obs_dict(torch.as_tensor(np.random.default_rng(4).uniform(-1, 1, (n, OBS)).astype(np.float32)))
    rewards, not_done = torch.zeros(n), torch.ones(n)
    draws = agent._draws(n, critic=1, actor=False)
    noise, members = draws["noise"][0], draws["members"][0]
    y = agent.td_target(rewards, not_done, next_obs, noise=noise, members=members)
    with torch.no_grad():  # the same target, written out
        a_rl = agent.actor(agent.encoder(next_obs)).rsample_with_log_prob(noise=noise)[0]
        features = agent.target_encoder(next_obs)
        q_rl = agent.target_critics(features, a_rl, members).min(dim=0).values
        a_bc = agent.bc_policy.mode(next_obs).clamp(-1.0, 1.0)
        q_bc = agent.target_critics(features, a_bc, members).min(dim=0).values
    expected = torch.maximum(q_rl, q_bc) if method == "ibrl" else q_rl
    torch.testing.assert_close(y, agent.cfg.discount * expected, rtol=1e-4, atol=1e-5)
    assert bool((q_bc > q_rl).any()) and bool((q_rl > q_bc).any())  # both proposals win somewhere


def test_td_target_entropy_backup_only_when_asked():
    plain = make_agent(init_temperature=0.5, backup_entropy=False)
    soft = make_agent(init_temperature=0.5, backup_entropy=True)
    for agent in (plain, soft):
        _constant_target_critics(agent, [2.0] * 10)
    obs = obs_dict(torch.zeros(64, OBS))
    y_plain = plain.td_target(torch.zeros(64), torch.ones(64), obs)
    torch.testing.assert_close(y_plain, torch.full((64,), 0.99 * 2.0))
    # Soft: the bonus is -alpha * log pi of the next action, so it varies with the sampled action.
    y_soft = soft.td_target(torch.zeros(64), torch.ones(64), obs)
    assert float(y_soft.std()) > 0.0
    assert not torch.allclose(y_soft, y_plain)


def test_td_target_terminal_has_no_bootstrap_and_truncation_keeps_it():
    agent = make_agent(init_temperature=1e-8)
    _constant_target_critics(agent, [5.0] * 10)
    rewards = torch.tensor([1.0, 1.0])
    y = agent.td_target(rewards, torch.tensor([0.0, 1.0]), obs_dict(torch.zeros(2, OBS)))
    assert float(y[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(y[1]) == pytest.approx(1.0 + 0.99 * 5.0, abs=1e-4)


def test_reward_transform_applied_to_batch_rewards():
    agent = make_agent(reward_scale=10.0, reward_bias=-1.0)
    t = agent.learning_inputs(to_tensors(random_batch(), "cpu"), None, None)
    raw = torch.as_tensor(random_batch().rewards)
    torch.testing.assert_close(t["rewards"], 10.0 * raw - 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# UTD, BC loss, learning
# ---------------------------------------------------------------------------------------------------------------------
def test_update_runs_exactly_utd_critic_updates_per_actor_update():
    agent = make_agent(utd=4, tau=0.3)
    with torch.no_grad():  # targets away from the critics and a large tau: the soft update moves them measurably
        for p in agent.target_critics.parameters():
            p.add_(0.05 * torch.randn_like(p))
    steps = {"critic": 0, "actor": 0}
    agent.critic_opt.register_step_post_hook(lambda *a: steps.__setitem__("critic", steps["critic"] + 1))
    agent.actor_opt.register_step_post_hook(lambda *a: steps.__setitem__("actor", steps["actor"] + 1))
    batches = [random_batch(seed=i) for i in range(4)]
    for _ in range(3):
        stats = agent.update(batches)
    assert steps == {"critic": 12, "actor": 3}
    assert (stats.critic_updates, stats.actor_updates) == (12, 3)
    with pytest.raises(ValueError, match="utd=4"):
        agent.update(batches[:3])


def test_update_changes_critics_and_moves_targets_softly():
    agent = make_agent(tau=0.005)
    before = [p.clone() for p in agent.critics.parameters()]
    target_before = [p.clone() for p in agent.target_critics.parameters()]
    agent.update([random_batch(seed=i) for i in range(4)])
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.critics.parameters(), strict=True))
    # Each target parameter moved by at most tau per update times the gap (4 updates): soft, not copied.
    for tb, ta, p in zip(target_before, agent.target_critics.parameters(), agent.critics.parameters(), strict=True):
        assert torch.all((ta - tb).abs() <= 4 * 0.005 * (p - tb).abs().max() + 1e-6)


def test_bc_loss_pulls_actor_mode_towards_bc_action():
    agent = make_agent(bc_loss_weight=1.0)  # pure BC loss
    batch = random_batch(n=64)
    target = np.tile(np.array([[0.5, -0.3, 0.2, 0.0, 0.1, -0.6]], np.float32), (64, 1))
    batch = TransitionBatch(**{**batch.__dict__, "bc_actions": target})

    def gap() -> float:
        with torch.no_grad():
            mode = agent.actor(agent.encoder(agent.obs_tensors(batch.obs))).mode()
        return float(((mode - torch.as_tensor(target)) ** 2).sum(-1).mean())

    start = gap()
    for _ in range(150):
        agent.actor_update(batch)
    assert gap() < 0.1 * start


def test_bc_loss_ignores_rows_without_bc_proposal():
    mode = torch.zeros(4, ACT)
    bc = torch.ones(4, ACT)
    bc[2:] = float("nan")
    assert float(Q2RLAgent.bc_loss(mode, bc)) == pytest.approx(ACT)
    assert float(Q2RLAgent.bc_loss(mode, torch.full((4, ACT), float("nan")))) == 0.0


def test_q_estimation_fits_value_and_initialises_every_critic():
    agent = make_agent()
    rng = np.random.default_rng(0)
    rollouts = []
    for i in range(12):
        T = 10 + i
        obs = obs_dict(rng.uniform(-1, 1, (T, OBS)).astype(np.float32))
        success = i % 2 == 0
        rewards = np.zeros(T, np.float32)
        rewards[-1] = float(success)
        rollouts.append(
            Rollout(
                obs=obs,
                actions=rng.uniform(-1, 1, (T, ACT)).astype(np.float32),
                rewards=rewards,
                terminated=success,
                final_next_obs=obs_dict(obs["ee_pose"][-1:]),
            )
        )
    cfg = QEstimationConfig(
        rollouts=12, value_steps=300, q_init_steps=800, actor_pretrain_steps=50, lr=3e-3, q_init_extra_actions=False
    )
    stats = run_q_estimation(agent, rollouts, cfg, q_init=True, actor_pretrain=True, seed=0)
    assert stats.transitions == sum(len(r.actions) for r in rollouts)
    obs = obs_dict(torch.as_tensor(np.concatenate([r.obs["ee_pose"] for r in rollouts])))
    act = torch.as_tensor(np.concatenate([r.actions for r in rollouts]))
    with torch.no_grad():
        q_hat = agent.q_bc_hat(obs, act, bonus_cap=cfg.q_init_bonus_cap)
        q = agent.critics(agent.encoder(obs), act)
        tq = agent.target_critics(agent.target_encoder(obs), act)
    # Every member tracks Q^_BC far better than a constant would, and the targets were synced.
    spread = float(q_hat.var())
    for k in range(agent.cfg.num_critics):
        assert float(((q[k] - q_hat) ** 2).mean()) < 0.3 * spread
    torch.testing.assert_close(q, tq)


def test_q_init_with_extra_actions_rates_unlikely_actions_low_like_q_bc_hat():
    agent = make_agent()
    rng = np.random.default_rng(1)
    obs = obs_dict(rng.uniform(-1, 1, (256, OBS)).astype(np.float32))
    obs_t = agent.obs_tensors(obs)
    with torch.no_grad():
        bc_actions = agent.bc_policy.mode(obs_t).numpy()
    cfg = QEstimationConfig(q_init_steps=800, lr=3e-3, batch_size=64, q_init_extra_actions=True, q_init_bonus_cap=None)
    initialise_critics(agent, obs, bc_actions, cfg, rng)
    far = torch.as_tensor(-np.sign(bc_actions) * 0.95, dtype=torch.float32)  # the far corner from the BC mode
    with torch.no_grad():
        q_mode = agent.q_rl_min(obs_t, torch.as_tensor(bc_actions))
        q_far = agent.q_rl_min(obs_t, far)
        target_mode = agent.q_bc_hat(obs_t, torch.as_tensor(bc_actions), bonus_cap=cfg.q_init_bonus_cap)
        target_far = agent.q_bc_hat(obs_t, far, bonus_cap=cfg.q_init_bonus_cap)
    target_gap = float(target_mode.mean() - target_far.mean())
    assert target_gap > 0.5
    # Q_RL learnt that actions far from the BC mode are worse, by a good part of what Q^_BC says.
    assert float(q_mode.mean() - q_far.mean()) > 0.5 * target_gap


def test_bonus_cap_limits_the_likelihood_term_from_above_only():
    agent = make_agent()
    obs = obs_dict(torch.rand(64, OBS) * 2 - 1)
    mode = agent.bc_policy.mode(obs)
    far = -mode.sign() * 0.99
    with torch.no_grad():
        v = agent.v_bc(obs)
        capped_mode = agent.q_bc_hat(obs, mode, bonus_cap=0.0)
        capped_far = agent.q_bc_hat(obs, far, bonus_cap=0.0)
    torch.testing.assert_close(capped_mode, torch.minimum(agent.q_bc_hat(obs, mode), v))
    assert torch.all(capped_mode <= v + 1e-5)
    torch.testing.assert_close(capped_far, agent.q_bc_hat(obs, far))  # below the cap: unchanged


def test_q_bc_hat_and_td_targets_stay_in_the_feasible_return_range():
    agent = make_agent(reward_scale=10.0, reward_bias=-1.0, discount=0.99)
    low, high = agent.cfg.value_range
    assert (low, high) == pytest.approx((-100.0, 9.0))
    _set_value_bias(agent, 1e4)
    obs = obs_dict(torch.zeros(8, OBS))
    assert torch.all(agent.q_bc_hat(obs, torch.zeros(8, ACT)) <= high)
    _constant_target_critics(agent, [-1e4] * 10)
    y = agent.td_target(torch.zeros(8), torch.ones(8), obs)
    assert torch.all(y >= low)


def test_initialise_critics_with_zero_steps_only_syncs():
    agent = make_agent()
    cfg = QEstimationConfig(q_init_steps=0)
    x = obs_dict(np.zeros((4, OBS), np.float32))
    initialise_critics(agent, x, np.zeros((4, ACT), np.float32), cfg, np.random.default_rng())
    for a, b in itertools.zip_longest(agent.critics.parameters(), agent.target_critics.parameters()):
        assert torch.equal(a, b)


def test_buffer_refuses_non_finite_and_wrong_shapes():
    buf = ReplayBuffer(100, SPEC, ACT)
    good = {
        "obs": obs_dict(np.zeros((2, OBS), np.float32)),
        "actions": np.zeros((2, ACT), np.float32),
        "rewards": np.zeros(2, np.float32),
        "next_obs": obs_dict(np.zeros((2, OBS), np.float32)),
        "terminated": np.zeros(2, bool),
        "truncated": np.zeros(2, bool),
    }
    buf.add_many(**good)
    assert len(buf) == 2
    with pytest.raises(ValueError, match="non-finite"):
        buf.add_many(**{**good, "obs": obs_dict(np.full((2, OBS), np.nan, np.float32))})
    with pytest.raises(ValueError, match="shape"):
        buf.add_many(**{**good, "actions": np.zeros((2, ACT + 1), np.float32)})
    assert len(buf) == 2


def test_acting_state_round_trip_reproduces_gating_and_refuses_mismatch():
    cfg = AgentConfig(hidden=[16, 16], num_critics=3)
    low, high = -np.ones(4, np.float32), np.ones(4, np.float32)
    spec = state_spec(4)
    a = Q2RLAgent(cfg, obs_spec=spec, state_low=low, state_high=high, action_dim=2, bc_policy=None, seed=0)
    b = Q2RLAgent(cfg, obs_spec=spec, state_low=low, state_high=high, action_dim=2, bc_policy=None, seed=1)
    obs = obs_dict(np.random.default_rng(0).uniform(-1, 1, (5, 4)).astype(np.float32))
    before = b.act(obs, rl_action="mode")
    state = a.acting_state()
    assert not any(k.startswith("target_critics.") for k in state)
    b.load_acting_state(state)
    da, db = a.act(obs, rl_action="mode"), b.act(obs, rl_action="mode")
    np.testing.assert_allclose(da.action, db.action, atol=1e-6)
    np.testing.assert_allclose(da.q_rl, db.q_rl, atol=1e-5)
    assert not np.allclose(before.q_rl, db.q_rl)
    with pytest.raises(KeyError, match="missing"):
        b.load_acting_state({k: v for k, v in state.items() if not k.startswith("value.")})
    bad = dict(state)
    key = next(k for k in bad if k.startswith("actor.") and bad[k].ndim == 2)
    bad[key] = torch.zeros(bad[key].shape[0] + 1, bad[key].shape[1])
    with pytest.raises(RuntimeError):
        b.load_acting_state(bad)


def test_compiled_update_matches_the_eager_update():
    """train.compile: torch.compile'd updates give the eager statistics and weights (the random draws are made
    outside the compiled code, from the same generator)."""
    eager = make_agent()
    compiled = Q2RLAgent(eager.cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=ACT,
                         bc_policy=eager.bc_policy, seed=3, compile="default")  # fmt: skip
    compiled.load_state_dict(eager.state_dict())
    for step in range(2):
        batches = [random_batch(32, seed=10 * step + i) for i in range(eager.cfg.utd)]
        a, b = eager.update(batches), compiled.update(batches)
        for name, value in a.as_dict().items():
            assert b.as_dict()[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.critic_updates == eager.critic_updates == 2 * eager.cfg.utd


# ---------------------------------------------------------------------------------------------------------------------
# One learner step against the reference math, written out: plain per-member loops, Adam by its formula
# ---------------------------------------------------------------------------------------------------------------------
def _adam(params: dict, grads: dict, state: dict, lr: float, betas=(0.9, 0.999), eps=1e-8) -> None:
    """Kingma & Ba's Adam with bias correction, in place on `params` (plain tensors)."""
    state["t"] = state.get("t", 0) + 1
    for name, g in grads.items():
        m = state.setdefault(("m", name), torch.zeros_like(g)).mul_(betas[0]).add_((1 - betas[0]) * g)
        v = state.setdefault(("v", name), torch.zeros_like(g)).mul_(betas[1]).add_((1 - betas[1]) * g * g)
        m_hat, v_hat = m / (1 - betas[0] ** state["t"]), v / (1 - betas[1] ** state["t"])
        params[name] = (params[name] - lr * m_hat / (v_hat.sqrt() + eps)).detach()


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)


def _q_member(p: dict, k: int, layers: int, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Critic k alone: Linear -> LayerNorm (member k's affine) -> ReLU per hidden layer, then the head."""
    x = torch.cat([features, actions], dim=-1)
    for i in range(layers):
        x = x @ p[f"linears.{i}.weight"][k] + p[f"linears.{i}.bias"][k, 0]
        x = torch.relu(_layer_norm(x) * p[f"norms.{i}.weight"][k, 0] + p[f"norms.{i}.bias"][k, 0])
    return (x @ p["head.weight"][k] + p["head.bias"][k, 0]).squeeze(-1)


def _tanh_gaussian(p: dict, layers: int, features: torch.Tensor, noise: torch.Tensor) -> tuple:
    """(a = tanh(u), log pi(a), mode tanh(mean)) of the SAC actor, u = mean + std * noise."""
    x = features
    for i in range(layers + 1):
        x = x @ p[f"net.{2 * i}.weight"].T + p[f"net.{2 * i}.bias"]
        x = torch.relu(x) if i < layers else x
    mean, raw = x.chunk(2, dim=-1)
    std = torch.exp(-5.0 + 3.5 * (torch.tanh(raw) + 1))
    u = mean + std * noise
    log_prob = torch.distributions.Normal(mean, std).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    return torch.tanh(u), log_prob, torch.tanh(mean)


def _reference_step(agent: Q2RLAgent, ref: dict, batches: list, draws: dict) -> dict:
    """One learner step (utd critic updates, then the actor and temperature update on the last minibatch) from the
    paper's equations, on the plain tensors of `ref` (updated in place); returns its statistics."""
    cfg = agent.cfg
    layers = len(cfg.hidden)
    low, high = cfg.value_range
    center, half = agent.encoder.normalizer.center, agent.encoder.normalizer.half_range

    def enc(obs):
        return (torch.as_tensor(obs["ee_pose"]) - center) / half

    losses = []
    for k, b in enumerate(batches):
        r = cfg.reward_scale * torch.as_tensor(b.rewards) + cfg.reward_bias
        not_done = 1.0 - torch.as_tensor(b.terminated).float()
        with torch.no_grad():
            a_next, _, _ = _tanh_gaussian(ref["actor"], layers, enc(b.next_obs), draws["noise"][k])
            q_next = (
                torch.stack(
                    [_q_member(ref["target"], int(m), layers, enc(b.next_obs), a_next) for m in draws["members"][k]]
                )
                .min(dim=0)
                .values
            )
            y = (r + cfg.discount * not_done * q_next).clamp(low, high)
        critic = {n: t.clone().requires_grad_(True) for n, t in ref["critic"].items()}
        q = torch.stack([_q_member(critic, m, layers, enc(b.obs), torch.as_tensor(b.actions)) for m in range(10)])
        loss = sum(((q[m] - y) ** 2).mean() for m in range(10))
        grads = dict(zip(critic, torch.autograd.grad(loss, list(critic.values())), strict=True))
        _adam(ref["critic"], grads, ref["critic_adam"], cfg.critic_lr)
        for n in ref["target"]:
            ref["target"][n] = ref["target"][n] + cfg.tau * (ref["critic"][n] - ref["target"][n])
        losses.append(float(loss) / 10)
        q_mean = float(q.mean())
    b = batches[-1]
    actor = {n: t.clone().requires_grad_(True) for n, t in ref["actor"].items()}
    a, log_prob, mode = _tanh_gaussian(actor, layers, enc(b.obs), draws["noise"][-1])
    qs = torch.stack([_q_member(ref["critic"], m, layers, enc(b.obs), a) for m in range(10)])
    q = qs.mean(dim=0) if cfg.actor_q == "mean" else qs.min(dim=0).values
    sac = (ref["log_alpha"].exp() * log_prob - q).mean() / q.detach().abs().mean().clamp_min(1e-3)
    bc = ((mode - torch.as_tensor(b.bc_actions)) ** 2).sum(-1).mean()
    w = cfg.bc_loss_weight
    actor_loss = (1 - w) * sac + w * bc
    grads = dict(zip(actor, torch.autograd.grad(actor_loss, list(actor.values())), strict=True))
    _adam(ref["actor"], grads, ref["actor_adam"], cfg.actor_lr)
    log_alpha = ref["log_alpha"].clone().requires_grad_(True)
    alpha_loss = -(log_alpha * (log_prob.detach() - agent.action_dim)).mean()
    _adam(ref, {"log_alpha": torch.autograd.grad(alpha_loss, log_alpha)[0]}, ref["alpha_adam"], cfg.temperature_lr)
    return {"critic_loss": np.mean(losses), "q_mean": q_mean, "temperature": float(ref["log_alpha"].exp()),
            "actor_loss": float(actor_loss), "sac_loss": float(sac), "bc_loss": float(bc),
            "entropy": float(-log_prob.mean())}  # fmt: skip


@pytest.mark.parametrize("actor_q", ["min", "mean"])
def test_a_learner_step_matches_the_reference_math(actor_q):
    """Two learner steps of the agent (batched ensemble, fused soft update, torch's Adam) against the same steps
    written out from the equations: TD target with the min over a random subset of target critics, the sum of the
    members' squared errors, the actor loss on the ensemble's min or REDQ's mean normalised by |Q| plus the BC term,
    the temperature loss, Adam and the soft target update. Both consume the agent's random draws."""
    agent = make_agent(utd=4, tau=0.3, actor_q=actor_q)
    with torch.no_grad():  # targets away from the critics and a large tau: the soft update moves them measurably
        for p in agent.target_critics.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.detach().clone() for k, v in agent.state_dict().items()}
    ref = {
        "critic": {k[len("critics.") :]: v for k, v in state.items() if k.startswith("critics.")},
        "target": {k[len("target_critics.") :]: v for k, v in state.items() if k.startswith("target_critics.")},
        "actor": {k[len("actor.") :]: v for k, v in state.items() if k.startswith("actor.")},
        "log_alpha": state["log_alpha"],
        "critic_adam": {}, "actor_adam": {}, "alpha_adam": {},
    }  # fmt: skip
    draws: list = []
    agent_draws = agent._draws
    agent._draws = lambda rows, **kw: draws.append(agent_draws(rows, **kw)) or draws[-1]
    for step in range(2):
        batches = [random_batch(32, seed=10 * step + i) for i in range(4)]
        got = agent.update(batches).as_dict()
        expected = _reference_step(agent, ref, batches, draws[-1])
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, name)
    for name, value in ref["critic"].items():
        torch.testing.assert_close(agent.critics.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in ref["target"].items():
        torch.testing.assert_close(agent.target_critics.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in ref["actor"].items():
        torch.testing.assert_close(agent.actor.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(agent.log_alpha.detach(), ref["log_alpha"])
    # The step moved every part (a reference equal to the start would prove nothing).
    assert not torch.equal(ref["actor"]["net.0.weight"], state["actor.net.0.weight"])
    assert not torch.equal(ref["critic"]["head.weight"], state["critics.head.weight"])


def test_a_diverged_update_is_refused_not_reported_as_statistics():
    agent = make_agent()
    with torch.no_grad():
        agent.critics.linears[0].weight[0, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        agent.update([random_batch(seed=i) for i in range(agent.cfg.utd)])


def test_optimiser_states_saved_on_a_gpu_resume_on_a_cpu_learner():
    """A GPU learner's Adam states are capturable (step counts on the GPU); its checkpoint resumed on a CPU learner
    keeps the CPU's kind: the saved groups' `capturable` would make every CPU update fail. The steps then go on exactly
    as from the same states saved on a CPU."""
    import copy

    source = make_agent()
    source.update([random_batch(32, seed=i) for i in range(source.cfg.utd)])
    saved = source.optimizer_states()
    as_if_gpu = copy.deepcopy(saved)
    for state in as_if_gpu.values():
        for group in state["param_groups"]:
            group["capturable"] = True  # (the step tensors come back to the CPU with the checkpoint's tensors)
    results = []
    for states in (saved, as_if_gpu):
        agent = make_agent()
        agent.load_state_dict(source.state_dict())
        agent.load_optimizer_states(copy.deepcopy(states))
        for opt in (agent.actor_opt, agent.critic_opt, agent.alpha_opt):
            assert not any(group["capturable"] for group in opt.param_groups)
            assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32 for s in opt.state.values())
        results.append(agent.update([random_batch(32, seed=10 + i) for i in range(agent.cfg.utd)]).as_dict())
    assert results[1] == results[0]
