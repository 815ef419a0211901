"""Environment steps per second of the in-process MuJoCo peg-insertion twin, on one core.

    python bench/env_speed.py [--steps 2000] [--hold-steps 2]

Random actions (the arm wanders, touching the board now and then) and scripted-expert actions (contact-rich:
pushing on the board and inserting). Resets are included in the timing. The last line is the headline figure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from robot_rl.config import ExpertConfig
from robot_rl.hardware.env import RobotEnv
from robot_rl.hardware.sim.expert import ScriptedExpert
from robot_rl.hardware.sim.peg import make_peg_insertion_env


@dataclass(frozen=True)
class Result:
    name: str
    steps: int
    episodes: int
    successes: int
    seconds: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


def run(
    name: str, env: RobotEnv, policy: Callable[[dict], np.ndarray], on_reset: Callable[[], None], steps: int
) -> Result:
    """Step `env` for `steps` steps with `policy`, resetting at episode ends; time everything."""
    episodes = successes = 0
    start = time.perf_counter()
    obs, _ = env.reset(seed=0)
    on_reset()
    for i in range(steps):
        obs, _, terminated, truncated, _ = env.step(policy(obs))
        if terminated or truncated:
            episodes += 1
            successes += int(terminated)
            obs, _ = env.reset(seed=i + 1)
            on_reset()
    return Result(name, steps, episodes, successes, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="environment steps per row")
    parser.add_argument("--hold-steps", type=int, default=2, help="physics steps sharing one torque computation")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the figure claims

    env = make_peg_insertion_env(hold_steps=args.hold_steps)
    rng = np.random.default_rng(0)
    results = [run("random actions", env, lambda _: rng.uniform(-1, 1, 6).astype(np.float32), lambda: None, args.steps)]
    for label, cfg in (
        ("expert, clean", ExpertConfig(action_noise=0.0, perceived_offset_std_m=0.0)),
        ("expert, default noise", ExpertConfig()),
    ):
        expert = ScriptedExpert(env, cfg, np.random.default_rng(0))
        results.append(run(label, env, expert.act, expert.reset, args.steps))

    task = env.config.task
    print(
        f"physics dt {task.physics_dt_s * 1e3:.1f} ms, control period {task.control_period_s:.2f} s, "
        f"hold_steps {args.hold_steps}, one core"
    )
    print(f"{'policy':<24}{'steps':>8}{'episodes':>10}{'success':>9}{'steps/s':>10}")
    for r in results:
        print(f"{r.name:<24}{r.steps:>8}{r.episodes:>10}{r.successes:>9}{r.steps_per_s:>10.0f}")
    slowest = min(r.steps_per_s for r in results)
    print(f"env steps/s (slowest row, contact included): {slowest:.0f}")


if __name__ == "__main__":
    main()
