"""Replay buffer of dict observations (state vectors and camera images) that stores each observation once.

Rewards are stored raw (the env's sparse 0/1); the agent transforms them when it learns, so the same buffer serves
every reward scale. `bc_actions` holds the BC proposal made at each state (for the auxiliary BC loss); it is NaN
where no BC proposal exists (demonstrations of a method without BC, plain SAC).

Storage. Within an episode a transition's `next_obs` is the next transition's `obs`; storing both would hold every
camera image twice. The buffer keeps one FIFO ring of observation *frames* (a frame holds every observation key) and,
per transition, the id of its `next_obs` frame; its `obs` is always the frame written just before (frame id - 1):

    frames:  o0  o1  o2  o3 | r0  o4  o5      (| an episode boundary: the reset observation r0 is a new frame)
    next:        1   2   3        5   6       (transition i reads frames next-1 and next)

A chunk's row shares the previous row's `next_obs` frame when its `obs` is bit for bit equal to it (every key), and
a chunk's first row shares the last frame of the previous call the same way. Sharing is decided by equality alone,
so it is never wrong: chunks of different actors interleaved, or an episode boundary, just store a new frame.

Capacity. The transition ring holds `capacity` transitions; the frame ring holds `capacity + capacity // 4 +
frame_slack` frames (64 by default), enough for `capacity` transitions when episodes are at least 4 steps long and
their chunks arrive in order. Transitions leave in FIFO order, and leave early, before the transition ring is full,
when a new frame would overwrite a frame that a live transition still reads: with poor sharing (two frames per
transition, e.g. chunks of several actors interleaved step by step) `size` stays near half the frame ring.

Memory. Arrays are allocated with np.zeros, so pages the ring has not reached yet cost no memory.

On the learner's GPU. `ReplayBuffer(..., device="cuda")` keeps a copy of every array in that device's memory,
written together with the host arrays, and `take_tensors` / `sample_tensors` gather minibatches there: a learner step
of the image config then moves a few kilobytes of indices to the GPU instead of gathering, pinning and copying its
~87 MB of images on the host. The host arrays stay the buffer of record (`take`, persistence); the copy is only read.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

from robot_rl.config import AgentConfig, ConfigError, TrainConfig
from robot_rl.obs import ObsSpec, check_spec

FRAME_SLACK = 64
"""Frames the frame ring holds beyond capacity * 1.25 by default (the window's edges, small buffers)."""

# A replay buffer may take at most this fraction of the memory available when it is made: the rest is for the
# networks, the transition log's page cache and the other processes.
MEMORY_FRACTION = 0.8


def buffer_bytes(capacity: int, obs_spec: ObsSpec, action_dim: int, *, frame_slack: int = FRAME_SLACK) -> int:
    """Bytes a ReplayBuffer of these sizes holds once full: its observation frames and its per-transition arrays."""
    frames = capacity + capacity // 4 + frame_slack
    frame_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in obs_spec.values())
    per_transition = 8 + 2 * 4 * action_dim + 4 + 1 + 1  # next-frame id, actions, BC actions, reward, two flags
    return frames * frame_bytes + capacity * per_transition


