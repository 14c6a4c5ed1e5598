"""Regression tests for faults a review found in the daemon: each once stopped it, lost a message or
corrupted a stream's state.

Grouped by where the fault lived: the journal and the model reload (`Pipeline` + `StateStore` exactly as
the daemon drives them, no broker), the MQTT link (`MqttLink` against a real Mosquitto), inputs that used
to kill the worker thread, the shutdown, and an idle reset followed by kill -9 (a real daemon process).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from broker import Client, free_port, mosquitto_binary
from daemon_harness import (DaemonProcess, offline, payload, sample, start_daemon, wait_until, write_config,
                            write_model)
from edgernn.runtime.codecs import REJECT_REASONS
from edgernn.runtime.config import load_config
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.mqtt import MqttLink
from edgernn.runtime.pipeline import Pipeline

needs_broker = [pytest.mark.broker,
                pytest.mark.skipif(mosquitto_binary() is None,
                                   reason="mosquitto is not installed (make test installs it)")]
"""The marks of tests/test_daemon.py, put per test here: the journal tests run without a broker."""

ATOL = 1e-5
UNUSED_PORT = 1883  # the broker-less tests never connect


def broker_test(test):
    for mark in needs_broker:
        test = mark(test)
    return test


# ---- the journal and the model reload (no broker) --------------------------------------------------

def _open_pipeline(tmp_path, pipeline: str = "") -> tuple[Pipeline, int]:
    """A pipeline recovered from its state dir the way `Daemon._recover` does it (journal mode), and how
    many journalled batches it replayed."""
    config = load_config(write_config(tmp_path, UNUSED_PORT, pipeline=pipeline, state='durability = "journal"'))
    p = Pipeline(config.pipelines[0], config.state, Metrics(["imu"], REJECT_REASONS).pipeline("imu"))
    recovery = p.store.recover(p.table)
    for batch in recovery.replayed:
        p.advance(batch.keys, batch.seqs, batch.X)
    p.next_batch_no = recovery.next_batch_no
    return p, len(recovery.replayed)


def _live_batch(p: Pipeline, keys: list[str], seqs: list[int], X: np.ndarray) -> None:
    """What `Scheduler._advance` does with a micro-batch: journal it, then step it."""
    seqs = np.asarray(seqs, np.int64)
    p.store.append_batch(p.new_batch_no(), keys, seqs, X, np.full(len(keys), np.nan))
    p.advance(keys, seqs, X)


def test_journal_only_rows_leave_the_stream_table_as_it_was_live(tmp_path):
    """`ACK_SEQ` rows (runtime/pipeline.py) were never stepped live: on replay they must not even touch the
    table's LRU order, or a later new key evicts another stream than it did live."""
    from edgernn.runtime.pipeline import ACK_SEQ

    write_model(tmp_path / "model.ern")
    p, _ = _open_pipeline(tmp_path, pipeline="max_streams = 2")
    x = np.ones((3, 3), np.float32)
    p.advance(["K", "L", "K"], np.array([-1, -1, ACK_SEQ]), x)  # live: K stepped, L stepped, then K's extra message
    p.advance(["M"], np.array([-1]), x[:1])  # evicts the least recently stepped: K
    assert sorted(p.table.keys()) == ["L", "M"]


def test_a_wall_clock_jump_does_not_make_every_stream_idle(tmp_path):
    """A Pi without a real-time clock sets its time by NTP after boot: wall time leaps ahead while the
    monotonic clock does not. Idle resets must follow real silence, not the leap."""
    write_model(tmp_path / "model.ern")
    p, _ = _open_pipeline(tmp_path, pipeline="idle_reset = 60.0")
    x = np.ones((1, 3), np.float32)
    p.advance(["a"], np.array([-1]), x, now=1000.0)
    assert p.expire_idle(now=1001.0, monotonic=1.0) == 0
    assert p.expire_idle(now=1001.0 + 86400, monotonic=2.0) == 0  # NTP: one day ahead in one second
    assert "a" in p.table
    assert p.expire_idle(now=1001.0 + 86400 + 70, monotonic=72.0) == 1  # then 70 s of real silence
    assert "a" not in p.table


