"""Hostile messages against a learner that is serving a real actor.

    python bench/fuzz.py [--messages 100000] [--seed 0] [--config configs/ci_tiny.yaml] [--set path=value ...]

Runs `robot-rl learner` and one `robot-rl actor` as processes on loopback (the tiny state config by default, messages
limited to 4 MB so that oversized ones are cheap to send). Once the actor's transitions flow, this process sends
`--messages` malformed and hostile messages to the learner's ROUTER from several connections:

  random bytes; msgpack that is not a message (not a map, integer keys, extension types, deep nesting, huge strings);
  unknown kinds and protocol versions; messages only the learner sends; hellos with a wrong fingerprint or bad ids;
  transitions from connections that never said hello; several frames in one message; messages over the size limit;
  and, from connections with an accepted hello (the right config and BC policy: an authorised but hostile actor),
  transitions with a wrong dtype, shape or count, truncated array bytes, huge declared shapes, NaN or infinite
  values, half-NaN BC actions, bool bytes other than 0/1, versions below -1, missing or extra arrays, tampered
  shared next observations, another actor's ids, a negative or far-off first sequence number; each either in one
  frame or as a header and one frame per array (how actors send chunks), where the header entry and the frame carry
  the lie, now and then with a frame too many or too few.

None of them is a valid chunk at the right sequence number, so none may be stored. Afterwards both processes stop
cleanly and every record of the learner's log is read back. Printed: messages per kind, the learner's crashes (it
must stay up throughout), refusals counted, transitions stored under the fuzzer's ids or failing validation (bad
rows), and the real actor's acknowledged transitions during the fuzz and at the end (produced = acked = stored). The
last line is the headline.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_main
import msgpack
import numpy as np
import zmq
from services import TINY, Services, audit_log

from robot_rl.bc import bc_fingerprint, load_bc
from robot_rl.wire import (
    PROTOCOL_VERSION,
    Hello,
    Status,
    config_fingerprint,
    config_hash,
    to_wire,
    transition_spec,
)

OVERRIDES = [
    "train.env_steps=100000",
    "actor.period_s=0.002",
    "actor.max_env_steps_ahead=60",
    "transport.max_message_bytes=4194304",
]
HOSTILE_ACTORS = 4  # connections with an accepted hello
COUNT = 30  # transitions per hostile chunk


def nd(array: np.ndarray) -> dict[str, Any]:
    """An array as the wire writes it."""
    return {"__nd__": 1, "dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


class Fuzzer:
    """Makes one hostile message at a time (a list of frames) for a given connection kind."""

    def __init__(self, services: Services, rng: random.Random) -> None:
        self.rng = rng
        self.np = np.random.default_rng(rng.randrange(2**32))
        self.spec = transition_spec(services.cfg)
        fingerprint = config_fingerprint(services.cfg) | bc_fingerprint(load_bc(services.bc_dir))
        self.fingerprint = fingerprint

    # -- building blocks -----------------------------------------------------------------------------------------------
    def hello(self, actor_id: str) -> bytes:
        return to_wire(
            Hello(
                actor_id=actor_id,
                run_id="fuzz",
                config_hash=config_hash(self.fingerprint),
                config_fingerprint=self.fingerprint,
            )
        )

    def chunk(self, actor_id: str, first_seq: int) -> dict[str, Any]:
        """A well-formed transitions map (arrays as wire maps), to be spoilt."""
        arrays: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in self.spec.arrays(COUNT).items():
            if dtype == "bool":
                arrays[name] = np.zeros(shape, bool)
            elif dtype == "int64":
                arrays[name] = np.full(shape, 1, np.int64)
            else:
                arrays[name] = self.np.uniform(-0.5, 0.5, shape).astype(dtype)
        return {
            "kind": "transitions",
            "v": PROTOCOL_VERSION,
            "actor_id": actor_id,
            "run_id": "fuzz",
            "first_seq": first_seq,
            "count": COUNT,
            "arrays": {name: nd(a) for name, a in arrays.items()},
        }

    # -- hostile transitions from an accepted actor: each spoils a valid chunk one way ------------------------------
    def spoilt_chunk(self, actor_id: str) -> tuple[str, list[bytes]]:
        """A spoilt chunk, half the time in one frame (arrays inline), half as a header and one frame per array (as
        actors send chunks), where the spoilt array's header entry and frame carry the lie."""
        name, spoil = self.rng.choice(SPOILERS)
        body = self.chunk(actor_id, 0)
        spoil(self, body)
        if self.rng.random() < 0.5:
            return f"transitions: {name}", [msgpack.packb(body, use_bin_type=True)]
        return f"transitions in frames: {name}", self.framed(body)

    def framed(self, body: dict[str, Any]) -> list[bytes]:
        """A transitions map as a header and one frame per array; now and then a frame too many or too few."""
        arrays = body["arrays"]
        if not isinstance(arrays, dict) or not all(isinstance(a, dict) and "data" in a for a in arrays.values()):
            return [msgpack.packb(body, use_bin_type=True)]
        entries = [{"name": n, "dtype": a.get("dtype"), "shape": a.get("shape")} for n, a in arrays.items()]
        frames = [a["data"] for a in arrays.values()]
        roll = self.rng.random()
        if roll < 0.05:
            frames.pop(self.rng.randrange(len(frames)))
        elif roll < 0.1:
            frames.append(self.np.bytes(self.rng.randrange(64)))
        return [msgpack.packb({**body, "arrays": entries}, use_bin_type=True), *frames]

    def _some_array(self, body: dict[str, Any], kind: str = "any") -> dict[str, Any]:
        arrays = body["arrays"]
        names = [n for n, a in arrays.items() if kind == "any" or (kind == "float" and a["dtype"] == "<f4")]
        return arrays[self.rng.choice(names)]

    def wrong_dtype(self, body: dict) -> None:
        array = self._some_array(body)
        array["dtype"] = self.rng.choice(["<f8", "<i4", "|u1", "<f2", "O", "|S8", ">f4", 7, None])

    def wrong_shape(self, body: dict) -> None:  # byte count consistent with the lie: only validation catches it
        array = self._some_array(body)
        shape = [self.rng.choice([COUNT - 1, COUNT + 1, 1]), *array["shape"][1:], *self.rng.choice([[], [2]])]
        size = math.prod(shape) * np.dtype(array["dtype"]).itemsize
        array["shape"], array["data"] = shape, bytes(size)

    def truncated(self, body: dict) -> None:
        array = self._some_array(body)
        array["data"] = array["data"][: self.rng.randrange(len(array["data"]))]

    def huge_shape(self, body: dict) -> None:
        array = self._some_array(body)
        array["shape"] = self.rng.choice([[2**31 - 1, 2**31 - 1], [10**12], [-1], [2**40], [1] * 40, "[30]"])

    def non_finite(self, body: dict) -> None:
        array = self._some_array(body, "float")
        values = np.frombuffer(array["data"], np.float32).copy()
        values[self.rng.randrange(len(values))] = self.rng.choice([np.nan, np.inf, -np.inf])
        array["data"] = values.tobytes()

    def half_nan_bc(self, body: dict) -> None:
        array = body["arrays"]["bc_actions"]
        values = np.frombuffer(array["data"], np.float32).copy().reshape(array["shape"])
        values[self.rng.randrange(COUNT), 0] = np.nan
        array["data"] = values.tobytes()

    def bad_bool(self, body: dict) -> None:
        body["arrays"]["terminated"]["data"] = bytes([0] * (COUNT - 1) + [2])

    def old_version(self, body: dict) -> None:
        body["arrays"]["weights_version"] = nd(np.full(COUNT, -5, np.int64))

    def missing_array(self, body: dict) -> None:
        del body["arrays"][self.rng.choice(sorted(body["arrays"]))]

    def extra_array(self, body: dict) -> None:
        body["arrays"][self.rng.choice(["obs/evil", "next_obs/evil", "__nd__", "actions2"])] = nd(np.zeros(COUNT))

    def wrong_count(self, body: dict) -> None:
        body["count"] = self.rng.choice([0, -3, COUNT + 5, 10**9, 2**64 - 1, "30", 30.0, None])

    def bad_sequence(self, body: dict) -> None:
        # Far past the stream's next sequence (never stored: a gap) or not a sequence at all; the arrays stay valid.
        body["first_seq"] = self.rng.choice([-1, 10**9, 2**64 - 1, "0", None])

    def shared_tampered(self, body: dict) -> None:
        body["next_obs_shared"] = self.rng.choice(
            [nd(np.ones(COUNT, bool)), nd(np.zeros(COUNT + 1, bool)), nd(np.ones(COUNT, np.uint8)), [True] * COUNT]
        )

    def other_ids(self, body: dict) -> None:
        body["actor_id"] = self.rng.choice(["actor0", "fuzz-other", "../../etc", "a" * 200, ""])

    def extra_field(self, body: dict) -> None:
        body[self.rng.choice(["evil", "__class__", "arrays2"])] = {"x": 1}

    # -- hostile messages from anyone -------------------------------------------------------------------------------
    def random_bytes(self) -> tuple[str, list[bytes]]:
        size = self.rng.choice([0, 1, 7, 100, 1000, 65536])
        return "random bytes", [self.np.bytes(size)]

    def not_a_message(self) -> tuple[str, list[bytes]]:
        deep: Any = 1
        for _ in range(40):
            deep = [deep]
        choice = self.rng.choice(
            [
                [1, 2, 3],
                "hello",
                None,
                {1: "integer key"},
                {"kind": "transitions", "v": PROTOCOL_VERSION, "deep": deep},
                {"kind": "x" * 100_000},
                msgpack.ExtType(42, b"\x00" * 8),
            ]
        )
        return "msgpack, not a message", [msgpack.packb(choice, use_bin_type=True)]

    def wrong_kind_or_version(self) -> tuple[str, list[bytes]]:
        body = self.rng.choice(
            [
                {"kind": "exec", "v": PROTOCOL_VERSION},
                {"kind": "hello", "v": 99},
                {"kind": "hello", "v": "2"},
                {"kind": "weights", "v": PROTOCOL_VERSION, "version": 1, "phase": "online", "tensors": {}},
                {"kind": "ack", "v": PROTOCOL_VERSION, "actor_id": "a", "run_id": "r", "acked_seq": 5},
            ]
        )
        if self.rng.random() < 0.3:  # a well-formed message that only the learner sends
            status = Status(
                learner_id="fuzz",
                phase="online",
                weights_version=-1,
                learner_steps=0,
                online_env_steps=0,
                eval_id=-1,
                done=False,
            )
            return "kind the learner does not accept", [to_wire(status)]
        return "unknown kind or version", [msgpack.packb(body, use_bin_type=True)]

    def bad_hello(self) -> tuple[str, list[bytes]]:
        fingerprint = dict(self.fingerprint)
        if self.rng.random() < 0.5:
            fingerprint[self.rng.choice(sorted(fingerprint))] = "tampered"
            digest = config_hash(fingerprint)
        else:
            digest = "0" * 64  # does not match the fingerprint sent with it
        body = {
            "kind": "hello",
            "v": PROTOCOL_VERSION,
            "actor_id": self.rng.choice(["fuzz-hello", "bad id!", "x" * 100]),
            "run_id": "fuzz",
            "config_hash": digest,
            "config_fingerprint": fingerprint,
        }
        return "hello with a bad fingerprint or id", [msgpack.packb(body, use_bin_type=True)]

    def unidentified_chunk(self) -> tuple[str, list[bytes]]:
        return "transitions without hello", [msgpack.packb(self.chunk("fuzz-anon", 0), use_bin_type=True)]

    def several_frames(self) -> tuple[str, list[bytes]]:
        frames = [self.np.bytes(10) for _ in range(self.rng.randrange(2, 5))]
        return "several frames", frames

    def oversized(self) -> tuple[str, list[bytes]]:
        return "over the size limit", [bytes(5 * 1024 * 1024)]


