"""The learner service over real sockets on tcp://127.0.0.1: handshake, exactly-once storage, refusals, resume after a
SIGKILL, and the phases from the BC evaluation to the end of the run. A fake actor (DEALER + SUB and the wire
messages) plays the other side; every receive is bounded by a timeout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket as pysocket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from robot_rl.agent import Q2RLAgent
from robot_rl.bc import BC_FINGERPRINT_KEY, bc_fingerprint, load_bc, make_bc_policy, save_bc
from robot_rl.checkpoint import CheckpointError
from robot_rl.config import RunConfig, dump_config, load_config
from robot_rl.dirlock import DirectoryInUse, DirectoryLock
from robot_rl.envs import make_env
from robot_rl.learner import service as learner_service
from robot_rl.learner.broadcast import WeightsFrames
from robot_rl.learner.service import (
    EVAL_ID_JUMP_ON_RESUME,
    WEIGHTS_MAX_WAIT_S,
    LearnerError,
    LearnerService,
    learner_observation_space,
    run_learner,
)
from robot_rl.learner.store import (
    CRC32_HEADER,
    CRC32_MAGIC,
    HEADER,
    HeldReplies,
    StoredChunk,
    StoreError,
    TransitionStore,
    encode_record,
)
from robot_rl.obs import spec_from_space, state_bounds
from robot_rl.runlog import read_eval_csv
from robot_rl.security import make_keys, secure_client
from robot_rl.wire import (
    PROTOCOL_VERSION,
    Ack,
    EvalReport,
    Hello,
    Message,
    Refuse,
    Status,
    Transitions,
    Weights,
    Welcome,
    config_fingerprint,
    config_hash,
    from_frames,
    from_wire,
    join_frames,
    to_frames,
    to_wire,
    transition_spec,
    unpack_tensors,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ci_tiny.yaml"
WAIT_S = 15.0  # generous: the suite may share two busy cores
LIMIT = 64 << 20


def free_ports(n: int) -> list[int]:
    socks = [pysocket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tiny_config(*extra: str) -> RunConfig:
    request, weights = free_ports(2)
    return load_config(
        TINY,
        [
            f"transport.learner=tcp://127.0.0.1:{request}",
            f"transport.weights=tcp://127.0.0.1:{weights}",
            "transport.poll_ms=20",
            "transport.status_every_s=0.1",
            "transport.max_message_bytes=67108864",
            "qest.rollouts=2",
            "train.env_steps=40",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "train.buffer_capacity=1000",
            *extra,
        ],
    )


# The hello's entry for the BC policy of `bc_dir`, which every learner of this module loads (FakeActor sends it).
BC_FINGERPRINT: dict[str, str] = {}


@pytest.fixture(scope="module")
def bc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(TINY)
    space = learner_observation_space(cfg)
    low, high = state_bounds(space)
    torch.manual_seed(0)
    policy = make_bc_policy(cfg.bc, spec_from_space(space), transition_spec(cfg).action_dim, low, high)
    BC_FINGERPRINT.update(bc_fingerprint(policy))
    return save_bc(policy, tmp_path_factory.mktemp("bc") / "bc")


@contextmanager
def running(service: LearnerService) -> Iterator[dict]:
    """The service running in a thread; stopped (stop event) and joined on exit. Yields {'summary' / 'error'}."""
    stop = threading.Event()
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = service.run(stop)
        except BaseException as exc:  # surfaced by the test below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the learner did not stop within the timeout"
    if "error" in result:
        raise result["error"]


def chunk_arrays(cfg: RunConfig, first: int, count: int, *, ends: tuple[int, ...] = (), version: int = -1) -> dict:
    """A valid chunk whose values are a function of the sequence number (a resent chunk is identical)."""
    spec = transition_spec(cfg)
    seq = np.arange(first, first + count, dtype=np.float32)
    obs = {
        k: (np.sin(seq[:, None] + np.arange(shape[0])) * 0.01).astype(np.float32) for k, (shape, _) in spec.obs.items()
    }
    actions = np.tanh(np.cos(seq[:, None] * 0.3 + np.arange(spec.action_dim))).astype(np.float32)
    truncated = np.zeros(count, bool)
    for i in ends:
        truncated[i] = True
    arrays = {f"obs/{k}": v for k, v in obs.items()}
    arrays |= {f"next_obs/{k}": v + 0.001 for k, v in obs.items()}
    arrays |= {
        "actions": actions,
        "bc_actions": actions.copy(),
        "rewards": np.zeros(count, np.float32),
        "terminated": np.zeros(count, bool),
        "truncated": truncated,
        "weights_version": np.full(count, version, np.int64),
    }
    return arrays


class FakeActor:
    """The actor's side of the protocol: a DEALER for requests, a SUB for weights and status."""

    def __init__(
        self, ctx: zmq.Context, cfg: RunConfig, actor_id: str = "a0", run_id: str = "r0", *, keys: Path | None = None
    ) -> None:
        self.cfg, self.actor_id, self.run_id = cfg, actor_id, run_id
        self.dealer = ctx.socket(zmq.DEALER)
        self.sub = ctx.socket(zmq.SUB)
        for sock in (self.dealer, self.sub):
            sock.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                secure_client(sock, keys_dir=keys, actor=actor_id)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.dealer.connect(cfg.transport.learner)
        self.sub.connect(cfg.transport.weights_endpoint)
        self.weights: list[Weights] = []
        self.phases: list[str] = []

    def send(self, message: Message | bytes) -> None:
        self.dealer.send(message if isinstance(message, bytes) else to_wire(message))

    def recv(self, timeout: float = WAIT_S) -> Message:
        assert self.dealer.poll(int(timeout * 1000), zmq.POLLIN), "no reply from the learner"
        return from_wire(self.dealer.recv(), max_bytes=LIMIT)

    def request(self, message: Message | bytes, timeout: float = WAIT_S) -> Message:
        self.send(message)
        return self.recv(timeout)

    def hello(self, cfg: RunConfig | None = None, timeout: float = WAIT_S, bc: dict | None = None) -> Message:
        fingerprint = config_fingerprint(cfg or self.cfg) | (BC_FINGERPRINT if bc is None else bc)
        hello = Hello(
            actor_id=self.actor_id,
            run_id=self.run_id,
            config_hash=config_hash(fingerprint),
            config_fingerprint=fingerprint,
        )
        return self.request(hello, timeout)

    def transitions(self, first: int, count: int, lost_before: int = 0, **kw) -> Message:
        arrays = chunk_arrays(self.cfg, first, count, **kw)
        msg = Transitions(actor_id=self.actor_id, run_id=self.run_id, first_seq=first, count=count, arrays=arrays,
                          lost_before=lost_before)  # fmt: skip
        return self.request(msg)

    def report(self, eval_id: int, success_rate: float, episodes: int = 2) -> None:
        self.send(
            EvalReport(
                actor_id=self.actor_id,
                run_id=self.run_id,
                eval_id=eval_id,
                episodes=episodes,
                success_rate=success_rate,
                bc_action_fraction=0.5,
                weights_version=self.weights[-1].version if self.weights else -1,
            )
        )

    def wait_status(self, pred: Callable[[Status], bool], timeout: float = WAIT_S) -> Status:
        """The first broadcast Status matching `pred`; Weights seen meanwhile are kept, phases recorded."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sub.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            msg = from_frames(self.sub.recv_multipart(copy=False), max_bytes=LIMIT)
            if isinstance(msg, Weights):
                self.weights.append(msg)
            elif isinstance(msg, Status):
                if not self.phases or self.phases[-1] != msg.phase:
                    self.phases.append(msg.phase)
                if pred(msg):
                    return msg
        raise AssertionError(f"no matching status within {timeout} s (phases seen: {self.phases})")


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def acked(reply: Message) -> int:
    assert isinstance(reply, Ack), reply
    return reply.acked_seq


# ---------------------------------------------------------------------------------------------------------------------
def test_learner_space_is_the_envs() -> None:
    cfg = load_config(TINY)
    env = make_env(cfg.env)
    try:
        assert learner_observation_space(cfg) == env.observation_space
    finally:
        env.close()


def test_hello_welcomed_or_refused_naming_the_differing_field(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        welcome = FakeActor(ctx, cfg, "a0").hello()
        assert isinstance(welcome, Welcome)
        assert (welcome.learner_id, welcome.phase, welcome.weights_version, welcome.acked_seq) == (
            "learner",
            "eval",
            -1,
            -1,
        )
        other = load_config(TINY, ["agent.hidden=[64, 64]"])
        refuse = FakeActor(ctx, cfg, "a1").hello(cfg=other)
        assert isinstance(refuse, Refuse)
        assert "agent.hidden" in refuse.fields and "agent.hidden" in refuse.reason
        # Another BC policy: its rollouts would estimate Q of a policy the learner does not have.
        space = learner_observation_space(cfg)
        other_bc = make_bc_policy(cfg.bc, spec_from_space(space), 6, *state_bounds(space))  # other random weights
        refuse = FakeActor(ctx, cfg, "a2").hello(bc=bc_fingerprint(other_bc))
        assert isinstance(refuse, Refuse) and refuse.fields == [BC_FINGERPRINT_KEY]
        assert "the actor's --bc policy is not the learner's" in refuse.reason
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["refused_unidentified"] == 2
    assert list(stats["actors"]) == ["a0"]


def test_a_refused_hello_gives_each_differing_value_on_both_sides_and_the_learner_names_the_actor(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg = tiny_config()
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        other = load_config(TINY, ["agent.num_critics=5"])
        refuse = FakeActor(ctx, cfg, "arm_b").hello(cfg=other)
        assert isinstance(refuse, Refuse) and refuse.fields == ["agent.num_critics"]
        assert "(agent.num_critics: learner 4, actor 5)" in refuse.reason
        # A field that may differ (the actor's own control period) is accepted.
        assert isinstance(FakeActor(ctx, cfg, "arm_c").hello(cfg=load_config(TINY, ["actor.period_s=0.02"])), Welcome)
    assert "refused a message from actor arm_b (run r0, hello): " in caplog.text
    assert "learner 4, actor 5" in caplog.text


def test_a_message_before_the_hello_is_refused_naming_the_actor_it_claims_and_the_likely_cause(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    """After a learner restart every actor's next message comes on a connection the new learner never welcomed:
    the refusal (the actor says hello again) names the actor and says why, instead of an unidentified peer."""
    cfg = tiny_config()
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        refuse = FakeActor(ctx, cfg, "arm_a", "r7").transitions(0, 5)
        assert isinstance(refuse, Refuse) and "a learner restarted since the hello" in refuse.reason
    assert (
        "refused a message from a peer sending as actor arm_a (run r7): transitions before an accepted" in caplog.text
    )


def test_curve_admits_an_authorised_actor_only(tmp_path: Path, bc_dir: Path, ctx) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, actors=["a0", "a1"])
    cfg = tiny_config(f"transport.keys_dir={keys}")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        actor = FakeActor(ctx, cfg, "a0", keys=keys)
        assert isinstance(actor.hello(), Welcome)
        assert actor.wait_status(lambda s: s.phase == "eval").learner_id == "learner"
        plain = FakeActor(ctx, cfg, "a2")
        # Its handshake fails: once the connection is dropped there is nothing to queue on (a send would block).
        with contextlib.suppress(zmq.Again):
            plain.dealer.send(b"anything", zmq.NOBLOCK)
        assert not plain.dealer.poll(500, zmq.POLLIN) and not plain.sub.poll(100, zmq.POLLIN)
        # An admitted key used under another actor's id: refused, so nothing it sends counts as a0's.
        impostor = FakeActor(ctx, cfg, "a1", keys=keys)
        impostor.actor_id = "a0"
        refusal = impostor.hello()
        assert isinstance(refusal, Refuse) and "authenticated with the key of actor a1" in refusal.reason
        assert refusal.fields == ["actor.actor_id"]  # a field named: the actor stops and says why, not hello again
        assert isinstance(impostor.transitions(0, 5), Refuse)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["refused_unidentified"] == 2 and list(stats["actors"]) == ["a0"]
    assert stats["actors"]["a0"]["stored"] == 0


def test_transitions_stored_once_duplicates_counted_gap_not_stored(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        assert acked(actor.transitions(0, 10)) == 9
        assert acked(actor.transitions(0, 10)) == 9  # the same chunk again: nothing new
        assert acked(actor.transitions(5, 10)) == 14  # overlapping: only 10..14 are new
        assert acked(actor.transitions(20, 5)) == 14  # past a gap: not stored, resume from 15
        assert acked(actor.transitions(15, 5)) == 19
        # Past a gap the actor says it lost (its spill was damaged): stored, the stream goes on past the lost ones.
        assert acked(actor.transitions(25, 5, lost_before=4)) == 19  # says 21..24 are lost: 20 is not, so a gap
        assert acked(actor.transitions(25, 5, lost_before=5)) == 29
        # A second run under the same actor id (an actor restarted with a new --out): its own stream.
        again = FakeActor(ctx, cfg, run_id="r1")
        assert isinstance(again.hello(), Welcome)
        assert acked(again.transitions(0, 7)) == 6
    assert len(service.buffer) == 32
    stats = json.loads((out / "stats.json").read_text())
    assert stats["actors"]["a0"] | {"last_seen_s": None} == {
        "stored": 32,
        "duplicates": 15,
        "refused": 0,
        "gaps": 2,
        "lost": 5,
        "last_seen_s": None,
        "runs": {"r0": {"stored": 25, "acked_seq": 29}, "r1": {"stored": 7, "acked_seq": 6}},
    }
    assert stats["env_steps"] == 32 and stats["online_env_steps"] == 0
    # The durable log holds sequences 0..19 and 25..29 once each, exactly as sent; a resume continues after 29.
    chunks = [c for c in TransitionStore(out / "buffer").read_back() if c.run_id == "r0"]
    assert [(c.first_seq, c.count) for c in chunks] == [(0, 10), (10, 5), (15, 5), (25, 5)]
    stored_obs = np.concatenate([c.arrays["obs/ee_pose"] for c in chunks[:3]])
    np.testing.assert_array_equal(stored_obs, chunk_arrays(cfg, 0, 20)["obs/ee_pose"])
    np.testing.assert_array_equal(service.buffer.take(np.arange(20)).obs["ee_pose"], stored_obs)
    resumed = LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    assert resumed.streams[("a0", "r0")].next_seq == 30
    # Counters kept only in stats.json survive the resume, the transitions the actor lost among them.
    kept = resumed.actors["a0"]
    assert (kept.duplicates, kept.refused, kept.gaps, kept.lost) == (15, 0, 2, 5)
    resumed.store.close()


def test_chunks_in_frames_are_logged_as_received_and_a_hello_of_another_protocol_is_refused(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    with running(service):
        old = FakeActor(ctx, cfg, "old")
        fingerprint = config_fingerprint(cfg) | BC_FINGERPRINT
        hello = Hello(actor_id="old", run_id="r0", config_hash=config_hash(fingerprint), config_fingerprint=fingerprint)
        reply = old.request(msgpack.packb({**hello.to_message(), "v": 2}, use_bin_type=True))
        assert isinstance(reply, Refuse) and f"protocol version 2, this side speaks {PROTOCOL_VERSION}" in reply.reason
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        sent = []
        for first, count in ((0, 6), (6, 4)):
            msg = Transitions(actor_id="a0", run_id="r0", first_seq=first, count=count,
                              arrays=chunk_arrays(cfg, first, count))  # fmt: skip
            frames = to_frames(msg)
            assert len(frames) > 2
            actor.dealer.send_multipart(frames)
            assert acked(actor.recv()) == first + count - 1
            sent.append(frames)
        # A frame short of what its header lists: refused, nothing stored.
        actor.dealer.send_multipart(to_frames(Transitions(actor_id="a0", run_id="r0", first_seq=10, count=2,
                                                          arrays=chunk_arrays(cfg, 10, 2)))[:-1])  # fmt: skip
        assert isinstance(actor.recv(), Refuse)
    log = (out / "buffer" / "a0@r0.log").read_bytes()
    records = []
    offset = 0
    while offset < len(log):
        _, _, length, _ = HEADER.unpack_from(log, offset)
        records.append(log[offset + HEADER.size : offset + HEADER.size + length])
        offset += HEADER.size + length
    assert records == [join_frames(frames) for frames in sent]  # the frames as received, not re-encoded
    chunks = TransitionStore(out / "buffer").read_back()
    assert [(c.first_seq, c.count) for c in chunks] == [(0, 6), (6, 4)]
    np.testing.assert_array_equal(
        np.concatenate([c.arrays["actions"] for c in chunks]), chunk_arrays(cfg, 0, 10)["actions"]
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["actors"]["a0"]["stored"] == 10 and stats["actors"]["a0"]["refused"] == 1


def test_the_buffer_is_told_which_rows_continue_when_the_wire_sent_next_observations_once(
    tmp_path: Path, bc_dir: Path, ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    import robot_rl.wire

    monkeypatch.setattr(robot_rl.wire, "MIN_SHARED_BYTES", 0)  # share the tiny config's small observations too
    cfg = tiny_config()
    out = tmp_path / "run"
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    hints: list[np.ndarray | None] = []
    add_many = service.buffer.add_many

    def spy(**kw):
        hints.append(kw.get("continues"))
        add_many(**kw)

    monkeypatch.setattr(service.buffer, "add_many", spy)
    arrays = chunk_arrays(cfg, 0, 8, ends=(7,))
    for key in transition_spec(cfg).obs:
        arrays[f"next_obs/{key}"][:4] = arrays[f"obs/{key}"][1:5]  # rows 0-3 continue, 4-7 do not
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        actor.dealer.send_multipart(
            to_frames(Transitions(actor_id="a0", run_id="r0", first_seq=0, count=8, arrays=arrays))
        )
        assert acked(actor.recv()) == 7
    assert len(hints) == 1 and hints[0] is not None
    np.testing.assert_array_equal(hints[0], [True] * 4 + [False] * 3)
    batch = service.buffer.take(np.arange(8))
    for key in transition_spec(cfg).obs:
        np.testing.assert_array_equal(batch.next_obs[key], arrays[f"next_obs/{key}"])
        np.testing.assert_array_equal(batch.obs[key], arrays[f"obs/{key}"])
    assert service.buffer.frames_stored() == 8 + 4  # each observation once: 8 obs frames and 4 next-only frames
    (chunk,) = TransitionStore(out / "buffer").read_back()
    np.testing.assert_array_equal(chunk.continues, hints[0])  # the log reads back what the wire said


def test_a_stopped_learner_tells_the_actors_it_is_stopping(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        assert not actor.wait_status(lambda s: True).stopping  # running: not stopping
    last = actor.wait_status(lambda s: s.stopping)  # sent as the stop began, before the checkpoint
    assert not last.done  # stopping is not finishing: --resume continues the run


def test_an_actor_that_stops_reading_holds_a_bounded_number_of_broadcasts_in_the_learners_memory(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    """A subscriber that never reads (a stopped or stuck actor): the learner's PUB keeps at most a few messages for it
    and drops the rest, so broadcasts of tens of megabytes do not pile up in memory."""
    from robot_rl.learner.service import PUB_SNDHWM

    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    service._open_sockets()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(cfg.transport.weights_endpoint)
        time.sleep(0.5)  # connected before the broadcasts
        payload = np.zeros(2 << 20, np.uint8)  # 2 MB, the size of a small agent's weights
        trackers = []
        for _ in range(48):
            frame = zmq.Frame(payload, copy=False, track=True)
            service.pub.send(frame, copy=False)
            trackers.append(frame.tracker)
            del frame
            time.sleep(0.02)
        time.sleep(1.0)
        held = sum(not t.done for t in trackers)  # still in the learner's memory (queued for the subscriber)
        assert held <= PUB_SNDHWM + 8, held  # the queue, plus what the socket buffers and the connection take
    finally:
        sub.close(0)
        service._close()


def test_two_actors_sending_under_one_id_and_run_are_said_and_a_reconnecting_actor_is_not(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    said = lambda: [r for r in caplog.records if "transitions arrive on two connections" in r.getMessage()]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="robot_rl.learner.service"), running(service):
        first = FakeActor(ctx, cfg, "arm", "run1")
        assert isinstance(first.hello(), Welcome)
        assert acked(first.transitions(0, 5)) == 4
        first.dealer.close(0)
        first.sub.close(0)
        again = FakeActor(ctx, cfg, "arm", "run1")  # the same actor reconnected: a new connection, once
        assert isinstance(again.hello(), Welcome)
        assert acked(again.transitions(5, 5)) == 9
        assert said() == []
        copy = FakeActor(ctx, cfg, "arm", "run1")  # a second robot PC with a copy of the actor's --out
        assert isinstance(copy.hello(), Welcome)
        for k in range(4):  # both send their own transitions 10.. in turn
            again.transitions(10 + 5 * k, 5)
            copy.transitions(10 + 5 * k, 5)
        assert len(said()) == 1 and "arm run run1" in said()[0].getMessage()


def test_malformed_and_unidentified_refused_while_a_good_actor_is_served(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        stranger = FakeActor(ctx, cfg, "stranger")
        assert isinstance(stranger.request(os.urandom(64)), Refuse)
        early = stranger.transitions(0, 3)  # before any hello
        assert isinstance(early, Refuse) and "hello" in early.reason

        bad = FakeActor(ctx, cfg, "bad")
        assert isinstance(bad.hello(), Welcome)
        arrays = chunk_arrays(cfg, 0, 4)
        arrays["obs/ee_pose"] = arrays["obs/ee_pose"].astype(np.float64)
        wrong_dtype = Transitions(actor_id="bad", run_id="r0", first_seq=0, count=4, arrays=arrays)
        reply = bad.request(wrong_dtype)
        assert isinstance(reply, Refuse) and "dtype" in reply.reason
        assert isinstance(bad.request(b"\xc1garbage"), Refuse)
        impostor = Transitions(actor_id="good", run_id="r0", first_seq=0, count=2, arrays=chunk_arrays(cfg, 0, 2))
        assert isinstance(bad.request(impostor), Refuse)
        assert isinstance(bad.request(Ack(actor_id="bad", run_id="r0", acked_seq=3)), Refuse)  # wrong kind

        good = FakeActor(ctx, cfg, "good")
        assert isinstance(good.hello(), Welcome)
        assert acked(good.transitions(0, 6)) == 5
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["refused_unidentified"] == 2
    assert stats["actors"]["bad"]["refused"] == 4 and stats["actors"]["bad"]["stored"] == 0
    assert stats["actors"]["good"]["stored"] == 6 and stats["actors"]["good"]["refused"] == 0
    assert len(service.buffer) == 6


LEARNER_SCRIPT = """
import sys
from pathlib import Path
from robot_rl.config import load_config
from robot_rl.learner.service import run_learner
cfg, out, bc = load_config(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.exit(run_learner(cfg, out, bc_dir=bc, resume=sys.argv[4] == "resume", quiet=True))
"""


def start_learner_process(config_path: Path, out: Path, bc_dir: Path, *, resume: bool) -> subprocess.Popen:
    args = [
        sys.executable,
        "-c",
        LEARNER_SCRIPT,
        str(config_path),
        str(out),
        str(bc_dir),
        "resume" if resume else "new",
    ]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_the_learner_command_resumably(tmp_path: Path, bc_dir: Path, ctx, capsys) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    replies: list[Message] = []

    def actor_then_sigterm() -> None:
        try:
            actor = FakeActor(ctx, cfg)
            replies.extend([actor.hello(), actor.transitions(0, 15)])
        finally:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # run_learner's handler, not pytest's death
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=actor_then_sigterm, daemon=True)
    thread.start()
    assert run_learner(cfg, out, bc_dir=bc_dir, quiet=True) == 130
    thread.join(WAIT_S)
    assert isinstance(replies[0], Welcome) and acked(replies[1]) == 14
    stderr = capsys.readouterr().err
    assert str(out) in stderr and "--resume" in stderr
    assert (out / "checkpoints" / "latest" / "manifest.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_sigkill_then_resume_keeps_every_acked_transition(tmp_path: Path, bc_dir: Path, ctx, caplog) -> None:
    cfg = tiny_config()
    config_path, out = tmp_path / "config.yaml", tmp_path / "run"
    config_path.write_text(dump_config(cfg))
    proc = start_learner_process(config_path, out, bc_dir, resume=False)
    try:
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(timeout=60), Welcome)
        assert acked(actor.transitions(0, 15)) == 14
        assert acked(actor.transitions(15, 15)) == 29
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    log_file = out / "buffer" / "a0@r0.log"
    whole = log_file.stat().st_size
    with log_file.open("ab") as f:  # a record torn by the kill: the header promises more than was written
        f.write(encode_record(StoredChunk("a0", "r0", 30, chunk_arrays(cfg, 30, 5), online=False))[:40])

    with pytest.raises(LearnerError, match="--resume"):
        LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)

    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    assert log_file.stat().st_size == whole and "torn or corrupt tail" in caplog.text
    assert len(service.buffer) == 30
    with running(service):
        again = FakeActor(ctx, cfg)
        welcome = again.hello()
        assert isinstance(welcome, Welcome) and welcome.acked_seq == 29
        assert acked(again.transitions(25, 10)) == 34
    assert len(service.buffer) == 35
    assert service.actors["a0"].stored == 35 and service.actors["a0"].duplicates == 5


def to_online(actor: FakeActor) -> None:
    """Drive a fresh learner through the BC evaluation and Q-Estimation (two 5-step BC episodes) to online."""
    assert isinstance(actor.hello(), Welcome)
    actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == 0)
    actor.report(0, 0.5)
    actor.wait_status(lambda s: s.phase == "qest_rollouts")
    assert acked(actor.transitions(0, 10, ends=(4, 9))) == 9
    actor.wait_status(lambda s: s.phase == "online")


def to_online_eval(actor: FakeActor, steps: int) -> None:
    """to_online, then `steps` online transitions: the learner evaluates its weights (evaluation 1)."""
    to_online(actor)
    assert acked(actor.transitions(10, steps, version=1)) == 9 + steps
    actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == 1)


def test_phases_from_bc_eval_through_q_estimation_to_done(tmp_path: Path, bc_dir: Path, ctx, monkeypatch) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    with running(service) as result:
        actor = FakeActor(ctx, cfg)
        to_online(actor)
        assert actor.weights and actor.weights[0].version == 1 and actor.weights[0].phase == "online"

        # The broadcast weights load into a fresh agent.
        space = learner_observation_space(cfg)
        low, high = state_bounds(space)
        fresh = Q2RLAgent(
            cfg.agent,
            obs_spec=spec_from_space(space),
            state_low=low,
            state_high=high,
            action_dim=6,
            bc_policy=load_bc(bc_dir),
            seed=99,
        )
        fresh.load_acting_state(unpack_tensors(actor.weights[0].tensors))
        first = unpack_tensors(actor.weights[0].tensors)
        for name, tensor in fresh.acting_state().items():
            torch.testing.assert_close(tensor, first[name])

        # A fast actor overshoots train.env_steps (40) in one chunk: the evaluation at 20 online steps comes first
        # (after the 20 learner steps owed up to it), and the run ends only after the final one at 40.
        assert acked(actor.transitions(10, 45, version=1)) == 54
        status = actor.wait_status(lambda s: s.phase == "eval")
        assert status.eval_id == 1 and status.online_env_steps == 45 and status.learner_steps == 20
        assert status.online_budget == cfg.train.env_steps == 40  # what actors stop collecting at
        actor.report(1, 0.25)
        actor.wait_status(lambda s: s.phase == "online")
        status = actor.wait_status(lambda s: s.phase == "eval")
        assert status.eval_id == 2 and status.learner_steps == 40
        actor.report(2, 0.75)
        actor.wait_status(lambda s: s.done)
        # An actor sees `done` between episodes: the rest of the episode it is in still arrives, and is stored.
        time.sleep(1.5)
        assert acked(actor.transitions(55, 5, version=2)) == 59
    summary = result["summary"]
    assert summary["finished"] is True
    assert actor.phases[:5] == ["eval", "qest_rollouts", "qest_fit", "online", "eval"]
    versions = [w.version for w in actor.weights]
    assert versions == sorted(set(versions)) and versions[-1] >= 4  # online, eval, online, step 30, eval ...
    assert (summary["bc_success_rate"], summary["final_success_rate"], summary["best_success_rate"]) == (
        0.5,
        0.75,
        0.75,
    )
    assert (summary["env_steps"], summary["online_env_steps"], summary["learner_steps"]) == (60, 50, 40)
    rows = read_eval_csv(out / "eval.csv")
    assert [(r.phase, r.env_steps, r.success_rate) for r in rows] == [
        ("bc", 0, 0.5),
        ("online", 55, 0.25),
        ("online", 55, 0.75),
    ]
    assert json.loads((out / "summary.json").read_text())["final_success_rate"] == 0.75
    assert json.loads((out / "stats.json").read_text())["rollouts"] == cfg.qest.rollouts == 2  # kept after the fit
    for path in ("curves.png", "config.yaml", "checkpoints/final/manifest.json", "checkpoints/final/bc/bc.json"):
        assert (out / path).is_file(), path
    assert any((out / "tb").iterdir())

    # The run is complete: a resume has nothing to do (it used to evaluate again and wait for actors to drive the
    # robot), unless it is given a larger budget. It is told so before the logs are read back (the final
    # checkpoint's counters say it), and so it is where that checkpoint's manifest cannot be read (the logs' count).
    # One learner at a time holds the directory.
    complete = r"is complete \(checkpoints/final; 50 online env steps of train\.env_steps 40"
    with monkeypatch.context() as patch:
        patch.setattr(TransitionStore, "read_back", lambda self: pytest.fail("read back a complete run's logs"))
        with pytest.raises(LearnerError, match=complete):
            LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    manifest = out / "checkpoints/final/manifest.json"
    kept = manifest.read_bytes()
    manifest.write_text("{")
    with pytest.raises(LearnerError, match=complete):
        LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    manifest.write_bytes(kept)
    more = LearnerService(tiny_config("train.env_steps=80"), out, bc_dir=bc_dir, resume=True, quiet=True)
    assert (more.phase, more.counters.online_env_steps) == ("online", 50)  # its final evaluation is in eval.csv
    more.store.close()
    held = DirectoryLock(out, what="learner")
    try:
        with pytest.raises(DirectoryInUse, match=rf"{out} is in use by pid {os.getpid()}"):
            run_learner(tiny_config("train.env_steps=80"), out, bc_dir=bc_dir, resume=True, quiet=True)
    finally:
        held.release()


def test_a_done_learner_waits_for_the_episode_a_slower_actor_is_still_sending(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    """The learner's config may give actor.period_s 0 while an actor on a robot runs at 10 Hz (a chunk every 3 s):
    once done, the learner waits for the end of the episode that actor's last chunk left open."""
    cfg = tiny_config("actor.period_s=0")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service) as result:
        actor = FakeActor(ctx, cfg)
        to_online(actor)
        assert acked(actor.transitions(10, 45, version=1)) == 54  # the episode goes on after this chunk
        for eval_id in (1, 2):
            actor.wait_status(lambda s, i=eval_id: s.phase == "eval" and s.eval_id == i)
            actor.report(eval_id, 0.5)
        actor.wait_status(lambda s: s.done)
        time.sleep(3.0)  # the robot's next chunk, 30 steps at 10 Hz later
        stats = json.loads((tmp_path / "run" / "stats.json").read_text())
        assert (stats["phase"], stats["done"]) == ("paused", True)  # not "eval"
        assert acked(actor.transitions(55, 5, version=2, ends=(4,))) == 59
    assert result["summary"]["finished"] is True and result["summary"]["env_steps"] == 60


