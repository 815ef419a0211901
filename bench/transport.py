"""Loopback transport benchmark: transitions actor -> learner and weights learner -> actor over real ZeroMQ on TCP.

    python bench/transport.py [--seconds 4] [--chunk 30] [--weights-samples 100] [--weights-seconds 20]
                              [--unrelated-next-obs] [--glibc-malloc-defaults]

Transitions go DEALER (a sender process, the actor) -> ROUTER (this process, the learner) on tcp://127.0.0.1 in
chunks, for the state config (configs/sim_peg_state.yaml) and a two-camera 84x84 image config (two (3, 84, 84) uint8
images plus the state vector). A chunk holds consecutive steps of one episode, as an actor sends them (next_obs[i]
is obs[i + 1], which the wire sends once); --unrelated-next-obs draws every next observation on its own instead.
  bare:     a msgpack header of names, dtypes and shapes and one frame per array (every array whole), sent and
            received without copying, arrays made over the frames; no validation, no acks;
  checked:  wire.to_frames(Transitions) on the sender (a header and one frame per array, as the actor link sends a
            chunk, without copying; each chunk's frames are made once, as the actor makes them once when it spills
            the chunk, and only the header anew per send); from_frames + validate_transitions + an Ack per chunk on
            the receiver, with at most 16 unacknowledged chunks in flight (the actor link's default window; the actor
            keeps what is unacknowledged);
  stored:   checked, plus the learner's transition log as the learner uses it: each chunk's received frames appended
            as they are, written and fsync'd in groups by the store's writer thread (O_DIRECT where the file system
            takes it, as the learner's store decides), and its Ack held until that fsync is done
            (learner.store.HeldReplies). Transitions count when their Ack is sent.
  ingested: stored, plus what the learner does next with each chunk: add it to a replay buffer (capacity 20k,
            each observation kept once), as LearnerService._ingest does.
Weights go PUB (this process) -> SUB (a subscriber process); latency runs from the learner's torch state dict
(learner.broadcast.WeightsFrames: pack_tensors into the previous snapshot's memory once ZeroMQ has sent it, to_frames,
send_multipart without copying) to torch tensors the actor can load (recv_multipart without copying, from_frames,
unpack_tensors(copy=False)), one message in flight; the "load" column is the copy into the actor's networks that
follows (copy_ into preallocated tensors, as load_state_dict does, torch on one thread), not part of the latency. The
subscriber reuses freed memory as the actor does (below). Both processes stamp with CLOCK_MONOTONIC, which
Linux shares between processes. Every process sets the services' allocator thresholds (robot_rl.malloc), as
`robot-rl learner` and `robot-rl actor` do; --glibc-malloc-defaults leaves glibc's. The last line is the headline.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_main
import msgpack
import numpy as np
import zmq

from robot_rl.buffer import ReplayBuffer
from robot_rl.config import load_config
from robot_rl.learner.broadcast import WeightsFrames
from robot_rl.learner.store import HeldReplies, StoredChunk, TransitionStore
from robot_rl.malloc import reuse_freed_memory
from robot_rl.wire import (
    Ack,
    Transitions,
    TransitionSpec,
    Weights,
    from_frames,
    from_wire,
    to_frames,
    to_wire,
    transition_spec,
    unpack_tensors,
    validate_transitions,
)

MAX_BYTES = 512 << 20
STORED = ("stored", "ingested")  # the rows the headline reports
BUFFER_CAPACITY = 20_000  # the "ingested" rows' replay buffer (two cameras: ~1 GB)
WINDOW = 16  # chunks in flight by default: actor.link.LearnerLink's default
STATE_CONFIG = "configs/sim_peg_state.yaml"


def image_spec() -> TransitionSpec:
    """Two (3, 84, 84) uint8 cameras plus the 6-d state vector."""
    return TransitionSpec(
        obs={"ee_pose": ((6,), "float32"), "front": ((3, 84, 84), "uint8"), "wrist": ((3, 84, 84), "uint8")},
        action_dim=6,
    )


def make_chunk(spec: TransitionSpec, count: int, seed: int, *, consecutive: bool = True) -> dict[str, np.ndarray]:
    """A valid chunk of `count` random transitions; consecutive: steps of one episode, as an actor records them
    (next_obs[i] is obs[i + 1]; the last next_obs is new), else every next observation drawn on its own."""
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
    if consecutive:
        for key in spec.obs:
            arrays[f"next_obs/{key}"][:-1] = arrays[f"obs/{key}"][1:]
    return arrays


def bare_pack(arrays: dict[str, np.ndarray]) -> list[bytes | memoryview]:
    """A msgpack header of names, dtypes and shapes, then each array's memory as a frame of its own."""
    header = msgpack.packb([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()])
    return [header, *(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) for a in arrays.values())]


