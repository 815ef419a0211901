"""Q-Estimation (paper §IV-A, design §5): from BC rollouts to V_BC, Q^_BC, an initialised Q_RL and a pre-trained actor.

1. Monte-Carlo returns of every rollout step under the transformed reward.
2. Regress V_BC(s) on them. A step-limit (truncated) episode has no terminal value, so its tail is bootstrapped:
   first with the value of never succeeding (bias / (1 - gamma)), then, for later rounds, with the last V_BC fit at the
   final next state. The online critic bootstraps truncations the same way, so both Q-functions share one scale and
   Q-gating compares like with like.
3. Q^_BC(s, a) = V_BC(s) + alpha * (log pi_BC(a|s) + H(pi_BC(.|s))).
4. Regress every critic of the ensemble to Q^_BC on the rollout states (at the rollout actions, BC samples and random
   actions; the likelihood bonus capped, see QEstimationConfig.q_init_bonus_cap); copy into the target critics.
5. Pull the RL actor's mode towards the BC actions at the rollout states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.agent import Q2RLAgent, TensorObs, transform_reward
from robot_rl.config import QEstimationConfig

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Rollout:
    """One BC episode: obs (dict of [T, ...]), actions [T, A], raw rewards [T], final next_obs (dict of [1, ...])."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    final_next_obs: dict[str, np.ndarray]


@dataclass(frozen=True)
class QEstimationStats:
    episodes: int
    transitions: int
    value_loss: float
    q_init_loss: float
    actor_pretrain_loss: float
    mean_return: float


