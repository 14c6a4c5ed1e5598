"""A real Mosquitto for the daemon's tests, on a free loopback port, with its own config and data dir.

Never the system broker (127.0.0.1:1883): each test gets its own, which it may stop, kill (``kill()``, or
``process.kill()`` to start it again with ``start()``) and restart on the same port. The launcher is
`edgernn.local_broker.MosquittoBroker`, the one `edgernn demo` uses: persistence is on and
``max_queued_messages`` is unlimited, so a persistent session keeps every QoS 1 message while its client
is away (Mosquitto's default keeps only 1000 -- the README says so too).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgernn.local_broker import MosquittoBroker, free_port, mosquitto_binary

__all__ = ["Mosquitto", "Client", "free_port", "mosquitto_binary"]

Mosquitto = MosquittoBroker
"""``Mosquitto(directory, port=None, extra_config="").start()``; ``stop()``, ``kill()``, ``restart()``."""


class Client:
    """A test MQTT client: publishes samples, collects everything it receives.

    ``messages`` holds (topic, payload) in arrival order and ``retained`` the retain flag of each. A
    prediction may arrive more than once (QoS 1 is at-least-once: a re-sent PUBLISH after a reconnect, a
    prediction re-published after a restart), so waits count *distinct* messages: one per (key, seq)
    for JSON predictions that carry a seq, one per message for anything else (raw output, no seq).
    """

    def __init__(self, port: int, client_id: str = "", subscribe: str | None = None):
        persistent = bool(client_id)  # a named client keeps its session (and messages) across broker restarts
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.reconnect_delay_set(1, 1)
        self.messages: list[tuple[str, bytes]] = []
        self.retained: list[bool] = []
        self.by_topic = defaultdict(list)
        self.connects = 0  # CONNACKs received: a reconnect after a broker restart makes it 2
        self._distinct: set = set()
        self._received = threading.Condition()
        self._subscription = subscribe
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_publish = self._on_publish
        self._confirmed: set[int] = set()  # packet ids of our QoS 1 publishes the broker acknowledged
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if subscribe:
            assert self._subscribed.wait(5), "no SUBACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if self._subscription:
            client.subscribe(self._subscription, qos=1)
        with self._received:
            self.connects += 1
            self._received.notify_all()

    def _on_message(self, client, userdata, message):
        with self._received:
            self.messages.append((message.topic, message.payload))
            self.retained.append(bool(message.retain))
            self.by_topic[message.topic].append(message.payload)
            self._distinct.add(_identity(len(self.messages), message.payload))
            self._received.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._received:
            self._confirmed.add(mid)
            self._received.notify_all()

    def publish_in_order(self, topic: str, payload, timeout: float = 30) -> None:
        """QoS 1, one message in flight at a time: returns once the broker has it, across reconnects.
        paho may reorder messages queued while it reconnects (one published just after the reconnect can
        overtake those it resends), which only a seq lets the daemon undo."""
        assert self._wait_until(self.client.is_connected, timeout), "publisher not connected"
        info = self.client.publish(topic, json.dumps(payload) if isinstance(payload, dict) else payload, qos=1)
        assert self._wait_until(lambda: info.mid in self._confirmed, timeout), f"no PUBACK for {topic}"
        with self._received:
            self._confirmed.discard(info.mid)

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if wait:
            info.wait_for_publish(10)

    def _wait_until(self, done, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._received:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._received.wait(left)
            return True

    def wait_for(self, count: int, timeout: float = 20.0) -> list:
        """Wait for ``count`` messages, repeats included; returns the messages received so far."""
        self._wait_until(lambda: len(self.messages) >= count, timeout)
        with self._received:
            return list(self.messages)

    def wait_for_distinct(self, count: int, timeout: float = 30.0) -> int:
        """Wait for ``count`` distinct messages (see the class docstring); returns how many arrived."""
        self._wait_until(lambda: len(self._distinct) >= count, timeout)
        with self._received:
            return len(self._distinct)

    def wait_for_connects(self, count: int, timeout: float = 20.0) -> bool:
        """Wait until this client has connected ``count`` times (2: it is back after a broker restart)."""
        return self._wait_until(lambda: self.connects >= count, timeout)

    def predictions(self) -> dict:
        """{key: {seq: y}} from every JSON prediction received, which must all carry a seq.

        A repeated prediction is computed from the same state as the first, so it must be identical
        (asserted: a repeat that differs means a stream was stepped twice or from the wrong state).
        """
        with self._received:
            messages = list(self.messages)
        out: dict = {}
        for topic, payload in messages:
            body = json.loads(payload)
            assert "seq" in body, f"a prediction without seq on {topic}: predictions() cannot tell repeats apart"
            seen = out.setdefault(body["key"], {})
            seq = body["seq"]
            if seq in seen:
                assert body["y"] == seen[seq], (f"{body['key']} seq {seq}: a repeated prediction differs: "
                                                f"{seen[seq]} then {body['y']}")
            else:
                seen[seq] = body["y"]
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _identity(index: int, payload: bytes):
    """What makes a received message distinct: (key, seq) of a JSON prediction with a seq, else its index."""
    try:
        body = json.loads(payload)
    except ValueError:
        return index
    if isinstance(body, dict) and "key" in body and body.get("seq") is not None:
        return (body["key"], body["seq"])
    return index
