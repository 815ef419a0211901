"""Loopback transport benchmark: transitions actor -> learner and weights learner -> actor over real ZeroMQ on TCP.

    python bench/transport.py [--seconds 4] [--chunk 30] [--weights-samples 100]

Transitions go DEALER (a sender process, the actor) -> ROUTER (this process, the learner) on tcp://127.0.0.1 in
chunks, for the state config (configs/sim_peg_state.yaml) and a two-camera 84x84 image config (two (3, 84, 84) uint8
images plus the state vector):
  bare:     arrays msgpack-packed as raw bytes, sent, received, unpacked; no validation, no acks (the ceiling);
  checked:  wire.to_wire(Transitions) on the sender; from_wire + validate_transitions + an Ack per chunk on the
            receiver, with at most 4 unacknowledged chunks in flight (the actor keeps what is unacknowledged);
  stored:   checked, plus the learner's transition log: each chunk appended and fsync'd before its ack.
Weights go PUB (this process) -> SUB (a subscriber process); latency runs from the learner's torch state dict
(pack_tensors, to_wire, send) to the subscriber's torch tensors (from_wire, unpack_tensors), one message in flight.
Both processes stamp with CLOCK_MONOTONIC, which Linux shares between processes. The last line is the headline.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from robot_rl.config import load_config
from robot_rl.learner.store import StoredChunk, TransitionStore
from robot_rl.wire import (
    Ack,
    Transitions,
    TransitionSpec,
    Weights,
    from_wire,
    pack_tensors,
    to_wire,
    transition_spec,
    unpack_tensors,
    validate_transitions,
)

MAX_BYTES = 512 << 20
WINDOW = 4
STATE_CONFIG = "configs/sim_peg_state.yaml"


def image_spec() -> TransitionSpec:
    """Two (3, 84, 84) uint8 cameras plus the 6-d state vector."""
    return TransitionSpec(
        obs={"ee_pose": ((6,), "float32"), "front": ((3, 84, 84), "uint8"), "wrist": ((3, 84, 84), "uint8")},
        action_dim=6,
    )


def make_chunk(spec: TransitionSpec, count: int, seed: int) -> dict[str, np.ndarray]:
    """A valid chunk of `count` random transitions."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in spec.arrays(count).items():
        if dtype == "uint8":
            arrays[name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif dtype == "bool":
            arrays[name] = rng.random(shape) < 0.05
        elif dtype == "int64":
            arrays[name] = np.full(shape, 3, np.int64)
        else:
            arrays[name] = rng.uniform(-1, 1, shape).astype(dtype)
    return arrays


def bare_pack(arrays: dict[str, np.ndarray]) -> bytes:
    return msgpack.packb({k: [a.dtype.str, list(a.shape), a.tobytes()] for k, a in arrays.items()})


def bare_unpack(data: bytes | memoryview) -> dict[str, np.ndarray]:
    tree = msgpack.unpackb(data, raw=False)
    return {k: np.frombuffer(b, dtype=d).reshape(s) for k, (d, s, b) in tree.items()}


# --------------------------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------------------------
def sender(endpoint: str, spec: TransitionSpec, count: int, checked: bool, stop: Any) -> None:
    """The actor side: send chunks until `stop` is set (checked: keep at most WINDOW chunks unacknowledged)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, WINDOW * 2)
    sock.setsockopt(zmq.SNDTIMEO, 100)
    sock.connect(endpoint)
    chunks = [make_chunk(spec, count, seed) for seed in range(4)]
    seq, acked = 0, -1
    while not stop.is_set():
        if checked:
            while seq - (acked + 1) >= WINDOW * count and not stop.is_set():
                if sock.poll(100, zmq.POLLIN):
                    ack = from_wire(sock.recv(), max_bytes=MAX_BYTES)
                    assert isinstance(ack, Ack)
                    acked = ack.acked_seq
            msg = Transitions(actor_id="actor-0", run_id="bench", first_seq=seq, count=count, arrays=chunks[seq % 4])
            data = to_wire(msg)
        else:
            data = bare_pack(chunks[seq % 4])
        try:
            sock.send(data, copy=False)
        except zmq.Again:
            continue
        seq += count
    sock.close()
    ctx.term()


@dataclass(frozen=True)
class Throughput:
    transitions_per_s: float
    bytes_per_transition: float


def measure_transitions(spec: TransitionSpec, count: int, mode: str, seconds: float) -> Throughput:
    """Receive chunks for `seconds` on a ROUTER. mode bare: unpack only; checked: decode, validate and ack each one;
    stored: also append each chunk to the learner's transition log and fsync it before the ack, as the learner does."""
    checked = mode != "bare"
    store_dir = tempfile.TemporaryDirectory() if mode == "stored" else None
    store = TransitionStore(Path(store_dir.name)) if store_dir is not None else None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, WINDOW * 2)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BYTES)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    mp_ctx = mp.get_context("spawn")
    stop = mp_ctx.Event()
    proc = mp_ctx.Process(target=sender, args=(f"tcp://127.0.0.1:{port}", spec, count, checked, stop), daemon=True)
    proc.start()
    received = transitions = nbytes = 0
    t0 = None
    try:
        while True:
            if not sock.poll(30_000, zmq.POLLIN):
                raise RuntimeError("no chunk from the sender within 30 s")
            identity, frame = sock.recv_multipart(copy=False)
            data = frame.buffer  # zero-copy view of the received frame; decoding copies what it keeps
            if checked:
                msg = from_wire(data, max_bytes=MAX_BYTES)
                assert isinstance(msg, Transitions)
                validate_transitions(msg, spec)
                n = msg.count
                if store is not None:
                    store.append(StoredChunk(msg.actor_id, msg.run_id, msg.first_seq, dict(msg.arrays), True))
                    store.sync()
                ack = Ack(actor_id=msg.actor_id, run_id=msg.run_id, acked_seq=msg.last_seq)
                sock.send_multipart([identity, to_wire(ack)])
            else:
                n = len(bare_unpack(data)["rewards"])
            received += 1
            if t0 is None:  # the first chunk starts the clock (process start-up is not measured)
                t0 = time.perf_counter()
                continue
            transitions += n
            nbytes += data.nbytes
            if time.perf_counter() - t0 >= seconds:
                break
        elapsed = time.perf_counter() - t0
    finally:
        if store is not None and store_dir is not None:
            store.close()
            store_dir.cleanup()
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
        sock.close()
        ctx.term()
    return Throughput(transitions / elapsed, nbytes / max(transitions, 1))


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------
def state_config_weights() -> dict[str, Any]:
    """What the actor needs under the state config: RL actor, critic ensemble, V_BC, normaliser, BC policy."""
    import torch

    from robot_rl.agent import Q2RLAgent
    from robot_rl.bc import make_bc_policy
    from robot_rl.obs import state_dim

    cfg = load_config(STATE_CONFIG)
    spec = transition_spec(cfg)
    dim = state_dim(spec.obs)
    low, high = -np.ones(dim, np.float32), np.ones(dim, np.float32)
    bc = make_bc_policy(cfg.bc, spec.obs, spec.action_dim, low, high)
    agent = Q2RLAgent(
        cfg.agent, obs_spec=spec.obs, state_low=low, state_high=high, action_dim=spec.action_dim, bc_policy=bc
    )
    state = {k: v for k, v in agent.network_state().items() if not k.startswith("target_critics.")}
    state.update({f"bc.{k}": v for k, v in bc.state_dict().items()})
    return {k: torch.as_tensor(v).clone() for k, v in state.items()}


