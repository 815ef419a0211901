"""Replay buffer speed: adds and samples per second for the state spec and the two-camera 84x84 spec.

    python bench/buffer.py [--seconds 2] [--state-capacity 100000] [--image-capacity 10000] [--batch 256]

Episodes of 100 steps from one actor (so frames are shared as in training). Columns:
  frames    observation frames held per live transition (2 without sharing)
  add_many  chunks of 30 steps, as the learner stores the actor's chunks (the buffer full and evicting)
  add       one transition per call
  sample    `--batch` transitions drawn uniformly (the gather of obs and next_obs of every key)
  prefetch  Prefetcher.get on CPU of one learner step of 4 such batches (sampling and tensor conversion in its
            thread, the owner taking each step as soon as it is ready)
  ceiling   batches/s of allocating and filling arrays of a batch's size (np.ones): what memory allows a gather
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import bench_main
import numpy as np

from robot_rl.buffer import ReplayBuffer
from robot_rl.obs import ObsSpec
from robot_rl.prefetch import Prefetcher

SPECS: dict[str, ObsSpec] = {
    "state": {"ee_pose": ((6,), "float32")},
    "2cam 84x84": {"ee_pose": ((6,), "float32"), "front": ((84, 84, 3), "uint8"), "wrist": ((84, 84, 3), "uint8")},
}
ACTION_DIM = 6
EPISODE = 100
CHUNK = 30
UTD = 4


def episode_states(spec: ObsSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """EPISODE + 1 observations of one episode."""
    out = {}
    for key, (shape, dtype) in spec.items():
        if dtype == "uint8":
            out[key] = rng.integers(0, 256, (EPISODE + 1, *shape), dtype=np.uint8)
        else:
            out[key] = rng.uniform(-1, 1, (EPISODE + 1, *shape)).astype(dtype)
    return out


def chunks(spec: ObsSpec, rng: np.random.Generator, episodes: int = 4) -> list[dict]:
    """add_many arguments: `episodes` episodes cut into chunks of CHUNK steps."""
    out = []
    for _ in range(episodes):
        states = episode_states(spec, rng)
        for lo in range(0, EPISODE, CHUNK):
            hi = min(EPISODE, lo + CHUNK)
            n = hi - lo
            out.append({
                "obs": {k: v[lo:hi] for k, v in states.items()},
                "next_obs": {k: v[lo + 1 : hi + 1] for k, v in states.items()},
                "actions": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
                "rewards": np.zeros(n, np.float32),
                "terminated": np.arange(lo, hi) == EPISODE - 1,
                "truncated": np.zeros(n, bool),
                "bc_actions": rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32),
            })  # fmt: skip
    return out


def rate(step: Callable[[], int], seconds: float) -> float:
    """Items per second of `step` (which returns how many items it handled), over about `seconds`."""
    step()  # warm-up
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += step()
    return done / elapsed


def measure(spec: ObsSpec, capacity: int, batch: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(capacity, spec, ACTION_DIM)
    pieces = chunks(spec, rng)
    while buf.total_added < capacity:  # fill, touching every page once
        for c in pieces:
            buf.add_many(**c)
    cursor = iter(range(1 << 62))

    def add_many() -> int:
        c = pieces[next(cursor) % len(pieces)]
        buf.add_many(**c)
        return len(c["actions"])

    def add_one() -> int:
        c = pieces[next(cursor) % len(pieces)]
        for t in range(len(c["actions"])):
            buf.add(obs={k: v[t] for k, v in c["obs"].items()}, action=c["actions"][t], reward=float(c["rewards"][t]),
                    next_obs={k: v[t] for k, v in c["next_obs"].items()}, terminated=bool(c["terminated"][t]),
                    truncated=False, bc_action=c["bc_actions"][t])  # fmt: skip
        return len(c["actions"])

    def sample() -> int:
        buf.sample(batch, rng)
        return batch

    def ceiling() -> int:
        for array in (*sampled.obs.values(), *sampled.next_obs.values()):
            np.ones((batch, *array.shape[1:]), array.dtype)
        return batch

    sampled = buf.take(np.arange(1))
    figures = {"add_many": rate(add_many, seconds), "add": rate(add_one, seconds), "sample": rate(sample, seconds)}
    figures["ceiling"] = rate(ceiling, seconds)
    prefetch_rng = np.random.default_rng(1)
    with Prefetcher(lambda: [buf.sample(batch, prefetch_rng) for _ in range(UTD)], "cpu", threading.Lock()) as pf:
        figures["prefetch"] = rate(lambda: len(pf.get(timeout=30)) * batch, seconds)
    figures["frames"] = buf.frames_stored() / len(buf)
    figures["bytes"] = sum(v.nbytes for v in sampled.obs.values()) * 2  # obs + next_obs of one transition
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=bench_main.positive_float, default=2.0, help="per row")
    parser.add_argument("--state-capacity", type=bench_main.positive_int, default=100_000)
    parser.add_argument("--image-capacity", type=bench_main.positive_int, default=10_000)
    parser.add_argument("--batch", type=bench_main.positive_int, default=256)
    args = parser.parse_args()
    if args.seconds <= 0 or min(args.batch, args.state_capacity, args.image_capacity) < 1:
        parser.error("--seconds must be positive; --batch and the capacities at least 1")
    print(f"batch {args.batch}, chunks of {CHUNK} steps, episodes of {EPISODE} steps, {args.seconds} s per row")
    print(f"{'spec':<11} {'capacity':>8} {'frames':>6} {'add_many tr/s':>13} {'add tr/s':>9} "
          f"{'sample batch/s':>14} {'sample MB/s':>11} {'ceiling batch/s':>15} {'prefetch step/s':>15}")  # fmt: skip
    for name, spec in SPECS.items():
        capacity = args.state_capacity if name == "state" else args.image_capacity
        f = measure(spec, capacity, args.batch, args.seconds)
        batches = f["sample"] / args.batch
        mb_s = batches * args.batch * f["bytes"] / 1e6
        print(f"{name:<11} {capacity:>8} {f['frames']:>6.3f} {f['add_many']:>13,.0f} {f['add']:>9,.0f} "
              f"{batches:>14,.1f} {mb_s:>11,.1f} {f['ceiling'] / args.batch:>15,.1f} "
              f"{f['prefetch'] / args.batch / UTD:>15,.1f}")  # fmt: skip
    print(f"minibatches of {args.batch} sampled per second ({name}): {batches:,.1f}")


if __name__ == "__main__":
    bench_main.run(main)
