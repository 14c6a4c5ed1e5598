"""`edgernn.local_broker`: Mosquitto and the embedded amqtt broker start, carry QoS 1 messages the way the
daemon needs (persistent sessions, redelivery of unacked messages), stop cleanly, and the daemon works
over amqtt as it does over Mosquitto.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Client
from daemon_harness import offline, payload, start_daemon, wait_until, write_config, write_model
from edgernn import local_broker
from edgernn.local_broker import (AmqttBroker, BrokerStartError, MosquittoBroker, accepts_connections,
                                  amqtt_installed, mosquitto_binary, start_local_broker)

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = {"mosquitto": mosquitto_binary() is not None, "amqtt": amqtt_installed()}
needs_amqtt = pytest.mark.skipif(not INSTALLED["amqtt"], reason="amqtt is not installed (pip install -e '.[demo]')")
needs_mosquitto = pytest.mark.skipif(not INSTALLED["mosquitto"], reason="mosquitto is not installed (make broker)")


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    if not INSTALLED[request.param]:
        pytest.skip(f"{request.param} is not installed")
    server = start_local_broker(tmp_path, prefer=request.param)
    yield server
    server.stop()


def _port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` and a server could listen there (as brokers do: with SO_REUSEADDR)."""
    if accepts_connections(port):
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _gone(pid: int) -> bool:
    """The process no longer runs (exited, or a zombie that nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _manual_ack_client(port: int, client_id: str) -> tuple[paho.Client, list]:
    """A persistent-session client that never acks (as the daemon before its prediction is out)."""
    received: list = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, manual_ack=True)
    client.on_message = lambda c, u, message: received.append(message)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("work/#", qos=1)
    assert subscribed.wait(5), "no SUBACK"
    return client, received


# ---- both kinds ---------------------------------------------------------------------------------

def test_the_broker_carries_qos1_messages_in_order_and_stop_frees_its_port(broker):
    threads_before = threading.active_count()
    assert broker.kind in ("mosquitto", "amqtt") and broker.host == "127.0.0.1"
    assert broker.address == f"127.0.0.1:{broker.port}"
    receiver = Client(broker.port, subscribe="t/#")
    sender = Client(broker.port)
    try:
        for i in range(50):
            sender.publish(f"t/{i % 3}", f"m{i}".encode(), qos=1, wait=False)
        got = receiver.wait_for(50)
        assert [payload for _, payload in got] == [f"m{i}".encode() for i in range(50)]
        assert not any(receiver.retained)
    finally:
        sender.close(), receiver.close()
    pid, port = broker.process.pid, broker.port
    broker.stop()
    assert broker.process.returncode is not None and not broker.running
    assert _port_is_free(port) and _gone(pid)
    assert threading.active_count() == threads_before
    broker.stop()  # stopping twice is harmless


def test_restart_keeps_the_port_and_kill_frees_it(broker):
    port = broker.port
    broker.restart()
    assert broker.port == port and accepts_connections(port)
    client = Client(port, subscribe="t/#")
    client.publish("t/x", b"after the restart")
    assert client.wait_for(1) == [("t/x", b"after the restart")]
    client.close()
    pid = broker.process.pid
    broker.kill()
    assert broker.process.returncode == -signal.SIGKILL
    assert _port_is_free(port) and _gone(pid)
    broker.start()  # and it comes back on the same port
    assert broker.port == port and accepts_connections(port)


def test_a_persistent_session_gets_what_was_published_while_it_was_away(broker):
    away = Client(broker.port, client_id="away", subscribe="t/#")
    away.close()
    sender = Client(broker.port)
    for i in range(20):
        sender.publish("t/x", f"m{i}".encode(), qos=1)
    back = Client(broker.port, client_id="away")  # no new SUBSCRIBE: the session kept it
    try:
        got = back.wait_for(20)
        assert [payload for _, payload in got] == [f"m{i}".encode() for i in range(20)]
        # Ordinary messages of an established subscription (MQTT 3.1.1, 3.3.1.3): amqtt set RETAIN on them.
        assert back.retained == [False] * 20
    finally:
        sender.close(), back.close()


def test_a_message_unacked_at_a_disconnect_is_delivered_again(broker):
    """amqtt forgot a QoS 1 message in flight when its client went away before the PUBACK."""
    client, received = _manual_ack_client(broker.port, "worker")
    sender = Client(broker.port)
    try:
        sender.publish("work/1", b"job")
        assert wait_until(lambda: received, 5)
        client.disconnect()  # stopped before its work was done: no PUBACK was sent
        client.loop_stop()
        again = Client(broker.port, client_id="worker")
        got = again.wait_for(1)
        assert got == [("work/1", b"job")]
        again.close()
    finally:
        sender.close()


def test_a_connecting_client_gets_no_retained_messages_of_other_clients_subscriptions(broker):
    """amqtt sent every new client the retained messages matching anyone's subscription."""
    watcher = Client(broker.port, subscribe="status/#")
    sender = Client(broker.port)
    bystander = None
    try:
        sender.publish("status/dev1", b"online", retain=True)
        assert watcher.wait_for(1) == [("status/dev1", b"online")]
        bystander = Client(broker.port, subscribe="other/#")
        sender.publish("other/x", b"for the bystander")
        # Retained messages at CONNECT would have come first, before the SUBACK and this message.
        assert bystander.wait_for(1) and bystander.messages == [("other/x", b"for the bystander")]
    finally:
        for client in (watcher, sender, bystander):
            if client is not None:
                client.close()


