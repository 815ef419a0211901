"""RobotEnv with cameras: the image observations of configs/sim_peg_image.yaml, their contract and their failures."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from robot_rl.actor.cameras import EnvFrameCamera, open_cameras, read_cameras
from robot_rl.config import CameraConfig, CropConfig, EnvConfig, ExpertConfig, load_config
from robot_rl.episodes import Episode, EpisodeWriter, read_episodes
from robot_rl.hardware.camera import Camera, CameraError, Frame, StaleFrameError
from robot_rl.hardware.env import RobotEnv
from robot_rl.hardware.sim.cameras import GLBackendError, SimCamera, select_gl_backend
from robot_rl.hardware.sim.expert import ScriptedExpert
from robot_rl.hardware.sim.peg import PegInsertionTask, make_peg_insertion_env
from robot_rl.hardware.sim.robot import MujocoRobot
from robot_rl.hardware.sim.scene import build_scene
from robot_rl.wire import transition_spec, transition_spec_from_space

try:
    select_gl_backend()
except GLBackendError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no OpenGL backend renders offscreen here: {exc}", allow_module_level=True)

IMAGE_CONFIG = load_config(Path(__file__).parent.parent / "configs" / "sim_peg_image.yaml")
RIGHT = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)


@pytest.fixture(scope="module")
def env():
    made = make_peg_insertion_env(IMAGE_CONFIG.env)
    yield made
    made.close()


def rollout(env: RobotEnv, seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(-1, 1, 6).astype(np.float32))
        seen.append(obs)
    return seen


def test_observations_have_the_wire_layout(env) -> None:
    assert transition_spec_from_space(env.observation_space, env.action_space) == transition_spec(IMAGE_CONFIG)
    assert all(isinstance(c, SimCamera) for c in env.cameras)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"ee_pose", "front", "wrist"}
    assert obs["ee_pose"].shape == (6,) and obs["ee_pose"].dtype == np.float32
    for name in ("front", "wrist"):
        assert obs[name].shape == (84, 84, 3) and obs[name].dtype == np.uint8
        assert obs[name].std() > 5, f"{name} is (nearly) constant"
    assert env.observation_space.contains(obs)
    step_obs, *_ = env.step(np.zeros(6, np.float32))
    assert env.observation_space.contains(step_obs)
    assert not np.array_equal(obs["front"], obs["wrist"])


def test_passes_gymnasium_env_checker() -> None:
    made = make_peg_insertion_env(IMAGE_CONFIG.env)
    try:
        check_env(made, skip_render_check=True)  # includes: the same seed resets to the same observation
    finally:
        made.close()


def test_images_are_taken_after_the_wait_of_each_step(env) -> None:
    env.reset(seed=1)
    before = {name: frame.frame_number for name, frame in env.last_frames.items()}
    env.step(RIGHT)
    sim_time = env.robot.state().time
    for name, frame in env.last_frames.items():
        assert frame.frame_number == before[name] + 1  # one new frame per step, none skipped
        assert frame.timestamp_s == pytest.approx(sim_time)  # rendered after the physics of this step


def test_the_wrist_image_changes_when_the_arm_moves(env) -> None:
    obs, _ = env.reset(options={"offset": np.zeros(6)})
    start = obs["wrist"].astype(np.int16)
    for _ in range(4):
        obs, *_ = env.step(RIGHT)
    assert obs["ee_pose"][0] > 0.03  # the arm moved 4 cm along x
    assert np.abs(obs["wrist"].astype(np.int16) - start).mean() > 3


def test_same_seed_gives_identical_images_even_after_other_episodes(env) -> None:
    first = rollout(env, seed=5, steps=6)
    rollout(env, seed=6, steps=3)
    again = rollout(env, seed=5, steps=6)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_without_cameras_the_state_env_is_unchanged_and_rendering_moves_nothing(env) -> None:
    state = make_peg_insertion_env()
    assert list(state.observation_space.spaces) == ["ee_pose"] and state.cameras == ()
    plain, imaged = rollout(state, seed=3, steps=8), rollout(env, seed=3, steps=8)
    assert all(set(o) == {"ee_pose"} for o in plain)
    for p, i in zip(plain, imaged, strict=True):
        np.testing.assert_array_equal(p["ee_pose"], i["ee_pose"])  # bit for bit: the renders touch no physics
    state.close()


# -- failures --------------------------------------------------------------------------------------------------------
class FakeCamera:
    """A Camera that delivers a fixed image, or raises / misbehaves on demand."""

    def __init__(self, name: str, size: int = 8) -> None:
        self.name = name
        self.image = np.full((size, size, 3), 7, np.uint8)
        self.error: BaseException | None = None
        self.close_error: BaseException | None = None
        self.reads = 0
        self.closed = 0

    def read(self) -> Frame:
        if self.error is not None:
            raise self.error
        self.reads += 1
        return Frame(image=self.image, timestamp_s=0.1 * self.reads, frame_number=self.reads, received_s=0.0)

    read_raw = read

    def close(self) -> None:
        self.closed += 1
        if self.close_error is not None:
            raise self.close_error

    def __enter__(self) -> FakeCamera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fake_env(*names: str, size: int = 8) -> tuple[RobotEnv, list[FakeCamera]]:
    cameras = [FakeCamera(n, size) for n in names]
    crop = CropConfig(x=0, y=0, width=16, height=16)
    cfg = EnvConfig(cameras=[CameraConfig(name=n, width=16, height=16, crop=crop, out_size=size) for n in names])
    scene = build_scene(cfg.task)
    robot = MujocoRobot(scene, impedance=cfg.impedance)
    env = RobotEnv(robot=robot, task=PegInsertionTask(scene), config=cfg, wait=robot.advance, cameras=cameras)
    return env, cameras


def test_a_camera_error_surfaces_from_step_and_reset_and_leaves_no_frame_behind() -> None:
    env, (front,) = fake_env("front")
    assert isinstance(front, Camera)
    env.reset(seed=0)
    front.error = StaleFrameError("camera front: frame 0.5 s old", age_s=0.5, limit_s=0.2)
    with pytest.raises(StaleFrameError, match="front"):
        env.step(np.zeros(6, np.float32))
    assert env.last_frames == {}  # nothing stale for a logger to pick up
    with pytest.raises(StaleFrameError):
        env.reset(seed=1)
    front.error = OSError("USB reset")
    with pytest.raises(CameraError, match="camera front: read failed: OSError: USB reset") as info:
        env.reset(seed=1)
    assert isinstance(info.value.__cause__, OSError)
    front.error = None
    obs, _ = env.reset(seed=1)
    assert obs["front"].shape == (8, 8, 3)


@pytest.mark.parametrize(
    "image", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8), np.uint8)]
)
def test_an_image_of_the_wrong_layout_is_refused(image: np.ndarray) -> None:
    env, (front,) = fake_env("front")
    front.image = image
    with pytest.raises(CameraError, match=r"camera front: delivered .*, expected uint8\[8, 8, 3\]"):
        env.reset(seed=0)


def test_camera_names_that_collide_are_refused() -> None:
    with pytest.raises(ValueError, match="'ee_pose' collides with the state observation"):
        make_peg_insertion_env(cameras=[{"name": "ee_pose"}])
    with pytest.raises(ValueError, match=r"\['front'\] appear more than once"):
        make_peg_insertion_env(cameras=[{"name": "front"}, {"name": "front"}])


def test_cameras_must_match_the_config() -> None:
    cfg = EnvConfig(cameras=[CameraConfig(name="front")])
    scene = build_scene(cfg.task)
    robot = MujocoRobot(scene, impedance=cfg.impedance)
    for given in ([], [FakeCamera("wrist")], [FakeCamera("front"), FakeCamera("wrist")]):
        with pytest.raises(ValueError, match="same names, same order"):
            RobotEnv(robot=robot, task=PegInsertionTask(scene), config=cfg, wait=robot.advance, cameras=given)


def test_close_closes_every_camera_once_and_raises_the_first_failure() -> None:
    env, (front, wrist) = fake_env("front", "wrist")
    front.close_error = RuntimeError("front would not close")
    with pytest.raises(RuntimeError, match="front would not close"):
        env.close()
    assert (front.closed, wrist.closed) == (1, 1)
    env.close()  # idempotent: the env no longer holds them
    assert (front.closed, wrist.closed) == (1, 1)


def test_franky_env_refuses_a_camera_it_cannot_open_before_starting_anything() -> None:
    from robot_rl.hardware.franka.env import make_franky_env

    cfg = EnvConfig(robot="franky", franka={"host": "127.0.1.250", "sim_server": True}, cameras=[{"name": "front"}])
    start = time.monotonic()
    with pytest.raises(CameraError, match=r"camera front: env\.robot=franky renders no cameras"):
        make_franky_env(cfg)
    assert time.monotonic() - start < 1.0  # no server was started (that takes ~2 s)


# -- the actor, the expert and the episode files ---------------------------------------------------------------------
def test_the_actor_reads_the_env_frames_without_rendering_again(env) -> None:
    views = open_cameras(IMAGE_CONFIG.env, env)
    assert [type(v) for v in views] == [EnvFrameCamera, EnvFrameCamera]
    obs, *_ = env.step(np.zeros(6, np.float32))
    rendered = [c.frames_rendered for c in env.cameras]
    extras = read_cameras(views)
    assert [c.frames_rendered for c in env.cameras] == rendered  # no second render
    for name in ("front", "wrist"):
        np.testing.assert_array_equal(extras[f"cam_{name}_image"], obs[name])
        assert extras[f"cam_{name}_frame_number"] == env.last_frames[name].frame_number
    for view in views:
        view.close()
    assert env.cameras[0].read().image.shape == (84, 84, 3)  # closing a view leaves the env's camera open


def test_the_scripted_expert_succeeds_in_the_image_env(env) -> None:
    expert = ScriptedExpert(env, ExpertConfig(action_noise=0.0, perceived_offset_std_m=0.0), np.random.default_rng(0))
    obs, _ = env.reset(seed=2)
    expert.reset()
    for _ in range(env.config.task.max_episode_steps):
        obs, _, terminated, truncated, _ = env.step(expert.act(obs))
        if terminated or truncated:
            break
    assert terminated


def test_image_observations_are_written_and_read_back_as_uint8(env, tmp_path: Path) -> None:
    seen = rollout(env, seed=4, steps=3)
    keys = ("ee_pose", "front", "wrist")
    path = tmp_path / "images.hdf5"
    with EpisodeWriter(path, {"env": "robot_rl/PegInsertionSim-v0"}) as writer:
        writer.add_episode(
            Episode(
                obs={k: np.stack([o[k] for o in seen[:-1]]) for k in keys},
                next_obs={k: np.stack([o[k] for o in seen[1:]]) for k in keys},
                actions=np.zeros((3, 6), np.float32),
                rewards=np.zeros(3, np.float32),
                terminated=np.zeros(3, bool),
                truncated=np.array([False, False, True]),
            )
        )
        stream = writer.begin_episode()
        for before, after in itertools.pairwise(seen):
            stream.append(obs=before, action=np.zeros(6, np.float32), reward=0.0, terminated=False,
                          truncated=after is seen[-1], next_obs=after)  # fmt: skip
        stream.end()
    for episode in read_episodes(path):
        for k in ("front", "wrist"):
            assert episode.obs[k].dtype == np.uint8 and episode.obs[k].shape == (3, 84, 84, 3)
            np.testing.assert_array_equal(episode.obs[k], np.stack([o[k] for o in seen[:-1]]))
            np.testing.assert_array_equal(episode.next_obs[k][-1], seen[-1][k])
        assert episode.obs["ee_pose"].dtype == np.float32


def test_a_recorded_realsense_stream_feeds_the_env_and_its_end_surfaces(tmp_path: Path) -> None:
    pytest.importorskip("pyrealsense2", reason="pyrealsense2 cannot be imported (needs libusb-1.0-0)")
    from robot_rl.hardware.realsense.camera import RealSenseCamera
    from robot_rl.hardware.realsense.recording import write_recording

    frames = [np.full((48, 64, 3), 40 * (i + 1), np.uint8) for i in range(3)]
    path = write_recording(tmp_path / "front.db3", frames, fps=30, width=64, height=48)
    crop = {"x": 8, "y": 0, "width": 48, "height": 48}
    made = make_peg_insertion_env(
        cameras=[{"name": "front", "recording": str(path), "width": 64, "height": 48, "crop": crop, "freshness_s": 5}]
    )
    try:
        (camera,) = made.cameras
        assert isinstance(camera, RealSenseCamera)
        deadline = time.monotonic() + 10
        while not camera.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        obs, _ = made.reset(seed=0)
        np.testing.assert_array_equal(obs["front"], np.full((84, 84, 3), 120, np.uint8))  # the last frame, resized
        with pytest.raises(CameraError, match="ended"):
            made.step(np.zeros(6, np.float32))
    finally:
        made.close()
