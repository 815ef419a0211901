"""Weights broadcasts made ready for the control loop on a thread of their own.

Loading a broadcast into the acting networks copies every weight (~62 MB for the image config), and with
`actor.gating_precision: int8` also quantises them: tens to a hundred milliseconds, too long for the top of a 10 Hz
step. The loader takes each newest broadcast from the learner link, decodes it and builds the agent's new acting
networks with `Q2RLAgent.prepare_acting`, without touching the networks the control loop is gating with. The control
loop swaps them in at its one swap point (`take`, then `Q2RLAgent.use_acting`: a reference swap). A broadcast that
arrives while another is being prepared waits; one that is overtaken before its turn is skipped for the newer.
With `min_interval_s` the loader starts at most one preparation per interval (the newest broadcast when it is time;
one of a new phase at once), which bounds the CPU it takes from the control loop whatever the learner's rate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from robot_rl.agent import PreparedActing, Q2RLAgent
from robot_rl.wire import Weights, unpack_tensors

log = logging.getLogger(__name__)

LOADER_NICE = 10  # the loader thread's nice value (the process's is 0 unless started otherwise)


class WeightsLoadError(RuntimeError):
    """A broadcast could not be made into acting networks (the learner sent weights of other networks)."""


class NonFiniteWeights(ValueError):
    """A broadcast holds NaN or inf (a diverged learner): the actor keeps acting with the weights it has."""


@dataclass(frozen=True)
class ReadyWeights:
    """A broadcast ready to swap in: the message, its decoded tensors (for the archive) and the prepared networks."""

    weights: Weights
    tensors: dict[str, torch.Tensor]
    prepared: PreparedActing


def prepare_weights(agent: Q2RLAgent, weights: Weights) -> ReadyWeights:
    """Decode one broadcast and prepare the agent's acting networks from it (on the calling thread).

    NonFiniteWeights when a tensor holds NaN or inf; KeyError/RuntimeError when the networks do not match."""
    tensors = unpack_tensors(weights.tensors, copy=False)  # only read: preparing copies into new networks
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(f"weights version {weights.version}: {name} holds NaN or inf; not swapped in")
    return ReadyWeights(weights=weights, tensors=tensors, prepared=agent.prepare_acting(tensors))


class WeightsLoader(threading.Thread):
    """Prepares the newest weights from `take_weights(timeout)` (LearnerLink.take_weights) until stopped."""

    def __init__(
        self,
        take_weights: Callable[[float], Weights | None],
        agent: Q2RLAgent,
        *,
        poll_s: float = 0.05,
        min_interval_s: float = 0.0,
    ) -> None:
        super().__init__(name="weights-loader", daemon=True)
        self._take_weights, self._agent, self._poll_s = take_weights, agent, poll_s
        self._min_interval_s = min_interval_s
        self._ready: ReadyWeights | None = None
        self._error: WeightsLoadError | None = None
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self.prepared = 0  # broadcasts made ready
        self.refused = 0  # broadcasts with NaN or inf, skipped
        self.last_refusal = ""
        # Seconds each of the latest 100 took; replaced whole, never mutated, so other threads may read it any time.
        self.prepare_s: list[float] = []

    def take(self) -> ReadyWeights | None:
        """The newest prepared broadcast not taken yet, or None; raises WeightsLoadError when one could not be used."""
        with self._lock:
            if self._error is not None:
                raise self._error
            ready, self._ready = self._ready, None
        return ready

    def run(self) -> None:
        if hasattr(os, "setpriority"):  # Linux: a thread's own nice value; the control loop goes first on a busy core
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
        pending: Weights | None = None  # the newest broadcast, waiting for its turn
        phase, next_start = None, -float("inf")
        while not self.stop_event.is_set():
            wait = self._poll_s if pending is None else min(self._poll_s, max(next_start - time.monotonic(), 0.0))
            newer = self._take_weights(wait)
            pending = newer if newer is not None else pending
            if pending is None or (pending.phase == phase and time.monotonic() < next_start):
                continue
            weights, pending = pending, None
            phase, next_start = weights.phase, time.monotonic() + self._min_interval_s
            start = time.perf_counter()
            try:
                ready = prepare_weights(self._agent, weights)
            except NonFiniteWeights as err:
                self.refused += 1
                self.last_refusal = str(err)
                log.warning("%s", err)
                continue
            except (KeyError, RuntimeError, ValueError) as err:
                with self._lock:
                    self._error = WeightsLoadError(f"weights version {weights.version} cannot be loaded: {err}")
                log.error("%s", self._error)
                return
            self.prepared += 1
            self.prepare_s = [*self.prepare_s[-99:], time.perf_counter() - start]
            with self._lock:
                self._ready = ready  # an untaken older one is overtaken

    def stop(self) -> None:
        self.stop_event.set()

    def prepare_p99_s(self) -> float | None:
        return float(np.percentile(self.prepare_s, 99)) if self.prepare_s else None
