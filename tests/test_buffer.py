"""ReplayBuffer: dict observations stored once as frames, FIFO eviction that keeps every live transition intact.

The property test feeds random chunks of several actors (random episode boundaries, interleaved, some longer than
the buffer) and compares every live transition with a plain list of what was added.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robot_rl.buffer import (
    MEMORY_FRACTION,
    ReplayBuffer,
    TransitionBatch,
    available_memory_bytes,
    buffer_bytes,
    check_buffer_memory,
    concat_batches,
    replay_device,
    sample_utd_batches,
    split_rows,
)
from robot_rl.config import AgentConfig, ConfigError

ACT = 3
SPEC = {"ee_pose": ((6,), "float32"), "front": ((8, 8, 3), "uint8"), "wrist": ((8, 8, 3), "uint8")}
SMALL_SPEC = {"s": ((2,), "float32"), "img": ((2, 2, 3), "uint8")}


def random_obs(rng: np.random.Generator, n: int, spec=SPEC) -> dict[str, np.ndarray]:
    out = {}
    for key, (shape, dtype) in spec.items():
        if dtype == "uint8":
            out[key] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        else:
            out[key] = rng.standard_normal((n, *shape)).astype(dtype)
    return out


def rows(obs: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in obs.items()}


def episode_chunk(rng: np.random.Generator, n: int, spec=SPEC, *, terminal: bool = True) -> dict:
    """add_many arguments for one n-step episode: obs[t+1] is next_obs[t]."""
    states = random_obs(rng, n + 1, spec)
    return {
        "obs": rows(states, 0, n),
        "next_obs": rows(states, 1, n + 1),
        "actions": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
        "rewards": (np.arange(n) == n - 1).astype(np.float32),
        "terminated": (np.arange(n) == n - 1) & terminal,
        "truncated": np.zeros(n, bool),
        "bc_actions": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
    }


def join_chunks(a: dict, b: dict) -> dict:
    return {k: ({j: np.concatenate([a[k][j], b[k][j]]) for j in a[k]} if isinstance(a[k], dict)
                else np.concatenate([a[k], b[k]])) for k in a}  # fmt: skip


def assert_batch_equals_chunk(batch: TransitionBatch, chunk: dict) -> None:
    for key in chunk["obs"]:
        np.testing.assert_array_equal(batch.obs[key], chunk["obs"][key], err_msg=f"obs[{key}]")
        np.testing.assert_array_equal(batch.next_obs[key], chunk["next_obs"][key], err_msg=f"next_obs[{key}]")
        assert batch.obs[key].dtype == chunk["obs"][key].dtype
    for name in ("actions", "rewards", "terminated", "bc_actions"):
        np.testing.assert_array_equal(getattr(batch, name), chunk[name], err_msg=name)


def assert_tensors_equal_batch(tensors: dict, batch: TransitionBatch) -> None:
    """A device-copy minibatch (take_tensors) holds exactly a host minibatch's arrays, in their dtypes."""
    for name in ("obs", "next_obs"):
        assert tensors[name].keys() == getattr(batch, name).keys()
        for key, expected in getattr(batch, name).items():
            got = tensors[name][key].cpu().numpy()
            assert got.dtype == expected.dtype, (name, key)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}[{key}]")
    for name in ("actions", "rewards", "terminated", "bc_actions"):
        got, expected = tensors[name].cpu().numpy(), getattr(batch, name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Frames are shared exactly where next_obs equals the following obs
# ----------------------------------------------------------------------------------------------------------------
def test_one_episode_chunk_stores_n_plus_one_frames():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(100, SPEC, ACT)
    chunk = episode_chunk(rng, 20)
    buf.add_many(**chunk)
    assert len(buf) == 20 and buf.total_added == 20
    assert buf.frames_stored() == 21
    assert_batch_equals_chunk(buf.take(np.arange(20)), chunk)


def test_step_by_step_adds_share_the_previous_calls_frame():
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(100, SPEC, ACT)
    chunk = episode_chunk(rng, 15)
    for t in range(15):
        buf.add(
            obs={k: v[t] for k, v in chunk["obs"].items()},
            action=chunk["actions"][t],
            reward=float(chunk["rewards"][t]),
            next_obs={k: v[t] for k, v in chunk["next_obs"].items()},
            terminated=bool(chunk["terminated"][t]),
            truncated=False,
            bc_action=chunk["bc_actions"][t],
        )
    assert buf.frames_stored() == 16
    assert_batch_equals_chunk(buf.take(np.arange(15)), chunk)


def test_episode_boundary_inside_a_chunk_stores_the_reset_observation():
    rng = np.random.default_rng(2)
    buf = ReplayBuffer(100, SPEC, ACT)
    chunk = join_chunks(episode_chunk(rng, 5), episode_chunk(rng, 7))
    buf.add_many(**chunk)
    assert buf.frames_stored() == (5 + 1) + (7 + 1)
    assert_batch_equals_chunk(buf.take(np.arange(12)), chunk)


def test_interleaved_actors_never_share_each_others_frames():
    rng = np.random.default_rng(3)
    buf = ReplayBuffer(100, SPEC, ACT)
    a, b = episode_chunk(rng, 8), episode_chunk(rng, 8)
    order = [(a, 0, 4), (b, 0, 4), (a, 4, 8), (b, 4, 8)]
    for chunk, lo, hi in order:
        buf.add_many(**{k: rows(v, lo, hi) if isinstance(v, dict) else v[lo:hi] for k, v in chunk.items()})
    assert buf.frames_stored() == 4 * (4 + 1)
    got = buf.take(np.arange(16))
    for i, (chunk, lo, hi) in enumerate(order):
        part = {k: rows(v, lo, hi) if isinstance(v, dict) else v[lo:hi] for k, v in chunk.items()}
        assert_batch_equals_chunk(buf.take(np.arange(4 * i, 4 * i + 4)), part)
    assert got.obs["front"].shape == (16, 8, 8, 3)


def test_a_frame_is_shared_only_when_every_key_is_equal():
    """One pixel of one camera, or one state element, differing is enough to store a new frame."""
    rng = np.random.default_rng(15)
    for key, where in (("wrist", (0, 7, 7, 2)), ("ee_pose", (0, 5))):
        buf = ReplayBuffer(10, SPEC, ACT)
        first, second = episode_chunk(rng, 3), episode_chunk(rng, 3)
        for k in SPEC:
            second["obs"][k][0] = first["next_obs"][k][-1]
        second["obs"][key][where] += 1
        buf.add_many(**join_chunks(first, second))
        assert buf.frames_stored() == 8, key
        assert_batch_equals_chunk(buf.take(np.arange(6)), join_chunks(first, second))


def test_sharing_is_bit_exact_negative_zero_is_not_zero():
    buf = ReplayBuffer(10, {"s": ((1,), "float32")}, 1)
    one = np.ones((1, 1), np.float32)
    buf.add_many(obs={"s": np.zeros((1, 1), np.float32)}, next_obs={"s": np.zeros((1, 1), np.float32)},
                 actions=one, rewards=one[0], terminated=[False], truncated=[False])  # fmt: skip
    buf.add_many(obs={"s": -np.zeros((1, 1), np.float32)}, next_obs={"s": one},
                 actions=one, rewards=one[0], terminated=[False], truncated=[False])  # fmt: skip
    assert buf.frames_stored() == 4
    assert np.signbit(buf.take(np.array([1])).obs["s"][0, 0])


def test_equal_reset_observation_may_share_and_reads_back_the_same():
    """Sharing by equality is safe even across an episode end: the data is identical."""
    rng = np.random.default_rng(4)
    buf = ReplayBuffer(100, SPEC, ACT)
    first = episode_chunk(rng, 4)
    second = episode_chunk(rng, 4)
    for key in second["obs"]:
        second["obs"][key][0] = first["next_obs"][key][-1]
    buf.add_many(**first)
    buf.add_many(**second)
    assert buf.frames_stored() == 9
    assert_batch_equals_chunk(buf.take(np.arange(8)), join_chunks(first, second))


# ----------------------------------------------------------------------------------------------------------------
# Eviction
# ----------------------------------------------------------------------------------------------------------------
def test_full_buffer_keeps_the_newest_capacity_transitions():
    rng = np.random.default_rng(5)
    buf = ReplayBuffer(10, SPEC, ACT, frame_slack=2)
    chunks = [episode_chunk(rng, n) for n in (6, 7, 5, 9)]
    for chunk in chunks:
        buf.add_many(**chunk)
    everything = chunks[0]
    for chunk in chunks[1:]:
        everything = join_chunks(everything, chunk)
    assert len(buf) == 10 and buf.total_added == 27
    assert_batch_equals_chunk(buf.take(np.arange(10)), {k: rows(v, 17, 27) if isinstance(v, dict) else v[17:]
                                                        for k, v in everything.items()})  # fmt: skip


def test_poor_sharing_evicts_early_and_keeps_live_transitions_intact():
    rng = np.random.default_rng(6)
    buf = ReplayBuffer(40, SMALL_SPEC, ACT, frame_slack=2)  # 52 frames
    chunks = [episode_chunk(rng, 1, SMALL_SPEC) for _ in range(60)]  # two new frames per transition
    for chunk in chunks:
        buf.add_many(**chunk)
    assert buf.frame_capacity == 52
    assert len(buf) == 26  # 52 frames / 2
    assert buf.frames_stored() == 52
    for i, chunk in enumerate(chunks[-26:]):
        assert_batch_equals_chunk(buf.take(np.array([i])), chunk)


def test_chunk_longer_than_the_buffer_keeps_its_last_rows():
    rng = np.random.default_rng(7)
    buf = ReplayBuffer(10, SMALL_SPEC, ACT, frame_slack=2)
    chunk = episode_chunk(rng, 35, SMALL_SPEC)
    buf.add_many(**episode_chunk(rng, 3, SMALL_SPEC))
    buf.add_many(**chunk)
    assert len(buf) == 10 and buf.total_added == 38
    tail = {k: rows(v, 25, 35) if isinstance(v, dict) else v[25:] for k, v in chunk.items()}
    assert_batch_equals_chunk(buf.take(np.arange(10)), tail)


@dataclass
class _Actor:
    """Makes one actor's transitions: a fresh observation per step, a reset observation after an episode end."""

    actor: int
    counter: int = 0
    obs: dict[str, np.ndarray] = field(default_factory=dict)

    def fresh(self) -> dict[str, np.ndarray]:
        self.counter += 1
        return {"s": np.array([self.actor, self.counter], np.float32),
                "img": np.full((2, 2, 3), (self.counter * 7 + self.actor) % 256, np.uint8)}  # fmt: skip

    def steps(self, n: int, ends: int) -> list[dict]:
        out = []
        for t in range(n):
            obs = self.obs or self.fresh()
            nxt = self.fresh()
            end = bool(ends >> t & 1)
            out.append({"obs": obs, "next_obs": nxt, "action": np.full(ACT, self.counter % 3 - 1, np.float32),
                        "reward": float(end), "terminated": end})  # fmt: skip
            self.obs = {} if end else nxt
        return out


def add_steps(buf: ReplayBuffer, steps: list[dict], *, one_by_one: bool) -> None:
    if one_by_one:
        for s in steps:
            buf.add(obs=s["obs"], action=s["action"], reward=s["reward"], next_obs=s["next_obs"],
                    terminated=s["terminated"], truncated=False)  # fmt: skip
        return
    n = len(steps)
    buf.add_many(
        obs={k: np.stack([s["obs"][k] for s in steps]) for k in SMALL_SPEC},
        next_obs={k: np.stack([s["next_obs"][k] for s in steps]) for k in SMALL_SPEC},
        actions=np.array([s["action"] for s in steps], np.float32).reshape(n, ACT),
        rewards=np.array([s["reward"] for s in steps], np.float32),
        terminated=np.array([s["terminated"] for s in steps], bool),
        truncated=np.zeros(n, bool),
    )


def expected_frames(live: list[dict]) -> int:
    """size + 1, plus one for every live transition whose obs is not the previous live one's next_obs."""
    fresh = sum(
        any(not np.array_equal(cur["obs"][k], prev["next_obs"][k]) for k in SMALL_SPEC)
        for prev, cur in itertools.pairwise(live)
    )
    return len(live) + 1 + fresh if live else 0


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 60),
    slack=st.integers(2, 6),
    ops=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 25), st.integers(0, 2**25 - 1), st.booleans()), max_size=25
    ),
)
def test_live_transitions_always_read_back_what_was_added(capacity, slack, ops):
    buf = ReplayBuffer(capacity, SMALL_SPEC, ACT, frame_slack=slack, device="cpu")
    actors = [_Actor(i) for i in range(3)]
    added: list[dict] = []
    for actor, n, ends, one_by_one in ops:
        steps = actors[actor].steps(n, ends)
        add_steps(buf, steps, one_by_one=one_by_one and n < 6)
        added += steps
        live = added[len(added) - len(buf) :]
        assert buf.total_added == len(added)
        # FIFO, and never fewer than the frame ring allows with two frames per transition.
        assert min(len(added), capacity, (buf.frame_capacity - 1) // 2 - 1) <= len(buf) <= capacity
        assert buf.frames_stored() == expected_frames(live) <= buf.frame_capacity
        got = buf.take(np.arange(len(buf)))
        for i, step in enumerate(live):
            for key in SMALL_SPEC:
                np.testing.assert_array_equal(got.obs[key][i], step["obs"][key])
                np.testing.assert_array_equal(got.next_obs[key][i], step["next_obs"][key])
            np.testing.assert_array_equal(got.actions[i], step["action"])
            assert got.terminated[i] == step["terminated"]
        # The device copy gathers exactly what the host arrays hold, after every add, eviction and wrap.
        assert_tensors_equal_batch(buf.take_tensors(np.arange(len(buf))), got)


@settings(max_examples=50, deadline=None)
@given(capacity=st.integers(4, 200), lengths=st.lists(st.integers(4, 30), min_size=1, max_size=30),
       chunk=st.integers(1, 40))  # fmt: skip
def test_one_actor_with_episodes_of_four_steps_or_more_fills_the_buffer(capacity, lengths, chunk):
    """The frame ring is sized so that in-order episodes of >= 4 steps never evict before the buffer is full."""
    buf = ReplayBuffer(capacity, SMALL_SPEC, ACT)
    actor = _Actor(0)
    steps = [s for n in lengths for s in actor.steps(n, 1 << (n - 1))]
    for lo in range(0, len(steps), chunk):
        add_steps(buf, steps[lo : lo + chunk], one_by_one=False)
    assert len(buf) == min(len(steps), capacity)


def test_demonstrations_in_one_call_fill_a_buffer_of_their_size():
    """The learner's offline buffer: every demo episode in one add_many (split internally into pieces)."""
    rng = np.random.default_rng(16)
    demos = episode_chunk(rng, 60, SMALL_SPEC)
    for n in [45, 80, 4, 33] * 10:
        demos = join_chunks(demos, episode_chunk(rng, n, SMALL_SPEC))
    total = len(demos["actions"])
    buf = ReplayBuffer(total, SMALL_SPEC, ACT)
    buf.add_many(**demos)
    assert len(buf) == total and buf.frames_stored() == total + 41
    assert_batch_equals_chunk(buf.take(np.arange(total)), demos)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def test_wrong_keys_shapes_dtypes_and_non_finite_values_are_refused_and_nothing_is_stored():
    rng = np.random.default_rng(8)
    buf = ReplayBuffer(100, SPEC, ACT)
    good = episode_chunk(rng, 3)
    buf.add_many(**good)

    def bad(name: str, key: str | None, value) -> dict:
        if key is None:
            return {**good, name: value}
        return {**good, name: {**good[name], key: value}}

    cases = [
        (bad("obs", "front", np.zeros((3, 8, 8, 4), np.uint8)), r"obs\['front'\] has shape"),
        (bad("next_obs", "wrist", np.zeros((3, 8, 8, 3), np.float32)), r"next_obs\['wrist'\] has dtype float32"),
        (bad("obs", "ee_pose", good["obs"]["ee_pose"].astype(np.float64)), r"obs\['ee_pose'\] has dtype float64"),
        (bad("next_obs", "ee_pose", np.full((3, 6), np.nan, np.float32)), r"next_obs\['ee_pose'\] holds non-finite"),
        (bad("obs", "ee_pose", np.full((3, 6), np.inf, np.float32)), r"obs\['ee_pose'\] holds non-finite"),
        (bad("obs", None, rows(good["obs"], 0, 3) | {"extra": np.zeros((3, 1))}), "keys"),
        (bad("obs", None, {k: v for k, v in good["obs"].items() if k != "wrist"}), "keys"),
        (bad("obs", None, good["obs"]["ee_pose"]), "dict"),
        (bad("actions", None, np.full((3, ACT), np.nan)), "actions holds non-finite"),
        (bad("actions", None, np.zeros((3, ACT + 1))), "actions has shape"),
        (bad("rewards", None, np.array([0, np.inf, 0])), "rewards holds non-finite"),
        (bad("rewards", None, np.zeros(4)), "rewards has shape"),
        (bad("terminated", None, np.zeros(2, bool)), "terminated has shape"),
        (bad("bc_actions", None, np.array([[0, np.nan, 0]] * 3)), "bc_actions rows"),
        (bad("bc_actions", None, np.array([[np.inf, 0, 0]] * 3)), "bc_actions rows"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            buf.add_many(**kwargs)
    assert len(buf) == 3 and buf.total_added == 3 and buf.frames_stored() == 4
    assert_batch_equals_chunk(buf.take(np.arange(3)), good)


def test_bc_actions_default_to_nan_rows_and_nan_rows_are_accepted():
    rng = np.random.default_rng(9)
    buf = ReplayBuffer(100, SPEC, ACT)
    chunk = episode_chunk(rng, 4)
    chunk["bc_actions"][1] = np.nan
    buf.add_many(**chunk)
    buf.add_many(**{k: v for k, v in episode_chunk(rng, 2).items() if k != "bc_actions"})
    got = buf.take(np.arange(6)).bc_actions
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2, 3]]).all() and np.isnan(got[4:]).all()


