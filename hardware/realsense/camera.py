"""`RealSenseCamera`: a RealSense colour stream by serial, or an SDK recording through the same pipeline code.

One daemon thread per camera pulls frames from the SDK pipeline and keeps only the newest (copied out of the SDK's
buffer, so the SDK's frame pool never runs dry); `read()` hands that frame over without waiting for the next exposure
and refuses it when it is older than `freshness_s` on our monotonic clock. A live camera that errors or stops sending
is closed and reopened by the thread with exponential backoff; meanwhile reads fail as stale, and the properties
(`connected`, `reconnects`, `frames_received`, `fps_measured`, `last_error`) say why.

A recording (`cfg.recording`, .db3) is opened with `enable_device_from_file(repeat_playback=False)` and the playback set
to non-real-time *before* `pipeline.start` (hardware-facts.md: set after start, frames are lost in about half the
runs). Non-real-time playback waits for the reader, so no frame is dropped; by default the file is read as fast as the
thread can take it, `pace_recording=True` releases frames at the pace of their recorded timestamps instead. When the
playback stops and the last frame has been read, `read()` raises CameraError('... recording ended ...').

A damaged recording is not taken for its end. The SDK's playback stops on a frame it cannot read (a file cut short, a
compressed frame that no longer decodes) exactly as at the end of the file: it logs the error and offers no way to
tell the two apart (`playback.get_position()` is reset to 0 when it stops; `get_duration()` is the time of the file's
last message of any stream). So the frames delivered are counted against the colour frames the file's index lists
(recording.count_colour_frames): when playback stops short of them, `read()` raises RecordingDamagedError naming the
file, how many frames were delivered (the last one's number and device timestamp) and how many the file holds. A
recording whose index cannot be read at all is refused when it is opened. Not detected: pixel data changed in place
without breaking its decoding. The file holds no checksum of an uncompressed frame, and the SDK's PNG decoder does not
check the PNG chunk CRCs: in a fuzz of 16-byte overwrites of a PNG recording (pyrealsense2 2.59.1), about one in ten
decoded to wrong pixels without an error. Damage after the last colour frame is not reported either (every frame
arrives), nor is anything in a recording whose index lists no single colour stream (no count to compare with).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyrealsense2 as rs

from robot_rl.config import CameraConfig
from robot_rl.hardware.camera import CameraError, Frame, StaleFrameError, check_crop, preprocess
from robot_rl.hardware.interfaces import ClosesOnExit
from robot_rl.hardware.realsense.recording import count_colour_frames

log = logging.getLogger(__name__)

RECORDING_SUFFIX = ".db3"
FPS_WINDOW = 30  # arrivals the measured rate is averaged over (one second at 30 fps)


def list_serials() -> list[str]:
    """Serial numbers of the RealSense devices connected now (an empty list when there are none)."""
    try:
        devices = rs.context().query_devices()
        return [d.get_info(rs.camera_info.serial_number) for d in devices if d.supports(rs.camera_info.serial_number)]
    except RuntimeError as exc:
        raise CameraError(f"cannot list RealSense devices: {exc}") from exc


@dataclass(frozen=True)
class _Stream:
    """A started pipeline; `playback` is set when it reads a recording (its status tells the end of the file).

    `frames_in_file`: the colour frames the recording's index lists (None for a live camera, or when it cannot tell).
    """

    pipeline: rs.pipeline
    playback: rs.playback | None
    frames_in_file: int | None = None


def recording_streams(recording: Path) -> str:
    """What an SDK recording holds, for messages: e.g. "color 640x480 BGR8 at 30 fps, depth 848x480 Z16 at 30 fps"."""
    config = rs.config()
    try:
        config.enable_device_from_file(str(recording), repeat_playback=False)
        profile = config.resolve(rs.pipeline_wrapper(rs.pipeline()))
        streams = []
        for stream in profile.get_streams():
            kind, fmt = str(stream.stream_type()).split(".")[-1], str(stream.format()).split(".")[-1].upper()
            size = ""
            if stream.is_video_stream_profile():
                video = stream.as_video_stream_profile()
                size = f" {video.width()}x{video.height()}"
            streams.append(f"{kind}{size} {fmt} at {stream.fps()} fps")
    except RuntimeError as exc:
        return f"no stream that can be listed ({exc})"
    return ", ".join(streams) if streams else "no stream"


def _start_pipeline(cfg: CameraConfig, *, recording: Path | None, record_to: Path | None) -> _Stream:
    """Start the colour stream of `cfg` from the device `cfg.serial` or from `recording`; the one code path of both."""
    source = f"recording {recording}" if recording is not None else f"device {cfg.serial}"
    config = rs.config()
    if recording is not None:
        config.enable_device_from_file(str(recording), repeat_playback=False)
    else:
        config.enable_device(cfg.serial)
    config.enable_stream(rs.stream.color, cfg.width, cfg.height, rs.format.rgb8, cfg.fps)
    if record_to is not None:
        config.enable_record_to_file(str(record_to))
    pipeline = rs.pipeline()
    wanted = f"{cfg.width}x{cfg.height} RGB8 at {cfg.fps} fps"
    try:
        device = config.resolve(rs.pipeline_wrapper(pipeline)).get_device()
        if device.is_playback():
            device.as_playback().set_real_time(False)  # before start, or frames get lost (hardware-facts.md)
    except RuntimeError as exc:
        holds = f"; the file holds {recording_streams(recording)}" if recording is not None else ""
        raise CameraError(f"camera {cfg.name}: cannot open {source} as {wanted}: {exc}{holds}") from exc
    frames_in_file = None
    if recording is not None:
        try:
            frames_in_file = count_colour_frames(recording)
        except sqlite3.DatabaseError as exc:
            raise CameraError(f"camera {cfg.name}: {source} is damaged: its frame index cannot be read: {exc}") from exc
    try:
        active = pipeline.start(config)
    except RuntimeError as exc:
        raise CameraError(f"camera {cfg.name}: cannot open {source} as {wanted}: {exc}") from exc
    active_device = active.get_device()
    playback = active_device.as_playback() if active_device.is_playback() else None
    return _Stream(pipeline=pipeline, playback=playback, frames_in_file=frames_in_file)


def _stop_pipeline(stream: _Stream | None) -> None:
    if stream is None:
        return
    try:
        stream.pipeline.stop()  # also finishes a record_to file
    except RuntimeError as exc:  # already stopped, or the device is gone: nothing left to release
        log.debug("pipeline stop: %s", exc)


class _StreamStalled(CameraError):
    """No frame for longer than the frame timeout (the reader thread reconnects)."""


class RecordingDamagedError(CameraError):
    """The SDK's playback of a recording stopped before delivering every colour frame the file's index lists."""


class RealSenseCamera(ClosesOnExit):
    """A RealSense colour camera (or its SDK recording) streaming in the background; see the module docstring.

    Opens in the constructor: a wrong serial, a missing or unreadable recording, or a stream the device cannot give
    raises CameraError at once. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        cfg: CameraConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        first_frame_timeout_s: float = 5.0,
        startup_timeout_s: float = 5.0,
        frame_timeout_s: float = 1.0,
        poll_s: float = 0.1,
        backoff_s: tuple[float, float] = (0.5, 5.0),
        join_timeout_s: float = 5.0,
        pace_recording: bool = False,
    ) -> None:
        """
        Args:
            cfg: the camera's config (source, stream size and rate, crop, out_size, freshness).
            clock: monotonic seconds; stamps `Frame.received_s` and measures frame age (tests inject a fake).
            first_frame_timeout_s: how long `read()` waits when no frame has arrived yet.
            startup_timeout_s: how long a (re)started live stream may take to send its first frame.
            frame_timeout_s: a live stream silent for this long is taken as disconnected and reopened; a recording
                whose playback stopped short of the frames its index lists, as damaged.
            poll_s: the reader's wait per SDK call; bounds how quickly it notices `close()` and a recording's end.
            backoff_s: first and largest pause between reconnection attempts (doubling in between).
            join_timeout_s: how long `close()` waits for the reader thread.
            pace_recording: release a recording's frames at their recorded rate instead of as fast as possible.
        """
        for label, value in (
            ("first_frame_timeout_s", first_frame_timeout_s),
            ("startup_timeout_s", startup_timeout_s),
            ("frame_timeout_s", frame_timeout_s),
            ("poll_s", poll_s),
            ("join_timeout_s", join_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be positive, got {value}")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise ValueError(f"backoff_s must be (first, largest) with 0 < first <= largest, got {backoff_s}")
        self._cfg = cfg
        self._recording = self._check_sources(cfg)
        check_crop(cfg.crop, width=cfg.width, height=cfg.height)  # the config checks it too; cheap to be sure
        self._clock = clock
        self._first_frame_timeout_s = first_frame_timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._frame_timeout_s = frame_timeout_s
        self._poll_ms = max(1, round(poll_s * 1000))
        self._backoff_s = backoff_s
        self._join_timeout_s = join_timeout_s
        self._pace = pace_recording and self._recording is not None

        # Shared with the reader thread; every field below is guarded by the condition's lock.
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._latest_seq = 0  # counts published frames; frame numbers may restart after a reconnect, this does not
        self._consumed_seq = 0
        self.repeated = 0  # reads that handed over the frame the read before had (the camera fell behind the loop)
        self._arrivals: deque[float] = deque(maxlen=FPS_WINDOW)
        self._running = True
        self._connected = False
        self._ended = False
        self._error: BaseException | None = None
        self._last_error: str | None = None
        self._reconnects = 0
        self._closed = False

        self._stop = threading.Event()
        self._record_opens = 0
        stream = self._open()  # in the caller's thread: a wrong serial or file fails here, loudly
        self._connected = True
        self._thread = threading.Thread(target=self._run, args=(stream,), name=f"camera-{cfg.name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------------------------
    # Public surface
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._cfg.name

    @property
    def config(self) -> CameraConfig:
        return self._cfg

    @property
    def is_recording(self) -> bool:
        """True when the source is an SDK recording rather than a live device."""
        return self._recording is not None

    @property
    def connected(self) -> bool:
        """A pipeline is streaming (False while reconnecting, after the end of a recording, and after close)."""
        with self._cond:
            return self._connected

    @property
    def reconnects(self) -> int:
        """How often the stream was reopened after an error or a stall."""
        with self._cond:
            return self._reconnects

    @property
    def frames_received(self) -> int:
        """Frames the reader thread has published since the camera opened, over all reconnections."""
        with self._cond:
            return self._latest_seq

    @property
    def fps_measured(self) -> float:
        """Arrival rate over the last frames (wall clock), 0.0 before two frames."""
        with self._cond:
            if len(self._arrivals) < 2 or self._arrivals[-1] <= self._arrivals[0]:
                return 0.0
            return (len(self._arrivals) - 1) / (self._arrivals[-1] - self._arrivals[0])

    @property
    def ended(self) -> bool:
        """The recording has been read to its end (its last frame may still be unread)."""
        with self._cond:
            return self._ended

    @property
    def last_error(self) -> str | None:
        """The last error the stream met (kept after a successful reconnect, for the log)."""
        with self._cond:
            return self._last_error

    def read_raw(self) -> Frame:
        """The newest frame as delivered (height x width x 3 uint8 RGB, read-only)."""
        return self._take(count_repeat=False)  # a measuring loop polls faster than frames come: not a fault

    def read(self) -> Frame:
        """The newest frame cropped and resized to out_size x out_size x 3 uint8 RGB (read-only)."""
        raw = self._take()
        image = preprocess(raw.image, self._cfg.crop, self._cfg.out_size)
        image.flags.writeable = False
        return dataclasses.replace(raw, image=image)

    def close(self) -> None:
        """Stop the reader thread (which stops the pipeline); idempotent, never raises."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout=self._join_timeout_s)
        if self._thread.is_alive():
            # An SDK call without a timeout (pipeline.stop/start) is stuck; the daemon thread dies with the process.
            log.warning("camera %s: reader thread still running %.1f s after close", self.name, self._join_timeout_s)

    def __repr__(self) -> str:
        source = f"recording={self._recording}" if self._recording else f"serial={self._cfg.serial}"
        return f"RealSenseCamera(name={self.name!r}, {source})"

    # ----------------------------------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------------------------------
    def _take(self, *, count_repeat: bool = True) -> Frame:
        with self._cond:
            if self._closed:
                raise CameraError(f"camera {self.name}: closed")
            if self._latest is None:
                # Only the very first read waits; afterwards the newest frame is answered or refused at once.
                self._cond.wait_for(
                    lambda: self._latest is not None or self._ended or not self._running or self._closed,
                    timeout=self._first_frame_timeout_s,
                )
            frame = self._latest
            # Nothing more will come once the recording ended or the thread stopped: a consumed frame is not repeated.
            finished = self._ended or not self._running
            if frame is None or (finished and self._latest_seq == self._consumed_seq):
                raise self._no_frame_error()
            age = self._clock() - frame.received_s
            if age > self._cfg.freshness_s:
                if finished:  # ended or damaged (a reader slower than the freshness limit): said as such
                    state = f" ({str(self._no_frame_error()).removeprefix(f'camera {self.name}: ')})"
                else:
                    state = "" if self._connected else " (disconnected, reconnecting)"
                raise StaleFrameError(
                    f"camera {self.name}: newest frame #{frame.frame_number} is {age:.3f} s old, "
                    f"limit {self._cfg.freshness_s} s{state}",
                    age_s=age,
                    limit_s=self._cfg.freshness_s,
                )
            if count_repeat and self._latest_seq == self._consumed_seq:
                self._said_repeat(frame)
            self._consumed_seq = self._latest_seq
            return frame

    def _said_repeat(self, frame: Frame) -> None:
        """Count a frame handed over twice (fresh enough, but no newer one came since the last read) and say the
        first and every 100th: the camera delivers slower than the loop reads (its fps, USB bandwidth, a stall)."""
        self.repeated += 1
        if self.repeated == 1 or self.repeated % 100 == 0:
            log.warning(
                "camera %s: frame #%d read again by the next step (%d such reads): the camera delivers slower than "
                "the control loop reads; check its fps and its USB link",
                self.name,
                frame.frame_number,
                self.repeated,
            )

    def _no_frame_error(self) -> CameraError:
        """The error for 'nothing to hand over'; called with the lock held."""
        if self._closed:
            return CameraError(f"camera {self.name}: closed")
        if self._ended:
            return CameraError(
                f"camera {self.name}: recording ended ({self._latest_seq} frames read from {self._recording})"
            )
        if isinstance(self._error, RecordingDamagedError):
            return RecordingDamagedError(f"camera {self.name}: {self._error}")
        if self._error is not None:
            return CameraError(f"camera {self.name}: reader stopped: {self._error}")
        return CameraError(
            f"camera {self.name}: no frame within {self._first_frame_timeout_s} s "
            f"(connected={self._connected}, last error: {self._last_error})"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Opening
    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_sources(cfg: CameraConfig) -> Path | None:
        """Validate serial/recording/record_to; returns the recording's path (None for a live camera)."""
        if cfg.serial is None and cfg.recording is None:
            raise ValueError(f"camera {cfg.name}: give a serial (live camera) or a recording (.db3)")
        if cfg.record_to is not None:
            if cfg.recording is not None:
                raise ValueError(f"camera {cfg.name}: record_to cannot be used while reading a recording")
            target = Path(cfg.record_to)
            if target.suffix != RECORDING_SUFFIX:
                raise ValueError(
                    f"camera {cfg.name}: record_to {target} must end in {RECORDING_SUFFIX} (the SDK writes ROS2 sqlite)"
                )
            if not target.parent.is_dir():
                raise ValueError(f"camera {cfg.name}: record_to folder {target.parent} does not exist")
            if target.exists():
                raise ValueError(f"camera {cfg.name}: record_to {target} exists; refusing to overwrite a recording")
        if cfg.recording is None:
            return None
        recording = Path(cfg.recording)
        if not recording.is_file():
            raise CameraError(f"camera {cfg.name}: recording {recording} does not exist or is not a file")
        if recording.suffix != RECORDING_SUFFIX:
            raise CameraError(f"camera {cfg.name}: recording {recording} is not an SDK recording ({RECORDING_SUFFIX})")
        return recording

    def _next_record_path(self) -> Path | None:
        """Where this connection records: record_to, then record_to-1.db3, -2, ... after reconnects (no clobbering)."""
        if self._cfg.record_to is None:
            return None
        base = Path(self._cfg.record_to)
        part = self._record_opens
        self._record_opens += 1
        if part == 0:
            return base
        while (path := base.with_name(f"{base.stem}-{part}{base.suffix}")).exists():
            part += 1
        return path

    def _open(self) -> _Stream:
        """Start a pipeline on the configured source (the reconnect path and tests come through here)."""
        return _start_pipeline(self._cfg, recording=self._recording, record_to=self._next_record_path())

    # ----------------------------------------------------------------------------------------------------------------
    # The reader thread
    # ----------------------------------------------------------------------------------------------------------------
    def _run(self, stream: _Stream) -> None:
        current: _Stream | None = stream
        try:
            while current is not None and not self._stop.is_set():
                try:
                    self._pump(current)
                    return  # stop requested, or the recording ended
                except Exception as exc:  # any SDK error: the stream is lost, the thread must live on
                    self._lost(current, exc)
                    current = None
                    if self._recording is not None:
                        return  # reopening would replay the file from its start: report instead
                    current = self._reconnect()
        finally:
            _stop_pipeline(current)
            with self._cond:
                self._running = False
                self._connected = False
                self._cond.notify_all()

    def _pump(self, stream: _Stream) -> None:
        """Publish frames until stop or the end of a recording; raises when the stream errors or stalls."""
        last_frame = time.monotonic()
        timeout_s = self._startup_timeout_s
        pace_origin: tuple[float, float] | None = None  # (wall time, device timestamp) of the first paced frame
        delivered = 0  # colour frames published from this stream
        stopped_at: float | None = None  # when a recording's playback was first seen stopped
        while not self._stop.is_set():
            ok, frames = stream.pipeline.try_wait_for_frames(self._poll_ms)
            if ok:
                colour = frames.get_color_frame()
                if not colour:
                    continue
                image, timestamp_s, number = self._copy_out(colour)
                del frames, colour  # hand the SDK its buffer back before we sleep or publish
                if self._pace:
                    pace_origin = pace_origin or (time.monotonic(), timestamp_s)
                    due = pace_origin[0] + (timestamp_s - pace_origin[1])
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        return
                self._publish(Frame(image=image, timestamp_s=timestamp_s, frame_number=number, received_s=0.0))
                delivered += 1
                last_frame = time.monotonic()
                timeout_s = self._frame_timeout_s
                continue
            if stream.playback is not None and stream.playback.current_status() == rs.playback_status.stopped:
                # The playback stopped and a whole poll passed with nothing queued: the end, or a damaged file.
                stopped_at = stopped_at or time.monotonic()
                if self._playback_over(stream, delivered, stopped_at=stopped_at):
                    return
                continue
            silent = time.monotonic() - last_frame
            if silent > timeout_s:
                raise _StreamStalled(f"no frame for {silent:.1f} s")

    def _playback_over(self, stream: _Stream, delivered: int, *, stopped_at: float) -> bool:
        """After a recording's playback stopped: True at the end of the file (marked ended), False while frames the
        file lists may still be on their way (for up to frame_timeout_s); raises RecordingDamagedError after that."""
        expected = stream.frames_in_file
        if expected is None or delivered >= expected:
            with self._cond:
                self._ended = True
                self._connected = False
                self._cond.notify_all()
            return True
        if time.monotonic() - stopped_at <= self._frame_timeout_s:
            return False
        with self._cond:
            last = self._latest
        where = "before its first frame"
        if last is not None:
            where = f"after frame #{last.frame_number} (device time {last.timestamp_s:.3f} s)"
        raise RecordingDamagedError(
            f"recording {self._recording} is damaged: the SDK's playback stopped {where}, having delivered "
            f"{delivered} of the {expected} colour frames the file holds"
        )

    def _copy_out(self, colour: rs.video_frame) -> tuple[np.ndarray, float, int]:
        data = np.asanyarray(colour.get_data())
        expected = (self._cfg.height, self._cfg.width, 3)
        if data.dtype != np.uint8 or data.shape != expected:
            raise CameraError(f"camera {self.name}: frame of {data.dtype} {data.shape}, expected uint8 {expected}")
        image = data.copy()  # our own memory: the SDK reuses its buffers once the frame is released
        image.flags.writeable = False
        return image, colour.get_timestamp() / 1000.0, int(colour.get_frame_number())

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            # Stamped under the lock so that received_s never runs ahead of what a reader can see.
            self._latest = dataclasses.replace(frame, received_s=self._clock())
            self._latest_seq += 1
            self._arrivals.append(time.monotonic())
            self._cond.notify_all()

    def _lost(self, stream: _Stream, exc: BaseException) -> None:
        log.warning("camera %s: stream lost: %s", self.name, exc)
        _stop_pipeline(stream)
        with self._cond:
            self._connected = False
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._recording is not None:
                self._error = exc
            self._cond.notify_all()

    def _reconnect(self) -> _Stream | None:
        """Reopen the live stream with exponential backoff; None when close() came first."""
        delay = self._backoff_s[0]
        while not self._stop.wait(delay):
            try:
                stream = self._open()
            except Exception as exc:  # the device may still be gone: try again later
                log.info("camera %s: reconnect failed: %s", self.name, exc)
                with self._cond:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                delay = min(2.0 * delay, self._backoff_s[1])
                continue
            with self._cond:
                self._connected = True
                self._reconnects += 1
            log.warning("camera %s: reconnected (%d)", self.name, self._reconnects)
            return stream
        return None
