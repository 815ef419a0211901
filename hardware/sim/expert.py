"""A scripted peg-insertion demonstrator with a human's imperfections, for simulated demonstrations.

It knows where the hole is (the env's privileged task), but each episode it misjudges the hole's position by a
Gaussian offset (`perceived_offset_std_m`), and its actions carry smoothly correlated Gaussian noise (`action_noise`,
`noise_smoothing`), like a hand's tremor; close to the board the tremor shrinks, like a teleoperator's fine mode.
Strategy: move over the (perceived) hole while levelling the peg, staying 12 mm above the board until over it;
descend fast while well above the board and creep (~3 mm per step) near it (fast steps near the board push the tip
sideways, sim-facts.md); hover 3 mm above the hole until lined up; creep down into the hole. When the peg is blocked
on the board's surface, lift, line up again (the misjudgement shrinks a little with each try) and retry.

Every output is an action in [-1, 1]^6 for `RobotEnv` (deltas on the target, relative to the reference pose).
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from robot_rl.config import STATE_OBS_KEY, ExpertConfig
from robot_rl.hardware.env import RobotEnv

APPROACH_HEIGHT_M = 0.012  # above the board's top: the lowest the tip goes before it is over the hole
NEAR_HOLE_M = 0.004  # "over the hole" for the approach: close enough to come down to the hover height
HOVER_HEIGHT_M = 0.003  # lines up here, just above the board, before inserting
CREEP_HEIGHT_M = 0.015  # below this height above the board, move down slowly
CREEP_STEP_M = 0.003  # ~3 mm per step near the board: 15 mm steps push the tip sideways
XY_TOLERANCE_M = 0.0005  # lined up well enough (measured) to insert
RPY_TOLERANCE_RAD = 0.01
BLOCKED_STEPS = 3  # steps without progress on the board's surface before lifting and lining up again
PROGRESS_M = 0.0003
RETRY_OFFSET_SHRINK = 0.97  # share of the perceived offset left after each blocked try
FINE_NOISE_SCALE = 0.3  # share of the action noise left in the align and insert phases


class Phase(enum.Enum):
    APPROACH = "approach"  # over the hole, down to the hover height
    ALIGN = "align"  # hover until lined up
    INSERT = "insert"  # creep down until inserted or blocked


class ScriptedExpert:
    """Acts on `RobotEnv` observations using the env's privileged hole position; call `reset()` each episode.

    The expert steers the env's current target (`env.mapper.target`) towards a waypoint chosen from the measured pose:
    proportional control of the target, so its own noise does not accumulate in the target.
    """

    def __init__(self, env: gym.Env, cfg: ExpertConfig, rng: np.random.Generator) -> None:
        base = env.unwrapped
        if not isinstance(base, RobotEnv) or not hasattr(base.task, "hole_top"):
            raise TypeError("ScriptedExpert needs a RobotEnv whose task knows the hole (the simulated peg task)")
        self._env = base
        self._cfg = cfg
        self._rng = rng
        self._hole = np.zeros(3)
        self._true_hole = np.zeros(3)
        self._noise = np.zeros(6)
        self.phase = Phase.APPROACH
        self._stalled = 0
        self._last_height = np.inf
        self.perceived_offset = np.zeros(2)
        self.reset()

    def reset(self) -> None:
        """Start an episode: draw where the demonstrator believes the hole is, and restart the tremor."""
        true_hole = self._env.task.hole_top - self._env.reference.pos  # relative to the reference pose
        self.perceived_offset = self._rng.normal(0.0, self._cfg.perceived_offset_std_m, size=2)
        self._true_hole = true_hole
        self._hole = true_hole + np.array([*self.perceived_offset, 0.0])
        self._noise = np.zeros(6)
        self.phase = Phase.APPROACH
        self._stalled = 0
        self._last_height = np.inf

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The noisy action for an observation, float32 in [-1, 1]^6."""
        action = self.clean_action(obs[STATE_OBS_KEY], self._env.mapper.target)
        # Like a teleoperator switching to a fine mode close to the board: the tremor shrinks with the speed.
        gain = FINE_NOISE_SCALE if self.phase in (Phase.ALIGN, Phase.INSERT) else 1.0
        action = action + gain * self._next_noise()
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    __call__ = act

    def clean_action(self, pose: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The noise-free action for a measured relative pose (6,) and the current target (6,)."""
        waypoint = self.waypoint(np.asarray(pose, dtype=np.float64), np.asarray(target, dtype=np.float64))
        return np.clip((waypoint - target) / self._env.mapper.step_size, -1.0, 1.0)

    def waypoint(self, pose: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Where the expert wants the target next (relative 6-vector); advances the phase from the measured pose."""
        height = pose[2] - self._hole[2]
        off_by = float(np.max(np.abs(self._hole[:2] - pose[:2])))
        tilt = float(np.max(np.abs(pose[3:])))
        self._update_phase(height, off_by, tilt)
        waypoint = np.zeros(6)  # peg level and aligned with the hole: rpy 0
        waypoint[:2] = self._hole[:2]
        target_height = target[2] - self._hole[2]
        waypoint[2] = self._hole[2] + self._next_height(height, target_height, off_by)
        return waypoint

    def _update_phase(self, height: float, off_by: float, tilt: float) -> None:
        progress = self._last_height - height
        self._last_height = height
        if self.phase is Phase.APPROACH and height < HOVER_HEIGHT_M + 0.001 and off_by < NEAR_HOLE_M:
            self.phase = Phase.ALIGN
        elif self.phase is Phase.ALIGN and off_by < XY_TOLERANCE_M and tilt < RPY_TOLERANCE_RAD:
            self.phase, self._stalled = Phase.INSERT, 0
        elif self.phase is Phase.INSERT and height > -0.001:
            # Still on the surface: count steps without progress; blocked means lift, line up and try again.
            self._stalled = self._stalled + 1 if progress < PROGRESS_M else 0
            if self._stalled >= BLOCKED_STEPS:
                self.phase = Phase.ALIGN
                # A failed try makes the demonstrator look again: the misjudgement shrinks.
                self._hole[:2] = self._true_hole[:2] + RETRY_OFFSET_SHRINK * (self._hole[:2] - self._true_hole[:2])

    def _next_height(self, height: float, target_height: float, off_by: float) -> float:
        """Height above the hole's top the expert wants the target at next."""
        if self.phase is Phase.INSERT:
            return target_height - CREEP_STEP_M
        floor = HOVER_HEIGHT_M if off_by < NEAR_HOLE_M else APPROACH_HEIGHT_M
        if self.phase is Phase.ALIGN:
            return HOVER_HEIGHT_M
        if height > CREEP_HEIGHT_M:
            return max(floor, CREEP_HEIGHT_M)  # fast (the step limit caps it at one action), then creep
        return max(floor, target_height - CREEP_STEP_M)

    def _next_noise(self) -> np.ndarray:
        rho, sigma = self._cfg.noise_smoothing, self._cfg.action_noise
        # AR(1) noise with stationary std sigma: rho = 0 is white noise, rho near 1 drifts slowly.
        self._noise = rho * self._noise + np.sqrt(1.0 - rho**2) * self._rng.normal(0.0, sigma, size=6)
        return self._noise


@dataclass(frozen=True)
class ExpertStats:
    """How a scripted expert did over some episodes."""

    episodes: int
    successes: int
    mean_steps: float

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes


def evaluate_expert(env: gym.Env, cfg: ExpertConfig, *, episodes: int, seed: int = 0) -> ExpertStats:
    """Run the expert for `episodes` episodes (env reset seeds seed*100_000 + i) and count successes."""
    expert = ScriptedExpert(env, cfg, np.random.default_rng(seed))
    successes, steps = 0, 0
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed * 100_000 + episode)
        expert.reset()
        terminated = truncated = False
        while not (terminated or truncated):
            obs, _, terminated, truncated, _ = env.step(expert.act(obs))
            steps += 1
        successes += int(terminated)
    return ExpertStats(episodes=episodes, successes=successes, mean_steps=steps / max(episodes, 1))


def main() -> None:
    """`python -m robot_rl.hardware.sim.expert [--episodes N] [--seed S]`: success rates of the scripted expert."""
    from robot_rl.hardware.sim.peg import make_peg_insertion_env  # here: peg imports nothing from this module

    parser = argparse.ArgumentParser(description="Success rate of the scripted peg-insertion expert.")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = make_peg_insertion_env()
    settings = {
        "clean (no noise, no offset)": ExpertConfig(action_noise=0.0, perceived_offset_std_m=0.0),
        "default ExpertConfig": ExpertConfig(),
    }
    for name, cfg in settings.items():
        stats = evaluate_expert(env, cfg, episodes=args.episodes, seed=args.seed)
        print(
            f"{name:<30} {stats.successes}/{stats.episodes} = {stats.success_rate:.0%}, "
            f"mean {stats.mean_steps:.1f} steps/episode"
        )


if __name__ == "__main__":
    main()