def test_after_a_reload_only_the_journal_since_its_snapshot_is_replayed(tmp_path):
    """The snapshot after a SIGHUP reload must start a journal of its own: a journal that still carried the
    old model's header made recovery replay nothing (or the wrong batches) after a kill -9."""
    write_model(tmp_path / "model.ern", seed=0)
    p, _ = _open_pipeline(tmp_path)
    x = np.ones((1, 3), np.float32)
    _live_batch(p, ["a"], [0], x)
    p.store.snapshot(p.table)
    write_model(tmp_path / "model.ern", seed=1)  # new weights, same state shapes: states kept
    assert p.reload()
    p.store.snapshot(p.table)  # what Daemon._reload_models does after reloading
    _live_batch(p, ["a"], [1], x)
    live = p.table.state_of("a")
    p.store.close()  # kill -9
    recovered, replayed = _open_pipeline(tmp_path)
    assert replayed == 1, "the batch journalled after the post-reload snapshot was not replayed once"
    np.testing.assert_array_equal(recovered.table.state_of("a"), live)


def test_a_reload_to_a_new_input_size_journals_and_replays_the_new_width(tmp_path):
    """After a reload to a model with another input size (same state shapes), the journal header kept the
    old input size: `append_batch` raised on the first new-width batch and the worker thread died."""
    write_model(tmp_path / "model.ern", input_size=3)
    p, _ = _open_pipeline(tmp_path)
    write_model(tmp_path / "model.ern", input_size=4)
    assert p.reload()
    p.store.snapshot(p.table)
    _live_batch(p, ["a"], [0], np.ones((1, 4), np.float32))  # what the new decoder produces
    live = p.table.state_of("a")
    p.store.close()  # kill -9
    recovered, replayed = _open_pipeline(tmp_path)
    assert replayed == 1
    np.testing.assert_array_equal(recovered.table.state_of("a"), live)


def test_a_batch_with_more_distinct_keys_than_max_streams_steps_them_all(tmp_path):
    """`StreamTable.slots_for` raised when one micro-batch held more distinct keys than ``max_streams``
    (a burst from many devices): the worker thread died and the redelivered batch killed the next one."""
    model = write_model(tmp_path / "model.ern")
    p, _ = _open_pipeline(tmp_path, pipeline="max_streams = 2")
    keys = ["a", "b", "c", "d", "e"]
    Y, stepped = p.advance(keys, np.zeros(5, np.int64), np.stack([sample(k, 0) for k in range(5)]))
    assert stepped.all()
    np.testing.assert_allclose(Y[2], offline(model, 2, [0])[0], atol=ATOL)
    assert len(p.table) == 2
    p.store.close()


# ---- the MQTT link ---------------------------------------------------------------------------------

def _broker_settings(tmp_path, port: int, broker: str = ""):
    write_model(tmp_path / "model.ern")
    return load_config(write_config(tmp_path, port, client_id="edgernn-link-test", broker=broker)).broker


@broker_test
def test_a_qos0_publish_queued_at_a_disconnect_still_completes(tmp_path, broker):
    """paho drops QoS 0 packets still queued at a reconnect without calling on_publish, so ``on_done``
    never ran: the input was never acked and the scheduler's in-flight count never returned to 0, which
    made every later snapshot (the SIGTERM one included) be skipped. One connection, so that the publish
    waits behind the busy network thread (on the default second connection it would go out at once)."""
    received = threading.Event()

    def deliver(inbound):  # keeps the network thread busy, so the publish below stays queued
        received.set()
        time.sleep(1.5)

    link = MqttLink(_broker_settings(tmp_path, broker.port, "separate_output_connection = false"), [("in/#", 1)],
                    deliver)
    link.start()
    assert link.connected.wait(10)
    time.sleep(0.3)  # the SUBACK
    sender = Client(broker.port)
    try:
        sender.publish("in/a", b"{}", qos=1)
        assert received.wait(5)
        done = threading.Event()
        link.publish("predictions/a", b"y", qos=0, on_done=done.set)  # a pipeline with publish_qos = 0
        broker.process.kill()
        broker.process.wait()
        time.sleep(1.0)
        broker.start()
        assert wait_until(link.connected.is_set, 10)
        assert done.wait(5), "on_done of a QoS 0 publish never ran (lost at the reconnect)"
    finally:
        sender.close()
        link.stop(publish_offline=False)


