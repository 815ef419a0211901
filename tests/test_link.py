"""The actor's learner link against a scripted learner: what it does when the learner restarts under it."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from robot_rl.actor.link import REPORT_RESEND_S, LearnerLink
from robot_rl.actor.spill import Spill
from robot_rl.config import load_config
from robot_rl.demo import free_port_pair
from robot_rl.wire import EvalReport, Hello, Refuse, Status, Welcome, from_wire, to_wire

TINY = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"


def _status(phase: str, eval_id: int) -> bytes:
    return to_wire(Status(learner_id="fake", phase=phase, weights_version=-1, learner_steps=0, online_env_steps=0,
                          eval_id=eval_id, done=False))  # fmt: skip


def test_a_report_refused_by_a_restarted_learner_is_sent_again_until_the_evaluation_is_over(tmp_path: Path):
    """A learner that restarted does not know the connection: it refuses the report (no hello yet). The link says
    hello again and resends the report while the learner's status still asks for that evaluation, then stops."""
    cfg = load_config(TINY)
    port = free_port_pair()
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"tcp://127.0.0.1:{port}")
    pub.bind(f"tcp://127.0.0.1:{port + 1}")
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