SPOILERS: list[tuple[str, Callable[[Fuzzer, dict], None]]] = [
    ("wrong dtype", Fuzzer.wrong_dtype),
    ("wrong shape", Fuzzer.wrong_shape),
    ("truncated array", Fuzzer.truncated),
    ("huge declared shape", Fuzzer.huge_shape),
    ("NaN or infinity", Fuzzer.non_finite),
    ("half-NaN BC action", Fuzzer.half_nan_bc),
    ("bool byte 2", Fuzzer.bad_bool),
    ("weights version -5", Fuzzer.old_version),
    ("missing array", Fuzzer.missing_array),
    ("extra array", Fuzzer.extra_array),
    ("wrong count", Fuzzer.wrong_count),
    ("bad first_seq", Fuzzer.bad_sequence),
    ("tampered next_obs_shared", Fuzzer.shared_tampered),
    ("another actor's ids", Fuzzer.other_ids),
    ("extra field", Fuzzer.extra_field),
]
ANYONE: list[Callable[[Fuzzer], tuple[str, list[bytes]]]] = [
    Fuzzer.random_bytes,
    Fuzzer.not_a_message,
    Fuzzer.wrong_kind_or_version,
    Fuzzer.bad_hello,
    Fuzzer.unidentified_chunk,
    Fuzzer.several_frames,
]


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def drain(sock: zmq.Socket) -> int:
    n = 0
    while sock.poll(0, zmq.POLLIN):
        sock.recv_multipart()
        n += 1
    return n


