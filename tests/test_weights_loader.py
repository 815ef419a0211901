"""The actor's weights loader: broadcasts are decoded and built into acting networks off the control thread."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from robot_rl.actor.link import NewestWeights
from robot_rl.actor.weights_loader import WeightsLoader, WeightsLoadError
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import make_bc_policy
from robot_rl.config import AgentConfig, BCConfig
from robot_rl.obs import state_spec
from robot_rl.wire import Weights, pack_tensors

SPEC = state_spec(6)
LOW, HIGH = -np.ones(6, np.float32), np.ones(6, np.float32)


def make_agent(seed: int) -> Q2RLAgent:
    torch.manual_seed(0)  # the same BC policy for every agent
    bc = make_bc_policy(BCConfig(hidden=[32], num_modes=2), SPEC, 6, LOW, HIGH)
    cfg = AgentConfig(hidden=[256, 256], num_critics=4, batch_size=8)
    return Q2RLAgent(cfg, obs_spec=SPEC, state_low=LOW, state_high=HIGH, action_dim=6, bc_policy=bc, seed=seed)


@contextlib.contextmanager
def _loading(agent: Q2RLAgent, min_interval_s: float = 0.0) -> Iterator[tuple[NewestWeights, WeightsLoader]]:
    """A loader preparing for `agent` what the test puts into the source; stopped and joined on exit."""
    source = NewestWeights()  # as the link hands broadcasts over
    loader = WeightsLoader(source.take, agent, poll_s=0.01, min_interval_s=min_interval_s)
    loader.start()
    try:
        yield source, loader
    finally:
        loader.stop()
        loader.join(timeout=5)


def _wait_take(loader: WeightsLoader, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = loader.take()
        if ready is not None:
            return ready
        time.sleep(0.01)
    raise AssertionError("the loader prepared nothing")


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_loader_prepares_broadcasts_that_change_nothing_until_swapped_in(precision):
    agent = make_agent(seed=0)
    agent.set_acting_precision(precision)
    obs = {"ee_pose": np.random.default_rng(0).uniform(-1, 1, (4, 6)).astype(np.float32)}
    before = agent.act(obs, rl_action="mode", bc_action="mode")
    with _loading(agent) as (source, loader):
        new = make_agent(seed=9)
        new.set_acting_precision(precision)
        source.put(Weights(version=5, phase="online", tensors=pack_tensors(new.acting_state())))
        ready = _wait_take(loader)
        assert ready.weights.version == 5 and set(ready.tensors) == set(new.acting_state())
        assert loader.take() is None  # taken once
        np.testing.assert_array_equal(agent.act(obs, rl_action="mode", bc_action="mode").q_rl, before.q_rl)
        agent.use_acting(ready.prepared)
        after = agent.act(obs, rl_action="mode", bc_action="mode")
        np.testing.assert_allclose(after.q_rl, new.act(obs, rl_action="mode", bc_action="mode").q_rl, rtol=1e-5)
        assert loader.prepared == 1 and loader.prepare_p99_s() > 0
    assert not loader.is_alive()


def test_a_broadcast_of_other_networks_is_reported_at_the_swap_point():
    agent = make_agent(seed=0)
    with _loading(agent) as (source, loader):
        state = {k: v for k, v in agent.acting_state().items() if not k.startswith("critics.")}
        source.put(Weights(version=2, phase="online", tensors=pack_tensors(state)))
        loader.join(timeout=20)  # the loader stops at a broadcast it cannot use
        assert not loader.is_alive()
        with pytest.raises(WeightsLoadError, match=r"version 2 cannot be loaded.*acting state mismatch"):
            loader.take()


def test_a_broadcast_with_nan_is_skipped_and_the_next_one_is_used():
    """A diverged learner's weights are never gated with: the loader counts and skips them and goes on."""
    agent = make_agent(seed=0)
    with _loading(agent) as (source, loader):
        state = make_agent(seed=1).acting_state()
        bad = dict(state)
        bad["critics.linears.0.weight"] = bad["critics.linears.0.weight"].clone()
        bad["critics.linears.0.weight"][0, 0, 0] = float("nan")
        source.put(Weights(version=3, phase="online", tensors=pack_tensors(bad)))
        deadline = time.monotonic() + 20
        while loader.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loader.refused == 1 and "version 3" in loader.last_refusal and "NaN or inf" in loader.last_refusal
        assert loader.take() is None and loader.is_alive()
        source.put(Weights(version=4, phase="online", tensors=pack_tensors(state)))
        assert _wait_take(loader).weights.version == 4


def test_with_a_min_interval_the_newest_broadcast_is_prepared_once_per_interval_and_a_new_phase_at_once():
    agent = make_agent(seed=0)
    tensors = pack_tensors(make_agent(seed=1).acting_state())
    interval = 3.0
    with _loading(agent, min_interval_s=interval) as (source, loader):
        source.put(Weights(version=1, phase="online", tensors=tensors))
        first = time.monotonic()
        assert _wait_take(loader).weights.version == 1
        source.put(Weights(version=2, phase="online", tensors=tensors))
        time.sleep(0.05)
        source.put(Weights(version=3, phase="online", tensors=tensors))  # overtakes 2 before its turn
        time.sleep(0.5)
        assert loader.take() is None and loader.prepared == 1  # within the interval: nothing prepared
        ready = _wait_take(loader)
        assert ready.weights.version == 3 and time.monotonic() - first >= interval and loader.prepared == 2
        source.put(Weights(version=4, phase="eval", tensors=tensors))  # a new phase does not wait
        put = time.monotonic()
        assert _wait_take(loader).weights.version == 4 and time.monotonic() - put < interval - 1.0
