"""RealSenseCamera against recordings the SDK itself wrote, read back through the real pyrealsense2 pipeline.

Each synthetic frame carries its index twice: as 16 black/white blocks along the top edge (readable after any copy)
and in the blue channel; the red and green channels are gradients of x and y, so a crop can be located by its values.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

rs = pytest.importorskip("pyrealsense2", reason="pyrealsense2 cannot be imported (needs libusb-1.0-0)")

from robot_rl.config import CameraConfig, CropConfig  # noqa: E402
from robot_rl.hardware.camera import Camera, CameraError, Frame, StaleFrameError, preprocess  # noqa: E402
from robot_rl.hardware.realsense import camera as rs_camera  # noqa: E402
from robot_rl.hardware.realsense.camera import (  # noqa: E402
    RealSenseCamera,
    RecordingDamagedError,
    _start_pipeline,
    _Stream,
    list_serials,
)
from robot_rl.hardware.realsense.recording import (  # noqa: E402
    COLOUR_IMAGE_TOPIC,
    count_colour_frames,
    write_recording,
)

W, H = 848, 480
BITS = 16
BLOCK = 8


def synthetic_frame(index: int, *, width: int = W, height: int = H) -> np.ndarray:
    x = np.arange(width)
    y = np.arange(height)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x // 4 % 256)[None, :]  # red: x / 4
    image[..., 1] = (y // 2 % 256)[:, None]  # green: y / 2
    image[..., 2] = index % 256
    for bit in range(BITS):
        image[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255 if index >> bit & 1 else 0
    return image


def decode_index(image: np.ndarray) -> int:
    blocks = image[:BLOCK, : BITS * BLOCK].reshape(BLOCK, BITS, BLOCK, 3).mean(axis=(0, 2, 3))
    return sum(1 << bit for bit in range(BITS) if blocks[bit] > 127)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_recording(folder: Path, name: str, count: int, *, fps: int = 30, first: int = 1) -> tuple[Path, list]:
    frames = [synthetic_frame(i) for i in range(count)]
    path = write_recording(folder / name, frames, fps=fps, width=W, height=H, first_frame_number=first)
    return path, frames


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Twelve 848x480 frames at 30 fps, frame numbers from 1."""
    return make_recording(tmp_path_factory.mktemp("rec"), "front.db3", 12)


def camera_cfg(path: Path, **overrides: object) -> CameraConfig:
    return CameraConfig(name="front", recording=str(path), width=W, height=H, **overrides)


