"""A learner step's minibatches sampled and moved to the device in a background thread, ahead of the update.

With camera observations, gathering a step's minibatches from the replay buffer and copying them to the GPU takes
milliseconds that the update would otherwise wait for. `Prefetcher` runs `sample_fn` (one learner step's UTD
minibatches, e.g. `sample_utd_batches` with its own rng) in a thread, converts each batch to tensors and moves them
to the device, and hands them over through a bounded queue of `depth` learner steps.

    lock = threading.Lock()          # the owner takes it around buffer.add / add_many
    rng = np.random.default_rng(0)   # used by the thread only
    with Prefetcher(lambda: sample_utd_batches(buffer, offline, cfg, rng), "cuda", lock) as prefetch:
        batches = prefetch.get(timeout=5.0)

Tensors keep the buffer's dtypes: uint8 images stay uint8 (4x fewer bytes to copy than float32; the network
converts them on the device), float32 stays float32, `terminated` is bool. On a CUDA device the arrays are copied
into pinned memory and moved with non_blocking copies on a side stream; the thread waits for the copies before it
hands the batches over, and `get` ties them to the caller's current stream, so they are ready to use. On CPU the
tensors share memory with the sampled arrays (copies made by `ReplayBuffer.take`).

An exception in the thread ends it and is raised again by `get`, after the batches made before it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from robot_rl.buffer import ReplayBuffer, TransitionBatch, sample_utd_batches
from robot_rl.config import RunConfig

TensorBatch = dict[str, "torch.Tensor | dict[str, torch.Tensor]"]
"""One minibatch: "obs" and "next_obs" (key -> tensor), "actions", "rewards", "terminated" (bool), "bc_actions"."""

_POLL_S = 0.05  # how often a blocked put checks the stop event


@dataclass(frozen=True)
class _Failed:
    error: Exception


def to_tensors(batch: TransitionBatch, device: torch.device | str, *, pin: bool = False) -> TensorBatch:
    """The batch as tensors on `device`, dtypes kept; `pin` stages them in pinned memory (CUDA targets only)."""
    device = torch.device(device)

    def move(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if pin:
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    return {
        "obs": {k: move(v) for k, v in batch.obs.items()},
        "next_obs": {k: move(v) for k, v in batch.next_obs.items()},
        "actions": move(batch.actions),
        "rewards": move(batch.rewards),
        "terminated": move(batch.terminated),
        "bc_actions": move(batch.bc_actions),
    }


def _tensors(batch: TensorBatch) -> list[torch.Tensor]:
    return [t for v in batch.values() for t in (v.values() if isinstance(v, dict) else [v])]


class Prefetcher:
    """Background sampling and device transfer of whole learner steps; see the module docstring.

    `sample_fn` runs in the thread while `lock` is held, so the owner must hold the same lock when it adds to the
    buffers `sample_fn` reads, and must not use `sample_fn`'s rng itself. The thread works up to `depth` learner
    steps ahead.
    """

    def __init__(
        self,
        sample_fn: Callable[[], list[TransitionBatch]],
        device: torch.device | str,
        lock: AbstractContextManager,
        depth: int = 2,
    ) -> None:
        if not 1 <= depth <= 4:
            raise ValueError(f"depth must be 1 to 4 learner steps, got {depth}")
        self.device = torch.device(device)
        self.depth = depth
        self._sample_fn = sample_fn
        self._lock = lock
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._queue: queue.Queue[list[TensorBatch] | _Failed] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def __enter__(self) -> Prefetcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Prefetcher.start() was called already")
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> list[TensorBatch]:
        """The next learner step's minibatches; TimeoutError after `timeout` s; the thread's exception, re-raised."""
        if self._thread is None or self._stop.is_set():
            raise RuntimeError("Prefetcher.get() needs a started, open prefetcher")
        if self._error is not None:
            raise self._error
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no prefetched minibatches within {timeout} s") from None
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        if self._cuda:
            # Allocated on the side stream: keep the allocator from reusing them while this stream still reads them.
            stream = torch.cuda.current_stream(self.device)
            for tensor in (t for batch in item for t in _tensors(batch)):
                tensor.record_stream(stream)
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and join it; RuntimeError if it does not end within `timeout` s (a sample_fn hanging)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the prefetch thread did not stop within {timeout} s")
        while not self._queue.empty():
            self._queue.get_nowait()

    def _run(self) -> None:
        try:
            stream = torch.cuda.Stream(self.device) if self._cuda else None
            while not self._stop.is_set():
                with self._lock:
                    batches = self._sample_fn()
                with torch.cuda.stream(stream):  # a no-op context for None (CPU)
                    item = [to_tensors(batch, self.device, pin=self._cuda) for batch in batches]
                if stream is not None:
                    stream.synchronize()
                self._put(item)
        except Exception as error:  # handed to get(), which raises it in the owner's thread
            self._put(_Failed(error))

    def _put(self, item: list[TensorBatch] | _Failed) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue


class StepSampler:
    """Where a learner loop gets each step's minibatches: sampled in place, or from a Prefetcher thread.

    `lock` guards the buffers: hold it around every add while the sampler is open (it is only taken by the thread
    when prefetching). The thread starts at the first `next()`, so a learner that never learns starts none.
    """

    def __init__(
        self,
        sample_fn: Callable[[], list[TransitionBatch]],
        device: torch.device | str,
        *,
        prefetch: bool,
        lock: AbstractContextManager | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.lock: AbstractContextManager = lock if lock is not None else threading.Lock()
        self._sample_fn, self._device, self._prefetch, self._timeout = sample_fn, device, prefetch, timeout_s
        self._prefetcher: Prefetcher | None = None

    def next(self) -> list[TransitionBatch] | list[TensorBatch]:
        if not self._prefetch:
            return self._sample_fn()
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._sample_fn, self._device, self.lock)
            self._prefetcher.start()
        return self._prefetcher.get(timeout=self._timeout)

    def close(self) -> None:
        """Stop the prefetch thread, if one runs; idempotent."""
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.close()


def learner_sampler(
    buffer: ReplayBuffer,
    offline: ReplayBuffer | None,
    cfg: RunConfig,
    rng: np.random.Generator,
    device: torch.device | str,
) -> StepSampler:
    """The StepSampler of a learner loop: `cfg.agent.utd` minibatches per step (RLPD's share of `offline` included),
    on a prefetch thread when `cfg.train.prefetch` and the buffer is in host memory only (a buffer with a device
    copy gathers there, which needs no thread). Sampled in place, the loop's own `rng` draws them (a run then
    reproduces exactly); a prefetch thread gets an rng of its own."""
    prefetch = cfg.train.prefetch and buffer.device is None
    sample_rng = np.random.default_rng(cfg.seed + 31) if prefetch else rng
    return StepSampler(lambda: sample_utd_batches(buffer, offline, cfg.agent, sample_rng), device, prefetch=prefetch)
