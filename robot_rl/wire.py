"""The actor <-> learner wire format (design §6): typed, versioned msgpack messages with numpy arrays as raw bytes.

Every message is a msgpack map carrying `kind` (one of `KINDS`) and `v` (`PROTOCOL_VERSION`); the protocol version
of the hello is this `v`. A numpy array travels as the map {"__nd__": 1, "dtype": "<f4", "shape": [..], "data": raw
little-endian bytes}; only the dtypes of `DTYPES` are accepted. Nothing on the decode path executes code from the
peer: msgpack runs with `raw=False`, `strict_map_key`, every length limited by `max_bytes`, and no extension types.

A service receives with

    msg = from_wire(frame, max_bytes=limit)          # or parse(decode(frame, max_bytes=limit))

and gets a `Hello`, `Welcome`, `Refuse`, `Transitions`, `Ack` or `Weights` instance, or a `WireError` saying what was
refused and why. Decoded arrays are read-only views over the private bytes objects msgpack built from the frame
(never over the socket's buffer); copy them to keep or modify them (`ReplayBuffer.add_many` copies).
`validate_transitions` then checks a chunk against the `TransitionSpec` both sides derived from the config.

Weights are tens of megabytes for image agents and an image chunk of transitions over a megabyte, so both travel as
multipart messages (`to_frames` / `from_frames`; weights since protocol 2, transitions since protocol 3): a msgpack
header frame whose `tensors` (weights) or `arrays` (transitions) is a list of {"name", "dtype", "shape"}, then one
frame of raw little-endian bytes per array, in the header's order. Sent with `copy=False` and received with
`copy=False`, no array byte is copied by msgpack or Python; every frame's length is checked against its header entry
(dtype, shape, byte count) before an array is made over it. Every other message travels as one frame, and
`from_frames` of one frame is `from_wire` (a transitions message with its arrays inline in one frame still reads).

`join_frames` / `split_frames` keep the frames of one message as one byte string (the actor's spill and the learner's
log hold messages so), to be split into the same frames again without decoding them.

The config fingerprint (`config_fingerprint`, `config_hash`, `diff_fingerprints`) names the parts of the config both
sides must agree on, so that a mismatched actor is refused with the differing field paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from robot_rl.config import STATE_OBS_KEY, load_config

if TYPE_CHECKING:
    import gymnasium as gym
    import torch

    from robot_rl.config import RunConfig

# 2: Weights travel as a header frame plus one frame per tensor (to_frames); Transitions may leave out next
# observations that repeat the following observation (next_obs_shared). A version-1 message parses the same way.
# 3: Transitions travel as a header frame plus one frame per array, as weights do.
PROTOCOL_VERSION: int = 3
# What this side reads back from its own disk (the actor's spill, the learner's log): chunks written under earlier
# protocols parse to the same Transitions.
STORED_VERSIONS: tuple[int, ...] = (1, 2, PROTOCOL_VERSION)

# Wire dtype string -> numpy dtype: float32, float64, int32, int64, uint8, bool, uint16, as numpy writes them
# little-endian (`|` where byte order does not apply). A peer's dtype string is only looked up here, never parsed.
DTYPES: dict[str, np.dtype] = {wire: np.dtype(wire) for wire in ("<f4", "<f8", "<i4", "<i8", "|u1", "|b1", "<u2")}
_DTYPE_BY_NAME: dict[str, str] = {dt.name: wire for wire, dt in DTYPES.items()}

MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_DEPTH = 16
DEFAULT_MAX_CHUNK = 10_000
PHASES = ("qest_rollouts", "qest_fit", "online", "eval", "paused")
Phase = Literal["qest_rollouts", "qest_fit", "online", "eval", "paused"]
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_OBS_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,64}$")
_ARRAY_KEYS = frozenset({"__nd__", "dtype", "shape", "data"})


class WireError(ValueError):
    """A message refused by the wire layer; the message names the field and the reason."""


class VersionError(WireError):
    """A well-formed message of another protocol version than the ones accepted."""


def _check_version(version: Any, versions: Collection[int] | None) -> None:
    accepted = (PROTOCOL_VERSION,) if versions is None else versions
    if not isinstance(version, int) or isinstance(version, bool) or version not in accepted:
        speaks = ", ".join(str(v) for v in sorted(accepted))
        raise VersionError(f"v: protocol version {_short(version)}, this side speaks {speaks}")


def _short(value: Any, limit: int = 40) -> str:
    """repr of a peer-supplied value, cut to `limit` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name(value: str) -> str:
    """A peer-supplied name as is when it is short and plain, else its cut repr."""
    return value if _PLAIN_NAME.match(value) else _short(value)


# --------------------------------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------------------------------
def _wire_dtype(dtype: np.dtype) -> str:
    wire = _DTYPE_BY_NAME.get(dtype.name)
    if wire is None:
        raise WireError(f"array dtype {dtype} is not sent on the wire (allowed: {', '.join(sorted(_DTYPE_BY_NAME))})")
    return wire


