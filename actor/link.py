"""The actor's connection to the learner, on its own thread: the control loop never waits on the network.

DEALER to the learner's ROUTER (hello, transitions, evaluation reports; welcome, ack, refuse back) and SUB to its PUB
(weights and status). Transitions are read from the durable spill and sent from the sequence after the last
acknowledgement, at most `window` chunks ahead; after a reconnect (a welcome) or a silence the link resends from
there, and the learner drops what it already has. The newest weights wait in a one-slot mailbox for the control loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq

from robot_rl.actor.spill import Spill
from robot_rl.config import RunConfig
from robot_rl.wire import (
    STORED_VERSIONS,
    Ack,
    EvalReport,
    Hello,
    Refuse,
    Status,
    Transitions,
    Weights,
    Welcome,
    WireError,
    config_fingerprint,
    config_hash,
    from_frames,
    from_joined,
    from_wire,
    is_joined_frames,
    split_frames,
    to_frames,
    to_wire,
    transition_spec,
    validate_transitions,
)

log = logging.getLogger(__name__)

REPORT_RESEND_S = 2.0  # an evaluation report is sent again this often while the learner still waits for it


class NewestWeights:
    """A one-slot mailbox between a receiving thread and the loader: `put` replaces what is there (an older broadcast
    not taken yet is overtaken), `take` empties it."""

    def __init__(self) -> None:
        self._weights: Weights | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Event()

    def put(self, weights: Weights) -> None:
        with self._lock:
            self._weights = weights
            self._arrived.set()

    def take(self, timeout: float = 0.0) -> Weights | None:
        """The newest weights put since the last take, or None (after waiting up to `timeout` s for some)."""
        if timeout > 0:
            self._arrived.wait(timeout)
        with self._lock:
            weights, self._weights = self._weights, None
            self._arrived.clear()
        return weights


@dataclass
class LinkState:
    """What the control loop and the status line read (replaced, never mutated in place, by the link thread)."""

    welcomed: bool = False
    synced: bool = False  # a welcome has said, at least once, up to where the learner holds this run
    acked_seq: int = -1
    sent_seq: int = -1
    refused: str | None = None
    refused_fields: tuple[str, ...] = ()
    last_heard: float = 0.0
    status: Status | None = None
    # acked_seq when `status` arrived: transitions acknowledged later may be missing from its counts (statuses come a
    # few times a second, acknowledgements at once).
    status_acked_seq: int = -1


class LearnerLink(threading.Thread):
    """Runs the actor's side of the wire contract until `stop` is set."""

    def __init__(
        self,
        cfg: RunConfig,
        spill: Spill,
        *,
        run_id: str,
        endpoint: str,
        window: int = 16,
        fingerprint: Mapping[str, str] | None = None,
    ) -> None:
        """`fingerprint` adds entries to the config's in the hello (the BC policy's: bc.bc_fingerprint)."""
        super().__init__(name="learner-link", daemon=True)
        self.cfg, self.spill, self.run_id = cfg, spill, run_id
        self.endpoint = endpoint
        self.weights_endpoint = cfg.transport.model_copy(update={"learner": endpoint}).weights_endpoint
        self.window = window
        self.stop_event = threading.Event()
        self.state = LinkState()
        self._weights = NewestWeights()
        self._reports: queue.Queue[EvalReport] = queue.Queue()
        self._last_report: EvalReport | None = None
        self._last_report_sent = 0.0
        self._released_said: int | None = None  # the cursor at which transitions released earlier were said lost
        self._wake = threading.Event()
        self.fingerprint = {**config_fingerprint(cfg), **(fingerprint or {})}
        self.spec = transition_spec(cfg)  # what the learner checks chunks against
        self.error: BaseException | None = None

    # -- API for the control thread -------------------------------------------------------------------------------
    def take_weights(self, timeout: float = 0.0) -> Weights | None:
        """The newest weights received since the last call, or None (after waiting up to `timeout` s for some)."""
        return self._weights.take(timeout)

    def send_report(self, report: EvalReport) -> None:
        self._reports.put(report)
        self._wake.set()

    def notify(self) -> None:
        """A chunk was spilled: send it soon."""
        self._wake.set()

    def seconds_since_heard(self) -> float:
        return float("inf") if not self.state.last_heard else time.monotonic() - self.state.last_heard

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    # -- thread -------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # surfaced by the service's status line, never silently lost
            self.error = err
            log.exception("learner link stopped")

    def _sockets(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        dealer, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.transport.max_message_bytes)
            sock.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a learner that is not connected: chunks sent into a dead connection's queue would reach
        # a restarted learner after the ones resent from its welcome, each backlog crossing the link twice.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        sub.setsockopt(zmq.RCVHWM, 4)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        keys = self.cfg.transport.keys_dir
        if keys is not None:
            from robot_rl.security import secure_client

            secure_client(dealer, keys_dir=Path(keys), actor=self.cfg.actor.actor_id)
            secure_client(sub, keys_dir=Path(keys), actor=self.cfg.actor.actor_id)
        dealer.connect(self.endpoint)
        sub.connect(self.weights_endpoint)
        return dealer, sub

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        dealer, sub = self._sockets(ctx)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        hello = to_wire(
            Hello(
                actor_id=self.cfg.actor.actor_id,
                run_id=self.run_id,
                config_hash=config_hash(self.fingerprint),
                config_fingerprint=self.fingerprint,
            )
        )
        max_bytes = self.cfg.transport.max_message_bytes
        last_hello = last_progress = 0.0
        cursor = 0  # next sequence to send
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                st = self.state
                if st.refused is None and not st.welcomed and now - last_hello > 1.0:
                    _send(dealer, hello)
                    last_hello = now
                events = dict(poller.poll(self.cfg.transport.poll_ms))
                if dealer in events:
                    cursor = self._on_reply(dealer, max_bytes, cursor)
                    last_progress = time.monotonic()
                if sub in events:
                    self._on_broadcast(sub, max_bytes)
                st = self.state
                if cursor <= st.acked_seq + 1:  # nothing in flight: the wait for an acknowledgement starts at a send
                    last_progress = time.monotonic()
                if st.welcomed and st.refused is None:
                    # No acknowledgement for a while with data in flight: the learner may have restarted; resend.
                    if cursor > st.acked_seq + 1 and time.monotonic() - last_progress > 5.0:
                        self._replace(welcomed=False)
                        cursor = st.acked_seq + 1
                        last_progress = time.monotonic()
                        continue
                    cursor = self._send_chunks(dealer, cursor)
                    self._send_reports(dealer)
        finally:
            dealer.close(0)
            sub.close(0)

    def _send_reports(self, dealer: zmq.Socket) -> None:
        """Send queued evaluation reports; resend the last one every REPORT_RESEND_S while the learner still asks for
        that evaluation. Reports have no acknowledgement: one refused by a learner that restarted (and did not know
        this connection yet) or lost on the way would otherwise leave the learner waiting; it ignores duplicates."""
        while not self._reports.empty():
            report = self._reports.queue[0]
            if not _send(dealer, to_wire(report)):
                return
            self._reports.get_nowait()
            self._last_report, self._last_report_sent = report, time.monotonic()
        report, status = self._last_report, self.state.status
        if report is None or status is None:
            return
        if status.phase != "eval" or status.eval_id != report.eval_id:
            self._last_report = None  # the learner has moved on
        elif time.monotonic() - self._last_report_sent > REPORT_RESEND_S and _send(dealer, to_wire(report)):
            self._last_report_sent = time.monotonic()

    def _replace(self, **changes) -> None:
        state = LinkState(**{**self.state.__dict__, **changes})
        self.state = state

    def _on_reply(self, dealer: zmq.Socket, max_bytes: int, cursor: int) -> int:
        while True:
            try:
                data = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return cursor
            try:
                msg = from_wire(data, max_bytes=max_bytes)
            except WireError as err:
                log.warning("learner sent an unreadable reply: %s", err)
                continue
            now = time.monotonic()
            if isinstance(msg, Welcome):
                self.spill.release(msg.acked_seq)
                self._replace(welcomed=True, synced=True, acked_seq=msg.acked_seq, last_heard=now)
                cursor = msg.acked_seq + 1
            elif isinstance(msg, Ack):
                acked = max(self.state.acked_seq, msg.acked_seq)
                self.spill.release(acked)
                self._replace(acked_seq=acked, last_heard=now)
            elif isinstance(msg, Refuse):
                if msg.fields or "protocol version" in msg.reason:
                    # The two sides disagree on the config or the protocol: nothing this actor sends can be stored.
                    log.error("learner refused this actor: %s %s", msg.reason, list(msg.fields))
                    self._replace(refused=msg.reason, refused_fields=tuple(msg.fields), last_heard=now)
                else:
                    if msg.reason.startswith("transitions."):  # what a chunk holds: resending it would not help
                        self._discard_refused(cursor, max_bytes)
                    # The learner does not know this connection (it restarted) or refused one message: say hello
                    # again and resend from the last acknowledgement (refusals of chunks already in flight repeat
                    # this harmlessly).
                    if self.state.welcomed:  # a learner that restarted does not know this connection: no fault
                        restarted = "before an accepted hello" in msg.reason
                        log.log(
                            logging.INFO if restarted else logging.WARNING,
                            "learner refused a message (%s); saying hello again",
                            msg.reason,
                        )
                    self._replace(welcomed=False, last_heard=now)
                    cursor = self.state.acked_seq + 1
                    self._last_report_sent = 0.0  # a refused report goes again right after the next welcome

    def _discard_refused(self, cursor: int, max_bytes: int) -> None:
        """After the learner refused a chunk for what it holds: the chunks sent but not acknowledged that fail the
        learner's own check (a spill written by an earlier version, which sent any values) are given up, said as an
        error, so that the stream goes on past them instead of resending them forever."""
        for chunk, payload in self.spill.chunks_from(self.state.acked_seq + 1):
            if chunk.first_seq >= cursor:
                break
            try:
                validate_transitions(_spilled_message(payload, max_bytes), self.spec)
            except WireError as err:
                self.spill.discard(chunk)
                log.error(
                    "spilled transitions %d..%d are refused by the learner (%s): not sent again, lost to it",
                    chunk.first_seq,
                    chunk.last_seq,
                    err,
                )

    def _on_broadcast(self, sub: zmq.Socket, max_bytes: int) -> None:
        while True:
            try:  # weights come as a header and one frame per tensor, received without copying (wire.from_frames)
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = from_frames(frames, max_bytes=max_bytes)
            except WireError as err:
                log.warning("learner broadcast unreadable: %s", err)
                continue
            if isinstance(msg, Weights):
                self._weights.put(msg)
                self._replace(last_heard=time.monotonic())
            elif isinstance(msg, Status):
                self._replace(status=msg, status_acked_seq=self.state.acked_seq, last_heard=time.monotonic())

    def _send_chunks(self, dealer: zmq.Socket, cursor: int) -> int:
        """Send spilled chunks from `cursor` while fewer than `window` chunks' worth is unacknowledged."""
        budget = self.window * self.cfg.actor.chunk_steps
        max_bytes = self.cfg.transport.max_message_bytes
        for chunk, payload in self.spill.chunks_from(cursor):
            if cursor - (self.state.acked_seq + 1) >= budget:
                break
            lost = chunk.first_seq - cursor
            if lost > 0:
                # The spill no longer holds these: lost for good when it was damaged, or released after a learner
                # acknowledged them, which the learner answering now does not hold (a learner started anew on this
                # run, or resumed from an older state). The chunk says so, and the learner goes on past them.
                if not self.spill.lost(cursor, chunk.first_seq - 1) and self._released_said != cursor:
                    self._released_said = cursor
                    log.warning(
                        "the learner holds this run only up to transition %d, but transitions %d..%d were "
                        "acknowledged earlier and are no longer in the spill: they are lost to this learner (started "
                        "anew, or resumed from an older state); sending on from %d",
                        cursor - 1,
                        cursor,
                        chunk.first_seq - 1,
                        chunk.first_seq,
                    )
                message = _spilled_message(payload, max_bytes).model_copy(update={"lost_before": lost})
                if not _send_frames(dealer, to_frames(message)):
                    break
            elif not _send_chunk(dealer, payload, max_bytes):
                break  # (a chunk straddling the cursor is sent whole; the learner trims it)
            cursor = chunk.last_seq + 1
            self._replace(sent_seq=max(self.state.sent_seq, chunk.last_seq))
        return cursor


def _spilled_message(payload: bytes, max_bytes: int) -> Transitions:
    """The Transitions message a spilled chunk holds (joined frames, or one frame of an earlier version)."""
    message = from_joined(payload, max_bytes=max_bytes, versions=STORED_VERSIONS)
    if not isinstance(message, Transitions):
        raise WireError(f"a spilled chunk holds a {message.kind} message, not transitions")
    return message


def _send_chunk(sock: zmq.Socket, payload: bytes, max_bytes: int) -> bool:
    """Send one spilled chunk without blocking: its frames joined (as the actor spills them) go out as those frames,
    without copying; a chunk spilled as one frame by an earlier version is encoded as frames first."""
    if is_joined_frames(payload):
        return _send_frames(sock, list(split_frames(payload)))
    return _send_frames(sock, to_frames(_spilled_message(payload, max_bytes)))


def _send_frames(sock: zmq.Socket, frames: list[bytes | memoryview]) -> bool:
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=False)  # whole or not at all (ZeroMQ's multipart atomicity)
    except zmq.Again:
        return False
    return True


def _send(sock: zmq.Socket, data: bytes) -> bool:
    """Send without blocking: with no learner connected (or a refused handshake) the message waits for the next try."""
    try:
        sock.send(data, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True
