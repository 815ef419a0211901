"""The wire format: round trips of every kind, hostile bytes refused with WireError, chunk validation, fingerprints."""

from __future__ import annotations

import contextlib
import math
import warnings

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robot_rl.config import load_config
from robot_rl.wire import (
    DTYPES,
    KINDS,
    PROTOCOL_VERSION,
    Ack,
    Hello,
    Refuse,
    Transitions,
    TransitionSpec,
    VersionError,
    Weights,
    Welcome,
    WireError,
    check_hello,
    config_fingerprint,
    config_hash,
    decode,
    diff_fingerprints,
    encode,
    from_frames,
    from_wire,
    is_joined_frames,
    join_frames,
    pack_tensors,
    parse,
    split_frames,
    to_frames,
    to_wire,
    transition_spec,
    transition_spec_from_space,
    unpack_tensors,
    validate_transitions,
)

LIMIT = 16 << 20
V = PROTOCOL_VERSION  # the envelope version this side speaks
STATE_CONFIG = "configs/sim_peg_state.yaml"


def raw(message: dict) -> bytes:
    """msgpack bytes of a map as a peer might send it, bypassing encode's checks."""
    return msgpack.packb(message, use_bin_type=True)


def nd(dtype: str, shape: list, data: bytes) -> dict:
    return {"__nd__": 1, "dtype": dtype, "shape": shape, "data": data}


def chunk(spec: TransitionSpec, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid chunk of n random transitions for spec."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in spec.arrays(n).items():
        if dtype == "uint8":
            out[name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif dtype == "bool":
            out[name] = rng.random(shape) < 0.5
        elif dtype == "int64":
            out[name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            out[name] = rng.standard_normal(shape).astype(dtype)
    out["bc_actions"][0] = np.nan
    return out


@pytest.fixture(scope="module")
def cfg():
    return load_config(STATE_CONFIG)


@pytest.fixture(scope="module")
def image_spec() -> TransitionSpec:
    return TransitionSpec(
        obs={"ee_pose": ((6,), "float32"), "front": ((3, 84, 84), "uint8"), "wrist": ((3, 84, 84), "uint8")},
        action_dim=6,
    )


def hello_for(cfg, **changes) -> Hello:
    fp = config_fingerprint(cfg)
    fields = {"actor_id": "actor-0", "run_id": "run.1", "config_hash": config_hash(fp), "config_fingerprint": fp}
    fields.update(changes)
    return Hello(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------
def every_kind(spec: TransitionSpec, cfg) -> list:
    state = {"w": torch.randn(4, 3), "b": torch.zeros(3), "steps": torch.tensor([7], dtype=torch.int64)}
    return [
        hello_for(cfg),
        Welcome(learner_id="learner", phase="online", weights_version=3, acked_seq=-1),
        Refuse(reason="config differs", fields=["agent.hidden"]),
        Transitions(actor_id="a", run_id="r", first_seq=5, count=4, arrays=chunk(spec, 4)),
        Ack(actor_id="a", run_id="r", acked_seq=8),
        Weights(version=2, phase="qest_rollouts", tensors=pack_tensors(state)),
    ]


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name in type(a).model_fields:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert set(x) == set(y)
            for key in x:
                assert y[key].dtype == x[key].dtype and y[key].shape == x[key].shape
                np.testing.assert_array_equal(y[key], x[key])
        else:
            assert x == y, name


def test_every_kind_round_trips(cfg, image_spec):
    for message in every_kind(image_spec, cfg):
        back = from_wire(to_wire(message), max_bytes=LIMIT)
        assert_same(message, back)


def test_decoded_arrays_are_read_only_and_transitions_validate(image_spec):
    msg = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=chunk(image_spec, 30))
    back = from_wire(to_wire(msg), max_bytes=LIMIT)
    assert isinstance(back, Transitions) and back.last_seq == 29
    validate_transitions(back, image_spec)
    with pytest.raises(ValueError):
        back.arrays["actions"][0, 0] = 1.0


def test_decoded_arrays_do_not_alias_the_received_buffer():
    frame = bytearray(to_wire(Weights(version=0, phase="online", tensors={"x": np.arange(4, dtype=np.float32)})))
    msg = from_wire(memoryview(frame), max_bytes=LIMIT)
    frame[:] = b"\xff" * len(frame)
    np.testing.assert_array_equal(msg.tensors["x"], np.arange(4, dtype=np.float32))


def test_decode_checks_the_envelope_and_parse_the_fields():
    message = decode(encode({"kind": "ack", "actor_id": "a", "run_id": "r", "acked_seq": 3}), max_bytes=LIMIT)
    assert message == {"kind": "ack", "v": PROTOCOL_VERSION, "actor_id": "a", "run_id": "r", "acked_seq": 3}
    assert parse(message) == Ack(actor_id="a", run_id="r", acked_seq=3)


array_strategy = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda wire: hnp.arrays(
        dtype=np.dtype(wire),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": True} if np.dtype(wire).kind == "f" else None,
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "__nd__"), array_strategy, max_size=4),
    big_endian=st.booleans(),
)
def test_arrays_of_every_wire_dtype_and_shape_round_trip(arrays, big_endian):
    sent = {k: a.astype(a.dtype.newbyteorder(">")) if big_endian else a for k, a in arrays.items()}
    back = from_wire(to_wire(Weights(version=0, phase="online", tensors=sent)), max_bytes=LIMIT)
    assert set(back.tensors) == set(arrays)
    for key, array in arrays.items():
        got = back.tensors[key]
        assert got.dtype == array.dtype.newbyteorder("<") and got.shape == array.shape
        np.testing.assert_array_equal(got, array)


def test_encode_refuses_what_the_wire_does_not_carry():
    with pytest.raises(WireError, match="complex128"):
        encode({"kind": "weights", "version": 0, "phase": "online", "tensors": {"x": np.zeros(2, np.complex128)}})
    with pytest.raises(WireError, match="Tensor"):
        encode({"kind": "weights", "version": 0, "phase": "online", "tensors": {"x": torch.zeros(2)}})
    with pytest.raises(WireError, match="unknown kind"):
        encode({"kind": "shutdown"})
    with pytest.raises(WireError, match="protocol"):
        encode({"kind": "ack", "v": PROTOCOL_VERSION + 1})


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------------------------------
def refuse(data: bytes, match: str, max_bytes: int = LIMIT) -> None:
    with pytest.raises(WireError, match=match):
        from_wire(data, max_bytes=max_bytes)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_raise_only_wire_error(data):
    with contextlib.suppress(WireError):
        from_wire(data, max_bytes=LIMIT)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=16),
    st.sampled_from(["<f4", "|u1", "|b1", "|O", "online", "__nd__"]),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["__nd__", "dtype", "shape", "data", "x", "obs/a"]), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), fields=st.dictionaries(st.text(max_size=12), trees, max_size=6))