def _pack_default(obj: Any) -> Any:
    """msgpack's hook for types it does not know: numpy arrays and scalars; anything else is refused."""
    if isinstance(obj, np.ndarray):
        wire = _wire_dtype(obj.dtype)
        array = np.asarray(obj, dtype=DTYPES[wire])  # also swaps a big-endian array to little-endian
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        return {
            "__nd__": 1,
            "dtype": wire,
            "shape": list(array.shape),
            "data": memoryview(array.reshape(-1).view(np.uint8)),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    raise WireError(f"cannot encode a {type(obj).__name__} (send numpy arrays, not tensors or objects)")


def _refuse_reserved_keys(node: Any, path: str) -> None:
    """`__nd__` marks an array map on the wire; a map of the sender's own using it would decode as a broken array."""
    if isinstance(node, Mapping):
        if "__nd__" in node:
            raise WireError(f"{path or '<message>'}: the key '__nd__' is reserved for arrays")
        for key, value in node.items():
            _refuse_reserved_keys(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _refuse_reserved_keys(value, f"{path}[{i}]")


def encode(message: Mapping[str, Any]) -> bytes:
    """The msgpack bytes of a message map; `kind` must be a known kind and `v` is set to PROTOCOL_VERSION."""
    kind = message.get("kind")
    if kind not in KINDS:
        raise WireError(f"kind: unknown kind {_short(kind)} (known: {', '.join(sorted(KINDS))})")
    if message.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise WireError(f"v: {_short(message.get('v'))} differs from this side's protocol {PROTOCOL_VERSION}")
    body = dict(message)
    body["v"] = PROTOCOL_VERSION
    _refuse_reserved_keys(body, "")
    try:
        return msgpack.packb(body, default=_pack_default, use_bin_type=True, strict_types=False)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode {kind} message: {exc}") from exc


def _array_from_map(node: dict[str, Any]) -> np.ndarray:
    """The read-only array a {"__nd__": 1, ...} map describes, after checking dtype, shape and byte length."""
    if set(node) != _ARRAY_KEYS or type(node["__nd__"]) is not int or node["__nd__"] != 1:
        raise WireError(f"array map must hold exactly {sorted(_ARRAY_KEYS)} with __nd__ = 1, got {_short(list(node))}")
    if not isinstance(node["data"], bytes):
        raise WireError(f"array data must be bytes, got {type(node['data']).__name__}")
    return _checked_array(node["dtype"], node["shape"], memoryview(node["data"]))


def _checked_array(wire_dtype: Any, shape: Any, data: memoryview) -> np.ndarray:
    """The read-only array of a peer's dtype string and shape over `data`, after checking them and the byte count."""
    dtype = DTYPES.get(wire_dtype) if isinstance(wire_dtype, str) else None
    if dtype is None:
        raise WireError(f"array dtype {_short(wire_dtype)} is not allowed (allowed: {', '.join(sorted(DTYPES))})")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"array shape must be a list of at most {MAX_NDIM} sizes, got {_short(shape)}")
    if any(type(d) is not int or not 0 <= d <= MAX_DIM for d in shape):
        raise WireError(f"array shape must hold integers in [0, {MAX_DIM}], got {_short(shape)}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge declared shape cannot overflow
    if expected != data.nbytes:
        raise WireError(f"array of shape {shape} and dtype {dtype.name} needs {expected} bytes, got {data.nbytes}")
    if dtype == np.bool_ and data.nbytes and np.frombuffer(data, np.uint8).max() > 1:
        raise WireError("bool array holds bytes other than 0 and 1")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


def _object_hook(node: dict[str, Any]) -> Any:
    """Every decoded map: string keys only; an array map becomes its array."""
    if any(type(key) is not str for key in node):
        raise WireError("map keys must be strings")
    return _array_from_map(node) if "__nd__" in node else node


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not accepted")


def _check_depth(root: dict[str, Any]) -> None:
    """Refuse containers nested deeper than MAX_DEPTH (iteratively: no recursion on peer data)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WireError(f"message nests containers deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def decode(
    data: bytes | bytearray | memoryview, *, max_bytes: int, versions: Collection[int] | None = None
) -> dict[str, Any]:
    """The message map in `data` (at most `max_bytes` long) with arrays as read-only numpy views; else WireError.

    Checks the framing only: a map at the top, a known `kind`, `v` equal to PROTOCOL_VERSION (or one of `versions`;
    VersionError else), well-formed arrays of allowed dtypes. The fields of each kind are checked by `parse`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise WireError(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    limit = max(int(max_bytes), 1)
    try:
        message = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_hook=_object_hook,
            ext_hook=_refuse_ext,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit // 2,
            max_ext_len=0,
        )
    except WireError:
        raise
    except (ValueError, msgpack.UnpackException) as exc:  # msgpack's errors on malformed, truncated, oversized data
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {_short(str(exc), 120)}") from None
    if not isinstance(message, dict):
        raise WireError(f"top level must be a map, got {type(message).__name__}")
    _check_depth(message)
    kind = message.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"kind: missing or unknown kind {_short(kind)} (known: {', '.join(sorted(KINDS))})")
    _check_version(message.get("v"), versions)
    return message


# --------------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------------
class Message(BaseModel):
    """Base of the wire messages: strict types, unknown fields refused, immutable once built."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[str]

    def to_message(self) -> dict[str, Any]:
        """The message map (`kind`, `v` and the fields; arrays as they are, not copied)."""
        body: dict[str, Any] = {"kind": self.kind, "v": PROTOCOL_VERSION}
        body.update({name: getattr(self, name) for name in type(self).model_fields})
        return body


ActorId = Annotated[str, Field(pattern=ID_PATTERN, description="Actor id, [A-Za-z0-9_.-]{1,64}.")]
RunId = Annotated[
    str, Field(pattern=ID_PATTERN, description="Run id, [A-Za-z0-9_.-]{1,64}; sequences are numbered per (actor, run).")
]


class Hello(Message):
    """Actor -> learner, first message of every connection; the protocol version is the envelope's `v`."""

    kind: ClassVar[str] = "hello"
    actor_id: ActorId
    run_id: RunId
    config_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="config_hash(config_fingerprint), sha256 hex.")
    config_fingerprint: dict[str, str] = Field(
        description="Dotted config path -> canonical JSON value, for the parts both sides must agree on."
    )