def fuzz(services: Services, messages: int, seed: int, alive: Callable[[], bool]) -> tuple[Counter, int, float]:
    """Send `messages` hostile messages; (messages per kind, replies received, seconds)."""
    rng = random.Random(seed)
    fuzzer = Fuzzer(services, rng)
    ctx = zmq.Context()
    anonymous = [dealer(ctx, services.endpoint) for _ in range(4)]
    hostile = [dealer(ctx, services.endpoint) for _ in range(HOSTILE_ACTORS)]
    for i, sock in enumerate(hostile):  # an accepted hello each: authorised, hostile actors
        sock.send(fuzzer.hello(f"fuzz{i}"))
        if not sock.poll(30_000, zmq.POLLIN):
            raise RuntimeError("the learner did not answer a hello")
        sock.recv()
    sent: Counter = Counter()
    replies = 0
    start = time.monotonic()
    try:
        for n in range(messages):
            if rng.random() < 0.5:
                i = rng.randrange(HOSTILE_ACTORS)
                sock, (kind, frames) = hostile[i], fuzzer.spoilt_chunk(f"fuzz{i}")
            else:
                sock = rng.choice(anonymous)
                kind, frames = fuzzer.oversized() if n % 20_000 == 1 else rng.choice(ANYONE)(fuzzer)
            try:
                sock.send_multipart(frames)
            except zmq.Again:  # the learner is behind: let it catch up
                kind = "not sent (learner busy)"
            sent[kind] += 1
            if n % 200 == 0:
                replies += sum(drain(s) for s in (*anonymous, *hostile))
                if not alive():
                    raise RuntimeError(f"the learner died after {n} hostile messages")
    finally:
        elapsed = time.monotonic() - start
        time.sleep(1.0)
        replies += sum(drain(s) for s in (*anonymous, *hostile))
        ctx.destroy(linger=0)
    return sent, replies, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=bench_main.positive_int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=TINY)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        services = Services.make(Path(tmp), args.config, [*OVERRIDES, *args.overrides])
        learner, actor = services.learner(), services.actor()
        try:
            deadline = time.monotonic() + 120
            while services.stats("actor0").get("acked", 0) == 0:
                if time.monotonic() > deadline or learner.poll() is not None or actor.poll() is not None:
                    raise RuntimeError(f"no transitions acknowledged; see {tmp}/*.log")
                time.sleep(0.2)
            acked_before = services.stats("actor0")["acked"]
            sent, replies, elapsed = fuzz(services, args.messages, args.seed, lambda: learner.poll() is None)
            acked_after = services.stats("actor0").get("acked", 0)
            crashed = learner.poll() is not None
            actor.send_signal(signal.SIGTERM)
            actor_code = actor.wait(timeout=120)
            learner.send_signal(signal.SIGTERM)
            learner_code = learner.wait(timeout=120)
        finally:
            for proc in (actor, learner):
                if proc.poll() is None:
                    proc.kill()
            services.close()
        stats, final = services.stats("learner"), services.stats("actor0")
        audit = audit_log(Path(tmp) / "learner", services.cfg)
    print(f"{sum(sent.values()):,} hostile messages in {elapsed:.1f} s ({sum(sent.values()) / elapsed:,.0f}/s), "
          f"{replies:,} replies received back (refusals; acks for far-off sequences)")  # fmt: skip
    for kind, n in sorted(sent.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>7,}  {kind}")
    refused = {name: entry.get("refused", 0) for name, entry in stats.get("actors", {}).items()}
    bad = sum(n for name, n in audit.stored.items() if name != "actor0") + audit.invalid
    print(f"learner: {'crashed' if crashed else 'up throughout'}; exit {learner_code} after SIGTERM; refused: "
          f"{stats.get('refused_unidentified', 0):,} unidentified, per actor {refused}")  # fmt: skip
    print(f"stored under the fuzzer's ids: {sum(n for k, n in audit.stored.items() if k != 'actor0')}; chunks failing "
          f"validation: {audit.invalid}; stored twice {audit.repeated}, skipped {audit.missing}")  # fmt: skip
    print(f"real actor: {acked_after - acked_before} transitions acknowledged during the fuzz; at the end produced "
          f"{final.get('produced')}, acked {final.get('acked')}, stored {audit.stored.get('actor0', 0)}; "
          f"exit {actor_code}")  # fmt: skip
    print(f"headline: {sum(sent.values()):,} hostile messages: learner crashes {int(crashed)}, bad rows stored {bad}, "
          f"real actor's transitions kept arriving: {acked_after - acked_before} during the fuzz")  # fmt: skip


if __name__ == "__main__":
    bench_main.run(main)
