"""`robot-rl cameras`: serial listing, and measuring an SDK recording through RealSenseCamera with crop previews."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pyrealsense2", reason="pyrealsense2 cannot be imported (needs libusb-1.0-0)")

from robot_rl import cameras_cmd
from robot_rl.cli import main
from robot_rl.hardware.realsense.recording import write_recording

W, H = 848, 480


def frames(n: int, width: int = W, height: int = H) -> list[np.ndarray]:
    x = np.arange(width, dtype=np.uint16)
    y = np.arange(height, dtype=np.uint16)
    out = []
    for i in range(n):
        image = np.empty((height, width, 3), np.uint8)
        image[..., 0] = (x // 4 % 256)[None, :]
        image[..., 1] = (y // 2 % 256)[:, None]
        image[..., 2] = i * 20
        out.append(image)
    return out


@pytest.fixture(autouse=True)
def no_connected_cameras(monkeypatch):
    """The machine running the tests may or may not have a RealSense; the tests assume none."""
    import robot_rl.hardware.realsense.camera as rs_camera

    monkeypatch.setattr(rs_camera, "list_serials", lambda: [])


def test_recording_is_measured_and_previewed(tmp_path: Path, capsys):
    rec = write_recording(tmp_path / "rec.db3", frames(10), fps=30, width=W, height=H)
    out = tmp_path / "previews"
    assert main(["cameras", "--recording", str(rec), "--out", str(out), "--frames", "5"]) == 0
    text = capsys.readouterr().out
    assert "no RealSense camera connected" in text
    assert "recording" in text and "fps" in text and "p99" in text
    png = out / "recording.png"
    image = cv2.imread(str(png))
    assert image is not None
    assert image.shape[0] == H and image.shape[1] > W  # raw frame and the 84x84 result side by side
    # The crop box is drawn in green (BGR) on the raw frame, at the default crop's left edge (x=184).
    assert tuple(image[240, 184]) == (0, 255, 0)


def test_a_policy_image_taller_than_the_raw_frame_is_previewed_whole():
    """A small recording's frame (80x60) beside an 84x84 policy image: the canvas is as tall as the taller one."""
    raw = frames(1, 80, 60)[0]
    processed = np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    crop = cameras_cmd.CropConfig(x=10, y=0, width=60, height=60)
    image = cameras_cmd.preview_image(raw, processed, crop)
    assert image.shape == (84, 80 + 4 + 84, 3)
    np.testing.assert_array_equal(image[:, 84:], processed[..., ::-1])  # every row of the policy image, as BGR
    np.testing.assert_array_equal(image[5, 20], raw[5, 20, ::-1])  # the raw frame inside the crop box
    assert tuple(image[30, 10]) == (0, 255, 0) and not image[61:, :80].any()  # the box (2 px); black below the frame


def test_measurements(tmp_path: Path):
    rec = write_recording(tmp_path / "rec.db3", frames(10), fps=30, width=W, height=H)
    report = cameras_cmd.run_cameras(None, [], rec, tmp_path / "out", 5)
    (cam,) = report["cameras"]
    assert cam["frames"] == 5 and cam["size"] == f"{W}x{H}"
    assert 10 < cam["fps_measured"] < 90  # paced at the recorded 30 fps
    assert 0 <= cam["latency_p50_ms"] <= cam["latency_p99_ms"] < 200
    # A camera whose frame numbers do not advance: frames are told apart by their arrival, not their number.
    still = write_recording(tmp_path / "still.db3", frames(10), fps=30, width=W, height=H, number_step=0)
    (cam,) = cameras_cmd.run_cameras(None, [], still, tmp_path / "out2", 100)["cameras"]
    assert cam["frames"] >= 8 and cam["recording_ended"] and 10 < cam["fps_measured"] < 90


def test_small_recording_gets_a_centred_square_crop(tmp_path: Path):
    rec = write_recording(tmp_path / "small.db3", frames(4, 320, 240), fps=30, width=320, height=240)
    cfg = cameras_cmd.recording_camera_config(rec)
    assert (cfg.width, cfg.height) == (320, 240)
    assert (cfg.crop.x, cfg.crop.y, cfg.crop.width, cfg.crop.height) == (40, 0, 240, 240)
    report = cameras_cmd.run_cameras(None, [], rec, tmp_path / "out", 10)  # more frames than recorded
    (cam,) = report["cameras"]
    assert cam["frames"] == 4 and cam["recording_ended"]


def test_a_recording_no_camera_config_allows_exits_2_naming_it(tmp_path: Path, capsys):
    rec = write_recording(tmp_path / "tiny.db3", frames(2, 12, 8), fps=30, width=12, height=8)
    assert main(["cameras", "--recording", str(rec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tiny.db3 (12x8 at 30 fps) is outside what a camera config allows" in err and "Traceback" not in err


def test_missing_recording_exits_2_naming_the_file(tmp_path: Path, capsys):
    missing = tmp_path / "nope.db3"
    assert main(["cameras", "--recording", str(missing), "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bad_recording_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.db3"
    bad.write_bytes(b"not a recording")
    assert main(["cameras", "--recording", str(bad), "--out", str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_no_arguments_and_no_cameras_lists_none(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cameras"]) == 0
    assert "no RealSense camera connected" in capsys.readouterr().out
    assert not (tmp_path / "cameras").exists()  # nothing read, nothing written


def test_an_out_that_is_a_file_is_refused_before_any_frame_is_read(tmp_path: Path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    for out in (blocker, blocker / "sub"):
        assert main(["cameras", "--recording", str(tmp_path / "whatever.db3"), "--out", str(out)]) == 2
        assert f"{blocker} is a file, not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep"


def test_a_configured_serial_that_is_not_connected_is_named(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["cameras", "--set", 'env.cameras=[{name: front, serial: "123456"}]']
    assert main(args) == 2
    assert "camera front (serial 123456) not connected; connected RealSense serials: none" in capsys.readouterr().err


def test_a_recording_is_previewed_through_the_configured_cameras_crop_and_size(tmp_path: Path, capsys):
    """Checking a configured crop on a recording: the preview uses the config's cameras, not the default crop."""
    rec = write_recording(tmp_path / "rec.db3", frames(6), fps=30, width=W, height=H)
    image_config = Path(__file__).resolve().parents[1] / "configs" / "sim_peg_image.yaml"
    cameras = (
        "env.cameras=[{name: front, out_size: 64, crop: {x: 0, y: 0, width: 400, height: 400}}, "
        "{name: wrist, out_size: 32}]"
    )
    out = tmp_path / "previews"
    args = ["cameras", "--config", str(image_config), "--set", cameras, "--recording", str(rec), "--out", str(out)]
    assert main([*args, "--frames", "3"]) == 0
    front, wrist = (cv2.imread(str(out / f"{name}.png")) for name in ("front", "wrist"))
    assert front.shape[1] == W + 4 + 64 and wrist.shape[1] == W + 4 + 32  # raw frame, margin, the configured size
    assert tuple(front[200, 0]) == (0, 255, 0)  # the configured crop's left edge, x=0
    # A configured crop that does not fit the recording is named, not clipped silently.
    small = write_recording(tmp_path / "small.db3", frames(4, 320, 240), fps=30, width=320, height=240)
    capsys.readouterr()
    assert main([*args[:5], "--recording", str(small), "--out", str(out)]) == 2  # front's 400x400 crop
    assert "camera front of the config does not fit recording" in capsys.readouterr().err