# ---- choosing and failing -----------------------------------------------------------------------

def test_prefer_must_name_a_kind(tmp_path):
    with pytest.raises(ValueError, match="prefer must be"):
        start_local_broker(tmp_path, prefer="nats")


@needs_mosquitto
def test_auto_prefers_mosquitto(tmp_path):
    with start_local_broker(tmp_path) as broker:
        assert broker.kind == "mosquitto" and isinstance(broker, MosquittoBroker)
        assert (tmp_path / "mosquitto" / "mosquitto.conf").read_text().count("max_queued_messages 0") == 1
    assert not broker.running


@needs_amqtt
def test_auto_without_mosquitto_embeds_amqtt(tmp_path, monkeypatch):
    monkeypatch.setattr(local_broker, "mosquitto_binary", lambda: None)  # as on a machine without it
    with start_local_broker(tmp_path) as broker:
        assert broker.kind == "amqtt" and isinstance(broker, AmqttBroker)
        assert accepts_connections(broker.port)
    assert not broker.running and not accepts_connections(broker.port)


@needs_amqtt
def test_auto_falls_back_to_amqtt_when_mosquitto_does_not_start(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "mosquitto"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: broken install' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert mosquitto_binary() == str(fake)
    with pytest.raises(BrokerStartError, match="exited with code 3 at start: Error: broken install"):
        start_local_broker(tmp_path / "insisted", prefer="mosquitto")
    with start_local_broker(tmp_path / "auto") as broker:
        assert broker.kind == "amqtt"


@needs_mosquitto
def test_a_mosquitto_that_refuses_its_config_says_why(tmp_path):
    broker = MosquittoBroker(tmp_path, extra_config="no_such_option true\n")
    with pytest.raises(BrokerStartError, match="mosquitto exited .*no_such_option"):
        broker.start()
    assert not broker.running


@needs_amqtt
def test_amqtt_on_a_port_in_use_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = AmqttBroker(tmp_path, port=taken.getsockname()[1])
        in_use = "amqtt broker did not start on 127.0.0.1:[0-9]+: .*address already in use"
        with pytest.raises(BrokerStartError, match=in_use):
            broker.start()
    assert not broker.running


def test_a_missing_mosquitto_is_a_clear_error(tmp_path):
    broker = MosquittoBroker(tmp_path)
    broker.binary = None  # as mosquitto_binary() finds it on a machine without Mosquitto
    with pytest.raises(BrokerStartError, match="mosquitto is not installed"):
        broker.start()


# ---- no broker outlives its process --------------------------------------------------------------

OWNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgernn.local_broker import start_local_broker
    broker = start_local_broker(Path(sys.argv[1]), prefer=sys.argv[2])
    print(broker.port, broker.process.pid, flush=True)
    if sys.argv[3] == "sleep":
        time.sleep(120)
""")


@pytest.mark.parametrize("kind, end", [("amqtt", "exit"), ("mosquitto", "exit"), ("amqtt", "sigkill")])
def test_the_broker_stops_when_its_process_ends(tmp_path, kind, end):
    """At a normal exit the atexit hook stops it; amqtt also stops when its parent dies by SIGKILL (it
    watches its stdin). A SIGKILLed parent's Mosquitto lives on: the demo stops it on Ctrl-C and SIGTERM."""
    if not INSTALLED[kind]:
        pytest.skip(f"{kind} is not installed")
    then = "sleep" if end == "sigkill" else "exit"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), kind, then], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    port, pid = map(int, owner.stdout.readline().split())
    if end == "sigkill":
        assert accepts_connections(port)
        owner.kill()
    owner.wait(30)
    owner.stdout.close()
    assert wait_until(lambda: _gone(pid), 15), f"the {kind} broker outlived its process"
    assert _port_is_free(port)