@broker_test
@pytest.mark.parametrize("qos", [1, 2])
def test_an_unacked_input_is_delivered_again_to_the_next_process(tmp_path, broker, qos):
    """A message received but never acked must come back after a restart. paho sends PUBREC for a QoS 2
    message on arrival, so the broker counted a QoS 2 input as delivered before its prediction existed."""
    settings = _broker_settings(tmp_path, broker.port)
    first, second = [], []
    link = MqttLink(settings, [("in/#", qos)], first.append)
    link.start()
    assert link.connected.wait(10)
    time.sleep(0.3)  # the SUBACK
    sender = Client(broker.port)
    try:
        sender.publish("in/a", b"sample", qos=qos)
        assert wait_until(lambda: first, 5)
        link.stop(publish_offline=False)  # stopped with the message unacked, as a SIGTERM leaves it
        link = MqttLink(settings, [("in/#", qos)], second.append)
        link.start()
        assert link.connected.wait(10)
        assert wait_until(lambda: second, 5), f"QoS {qos}: the unacked message was not delivered again"
        assert second[0].payload == b"sample"
    finally:
        sender.close()
        link.stop(publish_offline=False)


# ---- inputs that killed the worker -----------------------------------------------------------------

@broker_test
def test_a_key_too_long_for_the_output_topic_is_rejected_not_fatal(tmp_path, broker):
    """A legal 65535-byte input topic made an output topic over MQTT's limit: `TopicTemplate.format` raised
    after stepping, the worker thread died, and the redelivered message killed every restart."""
    write_model(tmp_path / "model.ern")
    daemon = start_daemon(write_config(tmp_path, broker.port))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        key = "k" * (65535 - len("sensors//imu"))
        sender.publish(f"sensors/{key}/imu", payload(0, 0))
        sender.publish("sensors/dev0/imu", payload(0, 0))
        assert collector.wait_for(1, 10), "no prediction after the long-key message"
        assert daemon._worker.is_alive()
        assert daemon.metrics.pipeline("imu").rejected("bad_key")._value.get() == 1
        assert key not in daemon.pipelines[0].table
    finally:
        sender.close(), collector.close(), daemon.stop()


@broker_test
def test_a_burst_of_more_keys_than_max_streams_is_answered_in_full(tmp_path, broker):
    """The daemon-level face of the `max_streams` fault above: a burst from more devices than
    ``max_streams`` killed the worker; now every message gets its prediction (evicted streams restart)."""
    write_model(tmp_path / "model.ern")
    daemon = start_daemon(write_config(tmp_path, broker.port, pipeline="max_streams = 2"))
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in range(100):
            for k in range(3):
                sender.publish(f"sensors/dev{k}/imu", payload(k, seq), wait=False)
        got = collector.wait_for(300, 15)
        assert daemon._worker.is_alive(), "the worker thread died on the burst"
        assert len(got) == 300
    finally:
        sender.close(), collector.close(), daemon.stop()


# ---- the shutdown ----------------------------------------------------------------------------------

@broker_test
def test_stop_returns_while_messages_keep_arriving_into_a_full_inbox(tmp_path, broker):
    """With the inbox full, `Inbox.put` blocked paho's network thread for good once the worker had stopped
    taking messages; `Daemon.stop` joins that thread, so a SIGTERM under traffic never finished."""
    write_model(tmp_path / "model.ern")
    daemon = start_daemon(write_config(tmp_path, broker.port,
                                       daemon="max_undelivered_messages = 2\nshutdown_timeout = 1.0"))
    sender = Client(broker.port)
    try:
        daemon.stopping.set()  # SIGTERM: the worker finishes and snapshots ...
        daemon._worker.join(10)
        for seq in range(10):  # ... while traffic keeps arriving until the disconnect
            sender.publish("sensors/dev0/imu", payload(0, seq), wait=False)
        time.sleep(1.0)
        stopper = threading.Thread(target=daemon.stop, daemon=True)
        started = time.monotonic()
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), f"Daemon.stop still running after {time.monotonic() - started:.0f} s"
    finally:
        sender.close()