class Welcome(Message):
    """Learner -> actor: the hello is accepted."""

    kind: ClassVar[str] = "welcome"
    learner_id: str = Field(pattern=ID_PATTERN, description="Learner id, [A-Za-z0-9_.-]{1,64}.")
    phase: Phase = Field(description="The learner's current phase.")
    weights_version: int = Field(ge=-1, description="Newest weights version published; -1 if none yet.")
    acked_seq: int = Field(
        ge=-1, description="Highest contiguous sequence stored durably for this (actor_id, run_id); -1 if none."
    )


class Refuse(Message):
    """Learner -> actor: the hello (or a later message) is refused; the actor must not send transitions."""

    kind: ClassVar[str] = "refuse"
    reason: str = Field(max_length=4096, description="Why, in words.")
    fields: list[str] = Field(default_factory=list, description="Dotted config paths that differ between the sides.")


class Transitions(Message):
    """Actor -> learner: `count` consecutive transitions numbered first_seq .. first_seq + count - 1.

    `arrays` holds, with n = count: `obs/<key>` and `next_obs/<key>` [n, *shape] per observation key of the
    TransitionSpec, `actions` and `bc_actions` [n, action_dim] float32 (bc_actions NaN where no BC proposal was
    made), `rewards` [n] float32, `terminated` and `truncated` [n] bool, `weights_version` [n] int64.

    On the wire (protocol 2) a next observation that is, bit for bit and for every key, the observation of the
    following transition is not sent twice: the map then carries `next_obs_shared` [n] bool (True at such rows; the
    last row is always False) and each `next_obs/<key>` holds only the other rows. Within an episode every row but
    the last is shared, which halves an image chunk. `parse` rebuilds the full arrays, so the instance always holds
    them.
    """

    kind: ClassVar[str] = "transitions"
    actor_id: ActorId
    run_id: RunId
    first_seq: int = Field(ge=0, description="Sequence number of the first transition of the chunk.")
    count: int = Field(ge=1, description="Number of transitions in the chunk.")
    arrays: dict[str, np.ndarray] = Field(description="Array name -> [count, ...] array (see the class docstring).")
    lost_before: int = Field(
        default=0,
        ge=0,
        description="Sequence numbers just before first_seq that the actor no longer holds (its spill was damaged, or "
        "it released them after an acknowledgement the learner answering now does not hold): "
        "the learner continues the stream past them instead of waiting for them. Sent only when above 0.",
    )
    # Set by `parse` for a chunk received with next_obs_shared: [count - 1] bool, True where next_obs[i] was rebuilt
    # from obs[i + 1] (so equals it bit for bit). Not a field: it says how the message travelled, not what it holds.
    _rows_continue: np.ndarray | None = PrivateAttr(default=None)

    @property
    def rows_continue(self) -> np.ndarray | None:
        """[count - 1] bool where next_obs[i] is obs[i + 1] bit for bit, when the wire said so; else None (unknown:
        compare the rows). The replay buffer takes it to keep each observation once without comparing images."""
        return self._rows_continue

    @property
    def last_seq(self) -> int:
        """Sequence number of the last transition of the chunk."""
        return self.first_seq + self.count - 1

    def to_message(self) -> dict[str, Any]:
        """The message map, with next-observation rows that repeat the following observation left out."""
        body = super().to_message()
        if not self.lost_before:
            del body["lost_before"]  # the common case reads as before
        shared = _shared_next_obs(self.arrays, self.count)
        if shared is not None:
            kept = ~shared
            body["arrays"] = {k: a[kept] if k.startswith(NEXT_OBS) else a for k, a in self.arrays.items()}
            body[NEXT_OBS_SHARED] = shared
        return body


NEXT_OBS, OBS = "next_obs/", "obs/"
NEXT_OBS_SHARED = "next_obs_shared"
# Chunks whose next observations hold fewer bytes than this are sent whole: finding and rebuilding shared rows costs
# more time than the bytes save (a 30-step state chunk: 720 bytes).
MIN_SHARED_BYTES = 4096


def _shared_next_obs(arrays: Mapping[str, Any], count: int) -> np.ndarray | None:
    """[count] bool: rows whose next observations equal the next row's observations bit for bit, every key; None
    when no row is shared (or the arrays are not of the expected form: validation refuses them elsewhere)."""
    names = [name for name in arrays if name.startswith(NEXT_OBS)]
    if count < 2 or sum(getattr(arrays[name], "nbytes", 0) for name in names) < MIN_SHARED_BYTES:
        return None
    shared = np.ones(count, bool)
    shared[-1] = False
    for name in names:
        nxt, obs = arrays[name], arrays.get(OBS + name[len(NEXT_OBS) :])
        if not isinstance(nxt, np.ndarray) or not isinstance(obs, np.ndarray):
            return None
        if nxt.shape != obs.shape or nxt.dtype != obs.dtype or nxt.shape[:1] != (count,):
            return None
        row_bytes = obs[0].nbytes
        if row_bytes:
            a = np.ascontiguousarray(nxt[:-1]).view(np.uint8).reshape(count - 1, row_bytes)
            b = np.ascontiguousarray(obs[1:]).view(np.uint8).reshape(count - 1, row_bytes)
            shared[:-1] &= (a == b).all(axis=1)
    return shared if shared.any() else None