# ---- the daemon over amqtt ----------------------------------------------------------------------

@pytest.fixture
def amqtt_broker(tmp_path):
    if not INSTALLED["amqtt"]:
        pytest.skip("amqtt is not installed")
    server = AmqttBroker(tmp_path / "broker").start()
    yield server
    server.stop()


def _publish_streams(sender: Client, streams: int, seqs) -> None:
    for seq in seqs:
        for k in range(streams):
            sender.publish(f"sensors/dev{k}/imu", payload(k, seq), wait=False)


def _check(received: dict, model, expected: dict) -> None:
    """Every stream got exactly one prediction per seq, each what an uninterrupted offline run gives."""
    for key_index, seqs in expected.items():
        got = received.get(f"dev{key_index}", {})
        assert sorted(got) == sorted(seqs), f"dev{key_index}: predictions for seqs {sorted(got)}, expected {seqs}"
        np.testing.assert_allclose(np.array([got[s] for s in seqs]), offline(model, key_index, seqs), atol=1e-5)


def test_the_daemon_over_amqtt_predicts_every_sample_of_every_stream(tmp_path, amqtt_broker):
    model = write_model(tmp_path / "model.ern")
    daemon = start_daemon(write_config(tmp_path, amqtt_broker.port))
    collector = Client(amqtt_broker.port, subscribe="predictions/#")
    sender = Client(amqtt_broker.port)
    try:
        _publish_streams(sender, 5, range(40))
        assert collector.wait_for_distinct(200) == 200
        _check(collector.predictions(), model, {k: list(range(40)) for k in range(5)})
        assert len(collector.messages) == 200  # no repeats on a quiet run
        assert daemon.metrics.pipeline("imu").messages_out._value.get() == 200
    finally:
        sender.close(), collector.close(), daemon.stop()


def test_the_daemon_over_amqtt_stopped_mid_flow_and_restarted_loses_nothing(tmp_path, amqtt_broker):
    """Its persistent session keeps what arrives while it is away, and what it had received but not acked
    when it stopped is delivered again: amqtt as it comes lost both (see edgernn/_amqtt_server.py)."""
    model = write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, amqtt_broker.port)
    daemon = start_daemon(config)
    collector = Client(amqtt_broker.port, client_id="collector", subscribe="predictions/#")
    sender = Client(amqtt_broker.port)
    try:
        _publish_streams(sender, 4, range(60))
        assert wait_until(lambda: len(collector.messages) >= 40, 30)
        daemon.stop()  # mid-flow: some inputs received and not yet acked
        _publish_streams(sender, 4, range(60, 80))  # while it is away
        sender.client.publish("flush/marker", b"", qos=1).wait_for_publish(10)
        daemon = start_daemon(config)
        assert collector.wait_for_distinct(320) == 320
        _check(collector.predictions(), model, {k: list(range(80)) for k in range(4)})
    finally:
        sender.close(), collector.close(), daemon.stop()
