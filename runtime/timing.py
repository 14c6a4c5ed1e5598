"""Sensor time per stream: samples put back in ``seq`` order, gaps in ``ts`` bridged or reset, and
streams resampled onto the model's time grid. Pure logic (no MQTT, no model): the scheduler offers each
decoded sample and steps what comes back, in order.

With a `TimingPolicy` that is not `active` the scheduler skips this module entirely (today's behaviour).
Otherwise each stream passes through two stages:

1. **Reorder** (``reorder_window > 0``, samples with a ``seq``): a sample is held until it is the next
   ``seq`` after the last one released, or ``reorder_window`` samples are held (the smallest is released,
   skipping the missing ones: ``seq_skipped``), or it was held ``reorder_timeout`` seconds (`Timing.due`
   releases it and every smaller held one). A stream's first sample waits too (its predecessor is
   unknown). A ``seq`` already released or held is a ``duplicate``; one the stream skipped and gave up on
   is ``late`` (the last 16 skipped ranges are remembered; older ones count as duplicates): both are
   dropped without touching the state. A ``seq`` at least `SEQ_RESTART_DISTANCE` below the last released
   one is a device that restarted its counter (``seq_restart``, as in `runtime.pipeline`): what was held
   is released and the stream's order starts again. Samples without ``seq`` pass straight on.
2. **Time**, on the model's sample period P, in one of two modes:

   - *gaps* (``gap_policy`` other than ``"ignore"``, no resampling): between two consecutive samples
     ``ts`` apart by d, ``missing = floor(d / P + 0.5) - 1`` (jitter under half a period is one step).
     ``"hold"`` inserts ``missing`` copies of the last sample, ``"interpolate"`` the linear interpolation
     at ``last_ts + j P`` (j = 1..missing); a gap of more than ``max_fill`` steps resets instead;
     ``"reset"`` resets on any gap. A reset is the flag `Step.reset_before` on the sample after the gap:
     the scheduler puts the stream back to ``new_state()`` before stepping it.
   - *resampling* (``input_rate`` differs from 1/P): the grid t_k = t_0 + k P starts at the stream's
     first sample. Upsampling (input slower): x(t_k) is the linear interpolation between the samples
     bracketing t_k, emitted as soon as a sample at or after t_k arrives. Decimating (input faster):
     x(t_k) is the mean of the samples in the cell [t_k - P/2, t_k + P/2), emitted once a sample at or
     after the cell's end arrives; an empty cell is interpolated like an upsampled point. A gap is two
     consecutive samples at least 1.5 input periods apart with grid points between them that no sample
     supports (every point strictly between them when upsampling, the empty cells when decimating):
     ``"interpolate"`` and ``"hold"`` (the last sample before the gap) fill those points, up to
     ``max_fill``; past it, and with ``"reset"``, the points are dropped, the grid starts again at the
     sample after the gap and the next step resets; ``"ignore"`` does the same without the reset. Every
     resampled step has ``seq = None`` and ``ts = t_k``.

Bad ``ts`` (counted, never raised, never a fill loop longer than ``max_fill``):

- missing (None or not finite: ``ts_missing``), or so large that a float cannot resolve P there
  (beyond ``P * 2**46`` seconds: ``ts_out_of_range``; 10^11 s for P = 1 ms, far past Unix time): in gap
  mode the sample passes unfilled and no gap is measured across it; when resampling it cannot be placed
  on the grid and is dropped. (A grid t_0 + k P that ``ts`` cannot resolve would never advance.)
- going backwards (``ts_backwards``; in gap mode also a repeated ``ts``, which would step the model twice
  for one instant; when resampling two samples may share a ``ts``): the sample is *stepped* without fills
  and the stream's clock is re-anchored at it (resampling: the open cell is emitted and the grid starts
  again at it, no reset). Dropping it instead would lose real data, and a device whose clock was set back
  would lose every sample until its clock caught up; re-anchoring keeps gaps measured from there.
- a jump of more than ``max_fill`` periods is a reset (``gap_reset``) however far it goes: the number of
  missing steps is compared as a float before anything is counted or allocated.

**Tokens and acks.** ``offer`` takes an opaque ``token`` per message (what the scheduler needs to ack it)
and hands every token back exactly once:

- in `Released.dropped`: the message had no effect (late, duplicate, unplaceable): ack it at once;
- in the ``tokens`` of exactly one `Step`: the message's sample takes effect with that step (in gap mode
  its own step; when decimating the step of its cell; when upsampling the last grid point its arrival
  completes, or the stream's next step if it completed none). Ack it once that
  step's prediction, and every earlier step of its stream, is published. Filled and purely interpolated
  steps carry no token of their own.
- until then it is in `Timing.held_tokens`: the daemon must not ack those. Mind that acks go out in
  receive order (`runtime.scheduler`), so a held message delays the acks of every later message: every
  wait is bounded. The reorder window's by ``reorder_timeout``; a resampled stream's by the time its
  next sample should come plus ``reorder_timeout`` (a decimating stream's open cell: a model period after
  it opened; an upsampled sample that completed no grid point: an input period). When a stream falls
  silent that long, `Timing.due` closes its open cell (its mean stepped at its grid point) or finishes
  the waiting tokens without a step (``hold_timeout``); a sample that then comes for the closed cell is
  ``late`` and dropped, as one the reorder window gave up on.
- `Timing.forget` (the stream table evicted the key) returns the tokens the stream still held: its
  state is gone, so they are finished (ack them).

Step ``x`` arrays may be shared (hold copies reuse the last sample's array): treat them as read-only.
Work per message is O(1) amortised (O(log window) when held), plus the steps it releases.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

GAP_POLICIES = ("ignore", "hold", "interpolate", "reset")
SEQ_RESTART_DISTANCE = 1000
"""A ``seq`` this far below the last released one is a restarted counter (same as `runtime.pipeline`)."""
MAX_REORDER_WINDOW = 100_000
MAX_FILL = 100_000
"""Upper bound of ``max_fill``: the steps one message may add stay bounded whatever the config says."""
RATE_TOLERANCE = 1e-9
"""Relative difference between ``input_rate`` and the model's rate below which nothing is resampled."""
SKIPPED_RANGES_KEPT = 16
TS_RANGE_PERIODS = 2.0 ** 46
"""A usable ``ts`` lies within this many periods of 0: its float resolution is then P/64 or finer."""
COUNTERS = ("late", "duplicate", "reordered", "seq_skipped", "seq_restart", "gap", "filled", "gap_reset",
            "ts_missing", "ts_out_of_range", "ts_backwards", "hold_timeout", "forgotten")
