"""The learner's updates on a thread of their own, so that the service thread keeps serving the actors meanwhile.

One learner step takes milliseconds on a GPU, but seconds for the image config on a CPU, and the first step of a
compiled learner (`train.compile`) compiles for tens of seconds to minutes. Run inline, the learner would neither
receive, store nor acknowledge transitions, nor broadcast its status, for that long. `Updater` runs one update at a
time on one persistent thread (the same thread every time: CUDA graphs and compiled code stay with it) and makes
`wake_fd` readable when it is done, so the service thread can wait for requests and for the update in one poll.
The hand-over costs ~88 us per step (p50, 146 us p99: `python bench/updater.py`, docs/benchmarks.md): about 1% of a
GPU learner step at 120 steps/s.

The thread is a daemon: a learner told to stop while an update is still compiling can leave without waiting for it
(`close(timeout)`), and the process is not held up at exit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Updater:
    """Runs submitted calls one at a time on a single worker thread; see the module docstring."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple, Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._future: Future | None = None

    @property
    def wake_fd(self) -> int:
        """Readable once the submitted call has finished (until `result` is taken)."""
        return self._wake_r

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start `fn(*args)` on the worker thread; the previous call's result must have been taken."""
        if self._future is not None:
            raise RuntimeError("an update is still running or its result has not been taken")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="learner-update", daemon=True)
            self._thread.start()
        self._future = Future()
        self._jobs.put((fn, args, self._future))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, future = job
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # raised again where the result is taken
                future.set_exception(err)
            with contextlib.suppress(OSError):  # BlockingIOError: a byte is there already; EBADF: closed
                os.write(self._wake_w, b"\0")

    @property
    def busy(self) -> bool:
        """A submitted call has not finished yet."""
        return self._future is not None and not self._future.done()

    def result(self) -> Any:
        """The finished call's return value (or its exception, raised here); waits for it if it is still running."""
        if self._future is None:
            raise RuntimeError("no update was submitted")
        future, self._future = self._future, None
        try:
            return future.result()
        finally:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

    def close(self, timeout: float | None = None) -> bool:
        """Stop the worker once the running call (if any) has finished, waiting at most `timeout` s (None: as long as
        it takes). True when the worker has stopped; False when it is still running a call, left behind (a daemon)."""
        thread, self._thread = self._thread, None
        stopped = True
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout)
            stopped = not thread.is_alive()
        if stopped:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._wake_r = self._wake_w = -1
        return stopped