def test_structured_hostile_messages_raise_only_wire_error(kind, fields):
    with contextlib.suppress(WireError):
        from_wire(raw({**fields, "kind": kind, "v": PROTOCOL_VERSION}), max_bytes=LIMIT)


def mutated(base: bytes, data: st.DataObject) -> bytes:
    out = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(out) - 1))
        out[i] = data.draw(st.integers(0, 255))
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_and_truncated_valid_messages_raise_only_wire_error(cfg, data):
    spec = TransitionSpec(obs={"ee_pose": ((6,), "float32")}, action_dim=6)
    base = data.draw(st.sampled_from([to_wire(m) for m in every_kind(spec, cfg)]))
    candidate = data.draw(st.one_of(st.just(base[: data.draw(st.integers(0, len(base) - 1))]), st.just(None)))
    if candidate is None:
        candidate = mutated(base, data)
    try:
        msg = from_wire(candidate, max_bytes=LIMIT)
        if isinstance(msg, Transitions):
            validate_transitions(msg, spec)
    except WireError:
        pass


def test_truncated_message_is_refused(cfg):
    data = to_wire(hello_for(cfg))
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        refuse(data[:cut], "not a msgpack message")


def test_oversized_message_is_refused_before_parsing():
    refuse(b"\x00" * 101, "exceeds the limit of 100 bytes", max_bytes=100)


def test_declared_lengths_beyond_the_data_are_refused_without_allocating():
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff"):
        refuse(header + b"\x00" * 16, "not a msgpack message", max_bytes=1024)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (nd("<f4", [10**9, 10**9], b""), "needs 4000000000000000000 bytes, got 0"),
        (nd("<f4", [2**31 - 1] * 8, b"\x00" * 8), "needs .* bytes, got 8"),
        (nd("<f4", [-1], b""), "integers in"),
        (nd("<f4", [0, 2**40], b""), "integers in"),
        (nd("<f4", [0, 2**64 - 1], b""), "integers in"),
        (nd("<f4", [1.5], b"\x00" * 4), "integers in"),
        (nd("<f4", [True], b"\x00" * 4), "integers in"),
        (nd("<f4", [None], b"\x00" * 4), "integers in"),
        (nd("<f4", [1] * 9, b"\x00" * 4), "at most 8"),
        (nd("<f4", "4", b"\x00" * 4), "list"),
        (nd("<f4", [3], b"\x00" * 4), "needs 12 bytes, got 4"),
        (nd("|O", [1], b"\x00" * 8), "dtype '|O' is not allowed"),
        (nd("|V8", [1], b"\x00" * 8), "dtype '|V8' is not allowed"),
        (nd(">f4", [1], b"\x00" * 4), "not allowed"),
        (nd("float32", [1], b"\x00" * 4), "not allowed"),
        (nd("<c16", [1], b"\x00" * 16), "not allowed"),
        (nd(["<f4"], [1], b"\x00" * 4), "not allowed"),
        (nd("|b1", [2], b"\x00\x02"), "bool array"),
        (nd("<f4", [1], "abcd"), "must be bytes"),
        ({"__nd__": 1, "dtype": "<f4", "shape": [1]}, "exactly"),
        ({**nd("<f4", [1], b"\x00" * 4), "strides": [4]}, "exactly"),
        ({**nd("<f4", [1], b"\x00" * 4), "__nd__": 2}, "exactly"),
        ({**nd("<f4", [1], b"\x00" * 4), "__nd__": True}, "exactly"),
        ({"__nd__": nd("<f4", [1], b"\x00" * 4)}, "exactly"),
    ],
)
def test_malformed_arrays_are_refused(array, match):
    message = {"kind": "weights", "v": PROTOCOL_VERSION, "version": 0, "phase": "online", "tensors": {"x": array}}
    refuse(raw(message), match)


def test_ext_types_are_refused():
    prefix = raw({"kind": "ack", "v": 1, "actor_id": "a", "run_id": "r", "acked_seq": 1, "x": None})[:-1]
    for ext in (b"\xd6\xff" + b"\x00" * 4, b"\xd6\x01" + b"\x00" * 4, b"\xc7\x00\x05", b"\xc8\x00\x01\x05\x00"):
        refuse(prefix + ext, "not a msgpack message|extension")