def bare_unpack(frames: list[memoryview]) -> dict[str, np.ndarray]:
    header = msgpack.unpackb(frames[0], raw=False)
    return {k: np.frombuffer(f, dtype=d).reshape(s) for (k, d, s), f in zip(header, frames[1:], strict=True)}


# --------------------------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------------------------
def sender(
    endpoint: str,
    spec: TransitionSpec,
    count: int,
    checked: bool,
    consecutive: bool,
    stop: Any,
    window: int,
    malloc: bool = True,
) -> None:
    """The actor side: send chunks until `stop` is set (checked: keep at most `window` chunks unacknowledged)."""
    if malloc:
        reuse_freed_memory()  # as `robot-rl actor` does
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, window * 2)
    sock.setsockopt(zmq.SNDTIMEO, 100)
    sock.connect(endpoint)
    chunks = [make_chunk(spec, count, seed, consecutive=consecutive) for seed in range(4)]
    # The actor encodes a chunk once, when it spills it; sending reads the frames back. So does this sender: each
    # chunk's frames are made once, and only the header is made anew per send (its first_seq).
    encoded = []
    for arrays in chunks:
        frames = to_frames(Transitions(actor_id="actor-0", run_id="bench", first_seq=0, count=count, arrays=arrays))
        encoded.append((msgpack.unpackb(frames[0], raw=False), frames[1:]))  # the header as msgpack gives it back
    seq, acked = 0, -1
    while not stop.is_set():
        if checked:
            while seq - (acked + 1) >= window * count and not stop.is_set():
                if sock.poll(100, zmq.POLLIN):
                    ack = from_wire(sock.recv(), max_bytes=MAX_BYTES)
                    assert isinstance(ack, Ack)
                    acked = ack.acked_seq
            header, arrays_frames = encoded[seq % 4]
            frames = [msgpack.packb({**header, "first_seq": seq}, use_bin_type=True), *arrays_frames]
        else:
            frames = bare_pack(chunks[seq % 4])
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            continue
        seq += count
    sock.close()
    ctx.term()


def ingest(
    buffer: ReplayBuffer | None,
    spec: TransitionSpec,
    a: dict[str, np.ndarray],
    continues: np.ndarray | None = None,
) -> None:
    """Add a chunk's arrays to the replay buffer (if any) as the learner does (LearnerService._ingest, online);
    `continues`: what the wire knows of next_obs[i] being obs[i + 1] (Transitions.rows_continue)."""
    if buffer is None:
        return
    buffer.add_many(
        obs={k: a[f"obs/{k}"] for k in spec.obs},
        actions=a["actions"],
        rewards=a["rewards"],
        next_obs={k: a[f"next_obs/{k}"] for k in spec.obs},
        terminated=a["terminated"],
        truncated=a["truncated"],
        bc_actions=a["bc_actions"],
        continues=continues,
    )


@dataclass(frozen=True)
class Throughput:
    transitions_per_s: float
    bytes_per_transition: float