"""The keys of `Timing.counters`, all present from the start (metrics can be registered up front)."""


class _Wait(NamedTuple):
    """A deadline's mark for a resampled stream's wait (`StreamTiming.wait_no` when it began)."""

    number: int


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TimingPolicy:
    """A pipeline's time handling; the defaults are today's behaviour (`active` is False)."""

    reorder_window: int = 0
    """Samples held per stream while waiting for a missing ``seq``; 0: no reordering."""
    reorder_timeout: float = 0.0
    """Seconds a sample may be held (required > 0 with a window: a stream's last samples must not wait forever)."""
    gap_policy: str = "ignore"
    max_fill: int = 0
    """Most steps one gap may be filled with (``"hold"``, ``"interpolate"``); a longer gap resets."""
    sample_period: float | None = None
    """The model's P in seconds (`ModelSpec.sample_period`); needed by every gap policy but ``"ignore"``."""
    input_rate: float | None = None
    """The streams' sample rate in Hz; when it differs from 1/P the streams are resampled."""

    def __post_init__(self):
        def need(ok, option, what):
            if not ok:
                raise ValueError(f"timing option {option} = {getattr(self, option)!r}: {what}")

        window = self.reorder_window
        need(isinstance(window, int) and not isinstance(window, bool) and 0 <= window <= MAX_REORDER_WINDOW,
             "reorder_window", f"must be an integer from 0 to {MAX_REORDER_WINDOW}")
        need(_number(self.reorder_timeout) and self.reorder_timeout >= 0, "reorder_timeout",
             "must be a finite number of seconds >= 0")
        need(window == 0 or self.reorder_timeout > 0, "reorder_timeout",
             "must be > 0 with a reorder window (held samples must be released some time)")
        need(self.gap_policy in GAP_POLICIES, "gap_policy", f"must be one of {', '.join(GAP_POLICIES)}")
        need(isinstance(self.max_fill, int) and not isinstance(self.max_fill, bool) and 0 <= self.max_fill <= MAX_FILL,
             "max_fill", f"must be an integer from 0 to {MAX_FILL}")
        for option in ("sample_period", "input_rate"):
            value = getattr(self, option)
            need(value is None or (_number(value) and value > 0), option, "must be a finite number > 0")
        need(self.gap_policy == "ignore" or self.sample_period is not None, "gap_policy",
             "needs the model's sample period (its sample_rate)")
        need(self.input_rate is None or self.sample_period is not None, "input_rate",
             "resampling needs the model's sample period (its sample_rate)")

    @property
    def resampling(self) -> bool:
        return self.input_rate is not None and abs(self.input_rate * self.sample_period - 1.0) > RATE_TOLERANCE

    @property
    def active(self) -> bool:
        """False: every sample would pass straight through, so the scheduler skips the stage."""
        return self.reorder_window > 0 or self.gap_policy != "ignore" or self.resampling