# ---- an idle reset, then kill -9 (a real daemon process) -------------------------------------------

def _all_predictions(collector, key: str) -> list[tuple[int, list]]:
    """Every (seq, y) received for ``key``, repeats included (`Client.predictions` keeps one per seq)."""
    bodies = (json.loads(p) for _, p in collector.messages)
    return [(body["seq"], body["y"]) for body in bodies if body["key"] == key]


@broker_test
def test_an_idle_reset_is_not_undone_by_the_journal_replay_after_kill_9(tmp_path, broker):
    """The journal does not record idle resets: replaying it from the snapshot before a reset stepped the
    restarted stream on from its pre-reset state, so after a kill -9 its predictions (re-published and new)
    were wrong. The daemon now snapshots after an idle reset in journal mode."""
    model = write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, broker.port, pipeline="idle_reset = 0.5",
                          state='durability = "journal"\nsnapshot_interval = 3600')
    process = DaemonProcess(config, tmp_path / "daemon.log").start()
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in range(3):
            sender.publish("sensors/dev0/imu", payload(0, seq))
        assert len(collector.wait_for(3, 10)) == 3
        time.sleep(2.0)  # the idle reset (0.5 s of silence) and the snapshot that follows it
        sender.publish("sensors/dev0/imu", payload(0, 3))  # a fresh stream from the rest state
        assert len(collector.wait_for(4, 10)) == 4
        process.kill()
        process.start()
        sender.publish("sensors/dev0/imu", payload(0, 4))
        assert wait_until(lambda: any(seq == 4 for seq, _ in _all_predictions(collector, "dev0")), 10), \
            "no prediction for seq 4 after the restart"
        time.sleep(0.3)  # anything re-published late
        before_reset, after_reset = offline(model, 0, [0, 1, 2]), offline(model, 0, [3, 4])
        for seq, y in _all_predictions(collector, "dev0"):
            want = before_reset[seq] if seq < 3 else after_reset[seq - 3]
            np.testing.assert_allclose(y, want, atol=ATOL, err_msg=f"seq {seq}")
    finally:
        sender.close(), collector.close()
        if process.process.poll() is None:
            process.terminate()


# ---- a crash between journalling a message and acking it -------------------------------------------

