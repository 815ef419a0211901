"""`robot-rl cameras`: which RealSense cameras are connected, and what a camera (or a recording) delivers.

Without cameras to read it lists the connected serials. With `--recording F`, or with cameras in the config that have
a `recording:` (or a `serial:` that is connected now), it reads N frames from each through `RealSenseCamera`, measures
the frame rate and the read latency (the frame's arrival in our process -> `read()` returning it), and writes
`OUT/<name>.png`: the raw frame with the crop box drawn, and the policy's out_size x out_size image beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import ValidationError

from robot_rl.config import CameraConfig, ConfigError, CropConfig, load_config

POLL_S = 0.001  # wait between reads while the newest frame is one already counted
READ_TIMEOUT_S = 10.0  # give up on a camera that delivers no new frame for this long


def recording_size(path: Path) -> tuple[int, int, int]:
    """(width, height, fps) of the colour stream of an SDK recording; CameraError when it cannot be read."""
    import pyrealsense2 as rs

    from robot_rl.hardware.camera import CameraError

    if not path.is_file():
        raise CameraError(f"recording {path} does not exist or is not a file")
    if path.suffix != ".db3":
        raise CameraError(f"recording {path} is not an SDK recording (.db3)")
    config = rs.config()
    try:
        config.enable_device_from_file(str(path), repeat_playback=False)
        profile = config.resolve(rs.pipeline_wrapper(rs.pipeline()))
        video = profile.get_stream(rs.stream.color).as_video_stream_profile()
        return video.width(), video.height(), video.fps()
    except RuntimeError as exc:
        raise CameraError(f"recording {path} has no readable colour stream: {exc}") from exc


def recording_camera_config(path: Path, *, name: str = "recording") -> CameraConfig:
    """A camera config matching the recording's size; the default crop if it fits, else a centred square."""
    width, height, fps = recording_size(path)
    crop = CropConfig()
    if crop.x + crop.width > width or crop.y + crop.height > height:
        side = min(width, height)
        crop = CropConfig(x=(width - side) // 2, y=(height - side) // 2, width=side, height=side)
    try:
        return CameraConfig(name=name, recording=str(path), width=width, height=height, fps=fps, crop=crop)
    except ValidationError as exc:
        raise ConfigError(
            f"recording {path} ({width}x{height} at {fps} fps) is outside what a camera config allows: "
            f"{exc.errors()[0]['msg']}"
        ) from None


def _recording_configs(recording: Path, config_path: Path | None, overrides: list[str]) -> list[CameraConfig]:
    """What to preview a recording through: with a config (--config or --set), each of its cameras' crop and image
    size read from the recording; without one, the default crop (a centred square where it does not fit)."""
    base = recording_camera_config(recording)
    if config_path is None and not overrides:
        return [base]
    cameras = load_config(config_path, overrides).env.cameras
    out = []
    for camera in cameras:
        fields = camera.model_dump() | {
            "serial": None,
            "recording": str(recording),
            "width": base.width,
            "height": base.height,
            "fps": base.fps,
        }
        try:
            out.append(CameraConfig.model_validate(fields))
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ConfigError(
                f"camera {camera.name} of the config does not fit recording {recording} ({base.width}x{base.height}): "
                f"{problem}"
            ) from None
    return out or [base]


def preview_image(raw: np.ndarray, processed: np.ndarray, crop: CropConfig) -> np.ndarray:
    """BGR image for imwrite: the raw RGB frame with the crop box in green, the processed image to its right."""
    rows = max(raw.shape[0], processed.shape[0])  # out_size may exceed the raw height: neither image is cut
    left = np.zeros((rows, raw.shape[1], 3), np.uint8)
    left[: raw.shape[0]] = cv2.cvtColor(np.ascontiguousarray(raw), cv2.COLOR_RGB2BGR)
    cv2.rectangle(left, (crop.x, crop.y), (crop.x + crop.width - 1, crop.y + crop.height - 1), (0, 255, 0), 2)
    right = np.zeros((rows, processed.shape[1], 3), np.uint8)
    right[: processed.shape[0]] = cv2.cvtColor(np.ascontiguousarray(processed), cv2.COLOR_RGB2BGR)
    return np.hstack([left, np.full((rows, 4, 3), 255, np.uint8), right])


def measure_camera(cfg: CameraConfig, out: Path, frames: int) -> dict[str, Any]:
    """Read up to `frames` new frames from one camera; write OUT/<name>.png; return the measurements."""
    from robot_rl.hardware.camera import CameraError, StaleFrameError, preprocess
    from robot_rl.hardware.realsense.camera import RealSenseCamera

    latencies: list[float] = []
    arrivals: list[float] = []
    last_raw = None
    ended = False
    with RealSenseCamera(cfg, pace_recording=True) as cam:
        deadline = time.monotonic() + READ_TIMEOUT_S
        last_received: float | None = None  # frames told apart by their arrival, not their (device's) number
        first_count = last_count = 0  # frames the camera had received when the first and the last seen were read
        while len(arrivals) < frames:
            try:
                raw = cam.read_raw()
            except StaleFrameError:
                raw = None
            except CameraError:
                if cam.is_recording and cam.ended:
                    ended = True
                    break
                raise
            returned = time.monotonic()
            if raw is not None and raw.received_s != last_received:
                last_received = raw.received_s
                latencies.append(returned - raw.received_s)
                arrivals.append(raw.received_s)
                last_count = cam.frames_received
                first_count = first_count if len(arrivals) > 1 else last_count
                last_raw = raw
                deadline = returned + READ_TIMEOUT_S
            elif returned > deadline:
                raise CameraError(f"camera {cfg.name}: no new frame for {READ_TIMEOUT_S} s")
            else:
                time.sleep(POLL_S)
    if last_raw is None:
        raise CameraError(f"camera {cfg.name}: delivered no frame")
    processed = preprocess(last_raw.image, cfg.crop, cfg.out_size)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{cfg.name}.png"
    if not cv2.imwrite(str(png), preview_image(last_raw.image, processed, cfg.crop)):
        raise ConfigError(f"cannot write {png}")
    span = arrivals[-1] - arrivals[0]
    ms = np.array(latencies) * 1000.0
    return {
        "name": cfg.name,
        "source": cfg.recording or cfg.serial,
        "frames": len(arrivals),
        "recording_ended": ended,
        "size": f"{cfg.width}x{cfg.height}",
        # Frames the camera received between the first and the last frame read (a busy reader may miss some).
        "fps_measured": (last_count - first_count) / span if len(arrivals) > 1 and span > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(ms, 50)),
        "latency_p99_ms": float(np.percentile(ms, 99)),
        "png": str(png),
    }


