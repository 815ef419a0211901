"""The action -> target mapping and its safety invariant, and the pose math it rests on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from robot_rl.config import ActionConfig, SafetyBoxConfig
from robot_rl.hardware.interfaces import Pose
from robot_rl.hardware.pose import (
    matrix_to_quat,
    matrix_to_rpy,
    quat_angle,
    quat_multiply,
    quat_to_matrix,
    quat_to_rpy,
    rpy_to_matrix,
    rpy_to_quat,
)
from robot_rl.hardware.safety import (
    TargetMapper,
    box_limits,
    relative_to_world,
    sanitize_action,
    world_to_relative,
)

ACTION = ActionConfig()
BOX = SafetyBoxConfig()
STEP = np.array([ACTION.translation_scale_m] * 3 + [ACTION.rotation_scale_rad] * 3)
LOW, HIGH = box_limits(BOX)
EPS = 1e-12

# Any float at all, the hostile ones made likely.
hostile = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e300, 0.0, 1.0, -1.0]),
)
actions = arrays(np.float64, 6, elements=hostile)
# Measured poses, including far outside the box (contacts, a pushed arm).
measured_poses = arrays(np.float64, 6, elements=st.floats(-0.3, 0.3))


def mapper() -> TargetMapper:
    return TargetMapper(action=ACTION, box=BOX)


def test_sanitize_replaces_non_finite_and_clips() -> None:
    out = sanitize_action(np.array([np.nan, np.inf, -np.inf, 7.0, -0.5, -1e9]))
    np.testing.assert_array_equal(out, [0.0, 1.0, -1.0, 1.0, -0.5, -1.0])


def test_wrong_action_shape_is_refused() -> None:
    m = mapper()
    m.reset(np.zeros(6))
    with pytest.raises(ValueError, match="shape"):
        m.step(np.zeros(7), np.zeros(6))


def test_non_finite_measurement_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        mapper().reset(np.array([0, 0, np.nan, 0, 0, 0]))


def test_step_before_reset_is_refused() -> None:
    with pytest.raises(RuntimeError, match="reset"):
        mapper().step(np.zeros(6), np.zeros(6))


def test_reset_seeds_target_from_measured_pose_clipped_into_box() -> None:
    m = mapper()
    np.testing.assert_allclose(m.reset(np.full(6, 0.01)), np.full(6, 0.01))
    np.testing.assert_allclose(m.reset(np.full(6, 5.0)), HIGH)


def test_full_action_moves_target_by_one_step() -> None:
    m = mapper()
    m.reset(np.zeros(6))
    target = m.step(np.array([1.0, -1.0, 0.5, 1.0, -1.0, 0.0]), np.zeros(6))
    np.testing.assert_allclose(target, [0.015, -0.015, 0.0075, 0.02625, -0.02625, 0.0])


@settings(max_examples=300, deadline=None)
@given(
    start=measured_poses,
    steps=st.lists(st.tuples(actions, measured_poses), min_size=1, max_size=25),
)
def test_every_target_inside_box_and_at_most_one_step_from_the_last(start, steps) -> None:
    m = mapper()
    previous = m.reset(start)
    assert np.all(previous >= LOW) and np.all(previous <= HIGH)
    for action, measured in steps:
        target = m.step(action, measured)
        assert np.all(np.isfinite(target))
        assert np.all(target >= LOW) and np.all(target <= HIGH)
        assert np.all(np.abs(target - previous) <= STEP + EPS)
        previous = target


@settings(max_examples=100, deadline=None)
@given(measured=arrays(np.float64, 6, elements=st.floats(-0.02, 0.02)), direction=st.sampled_from([-1.0, 1.0]))
def test_blocked_arm_does_not_let_the_target_run_away(measured, direction) -> None:
    # The arm does not move (blocked by the board), the policy pushes on: the target stays near the arm.
    m = mapper()
    m.reset(measured)
    for _ in range(50):
        target = m.step(np.full(6, direction), measured)
    limit = np.array([ACTION.max_target_error_m] * 3 + [ACTION.max_target_error_rad] * 3)
    assert np.all(np.abs(target - measured) <= limit + EPS)


@settings(max_examples=200, deadline=None)
@given(
    offset=arrays(np.float64, 6, elements=st.floats(-0.2, 0.2)),
    ref_rpy=arrays(np.float64, 3, elements=st.floats(-3.0, 3.0)),
)
def test_relative_world_round_trip(offset, ref_rpy) -> None:
    reference = Pose(pos=np.array([0.5, 0.0, 0.15]), quat=rpy_to_quat(ref_rpy))
    world = relative_to_world(offset, reference)
    np.testing.assert_allclose(world_to_relative(world.pos, world.quat, reference), offset, atol=1e-9)


def test_relative_yaw_turns_about_the_vertical_for_a_tool_pointing_down() -> None:
    reference = Pose(pos=np.zeros(3), quat=np.array([0.0, 1.0, 0.0, 0.0]))  # tool z down
    world = relative_to_world(np.array([0, 0, 0, 0, 0, 0.3]), reference)
    tool_z = quat_to_matrix(world.quat)[:, 2]
    np.testing.assert_allclose(tool_z, [0, 0, -1], atol=1e-12)  # still pointing down
    assert quat_angle(world.quat, reference.quat) == pytest.approx(0.3)


@settings(max_examples=200, deadline=None)
@given(rpy=arrays(np.float64, 3, elements=st.floats(-1.5, 1.5)))
def test_rpy_matrix_quat_round_trips(rpy) -> None:
    rot = rpy_to_matrix(rpy)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(matrix_to_rpy(rot), rpy, atol=1e-9)
    np.testing.assert_allclose(quat_to_rpy(rpy_to_quat(rpy)), rpy, atol=1e-9)
    np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(rot)), rot, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(a=arrays(np.float64, 3, elements=st.floats(-3, 3)), b=arrays(np.float64, 3, elements=st.floats(-3, 3)))
def test_quaternion_product_matches_matrix_product(a, b) -> None:
    qa, qb = rpy_to_quat(a), rpy_to_quat(b)
    np.testing.assert_allclose(quat_to_matrix(quat_multiply(qa, qb)), rpy_to_matrix(a) @ rpy_to_matrix(b), atol=1e-12)


@pytest.mark.parametrize(
    ("width", "speed", "fragment"),
    [
        (0.09, 0.05, "gripper width 0.09 m is beyond the Franka Hand's maximum opening 0.08 m"),
        (80.0, 0.05, "a width in [0, 0.08] m would be accepted"),
        (0.04, 0.2, "gripper speed 0.2 m/s is above the Franka Hand's maximum 0.1 m/s"),
        (0.04, 0.5, "a speed in (0, 0.1] m/s would be accepted"),
        (-0.01, 0.05, "width must be >= 0"),
    ],
)
def test_gripper_commands_beyond_the_franka_hand_are_refused_before_franky(width, speed, fragment) -> None:
    pytest.importorskip("franky", reason="franky-control is not installed")
    from robot_rl.config import FrankaConfig, ImpedanceConfig
    from robot_rl.hardware.franka import FrankyRobot

    # Never connected (no server): the limits are checked before any franky call; a width and speed within them get
    # as far as the connection check.
    robot = FrankyRobot(FrankaConfig(host="127.0.1.7", gripper=True), impedance=ImpedanceConfig())
    with pytest.raises(ValueError) as err:
        robot.move_gripper(width, speed=speed)
    assert fragment in str(err.value)
    with pytest.raises(RuntimeError, match="not connected"):
        robot.move_gripper(0.08, speed=0.1)
