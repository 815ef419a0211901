"""Replay speed: logged steps per second that `robot-rl replay` checks, on one core.

    python bench/replay.py [LOG] [--config configs/sim_peg_state.yaml] [--steps 200] [--repeats 5]

Without LOG, an actor on the sim twin records one Q-gated episode first (no learner: a weights snapshot from a freshly
initialised agent of the config enters through the actor's swap point, so the archive holds it), `--steps` long.
Two figures: the whole command (reading the log, config, BC policy and weights, building the mock env and agent,
replaying) and the step loop alone, warm (mock robot, TargetMapper, the decision re-run and the comparisons). The
last line is the headline figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_main
import numpy as np
import torch

from robot_rl.actor.replay import Replayer, ReplayReport, load_inputs, read_log, replay_log
from robot_rl.actor.service import ActorService
from robot_rl.actor.weights_loader import ReadyWeights, prepare_weights
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.config import load_config
from robot_rl.obs import state_bounds, state_spec
from robot_rl.wire import Weights, pack_tensors


class _OneSnapshot:
    """The actor's swap point (its weights loader) fed one weights snapshot, as a learner's broadcast would."""

    refused = 0  # the loader's counters, in the actor's stats.json

    def __init__(self, agent: Q2RLAgent, weights: Weights) -> None:
        self.agent, self.weights = agent, weights

    def take(self) -> ReadyWeights | None:
        weights, self.weights = self.weights, None
        return None if weights is None else prepare_weights(self.agent, weights)

    def prepare_p99_s(self) -> None:
        return None

    def is_alive(self) -> bool:
        return False


def record_episode(config: Path, steps: int, root: Path) -> Path:
    """Run the actor for one gated episode of `steps` steps; returns the episode log."""
    cfg = load_config(config, ["actor.period_s=0", f"env.task.max_episode_steps={steps}", "train.torch_threads=1"])
    bc_dir = root / "bc"
    obs_dim = action_dim = 6
    save_bc(make_bc_policy(cfg.bc, state_spec(obs_dim), action_dim, -np.ones(obs_dim, np.float32),
                           np.ones(obs_dim, np.float32)), bc_dir)  # fmt: skip
    service = ActorService(cfg, root / "actor", bc_dir=bc_dir, learner=None, quiet=True)
    try:
        low, high = state_bounds(service.env.observation_space)
        agent = Q2RLAgent(cfg.agent, obs_spec=service.obs_spec, state_low=low, state_high=high,
                          action_dim=action_dim, bc_policy=service.bc)  # fmt: skip
        snapshot = Weights(version=1, phase="online", tensors=pack_tensors(agent.acting_state()))
        service.weights_source = _OneSnapshot(service.agent, snapshot)
        service.run_episode(kind="online", gated=True, send=False, seed=0)
    finally:
        service.weights_source = None
        service._shutdown()
    return next((root / "actor" / "episodes").glob("episode_*.hdf5"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, nargs="?", default=None, help="an actor episode log (else one is recorded)")
    parser.add_argument("--config", type=Path, default=Path("configs/sim_peg_state.yaml"), help="config to record with")
    parser.add_argument("--steps", type=bench_main.positive_int, default=200, help="steps of the recorded episode")
    parser.add_argument(
        "--repeats", type=bench_main.positive_int, default=5, help="timed repetitions (median reported)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or record_episode(args.config, args.steps, Path(tmp))
        whole: list[float] = []
        for _ in range(args.repeats):
            report = replay_log(log)
            if not report.ok:
                raise SystemExit(f"the replay diverged: {list(report.lines())[-2:]}")
            whole.append(report.steps / report.wall_s)
        episodes = read_log(log)
        replayer = Replayer(load_inputs(log, episodes))
        loop: list[float] = []
        for _ in range(args.repeats):
            warm = ReplayReport(log=log)
            start = time.perf_counter()
            for i, ep in enumerate(episodes):
                replayer.replay_episode(ep, i, warm)
            loop.append(warm.steps / (time.perf_counter() - start))
        gated = report.gated_steps
        if (
            args.log is None and gated != report.steps
        ):  # the recorded episode is gated throughout, or the bench is wrong
            raise SystemExit(f"the recorded episode has {gated} gated steps of {report.steps}: no weights were used")
        print(f"log: {report.steps} steps ({gated} gated), config {replayer.cfg.agent.hidden} hidden, "
              f"{replayer.cfg.agent.num_critics} critics")  # fmt: skip
        print(f"whole command (load + replay): {statistics.median(whole):,.0f} steps/s (median of {args.repeats})")
        print(f"replay loop, warm: {statistics.median(loop):,.0f} steps/s (median of {args.repeats})")


if __name__ == "__main__":
    bench_main.run(main)