@dataclass(slots=True)
class Step:
    """One model step for a stream, in order."""

    x: np.ndarray
    """(input_size,) float32; read-only (may be shared with other steps)."""
    seq: int | None
    """The message's ``seq``; None for filled and resampled steps."""
    ts: float | None
    """The message's ``ts``, or the grid time of a filled or resampled step."""
    tokens: tuple = ()
    """Messages finished by this step (module docstring): ack them once it is published."""
    filled: bool = False
    """Made up to bridge a gap (published only with ``publish_filled``)."""
    reset_before: bool = False
    """Put the stream back to ``new_state()`` before this step (a gap the policy resets on)."""


class Released(NamedTuple):
    """What one `Timing.offer` (or one stream in `Timing.due`) hands on."""

    steps: list
    """`Step` objects to advance the stream by, in this order."""
    dropped: list
    """Tokens of messages dropped without effect (late, duplicate, no placeable ts): ack at once."""


class StreamTiming:
    """One stream's time state: held samples, the last released seq and sample, the resampling grid."""

    __slots__ = ("key", "released", "max_seen", "heap", "held", "skipped", "last_ts", "last_x", "t0", "k",
                 "cell_sum", "cell_count", "cell_tokens", "pending", "reset_next", "wait_no")

    def __init__(self, key):
        self.key = key
        self.released = None  # last seq handed to the time stage
        self.max_seen = None  # largest seq accepted (to count reordered samples)
        self.heap: list = []  # held samples: (seq, x, ts, token), seq unique
        self.held: set = set()  # their seqs
        self.skipped = None  # deque of (first, last) seq ranges given up on, made at the first skip
        self.last_ts = None  # the last sample's ts (None: no gap can be measured from it)
        self.last_x = None
        self.t0 = None  # resampling grid origin; None until the first sample
        self.k = 0  # next grid point (upsampling) or open cell (decimating)
        self.cell_sum = None  # decimating: float64 sum of the open cell's samples
        self.cell_count = 0
        self.cell_tokens: list = []
        self.pending: list = []  # tokens waiting for the stream's next step
        self.reset_next = False
        self.wait_no = 0  # numbers the resampling waits (open cell, pending tokens): older deadlines are stale

    def was_skipped(self, seq: int) -> bool:
        return self.skipped is not None and any(first <= seq <= last for first, last in self.skipped)

    def skip(self, first: int, last: int) -> None:
        if self.skipped is None:
            self.skipped = deque(maxlen=SKIPPED_RANGES_KEPT)
        self.skipped.append((first, last))

    def empty(self) -> bool:
        """Holds nothing a later sample needs."""
        return (self.released is None and self.last_ts is None and self.t0 is None and not self.heap
                and not self.pending and not self.cell_count)

    def tokens(self) -> list:
        """Tokens of messages received and not finished."""
        return [entry[3] for entry in sorted(self.heap)] + self.cell_tokens + self.pending


