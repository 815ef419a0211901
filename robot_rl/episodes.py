"""Episode files in robomimic's HDF5 layout (design §9).

Demonstrations, rollout logs and the learner's persisted buffer share one format, written with h5py so that we
do not depend on robomimic itself (it drags in a CUDA torch and an old numpy):

    data                       attrs: total (int, sum of num_samples), env_args (JSON string)
    data/demo_<i>              attrs: num_samples (int) + the episode's own attrs
    data/demo_<i>/obs/<key>        (T, ...)  any numeric dtype (images stay uint8)
    data/demo_<i>/next_obs/<key>   (T, ...)
    data/demo_<i>/actions          (T, A)    float32
    data/demo_<i>/rewards          (T,)      float32, the raw env reward (the learner transforms it)
    data/demo_<i>/dones            (T,)      int64 0/1 = terminated | truncated (robomimic's field)
    data/demo_<i>/terminated       (T,)      bool, ours: a terminal step (success): no bootstrap
    data/demo_<i>/truncated        (T,)      bool, ours: the step limit: bootstrap
    data/demo_<i>/extras/<name>    (T, ...)  ours: gating record, robot state, timestamps, weights version

`dones` alone cannot tell a success from a time-out, and swapping the two breaks the TD target (design §5), so
the two flags are stored next to it; a file from another tool, without them, is read as robomimic reads it (see
`iter_episodes`). A demo without `num_samples` is one whose writer died mid-episode (crash,
SIGKILL, Ctrl-C): readers take it up to the shortest length of its datasets, i.e. up to the last flushed step.

An episode ended by a robot or camera fault (`EpisodeStream.end(fault=...)`) is `interrupted` and carries attr
`fault`, a JSON object (as `env_args` is): where it struck (`during` reset or step, `step`), the error's type and
message, and what the arm was sent in the step it cut short: the `action` and the `command` (world pose x, y, z,
qw, qx, qy, qz; null when unknown). That step is in no dataset: it has no next observation, so it can never
become a transition. An episode that faulted before its first step (at reset) has no demo (readers would trip over
an empty one); its attrs are kept in a group outside `data`, which robomimic and `read_episodes` never look at:

    episodes_without_steps/demo_<i>   attrs: the episode's own, `interrupted`, `fault` (read_episodes_without_steps)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np

AttrValue = str | int | float | bool
# Per streamed dataset: the shape of one row and its dtype, fixed by the first step.
_Spec = dict[str, tuple[tuple[int, ...], np.dtype]]

DEMO_PREFIX = "demo_"
# Root group (outside `data`) holding the attrs of episodes that faulted before their first step.
WITHOUT_STEPS = "episodes_without_steps"
# The episode attr holding its fault record (JSON), see EpisodeFault.
FAULT_ATTR = "fault"
_DEMO_NAME = re.compile(r"^demo_(\d+)$")
# Attributes the writer owns; an episode may not set them itself.
_RESERVED_ATTRS = frozenset({"num_samples"})
# The members of a robomimic demo that hold observations.
_OBS_PREFIXES = ("obs/", "next_obs/")
# Tells a read of one demo what it skipped, ignored (with the datasets' names) or derived: see _NOTE_TEXT.
_Note = Callable[..., None]
# Dtype kinds (numpy `dtype.kind`) accepted per field: b bool, i int, u unsigned, f float.
_NUMERIC_KINDS = "biuf"
# Target bytes per chunk of a streamed dataset: a few images per chunk, hundreds of scalars.
_CHUNK_BYTES = 256 * 1024
_MAX_CHUNK_ROWS = 1024
# Superblock v0: a file whose writer was killed opens again without `h5clear` (the v3 superblock that
# libver="latest" writes keeps a "file open for write" flag that a crash leaves set).
_LIBVER = "earliest"

log = logging.getLogger(__name__)


class EpisodeFileError(ValueError):
    """An episode file that cannot be read or appended to; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------------------
