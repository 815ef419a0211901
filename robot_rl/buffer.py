"""Replay buffer of flat state transitions (numpy ring arrays).

Rewards are stored raw (the env's sparse 0/1); the agent transforms them when it learns, so the same buffer serves
every reward scale. `bc_actions` holds the BC proposal made at each state (for the auxiliary BC loss); it is NaN
where no BC proposal exists (demonstrations of a method without BC, plain SAC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robot_rl.config import AgentConfig


@dataclass(frozen=True)
class TransitionBatch:
    """A minibatch as numpy arrays; shapes [B, ...]."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    bc_actions: np.ndarray


class ReplayBuffer:
    """Fixed-capacity ring buffer; the oldest transitions are overwritten once full."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.bc_actions = np.full((capacity, action_dim), np.nan, np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.truncated = np.zeros(capacity, np.bool_)
        self._next = 0
        self.size = 0
        self.total_added = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        *,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
        bc_action: np.ndarray | None = None,
    ) -> None:
        self.add_many(
            obs=obs[None],
            actions=action[None],
            rewards=np.asarray([reward], np.float32),
            next_obs=next_obs[None],
            terminated=np.asarray([terminated]),
            truncated=np.asarray([truncated]),
            bc_actions=None if bc_action is None else bc_action[None],
        )

    def add_many(
        self,
        *,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        bc_actions: np.ndarray | None = None,
    ) -> None:
        n = len(obs)
        expected = {
            "obs": (obs, (n, self.obs_dim)),
            "next_obs": (next_obs, (n, self.obs_dim)),
            "actions": (actions, (n, self.action_dim)),
            "rewards": (rewards, (n,)),
            "terminated": (terminated, (n,)),
            "truncated": (truncated, (n,)),
        }
        if bc_actions is not None:
            expected["bc_actions"] = (bc_actions, (n, self.action_dim))
        for name, (array, shape) in expected.items():
            if np.shape(array) != shape:
                raise ValueError(f"{name} has shape {np.shape(array)}, expected {shape}")
        for name in ("obs", "next_obs", "actions", "rewards"):
            if not np.all(np.isfinite(expected[name][0])):
                raise ValueError(f"{name} holds non-finite values; refusing to store them")
        idx = (self._next + np.arange(n)) % self.capacity
        self.obs[idx] = obs
        self.next_obs[idx] = next_obs
        self.actions[idx] = actions
        self.rewards[idx] = rewards
        self.terminated[idx] = terminated
        self.truncated[idx] = truncated
        self.bc_actions[idx] = np.nan if bc_actions is None else bc_actions
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.total_added += n

    def sample(self, batch_size: int, rng: np.random.Generator) -> TransitionBatch:
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        idx = rng.integers(0, self.size, size=batch_size)
        return self.take(idx)

    def take(self, idx: np.ndarray) -> TransitionBatch:
        return TransitionBatch(
            obs=self.obs[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_obs=self.next_obs[idx],
            terminated=self.terminated[idx],
            bc_actions=self.bc_actions[idx],
        )


def concat_batches(a: TransitionBatch, b: TransitionBatch) -> TransitionBatch:
    """Join two minibatches (RLPD's 50/50 offline/online sampling)."""
    return TransitionBatch(
        *(np.concatenate([getattr(a, f), getattr(b, f)]) for f in TransitionBatch.__dataclass_fields__)
    )


def sample_utd_batches(
    buffer: ReplayBuffer, offline: ReplayBuffer | None, cfg: AgentConfig, rng: np.random.Generator
) -> list[TransitionBatch]:
    """The `cfg.utd` minibatches of one learner step; with `offline` (RLPD) each holds its share of demonstrations."""
    batches = []
    for _ in range(cfg.utd):
        if offline is not None:
            n_off = round(cfg.batch_size * cfg.effective_offline_ratio)
            batches.append(concat_batches(buffer.sample(cfg.batch_size - n_off, rng), offline.sample(n_off, rng)))
        else:
            batches.append(buffer.sample(cfg.batch_size, rng))
    return batches