def test_bad_specs_indices_and_empty_sampling_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, SPEC, ACT)
    with pytest.raises(ValueError, match="'front'"):
        ReplayBuffer(10, {"front": ((84, 0, 3), "uint8")}, ACT)
    with pytest.raises(ValueError, match="'x'"):
        ReplayBuffer(10, {"x": ((1,), "complex64")}, ACT)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(10, {}, ACT)
    buf = ReplayBuffer(10, SPEC, ACT)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, np.random.default_rng())
    buf.add_many(**episode_chunk(np.random.default_rng(10), 3))
    with pytest.raises(IndexError):
        buf.take(np.array([3]))
    with pytest.raises(IndexError):
        buf.take(np.array([-1]))


def test_spec_dtype_names_are_canonical_and_batches_keep_them():
    buf = ReplayBuffer(10, {"ee_pose": ((6,), np.float32), "front": ([8, 8, 3], "u1")}, ACT)
    assert buf.obs_spec == {"ee_pose": ((6,), "float32"), "front": ((8, 8, 3), "uint8")}


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def test_sample_draws_live_transitions_with_the_rng():
    rng = np.random.default_rng(11)
    buf = ReplayBuffer(50, SPEC, ACT)
    for _ in range(10):
        buf.add_many(**episode_chunk(rng, 9))
    batch = buf.sample(256, np.random.default_rng(0))
    idx = np.random.default_rng(0).integers(0, len(buf), 256)
    expected = buf.take(idx)
    for key in SPEC:
        assert batch.obs[key].shape == (256, *SPEC[key][0]) and batch.obs[key].dtype == SPEC[key][1]
        np.testing.assert_array_equal(batch.obs[key], expected.obs[key])
        np.testing.assert_array_equal(batch.next_obs[key], expected.next_obs[key])
    np.testing.assert_array_equal(batch.actions, expected.actions)
    assert batch.rewards.dtype == np.float32 and batch.terminated.dtype == np.bool_