def test_nesting_bombs_are_refused():
    deep: object = "x"
    for _ in range(40):
        deep = {"a": deep}
    refuse(raw({"kind": "hello", "v": 1, "config_fingerprint": deep}), "deeper than")
    refuse(b"\x91" * 100_000 + b"\xc0", "not a msgpack message")  # beyond msgpack's own stack limit
    nested: object = 1
    for _ in range(20):
        nested = [nested]
    refuse(raw({"kind": "hello", "v": 1, "x": nested}), "deeper than")


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ([1, 2, 3], "top level must be a map, got list"),
        ("ack", "top level must be a map, got str"),
        (nd("<f4", [1], b"\x00" * 4), "top level must be a map, got ndarray"),
        ({"v": V, "acked_seq": 1}, "missing or unknown kind"),
        ({"kind": "shutdown", "v": V}, "unknown kind 'shutdown'"),
        ({"kind": 3, "v": V}, "unknown kind"),
        (
            {"kind": "ack", "v": 1, "actor_id": "a", "run_id": "r", "acked_seq": 1},
            f"v: protocol version 1, this side speaks {V}",
        ),
        ({"kind": "ack", "actor_id": "a", "run_id": "r", "acked_seq": 1}, "v: protocol version None"),
        ({"kind": "ack", "v": True, "actor_id": "a", "run_id": "r", "acked_seq": 1}, "v: protocol version True"),
        ({"kind": "ack", "v": V, "actor_id": "a", "run_id": "r", "acked_seq": 1, "extra": 1}, "ack.extra"),
        ({"kind": "ack", "v": V, "actor_id": "a", "run_id": "r", "acked_seq": "1"}, "ack.acked_seq"),
        ({"kind": "ack", "v": V, "actor_id": "a", "run_id": "r", "acked_seq": -2}, "ack.acked_seq"),
        ({"kind": "ack", "v": V, "actor_id": "a/../b", "run_id": "r", "acked_seq": 1}, "ack.actor_id"),
        ({"kind": "ack", "v": V, "actor_id": "a" * 65, "run_id": "r", "acked_seq": 1}, "ack.actor_id"),
        ({"kind": "ack", "v": V, "actor_id": "a", "acked_seq": 1}, "ack.run_id"),
        (
            {"kind": "welcome", "v": V, "learner_id": "l", "phase": "train", "weights_version": 0, "acked_seq": 0},
            "phase",
        ),
        ({"kind": "weights", "v": V, "version": 0, "phase": "online", "tensors": {"x": [1.0]}}, "weights.tensors.x"),
        (
            {"kind": "hello", "v": V, "actor_id": "a", "run_id": "r", "config_hash": "00", "config_fingerprint": {}},
            "hash",
        ),
        (
            {"kind": "transitions", "v": V, "actor_id": "a", "run_id": "r", "first_seq": -1, "count": 1, "arrays": {}},
            "first",
        ),
        ({1: "ack"}, "not a msgpack message"),
        ({b"kind": "ack", "v": V}, "keys must be strings"),
        ({"kind": "ack", "v": V, "x": {b"__nd__": 1, "__nd__": 1}}, "keys must be strings"),
    ],
)
def test_bad_envelopes_and_fields_are_refused(message, match):
    refuse(raw(message), match)


def test_non_bytes_is_refused():
    with pytest.raises(WireError, match="expected bytes"):
        decode("ack", max_bytes=LIMIT)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# Chunk validation
# ---------------------------------------------------------------------------------------------------------------------
def transitions(arrays: dict[str, np.ndarray], count: int) -> Transitions:
    return Transitions(actor_id="a", run_id="r", first_seq=0, count=count, arrays=arrays)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(actions=a["actions"].astype(np.float64)), "transitions.actions: dtype float64, expected"),
        (lambda a: a.update({"obs/front": a["obs/front"].astype(np.float32)}), r"obs/front: dtype float32"),
        (lambda a: a.update({"obs/front": a["obs/front"].transpose(0, 2, 3, 1)}), r"obs/front: shape \[5, 84, 84, 3\]"),
        (lambda a: a.update(rewards=a["rewards"][:4]), r"rewards: shape \[4\], expected \[5\]"),
        (lambda a: a.update(terminated=a["terminated"].astype(np.uint8)), "terminated: dtype uint8"),
        (lambda a: a.pop("next_obs/wrist"), "next_obs/wrist: missing"),
        (lambda a: a.update(extra=np.zeros(5)), "transitions.extra: unexpected"),
        (lambda a: a["rewards"].__setitem__(2, np.nan), "rewards: holds non-finite"),
        (lambda a: a["obs/ee_pose"].__setitem__((1, 3), np.inf), "obs/ee_pose: holds non-finite"),
        (lambda a: a["next_obs/ee_pose"].__setitem__((1, 3), -np.inf), "next_obs/ee_pose: holds non-finite"),
        (lambda a: a["actions"].__setitem__((0, 0), np.nan), "actions: holds non-finite"),
        (lambda a: a["bc_actions"].__setitem__((1, 0), np.nan), "bc_actions: each row"),
        (lambda a: a["bc_actions"].__setitem__((1, 0), np.inf), "bc_actions: each row"),
        (lambda a: a["weights_version"].__setitem__(0, -5), "weights_version"),
    ],
)
def test_validate_transitions_names_the_field(image_spec, change, match):
    arrays = chunk(image_spec, 5)
    change(arrays)
    msg = from_wire(to_wire(transitions(arrays, 5)), max_bytes=LIMIT)
    with pytest.raises(WireError, match=match):
        validate_transitions(msg, image_spec)


