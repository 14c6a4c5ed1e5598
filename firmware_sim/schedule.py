"""When each device takes its next sample, on the monotonic clock.

Sample times are computed from the sample's index, never by adding periods up, so a loop that falls
behind catches up to the same grid instead of drifting. `LagMeter` measures how late samples were taken.
"""

from __future__ import annotations

import bisect
import math
import random


class Periodic:
    """Sample k at ``start + phase + k / rate + jitter_k``, jitter_k uniform in +-``jitter`` periods.

    The phase spreads a fleet's devices over the period; the jitter (below half a period, so samples stay
    in order) is a device's clock and scheduling noise.
    """

    def __init__(self, rate_hz: float, start: float, phase: float = 0.0, jitter: float = 0.0,
                 rng: random.Random | None = None):
        if not rate_hz > 0:
            raise ValueError(f"rate must be positive, got {rate_hz}")
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"jitter is a fraction of the period, 0 to below 0.5, got {jitter}")
        self.period = 1.0 / rate_hz
        self.first = start + phase
        self.jitter = jitter * self.period
        self.random = rng or random.Random(0)
        self.k = 0

    def next(self) -> float:
        t = self.first + self.k * self.period
        self.k += 1
        if self.jitter:
            t += self.random.uniform(-self.jitter, self.jitter)
        return t

    def due_by(self, t: float) -> int:
        """How many samples are due by time ``t`` (jitter aside)."""
        return max(0, math.floor((t - self.first) / self.period) + 1)


class FileTimes:
    """The sample times a replayed file gives: ``start + (ts_k - ts_0)`` scaled by ``1 / speed``.

    ``source.peek_time()`` is the file timestamp of the row its next ``next()`` returns (None at the end).
    """

    def __init__(self, source, start: float, speed: float = 1.0):
        self.source = source
        self.start = start
        self.speed = speed
        self.first_ts = None
        self.period = 0.05  # for lag accounting only: "late" means later than this
        self.k = 0
        self.last = -math.inf  # the time of the row scheduled last

    def next(self) -> float | None:
        ts = self.source.peek_time()
        if ts is None:
            return None
        if self.first_ts is None:
            self.first_ts = ts
        self.k += 1
        self.last = self.start + (ts - self.first_ts) / self.speed
        return self.last

    def due_by(self, t: float) -> int:
        """The rows scheduled so far, less the last one if it is not due by ``t``: a file's future is unknown,
        and the row scheduled next is not due yet when a replay stops before its time."""
        return self.k if self.last <= t else self.k - 1


LAG_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class LagMeter:
    """How late samples were taken: a histogram (cheap per sample), the maximum, and the late count."""

    def __init__(self):
        self.counts = [0] * (len(LAG_BUCKETS_MS) + 1)
        self.max = 0.0
        self.late = 0
        self.total = 0

    def add(self, lag: float, late_after: float) -> None:
        self.counts[bisect.bisect_left(LAG_BUCKETS_MS, lag * 1000.0)] += 1
        self.total += 1
        if lag > self.max:
            self.max = lag
        if lag > late_after:
            self.late += 1

    def quantile_ms(self, q: float) -> float | None:
        """The upper edge of the bucket holding quantile ``q`` (beyond the last bucket: the maximum)."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for edge, count in zip(LAG_BUCKETS_MS, self.counts):
            seen += count
            if seen >= rank:
                return edge
        return round(self.max * 1000.0, 3)

    def summary(self) -> dict:
        return {"max_ms": round(self.max * 1000.0, 3), "p50_ms_at_most": self.quantile_ms(0.5),
                "p99_ms_at_most": self.quantile_ms(0.99), "late_samples": self.late}
