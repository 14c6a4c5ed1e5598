"""The simulator's faults through a real Mosquitto into the time stage: reordering, drops, duplicates,
jitter, and devices at twice the model's rate.

What every device published is known exactly (`Fleet(record=True)`). The oracle is the offline policy
over it: keep one copy of each seq, sort by seq, then fill the gaps in ``ts`` (or resample onto the
model's grid), then `Model.run` from the rest state. Every prediction the daemon published must equal
it, and the counters per reason must match what the faults did.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from broker import Client, Mosquitto, mosquitto_binary
from daemon_harness import start_daemon, timing_counts, wait_until, write_config, write_model
from edgernn.runtime.codecs import Decoder
from edgernn.firmware_sim.faults import Faults
from edgernn.firmware_sim.fleet import Fleet

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

ATOL = 1e-5
MODEL_RATE = 50.0
P = 1.0 / MODEL_RATE
IMU_CHANNELS = 6


@pytest.fixture
def broker(tmp_path):
    """Mosquitto without an in-flight limit, as README "Time, order and gaps" advises: a held message holds
    back every later ack, and Mosquitto's default window of 20 would then stall the deliveries."""
    server = Mosquitto(tmp_path / "broker", extra_config="max_inflight_messages 0").start()
    yield server
    server.stop()


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model.ern", input_size=IMU_CHANNELS, sample_rate=MODEL_RATE)


def _published(device) -> list[tuple[int, float, np.ndarray]]:
    """One copy of each seq the device published, sorted by seq: [(seq, ts, x)]."""
    decoder = Decoder("json", IMU_CHANNELS)
    by_seq = {}
    for message in device.record:
        sample = decoder.decode(message.payload)
        by_seq.setdefault(sample.seq, (sample.seq, sample.ts, sample.x))
    return [by_seq[seq] for seq in sorted(by_seq)]


def _run(model, steps) -> np.ndarray:
    """``model.run`` over [(x, reset_before)] from the rest state."""
    ys, state, chunk = [], model.new_state(), []
    for x, reset in steps:
        if reset and chunk:
            ys.append(model.run(np.stack(chunk), state))
            state, chunk = model.new_state(), []
        chunk.append(x)
    ys.append(model.run(np.stack(chunk), state))
    return np.concatenate(ys)


def _fill_offline(samples, max_fill: int):
    """gap_policy = "interpolate": [(ts, x, reset_before)] and how many gaps and fills."""
    out, gaps, fills = [], 0, 0
    for index, (_, ts, x) in enumerate(samples):
        reset = False
        if index:
            last_ts, last_x = samples[index - 1][1], samples[index - 1][2]
            missing = math.floor((ts - last_ts) / P + 0.5) - 1
            if missing >= 1:
                gaps += 1
                if missing <= max_fill:
                    times = last_ts + P * np.arange(1, missing + 1)
                    rows = np.stack([np.interp(times, [last_ts, ts], [last_x[c], x[c]]) for c in range(len(x))], 1)
                    out += [(t, row.astype(np.float32), False) for t, row in zip(times.tolist(), rows)]
                    fills += missing
                else:
                    reset = True
        out.append((ts, x, reset))
    return out, gaps, fills


def _resample_offline(samples):
    """input_rate twice the model's: the mean of each cell [t_k - P/2, t_k + P/2) on the grid t_k = t_0 + k P
    from the first sample, up to the cell of the last one (closed by the timeout); an empty cell interpolated."""
    ts = np.array([s[1] for s in samples])
    X = np.stack([s[2] for s in samples]).astype(np.float64)
    out, k = [], 0
    while (t := ts[0] + k * P) - P / 2 <= ts[-1]:
        in_cell = (ts >= ts[0] + (k - 0.5) * P) & (ts < ts[0] + (k + 0.5) * P)
        x = X[in_cell].mean(axis=0) if in_cell.any() else np.array([np.interp(t, ts, X[:, c]) for c in range(X.shape[1])])
        out.append((t, x.astype(np.float32)))
        k += 1
    return out


def _predictions(collector) -> dict[str, list[tuple[float, list]]]:
    """Per device, (ts, y) of every prediction in the order received."""
    out: dict[str, list] = {}
    for topic, raw in collector.wait_for(0, timeout=0):
        body = json.loads(raw)
        out.setdefault(topic.split("/")[1], []).append((body["ts"], body["y"]))
    return out