def read_to_the_end(camera: RealSenseCamera, *, raw: bool = True, timeout_s: float = 10.0) -> tuple[list, CameraError]:
    """Every read until the first CameraError: the frames and that error."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            frames.append(camera.read_raw() if raw else camera.read())
        except CameraError as exc:
            return frames, exc
        time.sleep(0.001)
    raise AssertionError("the recording never ended")


def read_until_end(camera: RealSenseCamera, *, raw: bool = True, timeout_s: float = 10.0) -> list[Frame]:
    frames, exc = read_to_the_end(camera, raw=raw, timeout_s=timeout_s)
    assert "recording ended" in str(exc), exc
    return frames


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------------------------------
# Recordings replay intact and in order
# --------------------------------------------------------------------------------------------------------------------
def test_every_frame_arrives_intact_and_in_order_when_paced(tmp_path: Path) -> None:
    # At 10 fps each frame stays the newest for 100 ms: a reader polling every millisecond sees every one of them.
    path, sources = make_recording(tmp_path, "paced.db3", 8, fps=10, first=41)
    with RealSenseCamera(camera_cfg(path, fps=10), clock=FakeClock(), pace_recording=True) as camera:
        assert isinstance(camera, Camera)
        frames = read_until_end(camera)
    distinct = {f.frame_number: f for f in frames}
    assert sorted(distinct) == list(range(41, 49))
    for number, frame in distinct.items():
        assert frame.image.dtype == np.uint8 and frame.image.shape == (H, W, 3)
        assert np.array_equal(frame.image, sources[number - 41])
        assert decode_index(frame.image) == number - 41
    numbers = [f.frame_number for f in frames]
    assert numbers == sorted(numbers)
    stamps = [distinct[n].timestamp_s for n in sorted(distinct)]
    assert np.allclose(np.diff(stamps), 0.1)
    assert stamps[0] == pytest.approx(1.0)  # write_recording's default start, 1000 ms


def test_unpaced_recording_delivers_newest_frames_in_order(recording: tuple[Path, list]) -> None:
    path, sources = recording
    with RealSenseCamera(camera_cfg(path), clock=FakeClock()) as camera:
        frames = read_until_end(camera)
        assert camera.frames_received == len(sources)  # the reader thread got every frame the file holds
        assert camera.ended and not camera.connected
        assert camera.repeated == 0  # raw reads (a measuring loop) poll faster than frames come: not counted
    with RealSenseCamera(camera_cfg(path), clock=FakeClock()) as camera:
        policy_reads = [f.frame_number for f in read_until_end(camera, raw=False)]
        # Each frame a policy read gets again is counted (and said): the camera fell behind the reads.
        assert camera.repeated == len(policy_reads) - len(set(policy_reads)) > 0
    assert frames, "no frame was read"
    numbers = [f.frame_number for f in frames]
    # A read faster than the stream may hand the newest frame over again; never an older one.
    assert numbers == sorted(numbers) and len(set(numbers)) > 1
    assert all(a.timestamp_s <= b.timestamp_s for a, b in itertools.pairwise(frames))
    assert all(
        (a.frame_number < b.frame_number) == (a.timestamp_s < b.timestamp_s) for a, b in itertools.pairwise(frames)
    )
    assert numbers[-1] == len(sources)  # the last frame is never skipped
    for frame in frames:
        assert decode_index(frame.image) == frame.frame_number - 1
        assert np.array_equal(frame.image, sources[frame.frame_number - 1])
        assert not frame.image.flags.writeable


def test_end_of_recording_is_reported_and_stays_reported(recording: tuple[Path, list]) -> None:
    path, _ = recording
    with RealSenseCamera(camera_cfg(path), clock=FakeClock()) as camera:
        wait_until(lambda: camera.ended)
        last = camera.read()  # the last frame is still handed over once
        assert last.frame_number == 12
        for _ in range(2):
            with pytest.raises(CameraError, match="recording ended"):
                camera.read()


# --------------------------------------------------------------------------------------------------------------------
# Damaged recordings are reported as damaged, not as their end
# --------------------------------------------------------------------------------------------------------------------
def colour_frame_data(path: Path) -> list[bytes]:
    """The stored data of every colour frame, in recording order, read from the file's sqlite tables."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        topics = [tid for tid, name in db.execute("SELECT id, name FROM topics") if COLOUR_IMAGE_TOPIC.fullmatch(name)]
        (topic,) = topics
        rows = db.execute("SELECT data FROM messages WHERE topic_id = ? ORDER BY timestamp, id", (topic,))
        return [bytes(data) for (data,) in rows]


def damage_frame(path: Path, index: int, *, size: int = 16) -> None:
    """Invert `size` bytes in the middle of colour frame `index`'s stored data (0-based), in place."""
    before = colour_frame_data(path)
    data, raw = before[index], path.read_bytes()
    for start in range(len(data) // 2, len(data) - size):
        chunk = data[start : start + size]
        at = raw.find(chunk)
        if at >= 0 and raw.find(chunk, at + 1) < 0:  # found once in the whole file: these are the frame's bytes
            break
    else:
        raise AssertionError(f"no unique stretch of frame {index}'s data found in {path}")
    with path.open("r+b") as f:
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in chunk))
    after = colour_frame_data(path)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [index]


def copy_of(recording: tuple[Path, list], folder: Path) -> Path:
    path, _ = recording
    return Path(shutil.copy(path, folder / path.name))