def measure_transitions(
    spec: TransitionSpec,
    count: int,
    mode: str,
    seconds: float,
    *,
    consecutive: bool = True,
    window: int = WINDOW,
    malloc: bool = True,
) -> Throughput:
    """Receive chunks for `seconds` on a ROUTER. mode bare: unpack only; checked: decode, validate and ack each one;
    stored: also append each received frame to the learner's transition log and hold its ack until the store's
    writer has fsync'd it, as the learner does."""
    buffer = None
    if mode == "ingested":  # full before the clock starts: a long run's steady state, its memory faulted in
        buffer = ReplayBuffer(BUFFER_CAPACITY, spec.obs, spec.action_dim)
        while buffer.total_added < 2 * BUFFER_CAPACITY:
            ingest(buffer, spec, make_chunk(spec, count, buffer.total_added, consecutive=consecutive))
    with tempfile.TemporaryDirectory() as store_dir, TransitionStore(Path(store_dir)) as store:
        logged = store if mode in ("stored", "ingested") else None
        return _receive(spec, count, mode, seconds, consecutive, logged, window, buffer, malloc)


def _receive(
    spec: TransitionSpec,
    count: int,
    mode: str,
    seconds: float,
    consecutive: bool,
    store: TransitionStore | None,
    window: int,
    buffer: ReplayBuffer | None = None,
    malloc: bool = True,
) -> Throughput:
    checked = mode != "bare"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, window * 2)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BYTES)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    held: HeldReplies[tuple[bytes, Ack, int]] | None = None
    if store is not None:
        held = HeldReplies(store)
        poller.register(store.wake_fd, zmq.POLLIN)
    mp_ctx = mp.get_context("spawn")
    stop = mp_ctx.Event()
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = mp_ctx.Process(
        target=sender, args=(endpoint, spec, count, checked, consecutive, stop, window, malloc), daemon=True
    )
    proc.start()
    transitions = nbytes = received = 0
    t0: float | None = None

    def counted(n: int) -> None:
        nonlocal transitions, t0
        if t0 is None:  # the first chunk starts the clock (process start-up is not measured)
            t0 = time.perf_counter()
        else:
            transitions += n

    try:
        while t0 is None or time.perf_counter() - t0 < seconds:
            events = dict(poller.poll(30_000))
            if not events:
                raise RuntimeError("no chunk from the sender within 30 s")
            if sock in events:
                identity, *parts = sock.recv_multipart(copy=False)
                frames = [part.buffer for part in parts]  # zero-copy views of the received frames
                size = sum(f.nbytes for f in frames)
                if not checked:
                    n = len(bare_unpack(frames)["rewards"])
                    nbytes, received = nbytes + size, received + n
                    counted(n)
                    continue
                msg = from_frames(frames, max_bytes=MAX_BYTES)
                assert isinstance(msg, Transitions)
                validate_transitions(msg, spec)
                nbytes, received = nbytes + size, received + msg.count
                ack = Ack(actor_id=msg.actor_id, run_id=msg.run_id, acked_seq=msg.last_seq)
                if store is None or held is None:
                    sock.send_multipart([identity.bytes, to_wire(ack)])
                    counted(msg.count)
                    continue
                store.append(StoredChunk(msg.actor_id, msg.run_id, msg.first_seq, dict(msg.arrays), True), frames)
                held.hold((identity.bytes, ack, msg.count))
                ingest(buffer, spec, msg.arrays, msg.rows_continue)
            if held is not None:
                for identity_bytes, ack, n in held.release():
                    sock.send_multipart([identity_bytes, to_wire(ack)])
                    counted(n)
        assert t0 is not None
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
        sock.close()
        ctx.term()
    return Throughput(transitions / elapsed, nbytes / max(received, 1))


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


