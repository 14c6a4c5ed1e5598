"""Through a real Mosquitto: time, order and gaps (runtime/timing.py wired in by runtime/scheduler.py).

Each test computes what the policy means offline -- put the samples in seq order, fill the gaps or
resample first, then `Model.run` -- and compares every published prediction with it. The model runs at
8 Hz (P = 0.125 s) and every ``ts`` is a binary fraction, so grid times and cell bounds are exact.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import edgernn
from broker import Client, mosquitto_binary
from daemon_harness import (DaemonProcess, offline, payload, sample, start_daemon, timing_counts, wait_until,
                            with_sample_rate, write_config, write_model)
from edgernn.errors import EdgeRNNError

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

ATOL = 1e-5
RATE = 8.0
P = 1.0 / RATE
T0 = 1000.0


@pytest.fixture
def model(tmp_path):
    """A GRU whose file says it runs at 8 Hz."""
    model = write_model(tmp_path / "model.ern", sample_rate=RATE)
    assert model.sample_period == P
    return model


def _bodies(collector) -> list[dict]:
    return [json.loads(raw) for _, raw in collector.wait_for(0, timeout=0)]


def _by_ts(collector) -> dict:
    """{ts: y} of every prediction received (a repeat must be identical)."""
    out = {}
    for body in _bodies(collector):
        assert out.setdefault(body["ts"], body["y"]) == body["y"], f"ts {body['ts']}: a repeat differs"
    return out


def _run(model, xs, resets=()) -> np.ndarray:
    """``model.run`` over ``xs`` from the rest state, back to it before each index in ``resets``."""
    ys, state, start = [], model.new_state(), 0
    for stop in sorted(resets) + [len(xs)]:
        if stop > start:
            ys.append(model.run(np.stack(xs[start:stop]), state))
        state, start = model.new_state(), stop
    return np.concatenate(ys)


# ---- reorder -------------------------------------------------------------------------------------------
def test_samples_shuffled_within_the_window_are_stepped_in_seq_order_and_a_late_one_is_dropped(
        tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline="reorder_window = 6\nreorder_timeout_ms = 300"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        order = [2, 0, 1, 5, 3, 4, 8, 6, 7, 9, 11, 10, 14, 12, 13, 15]  # each at most 3 places from its own
        for seq in order:
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(16) == 16
        np.testing.assert_allclose([collector.predictions()["dev0"][s] for s in range(16)],
                                   offline(model, 0, range(16)), atol=ATOL)
        assert wait_until(lambda: daemon.scheduler.wait_idle(0.1), 10)  # nothing held: every message settled
        sender.publish("sensors/dev0/imu", payload(0, 17))  # 16 is missing: 17 waits out the timeout ...
        assert collector.wait_for_distinct(17) == 17
        sender.publish("sensors/dev0/imu", payload(0, 16))  # ... so 16 comes late: dropped, the state untouched
        sender.publish("sensors/dev0/imu", payload(0, 5))  # a duplicate
        sender.publish("sensors/dev0/imu", payload(0, 18))
        assert collector.wait_for_distinct(18) == 18
        got = collector.predictions()["dev0"]
        assert sorted(got) == list(range(16)) + [17, 18]
        np.testing.assert_allclose([got[17], got[18]], offline(model, 0, list(range(16)) + [17, 18])[16:], atol=ATOL)
        assert wait_until(lambda: timing_counts(daemon).get("duplicate") == 1, 10)
        counted = timing_counts(daemon)
        reordered = sum(seq < max(order[:index], default=-1) for index, seq in enumerate(order))
        assert counted["late"] == 1 and counted["seq_skipped"] == 1 and counted["reordered"] == reordered == 9
        assert set(counted) == {"late", "duplicate", "seq_skipped", "reordered"}
        assert 'edgernn_timing_total{pipeline="imu",reason="late"} 1.0' in daemon.metrics.text().decode()
    finally:
        sender.close(), collector.close(), daemon.stop()


# ---- gaps in ts ----------------------------------------------------------------------------------------
TICKS = [0, 1, 2, 5, 6, 9, 10, 20, 21]  # missing 3-4 and 7-8 (filled, max_fill = 2), then 11-19: a reset


def _filled(policy: str) -> tuple[list, list, list]:
    """The offline fill of `TICKS`: (tick of each step, its x, which were filled), the reset before 20."""
    ticks, xs, filled = [], [], []
    for index, tick in enumerate(TICKS):
        x = sample(0, index)
        if index and 1 < tick - TICKS[index - 1] <= 3:
            last_tick, last_x = TICKS[index - 1], sample(0, index - 1)
            for between in range(last_tick + 1, tick):
                if policy == "hold":
                    xs.append(last_x)
                else:
                    fraction = (between - last_tick) / (tick - last_tick)
                    xs.append((last_x + fraction * (x.astype(np.float64) - last_x)).astype(np.float32))
                ticks.append(between), filled.append(True)
        ticks.append(tick), xs.append(x), filled.append(False)
    return ticks, xs, filled


@pytest.mark.parametrize("policy", ["interpolate", "hold"])
@pytest.mark.parametrize("publish_filled", [True, False])
def test_gaps_in_ts_are_filled_up_to_max_fill_and_reset_past_it(tmp_path, broker, model, policy, publish_filled):
    options = f'gap_policy = "{policy}"\nmax_fill = 2\npublish_filled = {str(publish_filled).lower()}'
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline=options))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for index, tick in enumerate(TICKS):
            sender.publish("sensors/dev0/imu", payload(0, index, ts=T0 + tick * P))
        ticks, xs, filled = _filled(policy)
        want = _run(model, xs, resets=[ticks.index(20)])
        expected = len(ticks) if publish_filled else len(TICKS)
        assert len(collector.wait_for(expected)) == expected
        got = _by_ts(collector)
        shown = [i for i, f in enumerate(filled) if publish_filled or not f]
        assert sorted(got) == [T0 + ticks[i] * P for i in shown]
        np.testing.assert_allclose([got[T0 + ticks[i] * P] for i in shown], want[shown], atol=ATOL)
        assert all(("seq" in body) == (body["ts"] in [T0 + t * P for t in TICKS]) for body in _bodies(collector))
        metrics = daemon.metrics.pipeline("imu")
        assert wait_until(lambda: timing_counts(daemon) == {"gap": 3, "filled": 4, "gap_reset": 1}, 10), timing_counts(daemon)
        assert metrics.resets("gap")._value.get() == 1
        assert metrics.filled_published._value.get() == (4 if publish_filled else 0)
        assert metrics.messages_out._value.get() == expected
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_bad_ts_is_counted_and_the_sample_still_stepped(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline='gap_policy = "interpolate"\nmax_fill = 3'))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        stamps = [T0, T0 + P, None, T0 + 4 * P, T0 + 2 * P, 1e300, T0 + 3 * P, 1e9, 1e9 + P]
        for seq, ts in enumerate(stamps):  # missing, then backwards, out of range, a jump of 10**9 s: a reset
            sender.publish("sensors/dev0/imu", payload(0, seq, ts=ts))
        assert collector.wait_for_distinct(len(stamps)) == len(stamps)
        got = collector.predictions()["dev0"]
        want = _run(model, [sample(0, seq) for seq in range(len(stamps))], resets=[7])
        np.testing.assert_allclose([got[seq] for seq in range(len(stamps))], want, atol=ATOL)
        assert wait_until(lambda: timing_counts(daemon) == {"ts_missing": 1, "ts_backwards": 1, "ts_out_of_range": 1,
                                                      "gap": 1, "gap_reset": 1}, 10), timing_counts(daemon)
    finally:
        sender.close(), collector.close(), daemon.stop()


# ---- resampling ----------------------------------------------------------------------------------------
N_FAST = 13


def _cell_means() -> tuple[list, np.ndarray]:
    """`N_FAST` samples at twice the model's rate, averaged per cell [t_k - P/2, t_k + P/2): xs, the means."""
    xs = [sample(0, j) for j in range(N_FAST)]
    cells = [[0]] + [[2 * k - 1, 2 * k] for k in range(1, N_FAST // 2 + 1)]
    return xs, [np.mean(np.stack([xs[j] for j in cell]).astype(np.float64), axis=0).astype(np.float32)
                for cell in cells]


def test_a_device_at_twice_the_model_rate_is_averaged_onto_its_grid(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline=f"input_rate = {2 * RATE}"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    _, means = _cell_means()
    want, cells = _run(model, means), len(means)
    try:
        for j in range(N_FAST):
            sender.publish("sensors/dev0/imu", payload(0, j, ts=T0 + j * P / 2))
        # the last cell waits for a sample past its end, then the stream is silent: it closes a model
        # period plus reorder_timeout_ms after it opened, and its messages are acked
        assert len(collector.wait_for(cells)) == cells
        got = _by_ts(collector)
        assert sorted(got) == [T0 + k * P for k in range(cells)]
        np.testing.assert_allclose([got[T0 + k * P] for k in range(cells)], want, atol=ATOL)
        assert all("seq" not in body for body in _bodies(collector))
        assert wait_until(lambda: timing_counts(daemon) == {"hold_timeout": 1}, 10), timing_counts(daemon)
        assert daemon.scheduler.wait_idle(5) and not daemon.pipelines[0].timing.held_tokens()
        sender.publish("sensors/dev0/imu", payload(0, N_FAST, ts=T0 + 6.25 * P))  # in the closed last cell
        assert wait_until(lambda: timing_counts(daemon).get("late") == 1, 10)
        assert len(collector.wait_for(0, timeout=0.5)) == cells
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_a_clean_stop_steps_the_open_cell_before_the_final_snapshot(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port,
                                       pipeline=f"input_rate = {2 * RATE}\nreorder_timeout_ms = 60000"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    _, means = _cell_means()
    want, cells = _run(model, means), len(means)
    try:
        try:
            for j in range(N_FAST):
                sender.publish("sensors/dev0/imu", payload(0, j, ts=T0 + j * P / 2))
            assert len(collector.wait_for(cells - 1)) == cells - 1
            assert daemon.scheduler.wait_idle(5)  # the open cell's messages do not hold up snapshots
            assert len(daemon.pipelines[0].timing.held_tokens()) == 2
        finally:
            daemon.stop()  # steps the open cell (and acks its messages) before the final snapshot
        assert len(collector.wait_for(cells)) == cells
        np.testing.assert_allclose(_by_ts(collector)[T0 + (cells - 1) * P], want[-1], atol=ATOL)
    finally:
        sender.close(), collector.close()


# ---- crashes, eviction ---------------------------------------------------------------------------------
def _publish_each(sender, collector, messages) -> None:
    """Publish (payload, predictions it completes) one at a time, each answered before the next."""
    expected = len(collector.wait_for(0, timeout=0))
    for body, completes in messages:
        sender.publish("sensors/dev0/imu", body)
        expected += completes
        assert len(collector.wait_for(expected, timeout=20)) == expected


@pytest.mark.parametrize("mode", ["fill_and_reset", "decimate"])
def test_kill_9_replays_the_time_stages_steps_from_the_journal(tmp_path, broker, model, mode):
    """The journal holds the filled steps (not published), the resets and the messages a cell took in
    beyond its first (not stepped): a replay after kill -9 must step exactly what was stepped live."""
    if mode == "fill_and_reset":
        options = 'gap_policy = "interpolate"\nmax_fill = 2'
        before = [(payload(0, i, ts=T0 + tick * P), 1) for i, tick in enumerate(TICKS)]
        ticks, xs, _ = _filled("interpolate")
        after = [(payload(0, len(TICKS) + j, ts=T0 + (22 + j) * P), 1) for j in range(3)]
        want = _run(model, xs + [sample(0, len(TICKS) + j) for j in range(3)], resets=[ticks.index(20)])[-3:]
    else:  # cells of two samples; the last one closes by the timeout before the kill
        options = f"input_rate = {2 * RATE}\nreorder_timeout_ms = 300"
        xs, means = _cell_means()
        before = [(payload(0, j, ts=T0 + j * P / 2), int(j > 0 and j % 2 == 1)) for j in range(N_FAST)]
        before[-1] = (before[-1][0], 1)  # the last cell, closed by the timeout
        # after the restart the grid starts again at the stream's next sample: cells {13}, {14, 15}, {16, 17}
        after = [(payload(0, N_FAST + j, ts=T0 + (N_FAST + j) * P / 2), j % 2) for j in range(6)]
        late = [sample(0, N_FAST + j) for j in range(6)]
        new_cells = [late[0], (late[1].astype(np.float64) + late[2]) / 2, (late[3].astype(np.float64) + late[4]) / 2]
        want = _run(model, means + [c.astype(np.float32) for c in new_cells])[-3:]
    config = write_config(tmp_path, broker.port, pipeline=options, state='durability = "journal"', log_level="info")
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    process = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        process.start()
        _publish_each(sender, collector, before)
        time.sleep(0.5)  # the journal's 'done' records
        process.kill()
        seen = len(collector.wait_for(0, timeout=0))
        process.start()
        _publish_each(sender, collector, after)
        got = [json.loads(raw) for _, raw in collector.wait_for(0, timeout=0)[seen:]]
        got = [body for body in got if body["ts"] >= T0 + (22 * P if mode == "fill_and_reset" else N_FAST * P / 2)]
        np.testing.assert_allclose([body["y"] for body in got], want, atol=ATOL)
    finally:
        sender.close(), collector.close()
        if process.process.poll() is None:
            process.terminate()


def test_kill_9_after_a_snapshot_taken_while_messages_were_held_steps_nothing_twice(tmp_path, broker, model):
    """Acks leave in receive order: B's first cell, done, waits behind A's open cell when a snapshot is taken.
    The snapshot holds B0's effect, the broker still has B0 unacked: after kill -9 it comes again and must be
    recognised as a copy, not stepped a second time (resampled steps have no seq to catch it)."""
    config = write_config(tmp_path, broker.port, pipeline=f"input_rate = {2 * RATE}\nreorder_timeout_ms = 60000",
                          state='durability = "journal"\nsnapshot_interval = 0.3', log_level="info")
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    process = DaemonProcess(config, tmp_path / "daemon.log")
    b = [sample(1, j) for j in range(3)]
    try:
        process.start()
        sender.publish("sensors/devA/imu", payload(0, 0, ts=T0))  # A's cell stays open: held, unacked
        sender.publish("sensors/devB/imu", payload(1, 0, ts=T0))
        sender.publish("sensors/devB/imu", payload(1, 1, ts=T0 + P / 2))  # closes B's first cell: B0 done
        assert len(collector.wait_for(1)) == 1
        time.sleep(1.5)  # snapshots taken meanwhile, B0 in them, its ack behind A0's
        process.kill()
        process.start()
        sender.publish("sensors/devB/imu", payload(1, 2, ts=T0 + P))  # closes the cell B1 opened after the restart
        assert wait_until(lambda: len(_bodies(collector)) >= 2, 20)
        time.sleep(0.5)
        got = [body for body in _bodies(collector) if body["key"] == "devB"]
        assert len({body["ts"] for body in got}) == len(got) == 2, got  # B0's cell not made again
        want = _run(model, [b[0], b[1]])  # the grid starts again at B1, the first sample after the restart
        np.testing.assert_allclose([body["y"] for body in got], want, atol=ATOL)
    finally:
        sender.close(), collector.close()
        if process.process.poll() is None:
            process.terminate()


@pytest.mark.parametrize("how", ["evicted", "idle"])
def test_a_stream_evicted_or_reset_when_idle_acks_what_its_time_stage_held(tmp_path, broker, model, how):
    option = "max_streams = 1" if how == "evicted" else "idle_reset = 0.5"
    daemon = start_daemon(write_config(tmp_path, broker.port,
                                       pipeline=f"reorder_window = 4\nreorder_timeout_ms = 60000\n{option}"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in [0, 1, 2, 3, 4, 5, 7]:  # 7 waits for 6 (a minute)
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(6) == 6
        assert wait_until(lambda: len(daemon.pipelines[0].timing.held_tokens()) == 1, 10)
        if how == "evicted":  # a second stream evicts the first, whose held message is then finished
            for seq in range(6):
                sender.publish("sensors/dev1/imu", payload(1, seq))
            assert collector.wait_for_distinct(12) == 12
        assert wait_until(lambda: timing_counts(daemon).get("forgotten") == 1, 10), timing_counts(daemon)
        assert wait_until(lambda: not daemon.scheduler._unacked, 10)  # acked: nothing holds the later acks back
        assert daemon.pipelines[0].timing.held_tokens() == []
        assert sorted(collector.predictions()["dev0"]) == list(range(6))
    finally:
        sender.close(), collector.close(), daemon.stop()


# ---- configuration -------------------------------------------------------------------------------------
def test_a_gap_policy_on_a_model_without_a_sample_rate_stops_the_start(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    with pytest.raises(EdgeRNNError, match=r"model\.ern: pipeline 'imu': gap_policy = 'hold' needs the model's "
                                           r"sample rate"):
        start_daemon(write_config(tmp_path, broker.port, pipeline='gap_policy = "hold"'))


def test_serve_check_names_a_time_option_the_model_cannot_serve(tmp_path, broker):
    from edgernn.runtime.config import load_config
    from edgernn.runtime.daemon import check

    write_model(tmp_path / "model.ern")
    with pytest.raises(EdgeRNNError, match=r"input_rate = 16\.0 needs the model's sample rate"):
        check(load_config(write_config(tmp_path, broker.port, pipeline="input_rate = 16.0")))


@pytest.mark.parametrize("new_rate", [RATE / 2, 2 * RATE])  # another grid; the devices' own rate: no stage
def test_a_reload_that_changes_the_sample_rate_finishes_what_the_old_grid_held(tmp_path, broker, model, new_rate):
    daemon = start_daemon(write_config(tmp_path, broker.port,
                                       pipeline=f"input_rate = {2 * RATE}\nreorder_timeout_ms = 60000"))
    sender = Client(broker.port)
    try:
        for j in range(4):  # cells {0}, {1, 2}; 3 opens the third
            sender.publish("sensors/dev0/imu", payload(0, j, ts=T0 + j * P / 2))
        assert wait_until(lambda: len(daemon.pipelines[0].timing.held_tokens()) == 1, 10)
        edgernn.save(with_sample_rate(model, new_rate), tmp_path / "model.ern")
        daemon.reload()
        assert wait_until(lambda: timing_counts(daemon).get("forgotten") == 1, 10), timing_counts(daemon)
        assert daemon.pipelines[0].model.sample_period == 1 / new_rate
        assert wait_until(lambda: not daemon.scheduler._unacked, 10)  # its message acked
        timing = daemon.pipelines[0].timing
        assert timing is None if new_rate == 2 * RATE else timing.held_tokens() == []
    finally:
        sender.close(), daemon.stop()


def test_options_off_leave_the_time_stage_out(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline=f"input_rate = {RATE}"))  # the model's own
    try:
        assert daemon.pipelines[0].timing is None
    finally:
        daemon.stop()
