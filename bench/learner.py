"""Learner steps per second (one step = UTD critic updates + one actor update) for the state and the image config.

    python bench/learner.py [--device cpu|cuda|auto] [--config state|image|PATH] [--sizes config,paper,...]
                            [--threads N] [--steps N] [--prefetch | --replay-on-gpu] [--bf16] [--compile MODE]
                            [--cuda-graph]

The observation spec is the config's (state: the 6-D pose; image: the pose plus two 84x84x3 uint8 cameras); minibatches
are drawn from a replay buffer filled with synthetic transitions, so the figure includes sampling, host->device copies
and, for images, the DrQ shifts and both CNN encoders, as in training. `--sizes` runs the config's agent ("config")
and/or other network sizes on the same observations. `--prefetch` samples on a background thread (robot_rl.prefetch);
`--replay-on-gpu` keeps a copy of the buffer on the device and gathers each minibatch there (train.replay_on_gpu);
`--bf16` runs the forward passes under bf16 autocast; `--compile MODE` compiles the updates with torch.compile
(during the warm-up steps, which are not timed; reduce-overhead adds CUDA graphs on a GPU); `--cuda-graph` captures
the whole learner step in one CUDA graph (train.cuda_graph). The last line is the headline (the last size's rate).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_main
import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy
from robot_rl.buffer import ReplayBuffer, sample_utd_batches
from robot_rl.config import CUDA_GRAPH_COMPILE_MODES, AgentConfig, RunConfig, load_config
from robot_rl.wire import transition_spec

CONFIGS = {"state": "configs/sim_peg_state.yaml", "image": "configs/sim_peg_image.yaml"}
SIZES = {
    # name: (hidden, critics, batch); "config" keeps the config's agent section
    "config": (None, None, None),
    "paper": ([512, 512, 512], 10, 256),
    "paper_image": ([1024, 1024], 10, 256),
    "256x2": ([256, 256], 10, 256),
}
ACTION_DIM = 6


def synthetic_buffer(
    spec: obs_lib.ObsSpec, n: int, rng: np.random.Generator, device: str | None = None
) -> ReplayBuffer:
    """n transitions in episodes of 100 steps (so consecutive images are shared as in real data); `device`: the
    buffer's device copy (sampling gathers there)."""
    buf = ReplayBuffer(n, spec, ACTION_DIM, device=device)
    episode = 100
    for start in range(0, n, episode):
        m = min(episode, n - start)
        frames = {}
        for key, (shape, dtype) in spec.items():
            if np.dtype(dtype) == np.uint8:
                frames[key] = rng.integers(0, 256, (m + 1, *shape), dtype=np.uint8)
            else:
                frames[key] = rng.uniform(-0.05, 0.05, (m + 1, *shape)).astype(np.float32)
        buf.add_many(
            obs={k: v[:-1] for k, v in frames.items()},
            actions=rng.uniform(-1, 1, (m, ACTION_DIM)).astype(np.float32),
            rewards=(rng.random(m) < 0.02).astype(np.float32),
            next_obs={k: v[1:] for k, v in frames.items()},
            terminated=np.zeros(m, bool),
            truncated=np.arange(m) == m - 1,
            bc_actions=rng.uniform(-1, 1, (m, ACTION_DIM)).astype(np.float32),
        )
    return buf


def build(cfg: RunConfig, agent_cfg: AgentConfig, device: str, **options: object) -> tuple[Q2RLAgent, dict]:
    """The config's agent with synthetic state bounds; `options`: Q2RLAgent's amp, compile and cuda_graph."""
    spec = transition_spec(cfg).obs
    dim = obs_lib.state_dim(spec)
    low, high = -0.1 * np.ones(dim, np.float32), 0.1 * np.ones(dim, np.float32)
    bc = make_bc_policy(cfg.bc, spec, ACTION_DIM, low, high)
    agent = Q2RLAgent(
        agent_cfg,
        obs_spec=spec,
        state_low=low,
        state_high=high,
        action_dim=ACTION_DIM,
        bc_policy=bc,
        device=device,
        **options,
    )
    return agent, spec