def available_memory_bytes() -> int | None:
    """Memory this process may still use: MemAvailable (Linux), lowered to the room left under a cgroup v2 limit (a
    container's); None where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if limit != "max":
            room = max(int(limit) - current, 0)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def check_buffer_memory(
    capacity: int,
    obs_spec: ObsSpec,
    action_dim: int,
    *,
    available: int | None = None,
    setting: str = "train.buffer_capacity",
) -> None:
    """ConfigError when a buffer of `capacity` transitions would need more than MEMORY_FRACTION of the memory
    available (measured unless given): found at start, not hours later when the filling buffer is killed for memory.
    The message says how much it needs and a capacity that fits."""
    available = available_memory_bytes() if available is None else available
    needed = buffer_bytes(capacity, obs_spec, action_dim)
    if available is None or needed <= MEMORY_FRACTION * available:
        return
    fits = int(capacity * MEMORY_FRACTION * available / needed)
    fits = fits // 1000 * 1000 if fits >= 2000 else fits
    raise ConfigError(
        f"{setting}={capacity} needs {needed / 2**30:.1f} GiB for the replay buffer, more than "
        f"{MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GiB this machine has available: lower it, e.g. "
        f"--set {setting}={max(fits, 1)}, or run where there is more memory"
    )


def replay_device(
    device: torch.device,
    on_gpu: bool,
    needed_bytes: int,
    *,
    free_bytes: int | None = None,
    setting: str = "train.replay_on_gpu",
) -> torch.device | None:
    """Where a learner keeps its buffers' device copy: `device` when it is CUDA and `on_gpu`, else None (host only).
    ConfigError when the copy (`needed_bytes`, e.g. buffer_bytes of each buffer) would take more than MEMORY_FRACTION
    of the GPU memory free now (measured unless given)."""
    if device.type != "cuda" or not on_gpu:
        return None
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    if needed_bytes > MEMORY_FRACTION * free:
        raise ConfigError(
            f"{setting}: the replay buffer's GPU copy needs {needed_bytes / 2**30:.1f} GiB, more than "
            f"{MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on {device}: lower train.buffer_capacity or "
            f"--set {setting}=false (sampling in host memory, see train.prefetch)"
        )
    return device


def learner_buffer(cfg: TrainConfig, obs_spec: ObsSpec, action_dim: int, device: torch.device) -> ReplayBuffer:
    """A learner loop's replay buffer (`robot-rl train`, the learner service): train.buffer_capacity transitions,
    with a copy on `device` where replay_device puts one; ConfigError at start when it would not fit in host memory
    (check_buffer_memory) or on the GPU."""
    check_buffer_memory(cfg.buffer_capacity, obs_spec, action_dim)
    needed = buffer_bytes(cfg.buffer_capacity, obs_spec, action_dim)
    copy_on = replay_device(device, cfg.replay_on_gpu, needed)
    return ReplayBuffer(cfg.buffer_capacity, obs_spec, action_dim, device=copy_on)


@dataclass(frozen=True)
class TransitionBatch:
    """A minibatch as numpy arrays; shapes [B, ...]."""

    obs: dict[str, np.ndarray]  # key -> [B, *shape] in the spec's dtype
    actions: np.ndarray  # [B, A] float32
    rewards: np.ndarray  # [B] float32, the raw env reward
    next_obs: dict[str, np.ndarray]
    terminated: np.ndarray  # [B] bool
    bc_actions: np.ndarray  # [B, A] float32, NaN rows where no BC proposal exists


@dataclass(frozen=True)
class _Rows:
    """The rows of one add_many call: as given (bc_actions may be None), then validated (ReplayBuffer._validated)."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: dict[str, np.ndarray]
    terminated: np.ndarray
    truncated: np.ndarray
    bc_actions: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)

    def slice(self, lo: int, hi: int) -> _Rows:
        def cut(value: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
            return {k: v[lo:hi] for k, v in value.items()} if isinstance(value, dict) else value[lo:hi]

        return _Rows(**{f.name: cut(getattr(self, f.name)) for f in fields(_Rows)})


def _bits(array: np.ndarray) -> np.ndarray:
    """The array viewed as unsigned integers of its item size, so that equality is bit for bit (-0.0 != 0.0)."""
    return array.view(f"u{array.dtype.itemsize}")


def _rows_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    """[n] bool: row i of `a` equals row i of `b` in every key."""
    equal = np.ones(len(next(iter(a.values()))), bool)
    for key, rows in a.items():
        equal &= (_bits(rows) == _bits(b[key])).all(axis=tuple(range(1, rows.ndim)))
    return equal


class ReplayBuffer:
    """FIFO buffer of transitions whose observations live once in a ring of frames (see the module docstring).

    Not thread-safe: a thread that samples while another adds must share a lock with it (robot_rl.prefetch).
    """

    def __init__(
        self,
        capacity: int,
        obs_spec: ObsSpec,
        action_dim: int,
        *,
        frame_slack: int = FRAME_SLACK,
        device: torch.device | str | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if action_dim < 1:
            raise ValueError(f"action_dim must be positive, got {action_dim}")
        if frame_slack < 2:
            raise ValueError(f"frame_slack must be at least 2 (one transition's two frames), got {frame_slack}")
        self.capacity = capacity
        self.obs_spec = check_spec(obs_spec)
        self.action_dim = action_dim
        self.frame_capacity = capacity + capacity // 4 + frame_slack
        self._frames = {
            k: np.zeros((self.frame_capacity, *shape), dtype) for k, (shape, dtype) in self.obs_spec.items()
        }
        self._next_frame = np.zeros(capacity, np.int64)  # global frame id of next_obs; obs is id - 1
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.bc_actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.truncated = np.zeros(capacity, np.bool_)
        self._start = 0  # ring position of the oldest live transition
        self._last_frame = -1  # global id of the newest frame written; frame f lives in slot f % frame_capacity
        self.size = 0
        self.total_added = 0
        self._copy = None if device is None else _DeviceCopy(self, torch.device(device))

    @property
    def device(self) -> torch.device | None:
        """The device holding a copy of the buffer (take_tensors / sample_tensors gather there); None: host only."""
        return None if self._copy is None else self._copy.device

    def __len__(self) -> int:
        return self.size

    def frames_stored(self) -> int:
        """Observation frames the live transitions read (each holds every key): size + 1 for one shared episode."""
        if self.size == 0:
            return 0
        return int(self._next_frame[self._pos(self.size - 1)] - self._next_frame[self._start]) + 2

    # ----------------------------------------------------------------------------------------------------------------
    # Adding
    # ----------------------------------------------------------------------------------------------------------------
    def add(
        self,
        *,
        obs: Mapping[str, np.ndarray],
        action: np.ndarray,
        reward: float,
        next_obs: Mapping[str, np.ndarray],
        terminated: bool,
        truncated: bool,
        bc_action: np.ndarray | None = None,
    ) -> None:
        """One transition of unbatched arrays (obs[key] has the spec's shape)."""
        self.add_many(
            obs=_one_row(obs, "obs"),
            actions=np.asarray(action)[None],
            rewards=np.asarray([reward]),
            next_obs=_one_row(next_obs, "next_obs"),
            terminated=np.asarray([terminated]),
            truncated=np.asarray([truncated]),
            bc_actions=None if bc_action is None else np.asarray(bc_action)[None],
        )

    def add_many(
        self,
        *,
        obs: Mapping[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: Mapping[str, np.ndarray],
        terminated: np.ndarray,
        truncated: np.ndarray,
        bc_actions: np.ndarray | None = None,
        continues: np.ndarray | None = None,
    ) -> None:
        """n transitions in time order (arrays [n, ...]); the arrays are copied, so the caller may reuse them.

        `continues`, when the caller knows it: [n - 1] bool, True where next_obs[i] is bit for bit obs[i + 1] (every
        key), as the wire knows it for a chunk whose next observations it sent once. It spares comparing the rows; a
        wrong hint costs memory (a frame kept twice) or, worse, a wrong next observation, so pass only what is known.
        """
        raw = _Rows(obs, actions, rewards, next_obs, terminated, truncated, bc_actions)
        rows = self._validated(raw)
        n = len(rows)
        if continues is not None:
            continues = np.asarray(continues)
            if continues.dtype != np.bool_ or continues.shape != (max(n - 1, 0),):
                raise ValueError(
                    f"continues must be a bool array of shape [{max(n - 1, 0)}], got {continues.dtype} "
                    f"{list(continues.shape)}"
                )
        self.total_added += n
        # Rows beyond the last `capacity` would be overwritten within this call; a piece of at most `piece` rows
        # writes fewer frames than the frame ring holds, so it never overwrites its own frames.
        piece = (self.frame_capacity - 1) // 2
        for lo in range(max(0, n - self.capacity), n, piece):
            hi = min(n, lo + piece)
            self._append(rows.slice(lo, hi), None if continues is None else continues[lo : hi - 1])

    def _append(self, rows: _Rows, continues: np.ndarray | None = None) -> None:
        n = len(rows)
        shares_last = self._last_frame >= 0 and self._equals_frame(rows.obs, self._last_frame)
        if continues is None:
            obs, nxt = rows.obs, rows.next_obs
            continues = _rows_equal({k: v[1:] for k, v in obs.items()}, {k: v[:-1] for k, v in nxt.items()})
        new_obs = np.concatenate([[not shares_last], ~continues])
        # Frames in order: for each row its obs frame where it is new, then its next_obs frame.
        frames_per_row = new_obs.astype(np.int64) + 1
        next_ids = self._last_frame + np.cumsum(frames_per_row)
        self._evict(incoming=n, last_new_frame=int(next_ids[-1]))
        obs_slots, next_slots = (next_ids[new_obs] - 1) % self.frame_capacity, next_ids % self.frame_capacity
        obs_rows = {key: rows.obs[key][new_obs] for key in self._frames}
        for key, frames in self._frames.items():
            frames[obs_slots] = obs_rows[key]
            frames[next_slots] = rows.next_obs[key]
        pos = self._pos(self.size + np.arange(n))
        self._next_frame[pos] = next_ids
        self.actions[pos] = rows.actions
        self.rewards[pos] = rows.rewards
        self.terminated[pos] = rows.terminated
        self.truncated[pos] = rows.truncated
        self.bc_actions[pos] = rows.bc_actions
        if self._copy is not None:
            self._copy.write(obs_slots, obs_rows, next_slots, rows, pos)
        self.size += n
        self._last_frame = int(next_ids[-1])

    def _evict(self, *, incoming: int, last_new_frame: int) -> None:
        """Drop the oldest transitions so that `incoming` more fit and no live one reads a frame about to be reused.

        Writing frame f reuses the slot of frame f - frame_capacity, so every live obs frame must be newer than
        last_new_frame - frame_capacity. Frame ids grow with the transition order, so the transitions to drop are
        a prefix, found by bisection.
        """
        oldest_kept_next = last_new_frame - self.frame_capacity + 2  # obs frame = next - 1 must stay
        stale = bisect.bisect_left(
            range(self.size), oldest_kept_next, key=lambda k: int(self._next_frame[self._pos(k)])
        )
        drop = max(stale, self.size + incoming - self.capacity, 0)
        self._start = int(self._pos(drop))
        self.size -= drop

    def _equals_frame(self, obs: dict[str, np.ndarray], frame: int) -> bool:
        slot = frame % self.frame_capacity
        return all(np.array_equal(_bits(obs[k][0]), _bits(frames[slot])) for k, frames in self._frames.items())

    # ----------------------------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------------------------
    def _validated(self, raw: _Rows) -> _Rows:
        """The rows as arrays of the stored dtypes; ValueError naming the first field (and key) that is not valid."""
        actions = np.asarray(raw.actions, np.float32)
        n = len(actions) if actions.ndim else 0
        _check_shape("actions", actions, (n, self.action_dim))
        _check_finite("actions", actions)
        rewards = np.asarray(raw.rewards, np.float32)
        _check_shape("rewards", rewards, (n,))
        _check_finite("rewards", rewards)
        flags = {"terminated": np.asarray(raw.terminated), "truncated": np.asarray(raw.truncated)}
        for name, flag in flags.items():
            _check_shape(name, flag, (n,))
            if flag.dtype != np.bool_ and not np.isin(flag, (0, 1)).all():
                raise ValueError(f"{name} must be bool (or 0/1), got {flag.dtype} values outside 0/1")
        if raw.bc_actions is None:
            bc = np.full((n, self.action_dim), np.nan, np.float32)
        else:
            bc = np.asarray(raw.bc_actions, np.float32)
            _check_shape("bc_actions", bc, (n, self.action_dim))
            if not (np.isfinite(bc).all(axis=1) | np.isnan(bc).all(axis=1)).all():
                raise ValueError("bc_actions rows must be all finite, or all NaN where no BC proposal exists")
        return _Rows(
            obs=self._checked_obs("obs", raw.obs, n),
            actions=actions,
            rewards=rewards,
            next_obs=self._checked_obs("next_obs", raw.next_obs, n),
            terminated=flags["terminated"].astype(np.bool_),
            truncated=flags["truncated"].astype(np.bool_),
            bc_actions=bc,
        )

    def _checked_obs(self, name: str, obs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        if not isinstance(obs, Mapping):
            raise ValueError(f"{name} must be a dict of arrays with keys {sorted(self.obs_spec)}, got {type(obs)}")
        if set(obs) != set(self.obs_spec):
            raise ValueError(f"{name} has keys {sorted(obs)}, expected {sorted(self.obs_spec)}")
        checked = {}
        for key, (shape, dtype) in self.obs_spec.items():
            array = np.asarray(obs[key])
            _check_shape(f"{name}[{key!r}]", array, (n, *shape))
            if array.dtype != dtype:
                raise ValueError(f"{name}[{key!r}] has dtype {array.dtype}, expected {dtype}")
            if array.dtype.kind == "f":
                _check_finite(f"{name}[{key!r}]", array)
            checked[key] = array
        return checked

    # ----------------------------------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, rng: np.random.Generator) -> TransitionBatch:
        """`batch_size` live transitions drawn uniformly with replacement."""
        return self.take(self._draw(batch_size, rng))

    def sample_tensors(self, batch_size: int, rng: np.random.Generator) -> dict:
        """As `sample` (the same draws from `rng`), gathered on the buffer's device: a TensorBatch as
        robot_rl.prefetch.to_tensors makes. Only for a buffer made with a device."""
        return self.take_tensors(self._draw(batch_size, rng))

    def _draw(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        return rng.integers(0, self.size, size=batch_size)

    def take_tensors(self, idx: np.ndarray) -> dict:
        """As `take`, as tensors gathered on the buffer's device (dtypes kept, images uint8); only the indices cross
        from the host. Only for a buffer made with a device."""
        if self._copy is None:
            raise ValueError("take_tensors needs a buffer made with a device (ReplayBuffer(..., device=...))")
        return self._copy.gather(*self._slots(idx))

    def take(self, idx: np.ndarray) -> TransitionBatch:
        """The transitions at `idx` in [0, size), 0 being the oldest live one; the arrays are copies."""
        pos, obs_slots, next_slots = self._slots(idx)
        return TransitionBatch(
            obs={k: frames[obs_slots] for k, frames in self._frames.items()},
            actions=self.actions[pos],
            rewards=self.rewards[pos],
            next_obs={k: frames[next_slots] for k, frames in self._frames.items()},
            terminated=self.terminated[pos],
            bc_actions=self.bc_actions[pos],
        )

    def _slots(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ring positions, obs frame slots and next_obs frame slots of the transitions at `idx` (checked)."""
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"idx must hold integers, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"idx must lie in [0, {self.size}), got [{idx.min()}, {idx.max()}]")
        pos = self._pos(idx)
        next_slots = self._next_frame[pos] % self.frame_capacity
        return pos, (next_slots - 1) % self.frame_capacity, next_slots

    def _pos(self, k: int | np.ndarray) -> int | np.ndarray:
        """Ring position of the k-th oldest live transition."""
        return (self._start + k) % self.capacity


class _DeviceCopy:
    """A ReplayBuffer's arrays in a torch device's memory, written with the host arrays (same slots, same order)."""

    def __init__(self, buffer: ReplayBuffer, device: torch.device) -> None:
        self.device = device

        def like(array: np.ndarray) -> torch.Tensor:
            return torch.zeros(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=device)

        self.frames = {key: like(frames) for key, frames in buffer._frames.items()}
        self.actions, self.bc_actions = like(buffer.actions), like(buffer.bc_actions)
        self.rewards, self.terminated = like(buffer.rewards), like(buffer.terminated)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device. To a GPU it goes through pinned memory without waiting: a pageable copy would make
        the host wait for every update queued on the GPU (torch keeps the pinned block until the copy has run)."""
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # e.g. decoded from the wire; torch warns on read-only memory
            array = array.copy()
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def write(
        self,
        obs_slots: np.ndarray,
        obs_rows: dict[str, np.ndarray],
        next_slots: np.ndarray,
        rows: _Rows,
        pos: np.ndarray,
    ) -> None:
        # No slot repeats within one call (a piece writes fewer frames than the ring holds), so the order of the
        # scattered writes cannot matter.
        obs_at, next_at, pos_at = (self._tensor(a) for a in (obs_slots, next_slots, pos))
        for key, frames in self.frames.items():
            frames[obs_at] = self._tensor(obs_rows[key])
            frames[next_at] = self._tensor(rows.next_obs[key])
        self.actions[pos_at] = self._tensor(rows.actions)
        self.bc_actions[pos_at] = self._tensor(rows.bc_actions)
        self.rewards[pos_at] = self._tensor(rows.rewards)
        self.terminated[pos_at] = self._tensor(rows.terminated)

    def gather(self, pos: np.ndarray, obs_slots: np.ndarray, next_slots: np.ndarray) -> dict:
        pos_at, obs_at, next_at = self._tensor(np.stack([pos, obs_slots, next_slots]).astype(np.int64))
        return {
            "obs": {key: frames[obs_at] for key, frames in self.frames.items()},
            "next_obs": {key: frames[next_at] for key, frames in self.frames.items()},
            "actions": self.actions[pos_at],
            "rewards": self.rewards[pos_at],
            "terminated": self.terminated[pos_at],
            "bc_actions": self.bc_actions[pos_at],
        }


def _one_row(obs: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    if not isinstance(obs, Mapping):
        raise ValueError(f"{name} must be a dict of arrays, got {type(obs)}")
    return {k: np.asarray(v)[None] for k, v in obs.items()}


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values; refusing to store them")


def _columns(batch: TransitionBatch | dict) -> dict:
    """A minibatch's fields by name, numpy (TransitionBatch) or a tensor batch (ReplayBuffer.take_tensors) alike."""
    return batch if isinstance(batch, dict) else {f.name: getattr(batch, f.name) for f in fields(batch)}


def _like(batch: TransitionBatch | dict, columns: dict) -> TransitionBatch | dict:
    """`columns` as a minibatch of `batch`'s kind."""
    return TransitionBatch(**columns) if isinstance(batch, TransitionBatch) else columns


def concat_batches(a: TransitionBatch | dict, b: TransitionBatch | dict) -> TransitionBatch | dict:
    """Join two minibatches, numpy (TransitionBatch) or tensor batches (ReplayBuffer.take_tensors), rows of `a` first
    (RLPD's 50/50 offline/online sampling)."""
    x, y = _columns(a), _columns(b)
    if x["obs"].keys() != y["obs"].keys():
        raise ValueError(f"cannot join batches with observation keys {sorted(x['obs'])} and {sorted(y['obs'])}")

    def join(u: object, v: object) -> object:
        if isinstance(u, dict):
            return {k: join(w, v[k]) for k, w in u.items()}
        return torch.cat([u, v]) if isinstance(u, torch.Tensor) else np.concatenate([u, v])

    return _like(a, join(x, y))


def split_rows(batch: TransitionBatch | dict, parts: int) -> list[TransitionBatch] | list[dict]:
    """A minibatch (numpy or a tensor batch) cut into `parts` minibatches of equal size along its rows: views, no
    copies. Its rows must divide evenly."""

    def cut(value: object) -> list:
        if isinstance(value, dict):
            return [dict(zip(value, row, strict=True)) for row in zip(*(cut(v) for v in value.values()), strict=True)]
        if len(value) % parts:
            raise ValueError(f"{len(value)} rows do not split into {parts} equal minibatches")
        if isinstance(value, torch.Tensor):
            return list(value.split(len(value) // parts)) if len(value) else [value] * parts
        return np.split(value, parts)

    return [_like(batch, columns) for columns in cut(_columns(batch))]


def sample_utd_batches(
    buffer: ReplayBuffer, offline: ReplayBuffer | None, cfg: AgentConfig, rng: np.random.Generator
) -> list[TransitionBatch] | list[dict]:
    """The `cfg.utd` minibatches of one learner step; with `offline` (RLPD) each holds its share of demonstrations.

    All the step's rows are drawn and gathered at once from each buffer (one gather per array, not one per
    minibatch), then cut into the minibatches. From a buffer with a device copy they are tensor batches gathered
    there (the same draws from `rng`); `offline` must then have a copy on the same device."""
    on_device = buffer.device is not None
    if offline is not None and offline.device != buffer.device:
        raise ValueError(f"the offline buffer is on {offline.device}, the replay buffer on {buffer.device}")
    sample = ReplayBuffer.sample_tensors if on_device else ReplayBuffer.sample
    n_off = round(cfg.batch_size * cfg.effective_offline_ratio) if offline is not None else 0
    online = split_rows(sample(buffer, cfg.utd * (cfg.batch_size - n_off), rng), cfg.utd)
    if not n_off:
        return online
    demos = split_rows(sample(offline, cfg.utd * n_off, rng), cfg.utd)
    return [concat_batches(a, b) for a, b in zip(online, demos, strict=True)]