def test_resume_in_an_evaluation_restores_networks_counters_and_phase(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    first = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    with running(first):
        actor = FakeActor(ctx, cfg)
        to_online(actor)
        assert acked(actor.transitions(10, 20, version=1)) == 29
        actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == 1)
    before = first.agent.acting_state()
    assert first.counters.learner_steps == 20

    service = LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    resumed_id = 1 + EVAL_ID_JUMP_ON_RESUME  # ids jump on resume: ids the killed learner issued are never reused
    assert (service.phase, service.eval_id, service.qest_done) == ("eval", resumed_id, True)
    assert (service.counters.env_steps, service.counters.online_env_steps, service.counters.learner_steps) == (
        30,
        20,
        20,
    )
    assert len(service.buffer) == 30 and service.agent.actor_opt.state_dict()["state"]
    for name, tensor in service.agent.acting_state().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    with running(service) as result:
        actor = FakeActor(ctx, cfg)
        welcome = actor.hello()
        assert isinstance(welcome, Welcome) and (welcome.phase, welcome.acked_seq) == ("eval", 29)
        assert welcome.weights_version > first.weights_version
        actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == resumed_id)
        actor.wait_status(lambda s: bool(actor.weights))  # broadcast again for the new actor: it evaluates them
        actor.report(1, 0.0)  # the interrupted evaluation's id is stale now: ignored
        actor.report(2, 0.0)  # an id the killed learner might have issued after its checkpoint: ignored
        actor.report(resumed_id, 0.5)
        actor.wait_status(lambda s: s.phase == "online")
        assert acked(actor.transitions(30, 20, version=welcome.weights_version)) == 49
        actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == resumed_id + 1)
        actor.report(resumed_id + 1, 1.0)
        actor.wait_status(lambda s: s.done)
    summary = result["summary"]
    assert summary["finished"] and summary["learner_steps"] == 40 and summary["final_success_rate"] == 1.0
    rows = read_eval_csv(out / "eval.csv")
    assert [(r.phase, r.env_steps, r.success_rate) for r in rows] == [
        ("bc", 0, 0.5),
        ("online", 30, 0.5),
        ("online", 50, 1.0),
    ]


