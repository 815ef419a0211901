"""The safety invariant at the robot's door, for every action source (DESIGN §7).

A recording wrapper sits between `RobotEnv` and the arm and keeps every pose that reaches `command` or `move_to`.
Whatever the source produces (raw `env.step`, the BC policy, the Q-gated agent, the scripted expert), with any
float (NaN, +-inf, 1e308, subnormals) and any numeric dtype, each command must be finite, inside the safety box and
at most one scaled action per axis from the previous target; an action of the wrong shape must raise before anything
reaches the robot. Resets with hostile offsets must place the arm inside the box or be refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from robot_rl.agent import GateDecision, Q2RLAgent
from robot_rl.bc import make_bc_policy
from robot_rl.config import EnvConfig, ExpertConfig, RunConfig, load_config
from robot_rl.envs import make_env
from robot_rl.hardware.env import RobotEnv
from robot_rl.hardware.interfaces import RobotState
from robot_rl.hardware.pose import matrix_to_quat, quat_to_matrix, rpy_to_matrix
from robot_rl.hardware.safety import box_limits, world_to_relative
from robot_rl.hardware.sim.expert import ScriptedExpert
from robot_rl.obs import spec_from_space, state_bounds
from robot_rl.rollout import StepChoice, bc_policy_fn, gated_policy_fn, run_episode

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ci_tiny.yaml"
FRANKY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "franky_sim_peg.yaml"
EPISODE_STEPS = 12  # short episodes: the box (±5 cm, ±5° roll/pitch) is still reached within them
# Tolerances of the box and step checks: the command goes through world coordinates and back (rounding ~1e-15).
TOL_M = 1e-9
TOL_RAD = 1e-9
TOL = np.array([TOL_M] * 3 + [TOL_RAD] * 3)
UNIT_QUAT_TOL = 1e-9
EXAMPLES = 25

# clip_action casts to float32 first: 1e308 overflows to inf (then clipped to 1), which numpy warns about.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# Any float at all, with the hostile ones made likely.
EXTREMES = [np.nan, np.inf, -np.inf, 1e308, -1e308, 5e-324, -0.0, 1.0, -1.0, 1.0000001, 0.5]
hostile_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(EXTREMES))
# One action as any source might hand it over: any numeric dtype, or a plain list.
hostile_action = st.one_of(
    arrays(np.float64, 6, elements=hostile_float),
    arrays(np.float32, 6, elements=st.floats(width=32)),
    arrays(np.float16, 6, elements=st.floats(width=16)),
    arrays(st.sampled_from([np.int8, np.int64, np.uint8, np.uint64]), 6),
    arrays(np.bool_, 6),
    st.lists(hostile_float, min_size=6, max_size=6),
)
# Shapes that are not (6,): a bug in the source, refused with a message, never reaching the robot.
WRONG_SHAPES = [(), (0,), (1,), (5,), (7,), (12,), (1, 6), (6, 1), (2, 3)]
wrong_shape_action = st.builds(
    lambda shape, fill: np.full(shape, fill), st.sampled_from(WRONG_SHAPES), st.sampled_from([0.0, np.nan, 1e9])
)
# Hostile values as a torch network would return them, [1, 6] like a batch of one. (Not bfloat16: numpy has no such
# dtype and bc_policy_fn raises TypeError on it; a refusal, nothing reaches the robot.)
TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.int32]
hostile_tensor = st.builds(
    lambda values, dtype: torch.as_tensor(np.asarray(values, np.float64))[None].to(dtype),
    arrays(np.float64, 6, elements=hostile_float),
    st.sampled_from(TORCH_DTYPES),
)


class RecordingRobot:
    """Wraps a Robot; keeps a copy of every pose handed to `command` and `move_to` before passing it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.commands: list[tuple[np.ndarray, np.ndarray]] = []
        self.moves: list[tuple[np.ndarray, np.ndarray]] = []

    def command(self, target_pos: np.ndarray, target_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.commands.append((np.array(target_pos, dtype=np.float64), np.array(target_quat, dtype=np.float64)))
        return self.inner.command(target_pos, target_quat)

    def move_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        self.moves.append((np.array(pos, dtype=np.float64), np.array(quat, dtype=np.float64)))
        self.inner.move_to(pos, quat)

    def clear(self) -> None:
        self.commands.clear()
        self.moves.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> RecordingRobot:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


def ci_config() -> RunConfig:
    return load_config(CONFIG, [f"env.task.max_episode_steps={EPISODE_STEPS}"])


def recorded_env(cfg: EnvConfig) -> tuple[RobotEnv, RecordingRobot]:
    env = make_env(cfg)
    assert isinstance(env, RobotEnv)
    recorder = RecordingRobot(env.robot)
    env.robot = recorder
    return env, recorder


@pytest.fixture(scope="module")
def run_cfg() -> RunConfig:
    return ci_config()


@pytest.fixture(scope="module")
def sim(run_cfg: RunConfig) -> tuple[RobotEnv, RecordingRobot]:
    return recorded_env(run_cfg.env)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------------
# The check every test applies
# ----------------------------------------------------------------------------------------------------------------------
def relative_pose(env: RobotEnv, pos: np.ndarray, quat: np.ndarray) -> np.ndarray:
    """A world pose that reached the robot, as the box sees it; asserts it is a finite pose first."""
    assert pos.shape == (3,) and quat.shape == (4,), (pos, quat)
    assert np.all(np.isfinite(pos)) and np.all(np.isfinite(quat)), (pos, quat)
    assert abs(float(np.linalg.norm(quat)) - 1.0) <= UNIT_QUAT_TOL, quat
    return world_to_relative(pos, quat, env.reference)


def assert_in_box(env: RobotEnv, relative: np.ndarray) -> None:
    low, high = box_limits(env.config.safety)
    assert np.all(relative >= low - TOL) and np.all(relative <= high + TOL), (relative, low, high)


def start_target(env: RobotEnv) -> np.ndarray:
    """The target the first step moves from: the measured pose after the reset, clipped into the box."""
    state = env.robot.state()
    low, high = box_limits(env.config.safety)
    return np.clip(world_to_relative(state.ee_pos, state.ee_quat, env.reference), low, high)


def assert_commands_safe(env: RobotEnv, commands: list[tuple[np.ndarray, np.ndarray]], start: np.ndarray) -> None:
    """Every command: finite, in the box, and at most one scaled action per axis from the one before."""
    step = env.mapper.step_size
    np.testing.assert_allclose(step, [0.015] * 3 + [0.02625] * 3)  # the config's scale, as DESIGN §7 states
    previous = start
    for i, (pos, quat) in enumerate(commands):
        relative = relative_pose(env, pos, quat)
        assert_in_box(env, relative)
        assert np.all(np.abs(relative - previous) <= step + TOL), (i, relative - previous, step)
        previous = relative


class Feeder:
    """Hands out the given values in turn, cycling; counts how many it handed out."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> Any:
        value = self.values[self.calls % len(self.values)]
        self.calls += 1
        return value


def run_with_check(env: RobotEnv, recorder: RecordingRobot, policy: Callable[[np.ndarray], StepChoice], seed: int):
    """One episode through the real runner; returns the result after checking every command it sent."""
    recorder.clear()
    starts: list[np.ndarray] = []
    original_reset = env.reset

    def reset(**kwargs: Any):
        out = original_reset(**kwargs)
        starts.append(start_target(env))
        return out

    env.reset = reset  # type: ignore[method-assign]
    try:
        result = run_episode(env, policy, seed=seed)
    finally:
        del env.reset
    assert len(starts) == 1
    assert len(recorder.commands) == result.length  # one command per step, none skipped or doubled
    assert_commands_safe(env, recorder.commands, starts[0])
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Raw env.step
# ----------------------------------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    actions=st.lists(st.one_of(hostile_action, hostile_action, wrong_shape_action), min_size=1, max_size=30),
)
@example(seed=358, actions=[np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]), [0.0, 0.0, 0.0, 0.0, -1.0, 1.0]])  # 1 ulp
def test_raw_steps_never_send_an_unsafe_command(sim, seed: int, actions: list[Any]) -> None:
    env, recorder = sim
    env.reset(seed=seed)
    start = start_target(env)
    recorder.clear()
    sent = 0
    for action in actions:
        shape = np.shape(action)
        if shape != (6,):
            target = env.mapper.target
            with pytest.raises(ValueError, match=r"action must have shape \(6,\)"):
                env.step(action)
            # Refused before the robot, and the target the next step moves from is untouched.
            assert len(recorder.commands) == sent
            np.testing.assert_array_equal(env.mapper.target, target)
            continue
        _, _, _, _, info = env.step(action)
        sent += 1
        assert len(recorder.commands) == sent
        # What the env reports as sent is what reached the robot.
        # (The env reports the pose the robot says it sent: a robot may renormalise the quaternion, 1e-16 off.)
        np.testing.assert_allclose(info["command"], np.concatenate(recorder.commands[-1]), rtol=0, atol=1e-12)
    assert_commands_safe(env, recorder.commands, start)


class PushedRobot(RecordingRobot):
    """The arm is pushed by hand between commands: after the k-th command it measures `pushes[k % n]` away
    (xyz metres, rpy radians about the base axes) from where the twin has it. Makes the target-near-measured clip
    jump, which only the one-step clip may then hold back."""

    def __init__(self, inner: Any, pushes: list[np.ndarray]) -> None:
        super().__init__(inner)
        self.pushes = pushes

    def state(self) -> RobotState:
        s = self.inner.state()
        if not self.commands:
            return s
        push = self.pushes[(len(self.commands) - 1) % len(self.pushes)]
        quat = matrix_to_quat(rpy_to_matrix(push[3:]) @ quat_to_matrix(s.ee_quat))
        return RobotState(s.ee_pos + push[:3], quat, s.joint_pos, s.joint_vel, s.time)


push = st.tuples(
    arrays(np.float64, 3, elements=st.floats(-0.15, 0.15)), arrays(np.float64, 3, elements=st.floats(-0.5, 0.5))
).map(np.concatenate)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    pushes=st.lists(push, min_size=1, max_size=5),
    actions=st.lists(hostile_action, min_size=1, max_size=EPISODE_STEPS),
)
def test_arm_pushed_between_steps_still_gets_one_step_at_most(run_cfg, seed, pushes, actions) -> None:
    env = make_env(run_cfg.env)
    recorder = PushedRobot(env.robot, pushes)
    env.robot = recorder
    env.reset(seed=seed)
    start = start_target(env)
    recorder.clear()
    for action in actions:
        env.step(action)
    assert_commands_safe(env, recorder.commands, start)


def test_pushing_on_every_axis_reaches_the_box_and_stays_on_it(sim) -> None:
    """The check above is not vacuous: a source pushing out of the box drives the commands onto its faces."""
    env, recorder = sim
    env.reset(seed=0)
    start = start_target(env)
    recorder.clear()
    for _ in range(EPISODE_STEPS):
        env.step(np.array([np.inf, -np.inf, 1e308, np.inf, -1e308, np.inf]))
    assert_commands_safe(env, recorder.commands, start)
    low, high = box_limits(env.config.safety)
    last = relative_pose(env, *recorder.commands[-1])
    # Roll, pitch and yaw reach their limits exactly (the arm follows within max_target_error of the target).
    np.testing.assert_allclose(last[3:], [high[3], low[4], high[5]], atol=TOL_RAD)


# ----------------------------------------------------------------------------------------------------------------------
# Resets
# ----------------------------------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.one_of(hostile_action, wrong_shape_action, st.none()), seed=st.integers(0, 2**16))
def test_reset_offsets_are_clipped_into_the_box_or_refused(sim, offset: Any, seed: int) -> None:
    env, recorder = sim
    recorder.clear()
    values = np.asarray(offset, dtype=np.float64) if offset is not None else None
    if values is not None and (values.shape != (6,) or not np.all(np.isfinite(values))):
        with pytest.raises(ValueError, match=r"options\['offset'\] must be 6 finite numbers"):
            env.reset(seed=seed, options={"offset": offset})
        assert recorder.moves == [] and recorder.commands == []
        return
    _, info = env.reset(seed=seed, options={"offset": offset})
    np.testing.assert_allclose(info["target"], start_target(env), atol=1e-12)  # seeded from the measured pose
    assert len(recorder.moves) == 1
    placed = relative_pose(env, *recorder.moves[0])
    assert_in_box(env, placed)
    if values is not None:
        low, high = box_limits(env.config.safety)
        np.testing.assert_allclose(placed, np.clip(values, low, high), atol=1e-9)
    assert_in_box(env, info["target"])
    # The next step starts from there: still one step at most, still in the box.
    recorder.clear()
    env.step(np.full(6, np.inf))
    assert_commands_safe(env, recorder.commands, np.asarray(info["target"], dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------------------
# The BC policy
# ----------------------------------------------------------------------------------------------------------------------
def make_bc(run_cfg: RunConfig, env: RobotEnv) -> torch.nn.Module:
    low, high = state_bounds(env.observation_space)
    return make_bc_policy(run_cfg.bc, spec_from_space(env.observation_space), 6, low, high)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(outputs=st.lists(hostile_tensor, min_size=1, max_size=EPISODE_STEPS), mode=st.sampled_from(["sample", "mode"]))
def test_bc_policy_with_hostile_outputs_never_sends_an_unsafe_command(run_cfg, sim, outputs, mode) -> None:
    env, recorder = sim
    bc = make_bc(run_cfg, env)
    feeder = Feeder(outputs)
    bc.sample = feeder  # type: ignore[method-assign]
    bc.mode = feeder  # type: ignore[method-assign]
    policy = bc_policy_fn(bc, mode=mode, seed=0)
    result = run_with_check(env, recorder, policy, seed=feeder.calls)
    assert feeder.calls == result.length  # every step's action came from the hostile network
    # The recorded proposal is the sanitised one: finite and in [-1, 1] (the episode file refuses NaN actions).
    assert np.all(np.isfinite(result.episode.actions)) and np.all(np.abs(result.episode.actions) <= 1.0)


@pytest.mark.parametrize("shape", [(1, 5), (1, 7), (6,), (1, 2, 3)])
def test_bc_policy_of_the_wrong_action_size_is_refused_before_the_robot(run_cfg, sim, shape) -> None:
    env, recorder = sim
    bc = make_bc(run_cfg, env)
    bc.mode = lambda obs: torch.zeros(shape)  # type: ignore[method-assign]
    policy = bc_policy_fn(bc, mode="mode")
    env.reset(seed=0)
    recorder.clear()
    with pytest.raises(ValueError, match="shape"):
        run_episode(env, policy, seed=0)
    assert recorder.commands == []


# ----------------------------------------------------------------------------------------------------------------------
# The Q-gated agent
# ----------------------------------------------------------------------------------------------------------------------
def make_agent(run_cfg: RunConfig, env: RobotEnv) -> Q2RLAgent:
    low, high = state_bounds(env.observation_space)
    return Q2RLAgent(
        run_cfg.agent,
        obs_spec=spec_from_space(env.observation_space),
        state_low=low,
        state_high=high,
        action_dim=6,
        bc_policy=make_bc(run_cfg, env),
        seed=1,
    )


def decision(action: np.ndarray, use_bc: bool) -> GateDecision:
    nan = np.full((1,), np.nan, np.float32)
    return GateDecision(
        bc_action=action[None],
        rl_action=-action[None],
        q_bc=nan,
        q_rl=np.array([np.inf], np.float32),
        use_bc=np.array([use_bc]),
        action=action[None],
    )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    proposals=st.lists(st.tuples(arrays(np.float64, 6, elements=hostile_float), st.booleans()), min_size=1),
)
def test_gated_agent_with_hostile_decisions_never_sends_an_unsafe_command(run_cfg, sim, proposals) -> None:
    env, recorder = sim
    agent = make_agent(run_cfg, env)
    feeder = Feeder([decision(a, b) for a, b in proposals])
    agent.act = feeder  # type: ignore[method-assign]
    result = run_with_check(env, recorder, gated_policy_fn(agent, rl_action="mode"), seed=len(proposals))
    assert feeder.calls == result.length


class HostileDist:
    """Stands in for the RL actor's distribution: its mode and samples are whatever the test says."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def mode(self) -> torch.Tensor:
        return self.value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.value


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bc_out=st.lists(hostile_tensor, min_size=1, max_size=4),
    rl_out=st.lists(arrays(np.float64, 6, elements=hostile_float), min_size=1, max_size=4),
    method=st.sampled_from(["q2rl", "ibrl", "sac"]),
)
def test_real_gating_of_hostile_networks_never_sends_an_unsafe_command(run_cfg, sim, bc_out, rl_out, method) -> None:
    """The agent's own act() (both proposals scored, gate, torch.where) on networks that output garbage."""
    env, recorder = sim
    cfg = run_cfg.model_copy(update={"agent": run_cfg.agent.model_copy(update={"method": method})})
    agent = make_agent(cfg, env)
    assert agent.cfg.gating == {"q2rl": "q2rl", "ibrl": "shared", "sac": "none"}[method]
    assert agent.bc_policy is not None
    bc_feeder = Feeder([t.float() for t in bc_out])
    agent.bc_policy.sample = bc_feeder  # type: ignore[method-assign]
    agent.bc_policy.mode = bc_feeder  # type: ignore[method-assign]
    rl_feeder = Feeder([HostileDist(torch.as_tensor(a, dtype=torch.float32)[None]) for a in rl_out])
    agent.actor.forward = rl_feeder  # type: ignore[method-assign]
    result = run_with_check(env, recorder, gated_policy_fn(agent, rl_action="mode"), seed=len(rl_out))
    assert rl_feeder.calls == result.length


