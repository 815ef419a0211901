"""CURVE authentication and encryption between actors and the learner (design §6, security).

ZeroMQ's own CURVE mechanism encrypts every frame and authenticates both ends by key pair. `robot-rl keys --out DIR`
writes one key pair for the learner and one per actor, plus `DIR/authorized/` with the actors' public keys:

- the learner machine needs `learner.key`, `learner.key_secret` and `authorized/` (the actors it accepts);
- each actor machine needs `learner.key` (whom it talks to) and its own `<actor>.key` + `<actor>.key_secret`.

The learner calls `secure_server` on its ROUTER (actor requests) and PUB (weights) sockets before binding them; it
starts a ZAP authenticator (pyzmq's `ThreadAuthenticator`) that admits only the public keys found in `authorized/`.
An actor calls `secure_client` on its DEALER and SUB sockets before connecting.

What an actor without an authorised key experiences: its CURVE handshake is refused by the learner's authenticator,
so ZeroMQ never completes the connection. It receives nothing (no replies, no weights) and nothing it sends reaches
the learner's application. Its receives time out; its sends queue locally or, once ZeroMQ has dropped the refused
connection and the socket has no peer left, block (so an actor sends with `zmq.NOBLOCK` or a send timeout). The
application gets no exception; the only trace is on the sockets' monitors, where both sides see
`EVENT_HANDSHAKE_FAILED_AUTH` (an actor service can watch its monitor to report "refused by the learner"). A client
without CURVE (the NULL mechanism) fails the same way, as `EVENT_HANDSHAKE_FAILED_PROTOCOL` on the learner: its
sockets speak only CURVE, and ZeroMQ retries such a client in the background without ever letting it through. The
sockets also carry a ZAP domain with ZAP enforcement where libzmq offers it, so a learner whose authenticator has
stopped refuses every client rather than admitting any key. A message from an admitted actor carries the sender's
public key (Z85) as its `User-Id` frame property (`frame.get("User-Id")`), so the learner can tell which key sent it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

ZAP_DOMAIN = "robot_rl"
LEARNER = "learner"
DEFAULT_ACTOR = "actor0"
AUTHORIZED = "authorized"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SECRET_MODE = 0o600
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SecurityError(ValueError):
    """Keys that cannot be written, read or used; the message names the file and the problem."""


def require_curve() -> None:
    """Raise SecurityError unless the installed libzmq supports CURVE (built with libsodium or tweetnacl)."""
    if not zmq.has("curve"):
        raise SecurityError(
            f"this libzmq ({zmq.zmq_version()}, pyzmq {zmq.__version__}) has no CURVE support; "
            "install a pyzmq wheel (they bundle libzmq with CURVE) or a libzmq built with libsodium"
        )


# ---------------------------------------------------------------------------------------------------------------- keys


def _check_names(actors: list[str]) -> None:
    if not actors:
        raise SecurityError("at least one actor name is needed")
    for name in actors:
        if not _NAME.fullmatch(name):
            raise SecurityError(
                f"actor name {name!r} is not usable as a file name: letters, digits, '_', '-', '.', at most 64"
            )
        if name == LEARNER:
            raise SecurityError(f"actor name {name!r} is reserved for the learner's key pair")
    duplicates = sorted({n for n in actors if actors.count(n) > 1})
    if duplicates:
        raise SecurityError(f"actor names repeat: {', '.join(duplicates)}")


def _planned_paths(out: Path, actors: list[str]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name in [LEARNER, *actors]:
        paths[f"{name}{PUBLIC_SUFFIX}"] = out / f"{name}{PUBLIC_SUFFIX}"
        paths[f"{name}{SECRET_SUFFIX}"] = out / f"{name}{SECRET_SUFFIX}"
    for name in actors:
        paths[f"{AUTHORIZED}/{name}{PUBLIC_SUFFIX}"] = out / AUTHORIZED / f"{name}{PUBLIC_SUFFIX}"
    return paths


def _place(src: Path, dst: Path) -> None:
    """Move src to dst without ever replacing an existing dst (a hard link refuses an existing target)."""
    try:
        os.link(src, dst)
    except FileExistsError as exc:
        raise SecurityError(f"{dst} already exists; refusing to overwrite it") from exc
    except OSError:  # a file system without hard links: checked just before, so only a concurrent writer can race
        if dst.exists():
            raise SecurityError(f"{dst} already exists; refusing to overwrite it") from None
        shutil.copy2(src, dst)
    src.unlink()


def make_keys(out: Path, *, actors: list[str]) -> dict[str, Path]:
    """Write CURVE key pairs for the learner and each actor into `out`, and `out/authorized/` with the actors' keys.

    Files: `learner.key` / `learner.key_secret`, `<actor>.key` / `<actor>.key_secret` per actor, and
    `authorized/<actor>.key`. Secret files have mode 0600. Nothing is written when any of these files already exists
    (SecurityError naming it), so a key pair in use is never replaced by accident.

    Returns the written paths keyed by their path relative to `out` (for example `"authorized/actor0.key"`).
    """
    require_curve()
    _check_names(actors)
    out = Path(out)
    paths = _planned_paths(out, actors)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise SecurityError(f"refusing to overwrite existing key files: {', '.join(existing)}")
    others = sorted(p.name for p in (out / AUTHORIZED).iterdir()) if (out / AUTHORIZED).is_dir() else []
    if others:
        raise SecurityError(
            f"{out / AUTHORIZED} already holds {', '.join(others)}: a learner given {out} would admit those keys "
            "too; write the keys into a new directory"
        )
    try:
        (out / AUTHORIZED).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SecurityError(f"cannot create {out / AUTHORIZED}: {exc}") from exc

    # Generate inside a private (0700) temporary directory so a secret is never readable by others, not even briefly.
    with tempfile.TemporaryDirectory(dir=out, prefix=".keys-") as tmp:
        staging = Path(tmp)
        for name in [LEARNER, *actors]:
            public, secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            secret.chmod(SECRET_MODE)
            if name != LEARNER:
                shutil.copy2(public, staging / f"{name}.authorized")
        for rel, dst in paths.items():
            if rel.startswith(f"{AUTHORIZED}/"):
                _place(staging / f"{Path(rel).stem}.authorized", dst)
            else:
                _place(staging / rel, dst)
    return paths


def copy_plan(*, actors: list[str]) -> dict[str, list[str]]:
    """Which of the written files (relative names) go to which machine: `learner` and one entry per actor."""
    plan = {LEARNER: [f"{LEARNER}{PUBLIC_SUFFIX}", f"{LEARNER}{SECRET_SUFFIX}", f"{AUTHORIZED}/"]}
    for name in actors:
        plan[name] = [f"{LEARNER}{PUBLIC_SUFFIX}", f"{name}{PUBLIC_SUFFIX}", f"{name}{SECRET_SUFFIX}"]
    return plan


def register_keys_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `robot-rl keys --out DIR [--actors a1,a2]` to a `robot-rl` subparser set; it dispatches to `cmd_keys`."""
    p = subparsers.add_parser("keys", help="write CURVE key pairs for the learner and the actors")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files (created if missing)")
    p.add_argument(
        "--actors",
        default=DEFAULT_ACTOR,
        help=f"comma-separated actor names, one key pair each (default: {DEFAULT_ACTOR})",
    )
    p.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    """Run `robot-rl keys`: write the keys, print each file's path and which files to copy to which machine."""
    actors = [a.strip() for a in str(args.actors).split(",") if a.strip()]
    try:
        paths = make_keys(args.out, actors=actors)
    except SecurityError as exc:
        print(f"robot-rl keys: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"CURVE keys written to {out}:")
    for rel, path in paths.items():
        kind = "secret, mode 0600" if rel.endswith(SECRET_SUFFIX) else "public"
        print(f"  {path}  ({kind})")
    print("Copy to each machine (keep every *.key_secret on its own machine only, mode 0600):")
    for machine, files in copy_plan(actors=actors).items():
        where = "learner machine" if machine == LEARNER else f"actor {machine!r} machine"
        print(f"  {where}: " + ", ".join(f"{out / f}/" if f.endswith("/") else str(out / f) for f in files))
    print(
        "To admit another actor later: run `robot-rl keys` into a new directory, copy its <actor>.key into the "
        f"learner's {AUTHORIZED}/ and restart the learner; that actor uses the original {LEARNER}{PUBLIC_SUFFIX}."
    )
    return 0


# ------------------------------------------------------------------------------------------------------------- loading


def _read_key_file(path: Path, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys from a pyzmq certificate file; SecurityError naming the file if anything is wrong."""
    if not path.is_file():
        raise SecurityError(f"key file {path} does not exist or is not a file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SecurityError(f"key file {path} cannot be read as a CURVE certificate: {exc}") from exc
    for label, key in (("public", public), ("secret", secret)):
        if key is None:
            continue
        try:
            valid = len(key) == 40 and len(z85.decode(key)) == 32
        except (ValueError, KeyError, IndexError, TypeError):
            valid = False
        if not valid:
            raise SecurityError(f"key file {path}: the {label} key is not a 40-character Z85 CURVE key")
    if need_secret and secret is None:
        raise SecurityError(f"key file {path} holds no secret-key (expected a *{SECRET_SUFFIX} file)")
    if secret is not None:
        mode = path.stat().st_mode
        if mode & 0o077:  # as ssh refuses a private key others can read
            raise SecurityError(
                f"key file {path} holds a secret key and is open to others (mode {mode & 0o777:o}): chmod 600 {path}"
            )
        if zmq.curve_public(secret) != public:
            raise SecurityError(f"key file {path}: its secret key is not the one of its public key (damaged?)")
    return public, secret


def _authorized_files(directory: Path) -> list[Path]:
    """Every `*.key` in `directory`, sorted; SecurityError if there are none."""
    if not directory.is_dir():
        raise SecurityError(f"authorised-keys directory {directory} does not exist")
    files = sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))
    # Whoever may write here may let any key in at the next start (group-writable is left alone: with a user's own
    # group, as a umask of 002 makes, it is the owner again).
    for path in (directory, *files):
        mode = path.stat().st_mode
        if mode & 0o002:
            raise SecurityError(
                f"{path} may be written by every user (mode {mode & 0o777:o}): anyone who can write there can admit "
                f"a key; chmod o-w {path}"
            )
    if not files:
        raise SecurityError(
            f"authorised-keys directory {directory} holds no *{PUBLIC_SUFFIX} file; no actor could connect"
        )
    return files


def _authorized_keys(directory: Path) -> dict[bytes, Path]:
    """Public key (Z85) -> its file, for every `*.key` in `directory`; SecurityError if there are none, or if two
    files hold one key (its owner would be taken for the other actor)."""
    keys: dict[bytes, Path] = {}
    for path in _authorized_files(directory):
        key = _read_key_file(path, need_secret=False)[0]
        if (other := keys.setdefault(key, path)) is not path:
            raise SecurityError(
                f"{other} and {path} hold the same public key: keep the file of the actor it belongs to"
            )
    return keys


def load_authorized(directory: Path) -> list[bytes]:
    """Public keys (Z85) of the clients allowed in: every `*.key` in `directory` (see _authorized_keys)."""
    return list(_authorized_keys(directory))


def key_owners(keys_dir: Path) -> dict[str, str]:
    """Public key (Z85 text, as a message's `User-Id` carries it) -> actor id, from `keys_dir/authorized/<actor>.key`:
    whose key an admitted connection uses."""
    keys = _authorized_keys(Path(keys_dir) / AUTHORIZED)
    return {key.decode(): path.name[: -len(PUBLIC_SUFFIX)] for key, path in keys.items()}


def check_client_keys(keys_dir: Path, actor: str) -> None:
    """SecurityError naming the file when `keys_dir` lacks what `secure_client` reads for `actor` (check at start)."""
    _check_names([actor])
    _read_key_file(Path(keys_dir) / f"{actor}{SECRET_SUFFIX}", need_secret=True)
    _read_key_file(Path(keys_dir) / f"{LEARNER}{PUBLIC_SUFFIX}", need_secret=False)


def _check_unbound(socket: zmq.Socket, role: str) -> None:
    if socket.closed:
        raise SecurityError(f"{role}: the socket is closed")
    endpoint = socket.get(zmq.LAST_ENDPOINT)
    if endpoint:
        raise SecurityError(f"{role} must be called before bind/connect; the socket is already at {endpoint!r}")


def _enforce_zap(socket: zmq.Socket) -> None:
    """Set the ZAP domain, and where libzmq knows the option, refuse handshakes when no ZAP handler answers."""
    socket.zap_domain = ZAP_DOMAIN.encode()
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        # A libzmq without this (draft) option refuses it; the running authenticator still decides every handshake.
        with contextlib.suppress(zmq.ZMQError):
            socket.setsockopt(enforce, 1)


# -------------------------------------------------------------------------------------------------------------- server


def secure_server(ctx: zmq.Context, sockets: list[zmq.Socket], *, keys_dir: Path) -> ThreadAuthenticator:
    """Make the learner's sockets CURVE servers that admit only the actors whose keys are in `keys_dir/authorized/`.

    Reads `keys_dir/learner.key_secret` and every `keys_dir/authorized/*.key`, starts a ZAP authenticator on `ctx`
    (the context the sockets were made from) and sets each socket to CURVE server with the learner's secret key and
    the ZAP domain `robot_rl`. Call it before binding; use it for the ROUTER and for the PUB socket, so that weights
    are encrypted and only authorised SUB sockets receive them. The returned authenticator must stay running while the
    sockets are open: keep a reference to it (pyzmq stops an authenticator that is garbage-collected) and stop it
    (`auth.stop()`) after closing the sockets, in a `finally`.

    An unauthorised client's handshake is refused (see the module docstring): it receives nothing and nothing it sends
    reaches the application. SecurityError for missing or malformed key files (naming the file), a socket that is
    already bound, or a context that already has an authenticator.
    """
    require_curve()
    keys_dir = Path(keys_dir)
    if not sockets:
        raise SecurityError("secure_server needs at least one socket")
    public, secret = _read_key_file(keys_dir / f"{LEARNER}{SECRET_SUFFIX}", need_secret=True)
    load_authorized(keys_dir / AUTHORIZED)  # validate every file first: pyzmq only logs a bad one and admits nobody
    for socket in sockets:
        if socket.context is not ctx:
            raise SecurityError("secure_server: every socket must come from the given context (ZAP is per context)")
        _check_unbound(socket, "secure_server")

    auth = ThreadAuthenticator(ctx)
    try:
        auth.start()
    except zmq.ZMQError as exc:
        auth.stop()
        raise SecurityError(
            f"cannot start the ZAP authenticator on this context (one is already running?): {exc}"
        ) from exc
    try:
        auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys_dir / AUTHORIZED))
        for socket in sockets:
            socket.curve_secretkey = secret
            socket.curve_publickey = public
            socket.curve_server = True
            _enforce_zap(socket)
    except BaseException:
        auth.stop()
        raise
    return auth


# -------------------------------------------------------------------------------------------------------------- client


def secure_client(socket: zmq.Socket, *, keys_dir: Path, actor: str) -> None:
    """Make an actor's socket a CURVE client: its own key pair and the learner's public key, from `keys_dir`.

    Reads `keys_dir/<actor>.key_secret` (the actor's key pair) and `keys_dir/learner.key`. Call it before connecting,
    on the DEALER and the SUB socket. If the learner does not list this actor's public key, the handshake is refused
    and the socket receives nothing (see the module docstring). SecurityError names a missing or malformed file.
    """
    require_curve()
    keys_dir = Path(keys_dir)
    _check_names([actor])
    _check_unbound(socket, "secure_client")
    public, secret = _read_key_file(keys_dir / f"{actor}{SECRET_SUFFIX}", need_secret=True)
    server_public, _ = _read_key_file(keys_dir / f"{LEARNER}{PUBLIC_SUFFIX}", need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public