def test_sampled_arrays_are_copies():
    rng = np.random.default_rng(12)
    buf = ReplayBuffer(10, SPEC, ACT)
    chunk = episode_chunk(rng, 5)
    buf.add_many(**chunk)
    batch = buf.take(np.arange(5))
    batch.obs["front"][:] = 0
    assert_batch_equals_chunk(buf.take(np.arange(5)), chunk)


def test_utd_batches_hold_the_offline_share_in_every_key():
    rng = np.random.default_rng(13)
    online, offline = ReplayBuffer(50, SPEC, ACT), ReplayBuffer(50, SPEC, ACT)
    online_chunk, offline_chunk = episode_chunk(rng, 20), episode_chunk(rng, 20)
    online.add_many(**online_chunk)
    offline.add_many(**offline_chunk)
    cfg = AgentConfig(method="rlpd", utd=3, batch_size=16)
    batches = sample_utd_batches(online, offline, cfg, np.random.default_rng(0))
    assert len(batches) == 3
    for batch in batches:
        assert batch.actions.shape == (16, ACT) and batch.bc_actions.shape == (16, ACT)
        for key, (shape, _) in SPEC.items():
            assert batch.obs[key].shape == batch.next_obs[key].shape == (16, *shape)
            # The first 8 rows come from the online buffer, the last 8 from the demonstrations, in every key.
            sources = [online_chunk["obs"][key]] * 8 + [offline_chunk["obs"][key]] * 8
            for row, source in zip(batch.obs[key], sources, strict=True):
                assert any(np.array_equal(row, s) for s in source)