@broker_test
def test_a_journalled_message_the_broker_delivers_again_is_not_stepped_twice(tmp_path, broker):
    """kill -9 after a message is journalled but before it is acked: the restarted daemon replays it from
    the journal AND the broker delivers it again. Without `seq` only the packet id and a CRC of topic and
    payload (kept in the journal) tell the copy apart; stepping it would advance the stream twice."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgernn.runtime.mqtt import delivery_id
    from edgernn.runtime.persistence import StateStore
    from edgernn.streams import StreamTable

    model = write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, broker.port, state='durability = "journal"')
    first = json.dumps({"x": [float(v) for v in sample(0, 0)], "ts": 0.0}).encode()
    # The daemon's session, as a crashed daemon leaves it: subscribed, one message received, not acked.
    received = []
    crashed = paho.Client(CallbackAPIVersion.VERSION2, client_id="edgernn-test", clean_session=False, manual_ack=True)
    crashed.on_message = lambda client, userdata, message: received.append(message.mid)
    crashed.connect("127.0.0.1", broker.port)
    crashed.loop_start()
    crashed.subscribe("sensors/+/imu", qos=1)
    time.sleep(0.3)
    sender = Client(broker.port)
    sender.publish("sensors/dev0/imu", first)
    assert wait_until(lambda: received, 5)
    crashed.loop_stop()
    crashed.socket().close()  # no DISCONNECT, no PUBACK: the broker keeps the message in flight
    # ...and its journal: the message stepped (journalled), its prediction never confirmed.
    store = StateStore(tmp_path / "state", "imu", "journal")
    store.recover(StreamTable(model))
    store.append_batch(0, ["dev0"], np.array([-1]), sample(0, 0)[None], np.array([0.0]),
                       np.array([delivery_id(received[0], "sensors/dev0/imu", first)], np.uint64))
    store.close()

    collector = Client(broker.port, subscribe="predictions/#")
    daemon = start_daemon(config)
    try:
        time.sleep(1.0)  # the redelivery arrives
        sender.publish("sensors/dev0/imu", {"x": [float(v) for v in sample(0, 1)], "ts": 1.0})
        assert wait_until(lambda: any(json.loads(p)["ts"] == 1.0 for _, p in collector.messages), 10)
        time.sleep(0.3)  # anything re-published late
        got = {}
        for _, body in list(collector.messages):  # every copy, not only the last one of each ts
            body = json.loads(body)
            got.setdefault(body["ts"], []).append(body["y"])
        assert sorted(got) == [0.0, 1.0]
        want = offline(model, 0, [0, 1])
        for y in got[0.0]:
            np.testing.assert_allclose(y, want[0], atol=ATOL)  # re-published from the journal
        for y in got[1.0]:
            np.testing.assert_allclose(y, want[1], atol=ATOL)  # the state advanced once by the first
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_a_publish_paho_refuses_completes_at_once_and_is_counted(tmp_path):
    """paho refuses a publish outright (its queue full; in a flood on one connection, no packet id left):
    no confirmation will ever come, so ``on_done`` runs at once -- else the input it answers, and every
    later one (acks leave in order), would never be acked -- and the failure is counted for the metrics."""
    failures = []
    link = MqttLink(_broker_settings(tmp_path, free_port()), [("in/#", 1)], lambda inbound: None,
                    on_publish_failed=lambda: failures.append(1))
    link.outputs.client.max_queued_messages_set(1)  # never started: publishes queue, the second is refused
    first, second = threading.Event(), threading.Event()
    link.publish("predictions/a", b"1", qos=1, on_done=first.set)
    link.publish("predictions/b", b"2", qos=1, on_done=second.set)
    assert not first.is_set(), "a queued publish completes only when the broker confirms it"
    assert second.is_set(), "a refused publish must complete at once"
    assert link.publish_failures == 1 and failures == [1]
    link.outputs.client.max_queued_messages_set(0)
    qos0 = threading.Event()
    link.publish("predictions/c", b"3", qos=0, on_done=qos0.set)  # paho drops QoS 0 while disconnected
    assert qos0.is_set() and link.publish_failures == 2, "a QoS 0 prediction lost while disconnected is counted"


@broker_test
def test_predictions_the_broker_refuses_are_counted_and_said(tmp_path):
    """MQTT 5: a broker refuses a publish in its PUBACK (here Mosquitto's ACL forbids the prediction topic):
    the prediction is lost, so it is counted and logged, and its input is still acked (nothing waits for ever)."""
    from broker import Mosquitto

    (tmp_path / "acl").write_text("topic readwrite sensors/#\ntopic readwrite edgernn/#\n")
    broker = Mosquitto(tmp_path / "broker", extra_config=f"acl_file {tmp_path / 'acl'}\n").start()
    failures = []
    link = MqttLink(_broker_settings(tmp_path, broker.port, 'protocol = "5"'), [("sensors/#", 1)],
                    lambda inbound: None, on_publish_failed=lambda: failures.append(1))
    try:
        link.start()
        assert link.connected.wait(10)
        done = threading.Event()
        link.publish("predictions/dev0/imu", b"{}", qos=1, on_done=done.set)
        assert done.wait(10), "a refused publish completes (its input is acked)"
        assert link.publish_failures == 1 and failures == [1]
        allowed = threading.Event()
        link.publish("edgernn/allowed", b"{}", qos=1, on_done=allowed.set)
        assert allowed.wait(10) and link.publish_failures == 1
    finally:
        link.stop()
        broker.stop()