def _stopped_at_the_first_online_evaluation(tmp_path: Path, bc_dir: Path, ctx) -> tuple[RunConfig, Path]:
    """A learner run (tmp_path/run) driven to its first online evaluation (20 online steps), then stopped."""
    cfg = tiny_config()
    run = tmp_path / "run"
    with running(LearnerService(cfg, run, bc_dir=bc_dir, quiet=True)):
        to_online_eval(FakeActor(ctx, cfg), 20)
    return cfg, run


def test_resume_falls_back_to_an_older_checkpoint_and_continues_a_stream_whose_log_lost_acked_chunks(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg, run = _stopped_at_the_first_online_evaluation(tmp_path, bc_dir, ctx)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000020"]
    for name in ("latest", "step_00000020"):  # they record the next due point: a resume does not save at once again
        assert json.loads((checkpoints / name / "manifest.json").read_text())["learner"]["next_ckpt_at"] == 40

    def copy(name: str) -> Path:
        return Path(shutil.copytree(run, tmp_path / name))

    # latest missing, or its manifest damaged: the newest step_* checkpoint restores the run, and a warning says so.
    missing = copy("missing")
    shutil.rmtree(missing / "checkpoints" / "latest")
    damaged = copy("damaged")
    manifest = json.loads((damaged / "checkpoints" / "latest" / "manifest.json").read_text())
    del manifest["learner"]["phase"]
    (damaged / "checkpoints" / "latest" / "manifest.json").write_text(json.dumps(manifest))
    # Torn by a crash between the two renames of a save: latest's manifest with the tensors of an earlier save.
    torn = copy("torn")
    shutil.copy(torn / "checkpoints" / "step_00000020" / "model.safetensors", torn / "checkpoints" / "latest")
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    step = json.loads((checkpoints / "step_00000020" / "manifest.json").read_text())  # saved before latest's
    expected = (step["learner"]["phase"], step["counters"]["learner_steps"], 30)
    latest = json.loads((checkpoints / "latest" / "manifest.json").read_text())
    assert expected != (latest["learner"]["phase"], latest["counters"]["learner_steps"], 30)  # told apart
    for out, why in ((missing, "it is missing"), (damaged, "phase is missing or invalid"), (torn, "is torn")):
        caplog.clear()
        service = LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
        assert (service.phase, service.counters.learner_steps, service.counters.env_steps) == expected
        # Ids go on above the last one the run asked for (evaluation 1, after step_00000020: stats.json says so).
        assert service.eval_id == max(step["learner"]["eval_id"], 1) + EVAL_ID_JUMP_ON_RESUME == 1001
        assert "resuming from checkpoint" in caplog.text and "step_00000020" in caplog.text and why in caplog.text
        service.store.close()

    # No checkpoint restores: refused, naming each one's problem.
    broken = copy("broken")
    for path in (broken / "checkpoints").iterdir():
        (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"no checkpoint can be restored.*latest.*step_00000020.*aside"):
        LearnerService(cfg, broken, bc_dir=bc_dir, resume=True, quiet=True)

    # The log lost acknowledged chunks 10..29: said as an error, and the stream goes on at 30, where the checkpoint
    # saw it, so the actor's next chunk is stored (not held at a gap) and survives the next resume.
    lost = copy("lost")
    log_file = lost / "buffer" / "a0@r0.log"
    first_record = len(encode_record(StoredChunk("a0", "r0", 0, chunk_arrays(cfg, 0, 10, ends=(4, 9)), False)))
    os.truncate(log_file, first_record)
    caplog.clear()
    service = LearnerService(cfg, lost, bc_dir=bc_dir, resume=True, quiet=True)
    assert "20 acknowledged transitions were lost" in caplog.text and service.counters.env_steps == 10
    assert service.actors["a0"].lost == 20  # counted in stats.json as lost (kept across later resumes)
    with running(service):
        actor = FakeActor(ctx, cfg)
        welcome = actor.hello()
        assert isinstance(welcome, Welcome) and welcome.acked_seq == 29
        assert acked(actor.transitions(30, 5, version=1)) == 34
    again = LearnerService(cfg, lost, bc_dir=bc_dir, resume=True, quiet=True)
    assert again.streams[("a0", "r0")].next_seq == 35 and again.counters.env_steps == 15
    again.store.close()


def test_resume_takes_the_newest_checkpoint_the_configs_learning_rates_and_ids_above_any_asked_before(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg, run = _stopped_at_the_first_online_evaluation(tmp_path, bc_dir, ctx)
    checkpoints = run / "checkpoints"
    # An older `final` beside a newer step_*: without latest, the newest by learner steps restores, not `final`.
    shutil.copytree(checkpoints / "step_00000020", checkpoints / "final")
    for name, steps in (("final", 3), ("step_00000020", 7)):  # the counts a run makes further apart
        manifest = json.loads((checkpoints / name / "manifest.json").read_text())
        manifest["counters"]["learner_steps"] = steps
        (checkpoints / name / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(checkpoints / "latest")
    # An earlier resume asked for evaluation 1500 (stats.json); new learning rates are given.
    stats = json.loads((run / "stats.json").read_text())
    (run / "stats.json").write_text(json.dumps({**stats, "eval_id": 1500}))
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    faster = tiny_config("agent.actor_lr=0.001")
    service = LearnerService(faster, run, bc_dir=bc_dir, resume=True, quiet=True)
    assert service.counters.learner_steps == 7
    assert "resuming from checkpoint" in caplog.text and "step_00000020" in caplog.text
    assert service.eval_id == 1500 + EVAL_ID_JUMP_ON_RESUME
    assert [g["lr"] for g in service.agent.actor_opt.param_groups] == [0.001]
    assert [g["lr"] for g in service.agent.critic_opt.param_groups] == [faster.agent.critic_lr]
    assert "resumed with the config's learning rates, not the checkpoint's: agent.actor_lr 0.0003 -> 0.001" in (
        caplog.text
    )
    service.store.close()
    # A damaged stats.json (its counters only) is said and left behind; the run resumes from its checkpoint.
    for garbage in (b"\x00\xff\xfe", b"[1, 2]", b'{"weights_version": "x"}', b'{"actors": {"a0": 5}}'):
        (run / "stats.json").write_bytes(garbage)
        caplog.clear()
        service = LearnerService(cfg, run, bc_dir=bc_dir, resume=True, quiet=True)
        assert "stats.json cannot be read" in caplog.text and service.counters.learner_steps > 0
        service.store.close()


def test_a_learner_stopped_while_finishing_resumes_to_finish_without_an_actor(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    _, run = _stopped_at_the_first_online_evaluation(tmp_path, bc_dir, ctx)
    # Its last checkpoint says it was finishing: the final evaluation is done (at 20 online steps, the budget here).
    latest = run / "checkpoints" / "latest" / "manifest.json"
    manifest = json.loads(latest.read_text())
    manifest["learner"]["phase"] = "paused"
    latest.write_text(json.dumps(manifest))
    more = LearnerService(tiny_config("train.env_steps=400"), Path(shutil.copytree(run, tmp_path / "more")),
                          bc_dir=bc_dir, resume=True, quiet=True)  # fmt: skip
    assert (more.done, more.phase) == (False, "online")  # with a larger budget it trains on
    more.store.close()
    done = tiny_config("train.env_steps=20")
    service = LearnerService(done, run, bc_dir=bc_dir, resume=True, quiet=True)
    assert service.done
    start = time.monotonic()
    with running(service) as result:
        deadline = time.monotonic() + 60
        while "summary" not in result and time.monotonic() < deadline:
            time.sleep(0.1)
    assert result["summary"]["finished"] and time.monotonic() - start < 40  # no evaluation waited for
    assert (run / "checkpoints" / "final").is_dir() and (run / "summary.json").is_file()


def test_a_resent_evaluation_report_is_not_logged_as_ignored(tmp_path: Path, bc_dir: Path, ctx, caplog) -> None:
    """Actors send each report again every few seconds until the evaluation is over: those repeats are no news. A
    report for an evaluation the learner never asked for is still said."""
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with caplog.at_level(logging.INFO, logger="robot_rl.learner"), running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == 0)
        for _ in range(3):
            actor.report(0, 0.5)
        actor.wait_status(lambda s: s.phase == "qest_rollouts")
        actor.report(0, 0.5)  # after the evaluation is over
        actor.report(7, 0.5)
        deadline = time.monotonic() + 10
        while "ignoring evaluation report 7" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    ignored = [r.getMessage() for r in caplog.records if "ignoring evaluation report" in r.getMessage()]
    assert ignored == ["ignoring evaluation report 7 from actor a0 (asked for -1)"]


def test_actors_an_evaluation_interval_ahead_of_the_learner_are_warned_about_now_and_then(
    tmp_path: Path, bc_dir: Path, caplog
) -> None:
    """A learner slower than its actors evaluates late (its evaluations wait for the updates owed): once the actors
    are a whole train.eval_every ahead, it says so, and what holds them back; not again for OUTRUN_WARN_S."""
    from robot_rl.learner import service as learner_service

    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    service.phase = "online"
    service._enough_data = lambda: True
    every, ratio = cfg.train.eval_every, cfg.train.learner_steps_per_env_step
    service.counters.online_env_steps = 3 * every
    service.counters.learner_steps = int(2.2 * every * ratio)  # 0.8 of an interval behind: nothing said
    now = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="robot_rl.learner"):
        service._warn_if_outrun(now)
        assert "ahead of the learner" not in caplog.text
        service.counters.learner_steps = int(1.5 * every * ratio)  # 1.5 intervals behind
        service._warn_if_outrun(now)
        service._warn_if_outrun(now + 10)
        service._warn_if_outrun(now + learner_service.OUTRUN_WARN_S + 1)
    said = [r.getMessage() for r in caplog.records if "ahead of the learner" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith(f"the actors are {1.5 * every:.0f} online env steps ahead")
    assert "actor.max_env_steps_ahead holds them back" in said[0]


def test_an_evaluation_acted_without_weights_is_asked_for_again_and_a_new_actor_gets_the_weights(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    cfg = tiny_config("train.env_steps=200")  # evaluations every 20 online steps, none of them the last
    out = tmp_path / "run"
    with running(LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)):
        actor = FakeActor(ctx, cfg)
        to_online_eval(actor, 45)
        # A restarted actor (no weights yet) says hello during the evaluation: the weights are broadcast again.
        late = FakeActor(ctx, cfg, actor_id="a1")
        assert isinstance(late.hello(), Welcome)
        late.wait_status(lambda s: bool(late.weights))  # no learner step runs in an evaluation: only the hello's
        # A report of the BC policy alone (no weights) does not score the weights; a0's evaluation still does.
        late.weights.clear()
        late.report(1, 1.0)
        actor.report(1, 0.25)
        actor.wait_status(lambda s: s.phase != "eval")
    rows = [(r.phase, r.success_rate) for r in read_eval_csv(out / "eval.csv")]
    assert rows == [("bc", 0.5), ("online", 0.25)]

    # The only actor reports an evaluation without weights: the evaluation is asked for again, the weights sent again.
    cfg = tiny_config("train.env_steps=200")
    out = tmp_path / "alone"
    with running(LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)):
        actor = FakeActor(ctx, cfg)
        to_online_eval(actor, 25)
        actor.weights.clear()
        actor.report(1, 1.0)
        actor.wait_status(lambda s: s.phase == "eval" and s.eval_id == 2 and bool(actor.weights))
        actor.report(2, 0.75)
        actor.wait_status(lambda s: s.phase != "eval")
    rows = [(r.phase, r.success_rate) for r in read_eval_csv(out / "eval.csv")]
    assert rows == [("bc", 0.5), ("online", 0.75)]


def test_an_evaluation_is_scored_over_every_actors_episodes_and_waits_a_bounded_time_for_a_silent_one(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg = tiny_config("train.env_steps=200")  # evaluations every 20 online steps, none of them the last
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="robot_rl.learner")
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    service.eval_gather_s = 1.5
    with running(service):
        a, b = FakeActor(ctx, cfg, "arm_a"), FakeActor(ctx, cfg, "arm_b", run_id="r1")
        assert isinstance(a.hello(), Welcome) and isinstance(b.hello(), Welcome)
        a.report(0, 0.5, episodes=4)
        time.sleep(0.5)  # arm_b's report is still due: the BC evaluation waits for it
        assert service.phase == "eval"
        b.report(0, 1.0, episodes=6)
        a.wait_status(lambda s: s.phase == "qest_rollouts")
        assert "evaluation 0 over 2 actors: success 0.80 over 10 episodes (arm_a 0.50 over 4, arm_b 1.00 over 6)" in (
            caplog.text
        )
        # Both feed the rollouts; arm_b then stops. The online evaluation waits for it, then goes on without it.
        for actor, first in ((a, 0), (b, 0)):
            assert acked(actor.transitions(first, 5, ends=(4,))) == first + 4
        a.wait_status(lambda s: s.phase == "online")
        assert acked(a.transitions(5, 45, version=1)) == 49
        a.wait_status(lambda s: s.phase == "eval" and s.eval_id == 1)
        started = time.monotonic()
        a.report(1, 0.25, episodes=4)
        a.wait_status(lambda s: s.phase == "online")
        assert time.monotonic() - started >= 1.0  # arm_b was waited for, not forever
    assert "evaluation 1: no report from arm_b within 2 s of the first; scored on arm_a alone" in caplog.text
    rows = [(r.phase, r.success_rate, r.episodes) for r in read_eval_csv(out / "eval.csv")]
    assert rows == [("bc", 0.8, 10), ("online", 0.25, 4)]


def test_missing_eval_report_times_out_and_a_method_without_q_estimation_goes_online(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg = tiny_config("agent.method=ibrl")
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True, eval_timeout_s=0.3)
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        actor.wait_status(lambda s: s.phase == "online")
        assert [(w.version, w.phase) for w in actor.weights] == [(1, "online")]
    assert "no report for evaluation 0" in caplog.text
    assert "qest_rollouts" not in actor.phases and service.bc_success_rate is None
    assert read_eval_csv(tmp_path / "run" / "eval.csv") == []


def test_a_late_evaluation_report_is_reported_while_waited_for_and_the_wait_fits_the_configs_evaluation(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    # 20 episodes of 200 steps at 10 Hz take 400 s of steps alone: a fixed 600 s wait would drop such evaluations.
    robot = LearnerService(load_config(TINY, ["train.eval_episodes=20", "env.task.max_episode_steps=200"]),
                           tmp_path / "robot", bc_dir=bc_dir, quiet=True)  # fmt: skip
    assert robot.eval_timeout_s == 1200.0
    robot.store.close()
    cfg = tiny_config()
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True, eval_timeout_s=1.0)
    with running(service):
        actor = FakeActor(ctx, cfg, "arm_a")
        assert isinstance(actor.hello(), Welcome)  # then it leaves without reporting
        actor.wait_status(lambda s: s.phase == "qest_rollouts")
    assert "evaluation 0: no report after" in caplog.text and "Actors last heard: arm_a " in caplog.text
    assert "no report for evaluation 0 within 1 s; continuing without it" in caplog.text


def test_a_learner_left_without_transitions_says_so_timed_from_the_phase_start_naming_the_actors_last_heard(
    tmp_path: Path, bc_dir: Path, ctx, caplog, monkeypatch
) -> None:
    """The only actor leaves once Q-Estimation rollouts begin: the learner says it waits for transitions. The BC
    evaluation before (no transitions, minutes at 10 Hz) does not count: the wait is timed from the rollouts' start."""
    import re

    monkeypatch.setattr(learner_service, "STARVED_WARN_S", 1.5)
    cfg = tiny_config()
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with running(service):
        actor = FakeActor(ctx, cfg, "arm_a")
        assert isinstance(actor.hello(), Welcome)
        actor.wait_status(lambda s: s.phase == "eval")
        time.sleep(3.0)  # the evaluation takes twice STARVED_WARN_S
        actor.report(0, 0.5)
        actor.wait_status(lambda s: s.phase == "qest_rollouts")  # then the only actor leaves
        assert "no transitions from any actor" not in caplog.text  # not at once
        deadline = time.monotonic() + WAIT_S
        while "no transitions from any actor" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert "phase qest_rollouts: no transitions from any actor for " in caplog.text
    assert "Actors last heard: arm_a " in caplog.text
    quiet = float(re.search(r"no transitions from any actor for (\d+) s", caplog.text).group(1))
    assert quiet <= 2.0  # timed from the rollouts' start, not the learner's (>= 3 s ago)


def test_store_cuts_a_corrupt_record_and_continues_the_log(tmp_path: Path, caplog) -> None:
    cfg = load_config(TINY)
    store = TransitionStore(tmp_path)
    for first in (0, 4, 8):
        store.append(StoredChunk("a", "r", first, chunk_arrays(cfg, first, 4), online=first == 8))
    store.close()
    path = tmp_path / "a@r.log"
    data = bytearray(path.read_bytes())
    size = len(data) // 3
    data[-5] ^= 0xFF  # a flipped bit in the last record's payload
    path.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger="robot_rl.learner")
    chunks = TransitionStore(tmp_path).read_back()
    assert [(c.first_seq, c.online) for c in chunks] == [(0, False), (4, False)]
    assert "checksum" in caplog.text and path.stat().st_size == 2 * size
    again = TransitionStore(tmp_path)
    again.append(StoredChunk("a", "r", 8, chunk_arrays(cfg, 8, 4), online=True))
    again.close()
    chunks = TransitionStore(tmp_path).read_back()
    assert [(c.first_seq, c.online) for c in chunks] == [(0, False), (4, False), (8, True)]
    np.testing.assert_array_equal(chunks[2].arrays["actions"], chunk_arrays(cfg, 8, 4)["actions"])


def test_a_flood_of_refused_messages_is_counted_but_logged_at_most_once_a_second(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with caplog.at_level(logging.WARNING, logger="robot_rl.learner.service"), running(service):
        flooder = FakeActor(ctx, cfg, "flooder")
        for _ in range(40):
            assert isinstance(flooder.request(os.urandom(32)), Refuse)
        for i in range(40):  # transitions before a hello, each under another name: the names do not buy log lines
            flooder.actor_id, flooder.run_id = f"ghost{i}", f"run{i}"
            assert isinstance(flooder.transitions(0, 2), Refuse)
        good = FakeActor(ctx, cfg, "good")
        assert isinstance(good.hello(), Welcome)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["refused_unidentified"] == 80  # every refusal counted
    warnings = [r for r in caplog.records if "refused a message" in r.getMessage()]
    assert 1 <= len(warnings) <= 6, len(warnings)
    assert len(service._refusal_log) == 1  # one budget for every unidentified peer, whatever it claimed


def test_transitions_before_hello_from_an_actor_of_the_run_are_said_not_warned(
    tmp_path: Path, bc_dir: Path, ctx, caplog
) -> None:
    """An actor of this run sending on a connection the learner does not know (the learner restarted since its hello)
    is no fault: the refusal is logged at INFO; a name the learner has never heard is still warned about."""
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with caplog.at_level(logging.INFO, logger="robot_rl.learner"), running(service):
        assert isinstance(FakeActor(ctx, cfg, "a0").hello(), Welcome)
        again = FakeActor(ctx, cfg, "a0")  # a new connection, no hello on it
        assert isinstance(again.transitions(0, 2), Refuse)
        time.sleep(1.1)  # past the log budget of unidentified peers
        assert isinstance(FakeActor(ctx, cfg, "stranger").transitions(0, 2), Refuse)
    levels = {
        name: [r.levelno for r in caplog.records if f"sending as actor {name} " in r.getMessage()]
        for name in ("a0", "stranger")
    }
    assert levels == {"a0": [logging.INFO], "stranger": [logging.WARNING]}


# ---------------------------------------------------------------------------------------------------------------------
# Group fsync on the store's writer thread: acknowledgements wait for the fsync that covers them
# ---------------------------------------------------------------------------------------------------------------------
class FsyncGate:
    """An fsync that waits until `opened` is set, then records how many bytes each file had when it was synced."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.synced_bytes = 0  # file size covered by the last completed fsync

    def __call__(self, fd: int) -> None:
        self.entered.set()
        assert self.opened.wait(WAIT_S), "the test never opened the fsync gate"
        os.fsync(fd)
        self.synced_bytes = os.fstat(fd).st_size


def released_within(held: HeldReplies, timeout: float = WAIT_S) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = held.release()
        if out:
            return out
        time.sleep(0.01)
    return []


def test_store_releases_replies_only_after_the_fsync_that_covers_their_chunks(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    gate = FsyncGate()
    chunks = [StoredChunk("a", "r", first, chunk_arrays(cfg, first, 4), online=False) for first in (0, 4, 8)]
    sizes = np.cumsum([len(encode_record(c)) for c in chunks])
    with TransitionStore(tmp_path, fsync=gate) as store:
        held: HeldReplies[str] = HeldReplies(store)
        held.hold("welcome")  # nothing appended before it: not held back
        assert held.release() == ["welcome"]
        store.append(chunks[0])
        held.hold("ack 3")
        assert gate.entered.wait(WAIT_S)  # the writer wrote chunk 0 and now waits in its fsync
        store.append(chunks[1])
        held.hold("ack 7")
        store.append(chunks[2])
        held.hold("ack 11")
        time.sleep(0.2)
        assert held.release() == [] and store.durable() == 0  # written perhaps, but not fsync'd: no ack
        gate.opened.set()
        out = released_within(held)
        assert out[0] == "ack 3" and gate.synced_bytes >= sizes[0]
        out += released_within(held) if len(out) < 3 else []
        # The two chunks queued during the first fsync were written and fsync'd as one group.
        assert out == ["ack 3", "ack 7", "ack 11"] and gate.synced_bytes == sizes[2]
        assert store.durable() == store.appended == 3
    assert [c.first_seq for c in TransitionStore(tmp_path).read_back()] == [0, 4, 8]


def test_the_store_writes_the_next_chunks_while_an_fsync_is_under_way(tmp_path: Path) -> None:
    """The writer does not wait for the disk: chunks appended during an fsync reach the file before it returns, and
    the next fsync covers them together."""
    cfg = load_config(TINY)
    gate = FsyncGate()
    chunks = [StoredChunk("a", "r", first, chunk_arrays(cfg, first, 4), online=False) for first in (0, 4, 8)]
    sizes = np.cumsum([len(encode_record(c)) for c in chunks])
    path = tmp_path / "a@r.log"
    with TransitionStore(tmp_path, fsync=gate) as store:
        store.append(chunks[0])
        assert gate.entered.wait(WAIT_S)
        store.append(chunks[1])
        store.append(chunks[2])
        deadline = time.monotonic() + WAIT_S
        while path.stat().st_size < sizes[2] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_size == sizes[2], "the chunks appended during the fsync were not written meanwhile"
        assert store.durable() == 0
        gate.opened.set()
        store.sync()
        assert store.durable() == 3
    assert [c.first_seq for c in TransitionStore(tmp_path).read_back()] == [0, 4, 8]


def test_a_failed_fsync_stops_the_acks_and_surfaces_as_store_error(tmp_path: Path) -> None:
    cfg = load_config(TINY)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    store = TransitionStore(tmp_path, fsync=failing)
    held: HeldReplies[str] = HeldReplies(store)
    store.append(StoredChunk("a", "r", 0, chunk_arrays(cfg, 0, 4), online=False))
    held.hold("ack 3")
    with pytest.raises(StoreError, match="Input/output error"):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert held.release() == []  # never released; raises once the writer has failed
            time.sleep(0.01)
    with pytest.raises(StoreError):
        store.append(StoredChunk("a", "r", 4, chunk_arrays(cfg, 4, 4), online=False))
    with pytest.raises(StoreError):
        store.close()


def test_the_learner_acks_a_chunk_only_once_its_fsync_is_done(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    service = LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)
    gate = FsyncGate()
    service.store._fsync = gate
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        sent = Transitions(actor_id="a0", run_id="r0", first_seq=0, count=10, arrays=chunk_arrays(cfg, 0, 10))
        actor.send(sent)
        assert gate.entered.wait(WAIT_S)
        assert not actor.dealer.poll(500, zmq.POLLIN), "acknowledged before the fsync was done"
        gate.opened.set()
        assert acked(actor.recv()) == 9
        assert gate.synced_bytes >= HEADER.size + len(to_wire(sent))
    # The record's payload is the frame the actor sent, byte for byte (written as received, not re-encoded).
    data = (out / "buffer" / "a0@r0.log").read_bytes()
    assert data[HEADER.size : HEADER.size + len(to_wire(sent))] == to_wire(sent)


def crc32_record(payload: bytes, flags: int = 0) -> bytes:
    """A log record around `payload` as logs written before the XXH3 checksum lay it out (magic b"RRLT", flags,
    length, crc32 of the flags byte and the payload, payload)."""
    return CRC32_HEADER.pack(CRC32_MAGIC, flags, len(payload), zlib.crc32(bytes([flags]) + payload)) + payload


def test_store_reads_a_log_of_crc32_records_and_appends_after_it(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    first = StoredChunk("a", "r", 0, chunk_arrays(cfg, 0, 4), online=False)
    path = tmp_path / "a@r.log"
    old = crc32_record(to_wire(first.message()))
    path.write_bytes(old + old[:-3])  # an old log whose last record was torn
    store = TransitionStore(tmp_path)
    assert [(c.first_seq, c.online) for c in store.read_back()] == [(0, False)]
    store.append(StoredChunk("a", "r", 4, chunk_arrays(cfg, 4, 4), online=True))
    store.close()
    data = path.read_bytes()
    assert data[: len(old)] == old and data[len(old) : len(old) + 4] == b"RRLX"  # the new record follows the old
    chunks = TransitionStore(tmp_path).read_back()
    assert [(c.first_seq, c.count, c.online) for c in chunks] == [(0, 4, False), (4, 4, True)]
    np.testing.assert_array_equal(chunks[1].arrays["actions"], chunk_arrays(cfg, 4, 4)["actions"])
    # Damage is found in either layout: a flipped payload byte of the old record takes that record out, and the
    # intact record after it stays.
    damaged = bytearray(data)
    damaged[len(old) - 5] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert [c.first_seq for c in TransitionStore(tmp_path).read_back()] == [4]


def test_store_reads_protocol_1_records_and_refuses_unknown_versions_without_cutting(tmp_path: Path) -> None:
    cfg = load_config(TINY)
    arrays = chunk_arrays(cfg, 0, 4)
    message = msgpack.unpackb(to_wire(Transitions(actor_id="a", run_id="r", first_seq=0, count=4, arrays=arrays)))
    path = tmp_path / "a@r.log"
    v1 = msgpack.packb({**message, "v": 1}, use_bin_type=True)  # a log written before protocol 2
    path.write_bytes(crc32_record(v1))
    chunks = TransitionStore(tmp_path).read_back()
    assert [c.first_seq for c in chunks] == [0]
    np.testing.assert_array_equal(chunks[0].arrays["actions"], arrays["actions"])
    v9 = msgpack.packb({**message, "first_seq": 4, "v": 9}, use_bin_type=True)
    with path.open("ab") as f:
        f.write(crc32_record(v9))
    size = path.stat().st_size
    with pytest.raises(StoreError, match="written under another protocol"):
        TransitionStore(tmp_path).read_back()
    assert path.stat().st_size == size and path.read_bytes()[:4] == CRC32_MAGIC  # nothing cut


def test_weights_snapshots_reuse_memory_only_after_zeromq_has_sent_them(ctx) -> None:
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect(f"tcp://127.0.0.1:{port}")
    weight = torch.zeros(50_000)
    snapshots = WeightsFrames()
    first = snapshots.frames(version=1, phase="online", state={"w": weight})
    memory = np.frombuffer(first[1].buffer, np.float32)
    # Not sent yet (and still held here): the next snapshot must not write into the first one's memory.
    weight += 1.0
    second = snapshots.frames(version=2, phase="online", state={"w": weight})
    assert not np.shares_memory(memory, np.frombuffer(second[1].buffer, np.float32)) and memory[0] == 0.0
    del first, memory
    deadline = time.monotonic() + WAIT_S
    while not sub.poll(10, zmq.POLLIN):  # PUB drops until the subscription has arrived: send until one gets through
        assert time.monotonic() < deadline
        pub.send_multipart(second, copy=False)
    got = from_frames(sub.recv_multipart(copy=False), max_bytes=LIMIT)
    address = np.frombuffer(second[1].buffer, np.uint8).ctypes.data
    del second  # a Frame still held here would count as a reader
    time.sleep(0.2)  # ZeroMQ's I/O thread has written the frames to the kernel by now
    weight += 1.0
    third = snapshots.frames(version=3, phase="online", state={"w": weight})
    assert snapshots.reused == 1 and np.frombuffer(third[1].buffer, np.uint8).ctypes.data == address
    assert isinstance(got, Weights) and got.version == 2 and float(got.tensors["w"][0]) == 1.0  # a copy of its own


def test_weights_stay_in_flight_while_a_subscriber_does_not_read(ctx) -> None:
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.RCVHWM, 1)  # its I/O thread takes one message in while the application reads nothing
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect(f"tcp://127.0.0.1:{port}")
    deadline = time.monotonic() + WAIT_S
    while not sub.poll(10, zmq.POLLIN):  # until the subscription has arrived
        assert time.monotonic() < deadline
        pub.send(b"hello")
    while sub.poll(50, zmq.POLLIN):
        sub.recv()
    snapshots = WeightsFrames()
    assert snapshots.in_flight_s() is None  # nothing sent yet
    for version in (1, 2):  # 32 MB each: more than the kernel's socket buffers hold
        pub.send_multipart(
            snapshots.frames(version=version, phase="online", state={"w": torch.zeros(8 << 20)}), copy=False
        )
    time.sleep(0.5)
    in_flight = snapshots.in_flight_s()  # the second one cannot leave while the subscriber reads nothing
    assert in_flight is not None and in_flight >= 0.5
    for version in (1, 2):  # the subscriber reads: it leaves
        got = from_frames(sub.recv_multipart(copy=False), max_bytes=LIMIT)
        assert isinstance(got, Weights) and got.version == version
    while snapshots.in_flight_s() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_periodic_weights_wait_for_the_previous_broadcast_and_fold_into_one(tmp_path: Path, bc_dir: Path) -> None:
    service = LearnerService(tiny_config(), tmp_path / "run", bc_dir=bc_dir, quiet=True)
    sub = None
    try:
        service._open_sockets()
        sub = service._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(service.cfg.transport.weights_endpoint)
        deadline = time.monotonic() + WAIT_S
        while not sub.poll(100, zmq.POLLIN):  # the subscription has reached the PUB socket once a status arrives
            assert time.monotonic() < deadline, "the subscriber never received a status"
            service._publish_status()
        service.weights_version = 4
        in_flight: list[float | None] = [1.0]  # the previous broadcast is still leaving (a slow link)
        service._weights_frames.in_flight_s = lambda: in_flight[0]
        for _ in range(3):  # three periodic broadcasts fall due meanwhile: none is sent
            service._weights_tick()
            service._publish_due_weights()
        assert service.weights_version == 4 and service.weights_folded == 2
        in_flight[0] = None  # it has left: one broadcast, with the newest weights
        service._periodic()
        assert service.weights_version == 5 and service.stats()["weights_folded"] == 2
        service._periodic()
        assert service.weights_version == 5  # nothing more was due
        in_flight[0] = WEIGHTS_MAX_WAIT_S + 0.1  # stuck for too long (a subscriber that hangs): sent anyway
        service._weights_tick()
        service._publish_due_weights()
        assert service.weights_version == 6
        versions = []
        deadline = time.monotonic() + WAIT_S
        while 6 not in versions:
            assert sub.poll(int(WAIT_S * 1000), zmq.POLLIN) and time.monotonic() < deadline
            message = from_frames(sub.recv_multipart(copy=False), max_bytes=LIMIT)
            if isinstance(message, Weights):
                versions.append(message.version)
        assert versions == [5, 6]
    finally:
        if sub is not None:
            sub.close(linger=0)
        service._close()


def test_the_learner_stores_acknowledges_and_reports_while_an_update_runs(tmp_path: Path, bc_dir: Path, ctx) -> None:
    """A learner step may take seconds (the image config on a CPU) or minutes (the first, compiling step): the actors
    are served meanwhile, and the weights change only between updates."""
    cfg = tiny_config("agent.method=ibrl", "train.env_steps=400")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True, eval_timeout_s=0.3)
    update, entered, release = service.agent.update, threading.Event(), threading.Event()
    threads: set[int] = set()

    def slow_update(batches):
        threads.add(threading.get_ident())
        entered.set()
        assert release.wait(WAIT_S)
        return update(batches)

    service.agent.update = slow_update
    with running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        actor.wait_status(lambda s: s.phase == "online")
        version = actor.weights[-1].version
        assert acked(actor.transitions(0, 40)) == 39  # past learning_starts: a learner step falls due
        assert entered.wait(WAIT_S)
        # The update is held: transitions are still stored and acknowledged, the status still broadcast.
        start = time.monotonic()
        assert acked(actor.transitions(40, 30, version=version)) == 69
        assert time.monotonic() - start < 5.0
        status = actor.wait_status(lambda s: s.online_env_steps == 70)
        assert status.learner_steps == 0 and service.counters.learner_steps == 0
        assert service.stats()["actors"]["a0"]["stored"] == 70
        release.set()
        actor.wait_status(lambda s: s.learner_steps >= 30)  # a broadcast follows the 30th step
        assert actor.weights[-1].version > version
    assert len(threads) == 1 and threading.get_ident() not in threads  # one thread of its own, the same every time


def test_a_stop_does_not_wait_for_an_update_that_keeps_running(tmp_path: Path, bc_dir: Path, ctx, monkeypatch) -> None:
    """Ctrl-C during a minutes-long first (compiling) update: the learner leaves after UPDATE_STOP_WAIT_S."""
    monkeypatch.setattr(learner_service, "UPDATE_STOP_WAIT_S", 0.5)
    cfg = tiny_config("agent.method=ibrl", "train.env_steps=400")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True, eval_timeout_s=0.3)
    entered, release = threading.Event(), threading.Event()

    def stuck_update(batches):
        entered.set()
        release.wait(60)
        raise RuntimeError("left behind")

    service.agent.update = stuck_update
    try:
        with running(service) as result:
            actor = FakeActor(ctx, cfg)
            assert isinstance(actor.hello(), Welcome)
            actor.wait_status(lambda s: s.phase == "online")
            assert acked(actor.transitions(0, 40)) == 39
            assert entered.wait(WAIT_S)
            stopped = time.monotonic()
        assert time.monotonic() - stopped < 5.0  # `running` set the stop event and joined the learner's thread
        assert result["summary"]["finished"] is False and result["summary"]["learner_steps"] == 0
        assert json.loads((tmp_path / "run" / "stats.json").read_text())["actors"]["a0"]["stored"] == 40
    finally:
        release.set()


def test_an_update_that_diverges_stops_the_learner_with_its_error(tmp_path: Path, bc_dir: Path, ctx) -> None:
    from robot_rl.agent import TrainingDiverged

    cfg = tiny_config("agent.method=ibrl", "train.env_steps=400")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True, eval_timeout_s=0.3)

    def diverged(batches):
        raise TrainingDiverged("non-finite critic loss at learner step 1")

    service.agent.update = diverged
    with pytest.raises(TrainingDiverged, match="non-finite critic loss"), running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        actor.wait_status(lambda s: s.phase == "online")
        assert acked(actor.transitions(0, 40)) == 39
        deadline = time.monotonic() + WAIT_S
        while service.updater.wake_fd >= 0 and time.monotonic() < deadline:  # closed once the learner has stopped
            time.sleep(0.05)
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["actors"]["a0"]["stored"] == 40


def test_a_replay_buffer_larger_than_the_memory_stops_the_learner_at_start(tmp_path: Path, bc_dir: Path, monkeypatch):
    monkeypatch.setattr("robot_rl.buffer.available_memory_bytes", lambda: 50 << 20)  # 50 MiB free
    cfg = tiny_config("train.buffer_capacity=2000000")
    with pytest.raises(LearnerError, match=r"buffer_capacity=2000000 needs .* GiB .* --set train.buffer_capacity="):
        LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)


def test_resume_of_no_run_is_refused_and_a_run_that_cannot_bind_leaves_no_directory(
    tmp_path: Path, bc_dir: Path, ctx
) -> None:
    cfg = tiny_config()
    for out in (tmp_path / "absent", bc_dir):  # nothing there, or a directory of something else
        with pytest.raises(LearnerError, match=r"nothing to resume in .* start a new run without --resume"):
            LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    assert not (tmp_path / "absent").exists() and not (bc_dir / "buffer").exists()

    out = tmp_path / "run"
    for endpoint, what in ((cfg.transport.learner, "requests"), (cfg.transport.weights_endpoint, "weights")):
        taken = ctx.socket(zmq.ROUTER)  # another process holds the port
        taken.bind(endpoint)
        try:
            with pytest.raises(LearnerError, match=rf"cannot bind {re.escape(endpoint)} \({what}"):
                run_learner(cfg, out, bc_dir=bc_dir, quiet=True)
        finally:
            taken.close(linger=0)
        assert not out.exists(), "the run that never started left a directory behind"
    LearnerService(cfg, out, bc_dir=bc_dir, quiet=True).store.close()  # the same --out is free for the retry


def test_an_unreadable_transition_log_stops_the_resume_naming_it(tmp_path: Path, bc_dir: Path) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    LearnerService(cfg, out, bc_dir=bc_dir, quiet=True).store.close()
    (out / "buffer" / "a0@r0.log").mkdir()  # where a stream's log should be, something that cannot be read as one
    with pytest.raises(LearnerError, match=r"cannot resume .*: cannot read the transition log .*a0@r0\.log"):
        LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)


def test_a_q_estimation_episode_cut_by_an_actor_restart_is_not_joined_to_the_next(tmp_path: Path, bc_dir: Path) -> None:
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    service.store.close()
    spec = transition_spec(cfg)

    def steps(first: int, count: int, *, end: bool) -> tuple[dict, dict, dict]:
        """Consecutive steps of one episode from state `first`: each next observation is the following one."""
        a = chunk_arrays(cfg, first, count, ends=(count - 1,) if end else ())
        following = chunk_arrays(cfg, first + 1, count)
        obs = {k: a[f"obs/{k}"] for k in spec.obs}
        return obs, {k: following[f"obs/{k}"] for k in spec.obs}, a

    stream = learner_service.Stream()
    service._assemble(stream, *steps(0, 7, end=False))
    service._assemble(stream, *steps(7, 5, end=True))  # the same episode goes on: one rollout of 12 steps
    service._assemble(stream, *steps(100, 7, end=False))  # an episode cut after 7 steps (its actor was killed)
    service._assemble(stream, *steps(500, 6, end=True))  # the restarted actor's new episode
    assert [len(r.actions) for r in service.rollouts] == [12, 6]
    np.testing.assert_array_equal(service.rollouts[1].obs["ee_pose"], steps(500, 6, end=True)[0]["ee_pose"])


def test_a_resumed_learner_says_in_its_stats_what_a_damaged_log_lost(tmp_path: Path, bc_dir: Path, ctx) -> None:
    cfg = tiny_config()
    out = tmp_path / "run"
    with running(LearnerService(cfg, out, bc_dir=bc_dir, quiet=True)):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        for first in (0, 10, 20):
            assert acked(actor.transitions(first, 10)) == first + 9
    log_file = out / "buffer" / "a0@r0.log"
    first_record = len(encode_record(StoredChunk("a0", "r0", 0, chunk_arrays(cfg, 0, 10), False)))
    data = bytearray(log_file.read_bytes())
    data[first_record + 200] ^= 0xFF  # inside the second record: the third one is intact
    log_file.write_bytes(bytes(data))
    resumed = LearnerService(cfg, out, bc_dir=bc_dir, resume=True, quiet=True)
    resumed._write_stats()
    resumed.store.close()
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["log_damaged_records"], stats["log_lost_transitions"], stats["log_cut_transitions"]) == (1, 10, 0)
    assert resumed.counters.env_steps == 20 and resumed.streams[("a0", "r0")].next_seq == 30


def test_a_learner_that_fails_tells_the_actors_it_is_stopping(tmp_path: Path, bc_dir: Path, ctx) -> None:
    """A full disk or a failed update ends the learner with an error: the actors hear at once that it is stopping,
    instead of learning it from seconds of silence."""
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    fail = threading.Event()
    advance = service._advance

    def failing_advance() -> None:
        if fail.is_set():
            raise OSError(28, "No space left on device")
        advance()

    service._advance = failing_advance
    with pytest.raises(OSError, match="No space left"), running(service):
        actor = FakeActor(ctx, cfg)
        assert isinstance(actor.hello(), Welcome)
        assert not actor.wait_status(lambda s: s.phase == "eval").stopping
        fail.set()
        assert actor.wait_status(lambda s: s.stopping).phase == "eval"


def test_a_learner_reachable_from_other_machines_without_keys_is_warned_about(
    tmp_path: Path, bc_dir: Path, caplog
) -> None:
    """Bound on every interface without transport.keys_dir, anyone on the network can read the weights and send
    transitions: said at start for each socket so bound. Loopback, ipc and keyed learners are not warned about."""
    from robot_rl.learner.service import _loopback

    assert _loopback("tcp://127.0.0.1:5555") and _loopback("tcp://localhost:5555") and _loopback("tcp://[::1]:5555")
    assert _loopback("ipc:///tmp/learner") and not _loopback("tcp://0.0.0.0:5555")
    assert not _loopback("tcp://192.168.1.20:5555") and not _loopback("tcp://eth0:5555")
    request, weights = free_ports(2)
    cfg = tiny_config(f"transport.learner=tcp://0.0.0.0:{request}", f"transport.weights=tcp://127.0.0.1:{weights}")
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    with caplog.at_level(logging.WARNING, logger="robot_rl.learner"), running(service):
        deadline = time.monotonic() + 10
        while "without transport.keys_dir" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    said = [r.getMessage() for r in caplog.records if "without transport.keys_dir" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"requests from actors is bound on tcp://0.0.0.0:{request}")


def test_a_new_learner_refused_for_its_keys_leaves_no_run_directory(tmp_path: Path, bc_dir: Path, capsys) -> None:
    """A key file missing or unreadable is said in one line, and the run directory it would have made is gone: the
    same command with good keys then starts, without --resume."""
    from robot_rl.cli import main
    from robot_rl.security import make_keys

    keys = tmp_path / "keys"
    make_keys(keys, actors=["a0"])
    (keys / "learner.key_secret").unlink()
    out = tmp_path / "run"
    cfg = tiny_config()
    args = ["learner", "--config", str(TINY), "--bc", str(bc_dir), "--out", str(out), "--quiet",
            "--bind", cfg.transport.learner, "--set", f"transport.keys_dir={keys}"]  # fmt: skip
    assert main(args) == 2
    assert "learner.key_secret does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_after_the_final_evaluation_the_next_is_due_an_interval_later(tmp_path: Path, bc_dir: Path) -> None:
    """A finished run resumed with a larger train.env_steps evaluates next at the following interval: the final
    evaluation is not due again (it repeated, with a second eval.csv row at the same env steps)."""
    cfg = tiny_config()
    service = LearnerService(cfg, tmp_path / "run", bc_dir=bc_dir, quiet=True)
    service.eval_kind = "online"
    service.counters.online_env_steps = service.next_eval_at = cfg.train.env_steps
    service._eval_done(None)
    assert service.done and service.next_eval_at == cfg.train.env_steps + cfg.train.eval_every
    resumed_budget = cfg.train.env_steps + 3 * cfg.train.eval_every
    assert min(service.next_eval_at, resumed_budget) > service.counters.online_env_steps  # not due at once