def _field(batch: TransitionBatch | dict, name: str):
    return batch[name] if isinstance(batch, dict) else getattr(batch, name)


def test_a_steps_minibatches_are_one_draw_cut_into_utd_views():
    rng = np.random.default_rng(15)
    buf = ReplayBuffer(60, SPEC, ACT, device="cpu")
    buf.add_many(**episode_chunk(rng, 50))
    cfg = AgentConfig(utd=4, batch_size=8)
    whole_idx = np.random.default_rng(2).integers(0, len(buf), 32)
    for batches, whole in (
        (sample_utd_batches(buf, None, cfg, np.random.default_rng(2)), buf.take_tensors(whole_idx)),
        (split_rows(buf.take(whole_idx), 4), buf.take(whole_idx)),
    ):
        assert len(batches) == 4
        for i, batch in enumerate(batches):
            rows = slice(8 * i, 8 * i + 8)
            for name in ("actions", "rewards", "terminated", "bc_actions"):
                np.testing.assert_array_equal(np.asarray(_field(batch, name)), np.asarray(_field(whole, name))[rows])
            for key in SPEC:
                got, expected = _field(batch, "next_obs")[key], _field(whole, "next_obs")[key]
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected)[rows])
    assert not np.array_equal(np.asarray(batches[0].actions), np.asarray(batches[1].actions))  # four draws, not one
    with pytest.raises(ValueError, match="do not split into 3 equal minibatches"):
        split_rows(buf.take(np.arange(8)), 3)
    # No rows (a minibatch all demonstrations, RLPD at a high offline share) cut into empty minibatches, either kind.
    for empty in (buf.take(np.arange(0)), buf.take_tensors(np.arange(0))):
        parts = split_rows(empty, 4)
        assert len(parts) == 4 and all(len(_field(p, "actions")) == 0 for p in parts)
    offline = ReplayBuffer(60, SPEC, ACT, device="cpu")
    offline.add_many(**episode_chunk(rng, 20))
    all_demos = AgentConfig(method="rlpd", utd=4, batch_size=8, offline_ratio=0.95)  # round(7.6) = 8 offline rows
    batches = sample_utd_batches(buf, offline, all_demos, np.random.default_rng(0))
    assert len(batches) == 4 and all(b["actions"].shape == (8, ACT) for b in batches)


