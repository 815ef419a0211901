"""Camera read latency and preprocessing cost, measured on an SDK recording read through RealSenseCamera.

    python bench/camera.py [--frames 150] [--fps 30] [--repeats 20]

Writes a synthetic 848x480 recording with the SDK's recorder, then:
  * replays it paced at its recorded rate (as a live camera delivers) and reads each frame as soon as it is there:
    read latency = our clock when `read()` returns minus the frame's `received_s` (arrival in our process), and the
    duration of the `read()` call itself (lock, freshness check, crop and resize);
  * replays it unpaced: frames per second the SDK playback and the reader thread sustain;
  * times `preprocess` (848x480 -> 480x480 crop -> 84x84, INTER_AREA) on every frame, `--repeats` times.
The last line is the headline figure: preprocessing cost per frame.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bench_main
import numpy as np

from robot_rl.config import CameraConfig
from robot_rl.hardware.camera import preprocess
from robot_rl.hardware.realsense.camera import RealSenseCamera
from robot_rl.hardware.realsense.recording import write_recording

W, H = 848, 480


@dataclass(frozen=True)
class Row:
    name: str
    samples_s: list[float]

    def line(self) -> str:
        ms = np.asarray(self.samples_s) * 1e3
        p50, p99 = np.percentile(ms, [50, 99])
        return f"{self.name:<46} {len(ms):>6} {p50:>10.3f} {p99:>10.3f}"


def synthetic_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    # Noise over a gradient: a resize cost that does not depend on the picture being flat.
    rng = np.random.default_rng(seed)
    base = (np.arange(W)[None, :, None] // 4 + np.arange(H)[:, None, None] // 2).astype(np.uint8)
    return [(base + rng.integers(0, 32, (H, W, 3), dtype=np.uint8)).astype(np.uint8) for _ in range(count)]


def read_as_frames_arrive(cfg: CameraConfig) -> tuple[Row, Row]:
    """Poll for each new frame and read it at once: arrival-to-return latency and the read() call's cost."""
    latency, call = [], []
    with RealSenseCamera(cfg, pace_recording=True) as camera:
        seen = 0
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            if camera.frames_received == seen:
                if camera.ended and camera.frames_received == seen:
                    break
                time.sleep(0.0002)  # poll; the latency figure includes up to this much of waiting
                continue
            seen = camera.frames_received
            start = time.monotonic()
            frame = camera.read()
            done = time.monotonic()
            latency.append(done - frame.received_s)
            call.append(done - start)
    return Row("read latency: arrival -> read() returns", latency), Row("read() call (incl. crop+resize)", call)


def unpaced_rate(cfg: CameraConfig, count: int) -> float:
    with RealSenseCamera(cfg) as camera:
        start = time.monotonic()
        while not camera.ended and time.monotonic() - start < 60.0:
            time.sleep(0.001)
        elapsed = time.monotonic() - start
        assert camera.frames_received == count, (camera.frames_received, count)
    return count / elapsed


def preprocessing(cfg: CameraConfig, frames: list[np.ndarray], repeats: int) -> Row:
    samples = []
    for _ in range(repeats):
        for image in frames:
            start = time.perf_counter()
            preprocess(image, cfg.crop, cfg.out_size)
            samples.append(time.perf_counter() - start)
    return Row(f"preprocess {W}x{H} -> {cfg.out_size}x{cfg.out_size}", samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=bench_main.positive_int, default=150, help="frames in the recording")
    parser.add_argument("--fps", type=bench_main.positive_int, default=30, help="recorded frame rate")
    parser.add_argument(
        "--repeats", type=bench_main.positive_int, default=20, help="passes over the frames when timing preprocess"
    )
    args = parser.parse_args()

    frames = synthetic_frames(args.frames)
    with tempfile.TemporaryDirectory() as folder:
        path = write_recording(Path(folder) / "bench.db3", frames, fps=args.fps, width=W, height=H)
        cfg = CameraConfig(name="bench", recording=str(path), width=W, height=H, fps=args.fps, freshness_s=5.0)
        rows = list(read_as_frames_arrive(cfg))
        rate = unpaced_rate(cfg, args.frames)
    headline = preprocessing(cfg, frames, args.repeats)
    rows.append(headline)

    print(f"recording: {args.frames} frames {W}x{H} RGB8 at {args.fps} fps (SDK .db3), paced replay")
    print(f"{'measure':<46} {'n':>6} {'p50 ms':>10} {'p99 ms':>10}")
    for row in rows:
        print(row.line())
    print(f"unpaced replay through the reader thread: {rate:.0f} frames/s")
    p50, p99 = np.percentile(np.asarray(headline.samples_s) * 1e3, [50, 99])
    print(f"preprocessing {W}x{H} -> crop 480x480 -> 84x84 (INTER_AREA): p50 {p50:.3f} ms, p99 {p99:.3f} ms per frame")


if __name__ == "__main__":
    bench_main.run(main)