def subscriber(endpoint: str, back: str, malloc: bool = True) -> None:
    """The actor side: decode each weights message, load it into tensors of its own, and report the latency."""
    import torch

    if malloc:
        reuse_freed_memory()  # as `robot-rl actor` does
    torch.set_num_threads(1)  # an actor on a small machine runs torch on one thread (train.torch_threads)

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.MAXMSGSIZE, MAX_BYTES)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(back)
    loaded: dict[str, torch.Tensor] = {}  # the actor's networks: allocated once, overwritten by every load
    while True:
        if not sub.poll(30_000, zmq.POLLIN):
            break
        stamp, *frames = sub.recv_multipart(copy=False)
        received = time.monotonic_ns()
        if stamp.bytes == b"stop":
            break
        msg = from_frames(frames, max_bytes=MAX_BYTES)
        assert isinstance(msg, Weights)
        tensors = unpack_tensors(msg.tensors, copy=False)
        decoded = time.monotonic_ns()
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name not in loaded:
                    loaded[name] = torch.empty_like(tensor)
                loaded[name].copy_(tensor)  # what load_state_dict does with each parameter
        done = time.monotonic_ns()
        push.send_multipart([stamp.bytes, str(received).encode(), str(decoded).encode(), str(done).encode()])
    sub.close()
    push.close()
    ctx.term()


@dataclass(frozen=True)
class Latency:
    params: int
    message_bytes: int
    encode_ms: float  # p50 of pack_tensors + to_frames on the learner
    transfer_ms: float  # p50 of send to received (ZeroMQ over loopback TCP)
    decode_ms: float  # p50 of from_frames + unpack_tensors(copy=False) on the actor
    load_ms: float  # p50 of copying the tensors into the actor's networks (load_state_dict's work), not in p50/p99
    p50_ms: float  # send to usable tensors on the actor (encode + transfer + decode)
    p99_ms: float
    samples: int