# ----------------------------------------------------------------------------------------------------------------------
# The scripted expert
# ----------------------------------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.lists(arrays(np.float64, 6, elements=hostile_float), min_size=1, max_size=EPISODE_STEPS))
def test_scripted_expert_with_hostile_tremor_never_sends_an_unsafe_command(sim, noise) -> None:
    env, recorder = sim
    expert = ScriptedExpert(env, ExpertConfig(), np.random.default_rng(0))
    feeder = Feeder(noise)
    expert._next_noise = feeder  # type: ignore[method-assign]  # the expert's only random input
    # The loop of evaluate_expert, with no clip_action between the expert and the env: NaN tremor stays NaN.
    # (run_episode would refuse to log a NaN action at the episode's end; collect_demos clips before it.)
    obs, _ = env.reset(seed=len(noise))
    start = start_target(env)
    expert.reset()
    recorder.clear()
    actions = []
    for _ in range(EPISODE_STEPS):
        actions.append(expert.act(obs))
        obs, _, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            break
    assert feeder.calls == len(recorder.commands) == len(actions)
    assert_commands_safe(env, recorder.commands, start)
    if any(np.isnan(n).any() for n in noise):
        assert any(np.isnan(a).any() for a in actions)  # the hostile tremor did reach the env


# ----------------------------------------------------------------------------------------------------------------------
# franky's client against a franky-sim server (wall clock: one short fixed sequence)
# ----------------------------------------------------------------------------------------------------------------------
FRANKY_HOST = "127.0.1.9"  # neither the config's 127.0.1.2 nor test_franky_sim's 127.0.1.7


