"""SimCamera renders the twin's "front" and "wrist" cameras offscreen through the Camera interface."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from robot_rl.config import CameraConfig, CropConfig, SimTaskConfig
from robot_rl.hardware.camera import Camera, CameraError
from robot_rl.hardware.sim.cameras import GLBackendError, SimCamera, render_size_for_speed, select_gl_backend
from robot_rl.hardware.sim.scene import build_scene

try:
    GL_BACKEND = select_gl_backend()
except GLBackendError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no OpenGL backend renders offscreen here: {exc}", allow_module_level=True)

# A small raw frame keeps each render ~1-3 ms; the crop box sits inside it like the real 848x480 -> 480x480 one.
SMALL = {"width": 160, "height": 96, "crop": CropConfig(x=32, y=0, width=96, height=96)}


@pytest.fixture(scope="module")
def scene():
    return build_scene(SimTaskConfig())


@pytest.fixture
def data(scene):
    d = mujoco.MjData(scene.model)
    d.qpos[:7] = scene.seed_q
    mujoco.mj_forward(scene.model, d)
    return d


def camera(scene, data, name: str, **fields) -> SimCamera:
    return SimCamera(scene.model, data, cfg=CameraConfig(name=name, **{**SMALL, **fields}))


def test_both_cameras_render_distinct_non_blank_images(scene, data):
    images = {}
    for name in ("front", "wrist"):
        with camera(scene, data, name) as cam:
            assert isinstance(cam, Camera)
            frame = cam.read()
            raw = cam.read_raw()
        assert frame.image.shape == (84, 84, 3) and frame.image.dtype == np.uint8
        assert raw.image.shape == (96, 160, 3) and raw.image.dtype == np.uint8
        assert frame.image.std() > 5, f"{name} image is (nearly) constant"
        assert not frame.image.flags.writeable
        images[name] = frame.image.astype(np.int16)
    assert np.abs(images["front"] - images["wrist"]).mean() > 5


def test_default_size_renders_and_preprocesses(scene, data):
    with SimCamera(scene.model, data, cfg=CameraConfig(name="front")) as cam:
        assert cam.read_raw().image.shape == (480, 848, 3)
        assert cam.read().image.shape == (84, 84, 3)


def test_moving_the_arm_changes_the_wrist_image(scene, data):
    with camera(scene, data, "wrist") as cam:
        before = cam.read().image.astype(np.int16)
        data.qpos[:7] = scene.seed_q + np.array([0.4, -0.2, 0.0, 0.3, 0.0, -0.3, 0.5])
        mujoco.mj_forward(scene.model, data)
        after = cam.read().image.astype(np.int16)
    assert np.abs(after - before).mean() > 3


def test_frame_numbers_increase_and_timestamp_is_sim_time(scene, data):
    ticks = iter(range(100))
    with SimCamera(scene.model, data, cfg=CameraConfig(name="front", **SMALL), clock=lambda: float(next(ticks))) as cam:
        data.time = 1.25
        first = cam.read()
        second = cam.read_raw()
        third = cam.read()
    assert [first.frame_number, second.frame_number, third.frame_number] == [1, 2, 3]
    assert first.timestamp_s == 1.25
    assert first.received_s < second.received_s < third.received_s


def test_closed_camera_refuses_to_read(scene, data):
    cam = camera(scene, data, "front")
    cam.close()
    cam.close()  # idempotent
    with pytest.raises(CameraError, match="closed"):
        cam.read()
    with pytest.raises(CameraError, match="closed"):
        cam.read_raw()


def test_unknown_camera_name_is_refused(scene, data):
    with pytest.raises(CameraError, match="no camera of that name"):
        camera(scene, data, "ceiling")


def test_render_size_for_speed_keeps_the_crop_inside():
    cfg = render_size_for_speed(CameraConfig(name="front"))
    assert cfg.crop.width == cfg.crop.height == 168
    assert cfg.crop.x + cfg.crop.width <= cfg.width and cfg.crop.y + cfg.crop.height <= cfg.height
    small = CameraConfig(name="front", **SMALL)
    assert render_size_for_speed(small) == small  # never scales up