def measure_weights(state: dict[str, Any], samples: int, seconds: float, malloc: bool = True) -> Latency:
    """Publish `state` one message at a time; latency from pack_tensors to the subscriber's loaded tensors."""
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
        target=subscriber, args=(f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{pull_port}", malloc), daemon=True
    )
    proc.start()
    latencies: list[tuple[float, ...]] = []
    snapshots = WeightsFrames()  # as the learner publishes: snapshot memory reused once ZeroMQ has sent it
    size = 0
    try:
        version, deadline = 0, None
        while len(latencies) < samples and (deadline is None or time.perf_counter() < deadline):
            start = time.monotonic_ns()
            frames = snapshots.frames(version=version, phase="online", state=state)
            encoded = time.monotonic_ns()
            size = sum(f.buffer.nbytes for f in frames)
            pub.send_multipart([f"{start} {encoded}".encode(), *frames], copy=False)
            del frames  # a Frame object still held keeps its memory from being reused for the next snapshot
            version += 1
            # Until the subscription has reached the publisher, PUB drops messages: resend after a short wait.
            if not pull.poll(30_000 if deadline else 500, zmq.POLLIN):
                if deadline is not None:
                    raise RuntimeError("no weights reached the subscriber within 30 s")
                continue
            stamp, received_b, decoded_b, done_b = pull.recv_multipart()
            sent, encoded = (int(x) for x in stamp.split())
            received, decoded, done = int(received_b), int(decoded_b), int(done_b)
            if deadline is None:  # the first delivery only proves the subscription; it starts the clock
                time.sleep(0.2)
                while pull.poll(0, zmq.POLLIN):  # late deliveries of warm-up messages are not samples
                    pull.recv_multipart()
                deadline = time.perf_counter() + seconds
                continue
            stages = (encoded - sent, received - encoded, decoded - received, done - decoded, decoded - sent)
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
    encode_ms, transfer_ms, decode_ms, load_ms, p50 = np.percentile(table, 50, axis=0)
    p99 = np.percentile(table[:, 4], 99)
    return Latency(params, size, encode_ms, transfer_ms, decode_ms, load_ms, p50, float(p99), len(latencies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seconds", type=bench_main.positive_float, default=4.0, help="Measured seconds per transitions row."
    )
    parser.add_argument(
        "--weights-seconds", type=float, default=20.0, help="At most this long per weights row (p99 needs samples)."
    )
    parser.add_argument("--chunk", type=bench_main.positive_int, default=30, help="Transitions per chunk.")
    parser.add_argument(
        "--window", type=bench_main.positive_int, default=WINDOW, help="Chunks in flight (actor.link_window)."
    )
    parser.add_argument("--rows", help="Only these transitions rows, e.g. '2cam 84x84 stored,state stored'.")
    parser.add_argument("--no-weights", action="store_true", help="Skip the weights rows.")
    parser.add_argument(
        "--weights-samples",
        type=bench_main.positive_int,
        default=100,
        help="Weights messages per latency row (at most).",
    )
    parser.add_argument(
        "--unrelated-next-obs",
        action="store_true",
        help="Draw every next observation on its own instead of taking the next step's (nothing is shared).",
    )
    parser.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="Leave glibc's malloc thresholds as they are (the services set them: robot_rl.malloc).",
    )
    args = parser.parse_args()
    malloc = not args.glibc_malloc_defaults
    if malloc:
        reuse_freed_memory()  # as `robot-rl learner` does

    specs = {"state": transition_spec(load_config(STATE_CONFIG)), "2cam 84x84": image_spec()}
    steps = "unrelated next observations" if args.unrelated_next_obs else "consecutive steps"
    print(
        f"transitions: chunks of {args.chunk} {steps}, {args.seconds:g} s per row, DEALER -> ROUTER on tcp://127.0.0.1"
    )
    print(
        f"{'config':<11} {'path':<8} {'transitions/s':>14} {'chunks/s':>9} {'MB/s':>8}"
        f" {'B/transition':>13} {'raw B':>7}"
    )
    headline = {}
    for name, spec in specs.items():
        for path in ("bare", "checked", "stored", "ingested"):
            if args.rows and f"{name} {path}" not in args.rows.split(","):
                continue
            result = measure_transitions(
                spec,
                args.chunk,
                path,
                args.seconds,
                consecutive=not args.unrelated_next_obs,
                window=args.window,
                malloc=malloc,
            )
            headline[(name, path)] = result.transitions_per_s
            rate = result.transitions_per_s
            print(
                f"{name:<11} {path:<8} {rate:>14,.0f} {rate / args.chunk:>9,.0f}"
                f" {rate * result.bytes_per_transition / 1e6:>8.1f}"
                f" {result.bytes_per_transition:>13,.0f} {spec.transition_bytes():>7,}"
            )
    latencies = {}
    if not args.no_weights:
        print(
            f"weights: PUB -> SUB on tcp://127.0.0.1, pack_tensors -> usable tensors on the actor (load: not in "
            f"p50/p99), up to {args.weights_samples} samples"
        )
        print(
            f"{'network':<11} {'params':>11} {'MB':>7} {'encode':>7} {'transfer':>9} {'decode':>7} {'load':>7}"
            f" {'p50 ms':>8} {'p99 ms':>8} {'samples':>8}"
        )
        for name, build in (("state", state_config_weights), ("image-size", image_config_weights)):
            lat = measure_weights(build(), args.weights_samples, args.weights_seconds, malloc)
            latencies[name] = lat
            print(
                f"{name:<11} {lat.params:>11,} {lat.message_bytes / 1e6:>7.1f} {lat.encode_ms:>7.2f}"
                f" {lat.transfer_ms:>9.2f} {lat.decode_ms:>7.2f} {lat.load_ms:>7.2f}"
                f" {lat.p50_ms:>8.2f} {lat.p99_ms:>8.2f} {lat.samples:>8}"
            )
    parts = [f"{path} {name} transitions {rate:,.0f}/s" for (name, path), rate in headline.items() if path in STORED]
    parts += [f"weights p99 {lat.p99_ms:.1f} ms ({name})" for name, lat in latencies.items()]
    print(f"headline: window {args.window} chunks; " + "; ".join(parts) + " (a 10 Hz actor makes 10 transitions/s)")


if __name__ == "__main__":
    bench_main.run(main)