def _expand_next_obs(fields: dict[str, Any]) -> None:
    """Rebuild the full `next_obs/<key>` arrays of a transitions map that carries `next_obs_shared` (in place)."""
    shared, count, arrays = fields.pop(NEXT_OBS_SHARED), fields.get("count"), fields.get("arrays")
    if type(count) is not int or count < 1 or not isinstance(arrays, dict):
        raise WireError("transitions.next_obs_shared: needs an integer count >= 1 and an arrays map")
    if not isinstance(shared, np.ndarray) or shared.dtype != np.bool_ or shared.shape != (count,) or shared[-1]:
        raise WireError(f"transitions.next_obs_shared: must be a bool array of shape [{count}], False at the end")
    kept = int(count - shared.sum())
    for name in [name for name in arrays if name.startswith(NEXT_OBS)]:
        sent, obs = arrays[name], arrays.get(OBS + name[len(NEXT_OBS) :])
        if not isinstance(sent, np.ndarray) or not isinstance(obs, np.ndarray) or obs.shape[:1] != (count,):
            raise WireError(f"transitions.{_name(name)}: shared rows need the matching obs array of {count} rows")
        if sent.dtype != obs.dtype or sent.shape != (kept, *obs.shape[1:]):
            raise WireError(
                f"transitions.{_name(name)}: {list(sent.shape)} {sent.dtype.name} sent, expected "
                f"{[kept, *obs.shape[1:]]} {obs.dtype.name} (the rows next_obs_shared does not cover)"
            )
        full = np.empty(obs.shape, obs.dtype)
        start = 0
        for i, row in enumerate(np.flatnonzero(~shared).tolist()):  # the rows sent; shared runs lie between them
            full[start:row] = obs[start + 1 : row + 1]  # slices, not fancy indexing: one copy per run
            full[row] = sent[i]
            start = row + 1
        full.flags.writeable = False
        arrays[name] = full


class Ack(Message):
    """Learner -> actor: everything up to acked_seq of this (actor_id, run_id) is stored durably."""

    kind: ClassVar[str] = "ack"
    actor_id: ActorId
    run_id: RunId
    acked_seq: int = Field(ge=-1, description="Highest contiguous sequence stored durably; -1 if none.")


class Weights(Message):
    """Learner -> actors: a versioned snapshot of the networks the actor needs, and the phase."""

    kind: ClassVar[str] = "weights"
    version: int = Field(ge=0, description="Weights version; transitions collected with it carry this number.")
    phase: Phase = Field(description="The learner's phase the actor should act in.")
    tensors: dict[str, np.ndarray] = Field(description="Tensor name -> array (see pack_tensors).")


class Status(Message):
    """Learner -> actors (PUB, several times a second): liveness, phase and counters, without the weights."""

    kind: ClassVar[str] = "status"
    learner_id: str = Field(pattern=ID_PATTERN, description="Learner id, [A-Za-z0-9_.-]{1,64}.")
    phase: Phase = Field(description="The learner's current phase.")
    weights_version: int = Field(ge=-1, description="Newest weights version published; -1 if none yet.")
    learner_steps: int = Field(ge=0, description="Learner steps done (UTD critic updates + 1 actor update each).")
    online_env_steps: int = Field(ge=0, description="Online transitions stored, all actors together.")
    eval_id: int = Field(ge=-1, description="While phase is eval: the evaluation asked for; -1 otherwise.")
    done: bool = Field(description="The learner has finished its run; actors should stop.")
    stopping: bool = Field(
        default=False,
        description="The learner is stopping before its run is done (a signal); `--resume` brings it back.",
    )
    online_budget: int | None = Field(
        default=None,
        ge=1,
        description="The online env steps the run collects (the learner's train.env_steps): once they are stored, "
        "actors start no further online episode while the learner finishes its learner steps and its final "
        "evaluation. None: not said.",
    )


class EvalReport(Message):
    """Actor -> learner: the result of the evaluation `eval_id` the learner asked for."""

    kind: ClassVar[str] = "eval_report"
    actor_id: ActorId
    run_id: RunId
    eval_id: int = Field(ge=0, description="The Status.eval_id this answers.")
    episodes: int = Field(ge=1, description="Evaluation episodes run.")
    success_rate: float = Field(ge=0, le=1, description="Fraction of successful episodes.")
    bc_action_fraction: float = Field(ge=0, le=1, description="Fraction of executed actions that were the BC proposal.")
    weights_version: int = Field(ge=-1, description="Weights version the evaluation ran with.")


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.kind: m for m in (Hello, Welcome, Refuse, Transitions, Ack, Weights, Status, EvalReport)
}
KINDS = frozenset(MESSAGE_TYPES)