def test_concat_refuses_different_observation_keys():
    buf = ReplayBuffer(10, SPEC, ACT)
    buf.add_many(**episode_chunk(np.random.default_rng(14), 3))
    batch = buf.take(np.arange(3))
    joined = concat_batches(batch, batch)
    assert joined.obs["front"].shape == (6, 8, 8, 3) and joined.terminated.shape == (6,)
    with pytest.raises(ValueError, match="keys"):
        concat_batches(batch, TransitionBatch(**{**batch.__dict__, "obs": {"other": batch.obs["front"]}}))


def test_untouched_pages_cost_no_memory():
    """A 100k-transition two-camera 84x84 buffer reserves ~5 GB of frames but touches almost none of it."""

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss_bytes()
    buf = ReplayBuffer(100_000, {"ee_pose": ((6,), "float32"), "front": ((84, 84, 3), "uint8"),
                                 "wrist": ((84, 84, 3), "uint8")}, 6)  # fmt: skip
    assert buf._frames["front"].nbytes > 2e9
    assert rss_bytes() - before < 50e6


def test_buffer_bytes_is_what_a_buffer_allocates():
    for capacity in (1000, 4321):
        buf = ReplayBuffer(capacity, SPEC, 6)
        arrays = [v for v in vars(buf).values() if isinstance(v, np.ndarray)] + list(buf._frames.values())
        assert sum(a.nbytes for a in arrays) == buffer_bytes(capacity, SPEC, 6)


