"""firmware_sim.schedule: sample times on a fixed grid (no drift), and the lag meter."""

import random

import pytest

from edgernn.firmware_sim.schedule import FileTimes, LagMeter, Periodic


def test_periodic_times_stay_on_the_grid_with_bounded_jitter():
    schedule = Periodic(50.0, start=100.0, phase=0.007, jitter=0.1, rng=random.Random(1))
    times = [schedule.next() for _ in range(200_000)]
    grid = [100.007 + k / 50.0 for k in range(200_000)]
    assert max(abs(t - g) for t, g in zip(times, grid)) <= 0.1 / 50.0 + 1e-9  # no drift after an hour of samples
    assert all(b > a for a, b in zip(times, times[1:]))
    assert schedule.due_by(100.007 + 10.0) == 501
    assert schedule.due_by(99.0) == 0


def test_periodic_refuses_a_jitter_that_could_reorder_samples():
    with pytest.raises(ValueError, match="jitter"):
        Periodic(50.0, 0.0, jitter=0.5)


class Rows:
    def __init__(self, times):
        self.times = list(times)

    def peek_time(self):
        return self.times[0] if self.times else None

    def next(self):
        self.times.pop(0)
        return [0.0], None


def test_file_times_follow_the_file_scaled_by_speed():
    rows = Rows([1000.0, 1000.5, 1002.0])
    schedule = FileTimes(rows, start=10.0, speed=2.0)
    due = []
    while (t := schedule.next()) is not None:
        due.append(t)
        rows.next()
    assert due == [10.0, 10.25, 11.0]
    assert schedule.due_by(11.0) == 3


def test_file_times_count_the_row_scheduled_next_only_once_it_is_due():
    rows = Rows([1000.0, 1000.5, 1002.0])
    schedule = FileTimes(rows, start=10.0)
    assert schedule.due_by(10.0) == 0
    schedule.next()  # the first row: due at 10.0, taken
    rows.next()
    assert schedule.due_by(10.2) == 1
    schedule.next()  # the second: scheduled for 10.5; the replay stops at 10.2, before it is taken
    assert schedule.due_by(10.2) == 1
    assert schedule.due_by(10.5) == 2


def test_lag_meter_counts_late_samples_and_bounds_quantiles():
    meter = LagMeter()
    for lag in [0.0001] * 97 + [0.004, 0.03, 0.3]:
        meter.add(lag, late_after=0.02)
    assert meter.summary() == {"max_ms": 300.0, "p50_ms_at_most": 0.5, "p99_ms_at_most": 50, "late_samples": 2}
    assert LagMeter().quantile_ms(0.5) is None