def measure(
    cfg: RunConfig,
    agent_cfg: AgentConfig,
    *,
    device: str,
    steps: int,
    prefetch: bool,
    replay_on_gpu: bool = False,
    **options: object,
) -> float:
    """Learner steps per second over `steps` timed steps; `options` go to Q2RLAgent (amp, compile, cuda_graph)."""
    agent, spec = build(cfg, agent_cfg, device, **options)
    cuda_graph = bool(options.get("cuda_graph"))
    rng = np.random.default_rng(0)
    n = 5000 if obs_lib.image_keys(spec) else 50_000
    buf = synthetic_buffer(spec, n, rng, device=device if replay_on_gpu else None)

    def sample() -> list:
        return sample_utd_batches(buf, None, agent_cfg, rng)

    fetch = sample
    prefetcher = None
    if prefetch:
        import threading

        from robot_rl.prefetch import Prefetcher

        prefetcher = Prefetcher(sample, torch.device(device), threading.Lock())
        prefetcher.start()

        def fetch() -> list:
            return prefetcher.get(timeout=60)

    def step() -> None:
        agent.update(fetch())

    try:
        for _ in range(6 if cuda_graph else 3):  # a CUDA graph: 3 eager steps, the capture, then replays
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)
    finally:
        if prefetcher is not None:
            prefetcher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--config", default="state", help="state, image, or a config file")
    parser.add_argument(
        "--threads", type=bench_main.non_negative_int, default=0, help="torch threads (0: torch's default)"
    )
    parser.add_argument("--steps", type=bench_main.positive_int, default=20)
    parser.add_argument("--sizes", default="config", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--prefetch", action="store_true", help="sample minibatches on a background thread")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward passes")
    parser.add_argument("--replay-on-gpu", action="store_true",
                        help="the buffer keeps a copy on the device and minibatches are gathered there")  # fmt: skip
    parser.add_argument("--cuda-graph", action="store_true",
                        help="the whole learner step in one CUDA graph (train.cuda_graph; CUDA only)")  # fmt: skip
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the updates (compiled while warming up)")  # fmt: skip
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (no GPU, no driver, or a CPU build of torch)")
    if args.steps < 1 or args.threads < 0:
        parser.error("--steps must be at least 1 and --threads at least 0")
    sizes = args.sizes.split(",")
    if unknown := [name for name in sizes if name not in SIZES]:  # before any size is measured
        parser.error(f"unknown size {', '.join(map(repr, unknown))} (known: {', '.join(SIZES)})")
    if args.cuda_graph and device == "cpu":
        parser.error(f"--cuda-graph needs a CUDA device (--device {args.device} is the CPU here)")
    if args.cuda_graph and args.compile in CUDA_GRAPH_COMPILE_MODES:
        parser.error(f"--cuda-graph captures the step itself; --compile {args.compile} makes CUDA graphs of its own: "
                     "use it with --compile default or off")  # fmt: skip
    if args.replay_on_gpu and args.prefetch:
        parser.error("--prefetch samples in host memory; --replay-on-gpu gathers on the device: pick one")
    path = CONFIGS.get(args.config, args.config)
    if not Path(path).is_file():
        parser.error(f"config {path} does not exist")
    cfg = load_config(path)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = transition_spec(cfg).obs
    print(f"config {path}: obs {spec}")
    flags = (
        ("prefetch", args.prefetch),
        ("replay on the device", args.replay_on_gpu),
        ("bf16 autocast", args.bf16),
        (f"torch.compile {args.compile}", args.compile != "off"),
        ("whole step in a CUDA graph", args.cuda_graph),
    )
    extras = ", ".join(n for n, on in flags if on) or "plain"
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps each, {extras}")
    print(f"{'size':<12} {'hidden':<18} {'critics':>7} {'batch':>5} {'utd':>3} {'steps/s':>9}")
    last, name = 0.0, ""
    for name in sizes:
        hidden, critics, batch = SIZES[name]
        agent_cfg = cfg.agent
        if hidden is not None:
            agent_cfg = agent_cfg.model_copy(update={"hidden": hidden, "num_critics": critics, "batch_size": batch})
        last = measure(cfg, agent_cfg, device=device, steps=args.steps, prefetch=args.prefetch, amp=args.bf16,
                       compile=args.compile, replay_on_gpu=args.replay_on_gpu, cuda_graph=args.cuda_graph)  # fmt: skip
        print(
            f"{name:<12} {agent_cfg.hidden!s:<18} {agent_cfg.num_critics:>7} {agent_cfg.batch_size:>5} "
            f"{agent_cfg.utd:>3} {last:>9.2f}"
        )
    print(f"learner steps/s ({args.config}, {name}, {device}): {last:.2f}")


if __name__ == "__main__":
    bench_main.run(main)
