"""Environment steps per second of the in-process MuJoCo peg-insertion twin, on one core.

    python bench/env_speed.py [--steps 2000] [--hold-steps 2] [--image-steps 400] [--preview PNG]

Random actions (the arm wanders, touching the board now and then) and scripted-expert actions (contact-rich:
pushing on the board and inserting). Resets are included in the timing. The image rows run the default-noise expert
with the two cameras of configs/sim_peg_image.yaml (rendered at its raw size, cropped, resized to 84x84) and, for
comparison, at a RealSense's full 848x480. `--preview` writes the two 84x84 images at a reset and mid-episode, and the
raw front frame with its crop box, as one PNG. The last line is the headline figure of the state env.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench_main
import numpy as np

from robot_rl.config import CameraConfig, ExpertConfig, load_config
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


IMAGE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sim_peg_image.yaml"


def image_rows(cameras: list[CameraConfig], hold_steps: int, steps: int) -> list[Result]:
    """The default-noise expert with `cameras` as configured, then at a RealSense's full raw size."""
    full = [c.model_copy(update={"width": 848, "height": 480, "crop": CameraConfig(name=c.name).crop}) for c in cameras]
    results = []
    for cams in (cameras, full):
        env = make_peg_insertion_env(cameras=[c.model_dump() for c in cams], hold_steps=hold_steps)
        try:
            expert = ScriptedExpert(env, ExpertConfig(), np.random.default_rng(0))
            c = cams[0]
            label = f"expert, {len(cams)} cams {c.width}x{c.height}"
            results.append(run(label, env, expert.act, expert.reset, steps))
        finally:
            env.close()
    return results


def write_preview(path: Path, cameras: list[CameraConfig], hold_steps: int) -> None:
    """One PNG: front and wrist 84x84 at a reset and 15 expert steps later (upscaled 2x), and the raw front frame
    with its crop box."""
    import cv2

    env = make_peg_insertion_env(cameras=[c.model_dump() for c in cameras], hold_steps=hold_steps)
    try:
        expert = ScriptedExpert(
            env, ExpertConfig(action_noise=0.0, perceived_offset_std_m=0.0), np.random.default_rng(0)
        )
        obs, _ = env.reset(seed=0)
        expert.reset()
        tiles = [obs[c.name] for c in cameras]
        for _ in range(15):
            obs, *_ = env.step(expert.act(obs))
        tiles += [obs[c.name] for c in cameras]
        raw = env.cameras[0].read_raw().image.copy()
    finally:
        env.close()
    big = [cv2.resize(t, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST) for t in tiles]
    grid = np.vstack([np.hstack(big[: len(cameras)]), np.hstack(big[len(cameras) :])])
    crop = cameras[0].crop
    cv2.rectangle(raw, (crop.x, crop.y), (crop.x + crop.width - 1, crop.y + crop.height - 1), (255, 0, 0), 1)
    scale = grid.shape[0] / raw.shape[0]
    raw = cv2.resize(raw, (round(raw.shape[1] * scale), grid.shape[0]), interpolation=cv2.INTER_AREA)
    image = np.hstack([grid, np.full((grid.shape[0], 8, 3), 255, np.uint8), raw])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    print(f"preview: {path} (left: {', '.join(c.name for c in cameras)} at reset, then 15 steps on; right: raw front)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=bench_main.positive_int, default=2000, help="environment steps per row")
    parser.add_argument(
        "--hold-steps", type=bench_main.positive_int, default=2, help="physics steps sharing one torque computation"
    )
    parser.add_argument(
        "--image-steps", type=bench_main.non_negative_int, default=400, help="environment steps per image row (0: none)"
    )
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG of the camera images here")
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
    cameras = load_config(IMAGE_CONFIG).env.cameras
    images = image_rows(cameras, args.hold_steps, args.image_steps) if args.image_steps > 0 else []

    task = env.config.task
    print(
        f"physics dt {task.physics_dt_s * 1e3:.1f} ms, control period {task.control_period_s:.2f} s, "
        f"hold_steps {args.hold_steps}, one core"
    )
    print(f"{'policy':<30}{'steps':>8}{'episodes':>10}{'success':>9}{'steps/s':>10}")
    for r in results + images:
        print(f"{r.name:<30}{r.steps:>8}{r.episodes:>10}{r.successes:>9}{r.steps_per_s:>10.0f}")
    if images:
        sizes = ", ".join(f"{c.name} {c.width}x{c.height} crop {c.crop.width}x{c.crop.height}" for c in cameras)
        print(f"image env ({IMAGE_CONFIG.name}: {sizes} -> {cameras[0].out_size}): {images[0].steps_per_s:.0f} steps/s")
    if args.preview is not None:
        write_preview(args.preview, cameras, args.hold_steps)
    slowest = min(r.steps_per_s for r in results)
    print(f"env steps/s (slowest row, contact included): {slowest:.0f}")


if __name__ == "__main__":
    bench_main.run(main)
