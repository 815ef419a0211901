"""SDK recordings (.db3): make them from numpy frames (tests, lab tooling), and count the colour frames one holds.

The SDK's own recorder writes the file, so a recording made here replays through exactly the pipeline code that reads
a real camera's recording (`rs.config.enable_device_from_file`). The route, measured on pyrealsense2 2.59.1
(shared/research/hardware-facts.md): a `software_device` with one colour stream, wrapped in an `rs.recorder`, frames
injected with `on_video_frame`. The recorder only writes ROS2 sqlite (.db3); a `.bag` name is refused up front rather
than producing a file under the wrong name.

`count_colour_frames` reads the file's own index (the ROS2 sqlite tables `topics` and `messages`) with the standard
library: how many colour frames the recording holds, without decoding one. The SDK's playback says nothing of the kind,
and it stops on a frame it cannot read as if the file had ended (camera.py compares the two).
"""

from __future__ import annotations

import contextlib
import gc
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyrealsense2 as rs

RECORDING_SUFFIX = ".db3"
# The topic of a colour stream's images, as the SDK names it (`/compressed` when it wrote them as PNG, its default).
COLOUR_IMAGE_TOPIC = re.compile(r"/device_\d+/sensor_\d+/Color_\d+/image/data(/compressed)?")


def _colour_stream(*, width: int, height: int, fps: int) -> rs.video_stream:
    # Plausible pinhole intrinsics (about a D435's colour field of view); replay keeps whatever is written here.
    intrinsics = rs.intrinsics()
    intrinsics.width = width
    intrinsics.height = height
    intrinsics.fx = intrinsics.fy = 0.72 * width
    intrinsics.ppx = width / 2.0
    intrinsics.ppy = height / 2.0
    intrinsics.model = rs.distortion.none
    intrinsics.coeffs = [0.0] * 5
    stream = rs.video_stream()
    stream.type = rs.stream.color
    stream.index = 0
    stream.uid = 0
    stream.width = width
    stream.height = height
    stream.fps = fps
    stream.bpp = 3
    stream.fmt = rs.format.rgb8
    stream.intrinsics = intrinsics
    return stream


def _check_frames(frames: Sequence[np.ndarray], *, width: int, height: int) -> None:
    if len(frames) == 0:
        raise ValueError("a recording needs at least one frame")
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (height, width, 3):
            raise ValueError(
                f"frame {i}: expected uint8 of shape ({height}, {width}, 3), "
                f"got {getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', None)}"
            )


def write_recording(
    path: str | Path,
    frames: Sequence[np.ndarray],
    *,
    fps: int,
    width: int,
    height: int,
    start_timestamp_ms: float = 1_000.0,
    first_frame_number: int = 1,
    number_step: int = 1,
    serial: str = "synthetic",
    overwrite: bool = False,
) -> Path:
    """Write `frames` (uint8 RGB, height x width x 3 each) as an SDK colour-stream recording; returns the path.

    Frame i gets frame number `first_frame_number + i * number_step` (0: a camera whose numbers do not advance) and
    device timestamp `start_timestamp_ms + i * 1000 / fps`
    (hardware-clock domain, as a real camera stamps its frames); both replay intact.
    """
    path = Path(path)
    if path.suffix != RECORDING_SUFFIX:
        raise ValueError(f"{path}: the SDK recorder writes ROS2 sqlite only; the name must end in {RECORDING_SUFFIX}")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if fps < 1 or width < 1 or height < 1:
        raise ValueError(f"fps, width and height must be positive, got {fps}, {width}, {height}")
    _check_frames(frames, width=width, height=height)
    path.unlink(missing_ok=True)  # the recorder would otherwise add to an existing database

    device = rs.software_device()
    device.register_info(rs.camera_info.name, "robot_rl synthetic camera")
    device.register_info(rs.camera_info.serial_number, serial)
    sensor = device.add_sensor("RGB Camera")
    stream = _colour_stream(width=width, height=height, fps=fps)
    profile = sensor.add_video_stream(stream, True).as_video_stream_profile()
    recorder = rs.recorder(str(path), device)
    # Frames reach the file only while a sensor of the recorder is streaming; the callback itself has nothing to do.
    recording_sensor = recorder.query_sensors()[0]
    recording_sensor.open(profile)
    recording_sensor.start(lambda _frame: None)
    try:
        for i, image in enumerate(frames):
            frame = rs.software_video_frame()
            frame.pixels = np.ascontiguousarray(image)
            frame.stride = width * 3
            frame.bpp = 3
            frame.timestamp = start_timestamp_ms + i * 1000.0 / fps
            frame.domain = rs.timestamp_domain.hardware_clock
            frame.frame_number = first_frame_number + i * number_step
            frame.profile = profile
            sensor.on_video_frame(frame)
    finally:
        recording_sensor.stop()
        recording_sensor.close()
        # The recorder finishes the file when the last reference to it goes; drop them all now, not at exit.
        del recording_sensor, recorder, sensor, device
        gc.collect()
    return path


def count_colour_frames(path: str | Path) -> int | None:
    """How many colour frames the recording at `path` holds, by its index; None unless it has one colour stream.

    Opens the file read-only and reads row headers only (no frame is decoded, overflow pages are not touched), so it
    takes milliseconds even for long recordings. Raises sqlite3.DatabaseError when those tables cannot be read.
    """
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        topics = [tid for tid, name in db.execute("SELECT id, name FROM topics") if COLOUR_IMAGE_TOPIC.fullmatch(name)]
        if len(topics) != 1:
            return None
        (count,) = db.execute("SELECT COUNT(*) FROM messages WHERE topic_id = ?", topics).fetchone()
    return int(count)
