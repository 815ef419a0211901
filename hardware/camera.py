"""The camera interface every camera (RealSense, its recordings, the MuJoCo renderer, log replay) offers (design §7).

A camera delivers the newest frame it has, stamped three ways: the device's own timestamp, the device's frame number,
and the moment our process received it on our monotonic clock. `read()` refuses a frame that is older than the
camera's freshness limit by that last stamp, so a policy never acts on a picture of the past without knowing it.

The policy sees a crop of the raw frame resized to a small square (848x480 -> 480x480 crop -> 84x84); `preprocess` is
that one step, shared by every camera so that the real camera and its twins cannot drift apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import cv2
import numpy as np

from robot_rl.config import CameraConfig, CropConfig


class CameraError(RuntimeError):
    """The camera cannot deliver a frame: not connected, no frame in time, recording ended, closed, bad file."""


class StaleFrameError(CameraError):
    """The newest frame is older than the freshness limit (the camera stalled or is reconnecting)."""

    def __init__(self, message: str, *, age_s: float, limit_s: float) -> None:
        super().__init__(message)
        self.age_s = age_s
        self.limit_s = limit_s


@dataclass(frozen=True)
class Frame:
    """One picture and where it came from in time."""

    image: np.ndarray
    """uint8 array (H, W, 3), RGB. Read-only: the same frame may be handed to several readers."""
    timestamp_s: float
    """The device's (or the SDK recording's) timestamp, seconds; comparable only between frames of one camera."""
    frame_number: int
    """The device's frame counter; increases frame to frame (it may restart after a reconnect)."""
    received_s: float
    """When our process got the frame, on the camera's monotonic clock (time.monotonic unless a test injects one)."""


@runtime_checkable
class Camera(Protocol):
    """A camera streaming in the background; reads never wait for the next exposure, only for the first one."""

    @property
    def name(self) -> str:
        """The observation key (config `name`), e.g. front or wrist."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def read(self) -> Frame:
        """The newest frame, cropped and resized for the policy (out_size x out_size x 3 uint8).

        Raises StaleFrameError when it is older than the freshness limit, CameraError when there is none.
        """
        ...

    def read_raw(self) -> Frame:
        """The newest frame as the device delivered it (height x width x 3 uint8), same checks as `read`."""
        ...

    def close(self) -> None:
        """Stop streaming and release the device; idempotent."""
        ...


def check_crop(crop: CropConfig, *, width: int, height: int) -> None:
    """Raise ValueError unless the crop box lies inside a width x height image."""
    if crop.x + crop.width > width or crop.y + crop.height > height:
        raise ValueError(
            f"crop x={crop.x} y={crop.y} width={crop.width} height={crop.height} leaves the {width}x{height} image"
        )


def preprocess(image: np.ndarray, crop: CropConfig, out_size: int) -> np.ndarray:
    """Cut `crop` out of an RGB uint8 image (H, W, 3) and resize it to (out_size, out_size, 3) uint8.

    INTER_AREA averages every source pixel under a target pixel: it is the resampling that does not alias when
    shrinking by a large, non-integer factor (480 -> 84 is 5.7x), which nearest or bilinear would. A crop at least
    four times the output is first halved exactly (means of 2x2 blocks, OpenCV's fast integer path) while it stays at
    least twice the output: 480 -> 240 -> 84 takes ~0.23 ms against ~0.48 ms for 480 -> 84 in one resize, and each
    output pixel still averages the same ~5.7x5.7 source pixels, rounded to whole 2x2 blocks (within a few grey
    levels of the one-step result on camera images; tests/test_realsense.py). Smaller shrink factors, as the
    simulated cameras' 168 -> 84, take one resize.

    >>> img = np.zeros((480, 848, 3), np.uint8); img[:, 184:664] = 200
    >>> out = preprocess(img, CropConfig(x=184, y=0, width=480, height=480), 84)
    >>> out.shape, out.dtype, int(out.min()), int(out.max())
    ((84, 84, 3), dtype('uint8'), 200, 200)
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got shape {shape} dtype {dtype}")
    if out_size < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    height, width = image.shape[:2]
    check_crop(crop, width=width, height=height)
    region = image[crop.y : crop.y + crop.height, crop.x : crop.x + crop.width]
    if region.shape[:2] == (out_size, out_size):
        return region.copy()  # always a new array, never a view into the caller's frame
    while all(side % 2 == 0 and side >= 4 * out_size for side in region.shape[:2]):
        region = cv2.resize(region, (region.shape[1] // 2, region.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(region, (out_size, out_size), interpolation=cv2.INTER_AREA)


def open_cameras(
    configs: Sequence[CameraConfig], *, twin: Callable[[CameraConfig], Camera] | None = None, what: str = "this robot"
) -> list[Camera]:
    """Open one camera per config, in order: a RealSense by `serial` or an SDK `recording` (played at its recorded
    rate), else `twin(cfg)` (a simulated twin's renderer). A camera with neither source and no twin is refused
    (CameraError), and so is anything that cannot be opened; the cameras opened before the failure are closed again.

    what: names the robot in the refusal, e.g. "env.robot=franky".
    """
    cameras: list[Camera] = []
    try:
        for cfg in configs:
            if cfg.serial is not None or cfg.recording is not None:
                from robot_rl.hardware.realsense.camera import RealSenseCamera

                # A recording plays at its recorded rate, as the camera delivered it: read as fast as possible, a
                # 10 s recording would be used up in about a second, while the robot is still starting.
                cameras.append(RealSenseCamera(cfg, pace_recording=True))
            elif twin is not None:
                cameras.append(twin(cfg))
            else:
                raise CameraError(
                    f"camera {cfg.name}: {what} renders no cameras; give it a RealSense serial or a recording"
                )
    except BaseException:
        close_quietly(cameras)
        raise
    return cameras


def close_quietly(cameras: Sequence[Camera]) -> None:
    """Close every camera, ignoring their errors (for cleanup after another error, which must not be hidden)."""
    for camera in cameras:
        with contextlib.suppress(Exception):
            camera.close()
