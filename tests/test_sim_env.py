"""Behaviour of the in-process MuJoCo peg-insertion twin: the env contract, the impedance law, the task, the expert."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from robot_rl.config import EnvConfig, ExpertConfig, ImpedanceConfig, SimTaskConfig
from robot_rl.hardware.safety import box_limits
from robot_rl.hardware.sim import ENV_ID, register_envs
from robot_rl.hardware.sim.expert import ScriptedExpert, evaluate_expert
from robot_rl.hardware.sim.peg import make_peg_insertion_env
from robot_rl.hardware.sim.robot import IKError, MujocoRobot
from robot_rl.hardware.sim.scene import build_scene

DOWN = np.array([0.0, 0.0, -1.0, 0.0, 0.0, 0.0], dtype=np.float32)


@pytest.fixture(scope="module")
def env():
    return make_peg_insertion_env()


def rollout(env, seed: int, steps: int, action_seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(action_seed)
    obs, _ = env.reset(seed=seed)
    poses = [obs["ee_pose"]]
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(-1, 1, 6).astype(np.float32))
        poses.append(obs["ee_pose"])
    return np.stack(poses)


def test_passes_gymnasium_env_checker() -> None:
    check_env(make_peg_insertion_env(), skip_render_check=True)


def test_registered_id_makes_the_env_and_registration_is_idempotent() -> None:
    register_envs()
    register_envs()
    made = gym.make(ENV_ID, task={"max_episode_steps": 7})
    try:
        assert made.unwrapped.config.task.max_episode_steps == 7
        obs, _ = made.reset(seed=1)
        assert made.observation_space.contains(obs)
    finally:
        made.close()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="clearance_m"):
        make_peg_insertion_env({"task": {"clearance_m": -1.0}})
    assert make_peg_insertion_env(EnvConfig(task=SimTaskConfig(clearance_m=0.0005))).task.scene.hole_half_width_m == (
        pytest.approx(0.0105)
    )


def test_same_seed_same_trajectory_even_after_other_episodes(env) -> None:
    first = rollout(env, seed=3, steps=15)
    rollout(env, seed=4, steps=5)  # disturb the physics state in between
    np.testing.assert_array_equal(rollout(env, seed=3, steps=15), first)


def test_different_seeds_give_different_resets_within_the_reset_range(env) -> None:
    resets = np.stack([env.reset(seed=s)[0]["ee_pose"] for s in range(8)])
    assert len({tuple(r) for r in resets}) == 8
    task = env.config.task
    ranges = np.array([task.reset_xyz_range_m] * 3 + [task.reset_rpy_range_rad] * 3)
    assert np.all(np.abs(resets) <= ranges + 1e-4)


def test_first_target_is_the_measured_pose(env) -> None:
    obs, info = env.reset(seed=5)
    np.testing.assert_allclose(info["target"], obs["ee_pose"], atol=1e-6)


def test_hostile_actions_keep_the_target_in_the_box_and_one_step_away(env) -> None:
    low, high = box_limits(env.config.safety)
    step = env.mapper.step_size
    _, info = env.reset(seed=6)
    previous = info["target"]
    for action in ([np.nan] * 6, [np.inf] * 6, [-np.inf] * 6, [1e30, -1e30, np.nan, np.inf, -5, 5]):
        obs, _, _, _, info = env.step(np.array(action, dtype=np.float32))
        target = info["target"]
        assert np.all(target >= low) and np.all(target <= high)
        assert np.all(np.abs(target - previous) <= step + 1e-12)
        assert np.all(np.isfinite(info["command"]))
        assert env.observation_space.contains(obs)
        previous = target


def test_impedance_tracks_a_fixed_target_in_free_space() -> None:
    scene = build_scene(SimTaskConfig())
    robot = MujocoRobot(scene, impedance=ImpedanceConfig())
    target = scene.reference.pos + np.array([0.02, -0.015, 0.02])
    with robot:
        robot.command(target, scene.reference.quat)
        robot.advance(1.0)
        state = robot.state()
    assert np.linalg.norm(state.ee_pos - target) < 0.003  # friction leaves well under a millimetre in practice
    assert state.time == pytest.approx(1.0)
    # Orientation held too: the angle between measured and target orientation is tiny.
    assert abs(abs(float(np.dot(state.ee_quat, scene.reference.quat))) - 1.0) < 1e-4


def test_unreachable_pose_is_refused() -> None:
    robot = MujocoRobot(build_scene(SimTaskConfig()), impedance=ImpedanceConfig())
    with pytest.raises(IKError):
        robot.move_to(np.array([2.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.0, 0.0]))


def test_peg_pushing_on_the_board_is_held_back_and_is_no_success(env) -> None:
    # Start 2 cm beside the hole, 5 mm above the board, and push down for 3 s.
    height = env.config.task.reference_height_m
    obs, _ = env.reset(seed=0, options={"offset": [0.02, 0.0, 0.005 - height, 0.0, 0.0, 0.0]})
    max_error = env.config.action.max_target_error_m
    for _ in range(30):
        measured_z = float(obs["ee_pose"][2])  # what the target was computed from
        obs, reward, terminated, _, info = env.step(DOWN)
        assert info["target"][2] >= measured_z - max_error - 1e-6  # the target does not run away
        assert not terminated and reward == 0.0
        assert info["insertion_depth_m"] == 0.0
    assert obs["ee_pose"][2] > -height - 0.001  # the board held the peg (less than 1 mm of sinking)


def test_insertion_terminates_with_reward_one(env) -> None:
    env.reset(seed=0, options={"offset": np.zeros(6)})
    for _ in range(40):
        _, reward, terminated, truncated, info = env.step(0.3 * DOWN)
        if terminated or truncated:
            break
    assert terminated and not truncated
    assert reward == 1.0 and info["is_success"]
    assert info["insertion_depth_m"] >= env.config.task.success_depth_m


def test_step_limit_truncates_without_terminating() -> None:
    env = make_peg_insertion_env(task={"max_episode_steps": 5})
    env.reset(seed=0)
    for step in range(1, 6):
        _, reward, terminated, truncated, _ = env.step(np.zeros(6, dtype=np.float32))
        assert not terminated and reward == 0.0
        assert truncated == (step == 5)


def test_clean_expert_succeeds(env) -> None:
    expert = ScriptedExpert(env, ExpertConfig(action_noise=0.0, perceived_offset_std_m=0.0), np.random.default_rng(0))
    successes = 0
    for episode in range(20):
        obs, _ = env.reset(seed=100 + episode)
        expert.reset()
        for _ in range(env.config.task.max_episode_steps):
            action = expert.act(obs)
            assert action.dtype == np.float32 and np.all(np.abs(action) <= 1.0)
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
        successes += int(terminated)
    assert successes >= 19


@pytest.mark.slow
def test_default_expert_succeeds_most_but_not_all_of_the_time(env) -> None:
    stats = evaluate_expert(env, ExpertConfig(), episodes=100, seed=1)
    assert 0.5 <= stats.success_rate <= 0.95


@pytest.mark.parametrize("deltas", [1, 3])
def test_reset_offset_is_a_sum_of_random_deltas_within_the_range(deltas: int) -> None:
    env = make_peg_insertion_env(task={"reset_deltas": deltas})
    try:
        env.reset(seed=0)
        task = env.unwrapped.config.task
        ranges = np.array([task.reset_xyz_range_m] * 3 + [task.reset_rpy_range_rad] * 3)
        offsets = np.stack([env.unwrapped._reset_offset(None) for _ in range(4000)])
        low, high = box_limits(env.unwrapped.config.safety)
        assert np.all(np.abs(offsets) <= ranges + 1e-12) and np.all(offsets >= low) and np.all(offsets <= high)
        # Uniform within ±r has std r/sqrt(3); the sum of three uniform deltas within ±r/3 has std r/3.
        expected = ranges / np.sqrt(3) if deltas == 1 else ranges / 3
        np.testing.assert_allclose(offsets.std(axis=0), expected, rtol=0.08)
    finally:
        env.close()