def test_validate_transitions_checks_count_against_arrays_and_limit(image_spec):
    with pytest.raises(WireError, match=r"shape \[5, 6\], expected \[6, 6\]"):
        validate_transitions(transitions(chunk(image_spec, 5), 6), image_spec)
    with pytest.raises(WireError, match="count: 5 exceeds the chunk limit of 4"):
        validate_transitions(transitions(chunk(image_spec, 5), 5), image_spec, max_count=4)
    validate_transitions(transitions(chunk(image_spec, 5), 5), image_spec, max_count=5)


def test_spec_of_the_config_matches_the_env_it_builds(cfg):
    from robot_rl.envs import make_env

    env = make_env(cfg.env)
    try:
        assert transition_spec(cfg) == transition_spec_from_space(env.observation_space, env.action_space)
    finally:
        env.close()


def test_spec_from_a_dict_space_with_cameras():
    space = gym.spaces.Dict(
        {
            "ee_pose": gym.spaces.Box(-1, 1, (6,), np.float32),
            "front": gym.spaces.Box(0, 255, (84, 84, 3), np.uint8),
        }
    )
    spec = transition_spec_from_space(space, gym.spaces.Box(-1, 1, (7,), np.float32))
    assert spec.obs == {"ee_pose": ((6,), "float32"), "front": ((84, 84, 3), "uint8")}
    assert spec.action_dim == 7
    assert spec.transition_bytes() == 2 * (24 + 84 * 84 * 3) + 2 * 28 + 4 + 2 + 8
    with pytest.raises(ValueError, match="dtype"):
        transition_spec_from_space(
            gym.spaces.Dict({"x": gym.spaces.Box(0, 1, (2,), np.float16)}), gym.spaces.Box(-1, 1, (6,))
        )


def test_spec_of_a_camera_config():
    cfg = load_config(STATE_CONFIG, ["env.cameras=[{name: front, out_size: 64}, {name: wrist}]"])
    spec = transition_spec(cfg)
    assert spec.obs == {"ee_pose": ((6,), "float32"), "front": ((64, 64, 3), "uint8"), "wrist": ((84, 84, 3), "uint8")}


# ---------------------------------------------------------------------------------------------------------------------
# Config fingerprint and handshake
# ---------------------------------------------------------------------------------------------------------------------
def test_fingerprint_diff_names_the_changed_network_size(cfg):
    other = load_config(STATE_CONFIG, ["agent.hidden=[256, 256]", "agent.num_critics=5"])
    a, b = config_fingerprint(cfg), config_fingerprint(other)
    assert diff_fingerprints(a, b) == ["agent.hidden", "agent.num_critics"]
    assert config_hash(a) != config_hash(b)
    refusal = check_hello(hello_for(other), a)
    assert isinstance(refusal, Refuse) and refusal.fields == ["agent.hidden", "agent.num_critics"]
    assert "agent.hidden" in refusal.reason


def test_fingerprint_ignores_seed_paths_budgets_eval_and_serials(cfg):
    other = load_config(
        STATE_CONFIG,
        [
            "seed=7",
            "train.env_steps=5",
            "train.eval_every=3",
            "train.eval_episodes=1",
            "train.device=auto",
            "agent.critic_lr=0.1",
            "bc.steps=1",
            "qest.rollouts=2",
            "expert.action_noise=0.0",
            "env.operator.kind=keys",
            "env.franka.host=10.0.0.1",
        ],
    )
    assert config_fingerprint(cfg) == config_fingerprint(other)
    assert check_hello(hello_for(other), config_fingerprint(cfg)) is None
    with_serial = load_config(STATE_CONFIG, ["env.cameras=[{name: front, serial: '123', fps: 15}]"])
    no_serial = load_config(STATE_CONFIG, ["env.cameras=[{name: front}]"])
    assert config_hash(config_fingerprint(with_serial)) == config_hash(config_fingerprint(no_serial))


def test_fingerprint_sees_camera_safety_and_reward_changes(cfg):
    base = config_fingerprint(load_config(STATE_CONFIG, ["env.cameras=[{name: front}]"]))
    for override, path in [
        ("env.cameras=[{name: front, out_size: 64}]", "env.cameras.front.out_size"),
        ("env.cameras=[{name: front, crop: {x: 0}}]", "env.cameras.front.crop.x"),
        ("env.cameras=[{name: side}]", "env.cameras.side.out_size"),
        ("env.safety.xyz_high=[0.05, 0.05, 0.07]", "env.safety.xyz_high"),
        ("agent.reward_scale=1.0", "agent.reward_scale"),
    ]:
        changed = config_fingerprint(load_config(STATE_CONFIG, ["env.cameras=[{name: front}]", override]))
        assert path in diff_fingerprints(base, changed), override


def test_fingerprint_values_are_canonical_json(cfg):
    fp = config_fingerprint(cfg)
    assert fp["agent.hidden"] == "[128,128]"
    assert fp["obs.ee_pose"] == '[[6],"float32"]'
    assert diff_fingerprints({"a": "1"}, {"a": "1", "b": "2"}) == ["b"]
    assert diff_fingerprints({"a": "1", "c": "3"}, {"a": "2"}) == ["a", "c"]


def test_hello_whose_hash_does_not_match_its_fingerprint_is_refused(cfg):
    hello = hello_for(cfg, config_hash="0" * 64)
    refusal = check_hello(hello, config_fingerprint(cfg))
    assert refusal is not None and "does not match" in refusal.reason


