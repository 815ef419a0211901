"""Learner steps per second (one step = UTD critic updates + one actor update) for several network sizes.

    python bench/learner.py [--device cpu|cuda|auto] [--threads N] [--steps N] [--sizes paper,cpu,...]

Synthetic minibatches of the state config's shapes (6-D observation, 6-D action) are drawn from a filled replay
buffer, so the figure includes sampling and host->device copies, as in training. The last line is the headline
(the CPU config's rate).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy
from robot_rl.buffer import ReplayBuffer
from robot_rl.config import AgentConfig, BCConfig, load_config

SIZES = {
    # name: (hidden, critics, batch)
    "paper": ([512, 512, 512], 10, 256),
    "256x2": ([256, 256], 10, 256),
    "cpu": (None, None, None),  # configs/sim_peg_state.yaml's agent section
}
OBS_DIM = ACTION_DIM = 6


def measure(agent_cfg: AgentConfig, *, device: str, steps: int, warmup: int = 5) -> float:
    low, high = -np.ones(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32)
    bc = make_bc_policy(BCConfig(), OBS_DIM, ACTION_DIM, low, high)
    agent = Q2RLAgent(agent_cfg, obs_low=low, obs_high=high, action_dim=ACTION_DIM, bc_policy=bc, device=device)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(50_000, OBS_DIM, ACTION_DIM)
    n = 50_000
    buf.add_many(
        obs=rng.uniform(-1, 1, (n, OBS_DIM)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
        rewards=(rng.random(n) < 0.02).astype(np.float32),
        next_obs=rng.uniform(-1, 1, (n, OBS_DIM)).astype(np.float32),
        terminated=rng.random(n) < 0.02,
        truncated=np.zeros(n, bool),
        bc_actions=rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
    )

    def step() -> None:
        agent.update([buf.sample(agent_cfg.batch_size, rng) for _ in range(agent_cfg.utd)])

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sizes", default="paper,256x2,cpu")
    parser.add_argument("--config", default="configs/sim_peg_state.yaml", help="config whose agent is 'cpu'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    cpu_agent = load_config(args.config).agent
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps each")
    print(f"{'size':<8} {'hidden':<18} {'critics':>7} {'batch':>5} {'utd':>3} {'steps/s':>9}")
    last = 0.0
    for name in args.sizes.split(","):
        hidden, critics, batch = SIZES[name]
        cfg = cpu_agent if hidden is None else AgentConfig(hidden=hidden, num_critics=critics, batch_size=batch)
        last = measure(cfg, device=device, steps=args.steps)
        print(f"{name:<8} {cfg.hidden!s:<18} {cfg.num_critics:>7} {cfg.batch_size:>5} {cfg.utd:>3} {last:>9.1f}")
    print(f"learner steps/s ({args.sizes.split(',')[-1]}): {last:.1f}")


if __name__ == "__main__":
    main()