# The in-memory episode
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeFault:
    """A robot or camera fault that ended an episode, and what the arm had been sent in the step it cut short.

    `during` is "reset" or "step"; `step` the index of the step it struck in (0 at reset): the steps before it are
    in the log, that one is not (no next observation). `action` is the action of that step (None at reset);
    `command` the world pose commanded to the arm in that step or reset (x, y, z, qw, qx, qy, qz), None when the
    fault struck before anything was commanded or when it is not known.
    """

    during: Literal["reset", "step"]
    step: int
    error: str
    message: str
    action: tuple[float, ...] | None = None
    command: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.during not in ("reset", "step"):
            raise ValueError(f"fault: during must be 'reset' or 'step', got {self.during!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"fault: step must be an int >= 0, got {self.step!r}")
        for name in ("error", "message"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"fault: {name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("action", "command"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _fault_vector(name, value))

    @classmethod
    def from_error(
        cls,
        error: BaseException,
        *,
        during: Literal["reset", "step"],
        step: int,
        action: Any = None,
        command: Any = None,
    ) -> EpisodeFault:
        """The record of `error`, named by its type."""
        return cls(
            during=during, step=step, error=type(error).__name__, message=str(error), action=action, command=command
        )

    def to_attr(self) -> str:
        """The JSON text stored in attr `fault`: strict JSON, a non-finite number as the string "NaN", "Infinity"
        or "-Infinity" (which strict JSON tools read, where a bare NaN is refused)."""
        fields = ("during", "step", "error", "message", "action", "command")
        record = {name: getattr(self, name) for name in fields}
        for name in ("action", "command"):
            if record[name] is not None:
                record[name] = [x if math.isfinite(x) else json.dumps(x) for x in record[name]]
        return json.dumps(record, allow_nan=False)

    @classmethod
    def from_attr(cls, text: Any) -> EpisodeFault:
        """Parses attr `fault`; ValueError saying what is wrong with it."""
        try:
            value = json.loads(text)
            fields = {k: value[k] for k in ("during", "step", "error", "message")}
            vectors = {name: _numbers(value.get(name)) for name in ("action", "command")}
            return cls(**fields, **vectors)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"attr {FAULT_ATTR!r} is not a fault record ({type(err).__name__}: {err})") from None

    def describe(self) -> str:
        """One line: where it struck and the error."""
        where = "at reset" if self.during == "reset" else f"in step {self.step}"
        return f"faulted {where}: {self.error}: {self.message}"


def fault_of(attrs: Mapping[str, Any]) -> EpisodeFault | None:
    """The fault record of an episode's attrs (an Episode's, or one of `read_episodes_without_steps`), if any."""
    text = attrs.get(FAULT_ATTR)
    return None if text is None else EpisodeFault.from_attr(text)


def _numbers(value: Any) -> Any:
    """A vector of a fault record as written by to_attr: the strings "NaN", "Infinity", "-Infinity" as floats."""
    if not isinstance(value, list):
        return value
    return [float(x) if x in ("NaN", "Infinity", "-Infinity") else x for x in value]


def _fault_vector(name: str, value: Any) -> tuple[float, ...]:
    # NaN is kept (as extras keep it): the record says what the arm was sent, even a policy's NaN action.
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros((0, 0))
    if arr.ndim != 1:
        raise ValueError(f"fault: {name} must be a vector of numbers, got {value!r}")
    return tuple(float(v) for v in arr)


@dataclass(eq=False, repr=False)
class Episode:
    """One episode, every array with the same first dimension T >= 1.

    `rewards` is the raw env reward. `terminated` is true only on a terminal step (success: no bootstrap) and
    `truncated` only on a step-limit step (bootstrap); only the last step may carry either. `extras` holds
    per-step records (each (T, ...), numeric or bool; NaN allowed there, e.g. a Q-value that was not
    computed). `attrs` is per-episode metadata. Arrays are converted on construction: actions and rewards to
    float32, flags to bool.
    """

    obs: dict[str, np.ndarray]
    next_obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, AttrValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.actions = _float_array("actions", self.actions, ndim=2)
        self.rewards = _float_array("rewards", self.rewards, ndim=1)
        self.terminated = _bool_array("terminated", self.terminated)
        self.truncated = _bool_array("truncated", self.truncated)
        self.obs = _obs_dict("obs", self.obs)
        self.next_obs = _obs_dict("next_obs", self.next_obs)
        self.extras = _extras_dict(self.extras)
        self.attrs = _clean_attrs(self.attrs)
        _check_obs_pair(self.obs, self.next_obs)
        _check_lengths(self._arrays())
        _check_flags(self.terminated, self.truncated)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def __repr__(self) -> str:
        # Shapes, not contents: an image episode would print megabytes.
        obs = {k: f"{v.dtype}{list(v.shape[1:])}" for k, v in self.obs.items()}
        return (
            f"Episode(T={len(self)}, obs={obs}, action_dim={self.actions.shape[1]}, "
            f"terminated={bool(self.terminated[-1])}, truncated={bool(self.truncated[-1])}, "
            f"extras={sorted(self.extras)}, attrs={self.attrs})"
        )

    @property
    def dones(self) -> np.ndarray:
        """robomimic's `dones`: (T,) bool, terminated | truncated."""
        return self.terminated | self.truncated

    @property
    def success(self) -> bool:
        """The episode ended on a terminal step with a positive raw reward (sparse success reward)."""
        return bool(self.terminated[-1] and self.rewards[-1] > 0)

    @property
    def fault(self) -> EpisodeFault | None:
        """The robot or camera fault that ended the episode (attr `fault`), None when none did."""
        return fault_of(self.attrs)

    def _arrays(self) -> dict[str, np.ndarray]:
        """Every array under its path inside a demo group."""
        return _flatten_episode(self)


def _flatten_episode(ep: Episode) -> dict[str, np.ndarray]:
    arrays = {f"obs/{k}": v for k, v in ep.obs.items()}
    arrays.update({f"next_obs/{k}": v for k, v in ep.next_obs.items()})
    arrays.update(actions=ep.actions, rewards=ep.rewards, terminated=ep.terminated, truncated=ep.truncated)
    arrays.update({f"extras/{k}": v for k, v in ep.extras.items()})
    return arrays


def _float_array(name: str, value: Any, *, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    _check_finite(name, arr)
    return arr


def _bool_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    # Only real booleans: a float or int array here is more likely a mix-up (e.g. rewards) than a flag.
    if arr.dtype.kind != "b":
        raise ValueError(f"{name} must be bool, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must have 1 dimension, got shape {arr.shape}")
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} has a non-finite value (first at index {tuple(int(i) for i in bad)})")


def _check_name(what: str, name: Any) -> str:
    # Keys become HDF5 member names: a "/" would silently create nested groups.
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{what} name {name!r} must be a non-empty string without '/'")
    return name


def _numeric_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"{name} must have a leading time dimension, got shape {arr.shape}")
    return arr


