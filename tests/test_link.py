"""The actor's learner link against a scripted learner: what it does when the learner restarts under it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

from robot_rl.actor.link import REPORT_RESEND_S, LearnerLink
from robot_rl.actor.spill import Spill
from robot_rl.config import RunConfig, load_config
from robot_rl.demo import free_port_pair
from robot_rl.wire import EvalReport, Hello, Refuse, Status, Transitions, Welcome, from_frames, from_wire, to_wire

TINY = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"


def _status(phase: str, eval_id: int) -> bytes:
    return to_wire(Status(learner_id="fake", phase=phase, weights_version=-1, learner_steps=0, online_env_steps=0,
                          eval_id=eval_id, done=False))  # fmt: skip


def test_a_report_refused_by_a_restarted_learner_is_sent_again_until_the_evaluation_is_over(tmp_path: Path, caplog):
    """A learner that restarted does not know the connection: it refuses the report (no hello yet). The link says
    hello again and resends the report while the learner's status still asks for that evaluation, then stops."""
    cfg = load_config(TINY)
    port = free_port_pair()
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"tcp://127.0.0.1:{port}")
    pub.bind(f"tcp://127.0.0.1:{port + 1}")
    caplog.set_level(logging.INFO, logger="robot_rl.actor.link")
    link = LearnerLink(cfg, Spill(tmp_path / "spill"), run_id="run1", endpoint=f"tcp://127.0.0.1:{port}")
    link.start()
    report = EvalReport(actor_id=cfg.actor.actor_id, run_id="run1", eval_id=7, episodes=2, success_rate=0.5,
                        bc_action_fraction=0.25, weights_version=-1)  # fmt: skip
    received: list[tuple[float, str]] = []
    phase, refused_once = "eval", False
    try:
        deadline = time.monotonic() + 30
        moved_on_at = None
        while time.monotonic() < deadline:
            pub.send(_status(phase, 7 if phase == "eval" else -1))
            if not router.poll(50):
                if moved_on_at is not None and time.monotonic() - moved_on_at > 3 * REPORT_RESEND_S:
                    break
                continue
            identity, data = router.recv_multipart()
            msg = from_wire(data, max_bytes=cfg.transport.max_message_bytes)
            received.append((time.monotonic(), msg.kind))
            if isinstance(msg, Hello):
                welcome = Welcome(learner_id="fake", phase=phase, weights_version=-1, acked_seq=-1)
                router.send_multipart([identity, to_wire(welcome)])
                if not refused_once:
                    link.send_report(report)
            elif isinstance(msg, EvalReport):
                assert msg == report
                if not refused_once:  # the restarted learner: it does not know this connection yet
                    refused_once = True
                    refusal = Refuse(reason="eval_report before an accepted hello: say hello first")
                    router.send_multipart([identity, to_wire(refusal)])
                elif phase == "eval" and sum(k == "eval_report" for _, k in received) >= 3:
                    phase, moved_on_at = "online", time.monotonic()  # the evaluation is over
                elif moved_on_at is not None:
                    assert time.monotonic() - moved_on_at < 1.0, "report resent after the evaluation was over"
    finally:
        link.stop_event.set()
        link.join(timeout=5)
        router.close(0)
        pub.close(0)
    kinds = [k for _, k in received]
    assert kinds.count("eval_report") >= 3, kinds
    # After the refusal: hello again, then the report again.
    first_refused = kinds.index("eval_report")
    assert "hello" in kinds[first_refused + 1 :]
    assert kinds[first_refused + 1 :].index("hello") < kinds[first_refused + 1 :].index("eval_report")
    # A learner that restarted is no fault: said, not warned.
    said = [r for r in caplog.records if "saying hello again" in r.getMessage()]
    assert said and all(r.levelno == logging.INFO for r in said)


def _fake_learner(
    cfg: RunConfig, spill: Spill, done: Callable[[], bool]
) -> Iterator[tuple[zmq.Socket, bytes, list[bytes], object]]:
    """A fake learner (ROUTER and PUB on a free loopback port pair, status 'online') and a LearnerLink on `spill`
    talking to it: yields (router, identity, frames, message) for each message the link sends until `done()` or 30
    s; the link is stopped and the sockets closed when the loop ends."""
    port = free_port_pair()
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"tcp://127.0.0.1:{port}")
    pub.bind(f"tcp://127.0.0.1:{port + 1}")
    link = LearnerLink(cfg, spill, run_id="run1", endpoint=f"tcp://127.0.0.1:{port}")
    link.start()
    try:
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            pub.send(_status("online", -1))
            if not router.poll(50):
                continue
            identity, *frames = router.recv_multipart()
            yield router, identity, frames, from_frames(frames, max_bytes=cfg.transport.max_message_bytes)
    finally:
        link.stop_event.set()
        link.join(timeout=5)
        router.close(0)
        pub.close(0)


