"""Per-stream sensor time (runtime/timing.py): reorder window, gap policies, resampling, bad ts, tokens.

The oracles are offline computations over the whole stream (sorted by seq, filled with np.interp or
np.repeat, resampled with np.interp or block means), compared with what the online stage releases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgernn.runtime.timing import COUNTERS, SEQ_RESTART_DISTANCE, Timing, TimingPolicy

P = 0.125  # model period (8 Hz); binary fractions keep grid times exact in the resampling oracles
TOL = dict(rtol=0, atol=1e-6)


def xs(n: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, channels)).astype(np.float32)


def feed(timing: Timing, messages, key="s", now: float = 0.0):
    """Offer (seq, ts, x, token) messages in the given order; all steps and dropped tokens, in order."""
    steps, dropped = [], []
    for seq, ts, x, token in messages:
        released = timing.offer(key, x, seq, ts, token, now)
        steps += released.steps
        dropped += released.dropped
    return steps, dropped


def flush(timing: Timing, key="s"):
    """Everything still held by the reorder window, released by its timeout."""
    steps, dropped = [], []
    for released_key, released in timing.due(math.inf):
        assert released_key == key
        steps += released.steps
        dropped += released.dropped
    return steps, dropped


def tokens_of(steps) -> list:
    return [token for step in steps for token in step.tokens]


def offline_gaps(samples, policy: str, max_fill: int, period: float = P):
    """The steps a stream sorted by seq should make: [(x, ts, filled, reset_before, seq)]."""
    out = []
    for i, (seq, ts, x) in enumerate(samples):
        reset = False
        if i and policy != "ignore":
            prev_ts, prev_x = samples[i - 1][1], samples[i - 1][2]
            missing = int(np.floor((ts - prev_ts) / period + 0.5)) - 1
            if missing >= 1:
                if policy == "reset" or missing > max_fill:
                    reset = True
                else:
                    times = prev_ts + period * np.arange(1, missing + 1)
                    if policy == "hold":
                        fills = np.repeat(prev_x[None, :], missing, axis=0)
                    else:
                        fills = np.stack([np.interp(times, [prev_ts, ts], [prev_x[c], x[c]])
                                          for c in range(len(x))], axis=1)
                    out += [(row, t, True, False, None) for row, t in zip(fills, times)]
        out.append((x, ts, False, reset, seq))
    return out


def check_steps(steps, expected) -> None:
    assert len(steps) == len(expected)
    for step, (x, ts, filled, reset, seq) in zip(steps, expected):
        assert step.x.dtype == np.float32 and step.x.shape == np.shape(x)
        np.testing.assert_allclose(step.x, x, **TOL)
        assert step.ts == pytest.approx(ts, abs=1e-12)
        assert (step.filled, step.reset_before, step.seq) == (filled, reset, seq)


# ---- policy --------------------------------------------------------------------------------------
def test_default_policy_is_inactive_and_passes_everything_through():
    policy = TimingPolicy()
    assert not policy.active
    assert TimingPolicy(gap_policy="ignore", sample_period=P, input_rate=1 / P).active is False
    timing = Timing(policy)
    X = list(xs(3))
    steps, dropped = feed(timing, [(2, 0.0, X[0], "a"), (1, 0.0, X[1], "b"), (1, None, X[2], "c")])
    assert [s.tokens for s in steps] == [("a",), ("b",), ("c",)] and dropped == []
    assert [s.x is x for s, x in zip(steps, X)] == [True] * 3
    assert timing.held_tokens() == [] and set(timing.counters) == set(COUNTERS)


@pytest.mark.parametrize("options, option", [
    (dict(reorder_window=-1), "reorder_window"),
    (dict(reorder_window=True, reorder_timeout=1.0), "reorder_window"),
    (dict(reorder_window=4), "reorder_timeout"),  # a window needs a timeout
    (dict(reorder_timeout=math.nan), "reorder_timeout"),
    (dict(gap_policy="fill", sample_period=P), "gap_policy"),
    (dict(gap_policy="hold"), "gap_policy"),  # no sample period
    (dict(gap_policy="hold", sample_period=P, max_fill=-1), "max_fill"),
    (dict(gap_policy="hold", sample_period=P, max_fill=10**9), "max_fill"),
    (dict(sample_period=0.0), "sample_period"),
    (dict(sample_period=P, input_rate=math.inf), "input_rate"),
    (dict(input_rate=10.0), "input_rate"),  # no sample period
])
def test_bad_policy_names_the_option(options, option):
    with pytest.raises(ValueError, match=f"timing option {option} = "):
        TimingPolicy(**options)


def test_seq_restart_distance_matches_the_pipeline():
    from edgernn.runtime.pipeline import SEQ_RESTART_DISTANCE as PIPELINE_DISTANCE

    assert SEQ_RESTART_DISTANCE == PIPELINE_DISTANCE


# ---- reorder window ------------------------------------------------------------------------------
def test_reordering_within_the_window_gives_seq_order():
    timing = Timing(TimingPolicy(reorder_window=3, reorder_timeout=1.0))
    order = [1, 0, 3, 2, 5, 4, 7, 6, 8, 9]
    X = xs(10)
    steps, dropped = feed(timing, [(seq, None, X[seq], seq) for seq in order])
    late_steps, _ = flush(timing)
    steps += late_steps
    assert [s.seq for s in steps] == list(range(10)) and dropped == []
    assert tokens_of(steps) == list(range(10))
    np.testing.assert_array_equal(np.stack([s.x for s in steps]), X)
    assert timing.counters["reordered"] == 4 and timing.counters["seq_skipped"] == 0
    assert timing.held_tokens() == []


def test_in_order_stream_is_held_only_at_its_start():
    timing = Timing(TimingPolicy(reorder_window=4, reorder_timeout=0.5))
    X = xs(6)
    first, _ = feed(timing, [(10, None, X[0], "t10")], now=0.0)
    assert first == [] and timing.held_tokens() == ["t10"]  # its predecessor may still come
    assert timing.next_deadline() == 0.5
    assert timing.due(0.49) == []
    [(key, released)] = timing.due(0.5)
    assert key == "s" and [s.seq for s in released.steps] == [10]
    for seq in range(11, 16):  # now every next seq passes at once
        steps, _ = feed(timing, [(seq, None, X[seq - 10], seq)], now=1.0)
        assert [s.seq for s in steps] == [seq]
    assert timing.held_tokens() == [] and timing.next_deadline() is None


def test_late_and_duplicate_messages_are_counted_and_dropped():
    timing = Timing(TimingPolicy(reorder_window=2, reorder_timeout=1.0))
    X = xs(4)
    steps, dropped = feed(timing, [(0, None, X[0], "0"), (1, None, X[1], "1"), (3, None, X[3], "3")])
    assert [s.seq for s in steps] == [0, 1] and dropped == []  # the window overflowed: 0, then 1 in line
    steps, dropped = feed(timing, [(1, None, X[1], "1 again"), (3, None, X[3], "3 again")])
    assert steps == [] and dropped == ["1 again", "3 again"]  # released, and held
    assert timing.counters["duplicate"] == 2
    [(_, released)] = timing.due(1.0)  # 2 never came: 3 goes on alone
    assert [s.seq for s in released.steps] == [3] and timing.counters["seq_skipped"] == 1
    steps, dropped = feed(timing, [(2, None, X[2], "2 late")])
    assert steps == [] and dropped == ["2 late"] and timing.counters["late"] == 1
    steps, _ = feed(timing, [(4, None, X[0], "4")])  # the stream goes on from 3, untouched
    assert [s.seq for s in steps] == [4]
    assert timing.counters["duplicate"] == 2 and timing.held_tokens() == []


def test_timeout_releases_up_to_the_expired_sample_per_stream():
    timing = Timing(TimingPolicy(reorder_window=10, reorder_timeout=1.0))
    X = xs(8)
    feed(timing, [(0, None, X[0], "a0")], key="a", now=0.0)
    feed(timing, [(5, None, X[5], "a5"), (3, None, X[3], "a3")], key="a", now=0.5)
    feed(timing, [(7, None, X[7], "b7")], key="b", now=0.8)
    assert sorted(timing.held_tokens()) == ["a0", "a3", "a5", "b7"]
    [(key, released)] = timing.due(1.0)  # only a0 has waited a second
    assert key == "a" and [s.seq for s in released.steps] == [0]
    assert timing.next_deadline() == 1.5
    released = dict(timing.due(1.6))  # a3 and a5 (held since 0.5): in seq order; b7 not yet
    assert list(released) == ["a"] and [s.seq for s in released["a"].steps] == [3, 5]
    assert [s.seq for s in dict(timing.due(1.8))["b"].steps] == [7]
    assert timing.counters["seq_skipped"] == 2 + 1  # 1, 2 and 4
    assert timing.due(100.0) == [] and timing.next_deadline() is None


def test_a_restarted_seq_counter_starts_the_order_again():
    timing = Timing(TimingPolicy(reorder_window=2, reorder_timeout=1.0))
    X = xs(4)
    feed(timing, [(5000, None, X[0], "old0")])
    flush(timing)
    steps, _ = feed(timing, [(5001, None, X[1], "old1"), (5003, None, X[3], "old3")])
    assert [s.seq for s in steps] == [5001]
    steps, dropped = feed(timing, [(0, None, X[2], "new0"), (1, None, X[3], "new1")])
    assert dropped == [] and timing.counters["seq_restart"] == 1 and timing.counters["late"] == 0
    assert [s.seq for s in steps] == [5003]  # what was held goes first; 0 waits for its window
    steps, _ = flush(timing)
    assert [s.seq for s in steps] == [0, 1]


def test_messages_without_seq_pass_straight_through_the_window():
    timing = Timing(TimingPolicy(reorder_window=3, reorder_timeout=1.0))
    X = xs(3)
    steps, _ = feed(timing, [(7, None, X[0], "held"), (None, None, X[1], "no seq")])
    assert [s.tokens for s in steps] == [("no seq",)] and timing.held_tokens() == ["held"]


def test_forget_hands_back_the_held_tokens():
    timing = Timing(TimingPolicy(reorder_window=3, reorder_timeout=1.0))
    X = xs(3)
    feed(timing, [(4, None, X[0], "x4"), (2, None, X[1], "x2")], key="gone")
    feed(timing, [(1, None, X[2], "y1")], key="kept")
    assert timing.forget("gone") == ["x2", "x4"] and timing.forget("gone") == []
    assert timing.counters["forgotten"] == 2 and len(timing) == 1
    assert [key for key, _ in timing.due(math.inf)] == ["kept"]  # the forgotten stream's deadlines are stale


# ---- gaps ----------------------------------------------------------------------------------------
def gapped_stream(n: int = 24, seed: int = 3):
    """(seq, ts, x): ts on the P grid with jitter under P/5, and gaps of 1..6 missing steps."""
    rng = np.random.default_rng(seed)
    ticks = np.cumsum(np.where(rng.random(n) < 0.3, rng.integers(2, 8, n), 1))
    ts = 100.0 + ticks * P + rng.uniform(-0.2, 0.2, n) * P
    X = xs(n, 3, seed)
    return [(seq, float(ts[seq]), X[seq]) for seq in range(n)]


@pytest.mark.parametrize("policy", ["ignore", "hold", "interpolate", "reset"])
@pytest.mark.parametrize("max_fill", [0, 3, 100])
def test_gap_policies_match_the_offline_computation(policy, max_fill):
    samples = gapped_stream()
    timing = Timing(TimingPolicy(gap_policy=policy, max_fill=max_fill, sample_period=P))
    steps, dropped = feed(timing, [(seq, ts, x, seq) for seq, ts, x in samples])
    expected = offline_gaps(samples, policy, max_fill)
    check_steps(steps, expected)
    assert dropped == [] and tokens_of(steps) == list(range(len(samples)))
    assert timing.counters["filled"] == sum(e[2] for e in expected)
    assert timing.counters["gap_reset"] == sum(e[3] for e in expected)
    assert policy == "ignore" or timing.counters["gap"] > 0


def test_jitter_within_half_a_period_is_one_step():
    timing = Timing(TimingPolicy(gap_policy="interpolate", max_fill=10, sample_period=P))
    ts = [0.0, 1.49 * P, 2.0 * P, 2.51 * P, 4.0 * P]  # gaps of 1.49 P, 0.51 P, 0.51 P and 1.49 P
    X = xs(len(ts))
    steps, _ = feed(timing, [(i, t, X[i], i) for i, t in enumerate(ts)])
    assert [s.seq for s in steps] == [0, 1, 2, 3, 4] and timing.counters["gap"] == 0
    steps, _ = feed(timing, [(5, 5.5 * P, X[0], 5)])  # 1.5 P: one step is missing
    assert [(s.filled, s.seq) for s in steps] == [(True, None), (False, 5)]
    assert steps[0].ts == pytest.approx(5.0 * P)


@pytest.mark.parametrize("policy", ["hold", "interpolate"])
def test_a_gap_longer_than_max_fill_resets_without_fills(policy):
    timing = Timing(TimingPolicy(gap_policy=policy, max_fill=3, sample_period=P))
    X = xs(3)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, 4 * P, X[1], 1)])  # 3 missing: filled
    assert [s.filled for s in steps] == [False, True, True, True, False]
    steps, _ = feed(timing, [(2, 9 * P, X[2], 2)])  # 4 missing: more than max_fill
    assert len(steps) == 1 and steps[0].reset_before and not steps[0].filled
    assert timing.counters == {**dict.fromkeys(COUNTERS, 0), "gap": 2, "filled": 3, "gap_reset": 1}


def test_hold_copies_share_the_last_sample():
    timing = Timing(TimingPolicy(gap_policy="hold", max_fill=5, sample_period=P))
    X = list(xs(2))
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, 3 * P, X[1], 1)])
    assert [s.x is X[0] for s in steps[1:3]] == [True, True] and [s.tokens for s in steps[1:3]] == [(), ()]


# ---- bad ts (gap mode) ---------------------------------------------------------------------------
def test_missing_ts_passes_unfilled_and_no_gap_is_measured_across_it():
    timing = Timing(TimingPolicy(gap_policy="interpolate", max_fill=10, sample_period=P))
    X = xs(4)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, None, X[1], 1), (2, 5 * P, X[2], 2), (3, math.inf, X[3], 3)])
    assert [(s.seq, s.filled, s.reset_before) for s in steps] == [(i, False, False) for i in range(4)]
    assert timing.counters["ts_missing"] == 2 and timing.counters["gap"] == 0


def test_backwards_ts_is_stepped_without_fills_and_reanchors_the_clock():
    timing = Timing(TimingPolicy(gap_policy="hold", max_fill=10, sample_period=P))
    X = xs(5)
    ts = [10.0, 10.0 + P, 10.0 + P, 2.0, 2.0 + P]  # a repeated ts, then a clock set back by 8 s
    steps, _ = feed(timing, [(i, t, X[i], i) for i, t in enumerate(ts)])
    assert [(s.seq, s.filled, s.reset_before) for s in steps] == [(i, False, False) for i in range(5)]
    assert timing.counters["ts_backwards"] == 2 and timing.counters["gap"] == 0


@pytest.mark.parametrize("jump", [1e6 * P, 1.7e9])  # the second: a clock set from 0 to Unix time
@pytest.mark.parametrize("policy", ["hold", "interpolate", "reset"])
def test_an_absurd_jump_resets_and_never_fills(policy, jump):
    timing = Timing(TimingPolicy(gap_policy=policy, max_fill=50, sample_period=P))
    X = xs(2)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, jump, X[1], 1)])
    assert [(s.seq, s.reset_before) for s in steps] == [(0, False), (1, True)]
    assert timing.counters["filled"] == 0 and timing.counters["gap_reset"] == 1


def test_a_ts_too_large_to_resolve_the_period_counts_as_missing():
    timing = Timing(TimingPolicy(gap_policy="interpolate", max_fill=5, sample_period=P))
    X = xs(4)
    ts = [0.0, 1.7e308, -1e300, 3 * P]  # the last: no gap measured across the bad ones
    steps, _ = feed(timing, [(i, t, X[i], i) for i, t in enumerate(ts)])
    assert [(s.seq, s.filled, s.reset_before) for s in steps] == [(i, False, False) for i in range(4)]
    assert timing.counters["ts_out_of_range"] == 2 and timing.counters["gap"] == 0


# ---- resampling ----------------------------------------------------------------------------------
def resample(timing: Timing, ts, X):
    steps, dropped = feed(timing, [(i, float(t), X[i], i) for i, t in enumerate(ts)])
    assert dropped == []
    return steps


def offline_resample(ts, X, period: float, decimating: bool):
    """Grid points t_k = ts[0] + k P that the samples close: (t, x) by np.interp or cell means."""
    out, k = [], 0
    while True:
        t = ts[0] + k * period
        end = ts[0] + (k + 0.5) * period
        if (end if decimating else t) > ts[-1]:
            return out
        in_cell = (ts >= ts[0] + (k - 0.5) * period) & (ts < end)
        if decimating and in_cell.any():
            out.append((t, X[in_cell].astype(np.float64).mean(axis=0)))
        else:
            out.append((t, np.array([np.interp(t, ts, X[:, c]) for c in range(X.shape[1])])))
        k += 1


def check_resampled(steps, expected) -> None:
    assert len(steps) == len(expected)
    for step, (t, x) in zip(steps, expected):
        assert step.ts == pytest.approx(t, abs=1e-12) and step.seq is None and not step.filled
        np.testing.assert_allclose(step.x, x, **TOL)


def test_upsampling_2x_is_np_interp_on_the_model_grid():
    timing = Timing(TimingPolicy(sample_period=P, input_rate=4.0))
    n = 20
    ts, X = 3.0 + 2 * P * np.arange(n), xs(n)
    steps = resample(timing, ts, X)
    grid = 3.0 + P * np.arange(2 * n - 1)
    check_resampled(steps, [(t, [np.interp(t, ts, X[:, c]) for c in range(2)]) for t in grid])
    assert tokens_of(steps) == list(range(n)) and timing.held_tokens() == []
    assert [s.tokens for s in steps[:4]] == [(0,), (), (1,), ()]  # each sample answers at its own grid point


def test_decimating_2x_is_block_means():
    timing = Timing(TimingPolicy(sample_period=P, input_rate=16.0))
    n = 21
    ts, X = P / 2 * np.arange(n), xs(n)
    steps = resample(timing, ts, X)
    # cell k = [kP - P/2, kP + P/2) holds samples 2k-1 and 2k (cell 0 only sample 0); k closes at sample 2k+1
    means = [X[0]] + [X[2 * k - 1:2 * k + 1].astype(np.float64).mean(axis=0) for k in range(1, (n - 1) // 2)]
    check_resampled(steps, [(k * P, m) for k, m in enumerate(means)])
    assert [s.tokens for s in steps[:3]] == [(0,), (1, 2), (3, 4)]
    assert timing.held_tokens() == [n - 2, n - 1]  # the open cell waits for a sample past its end
    assert tokens_of(steps) + timing.held_tokens() == list(range(n))


@pytest.mark.parametrize("input_rate", [3.0, 5.5, 11.0, 30.0])
def test_resampling_with_jitter_matches_the_offline_resampler(input_rate):
    rng = np.random.default_rng(int(input_rate * 10))
    n = 60
    ts = 7.0 + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / input_rate
    X = xs(n, 3, seed=5)
    timing = Timing(TimingPolicy(gap_policy="reset", sample_period=P, input_rate=input_rate))
    steps = resample(timing, ts, X)
    check_resampled(steps, offline_resample(ts, X, P, decimating=input_rate > 1 / P))
    assert timing.counters["gap"] == 0 and not any(s.reset_before for s in steps)
    assert sorted(tokens_of(steps) + timing.held_tokens()) == list(range(n))


UP_GAP_TS = [0.0, 0.25, 0.5, 1.0, 1.25]  # 4 Hz into an 8 Hz model; the sample at 0.75 is missing


@pytest.mark.parametrize("policy, max_fill", [("interpolate", 3), ("hold", 3), ("interpolate", 2),
                                              ("reset", 3), ("ignore", 3)])
def test_upsampling_across_a_gap(policy, max_fill):
    ts, X = np.array(UP_GAP_TS), xs(5)
    timing = Timing(TimingPolicy(gap_policy=policy, max_fill=max_fill, sample_period=P, input_rate=4.0))
    steps = resample(timing, ts, X)
    interp = offline_resample(ts, X, P, decimating=False)
    assert [s.ts for s in steps[:5]] == [0.0, 0.125, 0.25, 0.375, 0.5]
    if policy in ("interpolate", "hold") and max_fill >= 3:  # 0.625, 0.75 and 0.875 are filled
        assert [s.ts for s in steps] == [t for t, _ in interp]
        assert [s.filled for s in steps] == [False] * 5 + [True] * 3 + [False] * 3
        fills = [X[2]] * 3 if policy == "hold" else [x for _, x in interp[5:8]]
        np.testing.assert_allclose(np.stack([s.x for s in steps[5:8]]), np.stack(fills), **TOL)
        assert timing.counters["filled"] == 3 and timing.counters["gap_reset"] == 0
    else:  # the gap's points dropped; the grid starts again at 1.0
        assert [s.ts for s in steps[5:]] == [1.0, 1.125, 1.25]
        assert [s.reset_before for s in steps] == [False] * 5 + [policy != "ignore", False, False]
        np.testing.assert_allclose(steps[5].x, X[3], **TOL)
        np.testing.assert_allclose(steps[6].x, (X[3].astype(np.float64) + X[4]) / 2, **TOL)
        assert timing.counters["gap_reset"] == (policy != "ignore") and timing.counters["filled"] == 0
    assert timing.counters["gap"] == 1 and tokens_of(steps) == list(range(5))


@pytest.mark.parametrize("policy, max_fill", [("interpolate", 2), ("hold", 2), ("interpolate", 1), ("reset", 2)])
def test_decimating_across_a_gap(policy, max_fill):
    # 16 Hz into 8 Hz, samples 5..9 missing: cells 3 and 4 (centres 0.375, 0.5) are empty
    keep = [j for j in range(14) if not 5 <= j <= 9]
    ts, X = P / 2 * np.array(keep, float), xs(len(keep))
    timing = Timing(TimingPolicy(gap_policy=policy, max_fill=max_fill, sample_period=P, input_rate=16.0))
    steps = resample(timing, ts, X)
    means = [X[0], X[1:3].mean(0), X[3:5].mean(0)]  # cells 0..2, before the gap
    np.testing.assert_allclose(np.stack([s.x for s in steps[:3]]), np.stack(means), **TOL)
    if max_fill >= 2 and policy != "reset":
        gap_x = [X[4], X[4]] if policy == "hold" else [[np.interp(t, ts[4:6], X[4:6, c]) for c in range(2)]
                                                        for t in (0.375, 0.5)]
        assert [(s.ts, s.filled) for s in steps[3:5]] == [(0.375, True), (0.5, True)]
        np.testing.assert_allclose(np.stack([s.x for s in steps[3:5]]), np.array(gap_x), **TOL)
        # cell 5 = [0.5625, 0.6875) holds 0.625; cell 6 = [0.6875, 0.8125) holds 0.6875, 0.75
        assert [s.ts for s in steps[5:]] == [0.625, 0.75] and not any(s.reset_before for s in steps)
    else:  # the grid starts again at 0.625: cells [0.5625, 0.6875) -> 0.625 alone, then 0.6875 and 0.75
        assert [(s.ts, s.reset_before) for s in steps[3:]] == [(0.625, True), (0.75, False)]
        np.testing.assert_allclose(steps[4].x, X[6:8].mean(0), **TOL)
    assert timing.counters["gap"] == 1 and timing.held_tokens() == [len(keep) - 1]


@pytest.mark.parametrize("input_rate", [4.0, 16.0])
def test_resampling_bad_ts(input_rate):
    timing = Timing(TimingPolicy(gap_policy="interpolate", max_fill=5, sample_period=P, input_rate=input_rate))
    X = xs(6)
    steps, dropped = feed(timing, [(0, 50.0, X[0], 0), (1, None, X[1], 1), (2, math.nan, X[2], 2)])
    assert dropped == [1, 2] and timing.counters["ts_missing"] == 2  # no place on the grid
    back, _ = feed(timing, [(3, 40.0, X[3], 3)])  # the clock went back: re-anchored, no reset
    assert timing.counters["ts_backwards"] == 1 and not any(s.reset_before or s.filled for s in back)
    jumps, _ = feed(timing, [(4, 40.0 + 1e9, X[4], 4), (5, 40.0 + 2e12, X[5], 5)])  # absurd jumps: resets
    assert timing.counters["gap_reset"] == 2 and timing.counters["filled"] == 0 and len(jumps) <= 3
    far, far_dropped = feed(timing, [(6, 1e300, X[0], 6)])  # no grid step can be told apart there
    assert far == [] and far_dropped == [6] and timing.counters["ts_out_of_range"] == 1
    everything = tokens_of(steps + back + jumps) + dropped + far_dropped + timing.held_tokens()
    assert sorted(everything) == list(range(7))


def test_a_silent_decimating_stream_closes_its_open_cell_after_a_period_plus_the_timeout():
    timing = Timing(TimingPolicy(reorder_timeout=0.2, sample_period=P, input_rate=16.0))
    X = xs(5)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, P / 2, X[1], 1)], now=10.0)  # cell 1 opens at 10.0
    assert [s.tokens for s in steps] == [(0,)] and timing.held_tokens() == [1]
    assert timing.next_deadline() == pytest.approx(10.0 + P + 0.2)
    assert timing.due(10.0 + P + 0.19) == []
    [(key, released)] = timing.due(10.0 + P + 0.2)  # the stream fell silent: cell 1 closes with what it has
    assert key == "s" and released.dropped == [] and [(s.ts, s.tokens) for s in released.steps] == [(P, (1,))]
    np.testing.assert_allclose(released.steps[0].x, X[1], **TOL)
    assert timing.held_tokens() == [] and timing.next_deadline() is None and timing.counters["hold_timeout"] == 1
    late, dropped = feed(timing, [(2, P, X[2], 2)], now=11.0)  # cell 1's second sample, too late: dropped
    assert late == [] and dropped == [2] and timing.counters["late"] == 1
    on, _ = feed(timing, [(3, 3 * P / 2, X[3], 3), (4, 2 * P, X[4], 4), (5, 5 * P / 2, X[0], 5)], now=11.0)
    assert [(s.ts, s.tokens) for s in on] == [(2 * P, (3, 4))]  # cell 2 as if nothing happened
    assert timing.counters["gap"] == 0 and timing.held_tokens() == [5]


def test_a_silent_decimating_stream_coming_back_after_a_gap_fills_from_the_first_unopened_cell():
    timing = Timing(TimingPolicy(reorder_timeout=0.2, gap_policy="interpolate", max_fill=4, sample_period=P,
                                 input_rate=16.0))
    X = xs(3)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, P / 2, X[1], 1)])
    [(_, released)] = timing.due(math.inf)  # cell 1 closed by the timeout
    back, _ = feed(timing, [(2, 4 * P, X[2], 2)])  # cells 2 and 3 empty: filled, then cell 4 opens
    assert [(s.ts, s.filled) for s in steps + released.steps + back] == [(0.0, False), (P, False),
                                                                         (2 * P, True), (3 * P, True)]
    assert timing.counters["filled"] == 2 and timing.held_tokens() == [2]


def test_a_sample_that_completes_no_grid_point_is_finished_when_its_stream_falls_silent():
    timing = Timing(TimingPolicy(reorder_timeout=0.2, sample_period=P, input_rate=7.0))
    X = xs(3)
    steps, _ = feed(timing, [(0, 0.0, X[0], 0), (1, 0.1, X[1], 1)], now=5.0)  # 0.1: before the point at P
    assert [s.tokens for s in steps] == [(0,)] and timing.held_tokens() == [1]
    assert timing.next_deadline() == pytest.approx(5.0 + 1 / 7.0 + 0.2)
    [(_, released)] = timing.due(6.0)
    assert released.steps == [] and released.dropped == [1] and timing.counters["hold_timeout"] == 1
    later, _ = feed(timing, [(2, 0.3, X[2], 2)], now=7.0)  # still interpolated from the sample at 0.1
    assert [s.ts for s in later] == [P, 2 * P] and later[-1].tokens == (2,)
    np.testing.assert_allclose(later[0].x, X[1] + (P - 0.1) / 0.2 * (X[2].astype(np.float64) - X[1]), **TOL)


@pytest.mark.parametrize("options", [dict(gap_policy="interpolate", max_fill=10), dict(input_rate=16.0)])
def test_without_a_window_a_repeated_seq_is_dropped_before_it_moves_the_clock_or_joins_a_cell(options):
    timing = Timing(TimingPolicy(sample_period=P, **options))
    X = xs(4)
    steps, dropped = feed(timing, [(0, 0.0, X[0], 0), (1, P / 2, X[1], 1), (0, 0.0, X[0], "again"),
                                   (2, P, X[2], 2), (3, 3 * P / 2, X[3], 3)])
    assert dropped == ["again"] and timing.counters["duplicate"] == 1
    assert timing.counters["ts_backwards"] == 0 and timing.counters["filled"] == 0
    if "input_rate" in options:  # cell 1 = samples 1 and 2, not the repeat
        np.testing.assert_allclose(steps[1].x, (X[1].astype(np.float64) + X[2]) / 2, **TOL)
    _, kept = feed(timing, [(SEQ_RESTART_DISTANCE + 3, 2 * P, X[0], 4), (0, 5 * P / 2, X[1], "restarted")])
    assert kept == [] and timing.counters["duplicate"] == 1  # far below the last: a restarted counter, kept


def test_a_key_whose_samples_are_all_dropped_leaves_nothing_behind():
    timing = Timing(TimingPolicy(sample_period=P, input_rate=16.0))
    for i in range(1000):
        _, dropped = feed(timing, [(None, None, xs(1)[0], i)], key=f"k{i}")  # no ts: no place on the grid
        assert dropped == [i]
    assert len(timing) == 0


# ---- everything together -------------------------------------------------------------------------
@st.composite
def shuffled_gapped_streams(draw):
    """A gapped stream, delivered in an order the window can undo, with some messages sent twice."""
    n = draw(st.integers(1, 30))
    window = draw(st.integers(1, 5))
    ticks = np.cumsum(draw(st.lists(st.sampled_from([1, 1, 1, 1, 2, 3, 6]), min_size=n, max_size=n)))
    jitter = np.array(draw(st.lists(st.floats(-0.2, 0.2), min_size=n, max_size=n)))
    ts = 10.0 + (ticks + jitter) * P
    # a message is overtaken by at most window - 1 later ones: sort by seq + a delay of 0..window - 1
    delays = draw(st.lists(st.integers(0, window - 1), min_size=n, max_size=n))
    order = sorted(range(n), key=lambda i: (i + delays[i], i))
    twice = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    policy = draw(st.sampled_from(["ignore", "hold", "interpolate", "reset"]))
    return n, window, ts, order, twice, policy, draw(st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(shuffled_gapped_streams())
def test_shuffled_within_the_window_equals_the_offline_result(case):
    n, window, ts, order, twice, policy, max_fill = case
    X = xs(n, 2, seed=n)
    timing = Timing(TimingPolicy(reorder_window=window, reorder_timeout=1.0, gap_policy=policy,
                                 max_fill=max_fill, sample_period=P))
    messages = []
    for seq in order:
        messages.append((seq, float(ts[seq]), X[seq], f"m{seq}"))
        if twice[seq]:
            messages.append((seq, float(ts[seq]), X[seq], f"copy{seq}"))
    steps, dropped = feed(timing, messages)
    more, more_dropped = flush(timing)
    steps, dropped = steps + more, dropped + more_dropped
    check_steps(steps, offline_gaps([(seq, float(ts[seq]), X[seq]) for seq in range(n)], policy, max_fill))
    assert tokens_of(steps) == [f"m{seq}" for seq in range(n)]
    assert sorted(dropped) == sorted(f"copy{seq}" for seq in range(n) if twice[seq])
    assert timing.held_tokens() == [] and timing.counters["duplicate"] == sum(twice)
    assert timing.counters["late"] == timing.counters["seq_skipped"] == 0