def mlp_shapes(prefix: str, in_dim: int, hidden: list[int], out_dim: int, members: int = 0) -> dict[str, tuple]:
    """Weight and bias shapes of an MLP (an ensemble of `members` when members > 0)."""
    lead = (members,) if members else ()
    shapes, last = {}, in_dim
    for i, width in enumerate([*hidden, out_dim]):
        shapes[f"{prefix}.{i}.weight"] = (*lead, last, width) if members else (width, last)
        shapes[f"{prefix}.{i}.bias"] = (*lead, width)
        last = width
    return shapes


def image_config_weights() -> dict[str, Any]:
    """Tensors the size of an image agent: 2 CNN encoders (4 3x3 convs of 32 channels, 84x84 -> 35x35, a 50-d
    projection each), [1024, 1024] actor, V_BC and GMM BC MLPs, and 10 [1024, 1024] critics, on 2*50+6 features."""
    import torch

    shapes: dict[str, tuple] = {}
    for cam in ("front", "wrist"):
        channels = [3, 32, 32, 32, 32]
        for i in range(4):
            shapes[f"encoder.{cam}.conv{i}.weight"] = (channels[i + 1], channels[i], 3, 3)
            shapes[f"encoder.{cam}.conv{i}.bias"] = (channels[i + 1],)
        shapes[f"encoder.{cam}.proj.weight"] = (50, 32 * 35 * 35)
        shapes[f"encoder.{cam}.proj.bias"] = (50,)
    features, action_dim, hidden = 2 * 50 + 6, 6, [1024, 1024]
    shapes.update(mlp_shapes("actor", features, hidden, 2 * action_dim))
    shapes.update(mlp_shapes("critics", features + action_dim, hidden, 1, members=10))
    shapes.update(mlp_shapes("value", features, hidden, 1))
    shapes.update(mlp_shapes("bc", features, hidden, 5 * (1 + 2 * action_dim)))
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}