def test_a_buffer_too_big_for_the_memory_is_refused_with_a_capacity_that_fits():
    image = {"ee_pose": ((6,), "float32"), "front": ((84, 84, 3), "uint8"), "wrist": ((84, 84, 3), "uint8")}
    available = 8 * 2**30  # a machine with 8 GiB free: 200k two-camera transitions (~9.9 GiB) do not fit
    with pytest.raises(ConfigError, match=r"train.buffer_capacity=200000 needs 9\.\d GiB .* 8\.0 GiB") as err:
        check_buffer_memory(200_000, image, 6, available=available)
    suggested = int(str(err.value).split("train.buffer_capacity=")[-1].split(",")[0])
    assert 100_000 < suggested < 200_000
    check_buffer_memory(suggested, image, 6, available=available)  # what it suggests fits
    assert buffer_bytes(suggested, image, 6) <= MEMORY_FRACTION * available
    check_buffer_memory(2_000_000, SPEC, 6, available=available)  # small observations: millions fit
    measured = available_memory_bytes()
    assert measured is None or measured > 0


# ----------------------------------------------------------------------------------------------------------------
# What the wire knows of shared next observations spares the comparison and stores the same
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [100, 7])  # 7: a chunk longer than the buffer goes in by pieces
def test_a_continues_hint_stores_exactly_what_comparing_the_rows_stores(capacity):
    rng = np.random.default_rng(5)
    a, b = episode_chunk(rng, 9), episode_chunk(rng, 6, terminal=False)
    chunk = join_chunks(a, b)  # two episodes: row 8's next observation is not row 9's observation
    truth = np.ones(14, bool)
    truth[8] = False
    compared, hinted = ReplayBuffer(capacity, SPEC, ACT), ReplayBuffer(capacity, SPEC, ACT)
    compared.add_many(**chunk)
    hinted.add_many(**chunk, continues=truth)
    assert hinted.frames_stored() == compared.frames_stored()
    assert len(hinted) == len(compared) == min(15, capacity)
    tail = {k: ({j: w[-len(hinted) :] for j, w in v.items()} if isinstance(v, dict) else v[-len(hinted) :])
            for k, v in chunk.items()}  # fmt: skip
    assert_batch_equals_chunk(hinted.take(np.arange(len(hinted))), tail)
    # The hint is what the buffer goes by: "no row continues" keeps every next observation as a frame of its own
    # (memory, not correctness: the rows still read back as added).
    wasteful = ReplayBuffer(capacity, SPEC, ACT)
    wasteful.add_many(**chunk, continues=np.zeros(14, bool))
    assert wasteful.frames_stored() > compared.frames_stored()
    assert_batch_equals_chunk(wasteful.take(np.arange(len(wasteful))), tail)