def test_recording_read_to_its_end_ends_normally(recording: tuple[Path, list]) -> None:
    path, sources = recording
    assert count_colour_frames(path) == len(sources)
    with RealSenseCamera(camera_cfg(path), clock=FakeClock()) as camera:
        frames, exc = read_to_the_end(camera)
        assert camera.ended and camera.frames_received == len(sources)
    assert not isinstance(exc, RecordingDamagedError)
    assert f"recording ended ({len(sources)} frames read from {path})" in str(exc)
    assert frames[-1].frame_number == len(sources)


def test_frame_that_no_longer_decodes_is_reported_as_damage(recording: tuple[Path, list], tmp_path: Path) -> None:
    # The SDK stores colour frames as PNG; bytes overwritten in the middle of frame 7's make it undecodable, and the
    # SDK's playback stops there exactly as at the end of the file.
    path = copy_of(recording, tmp_path)
    damage_frame(path, 6)
    with RealSenseCamera(camera_cfg(path), clock=FakeClock(), frame_timeout_s=0.3) as camera:
        frames, exc = read_to_the_end(camera)
        assert camera.frames_received == 6
        assert not camera.ended  # not the end of the recording
        with pytest.raises(RecordingDamagedError):  # and it stays reported
            camera.read()
    assert isinstance(exc, RecordingDamagedError)
    assert frames[-1].frame_number == 6  # every frame before the damaged one is delivered
    message = str(exc)
    assert f"camera front: recording {path} is damaged" in message
    assert "stopped after frame #6 (device time 1.167 s)" in message
    assert "delivered 6 of the 12 colour frames the file holds" in message
    assert "recording ended" not in message


def test_recording_cut_short_is_reported_as_damage(recording: tuple[Path, list], tmp_path: Path) -> None:
    # A copy that lost its last byte: sqlite reads it one page short, and that page held part of a frame.
    path = copy_of(recording, tmp_path)
    os.truncate(path, path.stat().st_size - 1)
    with RealSenseCamera(camera_cfg(path), clock=FakeClock(), frame_timeout_s=0.3) as camera:
        frames, exc = read_to_the_end(camera)
        delivered = camera.frames_received
        assert not camera.ended
    assert isinstance(exc, RecordingDamagedError), exc
    assert 0 < delivered < 12 and frames[-1].frame_number == delivered
    assert f"recording {path} is damaged" in str(exc)
    assert f"after frame #{delivered} " in str(exc) and f"{delivered} of the 12 colour frames" in str(exc)


def test_cameras_command_does_not_take_damage_for_the_end(recording: tuple[Path, list], tmp_path: Path) -> None:
    """`robot-rl cameras --recording` stops at a recording's end and reports what it measured; not at damage."""
    from robot_rl.cameras_cmd import measure_camera

    path = copy_of(recording, tmp_path)
    damage_frame(path, 6)
    with pytest.raises(RecordingDamagedError, match=re.escape(f"recording {path} is damaged")):
        measure_camera(camera_cfg(path), tmp_path / "out", 30)


def test_recording_cut_in_the_middle_is_refused_when_opened(recording: tuple[Path, list], tmp_path: Path) -> None:
    path = copy_of(recording, tmp_path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CameraError, match=re.escape(f"cannot open recording {path}")):
        RealSenseCamera(camera_cfg(path))