# ---------------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------------
def test_tensors_round_trip_into_a_module():
    source, target = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    msg = Weights(version=1, phase="online", tensors=pack_tensors(source.state_dict()))
    back = from_wire(to_wire(msg), max_bytes=LIMIT)
    target.load_state_dict(unpack_tensors(back.tensors))
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)
    restored = unpack_tensors(back.tensors)["weight"]
    restored += 1  # a writable copy, not a view of the message
    assert torch.equal(target.weight, source.weight)


def test_half_precision_travels_as_float32_and_loads_back():
    bf = torch.nn.Linear(4, 2).to(torch.bfloat16)
    arrays = pack_tensors(bf.state_dict())
    assert all(a.dtype == np.float32 for a in arrays.values())
    loaded = torch.nn.Linear(4, 2).to(torch.bfloat16)
    loaded.load_state_dict(unpack_tensors(arrays))
    assert torch.equal(loaded.weight, bf.weight)


def test_tensors_of_other_dtypes_are_refused():
    with pytest.raises(WireError, match="int8"):
        pack_tensors({"x": torch.zeros(2, dtype=torch.int8)})


def test_weights_payload_size_is_raw_bytes():
    tensors = {"w": np.zeros((256, 256), np.float32)}
    data = to_wire(Weights(version=0, phase="online", tensors=tensors))
    assert math.isclose(len(data), 256 * 256 * 4, rel_tol=0.001)


def test_the_array_marker_key_is_reserved_on_encode():
    with pytest.raises(WireError, match="reserved for arrays"):
        encode({"kind": "weights", "version": 1, "phase": "online", "tensors": {"__nd__": np.zeros(2, np.float32)}})


# ---------------------------------------------------------------------------------------------------------------------
# Weights in several frames (protocol 2)
# ---------------------------------------------------------------------------------------------------------------------
def weights_frames(tensors: dict[str, np.ndarray] | None = None) -> list[bytes]:
    """The frames of a weights message as a receiver gets them (bytes)."""
    tensors = tensors if tensors is not None else {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    return [bytes(f) for f in to_frames(Weights(version=4, phase="online", tensors=tensors))]


def header(tensors: list, **fields) -> bytes:
    """A weights header frame as a peer might write it."""
    return raw({"kind": "weights", "v": V, "version": 1, "phase": "online", "tensors": tensors, **fields})


def test_weights_travel_as_a_header_and_one_raw_frame_per_tensor():
    sent = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([True, False]),
        "c": np.arange(3, dtype=">i8"),  # big-endian: sent little-endian
        "empty": np.zeros((0, 5), np.float32),
    }
    frames = to_frames(Weights(version=7, phase="eval", tensors=sent))
    assert len(frames) == 1 + len(sent)
    assert [memoryview(f).nbytes for f in frames[1:]] == [48, 2, 24, 0]  # raw bytes, nothing around them
    received = [bytearray(f) for f in frames]  # private buffers, as recv_multipart(copy=False) gives
    msg = from_frames(received, max_bytes=LIMIT)
    assert isinstance(msg, Weights) and (msg.version, msg.phase) == (7, "eval")
    for name, array in sent.items():
        np.testing.assert_array_equal(msg.tensors[name], array)
        assert msg.tensors[name].dtype == array.dtype.newbyteorder("<")
    # Arrays are views over the received frames (no copy) and read-only.
    assert np.shares_memory(msg.tensors["a"], np.frombuffer(received[1], np.uint8))
    with pytest.raises(ValueError):
        msg.tensors["a"][0, 0] = 1.0


def test_other_kinds_travel_in_one_frame_and_from_frames_reads_them():
    ack = Ack(actor_id="a", run_id="r", acked_seq=3)
    assert to_frames(ack) == [to_wire(ack)]
    assert from_frames([to_wire(ack)], max_bytes=LIMIT) == ack


F4x2 = {"name": "w", "dtype": "<f4", "shape": [2]}


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([header([F4x2]), b"\x00" * 4], r"needs 8 bytes, got 4"),  # a truncated tensor frame
        ([header([F4x2]), b"\x00" * 12], r"needs 8 bytes, got 12"),  # more bytes than the header says
        ([header([{**F4x2, "shape": [2**31 - 1, 2**31 - 1]}]), b"\x00" * 8], r"needs \d+ bytes, got 8"),
        ([header([F4x2, {**F4x2, "name": "v"}]), b"\x00" * 8], "lists 2 arrays for 1 array frames"),
        ([header([F4x2]), b"\x00" * 8, b"\x00" * 8], "lists 1 arrays for 2 array frames"),
        ([header([F4x2, F4x2]), b"\x00" * 8, b"\x00" * 8], "is not a new name"),
        ([header([{**F4x2, "dtype": "|O"}]), b"\x00" * 8], "dtype '|O' is not allowed"),
        ([header([{**F4x2, "dtype": "<f4 "}]), b"\x00" * 8], "is not allowed"),
        ([header([{**F4x2, "shape": [-2]}]), b"\x00" * 8], "integers in"),
        ([header([{**F4x2, "shape": "2"}]), b"\x00" * 8], "must be a list"),
        ([header([{**F4x2, "data": b""}]), b"\x00" * 8], "must hold exactly"),
        ([header([{"name": "b", "dtype": "|b1", "shape": [2]}]), b"\x01\x02"], "bytes other than 0 and 1"),
        ([header([{**F4x2, "name": ""}]), b"\x00" * 8], "is not a new name"),
        ([header({"w": F4x2}), b"\x00" * 8], "lists"),
        ([header([F4x2], version=-1), b"\x00" * 8], "weights.version"),
        (
            [raw({"kind": "ack", "v": V, "actor_id": "a", "run_id": "r", "acked_seq": 1}), b"x"],
            "only weights and transitions",
        ),
        ([header([F4x2])[:-3], b"\x00" * 8], "not a msgpack message"),
        ([raw({"kind": "weights", "v": 1, "version": 1, "phase": "online", "tensors": [F4x2]}), b"\x00" * 8], "v: "),
        ([header([F4x2])], "weights.tensors"),  # a header alone is not a weights message
        ([], "empty multipart"),
    ],
)
def test_weights_frames_with_a_lying_or_broken_header_are_refused(frames, match):
    with pytest.raises(WireError, match=match):
        from_frames(frames, max_bytes=LIMIT)