def test_a_continues_hint_of_the_wrong_shape_or_dtype_is_refused_and_nothing_is_stored():
    rng = np.random.default_rng(6)
    chunk = episode_chunk(rng, 5)
    buf = ReplayBuffer(100, SPEC, ACT)
    for hint in (np.ones(5, bool), np.ones(3, bool), np.ones(4, np.uint8)):
        with pytest.raises(ValueError, match="continues must be a bool array of shape \\[4\\]"):
            buf.add_many(**chunk, continues=hint)
    assert len(buf) == 0 and buf.total_added == 0


# ----------------------------------------------------------------------------------------------------------------
# The device copy: minibatches gathered where the learner runs
# ----------------------------------------------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_device_copy_samples_what_the_host_samples_with_the_same_draws(device):
    rng = np.random.default_rng(21)
    online = ReplayBuffer(40, SPEC, ACT, device=device)
    offline = ReplayBuffer(40, SPEC, ACT, device=device)
    host_online, host_offline = ReplayBuffer(40, SPEC, ACT), ReplayBuffer(40, SPEC, ACT)
    for _ in range(7):  # 63 transitions into 40: the rings wrap and evict
        chunk = episode_chunk(rng, 9, terminal=bool(rng.integers(2)))
        chunk["bc_actions"][rng.random(9) < 0.3] = np.nan  # rows without a BC proposal stay NaN
        online.add_many(**chunk)
        host_online.add_many(**chunk)
    demo = episode_chunk(rng, 30)
    offline.add_many(**demo)
    host_offline.add_many(**demo)
    assert online.device == torch.device(device) and host_online.device is None
    cfg = AgentConfig(method="rlpd", utd=3, batch_size=16)
    on_device = sample_utd_batches(online, offline, cfg, np.random.default_rng(3))
    on_host = sample_utd_batches(host_online, host_offline, cfg, np.random.default_rng(3))
    assert len(on_device) == len(on_host) == 3
    for tensors, batch in zip(on_device, on_host, strict=True):
        assert tensors["actions"].device.type == torch.device(device).type
        assert_tensors_equal_batch(tensors, batch)
    # A gathered minibatch is a copy: adding more (overwriting the slots it was read from) leaves it as it was.
    before = online.take_tensors(np.arange(len(online)))
    kept = {k: v.clone() for k, v in before["obs"].items()}
    for _ in range(5):
        online.add_many(**episode_chunk(rng, 9))
    for key, value in kept.items():
        assert torch.equal(before["obs"][key], value)


