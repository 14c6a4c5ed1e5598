"""One simulated sensor device, behaving like real MQTT firmware.

- its own client id ``sim-<id>``, a last will ``devices/<id>/status`` = "offline" (retained, QoS 1) and a
  retained "online" published on every connect, a retained "offline" on a clean shutdown;
- a ``seq`` per device counting from 0 (a dropped message uses its number up) and a device timestamp
  ``ts`` (seconds: the sample's own time, jitter included);
- payload ``{"x": [...], "seq": n, "ts": t}`` on its topic, QoS 1 by default;
- store and forward: readings wait in a bounded buffer (a deque; when full the oldest is dropped and
  counted) while the device is offline or its in-flight window is full, and go out in order.

The device never publishes from inside a paho callback. On a reconnect paho re-sends its unacknowledged
QoS 1 messages from its CONNACK handler, *after* ``on_connect`` returns; buffered readings published from
``on_connect`` would overtake them. So `pump` runs from the fleet's loop, once the connection is up, and
hands paho at most ``window`` unacknowledged messages: paho's own queue never grows, the buffer here is
the only one, and it is bounded.

The device does no I/O of its own: the fleet's loop owns the sockets (see fleet.py).
"""

from __future__ import annotations

import logging
import socket
from collections import deque

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .faults import FaultInjector, Message, encode_sample

log = logging.getLogger(__name__)

STATUS_TOPIC = "devices/{device}/status"
ONLINE, OFFLINE = b"online", b"offline"


class Device:
    """One device: its MQTT client, its sample source, its faults, its buffer and its ground truth.

    ``source`` has ``next() -> (values, label)`` (a `signals.Signal` or a replayed file). ``events`` is
    told when the device's socket opens or closes and when it connects or loses its connection (the
    fleet's loop). ``record`` keeps every published message (`faults.Message`) in order, for tests.
    """

    def __init__(self, device_id: str, source, topic: str, events, *, qos: int = 1, buffer: int = 1000,
                 injector: FaultInjector | None = None, window: int = 20, record: bool = False,
                 truth_window: int = 4096, keepalive: int = 30, labels: bool = False, connect_timeout: float = 5.0):
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        if buffer < 1:
            raise ValueError(f"the buffer holds at least one reading, got {buffer}")
        self.id = device_id
        self.source = source
        self.topic = topic
        self.status_topic = STATUS_TOPIC.format(device=device_id)
        self.qos = qos
        self.window = window
        self.injector = injector
        self.events = events
        self.keepalive = keepalive
        self.labels = labels  # put each sample's true label in its payload
        self.seq = 0
        self.buffer: deque[Message] = deque()
        self.buffer_limit = buffer
        self.buffer_dropped = 0
        self.published = 0
        self.acked = 0
        self.connects = 0
        self.disconnects = 0
        self.record: list[Message] | None = [] if record else None
        self._truth: list = [None] * truth_window
        self._unacked: set[int] = set()
        self.connected = False
        self._closing = False
        self._address: tuple[str, int] | None = None
        self.done = False  # its source ran out (a replayed file)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{device_id}", clean_session=True)
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.connect_timeout = connect_timeout  # paho allows setting it only before the first connect
        client.max_inflight_messages_set(window + 2)  # the window plus status messages: paho never queues
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = lambda c, u, sock: events.socket_opened(self, sock)
        client.on_socket_close = lambda c, u, sock: events.socket_closed(self, sock)
        self.client = client

    # ---- samples ------------------------------------------------------------------------------------

    def sample(self, ts: float) -> bool:
        """Take the next reading (sample time ``ts``) into the buffer; False when the source ran out."""
        try:
            values, label = self.source.next()
        except StopIteration:
            self.done = True
            return False
        seq = self.seq
        self.seq = seq + 1
        self._truth[seq % len(self._truth)] = label
        if not self.labels:
            label = None
        if self.injector is None:
            self._enqueue(Message(seq, "ok", encode_sample(values, seq, ts, label)))
        else:
            for message in self.injector.inject(seq, values, ts, label):
                self._enqueue(message)
        return True

    def finish(self) -> None:
        """No more samples: a message held back for a reorder goes out now."""
        if self.injector is not None:
            for message in self.injector.release():
                self._enqueue(message)

    def _enqueue(self, message: Message) -> None:
        if len(self.buffer) >= self.buffer_limit:
            lost = self.buffer.popleft()
            self.buffer_dropped += 1
            log.debug("%s: buffer full (%d), dropped seq %d", self.id, self.buffer_limit, lost.seq)
        self.buffer.append(message)

    def truth(self, seq: int):
        """The true label of sample ``seq``, or None when it is not (or no longer) known."""
        if not isinstance(seq, int) or not 0 <= seq < self.seq or seq < self.seq - len(self._truth):
            return None
        return self._truth[seq % len(self._truth)]

    # ---- publishing ---------------------------------------------------------------------------------

    def pump(self, limit: int) -> int:
        """Hand paho up to ``limit`` buffered messages, oldest first, within the in-flight window."""
        client, buffer, sent = self.client, self.buffer, 0
        while buffer and sent < limit and self.connected:
            if self.qos:
                if len(self._unacked) >= self.window:
                    break
            elif client.want_write():  # QoS 0: the socket is backed up; keep readings here, not in paho
                break
            message = buffer.popleft()
            info = client.publish(self.topic, message.payload, qos=self.qos)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE or (not self.qos and info.rc == paho.MQTT_ERR_NO_CONN):
                buffer.appendleft(message)  # paho did not take it
                break
            if self.qos:
                self._unacked.add(info.mid)  # paho keeps it until PUBACK, across reconnects
            self.published += 1
            sent += 1
            if self.record is not None:
                self.record.append(message)
        return sent

    @property
    def in_flight(self) -> int:
        """QoS 1 messages handed to paho and not acknowledged yet."""
        return len(self._unacked)

    @property
    def settled(self) -> bool:
        """Nothing left to send: the buffer is empty and every message is acknowledged."""
        return not self.buffer and not self._unacked

    # ---- connection ---------------------------------------------------------------------------------

    def connect(self, host: str, port: int) -> None:
        """Open a connection: a blocking TCP connect of at most ``connect_timeout`` seconds, then CONNECT (the
        CONNACK arrives through the fleet's loop). The first connect and every reconnect alike; paho re-sends
        the unacknowledged QoS 1 messages once the CONNACK is in. Raises OSError (TimeoutError included)."""
        if self._address != (host, port):
            self.client.connect_async(host, port, self.keepalive)  # only records where to connect
            self._address = (host, port)
        self.client.reconnect()

    def drop_connection(self) -> None:
        """Lose the connection abruptly, as a device losing power or signal: no DISCONNECT, so the broker
        publishes the last will. Paho notices the closed socket and reports the loss as usual."""
        sock = self.client.socket()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.client.loop_read()  # reads end-of-file: paho closes the socket and calls on_disconnect

    def shutdown(self) -> None:
        """A clean stop: a retained "offline", then DISCONNECT (the broker then discards the will)."""
        self._closing = True
        if self.connected:
            self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
        if self.client.socket() is not None:
            self.client.disconnect()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: connection refused: %s", self.id, reason_code)
            return
        self.connected = True
        self.connects += 1
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)  # sent when the loop writes next
        self.events.device_connected(self)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected and not self._closing:
            self.disconnects += 1
        self.events.device_lost(self, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid in self._unacked:
            self._unacked.discard(mid)
            self.acked += 1