def parse(message: Mapping[str, Any], *, versions: Collection[int] | None = None) -> Message:
    """The message instance for a decoded map (kind and version checked again); WireError naming bad fields."""
    kind = message.get("kind")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise WireError(f"kind: missing or unknown kind {_short(kind)} (known: {', '.join(sorted(KINDS))})")
    _check_version(message.get("v"), versions)
    fields = {k: v for k, v in message.items() if k not in ("kind", "v")}
    shared = None
    if kind == Transitions.kind and NEXT_OBS_SHARED in fields:
        shared = fields[NEXT_OBS_SHARED]
        _expand_next_obs(fields)  # checks `shared` first: a bool array [count], False at the end
    try:
        parsed = MESSAGE_TYPES[kind].model_validate(fields)
    except ValidationError as err:
        problems = [f"{kind}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:8]]
        raise WireError("; ".join(problems)) from None
    if isinstance(parsed, Transitions) and shared is not None:
        parsed._rows_continue = np.array(shared[:-1], dtype=bool)
    return parsed


def to_wire(message: Message) -> bytes:
    """The bytes of a message instance."""
    return encode(message.to_message())


def from_wire(
    data: bytes | bytearray | memoryview, *, max_bytes: int, versions: Collection[int] | None = None
) -> Message:
    """The message instance in `data`, or WireError (VersionError for a version other than PROTOCOL_VERSION, or
    than one of `versions` when given: the store reads logs written under earlier versions)."""
    return parse(decode(data, max_bytes=max_bytes, versions=versions), versions=versions)


# --------------------------------------------------------------------------------------------------------------------
# Multipart messages (weights)
# --------------------------------------------------------------------------------------------------------------------
_TENSOR_KEYS = frozenset({"name", "dtype", "shape"})
MAX_TENSOR_NAME = 256


# The header key listing the arrays sent in frames, per kind that travels in several frames.
_FRAMED_KEY = {"weights": "tensors", "transitions": "arrays"}


def _array_frames(kind: str, arrays: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Header entries {"name", "dtype", "shape"} and one frame (a view of the array's own memory) per array."""
    specs: list[dict[str, Any]] = []
    frames: list[memoryview] = []
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise WireError(f"{kind}.{_FRAMED_KEY[kind]}.{_name(name)}: expected an array, got {type(array).__name__}")
        wire = _wire_dtype(array.dtype)
        data = np.ascontiguousarray(array, dtype=DTYPES[wire])  # a copy only for big-endian or strided arrays
        specs.append({"name": name, "dtype": wire, "shape": list(data.shape)})
        frames.append(memoryview(data.reshape(-1).view(np.uint8)))
    return specs, frames


def to_frames(message: Message) -> list[bytes | memoryview]:
    """The frames of a message to send with `send_multipart(frames, copy=False)`.

    Weights: a msgpack header (version, phase, and per tensor its name, dtype and shape) and one frame per tensor,
    a view of the array's own memory (no copy; `pack_tensors` returns arrays that share nothing with live tensors).
    Transitions: a header (the fields, `next_obs_shared` when rows are left out, and per array its name, dtype and
    shape) and one frame per array, views where the array is contiguous. The arrays must not change until sent.
    Every other kind: the single frame `to_wire` makes.
    """
    if isinstance(message, Weights):
        specs, frames = _array_frames(Weights.kind, message.tensors)
        header = encode({"kind": Weights.kind, "version": message.version, "phase": message.phase, "tensors": specs})
        return [header, *frames]
    if isinstance(message, Transitions):
        body = message.to_message()
        specs, frames = _array_frames(Transitions.kind, body["arrays"])
        return [encode({**body, "arrays": specs}), *frames]
    return [to_wire(message)]


def _frame_buffer(frame: Any) -> memoryview:
    """A read-only byte view of one received frame (a zmq.Frame, bytes or a buffer)."""
    buffer = getattr(frame, "buffer", frame)  # zmq.Frame (recv with copy=False) exposes its memory as .buffer
    try:
        view = memoryview(buffer)
    except TypeError:
        raise WireError(f"expected a frame of bytes, got {type(frame).__name__}") from None
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view.toreadonly()


def from_frames(frames: Sequence[Any], *, max_bytes: int, versions: Collection[int] | None = None) -> Message:
    """The message in the frames of one multipart message (from `recv_multipart`, `copy=False` or not), or WireError.

    One frame: `from_wire`. Several: a weights or transitions header frame, then exactly one frame per array it
    lists, each of exactly the bytes its dtype and shape need; the frames together at most `max_bytes`. The arrays are
    read-only views over the received frames (no copy: each frame is memory of its own, not the socket's buffer).
    `versions`: as for `from_wire`.
    """
    buffers = [_frame_buffer(frame) for frame in frames]
    if not buffers:
        raise WireError("empty multipart message")
    if len(buffers) == 1:
        return from_wire(buffers[0], max_bytes=max_bytes, versions=versions)
    total = sum(b.nbytes for b in buffers)
    if total > max_bytes:
        raise WireError(f"message of {total} bytes in {len(buffers)} frames exceeds the limit of {max_bytes} bytes")
    header = decode(buffers[0], max_bytes=max_bytes, versions=versions)
    kind = header["kind"]
    key = _FRAMED_KEY.get(kind)
    if key is None:
        raise WireError(f"kind: only weights and transitions travel in several frames, got {kind} in {len(buffers)}")
    specs = header.get(key)
    if not isinstance(specs, list) or len(specs) != len(buffers) - 1:
        listed = len(specs) if isinstance(specs, list) else _short(specs)
        raise WireError(f"{kind}.{key}: the header lists {listed} arrays for {len(buffers) - 1} array frames")
    arrays: dict[str, np.ndarray] = {}
    for i, (spec, buffer) in enumerate(zip(specs, buffers[1:], strict=True)):
        if not isinstance(spec, dict) or set(spec) != _TENSOR_KEYS:
            raise WireError(f"{kind}.{key}[{i}]: must hold exactly {sorted(_TENSOR_KEYS)}, got {_short(spec)}")
        name = spec["name"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TENSOR_NAME or name in arrays:
            raise WireError(f"{kind}.{key}[{i}].name: {_short(name)} is not a new name of 1-{MAX_TENSOR_NAME} chars")
        try:
            arrays[name] = _checked_array(spec["dtype"], spec["shape"], buffer)
        except WireError as err:
            raise WireError(f"{kind}.{key}.{_name(name)} (frame {i + 1}): {err}") from None
    return parse({**header, key: arrays}, versions=versions)


# Frames kept as one byte string: FRAMES_MAGIC | frame count u32 LE | each frame's length u64 LE | the frames.
FRAMES_MAGIC = b"RRLF"  # never the first bytes of a one-frame message (a msgpack map starts 0x80-0x8f, 0xde or 0xdf)
_FRAME_COUNT = struct.Struct("<4sI")
MAX_FRAMES = 1 << 16


def joined_buffers(frames: Sequence[Any]) -> list[memoryview]:
    """The buffers whose concatenation is `join_frames(frames)`: the prefix, then the frames themselves (not copied)."""
    views = [memoryview(f).cast("B") for f in frames]
    sizes = [v.nbytes for v in views]
    prefix = _FRAME_COUNT.pack(FRAMES_MAGIC, len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)
    return [memoryview(prefix), *views]


def join_frames(frames: Sequence[Any]) -> bytes:
    """The frames of one message as one byte string (`split_frames` gives them back)."""
    return b"".join(joined_buffers(frames))


def is_joined_frames(data: bytes | memoryview) -> bool:
    """Whether `data` is a `join_frames` string rather than a one-frame message."""
    return bytes(memoryview(data)[:4]) == FRAMES_MAGIC


def from_joined(data: bytes | memoryview, *, max_bytes: int, versions: Collection[int] | None = None) -> Message:
    """The message a spill or log holds: its frames joined (`join_frames`), or one frame as earlier versions kept it."""
    if is_joined_frames(data):
        return from_frames(split_frames(data), max_bytes=max_bytes, versions=versions)
    return from_wire(data, max_bytes=max_bytes, versions=versions)


def split_frames(data: bytes | memoryview) -> list[memoryview]:
    """The frames of a `join_frames` string, as views of `data`; WireError when its layout does not hold."""
    view = _frame_buffer(data)
    if view.nbytes < _FRAME_COUNT.size or not is_joined_frames(view):
        raise WireError("joined frames: missing the RRLF prefix")
    _, count = _FRAME_COUNT.unpack_from(view)
    if not 1 <= count <= MAX_FRAMES or view.nbytes < _FRAME_COUNT.size + 8 * count:
        raise WireError(f"joined frames: {count} frames declared in {view.nbytes} bytes")
    sizes = struct.unpack_from(f"<{count}Q", view, _FRAME_COUNT.size)
    offset = _FRAME_COUNT.size + 8 * count
    if offset + sum(sizes) != view.nbytes:
        raise WireError(f"joined frames: {sum(sizes)} frame bytes declared, {view.nbytes - offset} present")
    out: list[memoryview] = []
    for size in sizes:
        out.append(view[offset : offset + size])
        offset += size
    return out


# --------------------------------------------------------------------------------------------------------------------
# Transition spec and chunk validation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransitionSpec:
    """What one transition holds: observation key -> (shape, dtype name), and the action dimension."""

    obs: dict[str, tuple[tuple[int, ...], str]]
    action_dim: int

    def arrays(self, count: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Array name -> (shape, dtype name) of a chunk of `count` transitions."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for prefix in ("obs", "next_obs"):
            for key, (shape, dtype) in self.obs.items():
                out[f"{prefix}/{key}"] = ((count, *shape), dtype)
        out["actions"] = ((count, self.action_dim), "float32")
        out["bc_actions"] = ((count, self.action_dim), "float32")
        out["rewards"] = ((count,), "float32")
        out["terminated"] = ((count,), "bool")
        out["truncated"] = ((count,), "bool")
        out["weights_version"] = ((count,), "int64")
        return out

    def transition_bytes(self) -> int:
        """Bytes of array data per transition (without msgpack framing)."""
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self.arrays(1).values())


def transition_spec_from_space(obs_space: gym.spaces.Dict, action_space: gym.spaces.Box) -> TransitionSpec:
    """The spec of an env's Dict observation space (of Boxes with wire dtypes) and 1-D Box action space."""
    from gymnasium import spaces

    if not isinstance(obs_space, spaces.Dict):
        raise ValueError(f"observation space must be a gymnasium Dict, got {type(obs_space).__name__}")
    if not isinstance(action_space, spaces.Box) or len(action_space.shape) != 1:
        raise ValueError(f"action space must be a 1-D Box, got {action_space}")
    obs: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, space in obs_space.spaces.items():
        if not isinstance(space, spaces.Box):
            raise ValueError(f"observation {key!r} must be a Box, got {type(space).__name__}")
        if not _OBS_KEY.match(key):
            raise ValueError(f"observation key {key!r} must match {_OBS_KEY.pattern}")
        if space.dtype is None or np.dtype(space.dtype).name not in _DTYPE_BY_NAME:
            raise ValueError(f"observation {key!r} has dtype {space.dtype}, not sent on the wire")
        obs[key] = (tuple(int(d) for d in space.shape), np.dtype(space.dtype).name)
    if not obs:
        raise ValueError("observation space is empty")
    return TransitionSpec(obs=obs, action_dim=int(action_space.shape[0]))


# RobotEnv's state observation (STATE_OBS_KEY): the 6-vector pose relative to the reference, float32.
STATE_OBS_DIM = 6


def transition_spec(cfg: RunConfig) -> TransitionSpec:
    """The spec of the env `cfg.env` describes, known without building it.

    The state vector of RobotEnv plus, per camera, an `out_size` x `out_size` x 3 uint8 RGB image under the camera's
    name (the layout `Camera.read()` returns).
    """
    from robot_rl.hardware.safety import ACTION_DIM

    obs: dict[str, tuple[tuple[int, ...], str]] = {STATE_OBS_KEY: ((STATE_OBS_DIM,), "float32")}
    for camera in cfg.env.cameras:  # names checked by EnvConfig: none is the state's, none repeats
        obs[camera.name] = ((camera.out_size, camera.out_size, 3), "uint8")
    return TransitionSpec(obs=obs, action_dim=ACTION_DIM)


def _check_array(name: str, array: Any, shape: tuple[int, ...], dtype: str) -> None:
    if not isinstance(array, np.ndarray):
        raise WireError(f"transitions.{name}: expected an array, got {type(array).__name__}")
    if array.dtype.name != dtype:
        raise WireError(f"transitions.{name}: dtype {array.dtype.name}, expected {dtype}")
    if array.shape != shape:
        raise WireError(f"transitions.{name}: shape {list(array.shape)}, expected {list(shape)}")


def check_transition_values(arrays: Mapping[str, np.ndarray]) -> None:
    """WireError unless observations, actions and rewards are finite, bc_actions rows all finite or all NaN and weights
    versions >= -1: the learner checks each chunk with it, the actor each transition before sending it."""
    for name, array in arrays.items():
        if array.dtype.kind == "f" and name != "bc_actions" and not np.isfinite(array).all():
            raise WireError(f"transitions.{name}: holds non-finite values")
    bc = arrays["bc_actions"]
    finite, nan = np.isfinite(bc), np.isnan(bc)
    if not (finite | nan).all() or not (finite.all(axis=-1) | nan.all(axis=-1)).all():
        raise WireError("transitions.bc_actions: each row must be all finite or all NaN (no infinities)")
    if arrays["weights_version"].size and int(arrays["weights_version"].min()) < -1:
        raise WireError("transitions.weights_version: versions must be >= -1")


def validate_transitions(msg: Transitions, spec: TransitionSpec, *, max_count: int = DEFAULT_MAX_CHUNK) -> None:
    """Refuse (WireError naming the field) a chunk whose arrays do not match `spec` and `msg.count` exactly.

    Checks count <= max_count, the exact set of array names, every dtype and shape, finite observations, actions and
    rewards, bc_actions rows all finite or all NaN, and weights versions >= -1 (-1: collected without learner weights).
    """
    if msg.count > max_count:
        raise WireError(f"transitions.count: {msg.count} exceeds the chunk limit of {max_count}")
    expected = spec.arrays(msg.count)
    missing = sorted(set(expected) - set(msg.arrays))
    if missing:
        raise WireError(f"transitions.{missing[0]}: missing (missing arrays: {', '.join(missing)})")
    unexpected = sorted(set(msg.arrays) - set(expected))
    if unexpected:
        raise WireError(f"transitions.{_name(unexpected[0])}: unexpected array")
    for name, (shape, dtype) in expected.items():
        _check_array(name, msg.arrays[name], shape, dtype)
    check_transition_values(msg.arrays)


# --------------------------------------------------------------------------------------------------------------------
# Config fingerprint
# --------------------------------------------------------------------------------------------------------------------
# The config fields both sides must agree on, as {section: {field: sub-selection or True}}. True takes the whole
# subtree. Everything else (seed, train.*, bc/qest/agent training budgets and learning rates, expert, operator,
# franka connection, camera serials/recordings/fps/freshness) is local to one side and may differ.
_FINGERPRINT_FIELDS: dict[str, Any] = {
    "env": {
        # What the world is and how an action moves the robot: the meaning of observations, actions and rewards.
        "robot": True,
        "task": True,
        "action": True,
        "safety": True,
        "impedance": True,
    },
    "agent": {
        # Network shapes the weights must fit, and everything the actor's Q-gating reads from the config.
        "method": True,
        "hidden": True,
        "num_critics": True,
        "layer_norm": True,
        "encoder": True,
        "reward_scale": True,
        "reward_bias": True,
        "discount": True,
        "clip_values": True,
        "rl_action": True,
        "bc_action": True,
    },
    # The BC policy's network shape (its weights reach the actor for the BC proposal and Q^_BC).
    "bc": {"policy": True, "hidden": True, "num_modes": True, "min_std": True, "encoder": True},
    # alpha of Q^_BC, which the actor evaluates when it gates.
    "qest": {"alpha": True},
}
# Per camera (keyed by its name): what the image shows and its size; not serial, recording, fps or freshness.
_CAMERA_FIELDS = ("width", "height", "crop", "out_size")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}", child, out)
    else:
        out[prefix] = _canonical(value)


def _select(prefix: str, tree: dict[str, Any], selection: dict[str, Any], out: dict[str, str]) -> None:
    for key, sub in selection.items():
        path = f"{prefix}.{key}" if prefix else key
        if sub is True:
            _flatten(path, tree[key], out)
        else:
            _select(path, tree[key], sub, out)


def config_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """Dotted field path -> canonical JSON value, for the parts of the config actor and learner must agree on.

    Included: the env's world and action mapping (env.robot, env.task.*, env.action.*, env.safety.*,
    env.impedance.*), per camera env.cameras.<name>.{width,height,crop.*,out_size}, the observation spec
    (obs.<key> -> [shape, dtype], action_dim), the network shapes the weights must fit (agent.hidden,
    agent.num_critics, agent.layer_norm, bc.policy, bc.hidden, bc.num_modes, bc.min_std), and what defines the
    learning problem and the actor's gating (agent.method, agent.reward_scale, agent.reward_bias, agent.discount,
    agent.clip_values, agent.rl_action, agent.bc_action, qest.alpha). Excluded, because each side may differ without
    changing what transitions and weights mean: seed, train.*, training budgets, batch sizes and learning rates,
    expert.*, env.operator, env.franka (connection), camera serials, recordings, fps and freshness.
    """
    tree = json.loads(cfg.model_dump_json())
    out: dict[str, str] = {}
    _select("", tree, _FINGERPRINT_FIELDS, out)
    for camera in tree["env"]["cameras"]:
        for name in _CAMERA_FIELDS:
            _flatten(f"env.cameras.{camera['name']}.{name}", camera[name], out)
    spec = transition_spec(cfg)
    for key, (shape, dtype) in spec.obs.items():
        out[f"obs.{key}"] = _canonical([list(shape), dtype])
    out["action_dim"] = _canonical(spec.action_dim)
    return dict(sorted(out.items()))


def config_hash(fingerprint: Mapping[str, str]) -> str:
    """sha256 hex of the fingerprint's canonical JSON."""
    return hashlib.sha256(_canonical(dict(fingerprint)).encode()).hexdigest()


def diff_fingerprints(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """Sorted dotted paths whose values differ, a path present on one side only included."""
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def describe_differences(a: Mapping[str, str], b: Mapping[str, str], a_name: str, b_name: str) -> list[str]:
    """diff_fingerprints for people: a camera only one side has is one entry, `env.cameras.<name> (only <side's
    name>)`, instead of each of its fields."""
    cameras = [{key.split(".")[2] for key in side if key.startswith("env.cameras.")} for side in (a, b)]
    out: list[str] = []
    for field in diff_fingerprints(a, b):
        name = field.split(".")[2] if field.startswith("env.cameras.") else None
        if name is not None and name in cameras[0] ^ cameras[1]:
            entry = f"env.cameras.{name} (only {a_name if name in cameras[0] else b_name})"
            if entry not in out:
                out.append(entry)
            continue
        out.append(field)
    return out


def _listed(fields: list[str], shown: int = 20) -> str:
    """The first `shown` fields, comma-separated, and how many more there are."""
    return ", ".join(fields[:shown]) + (f" and {len(fields) - shown} more" if len(fields) > shown else "")


def saved_config_differences(saved: Path, fingerprint: Mapping[str, str]) -> str:
    """The fields (at most 20, comma-separated; empty when none) in which a run directory's saved config.yaml differs
    from a config with this fingerprint, in the parts actor and learner agree on; ConfigError when it cannot be read."""
    return _listed(
        describe_differences(config_fingerprint(load_config(saved)), fingerprint, "the run's", "the config's")
    )


def check_hello(hello: Hello, fingerprint: Mapping[str, str], *, unchecked: Collection[str] = ()) -> Refuse | None:
    """The Refuse for a hello whose config disagrees with this side's fingerprint, or None when it agrees.

    Keys in `unchecked` are left out of the hello's fingerprint before comparing (what this side has no value for:
    a learner without a BC policy does not check the actor's)."""
    if config_hash(hello.config_fingerprint) != hello.config_hash:
        return Refuse(reason="config_hash does not match the config_fingerprint sent with it", fields=[])
    theirs = {k: v for k, v in hello.config_fingerprint.items() if k not in unchecked}
    if config_hash(theirs) == config_hash(fingerprint):
        return None
    fields = diff_fingerprints(fingerprint, theirs)
    described = describe_differences(fingerprint, theirs, "the learner's", "the actor's")
    reason = f"config differs from the learner's in: {_listed(described)}"
    if any(field.startswith("bc.weights") for field in fields):
        reason += " (bc.weights: the actor's --bc policy is not the learner's)"
    return Refuse(reason=reason, fields=fields)


# --------------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------------
def pack_tensors(
    state: Mapping[str, torch.Tensor], *, into: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Tensor name -> CPU numpy array for a Weights message: a snapshot that shares no memory with `state`.

    The snapshot matters because `to_frames` sends the arrays' memory without copying it, after this call returns,
    while the learner goes on updating its parameters. `into`: the arrays of an earlier snapshot that nothing reads
    any more (ZeroMQ has sent them); a tensor of the same shape and dtype is copied into its array instead of new
    memory, which a large snapshot would otherwise fault in page by page. float16 and bfloat16 travel as float32
    (exact: every value is representable) and `load_state_dict` casts them back; other dtypes must be wire dtypes
    (float32, float64, int32, int64, uint8, bool, uint16), else WireError.
    """
    import torch

    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        dtype = _numpy_dtypes().get(t.dtype)
        if dtype is None:
            raise WireError(f"tensor {name!r}: dtype {tensor.dtype} is not sent on the wire")
        old = into.get(name) if into is not None else None
        if old is not None and old.shape == tuple(t.shape) and old.dtype == dtype and old.flags.writeable:
            target = old
        else:
            target = np.empty(tuple(t.shape), dtype)
        if t.device.type == "cpu":
            np.copyto(target, t.numpy())  # one plain memcpy (torch's copy spreads over threads, slow on a busy box)
        else:
            torch.from_numpy(target).copy_(t)  # straight from the device into the snapshot
        out[name] = target
    return out


def unpack_tensors(arrays: Mapping[str, np.ndarray], *, copy: bool = True) -> dict[str, torch.Tensor]:
    """Tensor name -> CPU tensor for each array of a Weights message.

    copy=True: writable tensors of their own. copy=False: tensors over the arrays' memory (none is copied unless it
    is big-endian), for a caller that only reads them, such as `load_state_dict`, which copies into the parameters;
    writing to them is not allowed (the arrays of a received message are read-only).
    """
    import torch

    torch_dtypes = {np_dtype: t for t, np_dtype in _numpy_dtypes().items()}
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor over read-only memory read-only; the caller only reads these.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray) or array.dtype.name not in _DTYPE_BY_NAME:
                raise WireError(f"weights.tensors.{_name(name)}: not an array of a wire dtype")
            native = array.dtype.newbyteorder("=")
            if copy or array.dtype != native or array.size == 0:
                out[name] = torch.from_numpy(np.array(array, dtype=native, copy=True))
            elif array.flags.writeable:
                out[name] = torch.from_numpy(array)
            else:
                flat = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                out[name] = torch.frombuffer(flat, dtype=torch_dtypes[native]).view(array.shape)
    return out


@functools.cache
def _numpy_dtypes() -> dict[Any, np.dtype]:
    """torch dtype -> the (native-order) numpy dtype it travels as."""
    import torch

    pairs = {torch.float32: "<f4", torch.float64: "<f8", torch.int32: "<i4", torch.int64: "<i8", torch.uint8: "|u1"}
    pairs |= {torch.bool: "|b1", torch.uint16: "<u2"}
    return {t: DTYPES[w].newbyteorder("=") for t, w in pairs.items()}