def subscriber(endpoint: str, back: str) -> None:
    """The actor side: decode each weights message to torch tensors and report the one-way latency."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.MAXMSGSIZE, MAX_BYTES)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(back)
    while True:
        if not sub.poll(30_000, zmq.POLLIN):
            break
        stamp, frame = sub.recv_multipart(copy=False)
        received = time.monotonic_ns()
        if stamp.bytes == b"stop":
            break
        msg = from_wire(frame.buffer, max_bytes=MAX_BYTES)
        assert isinstance(msg, Weights)
        tensors = unpack_tensors(msg.tensors)
        done = time.monotonic_ns()
        assert tensors
        push.send_multipart([stamp.bytes, str(received).encode(), str(done).encode()])
    sub.close()
    push.close()
    ctx.term()


@dataclass(frozen=True)
class Latency:
    params: int
    message_bytes: int
    encode_ms: float  # p50 of pack_tensors + to_wire on the learner
    transfer_ms: float  # p50 of send to received (ZeroMQ over loopback TCP)
    decode_ms: float  # p50 of from_wire + unpack_tensors on the actor
    p50_ms: float
    p99_ms: float
    samples: int


def measure_weights(state: dict[str, Any], samples: int, seconds: float) -> Latency:
    """Publish `state` one message at a time; latency from pack_tensors to the subscriber's unpacked tensors."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 2)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
    mp_ctx = mp.get_context("spawn")
    proc = mp_ctx.Process(
        target=subscriber, args=(f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{pull_port}"), daemon=True
    )
    proc.start()
    latencies: list[tuple[float, float, float, float]] = []
    size = 0
    try:
        version, deadline = 0, None
        while len(latencies) < samples and (deadline is None or time.perf_counter() < deadline):
            start = time.monotonic_ns()
            data = to_wire(Weights(version=version, phase="online", tensors=pack_tensors(state)))
            encoded = time.monotonic_ns()
            size = len(data)
            pub.send_multipart([f"{start} {encoded}".encode(), data], copy=False)
            version += 1
            # Until the subscription has reached the publisher, PUB drops messages: resend after a short wait.
            if not pull.poll(30_000 if deadline else 500, zmq.POLLIN):
                if deadline is not None:
                    raise RuntimeError("no weights reached the subscriber within 30 s")
                continue
            stamp, received, done = pull.recv_multipart()
            sent, encoded = (int(x) for x in stamp.split())
            if deadline is None:  # the first delivery only proves the subscription; it starts the clock
                time.sleep(0.2)
                while pull.poll(0, zmq.POLLIN):  # late deliveries of warm-up messages are not samples
                    pull.recv_multipart()
                deadline = time.perf_counter() + seconds
                continue
            stages = (encoded - sent, int(received) - encoded, int(done) - int(received), int(done) - sent)
            latencies.append(tuple(x / 1e6 for x in stages))
        pub.send_multipart([b"stop", b""])
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
        pub.close()
        pull.close()
        ctx.term()
    params = sum(int(t.numel()) for t in state.values())
    table = np.asarray(latencies)
    encode_ms, transfer_ms, decode_ms, p50 = np.percentile(table, 50, axis=0)
    p99 = np.percentile(table[:, 3], 99)
    return Latency(params, size, encode_ms, transfer_ms, decode_ms, p50, float(p99), len(latencies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="Measured seconds per transitions row.")
    parser.add_argument("--chunk", type=int, default=30, help="Transitions per chunk.")
    parser.add_argument("--weights-samples", type=int, default=100, help="Weights messages per latency row (at most).")
    args = parser.parse_args()

    specs = {"state": transition_spec(load_config(STATE_CONFIG)), "2cam 84x84": image_spec()}
    print(f"transitions: chunks of {args.chunk}, {args.seconds:g} s per row, DEALER -> ROUTER on tcp://127.0.0.1")
    print(
        f"{'config':<11} {'path':<8} {'transitions/s':>14} {'chunks/s':>9} {'MB/s':>8}"
        f" {'B/transition':>13} {'raw B':>7}"
    )
    headline = {}
    for name, spec in specs.items():
        for path in ("bare", "checked", "stored"):
            result = measure_transitions(spec, args.chunk, path, args.seconds)
            headline[(name, path)] = result.transitions_per_s
            rate = result.transitions_per_s
            print(
                f"{name:<11} {path:<8} {rate:>14,.0f} {rate / args.chunk:>9,.0f}"
                f" {rate * result.bytes_per_transition / 1e6:>8.1f}"
                f" {result.bytes_per_transition:>13,.0f} {spec.transition_bytes():>7,}"
            )
    print(
        f"weights: PUB -> SUB on tcp://127.0.0.1, pack_tensors -> unpack_tensors, up to {args.weights_samples} samples"
    )
    print(
        f"{'network':<11} {'params':>11} {'MB':>7} {'encode':>7} {'transfer':>9} {'decode':>7}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'samples':>8}"
    )
    latencies = {}
    for name, build in (("state", state_config_weights), ("image-size", image_config_weights)):
        lat = measure_weights(build(), args.weights_samples, args.seconds)
        latencies[name] = lat
        print(
            f"{name:<11} {lat.params:>11,} {lat.message_bytes / 1e6:>7.1f} {lat.encode_ms:>7.2f}"
            f" {lat.transfer_ms:>9.2f} {lat.decode_ms:>7.2f} {lat.p50_ms:>8.2f} {lat.p99_ms:>8.2f} {lat.samples:>8}"
        )
    print(
        f"headline: stored state transitions {headline[('state', 'stored')]:,.0f}/s, "
        f"stored 2-camera transitions {headline[('2cam 84x84', 'stored')]:,.0f}/s (a 10 Hz actor makes 10/s); "
        f"weights p99 {latencies['state'].p99_ms:.1f} ms (state), {latencies['image-size'].p99_ms:.0f} ms (image-size)"
    )


if __name__ == "__main__":
    main()