def mc_returns(rewards: np.ndarray, *, terminated: bool, discount: float, bootstrap: float = 0.0) -> np.ndarray:
    """G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k  (+ gamma^(T-t) * bootstrap when the episode was not terminated).

    A terminated episode ends in an absorbing state (value 0); a truncated one continues beyond the step limit, whose
    value `bootstrap` stands in for.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or len(rewards) == 0:
        raise ValueError(f"rewards must be a non-empty 1-D array, got shape {rewards.shape}")
    returns = np.empty_like(rewards)
    running = 0.0 if terminated else float(bootstrap)
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + discount * running
        returns[t] = running
    return returns.astype(np.float32)


def _minibatches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    for _ in range(steps):
        yield rng.integers(0, n, size=min(batch_size, n))


def _rows(obs: TensorObs, idx: np.ndarray, device: torch.device) -> TensorObs:
    """Rows idx of a CPU-held observation dataset, on the device."""
    index = torch.as_tensor(idx)
    return {k: v[index].to(device, non_blocking=True) for k, v in obs.items()}


def fit_value(
    agent: Q2RLAgent,
    obs: dict[str, np.ndarray],
    returns: np.ndarray,
    cfg: QEstimationConfig,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> float:
    """Regress V_BC on Monte-Carlo returns; returns the last minibatch loss."""
    optimizer = torch.optim.Adam(agent.value_parameters(), lr=cfg.lr)
    obs_t, ret_t = obs_lib.to_tensors(obs, "cpu"), agent.tensor(returns)
    loss = torch.zeros(())
    for step, idx in enumerate(_minibatches(len(ret_t), cfg.batch_size, cfg.value_steps, rng)):
        pred = agent.v_bc(agent.augment(_rows(obs_t, idx, agent.device)))
        loss = torch.nn.functional.mse_loss(pred, ret_t[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None and step % 100 == 0:
            progress("qest_fit:value", step, cfg.value_steps)
    return float(loss.detach())


def _q_init_batch(
    agent: Q2RLAgent,
    obs: TensorObs,
    actions: torch.Tensor,
    cfg: QEstimationConfig,
    generator: torch.Generator,
) -> tuple[TensorObs, torch.Tensor, torch.Tensor]:
    """(obs, actions, Q^_BC targets) for one regression minibatch.

    With extra actions, each state also appears with a BC sample and a uniformly random action: Q^_BC is defined for
    every action (low where pi_BC is unlikely to act), and fitting it there keeps Q_RL from starting with arbitrary
    values off the rollout actions, where the RL actor would otherwise find and exploit them.
    """
    if cfg.q_init_extra_actions:
        with torch.no_grad():
            sampled = agent.bc_policy.sample(obs, generator).clamp(-1.0, 1.0)
        uniform = torch.rand(actions.shape, generator=generator, device=actions.device) * 2 - 1
        obs = {k: torch.cat([v, v, v]) for k, v in obs.items()}
        actions = torch.cat([actions, sampled, uniform])
    with torch.no_grad():
        targets = agent.q_bc_hat(obs, actions, bonus_cap=cfg.q_init_bonus_cap)
    return obs, actions, targets


def initialise_critics(
    agent: Q2RLAgent,
    obs: dict[str, np.ndarray],
    actions: np.ndarray,
    cfg: QEstimationConfig,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> float:
    """Regress every member of the Q_RL ensemble (and the critics' encoder) to Q^_BC on the rollout states; then sync
    the target critics. Q^_BC is scored on the unshifted images, the critics see shifted ones (DrQ)."""
    optimizer = torch.optim.Adam(agent.critic_parameters(), lr=cfg.lr)
    obs_t, act_t = obs_lib.to_tensors(obs, "cpu"), agent.tensor(actions)
    generator = torch.Generator(device=agent.device).manual_seed(int(rng.integers(2**31)))
    loss = torch.zeros(())
    for step, idx in enumerate(_minibatches(len(act_t), cfg.batch_size, cfg.q_init_steps, rng)):
        b_obs, b_act, b_tgt = _q_init_batch(agent, _rows(obs_t, idx, agent.device), act_t[idx], cfg, generator)
        q = agent.critics(agent.encoder(agent.augment(b_obs)), b_act)
        loss = ((q - b_tgt.unsqueeze(0)) ** 2).mean(dim=1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None and step % 100 == 0:
            progress("qest_fit:critics", step, cfg.q_init_steps)
    agent.sync_target()
    return float(loss.detach()) / agent.cfg.num_critics


def pretrain_actor(
    agent: Q2RLAgent,
    obs: dict[str, np.ndarray],
    bc_actions: np.ndarray,
    cfg: QEstimationConfig,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> float:
    """Pull the RL actor's mode towards the BC actions (the same BC loss the online actor update uses)."""
    optimizer = torch.optim.Adam(agent.actor.parameters(), lr=cfg.lr)
    obs_t, act_t = obs_lib.to_tensors(obs, "cpu"), agent.tensor(bc_actions)
    loss = torch.zeros(())
    for step, idx in enumerate(_minibatches(len(act_t), cfg.batch_size, cfg.actor_pretrain_steps, rng)):
        with torch.no_grad():
            features = agent.encoder(agent.augment(_rows(obs_t, idx, agent.device)))
        mode = agent.actor(features).mode()
        loss = agent.bc_loss(mode, act_t[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None and step % 100 == 0:
            progress("qest_fit:actor", step, cfg.actor_pretrain_steps)
    return float(loss.detach())


def rollout_returns(agent: Q2RLAgent, rollouts: list[Rollout], *, bootstrap_with_value: bool) -> np.ndarray:
    """Monte-Carlo returns of every rollout step, concatenated, under the agent's reward transform."""
    cfg = agent.cfg
    never_succeed = cfg.reward_bias / (1.0 - cfg.discount)
    parts = []
    for ro in rollouts:
        bootstrap = never_succeed
        if bootstrap_with_value and not ro.terminated:
            with torch.no_grad():
                bootstrap = float(agent.v_bc(agent.obs_tensors(ro.final_next_obs))[0])
        rewards = transform_reward(ro.rewards, cfg.reward_scale, cfg.reward_bias)
        parts.append(mc_returns(rewards, terminated=ro.terminated, discount=cfg.discount, bootstrap=bootstrap))
    return np.concatenate(parts)


def run_q_estimation(
    agent: Q2RLAgent,
    rollouts: list[Rollout],
    cfg: QEstimationConfig,
    *,
    q_init: bool,
    actor_pretrain: bool,
    seed: int,
    progress: Progress | None = None,
) -> QEstimationStats:
    """Fit V_BC (and so Q^_BC) on BC rollouts; optionally initialise Q_RL from Q^_BC and pre-train the actor."""
    if not rollouts:
        raise ValueError("Q-Estimation needs at least one BC rollout")
    rng = np.random.default_rng(seed)
    obs = obs_lib.concat([ro.obs for ro in rollouts])
    actions = np.concatenate([ro.actions for ro in rollouts])
    value_loss = 0.0
    returns = rollout_returns(agent, rollouts, bootstrap_with_value=False)
    for round_ in range(cfg.value_rounds):
        if round_ > 0:
            returns = rollout_returns(agent, rollouts, bootstrap_with_value=True)
        value_loss = fit_value(agent, obs, returns, cfg, rng, progress)
    q_init_loss = actor_loss = float("nan")
    if q_init:
        q_init_loss = initialise_critics(agent, obs, actions, cfg, rng, progress)
    if actor_pretrain:
        actor_loss = pretrain_actor(agent, obs, actions, cfg, rng, progress)
    return QEstimationStats(
        episodes=len(rollouts),
        transitions=len(actions),
        value_loss=value_loss,
        q_init_loss=q_init_loss,
        actor_pretrain_loss=actor_loss,
        mean_return=float(returns.mean()),
    )