def _fleet(broker, rate: float, faults: Faults, seed: int) -> dict:
    fleet = Fleet("imu", 3, rate, port=broker.port, seed=seed, faults=faults, jitter=0.1, record=True)
    stats = fleet.run(3.0)
    assert stats["published"] > 3 * 2.5 * rate
    return fleet, stats


def test_reordered_dropped_duplicated_and_jittered_streams_equal_the_offline_policy(tmp_path, broker, model):
    options = ('reorder_window = 4\nreorder_timeout_ms = 500\ngap_policy = "interpolate"\nmax_fill = 3\n'
               "publish_filled = true")
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline=options))
    collector = Client(broker.port, subscribe="predictions/#")
    try:
        fleet, stats = _fleet(broker, MODEL_RATE, Faults(drop=0.05, duplicate=0.05, reorder=0.05), seed=11)
        faults = stats["faults"]
        assert faults["drop"] and faults["duplicate"] and faults["reorder"]
        expected, gaps, fills, skipped = {}, 0, 0, 0
        for device in fleet.devices:
            samples = _published(device)
            steps, device_gaps, device_fills = _fill_offline(samples, max_fill=3)
            expected[device.id] = ([t for t, _, _ in steps], _run(model, [(x, reset) for _, x, reset in steps]))
            gaps, fills = gaps + device_gaps, fills + device_fills
            skipped += samples[-1][0] - samples[0][0] + 1 - len(samples)
        total = sum(len(times) for times, _ in expected.values())
        assert gaps and fills and skipped  # the drops made gaps
        assert len(collector.wait_for(total, timeout=30)) == total
        got = _predictions(collector)
        for device_id, (times, ys) in expected.items():
            assert [t for t, _ in got[device_id]] == times, device_id
            np.testing.assert_allclose(np.array([y for _, y in got[device_id]]), ys, atol=ATOL)
        reordered = sum(b < a for d in fleet.devices for a, b in zip([m.seq for m in d.record],
                                                                     [m.seq for m in d.record][1:]))
        assert wait_until(lambda: timing_counts(daemon).get("duplicate") == faults["duplicate"], 10), timing_counts(daemon)
        counted = timing_counts(daemon)
        assert counted.get("seq_skipped", 0) == skipped and counted.get("gap", 0) == gaps
        assert counted.get("filled", 0) == fills and counted.get("reordered", 0) == reordered > 0
        assert set(counted) <= {"duplicate", "seq_skipped", "gap", "filled", "reordered", "gap_reset"}
        assert daemon.scheduler.wait_idle(5) and not daemon.pipelines[0].timing.held_tokens()
    finally:
        collector.close(), daemon.stop()


def test_devices_at_twice_the_model_rate_with_faults_equal_the_offline_resampling(tmp_path, broker, model):
    options = (f'input_rate = {2 * MODEL_RATE}\nreorder_window = 4\nreorder_timeout_ms = 300\n'
               'gap_policy = "interpolate"\nmax_fill = 5\npublish_filled = true')
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline=options))
    collector = Client(broker.port, subscribe="predictions/#")
    try:
        fleet, stats = _fleet(broker, 2 * MODEL_RATE, Faults(drop=0.02, duplicate=0.05, reorder=0.05), seed=12)
        expected = {device.id: _resample_offline(_published(device)) for device in fleet.devices}
        total = sum(len(points) for points in expected.values())
        assert len(collector.wait_for(total, timeout=30)) == total  # the last cells close by the timeout
        got = _predictions(collector)
        for device_id, points in expected.items():
            np.testing.assert_allclose([t for t, _ in got[device_id]], [t for t, _ in points], rtol=0, atol=1e-9)
            want = model.run(np.stack([x for _, x in points]), model.new_state())
            np.testing.assert_allclose(np.array([y for _, y in got[device_id]]), want, atol=ATOL)
        assert wait_until(lambda: timing_counts(daemon).get("hold_timeout") == len(fleet.devices), 10), timing_counts(daemon)
        counted = timing_counts(daemon)
        assert counted.get("duplicate") == stats["faults"]["duplicate"] > 0 and counted.get("reordered", 0) > 0
        assert "late" not in counted and "gap_reset" not in counted
    finally:
        collector.close(), daemon.stop()