class Timing:
    """The time stage of one pipeline: a `StreamTiming` per stream key, driven by the scheduler."""

    def __init__(self, policy: TimingPolicy):
        self.policy = policy
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._streams: dict[Any, StreamTiming] = {}
        self._deadlines: list = []  # (deadline, order, stream, seq or _Wait); stale entries skipped when popped
        self._now = 0.0  # the monotonic time of the call being served
        self._order = itertools.count()
        self._window = policy.reorder_window
        self._period = policy.sample_period
        self._ts_limit = TS_RANGE_PERIODS * policy.sample_period if policy.sample_period else math.inf
        self._fills = policy.gap_policy in ("hold", "interpolate")
        self._hold = policy.gap_policy == "hold"
        self._fill_limit = policy.max_fill + 1 if self._fills else 1  # grid points worth counting in a gap
        if policy.resampling:
            self._gap_span = 1.5 / policy.input_rate
            upsampling = policy.input_rate * policy.sample_period < 1.0
            # how long a resampled sample may wait for the stream's next one: the device sends it within
            # an input period (upsampling) or a model period (the rest of the open cell), plus the timeout
            self._wait = policy.reorder_timeout + (1.0 / policy.input_rate if upsampling else policy.sample_period)
            self._time = self._upsample if upsampling else self._decimate
        else:
            self._time = self._fill_gaps if policy.gap_policy != "ignore" else self._pass

    def __len__(self) -> int:
        return len(self._streams)

    # ---- the scheduler's calls -------------------------------------------------------------------
    def offer(self, key, x: np.ndarray, seq: int | None, ts: float | None, token, now: float) -> Released:
        """Take one decoded sample of stream ``key`` (``now``: monotonic seconds); return what it releases."""
        self._now = now
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = StreamTiming(key)
        out = Released([], [])
        if self._window and seq is not None:
            self._reorder(stream, x, seq, ts, token, now, out)
        elif seq is not None and self._time != self._pass and self._repeated(stream, seq):
            out.dropped.append(token)
        else:
            self._time(stream, x, seq, ts, token, out)
        if stream.empty():  # nothing to remember (all it sent was dropped): a flood of such keys stays bounded
            del self._streams[key]
        return out

    def _repeated(self, s: StreamTiming, seq: int) -> bool:
        """Without a window: a seq not above the stream's last is a duplicate, dropped before it moves the
        stream's clock or joins a cell (the pipeline's own check cannot see resampled steps' seqs)."""
        last = s.released
        if last is not None and seq <= last and last - seq < SEQ_RESTART_DISTANCE:
            self.counters["duplicate"] += 1
            return True
        s.released = seq
        return False

    def due(self, now: float) -> list[tuple[Any, Released]]:
        """Per stream, what waited too long by ``now``: the samples held ``reorder_timeout`` (and the
        smaller held ones), in seq order; a resampled stream gone silent: its open cell closed, or the
        tokens of samples that completed no grid point handed back in ``dropped`` (``hold_timeout``)."""
        self._now = now
        out: dict[Any, Released] = {}
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, stream, what = heapq.heappop(deadlines)
            if not self._live(stream, what):
                continue
            if isinstance(what, _Wait) and stream.heap:  # its next samples wait in the reorder window: first
                self._wait_from_now(stream)
                continue
            released = out.get(stream.key)
            if released is None:
                released = out[stream.key] = Released([], [])
            if isinstance(what, _Wait):
                self.counters["hold_timeout"] += 1
                self._close_cell(stream, released)
                released.dropped.extend(stream.pending)
                stream.pending = []
            else:
                self._release(stream, released, upto=what)
        return list(out.items())

    def next_deadline(self) -> float | None:
        """When `due` next has something to release (monotonic seconds), or None."""
        deadlines = self._deadlines
        while deadlines:
            _, _, stream, what = deadlines[0]
            if self._live(stream, what):
                return deadlines[0][0]
            heapq.heappop(deadlines)
        return None

    def _live(self, stream: StreamTiming, what) -> bool:
        """Whether a deadline still stands: its stream not forgotten, its sample still held or its wait on."""
        if self._streams.get(stream.key) is not stream:
            return False
        if isinstance(what, _Wait):
            return what.number == stream.wait_no and bool(stream.cell_count or stream.pending)
        return what in stream.held

    def _wait_from_now(self, s: StreamTiming) -> None:
        """A resampled stream waits for its next sample from now on (a new open cell, or pending tokens)."""
        s.wait_no += 1
        heapq.heappush(self._deadlines, (self._now + self._wait, next(self._order), s, _Wait(s.wait_no)))

    def forget(self, key) -> list:
        """Drop a stream (evicted or idle); returns the tokens it still held: finished, ack them."""
        stream = self._streams.pop(key, None)
        if stream is None:
            return []
        tokens = stream.tokens()
        self.counters["forgotten"] += len(tokens)
        return tokens

    def forget_all(self) -> list:
        """Drop every stream; the tokens they held (see `forget`)."""
        tokens = [token for key in list(self._streams) for token in self.forget(key)]
        self._deadlines.clear()
        return tokens

    def drain(self) -> list[tuple[Any, Released]]:
        """Hand on everything held, as if every stream ended now (a clean stop), and forget every stream:
        held samples in seq order, a decimating stream's open cell emitted at its grid point; the tokens of
        samples that completed no grid point yet (upsampling) come back in ``dropped``."""
        out = []
        for key, s in self._streams.items():
            released = Released([], [])
            self._release(s, released, upto=math.inf)
            self._close_cell(s, released)
            released.dropped.extend(s.pending)
            s.pending = []
            out.append((key, released))
        self._streams.clear()
        self._deadlines.clear()
        return out

    def held_tokens(self) -> list:
        """Tokens of every message received and not finished: the daemon must not ack these yet."""
        return [token for stream in self._streams.values() for token in stream.tokens()]

    # ---- reorder stage ---------------------------------------------------------------------------
    def _reorder(self, s: StreamTiming, x, seq: int, ts, token, now: float, out: Released) -> None:
        counters = self.counters
        if s.released is not None:
            if s.released - seq >= SEQ_RESTART_DISTANCE:
                counters["seq_restart"] += 1
                self._release(s, out, upto=math.inf)
                s.released = s.max_seen = s.skipped = None
            elif seq <= s.released:
                counters["late" if s.was_skipped(seq) else "duplicate"] += 1
                out.dropped.append(token)
                return
        if seq in s.held:
            counters["duplicate"] += 1
            out.dropped.append(token)
            return
        if s.max_seen is not None and seq < s.max_seen:
            counters["reordered"] += 1
        else:
            s.max_seen = seq
        if not s.heap and s.released is not None and seq == s.released + 1:  # in order: the common case
            s.released = seq
            self._time(s, x, seq, ts, token, out)
            return
        heapq.heappush(s.heap, (seq, x, ts, token))
        s.held.add(seq)
        heapq.heappush(self._deadlines, (now + self.policy.reorder_timeout, next(self._order), s, seq))
        self._release(s, out)

    def _release(self, s: StreamTiming, out: Released, upto: float | None = None) -> None:
        """Hand on held samples in seq order: the next seq, the smallest while more than the window is
        held, and everything up to ``upto``."""
        heap = s.heap
        while heap:
            seq = heap[0][0]
            last = s.released
            if not ((last is not None and seq == last + 1) or len(heap) > self._window
                    or (upto is not None and seq <= upto)):
                break
            _, x, ts, token = heapq.heappop(heap)
            s.held.discard(seq)
            if last is not None and seq > last + 1:
                self.counters["seq_skipped"] += seq - last - 1
                s.skip(last + 1, seq - 1)
            s.released = seq
            self._time(s, x, seq, ts, token, out)

    # ---- time stage: gaps ------------------------------------------------------------------------
    def _usable(self, ts) -> bool:
        """Whether ``ts`` can be placed in time; counts why not."""
        if ts is not None and -self._ts_limit <= ts <= self._ts_limit:  # False for NaN and inf too
            return True
        self.counters["ts_missing" if ts is None or not math.isfinite(ts) else "ts_out_of_range"] += 1
        return False

    def _pass(self, s, x, seq, ts, token, out: Released) -> None:
        out.steps.append(Step(x, seq, ts, (token,)))

    def _fill_gaps(self, s: StreamTiming, x, seq, ts, token, out: Released) -> None:
        reset = False
        if not self._usable(ts):
            ts_known = None
        else:
            ts_known = ts
            if s.last_ts is not None:
                d = ts - s.last_ts
                if d <= 0:
                    self.counters["ts_backwards"] += 1
                else:
                    periods = d / self._period  # may be inf: compared as a float, never counted out
                    if periods >= 1.5:
                        self.counters["gap"] += 1
                        if self._fills and periods < self.policy.max_fill + 1.5:
                            self._add_fills(s, x, ts, math.floor(periods + 0.5) - 1, out)
                        else:
                            reset = True
                            self.counters["gap_reset"] += 1
        s.last_ts, s.last_x = ts_known, x
        out.steps.append(Step(x, seq, ts, (token,), False, reset))

    def _add_fills(self, s: StreamTiming, x, ts: float, missing: int, out: Released) -> None:
        last_ts, last_x = s.last_ts, s.last_x
        times = last_ts + self._period * np.arange(1, missing + 1)
        if self._hold:
            rows = [last_x] * missing
        else:
            fraction = (times - last_ts) / (ts - last_ts)
            rows = (last_x + np.outer(fraction, x.astype(np.float64) - last_x)).astype(np.float32)
        out.steps.extend(Step(row, None, t, (), True) for row, t in zip(rows, times.tolist()))
        self.counters["filled"] += missing

    # ---- time stage: resampling ------------------------------------------------------------------
    def _emit(self, s: StreamTiming, out: Released, x, t: float, filled: bool = False, tokens: tuple = ()) -> None:
        out.steps.append(Step(x, None, t, tokens, filled, s.reset_next))
        s.reset_next = False

    def _gap_points(self, s: StreamTiming, ts: float, first: int, offset: float, inclusive: bool) -> int:
        """Grid points ``first``.. with ``t0 + (j + offset) P`` before ``ts``, counted up to the fill limit."""
        t0, period, n = s.t0, self._period, 0
        while n < self._fill_limit and (t0 + (first + n + offset) * period <= ts if inclusive
                                        else t0 + (first + n + offset) * period < ts):
            n += 1
        return n

    def _bridge(self, n: int) -> bool:
        """Count a gap of ``n`` unsupported grid points; True: fill them, False: restart the grid."""
        self.counters["gap"] += 1
        if self._fills and n <= self.policy.max_fill:
            self.counters["filled"] += n
            return True
        if self.policy.gap_policy != "ignore":
            self.counters["gap_reset"] += 1
        return False

    def _upsample(self, s: StreamTiming, x, seq, ts, token, out: Released) -> None:
        if not self._usable(ts):
            out.dropped.append(token)
            return
        if s.t0 is not None and ts < s.last_ts:
            self.counters["ts_backwards"] += 1
            s.t0 = None
        filled = False
        if s.t0 is not None and ts - s.last_ts >= self._gap_span:
            n = self._gap_points(s, ts, s.k, 0.0, inclusive=False)
            if n:
                filled = self._bridge(n)
                if not filled:
                    s.reset_next = self.policy.gap_policy != "ignore"
                    s.t0 = None
        if s.t0 is None:  # the grid starts at this sample
            s.t0, s.k = ts, 0
            s.last_ts, s.last_x = ts, x
        a_ts, a_x, t0, period, k = s.last_ts, s.last_x, s.t0, self._period, s.k
        first = len(out.steps)
        while (t := t0 + k * period) <= ts:
            if t == ts:
                self._emit(s, out, x, t)
            elif filled and self._hold:
                self._emit(s, out, a_x, t, True)
            else:
                fraction = (t - a_ts) / (ts - a_ts)
                self._emit(s, out, (a_x + fraction * (x.astype(np.float64) - a_x)).astype(np.float32), t, filled)
            k += 1
        s.k, s.last_ts, s.last_x = k, ts, x
        s.pending.append(token)
        if len(out.steps) > first:
            out.steps[-1].tokens = tuple(s.pending)
            s.pending = []
        elif len(s.pending) == 1:
            self._wait_from_now(s)

    def _decimate(self, s: StreamTiming, x, seq, ts, token, out: Released) -> None:
        if not self._usable(ts):
            out.dropped.append(token)
            return
        if s.t0 is None:
            s.t0, s.k = ts, 0
            self._open_cell(s, x, ts, token)
            return
        period = self._period
        if ts < s.last_ts:
            self.counters["ts_backwards"] += 1
            self._close_cell(s, out)
            s.t0, s.k = ts, 0
            self._open_cell(s, x, ts, token)
            return
        if not s.cell_count and ts < s.t0 + (s.k - 0.5) * period:  # its cell was closed by the timeout
            self.counters["late"] += 1
            out.dropped.append(token)
            return
        if ts < s.t0 + (s.k + 0.5) * period:  # the open cell goes on: the common case
            if not s.cell_count:  # ... or opens: the last one was closed by the timeout
                self._open_cell(s, x, ts, token)
                return
            s.cell_sum += x
            s.cell_count += 1
            s.cell_tokens.append(token)
            s.last_ts, s.last_x = ts, x
            return
        filled = False
        a_ts, a_x = s.last_ts, s.last_x
        if ts - a_ts >= self._gap_span:
            first_empty = s.k + 1 if s.cell_count else s.k
            n = self._gap_points(s, ts, first_empty, 0.5, inclusive=True)  # empty cells ending by ts
            if n:
                filled = self._bridge(n)
                if not filled:
                    self._close_cell(s, out)
                    s.reset_next = self.policy.gap_policy != "ignore"
                    s.t0, s.k = ts, 0
                    self._open_cell(s, x, ts, token)
                    return
        self._close_cell(s, out)
        t0, k = s.t0, s.k
        while t0 + (k + 0.5) * period <= ts:  # cells no sample fell in
            t = t0 + k * period
            if filled and self._hold:
                self._emit(s, out, a_x, t, True)
            else:
                fraction = (t - a_ts) / (ts - a_ts)
                self._emit(s, out, (a_x + fraction * (x.astype(np.float64) - a_x)).astype(np.float32), t, filled)
            k += 1
        s.k = k
        self._open_cell(s, x, ts, token)

    def _open_cell(self, s: StreamTiming, x, ts: float, token) -> None:
        s.cell_sum = x.astype(np.float64)
        s.cell_count = 1
        s.cell_tokens = [token]
        s.last_ts, s.last_x = ts, x
        self._wait_from_now(s)

    def _close_cell(self, s: StreamTiming, out: Released) -> None:
        """Emit the open cell's mean at its grid point, with its samples' tokens (none open: nothing)."""
        if not s.cell_count:
            return
        mean = (s.cell_sum / s.cell_count).astype(np.float32)
        self._emit(s, out, mean, s.t0 + s.k * self._period, tokens=tuple(s.cell_tokens))
        s.k += 1
        s.cell_sum, s.cell_count, s.cell_tokens = None, 0, []