@pytest.fixture
def franky_env() -> Iterator[tuple[RobotEnv, RecordingRobot]]:
    pytest.importorskip("franky", reason="franky-control is not installed")
    pytest.importorskip("franky_sim", reason="franky-sim is not installed")
    from robot_rl.hardware.franka import FrankySimError, make_franky_env

    cfg = load_config(FRANKY_CONFIG, [f"env.franka.host={FRANKY_HOST}", "env.task.max_episode_steps=8"])
    try:
        env = make_franky_env(cfg.env)
    except FrankySimError as exc:
        pytest.skip(f"franky-sim cannot start here: {exc}")
    recorder = RecordingRobot(env.robot)
    env.robot = recorder
    try:
        yield env, recorder
    finally:
        env.close()


@pytest.mark.timeout(90, method="thread")
def test_franky_gated_agent_with_hostile_decisions_never_sends_an_unsafe_command(franky_env) -> None:
    env, recorder = franky_env
    cfg = ci_config()
    agent = make_agent(cfg, env)
    hostile = [
        np.array([np.inf, -np.inf, 1e308, np.inf, -1e308, np.inf]),
        np.array([np.nan] * 6),
        np.array([1e9, 1e9, 1e9, 1e9, 1e9, 1e9]),
        np.array([-np.inf, np.nan, -1.0000001, 5e-324, 0.5, -np.inf]),
    ]
    agent.act = Feeder([decision(a, i % 2 == 0) for i, a in enumerate(hostile)])  # type: ignore[method-assign]
    result = run_with_check(env, recorder, gated_policy_fn(agent, rl_action="mode"), seed=0)
    assert result.length == 8
