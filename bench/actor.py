"""Actor timing: Q-gating at a fixed rate on the sim twin (compute per step, period jitter), or gating alone.

    python bench/actor.py [--minutes 10] [--period 0.1] [--config state|image|PATH]
    python bench/actor.py --gating 2000 [--config image] [--threads 1] [--precision int8] [--gating-threads 2]

`--gating N` times N Q-gating decisions alone, as the actor makes them on a real robot: per camera, the crop and
resize of a raw 848x480 RealSense-sized frame to 84x84 (new random pixels each step), then `Q2RLAgent.act` on one
observation (BC distribution once for its sample, log-prob and entropy; V_BC and its encoder; the critics' encoder;
RL actor; the critic ensemble), with networks of the config's sizes, at the config's `actor.gating_precision` and
`actor.gating_threads` unless --precision / --gating-threads say otherwise. The last line is the headline.

`--weights-every S` also feeds the actor a weights broadcast every S seconds (its own networks' state under a new
version, as a learner's link would deliver it): the loader thread decodes and prepares each one while the loop runs,
and the loop swaps them in at its swap point, so the figures include what weights cost the control loop
(`actor.weights_min_interval_s` applies; `--weights-min-interval` overrides it).

Runs the actor's own episode loop (`ActorService.run_episode`, gated: BC proposal + RL proposal + V_BC + the critic
ensemble every step, episode logs written) for the given wall time at the given period, with networks of the config's
sizes (weights as initialised: timing does not depend on their values). Compute is the time from the start of a
step to the end of its work (env step included); the period is measured between consecutive deadline wake-ups.
The process sets the actor's allocator thresholds (robot_rl.malloc) as `robot-rl actor` does, unless
--glibc-malloc-defaults. The last line is the headline.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import bench_main
import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.actor.link import NewestWeights
from robot_rl.actor.service import ActorService
from robot_rl.actor.weights_loader import WeightsLoader
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.config import CameraConfig, RunConfig, load_config
from robot_rl.envs import make_env
from robot_rl.hardware.camera import preprocess
from robot_rl.malloc import reuse_freed_memory
from robot_rl.wire import Weights, pack_tensors, transition_spec

CONFIGS = {"state": "configs/sim_peg_state.yaml", "image": "configs/sim_peg_image.yaml"}


class BroadcastFeeder(threading.Thread):
    """Stands in for the learner link: a new version of `state` every `every_s` seconds into `box` (newest only)."""

    def __init__(self, state: dict[str, torch.Tensor], every_s: float) -> None:
        super().__init__(name="broadcasts", daemon=True)
        self.arrays, self.every_s = pack_tensors(state), every_s
        self.stop = threading.Event()
        self.box = NewestWeights()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sent += 1
            self.box.put(Weights(version=self.sent, phase="online", tensors=self.arrays))


def percentiles(name: str, values_ms: np.ndarray) -> str:
    p50, p99 = np.percentile(values_ms, 50), np.percentile(values_ms, 99)
    return f"{name:<26}{p50:>10.2f}{p99:>10.2f}{values_ms.max():>10.2f}"


def gating(cfg: RunConfig, steps: int) -> None:
    """Time preprocessing + one Q-gating decision per step, with the config's networks (initial weights)."""
    spec = transition_spec(cfg).obs
    dim = obs_lib.state_dim(spec)
    low, high = -0.1 * np.ones(dim, np.float32), 0.1 * np.ones(dim, np.float32)
    bc = make_bc_policy(cfg.bc, spec, 6, low, high).eval()
    agent = Q2RLAgent(cfg.agent, obs_spec=spec, state_low=low, state_high=high, action_dim=6, bc_policy=bc).eval()
    agent.set_acting_precision(cfg.actor.gating_precision)
    agent.set_acting_threads(cfg.actor.gating_threads)
    # Raw frames as a RealSense delivers them (848x480, the real crop), whatever size the sim renders.
    real = CameraConfig(name="raw")
    rng = np.random.default_rng(0)
    raws = [rng.integers(0, 256, (real.height, real.width, 3), dtype=np.uint8) for _ in range(8)]
    cameras = obs_lib.image_keys(spec)
    pre, act, total = [], [], []
    for i in range(steps + 20):
        t0 = time.perf_counter()
        obs = {k: raws[(i + j) % len(raws)] for j, k in enumerate(cameras)}
        obs = {k: preprocess(v, real.crop, spec[k][0][0]) for k, v in obs.items()}
        obs["ee_pose"] = rng.uniform(-0.05, 0.05, 6).astype(np.float32)
        t1 = time.perf_counter()
        agent.act(obs_lib.batch1(obs))
        t2 = time.perf_counter()
        if i >= 20:  # warm-up
            pre.append(t1 - t0)
            act.append(t2 - t1)
            total.append(t2 - t0)
    pre_ms, act_ms, total_ms = (np.asarray(v) * 1e3 for v in (pre, act, total))
    agent.set_acting_threads(1)
    nets = f"hidden {cfg.agent.hidden}, {cfg.agent.num_critics} critics, BC {cfg.bc.policy} {cfg.bc.hidden}"
    print(f"obs {spec}; {nets}, encoder {cfg.agent.encoder.channels}; torch threads {torch.get_num_threads()}; "
          f"gating precision {cfg.actor.gating_precision}, gating threads {cfg.actor.gating_threads}")  # fmt: skip
    print(f"{'what':<26}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(percentiles(f"preprocess {len(cameras)} x 848x480", pre_ms))
    print(percentiles("Q-gating (agent.act)", act_ms))
    print(percentiles("total", total_ms))
    print(f"headline: gating incl. preprocessing p99 {np.percentile(total_ms, 99):.2f} ms over {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=bench_main.positive_float, default=10.0)
    parser.add_argument("--period", type=bench_main.non_negative_float, default=0.1)
    parser.add_argument("--config", default="state", help="state, image, or a config file")
    parser.add_argument(
        "--gating",
        type=bench_main.non_negative_int,
        default=0,
        help="time N gating decisions alone instead of the loop",
    )
    parser.add_argument("--threads", type=bench_main.positive_int, default=1, help="torch threads")
    parser.add_argument("--precision", choices=["float32", "int8"], help="actor.gating_precision (default: config's)")
    parser.add_argument("--gating-threads", type=int, choices=[1, 2], help="actor.gating_threads (default: config's)")
    parser.add_argument(
        "--weights-every",
        type=bench_main.non_negative_float,
        default=0.0,
        help="feed a weights broadcast every S seconds",
    )
    parser.add_argument(
        "--weights-min-interval",
        type=bench_main.non_negative_float,
        help="actor.weights_min_interval_s (default: config's)",
    )
    parser.add_argument(
        "--glibc-malloc-defaults", action="store_true", help="Leave glibc's malloc thresholds (robot_rl.malloc)."
    )
    args = parser.parse_args()
    if not args.glibc_malloc_defaults:
        reuse_freed_memory()  # as `robot-rl actor` does
    path = CONFIGS.get(args.config, args.config)
    overrides = [f"actor.period_s={args.period}", f"train.torch_threads={args.threads}"]
    if args.precision:
        overrides.append(f"actor.gating_precision={args.precision}")
    if args.gating_threads:
        overrides.append(f"actor.gating_threads={args.gating_threads}")
    if args.weights_min_interval is not None:
        overrides.append(f"actor.weights_min_interval_s={args.weights_min_interval}")
    cfg = load_config(path, overrides)
    torch.set_num_threads(args.threads)
    if args.gating:
        gating(cfg, args.gating)  # agent.act runs under torch.inference_mode itself
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = make_env(cfg.env)
        spec = obs_lib.spec_from_space(env.observation_space)
        low, high = obs_lib.state_bounds(env.observation_space)
        env.close()
        bc = make_bc_policy(cfg.bc, spec, 6, low, high)
        save_bc(bc, Path(tmp) / "bc")
        service = ActorService(cfg, Path(tmp) / "actor", bc_dir=Path(tmp) / "bc", learner=None, quiet=True)
        service.weights_version = 0  # gate with the initial networks
        service.agent.acting_networks()  # as a weights swap delivers them: built before the loop (int8: compacted)
        feeder = None
        if args.weights_every > 0:
            feeder = BroadcastFeeder(service.agent.acting_state(), args.weights_every)
            service.weights_source = WeightsLoader(
                feeder.box.take, service.agent, min_interval_s=cfg.actor.weights_min_interval_s
            )
            service.weights_source.start()
            feeder.start()
        end = time.monotonic() + args.minutes * 60
        episodes = 0
        try:
            while time.monotonic() < end:
                service.run_episode(kind="online", gated=True, send=False, seed=episodes)
                episodes += 1
        finally:
            if feeder is not None:
                feeder.stop.set()
                service.weights_source.stop()
                service.weights_source.join(timeout=10)
            service.weights_archive.close()
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
    if feeder is not None:
        loader = service.weights_source
        print(f"weights: {feeder.sent} broadcasts fed (every {args.weights_every} s), {loader.prepared} prepared "
              f"(min interval {cfg.actor.weights_min_interval_s} s, prepare p99 {loader.prepare_p99_s():.3f} s), "
              f"swapped in up to version {service.weights_version}")  # fmt: skip
    print(f"headline: compute p99 {np.percentile(compute, 99):.2f} ms, period jitter p99 "
          f"{np.percentile(jitter, 99):.2f} ms, {stats.overruns} missed ticks in {stats.ticks}")  # fmt: skip


if __name__ == "__main__":
    bench_main.run(main)
