"""Weights snapshots for the learner's PUB socket: sent without copying, their memory reused once ZeroMQ is done.

An image agent's weights are tens of megabytes. `pack_tensors` must snapshot them (the frames are sent after it
returns, while training goes on), and fresh memory of that size is faulted in page by page on every broadcast.
`WeightsFrames` keeps the previous snapshot and copies the next one into it when, and only when, ZeroMQ has released
every frame of the previous message (sent to every subscriber, or dropped); otherwise it snapshots into new memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import zmq

from robot_rl.wire import Phase, Weights, pack_tensors, to_frames

if TYPE_CHECKING:
    import torch


class WeightsFrames:
    """Builds the frames of successive Weights messages for one PUB socket."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] | None = None
        self._tracker: zmq.MessageTracker | None = None
        self._built_at = 0.0
        self.reused = 0  # snapshots that could use the previous one's memory

    def in_flight_s(self) -> float | None:
        """Seconds since the newest message's frames were made while ZeroMQ still holds some of them (not yet handed to
        every subscriber's connection); None once released, or before the first message."""
        if self._tracker is None or self._tracker.done:
            return None
        return time.monotonic() - self._built_at

    def frames(self, *, version: int, phase: Phase, state: Mapping[str, torch.Tensor]) -> list[zmq.Frame]:
        """The frames of a Weights message of `state`, for `send_multipart(frames, copy=False)`.

        Drop the frames once sent: a Frame object still alive counts as a reader, and its memory is not reused.
        """
        done = self._tracker is not None and self._tracker.done
        arrays = pack_tensors(state, into=self._arrays if done else None)
        self.reused += done
        message = Weights(version=version, phase=phase, tensors=arrays)
        frames = [zmq.Frame(f, copy=False, track=True) for f in to_frames(message)]
        self._arrays, self._tracker = arrays, zmq.MessageTracker(*frames)
        self._built_at = time.monotonic()
        return frames
