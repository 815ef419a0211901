"""CURVE between actors and the learner: real sockets on tcp://127.0.0.1, every receive bounded by a timeout."""

from __future__ import annotations

import argparse
import contextlib
import selectors
import shutil
import socket as pysocket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from robot_rl import security
from robot_rl.security import SecurityError, cmd_keys, make_keys, register_keys_command, secure_client, secure_server

LOOPBACK = "tcp://127.0.0.1"
OK_WAIT_S = 3.0  # an authorised exchange arrives well within this
SILENCE_S = 1.0  # how long a refused client is watched for anything getting through
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}


def bounded_context() -> zmq.Context:
    """A context whose sockets never block for long on send or receive, whatever a test does with them."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.SNDTIMEO, int(OK_WAIT_S * 1000))
    ctx.setsockopt(zmq.RCVTIMEO, int(OK_WAIT_S * 1000))
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def recv_within(sock: zmq.Socket, seconds: float) -> list[bytes] | None:
    """The next multipart message, or None when nothing arrives within `seconds`."""
    if sock.poll(int(seconds * 1000), zmq.POLLIN):
        return sock.recv_multipart(zmq.NOBLOCK)
    return None


def wait_for_event(monitor: zmq.Socket, wanted: set[int], seconds: float) -> int | None:
    """The first monitor event whose type is in `wanted`, or None when none comes within `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not monitor.poll(int(left * 1000) + 1, zmq.POLLIN):
            return None
        event = recv_monitor_message(monitor, zmq.NOBLOCK)
        if event["event"] in wanted:
            return int(event["event"])
    return None


def publish_until_received(pub: zmq.Socket, sub: zmq.Socket, seconds: float) -> list[bytes] | None:
    """Publish every 50 ms (a SUB's subscription takes a moment to reach the PUB) until `sub` receives or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pub.send_multipart([b"weights", b"v1"])
        got = recv_within(sub, 0.05)
        if got is not None:
            return got
    return None


@dataclass
class Learner:
    ctx: zmq.Context
    router: zmq.Socket
    pub: zmq.Socket
    router_addr: str
    pub_addr: str
    router_monitor: zmq.Socket
    pub_monitor: zmq.Socket


@dataclass
class Actors:
    ctx: zmq.Context
    sockets: list[zmq.Socket] = field(default_factory=list)

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        self.sockets.append(sock)
        return sock


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    make_keys(out, actors=["actor0", "actor1"])
    return out


@pytest.fixture
def rogue_keys(tmp_path: Path, keys: Path) -> Path:
    """A well-formed actor key pair the learner does not list, next to the learner's real public key."""
    out = tmp_path / "rogue"
    make_keys(out, actors=["actor0"])
    (out / "learner.key").unlink()
    shutil.copy(keys / "learner.key", out / "learner.key")
    return out


@pytest.fixture
def learner(keys: Path) -> Iterator[Learner]:
    ctx = bounded_context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.linger = 0
    auth = secure_server(ctx, [router, pub], keys_dir=keys)
    monitors = [router.get_monitor_socket(), pub.get_monitor_socket()]
    try:
        router_port = router.bind_to_random_port(LOOPBACK)
        pub_port = pub.bind_to_random_port(LOOPBACK)
        yield Learner(ctx, router, pub, f"{LOOPBACK}:{router_port}", f"{LOOPBACK}:{pub_port}", *monitors)
    finally:
        for sock in (router, pub):
            sock.disable_monitor()
            sock.close(linger=0)
        for monitor in monitors:
            monitor.close(linger=0)
        auth.stop()
        ctx.term()


@pytest.fixture
def actors() -> Iterator[Actors]:
    ctx = bounded_context()
    made = Actors(ctx)
    try:
        yield made
    finally:
        for sock in made.sockets:
            sock.close(linger=0)
        ctx.term()


def connect_actor(actors: Actors, learner: Learner, *, keys_dir: Path | None, name: str = "actor0"):
    """A DEALER and a subscribed SUB connected to the learner; CURVE client with `keys_dir`, plain NULL without."""
    dealer, sub = actors.socket(zmq.DEALER), actors.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for sock in (dealer, sub):
        if keys_dir is not None:
            secure_client(sock, keys_dir=keys_dir, actor=name)
    dealer.connect(learner.router_addr)
    sub.connect(learner.pub_addr)
    return dealer, sub


def assert_refused(learner: Learner, dealer: zmq.Socket, sub: zmq.Socket, *, reason: set[int]) -> None:
    """The learner refuses both handshakes, never sees the requests, and the actor gets neither reply nor weights.

    Sends never block: once refused, a DEALER may have no peer left and a blocking send would wait forever.
    """
    dealer.send_multipart([b"hello", b"before refusal"], zmq.NOBLOCK)  # queued on the pipe connect() made
    assert wait_for_event(learner.router_monitor, reason, OK_WAIT_S) is not None
    assert wait_for_event(learner.pub_monitor, reason, OK_WAIT_S) is not None
    with contextlib.suppress(zmq.Again):  # no peer at all after an authentication failure: nothing to queue on
        dealer.send_multipart([b"hello", b"after refusal"], zmq.NOBLOCK)
    assert recv_within(learner.router, SILENCE_S) is None
    assert publish_until_received(learner.pub, sub, SILENCE_S) is None
    assert recv_within(dealer, 0.1) is None


# --------------------------------------------------------------------------------------------------------- handshakes


def test_authorised_actor_talks_to_router_and_receives_weights(learner: Learner, actors: Actors, keys: Path) -> None:
    dealer, sub = connect_actor(actors, learner, keys_dir=keys)

    dealer.send_multipart([b"hello", b"actor0"], zmq.NOBLOCK)
    assert learner.router.poll(int(OK_WAIT_S * 1000), zmq.POLLIN)
    frames = learner.router.recv_multipart(zmq.NOBLOCK, copy=False)
    identity, *body = frames
    assert [f.bytes for f in body] == [b"hello", b"actor0"]
    # The authenticator labels each message with the sender's public key: the learner knows which key sent it.
    assert body[0].get("User-Id") == (keys / "actor0.key").read_text().split('public-key = "')[1][:40]

    learner.router.send_multipart([identity.bytes, b"ack", b"7"])
    assert recv_within(dealer, OK_WAIT_S) == [b"ack", b"7"]
    assert publish_until_received(learner.pub, sub, OK_WAIT_S) == [b"weights", b"v1"]


def test_second_authorised_actor_is_admitted_too(learner: Learner, actors: Actors, keys: Path) -> None:
    dealer, sub = connect_actor(actors, learner, keys_dir=keys, name="actor1")
    dealer.send(b"hi", zmq.NOBLOCK)
    assert recv_within(learner.router, OK_WAIT_S) is not None
    assert publish_until_received(learner.pub, sub, OK_WAIT_S) is not None


def test_actor_with_unlisted_key_gets_nothing_and_gives_nothing(
    learner: Learner, actors: Actors, rogue_keys: Path
) -> None:
    dealer, sub = connect_actor(actors, learner, keys_dir=rogue_keys)
    assert_refused(learner, dealer, sub, reason={zmq.EVENT_HANDSHAKE_FAILED_AUTH})


def test_plain_null_client_gets_nothing_and_gives_nothing(learner: Learner, actors: Actors) -> None:
    dealer, sub = connect_actor(actors, learner, keys_dir=None)
    assert_refused(learner, dealer, sub, reason=HANDSHAKE_FAILED)


def test_refused_actor_does_not_disturb_an_authorised_one(
    learner: Learner, actors: Actors, keys: Path, rogue_keys: Path
) -> None:
    rogue_dealer, _ = connect_actor(actors, learner, keys_dir=rogue_keys)
    rogue_dealer.send(b"from rogue", zmq.NOBLOCK)
    dealer, _ = connect_actor(actors, learner, keys_dir=keys)
    dealer.send(b"from actor0", zmq.NOBLOCK)
    received = recv_within(learner.router, OK_WAIT_S)
    assert received is not None and received[1:] == [b"from actor0"]
    assert recv_within(learner.router, SILENCE_S) is None


def test_actor_sees_its_refusal_on_its_own_monitor(learner: Learner, actors: Actors, rogue_keys: Path) -> None:
    dealer, _ = connect_actor(actors, learner, keys_dir=rogue_keys)
    monitor = dealer.get_monitor_socket()
    try:
        assert wait_for_event(monitor, {zmq.EVENT_HANDSHAKE_FAILED_AUTH}, OK_WAIT_S) is not None
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)


@pytest.mark.skipif(not hasattr(zmq, "ZAP_ENFORCE_DOMAIN"), reason="libzmq without ZMQ_ZAP_ENFORCE_DOMAIN")
def test_stopped_authenticator_admits_nobody(keys: Path, rogue_keys: Path, actors: Actors) -> None:
    """No silent fallback: without a running ZAP handler the CURVE server refuses even a valid key."""
    ctx = bounded_context()
    router = ctx.socket(zmq.ROUTER)
    try:
        secure_server(ctx, [router], keys_dir=keys).stop()
        port = router.bind_to_random_port(LOOPBACK)
        for keys_dir in (keys, rogue_keys):
            dealer = actors.socket(zmq.DEALER)
            secure_client(dealer, keys_dir=keys_dir, actor="actor0")
            dealer.connect(f"{LOOPBACK}:{port}")
            dealer.send(b"anyone there?", zmq.NOBLOCK)
        assert recv_within(router, SILENCE_S) is None
    finally:
        router.close(linger=0)
        ctx.term()


def test_server_sockets_are_curve_servers_with_zap_domain(learner: Learner) -> None:
    for sock in (learner.router, learner.pub):
        assert sock.curve_server == 1
        assert sock.mechanism == zmq.CURVE
        assert sock.zap_domain == security.ZAP_DOMAIN.encode()


# --------------------------------------------------------------------------------------------------------- encryption


class TcpTap:
    """A one-connection TCP relay on 127.0.0.1 that records every byte passing in both directions."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = pysocket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(OK_WAIT_S)
        self.addr = f"{LOOPBACK}:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = pysocket.create_connection(self.upstream, timeout=OK_WAIT_S)
        peer = {client: server, server: client}
        with selectors.DefaultSelector() as sel, client, server:
            for s in peer:
                sel.register(s, selectors.EVENT_READ)
            while not self.stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    self.captured += data
                    peer[key.fileobj].sendall(data)  # type: ignore[index]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=OK_WAIT_S)
        self.listener.close()


SECRET_PAYLOAD = b"gripper-pose-0123456789-plaintext-marker"


def exchange_through_tap(server_ctx: zmq.Context, client_ctx: zmq.Context, *, keys: Path | None) -> bytes:
    """Send SECRET_PAYLOAD DEALER -> ROUTER through a TcpTap (CURVE when `keys` is given); the bytes on the wire."""
    router, dealer = server_ctx.socket(zmq.ROUTER), client_ctx.socket(zmq.DEALER)
    auth = secure_server(server_ctx, [router], keys_dir=keys) if keys is not None else None
    if keys is not None:
        secure_client(dealer, keys_dir=keys, actor="actor0")
    tap = None
    try:
        port = router.bind_to_random_port(LOOPBACK)
        tap = TcpTap(f"{LOOPBACK}:{port}")
        dealer.connect(tap.addr)
        dealer.send(SECRET_PAYLOAD, zmq.NOBLOCK)
        received = recv_within(router, OK_WAIT_S)
        assert received is not None and received[1] == SECRET_PAYLOAD
        return bytes(tap.captured)
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        if tap is not None:
            tap.close()
        if auth is not None:
            auth.stop()


def test_payload_is_encrypted_on_the_wire(keys: Path) -> None:
    server_ctx, client_ctx = bounded_context(), bounded_context()
    try:
        plain = exchange_through_tap(server_ctx, client_ctx, keys=None)
        assert SECRET_PAYLOAD in plain  # the tap sees plaintext when CURVE is off: the capture works
        wire = exchange_through_tap(server_ctx, client_ctx, keys=keys)
        assert b"CURVE" in wire  # the ZMTP greeting names the mechanism
        assert SECRET_PAYLOAD not in wire
    finally:
        server_ctx.term()
        client_ctx.term()


# ------------------------------------------------------------------------------------------------------- key handling


def test_secure_server_names_missing_and_malformed_key_files(tmp_path: Path, keys: Path) -> None:
    ctx = bounded_context()
    router = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(SecurityError, match=r"nowhere/learner\.key_secret"):
            secure_server(ctx, [router], keys_dir=tmp_path / "nowhere")

        (keys / "authorized" / "broken.key").write_text('curve\n    public-key = "not-a-key"\n')
        with pytest.raises(SecurityError, match=r"broken\.key.*Z85"):
            secure_server(ctx, [router], keys_dir=keys)
        (keys / "authorized" / "broken.key").write_text("just some text\n")
        with pytest.raises(SecurityError, match=r"broken\.key"):
            secure_server(ctx, [router], keys_dir=keys)
        (keys / "authorized" / "broken.key").unlink()

        for f in (keys / "authorized").iterdir():
            f.unlink()
        with pytest.raises(SecurityError, match="no \\*\\.key file"):
            secure_server(ctx, [router], keys_dir=keys)
        (keys / "learner.key_secret").write_text(
            (keys / "learner.key").read_text()
        )  # a public file where the secret should be
        with pytest.raises(SecurityError, match=r"learner\.key_secret holds no secret-key"):
            secure_server(ctx, [router], keys_dir=keys)
    finally:
        router.close(linger=0)
        ctx.term()


def test_key_files_others_could_read_or_write_or_that_do_not_hold_together_are_refused(
    tmp_path: Path, keys: Path, rogue_keys: Path
) -> None:
    """A secret key others can read (as ssh refuses a private key), an authorized/ every user may write to (they could
    admit any key), a secret key that is not its public key's (damaged: no actor would ever get in, silently), and two
    authorised files with one key (its actor would be taken for the other) are refused at start, naming the file."""
    ctx = bounded_context()
    router = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    try:
        secret = keys / "learner.key_secret"
        secret.chmod(0o644)
        with pytest.raises(SecurityError, match=rf"{secret} holds a secret key and is open to others \(mode 644\)"):
            secure_server(ctx, [router], keys_dir=keys)
        secret.chmod(0o600)
        actor_secret = keys / "actor0.key_secret"
        actor_secret.chmod(0o640)
        with pytest.raises(SecurityError, match=r"actor0\.key_secret holds a secret key and is open to others"):
            secure_client(client, keys_dir=keys, actor="actor0")
        actor_secret.chmod(0o600)
        authorized = keys / "authorized"
        authorized.chmod(0o777)
        with pytest.raises(SecurityError, match=r"may be written by every user \(mode 777\)"):
            secure_server(ctx, [router], keys_dir=keys)
        authorized.chmod(0o775)  # group-writable: a user's own group, left alone
        # A secret key of another pair under this public key (one Z85 character changed does the same).
        text = secret.read_text()
        other = (rogue_keys / "actor0.key_secret").read_text()
        mine = text.split('secret-key = "')[1][:40]
        secret.write_text(text.replace(mine, other.split('secret-key = "')[1][:40]))
        with pytest.raises(
            SecurityError, match=r"learner\.key_secret: its secret key is not the one of its public key"
        ):
            secure_server(ctx, [router], keys_dir=keys)
        secret.write_text(text)
        shutil.copy(authorized / "actor0.key", authorized / "zz_copy.key")
        with pytest.raises(SecurityError, match=r"actor0\.key and .*zz_copy\.key hold the same public key"):
            secure_server(ctx, [router], keys_dir=keys)
        (authorized / "zz_copy.key").unlink()
        secure_server(ctx, [router], keys_dir=keys).stop()  # as made by robot-rl keys: accepted
    finally:
        router.close(linger=0)
        client.close(linger=0)
        ctx.term()


def test_secure_server_refuses_bound_socket_and_a_second_authenticator(keys: Path) -> None:
    ctx = bounded_context()
    bound, fresh, other = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    auth = None
    try:
        bound.bind_to_random_port(LOOPBACK)
        with pytest.raises(SecurityError, match="before bind"):
            secure_server(ctx, [bound], keys_dir=keys)
        auth = secure_server(ctx, [fresh], keys_dir=keys)  # the failed call above left no authenticator running
        with pytest.raises(SecurityError, match="authenticator"):
            secure_server(ctx, [other], keys_dir=keys)
    finally:
        for sock in (bound, fresh, other):
            sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()


def test_secure_client_names_missing_files(tmp_path: Path, keys: Path) -> None:
    ctx = bounded_context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(SecurityError, match=r"nobody\.key_secret"):
            secure_client(dealer, keys_dir=keys, actor="nobody")
        actor_only = tmp_path / "actor_only"
        actor_only.mkdir()
        shutil.copy(keys / "actor0.key_secret", actor_only)
        with pytest.raises(SecurityError, match=r"actor_only/learner\.key"):
            secure_client(dealer, keys_dir=actor_only, actor="actor0")
        with pytest.raises(SecurityError, match="not usable as a file name"):
            secure_client(dealer, keys_dir=keys, actor="../learner")
    finally:
        dealer.close(linger=0)
        ctx.term()


def test_make_keys_writes_pairs_authorized_and_private_secrets(tmp_path: Path) -> None:
    out = tmp_path / "k"
    paths = make_keys(out, actors=["left", "right"])
    assert set(paths) == {
        "learner.key",
        "learner.key_secret",
        "left.key",
        "left.key_secret",
        "right.key",
        "right.key_secret",
        "authorized/left.key",
        "authorized/right.key",
    }
    for rel, path in paths.items():
        assert path == out / rel and path.is_file()
        if rel.endswith(".key_secret"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            public, secret = zmq.auth.load_certificate(path)
            assert secret is not None and zmq.curve_public(secret) == public
    assert sorted(p.name for p in (out / "authorized").iterdir()) == ["left.key", "right.key"]
    for name in ("left", "right"):
        assert zmq.auth.load_certificate(out / "authorized" / f"{name}.key") == (
            zmq.auth.load_certificate(out / f"{name}.key")
        )
    assert not any(p.name.startswith(".keys-") for p in out.iterdir())  # no staging directory left behind


def test_make_keys_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k"
    make_keys(out, actors=["actor0"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SecurityError, match=r"refusing to overwrite.*learner\.key_secret"):
        make_keys(out, actors=["actor0"])
    with pytest.raises(SecurityError, match=r"refusing to overwrite.*learner\.key_secret"):
        make_keys(out, actors=["another"])  # a new actor name still meets the existing learner pair
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_make_keys_refuses_a_directory_whose_authorized_keys_would_be_admitted_too(tmp_path: Path) -> None:
    out = tmp_path / "k"
    (out / "authorized").mkdir(parents=True)
    (out / "authorized" / "stale.key").write_text("an old actor's public key")
    with pytest.raises(SecurityError, match=r"authorized already holds stale\.key: a learner given .* would admit"):
        make_keys(out, actors=["actor0"])
    assert sorted(p.name for p in out.rglob("*")) == ["authorized", "stale.key"]  # nothing written


@pytest.mark.parametrize("actors", [[], ["learner"], ["a", "a"], ["bad/name"], [""]])
def test_make_keys_refuses_bad_actor_names(tmp_path: Path, actors: list[str]) -> None:
    with pytest.raises(SecurityError):
        make_keys(tmp_path / "k", actors=actors)
    assert not (tmp_path / "k" / "learner.key_secret").exists()


def test_without_curve_support_the_error_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security.zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(SecurityError, match="no CURVE support"):
        make_keys(tmp_path / "k", actors=["actor0"])
    ctx = bounded_context()
    try:
        with pytest.raises(SecurityError, match="no CURVE support"):
            secure_server(ctx, [ctx.socket(zmq.ROUTER)], keys_dir=tmp_path)
    finally:
        ctx.destroy(linger=0)


# -------------------------------------------------------------------------------------------------------------- CLI


def keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robot-rl")
    register_keys_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_keys_command_prints_every_path_and_what_goes_where(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    args = keys_parser().parse_args(["keys", "--out", str(out), "--actors", "arm_a,arm_b"])
    assert args.func is cmd_keys
    assert cmd_keys(args) == 0
    printed = capsys.readouterr().out
    for rel in ("learner.key", "learner.key_secret", "arm_a.key_secret", "arm_b.key", "authorized/arm_b.key"):
        assert str(out / rel) in printed
    lines = printed.splitlines()
    learner_line = next(line for line in lines if "learner machine" in line)
    assert str(out / "learner.key_secret") in learner_line and "arm_a.key_secret" not in learner_line
    arm_a_line = next(line for line in lines if "'arm_a' machine" in line)
    assert str(out / "arm_a.key_secret") in arm_a_line and "learner.key_secret" not in arm_a_line


def test_keys_command_default_actor_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "keys"
    args = keys_parser().parse_args(["keys", "--out", str(out)])
    assert cmd_keys(args) == 0
    assert (out / "actor0.key_secret").is_file() and (out / "authorized" / "actor0.key").is_file()
    capsys.readouterr()
    assert cmd_keys(args) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