def _chunks_a_link_sends(cfg: RunConfig, spill: Spill, count: int) -> list[tuple[int, Transitions]]:
    """(frames, message) of the first `count` transitions chunks a LearnerLink on `spill` sends to a fake learner
    that welcomes it with nothing acknowledged."""
    got: list[tuple[int, Transitions]] = []
    for router, identity, frames, msg in _fake_learner(cfg, spill, lambda: len(got) >= count):
        if isinstance(msg, Hello):
            welcome = Welcome(learner_id="fake", phase="online", weights_version=-1, acked_seq=-1)
            router.send_multipart([identity, to_wire(welcome)])
        elif isinstance(msg, Transitions):
            got.append((len(frames), msg))
    return got


def test_chunks_spilled_as_one_frame_by_an_earlier_version_are_sent_as_frames(tmp_path: Path):
    """An actor restarted on a spill written before transitions travelled as frames resends what is unacknowledged
    there: a learner speaking this protocol receives each chunk as a header and one frame per array."""
    import msgpack
    import numpy as np

    from robot_rl import wire

    cfg = load_config(TINY)
    spec = wire.transition_spec(cfg)
    chunks = []
    for first in (0, 3):
        arrays = {name: np.ones(shape, np.dtype(dtype)) * first for name, (shape, dtype) in spec.arrays(3).items()}
        chunks.append(wire.Transitions(actor_id=cfg.actor.actor_id, run_id="run1", first_seq=first, count=3,
                                       arrays=arrays))  # fmt: skip
    old = {**chunks[0].to_message(), "v": 2}  # the one frame protocol 2 spilled
    spill = Spill(tmp_path / "spill")
    spill.append(msgpack.packb(old, default=wire._pack_default, use_bin_type=True), first_seq=0, count=3)
    spill.append(wire.join_frames(wire.to_frames(chunks[1])), first_seq=3, count=3)
    got = _chunks_a_link_sends(cfg, spill, 2)
    assert [(n, m.first_seq) for n, m in got] == [(1 + len(spec.arrays(3)), 0), (1 + len(spec.arrays(3)), 3)]
    for (_, msg), sent in zip(got, chunks, strict=True):
        for name, array in sent.arrays.items():
            np.testing.assert_array_equal(msg.arrays[name], array, err_msg=name)


def _spill_of_four_chunks(cfg: RunConfig, path: Path, *, nan_in: int | None = None) -> Spill:
    """A spill holding transitions 0..11 as chunks of 3, each chunk's values its first sequence number (NaN in the
    observations of the chunk starting at `nan_in`: one spilled before the actor checked values)."""
    import numpy as np

    from robot_rl import wire

    spec = wire.transition_spec(cfg)
    spill = Spill(path)
    for first in (0, 3, 6, 9):
        arrays = {name: np.full(shape, first, np.dtype(dtype)) for name, (shape, dtype) in spec.arrays(3).items()}
        if first == nan_in:
            arrays["obs/ee_pose"][1, 2] = np.nan
        msg = wire.Transitions(actor_id=cfg.actor.actor_id, run_id="run1", first_seq=first, count=3, arrays=arrays)
        spill.append(wire.join_frames(wire.to_frames(msg)), first_seq=first, count=3)
    return spill


