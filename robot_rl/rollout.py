"""Running episodes: demonstrations, BC rollouts, Q-gated episodes and evaluations.

A policy here is any callable from one dict observation (robot_rl.obs, unbatched) to a `StepChoice` (the executed
action plus the gating record), so BC alone, the gated agent and the scripted expert share one episode runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.agent import Q2RLAgent
from robot_rl.episodes import Episode

GATING_EXTRAS = ("bc_action", "rl_action", "q_bc", "q_rl", "use_bc")


@dataclass(frozen=True)
class StepChoice:
    """What a policy decided at one step: the executed action and, for gated policies, the gating record."""

    action: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


Policy = Callable[[dict[str, np.ndarray]], StepChoice]


@dataclass
class EpisodeResult:
    episode: Episode
    success: bool
    length: int
    bc_steps: int


def run_episode(
    env: gym.Env, policy: Policy, *, seed: int | None, on_step: Callable[[int], None] | None = None
) -> EpisodeResult:
    """Run one episode to termination or truncation; returns it in the on-disk Episode form."""
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list] = {"obs": [], "next_obs": [], "actions": [], "rewards": [], "term": [], "trunc": []}
    extras: dict[str, list] = {}
    success, bc_steps = False, 0
    while True:
        choice = policy(obs)
        next_obs, reward, terminated, truncated, info = env.step(choice.action)
        for name, value in (
            ("obs", obs),
            ("next_obs", next_obs),
            ("actions", np.asarray(choice.action, np.float32)),
            ("rewards", float(reward)),
            ("term", bool(terminated)),
            ("trunc", bool(truncated)),
        ):
            rows[name].append(value)
        for name, value in choice.extras.items():
            extras.setdefault(name, []).append(value)
        bc_steps += int(bool(choice.extras.get("use_bc", False)))
        success = success or bool(info.get("is_success", False))
        if on_step is not None:
            on_step(len(rows["obs"]))
        obs = next_obs
        if terminated or truncated:
            break
    episode = Episode(
        obs=obs_lib.stack(rows["obs"]),
        next_obs=obs_lib.stack(rows["next_obs"]),
        actions=np.stack(rows["actions"]).astype(np.float32),
        rewards=np.asarray(rows["rewards"], np.float32),
        terminated=np.asarray(rows["term"], bool),
        truncated=np.asarray(rows["trunc"], bool),
        extras={k: np.asarray(v) for k, v in extras.items()},
        attrs={"seed": -1 if seed is None else int(seed), "success": bool(success)},
    )
    return EpisodeResult(episode=episode, success=success, length=len(rows["obs"]), bc_steps=bc_steps)


def clip_action(action: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(np.asarray(action, np.float32), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def bc_policy_fn(bc: torch.nn.Module, *, mode: str, seed: int | None = None) -> Policy:
    """The BC policy alone (Q-Estimation rollouts, BC evaluation); the proposal is recorded as bc_action. Sampled
    actions come from one generator on the policy's device, seeded with `seed` (None: torch's default seed)."""
    generator = torch.Generator(device=bc.device)
    if seed is not None:
        generator.manual_seed(seed)

    @torch.no_grad()
    def act(obs: dict[str, np.ndarray]) -> StepChoice:
        obs_t = obs_lib.to_tensors(obs_lib.batch1(obs), bc.device)
        raw = bc.mode(obs_t) if mode == "mode" else bc.sample(obs_t, generator)
        action = clip_action(raw[0].cpu().numpy())
        return StepChoice(action=action, extras={"bc_action": action, "use_bc": np.bool_(True)})

    return act


def gated_policy_fn(agent: Q2RLAgent, *, rl_action: str | None = None) -> Policy:
    """The Q-gated policy (paper Eq. 10), recording both proposals, both values and the decision."""

    def act(obs: dict[str, np.ndarray]) -> StepChoice:
        d = agent.act(obs_lib.batch1(obs), rl_action=rl_action)
        extras = {
            "bc_action": d.bc_action[0],
            "rl_action": d.rl_action[0],
            "q_bc": np.float32(d.q_bc[0]),
            "q_rl": np.float32(d.q_rl[0]),
            "use_bc": np.bool_(d.use_bc[0]),
        }
        return StepChoice(action=clip_action(d.action[0]), extras=extras)

    return act


@dataclass(frozen=True)
class EvalResult:
    success_rate: float
    bc_action_fraction: float
    mean_length: float
    episodes: int


def evaluate(env: gym.Env, policy: Policy, *, episodes: int, seed: int) -> EvalResult:
    """Success rate over `episodes` (at least 1) episodes with seeds seed, seed+1, ... (the same states for every
    method); ValueError when `episodes` is below 1."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1 to compute a success rate, got {episodes}")
    results = [run_episode(env, policy, seed=seed + i) for i in range(episodes)]
    steps = sum(r.length for r in results)
    return EvalResult(
        success_rate=float(np.mean([r.success for r in results])),
        bc_action_fraction=sum(r.bc_steps for r in results) / max(steps, 1),
        mean_length=steps / len(results),
        episodes=len(results),
    )