def _obs_dict(group: str, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not obs:
        raise ValueError(f"{group} must have at least one key")
    out: dict[str, np.ndarray] = {}
    for key, value in obs.items():
        name = f"{group}/{_check_name(group, key)}"
        arr = _numeric_array(name, value)
        _check_finite(name, arr)
        out[key] = arr
    return out


def _extras_dict(extras: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: _numeric_array(f"extras/{_check_name('extras', k)}", v) for k, v in extras.items()}


def _check_obs_pair(obs: dict[str, np.ndarray], next_obs: dict[str, np.ndarray]) -> None:
    if set(obs) != set(next_obs):
        raise ValueError(f"obs keys {sorted(obs)} differ from next_obs keys {sorted(next_obs)}")
    for key, arr in obs.items():
        other = next_obs[key]
        if arr.shape[1:] != other.shape[1:] or arr.dtype != other.dtype:
            raise ValueError(
                f"obs/{key} is {arr.dtype}{list(arr.shape[1:])} per step but next_obs/{key} is "
                f"{other.dtype}{list(other.shape[1:])}"
            )


def _check_lengths(arrays: Mapping[str, np.ndarray]) -> None:
    lengths = {name: arr.shape[0] for name, arr in arrays.items()}
    t = lengths["actions"]
    if t < 1:
        raise ValueError("an episode needs at least one step")
    wrong = {name: n for name, n in lengths.items() if n != t}
    if wrong:
        raise ValueError(f"every array needs {t} steps (as actions); these differ: {wrong}")


def _check_flags(terminated: np.ndarray, truncated: np.ndarray) -> None:
    for name, flags in (("terminated", terminated), ("truncated", truncated)):
        if flags[:-1].any():
            step = int(np.flatnonzero(flags[:-1])[0])
            raise ValueError(f"{name} is set at step {step}; only the last step may end the episode")


def _clean_attrs(attrs: Mapping[str, Any]) -> dict[str, AttrValue]:
    out: dict[str, AttrValue] = {}
    for key, value in attrs.items():
        _check_name("attribute", key)
        if key in _RESERVED_ATTRS:
            raise ValueError(f"attribute {key!r} is set by the writer")
        out[key] = _attr_value(key, value)
    return out


def _attr_value(key: str, value: Any) -> AttrValue:
    # numpy scalars (as h5py returns them) become plain Python values, so attrs compare and serialise simply.
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"attribute {key!r} must be str, int, float or bool, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"attribute {key!r} is not finite: {value}")
    return value


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


class EpisodeWriter:
    """Writes episodes to one file; a context manager.

    `mode="w"` creates or truncates the file; `mode="a"` appends, numbering after the existing demos, and
    refuses a file whose `env_args` differ. On append, demos left unfinished by a killed writer are sealed
    first (cut to their flushed length, `num_samples` set, attr `interrupted=True`; empty ones removed) so the
    file stays readable by robomimic. Whole episodes go through `add_episode`; live logging through
    `begin_episode` (see `EpisodeStream`).

        with EpisodeWriter("log.hdf5", {"env_name": "peg", "type": 4, "env_kwargs": {}}) as w:
            w.add_episode(ep)

    robomimic itself reads `env_args` as `{"env_name", "type", "env_kwargs"}`; other keys are kept as given.
    """

    def __init__(
        self,
        path: str | Path,
        env_args: Mapping[str, Any],
        *,
        mode: Literal["w", "a"] = "w",
        flush_every: int = 10,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self.flush_every = flush_every
        env_json = _env_args_json(env_args)
        self._file = _open_for_write(self.path, mode)
        self._stream: EpisodeStream | None = None
        try:
            self._data = self._file.require_group("data")
            _set_or_check_env_args(self._data, env_json, self.path)
            _seal_interrupted(self._data)
            self._next_index = _next_demo_index(self._data)
            self._total = _total_samples(self._data)
            self._data.attrs["total"] = self._total
            self._file.flush()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def num_episodes(self) -> int:
        """Demos in the file, the open stream included."""
        return len(self._data)

    def add_episode(self, episode: Episode) -> int:
        """Writes a whole episode, flushes, and returns its index i (the group is `data/demo_<i>`)."""
        index = self._take_index()
        group = self._data.create_group(f"{DEMO_PREFIX}{index}")
        for name, arr in _flatten_episode(episode).items():
            group.create_dataset(name, data=arr)
        group.create_dataset("dones", data=episode.dones.astype(np.int64))
        group.attrs.update(episode.attrs)
        self._seal(group, len(episode))
        return index

    def begin_episode(self, attrs: Mapping[str, Any] | None = None) -> EpisodeStream:
        """Starts a streamed episode; append steps to the returned handle and `end()` it."""
        if self._stream is not None:
            raise RuntimeError(f"{self.path}: episode {self._stream.index} is still open; end() it first")
        clean = _clean_attrs(attrs or {})
        index = self._take_index()
        group = self._data.create_group(f"{DEMO_PREFIX}{index}")
        group.attrs.update(clean)
        self._file.flush()
        self._stream = EpisodeStream(self, group, index)
        return self._stream

    def set_file_attrs(self, **attrs: AttrValue) -> None:
        """Set attributes of the file's `data` group (what wrote it and how far it got), flushed at once."""
        for name, value in attrs.items():
            self._data.attrs[name] = value
        self._file.flush()

    def close(self) -> None:
        """Ends an open stream (marked `interrupted`) and closes the file; safe to call twice."""
        if not self._file.id.valid:
            return
        try:
            if self._stream is not None:
                self._stream.end(interrupted=True)
        finally:
            self._file.close()

    def _take_index(self) -> int:
        if not self._file.id.valid:
            raise RuntimeError(f"{self.path}: the writer is closed")
        index = self._next_index
        self._next_index += 1
        return index

    def _seal(self, group: h5py.Group, num_samples: int) -> None:
        # num_samples last: its presence is what says the demo is complete.
        group.attrs["num_samples"] = num_samples
        self._total += num_samples
        self._data.attrs["total"] = self._total
        self._file.flush()

    def _stream_ended(self, group: h5py.Group, steps: int) -> None:
        if steps == 0 and FAULT_ATTR in group.attrs:
            # Faulted before its first step: no empty demo for readers to trip over, but its record is kept.
            self._file.require_group(WITHOUT_STEPS)
            self._file.move(group.name, f"{WITHOUT_STEPS}/{group.name.rsplit('/', 1)[-1]}")
            self._file.flush()
        elif steps == 0:
            # Nothing was recorded: no empty demo for readers to trip over.
            del self._data[group.name.rsplit("/", 1)[-1]]
            self._file.flush()
        else:
            self._seal(group, steps)
        self._stream = None

    def _flush(self) -> None:
        self._file.flush()


class EpisodeStream:
    """A live episode: each `append` records one step; every `flush_every` steps they reach the file.

    Steps wait in memory between flushes and the file is not touched at all in between, so a writer killed at
    any moment other than during a flush leaves a consistent file holding every step up to the last flush. The
    first step fixes the keys, shapes and dtypes of the episode; later steps must match.
    """

    def __init__(self, writer: EpisodeWriter, group: h5py.Group, index: int) -> None:
        self._writer = writer
        self._group = group
        self.index = index
        self._spec: _Spec | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._written = 0
        self._ended_on_done = False
        self._open = True

    def __enter__(self) -> EpisodeStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:
            self.end(interrupted=exc_type is not None)

    @property
    def num_steps(self) -> int:
        """Steps appended so far, flushed or not."""
        return self._written + len(self._pending)

    def append(
        self,
        *,
        obs: Mapping[str, Any],
        action: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        next_obs: Mapping[str, Any],
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        """Records one step. Keyword-only: terminated and truncated must never be swapped."""
        if not self._open:
            raise RuntimeError(f"{self._writer.path}: episode {self.index} has ended")
        if self._ended_on_done:
            raise RuntimeError(f"{self._writer.path}: episode {self.index} ended (terminated or truncated); call end()")
        row = _step_row(obs, action, reward, terminated, truncated, next_obs, extras or {})
        self._spec = _check_step_spec(self._spec, row)
        self._pending.append(row)
        self._ended_on_done = bool(terminated or truncated)
        if len(self._pending) >= self._writer.flush_every:
            self.flush()

    def flush(self) -> None:
        """Writes the steps waiting in memory and flushes the file."""
        if not self._pending:
            return
        start, stop = self._written, self._written + len(self._pending)
        for name, (shape, dtype) in (self._spec or {}).items():
            rows = np.stack([row[name] for row in self._pending]).astype(dtype, copy=False)
            ds = self._group[name] if name in self._group else _create_stream_dataset(self._group, name, shape, dtype)
            ds.resize(stop, axis=0)
            ds[start:stop] = rows
        self._pending.clear()
        self._written = stop
        self._writer._flush()

    def end(self, *, interrupted: bool = False, fault: EpisodeFault | None = None) -> int:
        """Flushes, sets `num_samples` and returns the step count; an episode with no steps is removed.

        `fault`: a robot or camera fault ended the episode; it is recorded (attr `fault`, the episode `interrupted`),
        and an episode without steps is then kept under `episodes_without_steps/` instead of being removed."""
        if not self._open:
            return self._written
        self._open = False
        self.flush()
        if fault is not None:
            self._group.attrs[FAULT_ATTR] = fault.to_attr()
        if fault is not None or (interrupted and self._written):
            self._group.attrs["interrupted"] = True
        self._writer._stream_ended(self._group, self._written)
        return self._written


def _step_row(
    obs: Mapping[str, Any],
    action: Any,
    reward: float,
    terminated: bool,
    truncated: bool,
    next_obs: Mapping[str, Any],
    extras: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """One step as the rows of each dataset, validated like an Episode of length 1."""
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    one = Episode(
        obs={k: np.asarray(v)[None] for k, v in obs.items()},
        next_obs={k: np.asarray(v)[None] for k, v in next_obs.items()},
        actions=np.asarray(action)[None],
        rewards=np.array([_real("reward", reward)], dtype=np.float32),
        terminated=np.array([terminated], dtype=bool),
        truncated=np.array([truncated], dtype=bool),
        extras={k: np.asarray(v)[None] for k, v in extras.items()},
    )
    row = {name: arr[0] for name, arr in _flatten_episode(one).items()}
    row["dones"] = np.int64(terminated or truncated)
    return row


def _real(name: str, value: Any) -> float:
    # An int reward (0 or 1) is a fine float; a string, an array or a bool is a mix-up.
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_step_spec(spec: _Spec | None, row: dict[str, np.ndarray]) -> _Spec:
    new = {name: (arr.shape, arr.dtype) for name, arr in row.items()}
    if spec is None:
        return new
    if set(new) != set(spec):
        raise ValueError(
            f"step fields changed: missing {sorted(set(spec) - set(new))}, new {sorted(set(new) - set(spec))}"
        )
    for name, (shape, dtype) in spec.items():
        got_shape, got_dtype = new[name]
        if got_shape != shape or not np.can_cast(got_dtype, dtype, casting="same_kind"):
            raise ValueError(f"{name} was {dtype}{list(shape)} in the first step, now {got_dtype}{list(got_shape)}")
    return spec


def _create_stream_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    row_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    rows = int(np.clip(_CHUNK_BYTES // row_bytes, 1, _MAX_CHUNK_ROWS))
    return group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), chunks=(rows, *shape), dtype=dtype)


def _env_args_json(env_args: Mapping[str, Any]) -> str:
    if not isinstance(env_args, Mapping):
        raise TypeError(f"env_args must be a dict, got {type(env_args).__name__}")
    try:
        return json.dumps(dict(env_args), indent=4)
    except (TypeError, ValueError) as err:
        raise ValueError(f"env_args must be JSON-serialisable: {err}") from err


def _open_for_write(path: Path, mode: str) -> h5py.File:
    if mode == "a" and path.exists() and not h5py.is_hdf5(path):
        raise EpisodeFileError(f"{path}: not an HDF5 file; refusing to append to it")
    try:
        return h5py.File(path, mode, libver=_LIBVER)
    except OSError as err:
        raise EpisodeFileError(f"{path}: cannot open for writing ({err})") from err


def _set_or_check_env_args(data: h5py.Group, env_json: str, path: Path) -> None:
    if "env_args" not in data.attrs:
        data.attrs["env_args"] = env_json
        return
    existing = _parse_env_args(data.attrs["env_args"], path)
    wanted = json.loads(env_json)
    if existing != wanted:
        keys = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
        raise EpisodeFileError(f"{path}: env_args differ from the file's in {keys}; refusing to mix them")


def _seal_interrupted(data: h5py.Group) -> None:
    for name in [n for n in data if _DEMO_NAME.match(n)]:
        group = data[name]
        if not isinstance(group, h5py.Group) or "num_samples" in group.attrs:
            continue
        datasets = _datasets(group)
        steps = min((ds.shape[0] for ds in datasets.values()), default=0)
        if steps == 0:
            del data[name]
            continue
        for ds in datasets.values():
            _cut_dataset(group, ds, steps)
        group.attrs["interrupted"] = True
        group.attrs["num_samples"] = steps


def _cut_dataset(group: h5py.Group, ds: h5py.Dataset, steps: int) -> None:
    if ds.shape[0] == steps:
        return
    if ds.maxshape[0] is None:
        ds.resize(steps, axis=0)
        return
    # Not resizable (a whole-episode write cut short): rewrite the kept rows.
    name, kept = ds.name, ds[:steps]
    del group.file[name]
    group.file.create_dataset(name, data=kept)


def _total_samples(data: h5py.Group) -> int:
    return sum(int(g.attrs.get("num_samples", 0)) for g in data.values() if isinstance(g, h5py.Group))


def _next_demo_index(data: h5py.Group) -> int:
    # Episodes kept without steps hold their index too: numbers stay unique within the file.
    without_steps = data.file.get(WITHOUT_STEPS)
    names = [*data, *(without_steps if isinstance(without_steps, h5py.Group) else ())]
    indices = [int(m.group(1)) for m in map(_DEMO_NAME.match, names) if m]
    return max(indices, default=-1) + 1


def _datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """Every dataset under a demo group, by its path relative to the group."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    group.visititems(visit)
    return found


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


def iter_episodes(
    path: str | Path, *, limit: int | None = None, warn: Callable[[str], None] | None = None
) -> Iterator[Episode]:
    """Yields the episodes of a file in index order; the file stays open while the iterator lives.

    A demo without `num_samples` (its writer died) is read up to the shortest length of its datasets and gets
    attr `interrupted=True`; one with nothing flushed is skipped, as is a demo with no steps. A demo from another
    tool (robomimic's fields alone, no `terminated`) is read as robomimic reads it: members other than `obs`,
    `next_obs`, `actions`, `rewards` and `dones` (robomimic's `states`, `action_dict`, ...) are ignored, a missing
    `next_obs` is taken from the following step's `obs` (the last step's from its own), and the episode ends at
    its last step, terminal when `dones` is set there (robomimic also sets `dones` on every step after a success).
    Whatever was skipped, ignored or derived is told to `warn` (default: a logged warning) once per file, after
    the last episode. Raises EpisodeFileError naming file and demo.
    """
    path = Path(path)
    notes = _ReadNotes()
    with _reading(path) as f:
        data = _data_group(f, path)
        count = 0
        for name in _demo_names(data, path):
            if limit is not None and count >= limit:
                break
            episode = _read_demo(data[name], f"{path}: {name}", notes.of(name))
            if episode is not None:
                count += 1
                yield episode
    notes.tell(path, warn or log.warning)


def read_episodes(
    path: str | Path, *, limit: int | None = None, warn: Callable[[str], None] | None = None
) -> list[Episode]:
    """All episodes of a file (the first `limit` when given), see `iter_episodes`."""
    return list(iter_episodes(path, limit=limit, warn=warn))


class _ReadNotes:
    """What a read skipped, ignored or derived, per kind, with the demos it concerns (told once per file)."""

    def __init__(self) -> None:
        self.demos: dict[str, list[str]] = {}
        self.ignored: set[str] = set()

    def of(self, demo: str) -> _Note:
        def note(kind: str, names: Iterable[str] = ()) -> None:
            self.demos.setdefault(kind, []).append(demo)
            self.ignored.update(names)

        return note

    def tell(self, path: Path, warn: Callable[[str], None]) -> None:
        for kind, demos in self.demos.items():
            warn(f"{path}: {_NOTE_TEXT[kind].format(ignored=sorted(self.ignored))} ({_demo_list(demos)})")


_NOTE_TEXT = {
    "empty": "skipped demos with no steps",
    "cut": "demos whose writer died before it sealed them (no num_samples) read up to their last whole step, as "
    "interrupted",
    "ignored": "ignored datasets robot_rl does not use: {ignored}",
    "no_next_obs": "no next_obs: each step's next_obs taken from the following step's obs, the last step's from "
    "its own obs",
    "early_dones": "dones set before the last step (robomimic marks every step after a success): each such demo "
    "is read whole, ending at its last step",
}


def _demo_list(demos: list[str]) -> str:
    return ", ".join(demos) if len(demos) <= 5 else f"{', '.join(demos[:3])}, ... {len(demos)} demos in all"


def first_episode_kind(path: str | Path) -> str | None:
    """The `kind` attr of a file's first episode, read without its datasets (None: no episode, or none set)."""
    path = Path(path)
    with _reading(path) as f:
        data = _data_group(f, path)
        names = _demo_names(data, path)
        kind = data[names[0]].attrs.get("kind") if names else None
    return kind.decode() if isinstance(kind, bytes) else kind


def read_episodes_without_steps(path: str | Path) -> list[dict[str, AttrValue]]:
    """The attrs of the episodes of a file that faulted before their first step (a reset that faulted), in index
    order; `fault_of(attrs)` is the fault. Empty for a file that has none (every file `read_episodes` reads)."""
    path = Path(path)
    with _reading(path) as f:
        _data_group(f, path)
        group = f.get(WITHOUT_STEPS)
        if group is None:
            return []
        if not isinstance(group, h5py.Group):
            raise EpisodeFileError(f"{path}: {WITHOUT_STEPS} is not a group")
        names = [n for n in group if _DEMO_NAME.match(n) and isinstance(group[n], h5py.Group)]
        try:
            return [_clean_attrs(group[n].attrs) for n in sorted(names, key=lambda n: int(n[len(DEMO_PREFIX) :]))]
        except ValueError as err:
            raise EpisodeFileError(f"{path}: {WITHOUT_STEPS}: {err}") from err


# Set by `robot-rl collect` on its file: how many demonstrations it was asked for, and True once it wrote them all.
COLLECT_REQUESTED, COLLECT_FINISHED = "collect_requested", "collect_finished"


def collect_shortfall(path: str | Path, episodes: int) -> str | None:
    """Why a demonstrations file holding `episodes` is short of what `robot-rl collect` was asked for (it was stopped
    before it finished), or None: it finished, or the file did not come from `collect`."""
    path = Path(path)
    with _reading(path) as f:
        data = _data_group(f, path)
        requested, finished = data.attrs.get(COLLECT_REQUESTED), data.attrs.get(COLLECT_FINISHED)
    if requested is None or finished is None or bool(finished):  # another writer's file, or a finished collect
        return None
    try:
        requested = int(requested)
    except (TypeError, ValueError):
        return None
    return (
        f"{path}: `robot-rl collect` was stopped before it finished: the file holds {episodes} of the {requested} "
        "demonstrations it was asked for"
    )


def read_env_args(path: str | Path) -> dict[str, Any]:
    """The file's `data.attrs['env_args']`, parsed from JSON."""
    path = Path(path)
    with _reading(path) as f:
        data = _data_group(f, path)
        if "env_args" not in data.attrs:
            raise EpisodeFileError(f"{path}: data group has no env_args attribute")
        return _parse_env_args(data.attrs["env_args"], path)


def _parse_env_args(raw: Any, path: Path) -> dict[str, Any]:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as err:
        raise EpisodeFileError(f"{path}: env_args is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise EpisodeFileError(f"{path}: env_args is JSON but not an object: {value!r}")
    return value


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[h5py.File]:
    """The file open for reading; an error HDF5 raises while it is read (a damaged file: its structure, attributes or
    data) becomes an EpisodeFileError naming the file, like one raised while opening it."""
    with _open_for_read(path) as f:
        try:
            yield f
        except EpisodeFileError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
            raise EpisodeFileError(f"{path}: damaged, cannot be read ({type(err).__name__}: {err})") from err


def _open_for_read(path: Path) -> h5py.File:
    if not path.exists():
        raise EpisodeFileError(f"{path}: no such file")
    if path.is_dir():
        raise EpisodeFileError(f"{path}: is a directory, not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise EpisodeFileError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if "unable to lock file" in str(err):  # HDF5's lock: a writer (an actor recording it, say) has it open
            raise EpisodeFileError(
                f"{path}: another process has it open for writing (an actor still recording this episode?); read "
                "it when that process is done, or read a copy of it"
            ) from err
        raise EpisodeFileError(f"{path}: cannot be opened as HDF5 ({err})") from err


def _data_group(f: h5py.File, path: Path) -> h5py.Group:
    data = f.get("data")
    if not isinstance(data, h5py.Group):
        raise EpisodeFileError(f"{path}: no 'data' group (not an episode file in robomimic's layout)")
    return data


def _demo_names(data: h5py.Group, path: Path) -> list[str]:
    names = list(data)
    odd = [n for n in names if not _DEMO_NAME.match(n) or not isinstance(_member(data, n, path), h5py.Group)]
    if odd:
        raise EpisodeFileError(f"{path}: data holds members that are not demo_<i> groups: {odd}")
    # Numeric order, as robomimic sorts them (demo_10 after demo_9).
    return sorted(names, key=lambda n: int(n[len(DEMO_PREFIX) :]))


def _member(data: h5py.Group, name: str, path: Path) -> h5py.Group | h5py.Dataset:
    """data[name]; EpisodeFileError naming the file and the demo when HDF5 cannot open it (a damaged object header,
    a link to nothing)."""
    try:
        return data[name]
    except (KeyError, OSError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        raise EpisodeFileError(f"{path}: {name} cannot be opened, the file is damaged ({detail})") from err


def _read_demo(group: h5py.Group, where: str, note: _Note = lambda kind, names=(): None) -> Episode | None:
    sealed = "num_samples" in group.attrs
    if not sealed and not _has_required_members(group):
        # Its writer died before the first flush completed: nothing to read.
        return None
    foreign = _from_another_tool(group)
    datasets = _demo_datasets(group, where)
    ignored = _robomimic_extra_members(datasets) if foreign else set()
    datasets = {name: ds for name, ds in datasets.items() if name not in ignored}
    steps = _demo_length(group, datasets, where)
    if steps == 0:
        if sealed:  # an unsealed one is a writer that died before its first step: nothing to say
            note("empty")
        return None
    if ignored:
        note("ignored", ignored)
    arrays = {}
    for name, ds in datasets.items():
        try:
            arrays[name] = ds[:steps]
        except OSError as err:  # a damaged chunk (a torn copy, a bad disk): HDF5 meets it only when reading it
            raise EpisodeFileError(f"{where}: {name} cannot be read, the file is damaged ({err})") from err
    attrs = {k: v for k, v in group.attrs.items() if k not in _RESERVED_ATTRS}
    if not sealed:
        attrs["interrupted"] = True
        note("cut")
    try:
        if foreign:
            arrays = _robomimic_arrays(arrays, note)
        return _episode_from_arrays(arrays, attrs)
    except ValueError as err:
        raise EpisodeFileError(f"{where}: {err}") from err


def _has_required_members(group: h5py.Group) -> bool:
    try:
        _demo_datasets(group, "")
    except EpisodeFileError:
        return False
    return True


def _from_another_tool(group: h5py.Group) -> bool:
    """A demo without our `terminated` flags: written by robomimic or another tool, read as robomimic reads it."""
    return not isinstance(group.get("terminated"), h5py.Dataset)


def _demo_datasets(group: h5py.Group, where: str) -> dict[str, h5py.Dataset]:
    foreign = _from_another_tool(group)
    for member in ("obs",) if foreign else ("obs", "next_obs"):  # robomimic's own files may lack next_obs
        if not isinstance(group.get(member), h5py.Group):
            raise EpisodeFileError(f"{where}: missing the '{member}' group")
    for member in ("actions", "rewards"):
        if not isinstance(group.get(member), h5py.Dataset):
            raise EpisodeFileError(f"{where}: missing the '{member}' dataset")
    if foreign and not isinstance(group.get("dones"), h5py.Dataset):
        raise EpisodeFileError(f"{where}: missing both 'terminated' and 'dones'")
    try:
        return _datasets(group)
    except (KeyError, OSError, RuntimeError) as err:  # HDF5 cannot open a member: a damaged object header
        detail = " ".join(str(err).split())
        raise EpisodeFileError(f"{where}: a member cannot be opened, the file is damaged ({detail})") from err


def _robomimic_extra_members(datasets: dict[str, h5py.Dataset]) -> set[str]:
    """The datasets of a robomimic demo that robot_rl does not read (`states`, `action_dict/...`)."""
    return {n for n in datasets if n not in ("actions", "rewards", "dones") and not n.startswith(_OBS_PREFIXES)}


def _robomimic_arrays(arrays: dict[str, np.ndarray], note: _Note) -> dict[str, np.ndarray]:
    """A robomimic demo's arrays as ours: next_obs from the following obs when it has none, and the flags of an
    episode that ends at its last step (terminal there when `dones` is set)."""
    dones = arrays.pop("dones")
    if dones.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"dones must be numeric, got dtype {dones.dtype}")
    if not any(name.startswith("next_obs/") for name in arrays):
        note("no_next_obs")
        for name in [n for n in arrays if n.startswith("obs/")]:
            obs = arrays[name]
            arrays["next_obs/" + name[len("obs/") :]] = np.concatenate([obs[1:], obs[-1:]])
    if np.any(dones[:-1] != 0):
        note("early_dones")
    arrays["terminated"] = np.zeros(len(dones), dtype=bool)
    arrays["terminated"][-1] = dones[-1] != 0
    return arrays


def _demo_length(group: h5py.Group, datasets: dict[str, h5py.Dataset], where: str) -> int:
    lengths = {name: (ds.shape[0] if ds.shape else 0) for name, ds in datasets.items()}
    if "num_samples" not in group.attrs:
        # Cut short by a crash: datasets were flushed together, so the shortest one marks the last whole step.
        return min(lengths.values())
    raw = group.attrs["num_samples"]
    value = np.asarray(raw)
    whole = value.ndim == 0 and value.dtype.kind in "iuf" and np.isfinite(value) and value >= 0 and value == int(value)
    if not whole:
        raise EpisodeFileError(f"{where}: num_samples must be a whole number of steps, got {raw!r}")
    steps = int(value)
    wrong = {name: n for name, n in lengths.items() if n != steps}
    if wrong:
        raise EpisodeFileError(f"{where}: num_samples is {steps} but these datasets differ in length: {wrong}")
    return steps


def _episode_from_arrays(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Episode:
    dones = arrays.pop("dones", None)
    if dones is not None and dones.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"dones must be numeric, got dtype {dones.dtype}")
    arrays.setdefault("truncated", np.zeros_like(arrays["terminated"], dtype=bool))
    episode = Episode(
        obs=_subgroup(arrays, "obs"),
        next_obs=_subgroup(arrays, "next_obs"),
        actions=arrays.pop("actions"),
        rewards=arrays.pop("rewards"),
        terminated=arrays.pop("terminated"),
        truncated=arrays.pop("truncated"),
        extras=_subgroup(arrays, "extras"),
        attrs=attrs,
    )
    if arrays:
        raise ValueError(f"unexpected datasets {sorted(arrays)}")
    if dones is not None and not np.array_equal(dones != 0, episode.dones):
        raise ValueError("dones disagrees with terminated | truncated")
    return episode


def _subgroup(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    keys = [name for name in arrays if name.startswith(prefix + "/")]
    return {name[len(prefix) + 1 :]: arrays.pop(name) for name in keys}


# ------------------------------------------------------------------------------------------------------------
# Flattening for the buffer
# ------------------------------------------------------------------------------------------------------------


def episodes_to_transitions(episodes: Iterable[Episode]) -> dict[str, np.ndarray]:
    """Concatenates episodes into flat transition arrays, N = total steps, in episode then step order.

    Keys: `obs/<key>` and `next_obs/<key>` (N, ...); `actions` (N, A) float32; `rewards` (N,) float32 raw;
    `terminated`, `truncated` (N,) bool; `extras/<name>` (N, ...); `episode_index` (N,) int64, the position of
    the step's episode in `episodes`; `step_index` (N,) int64, the step within its episode. Every episode must
    have the same keys; a ValueError names the first that differs.
    """
    episodes = list(episodes)
    if not episodes:
        raise ValueError("episodes_to_transitions needs at least one episode")
    flats = [_flatten_episode(ep) for ep in episodes]
    keys = set(flats[0])
    for i, flat in enumerate(flats[1:], start=1):
        if set(flat) != keys:
            extra, missing = sorted(set(flat) - keys), sorted(keys - set(flat))
            raise ValueError(
                f"episode {i} has fields episode 0 lacks ({', '.join(extra) or 'none'}) and lacks fields it has "
                f"({', '.join(missing) or 'none'}): episodes recorded with different settings; keep them in "
                "separate files"
            )
    out = {name: np.concatenate([flat[name] for flat in flats]) for name in flats[0]}
    out["episode_index"] = np.concatenate([np.full(len(ep), i, dtype=np.int64) for i, ep in enumerate(episodes)])
    out["step_index"] = np.concatenate([np.arange(len(ep), dtype=np.int64) for ep in episodes])
    return out