def test_a_chunk_after_transitions_the_spill_lost_says_so_and_nothing_else_does(tmp_path: Path):
    """A spill damaged in the middle keeps the chunks after the damage; those it lost are gone for good. The first
    chunk after them says how many sequence numbers before it are lost, so the learner goes on past them instead of
    holding the stream at the gap (the actor would resend forever)."""
    import numpy as np

    cfg = load_config(TINY)
    spill = _spill_of_four_chunks(cfg, tmp_path / "spill")
    damaged = spill._chunks[1]
    with damaged.segment.open("r+b") as f:  # a flipped byte inside chunk 3..5
        f.seek(damaged.offset + damaged.length // 2)
        byte = f.read(1)
        f.seek(damaged.offset + damaged.length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    spill = Spill(tmp_path / "spill")
    assert spill.gaps == [(3, 5)] and spill.lost(3, 5) and not spill.lost(3, 6)
    got = [msg for _, msg in _chunks_a_link_sends(cfg, spill, 3)]
    assert [(m.first_seq, m.lost_before) for m in got] == [(0, 0), (6, 3), (9, 0)]
    np.testing.assert_array_equal(got[1].arrays["rewards"], np.full(3, 6.0, np.float32))


def test_a_learner_holding_less_than_it_acknowledged_is_told_what_the_spill_released_and_the_stream_goes_on(
    tmp_path: Path, caplog
):
    """Transitions 0..5 were acknowledged and released from the spill; then a learner that holds nothing of the run
    answers (one started anew, or resumed from an older state). The actor cannot resend 0..5: the first chunk it
    has says they are lost (the learner then goes on past them) rather than waiting forever for a resend, and the
    actor says so in its log."""

    cfg = load_config(TINY)
    spill = _spill_of_four_chunks(cfg, tmp_path / "spill")
    spill.release(5)  # acknowledged by the learner before
    with caplog.at_level("WARNING", logger="robot_rl.actor.link"):
        got = [msg for _, msg in _chunks_a_link_sends(cfg, spill, 2)]
    assert [(m.first_seq, m.lost_before) for m in got] == [(6, 6), (9, 0)]
    said = [r.getMessage() for r in caplog.records if "no longer in the spill" in r.getMessage()]
    assert said and "transitions 0..5 were acknowledged earlier" in said[0]


def test_a_spilled_chunk_the_learner_refuses_for_its_values_is_given_up_and_the_stream_goes_on(tmp_path: Path):
    """A chunk the learner refuses for what it holds (NaN observations spilled by an earlier version) would be resent
    forever, holding back every transition after it: the link gives it up, and the next chunk says it is lost."""
    from robot_rl import wire

    cfg = load_config(TINY)
    spec = wire.transition_spec(cfg)
    spill = _spill_of_four_chunks(cfg, tmp_path / "spill", nan_in=3)
    next_seq, refused, stored = 0, 0, []
    for router, identity, _, msg in _fake_learner(cfg, spill, lambda: next_seq >= 12):  # noqa: B023 (the newest)
        if isinstance(msg, Hello):
            reply = Welcome(learner_id="fake", phase="online", weights_version=-1, acked_seq=next_seq - 1)
        else:  # transitions, checked as the learner checks them
            try:
                wire.validate_transitions(msg, spec)
            except wire.WireError as err:
                refused += 1
                router.send_multipart([identity, to_wire(Refuse(reason=str(err)))])
                continue
            if msg.first_seq - msg.lost_before <= next_seq <= msg.last_seq:
                stored.append((msg.first_seq, msg.lost_before))
                next_seq = msg.last_seq + 1
            reply = wire.Ack(actor_id=msg.actor_id, run_id=msg.run_id, acked_seq=next_seq - 1)
        router.send_multipart([identity, to_wire(reply)])
    assert stored == [(0, 0), (6, 3), (9, 0)] and refused == 1  # refused once, then given up: not resent
    assert spill.gaps == [(3, 5)]


def test_a_chunk_after_a_quiet_spell_is_sent_without_saying_hello_again(tmp_path: Path):
    """After everything was acknowledged, nothing is sent for longer than the resend timeout (an evaluation): the next
    chunk is not taken for one the learner never answered, so no hello again and no resend."""
    import threading

    import numpy as np

    from robot_rl import wire

    cfg = load_config(TINY)
    spill = _spill_of_four_chunks(cfg, tmp_path / "spill")
    spec = wire.transition_spec(cfg)

    def one_more_chunk() -> None:
        arrays = {name: np.full(shape, 12, np.dtype(dtype)) for name, (shape, dtype) in spec.arrays(3).items()}
        msg = wire.Transitions(actor_id=cfg.actor.actor_id, run_id="run1", first_seq=12, count=3, arrays=arrays)
        spill.append(wire.join_frames(wire.to_frames(msg)), first_seq=12, count=3)

    later = threading.Timer(6.5, one_more_chunk)  # after the link's 5 s without an acknowledgement
    later.start()
    kinds, next_seq, acked_all = [], 0, [math.inf]

    def heard_enough() -> bool:  # everything acknowledged, and 1.5 s more to hear a hello said again
        return time.monotonic() - acked_all[0] > 1.5

    try:
        for router, identity, _, msg in _fake_learner(cfg, spill, heard_enough):
            kinds.append(msg.kind)
            if isinstance(msg, Hello):
                reply = Welcome(learner_id="fake", phase="online", weights_version=-1, acked_seq=next_seq - 1)
            else:
                if msg.first_seq == 12:
                    time.sleep(0.5)  # a learner busy with an update answers a while later
                next_seq = max(next_seq, msg.last_seq + 1)
                reply = wire.Ack(actor_id=msg.actor_id, run_id=msg.run_id, acked_seq=next_seq - 1)
                if next_seq == 15 and acked_all[0] == math.inf:
                    acked_all[0] = time.monotonic()
            router.send_multipart([identity, to_wire(reply)])
    finally:
        later.cancel()
    assert next_seq == 15 and kinds.count("hello") == 1, kinds
    assert kinds.count("transitions") == 5  # each chunk once


def test_free_port_pairs_come_from_below_the_ephemeral_range_and_are_bindable(tmp_path: Path, monkeypatch):
    """Ports the kernel hands out as source ports of outgoing connections could be taken before the learner binds
    them; the pair is looked for below that range, and only where there is no room there from the kernel."""
    import socket

    from robot_rl import demo

    low = demo._ephemeral_low()
    for _ in range(20):
        port = demo.free_port_pair()
        assert port >= demo.LOWEST_PORT and port + 1 < low
        for p in (port, port + 1):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    wide = tmp_path / "range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(demo, "EPHEMERAL_RANGE_FILE", wide)
    assert demo._ephemeral_low() == 1024
    port = demo.free_port_pair()  # no room below the range: a pair the kernel hands out
    assert port >= low  # the kernel hands it out from its real range