def test_weights_frames_over_the_size_limit_are_refused_before_decoding():
    frames = weights_frames({"w": np.zeros(1000, np.float32)})
    with pytest.raises(WireError, match="exceeds the limit"):
        from_frames(frames, max_bytes=3000)  # each frame is below the limit, together they are not


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_corrupted_weights_frames_raise_only_wire_error(data):
    frames = weights_frames({"a": np.arange(4, dtype=np.float32), "b": np.array([True, False, True])})
    i = data.draw(st.integers(0, len(frames) - 1))
    cut = data.draw(st.integers(0, len(frames[i])))
    frames[i] = mutated(frames[i], data) if frames[i] and data.draw(st.booleans()) else frames[i][:cut]
    with contextlib.suppress(WireError):
        from_frames(frames, max_bytes=LIMIT)


def test_pack_tensors_is_a_snapshot_of_cpu_tensors():
    """to_frames sends the arrays' memory later, without copying: a learner step must not change what is sent."""
    weight = torch.zeros(3)
    arrays = pack_tensors({"w": weight, "h": torch.ones(2, dtype=torch.float16)})
    frames = to_frames(Weights(version=0, phase="online", tensors=arrays))
    weight += 5.0  # the learner goes on training after publishing
    msg = from_frames([bytes(f) for f in frames], max_bytes=LIMIT)
    np.testing.assert_array_equal(msg.tensors["w"], np.zeros(3, np.float32))
    assert msg.tensors["h"].dtype == np.float32


def test_unpack_without_copy_shares_the_frames_memory_and_loads_silently():
    received = [bytearray(f) for f in to_frames(Weights(version=0, phase="online", tensors={"w": np.ones(4, "<f4")}))]
    msg = from_frames(received, max_bytes=LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about a non-writable buffer would fail here
        shared = unpack_tensors(msg.tensors, copy=False)["w"]
    copied = unpack_tensors(msg.tensors)["w"]
    received[1][:4] = np.float32(7.0).tobytes()  # proves which tensor looks at the frame
    assert shared[0].item() == 7.0 and copied[0].item() == 1.0
    module = torch.nn.Linear(4, 1, bias=False)
    module.load_state_dict({"weight": shared.view(1, 4)})
    assert module.weight.data_ptr() != shared.data_ptr()  # loading copied into the parameter


def test_other_protocol_versions_are_refused_unless_accepted():
    v1 = raw({"kind": "ack", "v": 1, "actor_id": "a", "run_id": "r", "acked_seq": 1})
    with pytest.raises(VersionError, match=f"protocol version 1, this side speaks {V}"):
        from_wire(v1, max_bytes=LIMIT)
    assert from_wire(v1, max_bytes=LIMIT, versions=(1, 2)) == Ack(actor_id="a", run_id="r", acked_seq=1)


# ---------------------------------------------------------------------------------------------------------------------
# Next observations that repeat the following observation are sent once (protocol 2)
# ---------------------------------------------------------------------------------------------------------------------
def trajectory(spec: TransitionSpec, n: int, *, seed: int = 0, breaks: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """A chunk whose next_obs[i] is obs[i + 1] (consecutive steps), except at the rows in `breaks` and the last."""
    arrays = chunk(spec, n, seed=seed)
    for key in spec.obs:
        nxt = arrays[f"next_obs/{key}"]
        keep = {n - 1, *breaks}
        for i in range(n - 1):
            if i not in keep:
                nxt[i] = arrays[f"obs/{key}"][i + 1]
    return arrays


def wire_map(message: Transitions) -> dict:
    return msgpack.unpackb(to_wire(message), raw=False)


def test_shared_next_observations_travel_once_and_come_back_whole(image_spec):
    arrays = trajectory(image_spec, 30, breaks=(9,))
    msg = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=arrays)
    unrelated = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=chunk(image_spec, 30))
    assert len(to_wire(msg)) < 0.55 * len(to_wire(unrelated))  # the images' next observations are not sent twice
    sent = wire_map(msg)
    shared = np.frombuffer(sent["next_obs_shared"]["data"], bool)
    assert shared.sum() == 28 and not shared[9] and not shared[29]
    assert sent["arrays"]["next_obs/front"]["shape"][0] == 2  # rows 9 and 29 only
    back = from_wire(to_wire(msg), max_bytes=LIMIT)
    validate_transitions(back, image_spec)
    for name, array in arrays.items():
        np.testing.assert_array_equal(back.arrays[name], array, err_msg=name)
        assert not back.arrays[name].flags.writeable
    assert "next_obs_shared" not in wire_map(unrelated)


@pytest.fixture
def share_small(monkeypatch):
    """Share rows of chunks of any size (the tests below use small observations)."""
    import robot_rl.wire

    monkeypatch.setattr(robot_rl.wire, "MIN_SHARED_BYTES", 0)


