"""Actor loop timing: Q-gating at a fixed rate on the sim twin, compute per step and period jitter.

    python bench/actor.py [--minutes 10] [--period 0.1] [--config configs/sim_peg_state.yaml]

Runs the actor's own episode loop (`ActorService.run_episode`, gated: BC proposal + RL proposal + V_BC + the critic
ensemble every step, episode logs written) for the given wall time at the given period, with networks of the config's
sizes (weights as initialised: timing does not depend on their values). Compute is the time from the start of a
step to the end of its work (env step included); the period is measured between consecutive deadline wake-ups.
The last line is the headline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robot_rl.actor.service import ActorService
from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.config import load_config
from robot_rl.envs import make_env
from robot_rl.obs import spec_from_space, state_bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--config", default="configs/sim_peg_state.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"actor.period_s={args.period}", "train.torch_threads=1"])
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        env = make_env(cfg.env)
        spec = spec_from_space(env.observation_space)
        low, high = state_bounds(env.observation_space)
        env.close()
        bc = make_bc_policy(cfg.bc, spec, 6, low, high)
        save_bc(bc, Path(tmp) / "bc")
        service = ActorService(cfg, Path(tmp) / "actor", bc_dir=Path(tmp) / "bc", learner=None, quiet=True)
        service.weights_version = 0  # gate with the initial networks
        end = time.monotonic() + args.minutes * 60
        episodes = 0
        while time.monotonic() < end:
            service.run_episode(kind="online", gated=True, send=False, seed=episodes)
            episodes += 1
        stats = service.rate.stats
        service.env.close()
    compute = np.asarray(stats.compute_s) * 1e3
    period = np.asarray(stats.period_s) * 1e3
    print(f"config {args.config}: hidden {cfg.agent.hidden}, {cfg.agent.num_critics} critics, BC {cfg.bc.policy}")
    print(f"{'what':<22}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in (("compute per step", compute), ("period", period)):
        print(f"{name:<22}{np.percentile(values, 50):>10.2f}{np.percentile(values, 99):>10.2f}{values.max():>10.2f}")
    jitter = np.abs(period - args.period * 1e3)
    print(f"{'|period - target|':<22}{np.percentile(jitter, 50):>10.2f}{np.percentile(jitter, 99):>10.2f}"
          f"{jitter.max():>10.2f}")  # fmt: skip
    print(f"steps {stats.ticks}, episodes {episodes}, overruns (missed deadlines) {stats.overruns}")
    print(f"headline: compute p99 {np.percentile(compute, 99):.2f} ms, period jitter p99 "
          f"{np.percentile(jitter, 99):.2f} ms, {stats.overruns} missed ticks in {stats.ticks}")  # fmt: skip


if __name__ == "__main__":
    main()
