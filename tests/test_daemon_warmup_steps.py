"""Through a real Mosquitto: streams start from the model's stored rest state, and ``warmup_steps``
marks or withholds each stream's first predictions (runtime/pipeline.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import edgernn
from broker import Client, mosquitto_binary
from daemon_harness import offline, payload, sample, start_daemon, wait_until, write_config, write_model
from edgernn.rest_state import settle, with_rest_state

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

ATOL = 1e-5


@pytest.fixture
def model(tmp_path):
    """A GRU whose file holds a rest state far from zeros (idle-settled on a non-zero operating point)."""
    zeros = write_model(tmp_path / "model.ern")
    settled = settle(zeros, idle=np.full(zeros.input_size, 2.0, np.float32))
    assert settled.converged and np.abs(settled.state).max() > 0.3
    edgernn.save(with_rest_state(zeros, settled.state, "idle", settled.note), tmp_path / "model.ern")
    model = edgernn.load(tmp_path / "model.ern")
    np.testing.assert_array_equal(model.new_state(), settled.state)
    return model


def _from_zeros(model, key_index: int, seqs) -> np.ndarray:
    xs = np.stack([sample(key_index, s) for s in seqs])
    return model.run(xs, np.zeros(model.state_size, np.float32))


def _bodies(collector, key: str) -> dict:
    """{seq: the decoded JSON prediction} of stream ``key``."""
    out = {}
    for _, raw in collector.wait_for(0, timeout=0):  # every message received so far
        body = json.loads(raw)
        if body["key"] == key:
            out[body["seq"]] = body
    return out


def _ys(bodies: dict, seqs) -> np.ndarray:
    return np.array([bodies[s]["y"] for s in seqs])


def test_new_gap_reset_and_evicted_streams_start_from_the_stored_rest_state(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline='seq_gap = "reset"\nmax_streams = 1'))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        sent = ((0, 0), (0, 1), (0, 5), (0, 6), (1, 0), (0, 20))  # 5: a gap; dev1 evicts dev0
        for count, (key_index, seq) in enumerate(sent, 1):  # one at a time: one micro-batch steps streams
            sender.publish(f"sensors/dev{key_index}/imu", payload(key_index, seq))  # in rounds, not as sent
            assert collector.wait_for_distinct(count) == count
        got = collector.predictions()
        dev0 = got["dev0"]
        np.testing.assert_allclose([dev0[0], dev0[1]], offline(model, 0, [0, 1]), atol=ATOL)  # new stream
        np.testing.assert_allclose([dev0[5], dev0[6]], offline(model, 0, [5, 6]), atol=ATOL)  # gap reset
        np.testing.assert_allclose(got["dev1"][0], offline(model, 1, [0])[0], atol=ATOL)
        np.testing.assert_allclose(dev0[20], offline(model, 0, [20])[0], atol=ATOL)  # back after eviction
        assert np.abs(offline(model, 0, [0, 1]) - _from_zeros(model, 0, [0, 1])).max() > 100 * ATOL  # tells them apart
        assert daemon.metrics.pipeline("imu").evictions._value.get() == 2
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_the_first_warmup_predictions_are_marked_and_a_gap_reset_counts_again(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline='seq_gap = "reset"\nwarmup_steps = 3'))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        seqs = [0, 1, 1, 2, 3, 4, 10, 11, 12, 13]  # seq 1 twice: a duplicate is no prediction; 10: a gap
        for seq in seqs:
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(9) == 9
        bodies = _bodies(collector, "dev0")
        assert {seq: body.get("warm") for seq, body in bodies.items()} == {
            0: False, 1: False, 2: False, 3: None, 4: None, 10: False, 11: False, 12: False, 13: None}
        assert all(set(body) == {"y", "seq", "key"} for seq, body in bodies.items() if seq in (3, 4, 13))
        np.testing.assert_allclose(_ys(bodies, range(5)), offline(model, 0, range(5)), atol=ATOL)
        np.testing.assert_allclose(_ys(bodies, range(10, 14)), offline(model, 0, range(10, 14)), atol=ATOL)
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_withheld_predictions_are_acked_counted_and_still_advance_the_state(tmp_path, broker, model):
    config = write_config(tmp_path, broker.port, pipeline='warmup_steps = 3\nwarmup_policy = "withhold"')
    daemon = start_daemon(config)
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in range(5):
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(2) == 2
        time.sleep(0.3)
        bodies = _bodies(collector, "dev0")
        assert sorted(bodies) == [3, 4] and not any("warm" in body for body in bodies.values())
        np.testing.assert_allclose(_ys(bodies, [3, 4]), offline(model, 0, range(5))[3:], atol=ATOL)  # all 5 stepped
        assert daemon.metrics.pipeline("imu").warmup_withheld._value.get() == 3
        assert daemon.metrics.pipeline("imu").messages_out._value.get() == 2
        assert 'edgernn_warmup_withheld_total{pipeline="imu"} 3.0' in daemon.metrics.text().decode()
        for seq in range(5, 7):  # a second stream, two of its three withheld predictions
            sender.publish("sensors/dev1/imu", payload(1, seq))
        assert wait_until(lambda: daemon.metrics.pipeline("imu").warmup_withheld._value.get() == 5, 20)
    finally:
        daemon.stop()
    # Acked: the same session (persistent) gets none of the seven inputs again. The snapshot kept each
    # stream's count: dev0 is warm at once, dev1 has one more to withhold.
    daemon = start_daemon(config)
    try:
        sender.publish("sensors/dev1/imu", payload(1, 7))
        sender.publish("sensors/dev1/imu", payload(1, 8))
        sender.publish("sensors/dev0/imu", payload(0, 5))
        assert collector.wait_for_distinct(4) == 4
        time.sleep(0.3)
        metrics = daemon.metrics.pipeline("imu")
        assert metrics.messages_in._value.get() == 3  # nothing redelivered
        assert metrics.warmup_withheld._value.get() == 1
        np.testing.assert_allclose(collector.predictions()["dev0"][5], offline(model, 0, range(6))[5], atol=ATOL)
        np.testing.assert_allclose(collector.predictions()["dev1"][8], offline(model, 1, range(5, 9))[3], atol=ATOL)
        assert sorted(collector.predictions()["dev1"]) == [8]
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_an_idle_reset_starts_the_warmup_count_again(tmp_path, broker, model):
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline="idle_reset = 1.5\nwarmup_steps = 2"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in range(3):
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(3) == 3
        assert wait_until(lambda: "dev0" not in daemon.pipelines[0].table, 20)
        for seq in range(3, 6):
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert collector.wait_for_distinct(6) == 6
        bodies = _bodies(collector, "dev0")
        assert [bodies[s].get("warm", True) for s in range(6)] == [False, False, True, False, False, True]
        np.testing.assert_allclose(_ys(bodies, range(3, 6)), offline(model, 0, range(3, 6)), atol=ATOL)  # from rest
        assert daemon.metrics.pipeline("imu").resets("idle")._value.get() == 1
    finally:
        sender.close(), collector.close(), daemon.stop()