def test_small_chunks_are_sent_whole(cfg):
    spec = transition_spec(cfg)
    message = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=trajectory(spec, 30))
    assert "next_obs_shared" not in wire_map(message)  # 720 bytes of next observations: not worth the time
    back = from_wire(to_wire(message), max_bytes=LIMIT)
    np.testing.assert_array_equal(back.arrays["next_obs/ee_pose"], message.arrays["next_obs/ee_pose"])


@pytest.mark.usefixtures("share_small")
def test_only_bit_identical_rows_are_shared():
    spec = TransitionSpec(obs={"p": ((2,), "float32")}, action_dim=1)
    arrays = trajectory(spec, 4)
    arrays["obs/p"][1:] = [[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]
    arrays["next_obs/p"][:3] = [[-0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]  # -0.0 == 0.0, but not the same bits
    back = from_wire(
        to_wire(Transitions(actor_id="a", run_id="r", first_seq=0, count=4, arrays=arrays)), max_bytes=LIMIT
    )
    assert np.signbit(back.arrays["next_obs/p"][0, 0])  # kept as sent, not rebuilt from obs
    np.testing.assert_array_equal(back.arrays["next_obs/p"], arrays["next_obs/p"])  # NaN rows compare by bits


def shared_map(spec: TransitionSpec, **change) -> dict:
    """A transitions map with next_obs_shared, as a peer might alter it."""
    message = wire_map(Transitions(actor_id="a", run_id="r", first_seq=0, count=4, arrays=trajectory(spec, 4)))
    for path, value in change.items():
        *parents, leaf = path.split(".")
        node = message
        for key in parents:
            node = node[key]
        node[leaf] = value
    return message


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"next_obs_shared": nd("|b1", [3], b"\x01\x01\x00")}, "shape \\[4\\]"),
        ({"next_obs_shared": nd("|b1", [4], b"\x01\x01\x01\x01")}, "False at the end"),
        ({"next_obs_shared": nd("|u1", [4], b"\x01\x01\x01\x00")}, "bool array"),
        ({"next_obs_shared": [True, True, True, False]}, "bool array"),
        (
            {"next_obs_shared": nd("|b1", [4], b"\x01\x00\x01\x00")},
            r"next_obs/p: \[1, 2\] float32 sent, expected \[2, 2\]",
        ),
        ({"arrays.next_obs/p": nd("<f8", [1, 2], b"\x00" * 16)}, "float64 sent"),
        ({"arrays.obs/p": nd("<f4", [3, 2], b"\x00" * 24)}, "matching obs array of 4 rows"),
        ({"count": "4"}, "integer count"),
        ({"arrays": [1]}, "arrays map"),
    ],
)
@pytest.mark.usefixtures("share_small")
def test_broken_shared_next_observations_are_refused(change, match):
    spec = TransitionSpec(obs={"p": ((2,), "float32")}, action_dim=1)
    with pytest.raises(WireError, match=match):
        from_wire(raw(shared_map(spec, **change)), max_bytes=LIMIT)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
@pytest.mark.usefixtures("share_small")
def test_corrupted_messages_with_shared_rows_raise_only_wire_error(data):
    spec = TransitionSpec(obs={"p": ((2,), "float32"), "q": ((1,), "uint8")}, action_dim=1)
    base = to_wire(Transitions(actor_id="a", run_id="r", first_seq=0, count=5, arrays=trajectory(spec, 5, breaks=(2,))))
    with contextlib.suppress(WireError):
        validate_transitions(from_wire(mutated(base, data), max_bytes=LIMIT), spec)


# ---------------------------------------------------------------------------------------------------------------------
# Transitions in frames (protocol 3), and frames joined into one byte string (spill and log)
# ---------------------------------------------------------------------------------------------------------------------
def test_transitions_travel_as_a_header_and_one_frame_per_array_and_come_back_whole(image_spec):
    arrays = trajectory(image_spec, 30, breaks=(9,))
    msg = Transitions(actor_id="a", run_id="r", first_seq=5, count=30, arrays=arrays)
    frames = to_frames(msg)
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["kind"] == "transitions" and header["v"] == V
    names = [spec["name"] for spec in header["arrays"]]
    assert len(frames) == 1 + len(names) == 1 + len(arrays)
    front = names.index("obs/front")
    assert bytes(frames[1 + front]) == arrays["obs/front"].tobytes()  # the array's bytes as they are
    assert memoryview(frames[1 + names.index("next_obs/front")]).nbytes == 2 * 84 * 84 * 3  # rows 9 and 29 only
    assert sum(memoryview(f).nbytes for f in frames) < 0.55 * sum(a.nbytes for a in arrays.values())
    back = from_frames([bytes(f) for f in frames], max_bytes=LIMIT)
    assert isinstance(back, Transitions) and (back.first_seq, back.count) == (5, 30)
    validate_transitions(back, image_spec)
    for name, array in arrays.items():
        np.testing.assert_array_equal(back.arrays[name], array, err_msg=name)
        assert not back.arrays[name].flags.writeable
    # The same message with its arrays inline in one frame (how protocol 2 sent it) reads the same.
    inline = from_frames([to_wire(msg)], max_bytes=LIMIT)
    for name, array in arrays.items():
        np.testing.assert_array_equal(inline.arrays[name], array, err_msg=name)