def test_recording_whose_index_cannot_be_read_is_refused(
    recording: tuple[Path, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = recording

    def unreadable(_path: object) -> int:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(rs_camera, "count_colour_frames", unreadable)
    with pytest.raises(CameraError, match=re.escape(f"recording {path} is damaged: its frame index cannot be read")):
        RealSenseCamera(camera_cfg(path))


def test_count_colour_frames_reads_the_index_only(tmp_path: Path) -> None:
    path, _ = make_recording(tmp_path, "five.db3", 5)
    assert count_colour_frames(path) == 5
    garbage = tmp_path / "garbage.db3"
    garbage.write_bytes(b"this is not a recording")
    with pytest.raises(sqlite3.DatabaseError):
        count_colour_frames(garbage)


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------------
def test_read_gives_84x84_of_the_crop_box(recording: tuple[Path, list]) -> None:
    path, _ = recording
    crop = CropConfig(x=184, y=0, width=480, height=480)
    with RealSenseCamera(camera_cfg(path, crop=crop), clock=FakeClock()) as camera:
        frame = camera.read()
    image = frame.image
    assert image.shape == (84, 84, 3) and image.dtype == np.uint8
    assert not image.flags.writeable
    # Red is x/4: the crop spans x 184..663, red 46..165; its 84 columns each average ~5.7 source columns.
    red = image[BLOCK:, :, 0].astype(float).mean(axis=0)
    assert np.all(np.diff(red) >= 0)
    assert red[0] == pytest.approx((184 + 184 + 5.7) / 2 / 4, abs=1.0)
    assert red[-1] == pytest.approx((663 + 663 - 5.7) / 2 / 4, abs=1.0)
    # Green is y/2 over the full height 0..479.
    green = image[:, :, 1].astype(float).mean(axis=1)
    assert green[0] == pytest.approx(1.0, abs=1.0) and green[-1] == pytest.approx(238.0, abs=1.0)
    assert np.all(image[20:, :, 2] == frame.frame_number - 1)  # blue: the frame index, untouched by resampling


def test_preprocess_crops_exactly_the_box() -> None:
    image = np.zeros((H, W, 3), np.uint8)
    image[40:200, 300:460] = (10, 200, 30)  # a 160x160 box, everything else black
    out = preprocess(image, CropConfig(x=300, y=40, width=160, height=160), 84)
    assert out.shape == (84, 84, 3) and out.dtype == np.uint8
    assert np.all(out == (10, 200, 30))
    shifted = preprocess(image, CropConfig(x=290, y=40, width=160, height=160), 84)
    # Ten pixels to the left: the first output columns are black outside the box, the last ones the box's colour.
    assert shifted[:, 0].max() == 0 and np.all(shifted[:, -1] == (10, 200, 30))
    same_size = preprocess(image, CropConfig(x=300, y=40, width=84, height=84), 84)
    assert np.array_equal(same_size, image[40:124, 300:384])


def test_preprocess_of_a_large_crop_averages_without_aliasing() -> None:
    """480 -> 84 goes through an exact halving first: the result must still be an area average of each output
    pixel's ~5.7x5.7 source pixels, as one INTER_AREA resize would give."""
    import cv2

    crop = CropConfig(x=184, y=0, width=480, height=480)
    stripes = np.zeros((H, W, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: nearest or bilinear sampling would give 0 or 255 here
    stripes[::3, :, 1] = 90
    out = preprocess(stripes, crop, 84).astype(int)
    assert np.abs(out[..., 0] - 127.5).max() <= 1 and np.abs(out[..., 2] - 127.5).max() <= 1
    assert np.abs(out[..., 1] - (127.5 * 2 / 3 + 90 / 3)).max() <= 16  # rows of 90 every 3rd: ~5.7 rows per pixel
    # A camera-like image (smooth shading and texture): within a few grey levels of the one-step resize.
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:W]
    shading = (0.2 * xx + 0.3 * yy)[..., None] + cv2.GaussianBlur(rng.normal(0, 60, (H, W, 3)), (0, 0), 3)
    image = np.clip(shading, 0, 255).astype(np.uint8)
    one_step = cv2.resize(image[0:480, 184:664], (84, 84), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(preprocess(image, crop, 84).astype(int) - one_step).max() <= 3
    # The simulated cameras' 168 -> 84 (an exact 2x) is one resize, unchanged.
    small = image[:168, :297].copy()
    sim = CropConfig(x=64, y=0, width=168, height=168)
    expected = cv2.resize(small[:, 64:232], (84, 84), interpolation=cv2.INTER_AREA)
    assert np.array_equal(preprocess(small, sim, 84), expected)
    # Odd crop sides cannot be halved exactly: one resize.
    odd = CropConfig(x=184, y=0, width=479, height=479)
    expected = cv2.resize(image[0:479, 184:663], (84, 84), interpolation=cv2.INTER_AREA)
    assert np.array_equal(preprocess(image, odd, 84), expected)


def test_crop_outside_the_frame_is_refused() -> None:
    with pytest.raises(ValidationError, match="leaves the 848x480 frame"):
        CameraConfig(name="front", serial="1", crop=CropConfig(x=400, y=0, width=480, height=480))
    with pytest.raises(ValidationError, match="leaves"):
        CameraConfig(name="front", serial="1", crop=CropConfig(x=0, y=1, width=480, height=480))
    image = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="leaves the 848x480 image"):
        preprocess(image, CropConfig(x=400, y=0, width=480, height=480), 84)
    with pytest.raises(ValueError, match="leaves"):
        preprocess(image[:100], CropConfig(), 84)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((H, W, 3), np.float32), np.zeros((H, W), np.uint8), np.zeros((H, W, 4), np.uint8), [[0, 0, 0]]],
    ids=["float", "grey", "rgba", "list"],
)
def test_preprocess_refuses_what_is_not_uint8_rgb(bad: object) -> None:
    with pytest.raises(ValueError, match=r"uint8 image of shape \(H, W, 3\)"):
        preprocess(bad, CropConfig(), 84)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# Freshness
# --------------------------------------------------------------------------------------------------------------------
def test_old_frame_is_refused_with_its_age(recording: tuple[Path, list]) -> None:
    path, _ = recording
    clock = FakeClock()
    with RealSenseCamera(camera_cfg(path, freshness_s=0.2), clock=clock) as camera:
        wait_until(lambda: camera.ended)  # every frame arrived at clock.now
        clock.now += 0.65
        for _ in range(2):  # a refused frame stays refused (and is not taken as consumed)
            with pytest.raises(StaleFrameError) as info:
                camera.read()
    assert info.value.age_s == pytest.approx(0.65)
    assert info.value.limit_s == 0.2
    assert "0.650 s old" in str(info.value) and "#12" in str(info.value)
    # A recording that ended is said to have ended (and a damaged one damaged), not to be reconnecting.
    assert "(recording ended (12 frames read from" in str(info.value) and "reconnecting" not in str(info.value)
    with RealSenseCamera(camera_cfg(path, freshness_s=0.2), clock=clock) as camera:
        wait_until(lambda: camera.ended)
        clock.now += 0.15
        assert camera.read_raw().frame_number == 12  # 0.15 s old: fresh enough


# --------------------------------------------------------------------------------------------------------------------
# Opening errors, options, lifecycle
# --------------------------------------------------------------------------------------------------------------------
def test_missing_recording_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db3"
    with pytest.raises(CameraError, match=re.escape(str(missing))):
        RealSenseCamera(camera_cfg(missing))


def test_unreadable_recording_is_named_in_the_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db3"
    garbage.write_bytes(b"this is not a recording")
    with pytest.raises(CameraError, match=re.escape(f"cannot open recording {garbage}")):
        RealSenseCamera(camera_cfg(garbage))
    bag = tmp_path / "old.bag"
    bag.write_bytes(b"")
    with pytest.raises(CameraError, match=r"old\.bag"):
        RealSenseCamera(camera_cfg(bag))


def test_recording_of_another_size_is_refused_with_both_sizes(recording: tuple[Path, list]) -> None:
    path, _ = recording
    cfg = CameraConfig(name="front", recording=str(path), width=640, height=480, crop=CropConfig(x=80))
    with pytest.raises(CameraError, match=re.escape(f"cannot open recording {path} as 640x480 RGB8 at 30 fps")) as info:
        RealSenseCamera(cfg)
    assert str(info.value).endswith(f"; the file holds color {W}x{H} RGB8 at 30 fps")  # what it asked, what there is


def test_conflicting_or_missing_sources_are_refused(recording: tuple[Path, list], tmp_path: Path) -> None:
    path, _ = recording
    with pytest.raises(ValueError, match="give a serial"):
        RealSenseCamera(CameraConfig(name="front"))
    with pytest.raises(ValueError, match="record_to cannot be used while reading a recording"):
        RealSenseCamera(camera_cfg(path, record_to=str(tmp_path / "copy.db3")))
    with pytest.raises(ValueError, match=r"must end in \.db3"):
        RealSenseCamera(CameraConfig(name="front", serial="123", record_to=str(tmp_path / "copy.bag")))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        RealSenseCamera(CameraConfig(name="front", serial="123", record_to=str(path)))


def test_close_joins_the_reader_and_later_reads_fail(recording: tuple[Path, list]) -> None:
    path, _ = recording
    camera = RealSenseCamera(camera_cfg(path), clock=FakeClock(), pace_recording=True)
    assert camera.read().image.shape == (84, 84, 3)
    camera.close()
    camera.close()  # idempotent
    assert not any(t.name == "camera-front" for t in threading.enumerate())
    with pytest.raises(CameraError, match="closed"):
        camera.read()


class StallingCamera(RealSenseCamera):
    """A 'live' camera whose device is a recording: when the file runs out the stream stalls, as an unplugged one.

    `_open` is the seam the reconnect path goes through; the playback handle is dropped so the stream looks live.
    """

    def __init__(self, cfg: CameraConfig, source: Path, **kwargs: object) -> None:
        self.source = source
        self.opens = 0
        super().__init__(cfg, **kwargs)  # type: ignore[arg-type]

    def _open(self) -> _Stream:
        self.opens += 1
        stream = _start_pipeline(self.config, recording=self.source, record_to=None)
        return _Stream(pipeline=stream.pipeline, playback=None)


def test_stalled_live_stream_is_reopened(recording: tuple[Path, list]) -> None:
    path, sources = recording
    cfg = CameraConfig(name="wrist", serial="stand-in", width=W, height=H)
    kwargs = {"frame_timeout_s": 0.2, "startup_timeout_s": 0.5, "poll_s": 0.05, "backoff_s": (0.05, 0.1)}
    with StallingCamera(cfg, path, clock=FakeClock(), **kwargs) as camera:
        assert not camera.is_recording
        wait_until(lambda: camera.reconnects >= 1 and camera.frames_received > len(sources), timeout_s=10.0)
        assert camera.opens >= 2
        assert "no frame for" in (camera.last_error or "")
        assert camera.read().image.shape == (84, 84, 3)
    assert not camera.connected


def test_write_recording_refuses_bad_input(tmp_path: Path) -> None:
    frame = synthetic_frame(0, width=64, height=48)
    with pytest.raises(ValueError, match=r"\.db3"):
        write_recording(tmp_path / "x.bag", [frame], fps=30, width=64, height=48)
    with pytest.raises(ValueError, match="frame 1"):
        write_recording(tmp_path / "x.db3", [frame, frame[:, :32]], fps=30, width=64, height=48)
    with pytest.raises(ValueError, match="at least one frame"):
        write_recording(tmp_path / "x.db3", [], fps=30, width=64, height=48)
    path = write_recording(tmp_path / "x.db3", [frame], fps=30, width=64, height=48)
    with pytest.raises(FileExistsError):
        write_recording(path, [frame], fps=30, width=64, height=48)
    write_recording(path, [frame, frame], fps=30, width=64, height=48, overwrite=True)


def test_list_serials_gives_strings() -> None:
    serials = list_serials()  # empty on a machine without a camera
    assert isinstance(serials, list) and all(isinstance(s, str) for s in serials)


def test_a_robot_s_recorded_camera_plays_at_the_recorded_rate(tmp_path: Path) -> None:
    """What an actor opens (hardware.camera.open_cameras) for a recording: 20 frames at 10 fps last 2 s of reading,
    not the fraction of a second the file takes to decode."""
    from robot_rl.hardware.camera import open_cameras

    path, _ = make_recording(tmp_path, "robot.db3", 20, fps=10, first=1)
    (camera,) = open_cameras([camera_cfg(path, fps=10, freshness_s=5.0)])
    with camera:
        wait_until(lambda: _readable(camera))
        first = camera.read_raw().frame_number
        time.sleep(0.5)
        later = camera.read_raw().frame_number
    assert 2 <= later - first <= 8, (first, later)  # ~5 frames in 0.5 s at 10 fps


def _readable(camera: Camera) -> bool:
    try:
        camera.read_raw()
    except CameraError:
        return False
    return True