def test_host_and_device_buffers_are_not_mixed_and_take_tensors_needs_a_copy():
    rng = np.random.default_rng(22)
    host, copy = ReplayBuffer(20, SPEC, ACT), ReplayBuffer(20, SPEC, ACT, device="cpu")
    for buf in (host, copy):
        buf.add_many(**episode_chunk(rng, 5))
    with pytest.raises(ValueError, match="take_tensors needs a buffer made with a device"):
        host.take_tensors(np.arange(2))
    cfg = AgentConfig(method="rlpd", utd=1, batch_size=4)
    with pytest.raises(ValueError, match="offline buffer is on None, the replay buffer on cpu"):
        sample_utd_batches(copy, host, cfg, np.random.default_rng(0))
    with pytest.raises(IndexError):
        copy.take_tensors(np.array([5]))


def test_replay_device_is_the_cuda_learner_and_refuses_a_copy_that_does_not_fit():
    image = {"ee_pose": ((6,), "float32"), "front": ((84, 84, 3), "uint8"), "wrist": ((84, 84, 3), "uint8")}
    needed = buffer_bytes(200_000, image, 6)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert replay_device(cpu, True, needed, free_bytes=0) is None  # a CPU learner's buffer is already there
    assert replay_device(cuda, False, needed, free_bytes=0) is None  # turned off: host memory only
    assert replay_device(cuda, True, needed, free_bytes=80 * 2**30) == cuda
    with pytest.raises(
        ConfigError, match=r"needs 9\.\d GiB, more than 80% of the 8\.0 GiB free on cuda.*replay_on_gpu=false"
    ):
        replay_device(cuda, True, needed, free_bytes=8 * 2**30)