def transitions_frames(spec: TransitionSpec, **change) -> list[bytes]:
    """The frames of a 4-transition chunk, with header fields changed as a peer might."""
    frames = [
        bytes(f) for f in to_frames(Transitions(actor_id="a", run_id="r", first_seq=0, count=4, arrays=chunk(spec, 4)))
    ]
    header = msgpack.unpackb(frames[0], raw=False)
    header.update(change)
    return [raw(header), *frames[1:]]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f[:-1], "lists 8 arrays for 7 array frames"),
        (lambda f: [*f, b"\x00"], "lists 8 arrays for 9 array frames"),
        (lambda f: [f[0], f[1][:-4], *f[2:]], r"obs/ee_pose \(frame 1\): .* needs 96 bytes, got 92"),
        (lambda f: [f[0], f[1] + b"\x00" * 4, *f[2:]], "needs 96 bytes, got 100"),
        (lambda f: [f[0][:-2], *f[1:]], "not a msgpack message"),
    ],
)
def test_transitions_frames_that_disagree_with_their_header_are_refused(cfg, edit, match):
    with pytest.raises(WireError, match=match):
        from_frames(edit(transitions_frames(transition_spec(cfg))), max_bytes=LIMIT)


def test_transitions_headers_that_lie_are_refused(cfg):
    spec = transition_spec(cfg)
    good = msgpack.unpackb(transitions_frames(spec)[0], raw=False)["arrays"]
    for change, match in [
        ({"arrays": [{**good[0], "shape": [4, 6000]}, *good[1:]]}, "needs 96000 bytes"),
        ({"arrays": [{**good[0], "dtype": "|O"}, *good[1:]]}, "not allowed"),
        ({"arrays": [good[1], *good[1:]]}, "is not a new name"),
        ({"arrays": {"x": good[0]}}, "arrays: the header lists"),
        ({"count": 5}, "shape \\[4, 6\\], expected \\[5, 6\\]"),
        ({"v": 2}, "protocol version 2"),
    ]:
        frames = transitions_frames(spec, **change)
        with pytest.raises(WireError, match=match):
            msg = from_frames(frames, max_bytes=LIMIT)
            validate_transitions(msg, spec)
    frames = transitions_frames(spec)
    with pytest.raises(WireError, match="exceeds the limit"):
        from_frames(frames, max_bytes=sum(len(f) for f in frames) - 1)


def test_joined_frames_split_back_into_the_same_frames_and_damage_is_refused(image_spec):
    msg = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=trajectory(image_spec, 30))
    frames = to_frames(msg)
    joined = join_frames(frames)
    assert is_joined_frames(joined) and not is_joined_frames(to_wire(msg))
    assert [bytes(f) for f in split_frames(joined)] == [bytes(f) for f in frames]
    back = from_frames(split_frames(joined), max_bytes=LIMIT)
    np.testing.assert_array_equal(back.arrays["next_obs/wrist"], msg.arrays["next_obs/wrist"])
    for damaged, match in [
        (joined[:-1], "frame bytes declared"),
        (joined + b"\x00", "frame bytes declared"),
        (b"RRLF" + (0).to_bytes(4, "little"), "0 frames declared"),
        (b"RRLF" + (1 << 30).to_bytes(4, "little") + b"\x00" * 64, "frames declared"),
        (b"RRLF\x01\x00\x00\x00" + (1 << 62).to_bytes(8, "little"), "frame bytes declared"),
        (b"RRL", "missing the RRLF prefix"),
        (to_wire(msg), "missing the RRLF prefix"),
    ]:
        with pytest.raises(WireError, match=match):
            split_frames(damaged)


def test_a_parsed_chunk_says_which_next_observations_were_rebuilt_from_the_following_observation(cfg, image_spec):
    arrays = trajectory(image_spec, 30, breaks=(9, 17))
    msg = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=arrays)
    assert msg.rows_continue is None  # made here: nothing travelled
    expected = np.ones(29, bool)
    expected[[9, 17]] = False
    for back in (
        from_frames([bytes(f) for f in to_frames(msg)], max_bytes=LIMIT),
        from_wire(to_wire(msg), max_bytes=LIMIT),
    ):
        np.testing.assert_array_equal(back.rows_continue, expected)
        for i in np.flatnonzero(back.rows_continue):
            np.testing.assert_array_equal(back.arrays["next_obs/front"][i], back.arrays["obs/front"][i + 1])
    small = Transitions(actor_id="a", run_id="r", first_seq=0, count=30, arrays=trajectory(transition_spec(cfg), 30))
    assert from_frames(to_frames(small), max_bytes=LIMIT).rows_continue is None  # sent whole: unknown


def test_a_camera_one_side_lacks_is_named_once_in_a_config_difference(tmp_path):
    """A run or learner of the state config met with the image config: each camera is one entry, not its 8 fields;
    fields both sides have are listed as before, and the Refuse keeps every field for programs."""
    from pathlib import Path

    from robot_rl.config import dump_config
    from robot_rl.wire import saved_config_differences

    configs = Path(__file__).resolve().parents[1] / "configs"
    state, image = load_config(configs / "sim_peg_state.yaml"), load_config(configs / "sim_peg_image.yaml")
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(state))
    text = saved_config_differences(saved, config_fingerprint(image))
    assert "env.cameras.front (only the config's)" in text and "env.cameras.wrist (only the config's)" in text
    assert "env.cameras.front.crop" not in text and "obs.front" in text and "agent.hidden" in text
    fp_state, fp_image = config_fingerprint(state), config_fingerprint(image)
    hello = Hello(actor_id="a", run_id="r", config_hash=config_hash(fp_image), config_fingerprint=fp_image)
    refuse = check_hello(hello, fp_state)
    assert "env.cameras.front (only the actor's)" in refuse.reason
    assert "env.cameras.front.crop.x" in refuse.fields  # every field, for programs
