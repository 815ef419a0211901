"""Deadline pacing for the control loop: the period is kept by deadlines, not by sleeping after the work."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RateStats:
    """Loop timing: ticks, overruns (a step that ended after its deadline), compute time and period samples."""

    ticks: int = 0
    overruns: int = 0
    compute_s: list[float] = field(default_factory=list)
    period_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """p50/p99 of compute and period in milliseconds, ticks and overruns."""
        out: dict[str, float] = {"ticks": self.ticks, "overruns": self.overruns}
        for name, values in (("compute", self.compute_s), ("period", self.period_s)):
            if values:
                arr = np.asarray(values[-10_000:]) * 1e3
                out[f"{name}_p50_ms"] = float(np.percentile(arr, 50))
                out[f"{name}_p99_ms"] = float(np.percentile(arr, 99))
        return out


class RateKeeper:
    """Wait for the next deadline of a fixed period; a late tick is counted and the schedule restarts from now.

    `period_s` 0 runs unpaced (the sim twin as fast as it goes). Call `start()` at the beginning of an episode, then
    `tick()` once per step after the step's work: it sleeps until the next deadline and returns the compute time.
    """

    def __init__(
        self,
        period_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if period_s < 0:
            raise ValueError(f"period_s must be >= 0, got {period_s}")
        self.period_s = period_s
        self.clock, self.sleep = clock, sleep
        self.stats = RateStats()
        self._deadline: float | None = None
        self._tick_start: float | None = None
        self._last_tick: float | None = None

    def start(self) -> None:
        """Begin a schedule: the first deadline is one period from now."""
        now = self.clock()
        self._deadline = now + self.period_s
        self._tick_start = now
        self._last_tick = None

    def tick(self) -> tuple[float, bool]:
        """Sleep until this step's deadline; returns (compute seconds of the step, whether it overran)."""
        if self._deadline is None or self._tick_start is None:
            self.start()
        assert self._deadline is not None and self._tick_start is not None
        now = self.clock()
        compute = now - self._tick_start
        overran = self.period_s > 0 and now > self._deadline
        if self.period_s > 0:
            if overran:
                self.stats.overruns += 1
                self._deadline = now + self.period_s
            else:
                remaining = self._deadline - now
                if remaining > 0:
                    self.sleep(remaining)
                self._deadline += self.period_s
        end = self.clock()
        if self._last_tick is not None:
            self.stats.period_s.append(end - self._last_tick)
        self._last_tick = end
        self._tick_start = end
        self.stats.ticks += 1
        self.stats.compute_s.append(compute)
        if len(self.stats.compute_s) > 20_000:
            del self.stats.compute_s[:10_000]
            del self.stats.period_s[:10_000]
        return compute, overran