def run_cameras(
    config_path: Path | None, overrides: list[str], recording: Path | None, out: Path, frames: int
) -> dict[str, Any]:
    """The `cameras` subcommand without the printing; returns {"serials": [...], "cameras": [measurements]}.

    Raises ConfigError (the CLI prints it and exits 2) for a bad config, a missing or unreadable recording, or a
    camera that cannot deliver frames.
    """
    from robot_rl.hardware.camera import CameraError
    from robot_rl.hardware.realsense.camera import list_serials

    if frames < 1:
        raise ConfigError("--frames must be at least 1")
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # before any frame is read
        raise ConfigError(f"--out {out}: {blocking} is a file, not a directory; choose another --out")
    try:
        serials = list_serials()
    except CameraError as exc:
        serials = []
        listing_error = str(exc)
    else:
        listing_error = None
    try:
        if recording is not None:
            configs = _recording_configs(recording, config_path, overrides)
        else:
            cfg = load_config(config_path, overrides)
            absent = [
                c for c in cfg.env.cameras if c.recording is None and c.serial is not None and c.serial not in serials
            ]
            if absent:
                names = ", ".join(f"{c.name} (serial {c.serial})" for c in absent)
                connected = ", ".join(serials) or "none"
                raise ConfigError(f"camera {names} not connected; connected RealSense serials: {connected}")
            configs = [c for c in cfg.env.cameras if c.recording is not None or c.serial in serials]
        results = [measure_camera(c, out, frames) for c in configs]
    except CameraError as exc:
        raise ConfigError(str(exc)) from exc
    return {"serials": serials, "listing_error": listing_error, "cameras": results}


def format_report(report: dict[str, Any]) -> str:
    lines = []
    if report["listing_error"]:
        lines.append(report["listing_error"])
    elif report["serials"]:
        lines.append("connected RealSense cameras: " + ", ".join(report["serials"]))
    else:
        lines.append("no RealSense camera connected")
    if report["cameras"]:
        header = f"{'camera':<12} {'source':<32} {'size':>9} {'frames':>6} {'fps':>7} {'p50 ms':>7} {'p99 ms':>7}"
        lines.append(header)
        for r in report["cameras"]:
            source = str(r["source"])
            source = source if len(source) <= 32 else "..." + source[-29:]
            lines.append(
                f"{r['name']:<12} {source:<32} {r['size']:>9} {r['frames']:>6} {r['fps_measured']:>7.1f} "
                f"{r['latency_p50_ms']:>7.2f} {r['latency_p99_ms']:>7.2f}"
            )
        for r in report["cameras"]:
            ended = " (recording ended before --frames)" if r["recording_ended"] else ""
            lines.append(f"wrote {r['png']}{ended}")
    return "\n".join(lines)
