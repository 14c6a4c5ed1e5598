"""The daemon's MQTT connections: the only module that knows paho-mqtt (2.x, callback API v2).

What it promises the rest of the daemon:

- Subscriptions are made in ``on_connect``, so they come back after every reconnect; reconnects back off
  from ``min_reconnect_interval`` to ``max_reconnect_interval`` (paho's loop does the waiting).
- A persistent session (``persistent_session = true``, the default) with the fixed client id: the broker
  keeps QoS 1/2 messages while the daemon is away and hands them over when it returns.
- ``manual_ack``: an inbound QoS 1/2 message is acknowledged only when the daemon calls `ack`, i.e. after
  its prediction is published. Until then the broker redelivers it after a reconnect.
- A retained ``online``/``offline`` status topic, ``offline`` also as the Last Will.
- Predictions go out on a second connection (``client_id-out``) unless ``separate_output_connection =
  false``: see `MqttLink`.
- paho's network thread only converts each message to an `Inbound` and hands it to ``deliver``: no
  decoding, no inference there.

Connection failures say why: paho only reports *that* an attempt failed. `_Client` keeps the error of
each attempt (TCP, the TLS handshake, or a TLS alert read just after it: a broker that rejects our client
certificate says so only after TLS 1.3's handshake), and `describe_failure` turns it, or a refusing
CONNACK, into one sentence naming the cause and the option to check. ``startup_error_behavior = "error"``
raises it as `ConnectError` at the first failure; ``"retry"`` logs it (``connect_failed``, at most once a
minute per cause) and keeps trying. When TLS is configured every attempt uses it: there is no plain-text
fallback. The password is handed to paho only: no message here ever contains it.

Redeliveries: after a reconnect the broker resends every unacknowledged message with its original packet
id and the DUP flag. A copy of a message this connection already received is never stepped again, so a
stream without ``seq`` numbers is not stepped twice: dropped here while the original is in hand (its ack
will do), handed to the worker marked ``copy`` when the original was acked already (the ack was lost), to
be acked again in the order received.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .connect_failures import ConnectError, describe_failure, tls_context, uses_tls
from .logs import RateLimitedLog

log = logging.getLogger(__name__)

CONNECT_FAILED_LOG_INTERVAL = 60.0
"""Seconds between two ``connect_failed`` lines for the same cause while the daemon keeps retrying."""

READ_BURST = 64
"""Packets the network thread reads before it writes what is waiting (see `_Client.loop_read`)."""

SESSION_NEVER_EXPIRES = 0xFFFFFFFF
"""MQTT 5 session expiry interval meaning "keep the session until the client comes back"."""


def delivery_id(mid: int, topic: str, payload: bytes) -> int:
    """A QoS 1 message as the broker will deliver it again after a crash: its packet id (kept on
    redelivery, MQTT 3.1.1 section 4.4) and a CRC32 of topic and payload (stable across processes)."""
    return (mid << 32) | zlib.crc32(payload, zlib.crc32(topic.encode()))


@dataclass(slots=True)
class Inbound:
    """One received message, converted from paho's type at the boundary."""
    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float  # time.monotonic() at arrival
    copy: bool = False  # a redelivered copy of a message handled and acked before: only to be acked again


SMALL_PAYLOAD = 512
"""Bytes up to which `_Redeliveries` keeps a payload itself rather than its CRC."""


class _Redeliveries:
    """Recognises the broker's resend of a message already received (same packet id, topic and payload).

    Packet ids cycle through 1..65535, so at most that many entries are kept: memory stays bounded. An
    acked message is resent only when its ack was lost to a disconnect, i.e. in the next connection, so
    an acked entry counts only until the connection after the one it was (last) acked in ends: a new
    message that reuses the id much later is never mistaken for a copy.
    """

    def __init__(self):
        # mid -> (what: (topic, payload) as received, or the `delivery_id` of a message journalled before a
        # crash; the connection it was acked in, or None)
        self._seen: dict[int, tuple] = {}
        self._connection = 0
        self._lock = threading.Lock()

    def connected(self) -> None:
        with self._lock:
            self._connection += 1

    def expect(self, mid: int, delivery: int) -> None:
        """A message handled (journalled) before a crash: the broker may deliver it again once more."""
        with self._lock:
            self._seen[mid] = (delivery, self._connection)

    def is_copy(self, mid: int, topic: str, payload: bytes, dup: bool) -> tuple[bool, bool]:
        """(a copy of a message already received, that message already acked)."""
        with self._lock:
            seen = self._seen.get(mid)
            if dup and seen is not None:
                what, acked_in = seen
                same = (what == (topic, payload) if isinstance(what, tuple)
                        else what == delivery_id(mid, topic, payload))
                if same and acked_in is None:
                    return True, False
                if same and acked_in >= self._connection - 1:
                    # Acked again now, in this connection: if this ack is lost too (the broker restarts before
                    # reading it), the next connection must still know the copy (found by a broker restarted
                    # twice in two seconds: the third copy was stepped as new).
                    self._seen[mid] = (what, self._connection)
                    return True, True
            # Small payloads by reference (no hashing on this per-message path); large ones by CRC, so 65535
            # entries stay small whatever arrives.
            what = (topic, payload) if len(payload) <= SMALL_PAYLOAD else delivery_id(mid, topic, payload)
            self._seen[mid] = (what, None)
            return False, False

    def acked(self, mid: int) -> None:
        with self._lock:
            seen = self._seen.get(mid)
            if seen is not None:
                self._seen[mid] = (seen[0], self._connection)


# ---- why a connection attempt failed -----------------------------------------------------------------
class _Client(paho.Client):
    """paho's client, keeping the error of the current connection attempt: paho catches it and calls
    ``on_connect_fail`` (or ``on_disconnect``) without it."""

    failure: OSError | None = None
    stage = "tcp"  # how far the current attempt got: "tcp", "tls" (handshake), "mqtt" (CONNECT sent)
    reported = False  # the attempt's outcome (CONNACK or failure) was handled

    def reconnect(self) -> MQTTErrorCode:
        self.failure, self.stage, self.reported = None, "tcp", False
        try:
            result = super().reconnect()
        except OSError as error:
            self.note_failure(error)
            raise
        self.stage = "mqtt"
        return result

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """At most `READ_BURST` packets per pass of the network loop, then the loop writes. paho reads as many
        packets as it has messages in flight before it writes anything: under a flood of inputs that is
        thousands, so the predictions waited unwritten (and unconfirmed, their inputs unacked) behind the
        inputs, which made the next burst longer still, until paho ran out of packet ids (found by
        reliability/flood.py speed: memory grew, then publishes failed)."""
        for _ in range(READ_BURST):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def note_failure(self, error: OSError) -> None:
        # The first error, unless a TLS alert comes after it: the alert says why the connection was reset.
        if self.failure is None or (isinstance(error, ssl.SSLError) and not isinstance(self.failure, ssl.SSLError)):
            self.failure = error


class _Connection:
    """One paho client: connects (saying why not), reconnects with backoff, re-subscribes, publishes with
    completion callbacks. `MqttLink` has one for inputs and, by default, one for outputs."""

    def __init__(self, broker, client_id: str, role: str, on_change: Callable[[], None],
                 failure_log: RateLimitedLog, on_publish_failed: Callable[[], None], subscriptions=(),
                 on_message=None, on_connected=None, receive_maximum: int | None = None):
        self.broker = broker
        self.client_id = client_id
        self.role = role  # "inputs", "outputs" or "inputs and outputs", for the logs
        self.subscriptions = list(subscriptions)
        self.receive_maximum = receive_maximum
        self._server = 0  # index into broker.servers of the broker this connection tries or uses
        self._on_change = on_change
        self._on_connected = on_connected or (lambda: None)
        self._failure_log = failure_log
        self._on_publish_failed = on_publish_failed
        self.connected = threading.Event()
        self.session_present = False  # whether the broker resumed our session at the last connect
        self.first_failure: list[str] = []  # why the first attempt failed, for startup_error_behavior = "error"
        self.first_outcome = threading.Event()  # the first attempt connected or failed
        self.failed_attempts = 0  # since the last successful connect
        self.publish_failures = 0  # publishes paho refused (their predictions are lost)
        self.stopping = False
        self._publish_lock = threading.Lock()
        self._on_done: dict[int, Callable[[], None] | None] = {}
        self._completed_early: set[int] = set()  # PUBACKs that arrived before publish() returned
        self._qos0_mids: set[int] = set()  # QoS 0 publishes not yet written to the socket
        self.client = self._make_client(on_message)

    def _make_client(self, on_message) -> paho.Client:
        broker = self.broker
        v5 = broker.protocol == "5"
        client = _Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            clean_session=None if v5 else not broker.persistent_session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if uses_tls(broker):
            client.tls_set_context(tls_context(broker, client))
        client.reconnect_delay_set(max(1, round(broker.min_reconnect_interval)),
                                   max(1, round(broker.max_reconnect_interval)))
        # No window of paho's own on outputs: it rescans its whole window on every PUBACK (measured: half
        # of the network thread's time with 1,024). Outputs in flight are bounded anyway by the unacked
        # inputs they answer, which the broker's window (and the inbox) bound.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)  # unbounded: the scheduler bounds what it publishes
        client.connect_timeout = broker.connection_timeout
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        if on_message is not None:
            client.on_message = on_message
        return client

    @property
    def server(self):
        """The broker config with host and port of the broker in use (one of ``broker.servers``)."""
        host, port = self.broker.servers[self._server]
        return self.broker if self._server == 0 else dataclasses.replace(self.broker, host=host, port=port)

    def _next_server(self, client) -> None:
        """After a failure or a lost connection, the next attempt goes to the next of ``broker.servers``
        (paho knows one address only): a node of a cluster that died is left for one that lives."""
        if len(self.broker.servers) < 2 or self.stopping:
            return
        self._server = (self._server + 1) % len(self.broker.servers)
        client._host, client._port = self.broker.servers[self._server]  # paho reads them at each reconnect

    def start(self) -> None:
        broker = self.broker
        properties = None
        if broker.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_NEVER_EXPIRES if broker.persistent_session else 0
            if self.receive_maximum is not None:
                # Never more unacked messages in flight to us than the inbox holds: paho's thread never blocks.
                properties.ReceiveMaximum = max(1, min(self.receive_maximum, 65535))
        clean_start = not broker.persistent_session if broker.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect_async(broker.host, broker.port, keepalive=broker.keepalive,
                                  clean_start=clean_start, properties=properties)
        self.client.loop_start()

    def stop(self) -> None:
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    # ---- paho callbacks (network thread) ---------------------------------------------------------
    def _failed(self, message: str) -> None:
        """An attempt failed: with "error", the first one is start()'s `ConnectError`; any other is logged
        (once per `CONNECT_FAILED_LOG_INTERVAL` per cause) while paho retries."""
        self.client.reported = True
        self.failed_attempts += 1
        if self.broker.startup_error_behavior == "error" and not self.first_outcome.is_set():
            self.first_failure.append(message)
            self.first_outcome.set()
            return
        self.first_outcome.set()
        self._failure_log.warning(("connect_failed", message), "%s; retrying", message, event="connect_failed",
                                  failed_attempts=self.failed_attempts, client_id=self.client_id)

    def _handle_connect_fail(self, client, userdata):
        """The TCP connection or the TLS handshake failed (paho retries after the reconnect delay)."""
        self._failed(describe_failure(self.server, client.failure, client.stage))
        self._next_server(client)

    def _handle_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._failed(describe_failure(self.server, reason=reason_code))
            self._next_server(client)
            return
        client.reported = True
        self.first_outcome.set()
        self.session_present = bool(flags.session_present)
        log.info("connected to %s:%d as %r for %s (session %s)", self.server.host, self.server.port,
                 self.client_id, self.role, "resumed" if flags.session_present else "new",
                 extra={"event": "connected", "session_present": bool(flags.session_present),
                        "failed_attempts": self.failed_attempts, "client_id": self.client_id})
        self.failed_attempts = 0
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        self.connected.set()
        self._on_connected()
        self._on_change()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._forget_qos0()
        failed_here = not was_connected and not client.reported  # else on_connect(_fail) moved on already
        if failed_here and not self.stopping:
            # Closed before any CONNACK: after a TLS alert (our client certificate rejected), or by a broker
            # that does not speak MQTT on that port.
            self._failed(describe_failure(self.server, client.failure, client.stage))
        if was_connected:
            log.warning("disconnected from %s:%d (%s) as %r; reconnecting", self.server.host, self.server.port,
                        reason_code, self.client_id, extra={"event": "disconnected", "client_id": self.client_id})
            self._on_change()
        if was_connected or failed_here:
            self._next_server(client)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties):
        for (topic, _), code in zip(self.subscriptions, reason_codes):
            if code.is_failure:
                log.error("the broker refused the subscription to %r: %s", topic, code,
                          extra={"event": "subscribe_refused"})

    def _handle_publish(self, client, userdata, mid, reason_code, properties):
        if reason_code.is_failure:  # MQTT 5: the broker refused it (an ACL, a quota): that prediction is lost
            self._publish_failed(str(reason_code), f"the broker refused a publish: {reason_code}")
        with self._publish_lock:
            if mid not in self._on_done:
                self._completed_early.add(mid)
                return
            on_done = self._on_done.pop(mid)
            self._qos0_mids.discard(mid)
        if on_done is not None:
            on_done()

    def _forget_qos0(self) -> None:
        """QoS 0 packets still unsent at a disconnect are dropped by paho, their on_publish never comes:
        forget their registrations, or a later QoS 1 publish reusing the id would find a stale one."""
        with self._publish_lock:
            for mid in self._qos0_mids:
                self._on_done.pop(mid, None)
            self._qos0_mids.clear()

    # ---- publishing (any thread) -----------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                on_done: Callable[[], None] | None = None) -> None:
        """See `MqttLink.publish`."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)
        if not queued:  # (paho keeps QoS 1/2 publishes made while disconnected, not QoS 0 ones)
            # paho refused it outright: no confirmation will ever come. Done now, or the input it answers (and,
            # since acks leave in order, every later input) would never be acked: the prediction is lost, said
            # (once a minute per reason). Seen when more than 65,535 predictions waited for their
            # confirmations (packet ids ran out) with outputs on the input connection: docs/reliability.md.
            self._publish_failed(info.rc, f"publish to {topic!r} failed: {info.rc}")
            if on_done is not None:
                on_done()
            return
        if qos == 0:
            # Fire and forget is all QoS 0 promises, and paho drops unsent QoS 0 packets at a reconnect
            # without calling on_publish: done now. The mid is registered so its on_publish is ignored;
            # registrations left by dropped packets are cleared at the disconnect (see _forget_qos0).
            self._register(info.mid, None, qos0=True)
            if on_done is not None:
                on_done()
            return
        self._register(info.mid, on_done)

    def _publish_failed(self, cause, why: str) -> None:
        """Counted, and said at most once a minute per cause."""
        self.publish_failures += 1
        self._on_publish_failed()
        self._failure_log.log(logging.ERROR, ("publish_failed", cause), "%s (%d so far)", why, self.publish_failures,
                              event="publish_failed", client_id=self.client_id)

    def _register(self, mid: int, on_done, qos0: bool = False) -> None:
        with self._publish_lock:
            if mid in self._completed_early:
                self._completed_early.discard(mid)
                early = True
            else:
                self._on_done[mid] = on_done
                early = False
            if qos0 and not early:
                self._qos0_mids.add(mid)
            else:
                self._qos0_mids.discard(mid)
        if early and on_done is not None:
            on_done()


class MqttLink:
    """Connects, subscribes, receives into ``deliver``, publishes with completion callbacks, acks.

    ``subscriptions``: [(topic filter, qos)]. ``deliver(Inbound)`` runs on paho's network thread and must
    only enqueue. ``on_connection(connected: bool)`` is told when the link goes up (every connection up)
    and down (any of them lost).

    Two connections by default (``separate_output_connection``): inputs (and acks, the status topic and its
    Last Will) on ``client_id``, predictions and dead letters on ``client_id-out``. In one connection the
    broker's confirmations of our predictions queue behind the inputs it sends; under a flood (Mosquitto
    2.0.11 pushes far past its in-flight window) they came too late: the inputs they answer stayed unacked,
    the backlog grew, and past 65,535 predictions awaiting confirmation paho refused to publish
    (reliability/flood.py speed). Each connection's reads now carry only its own traffic.
    """

    def __init__(self, broker, subscriptions: list[tuple[str, int]], deliver: Callable[[Inbound], None],
                 on_connection: Callable[[bool], None] | None = None, receive_maximum: int = 65535,
                 on_publish_failed: Callable[[], None] = lambda: None):
        self.broker = broker
        # QoS 2 in would be acknowledged (PUBREC) by paho on arrival, before the prediction exists:
        # inputs are subscribed at QoS 1 at most, which manual acks make at-least-once (seq drops repeats).
        self.subscriptions = [(topic, min(qos, 1)) for topic, qos in subscriptions]
        self._deliver = deliver
        self._on_connection = on_connection or (lambda connected: None)
        self.connected = threading.Event()  # every connection is up
        self.stopping = False  # set by the daemon once its worker takes nothing more (`Daemon.stop`)
        self._connected_lock = threading.Lock()  # one transition of `connected` at a time
        self._redeliveries = _Redeliveries()
        failure_log = RateLimitedLog(log, CONNECT_FAILED_LOG_INTERVAL)
        separate = broker.separate_output_connection
        self.inputs = _Connection(broker, broker.client_id, "inputs" if separate else "inputs and outputs",
                                  self._changed, failure_log, on_publish_failed, self.subscriptions,
                                  self._handle_message, self._inputs_connected, receive_maximum)
        self.inputs.client.will_set(broker.status_topic, b"offline", qos=1, retain=True)
        self.outputs = (_Connection(broker, broker.output_client_id, "outputs", self._changed, failure_log,
                                    on_publish_failed) if separate else self.inputs)
        self.connections = (self.inputs, self.outputs) if separate else (self.inputs,)
        if uses_tls(broker) and broker.insecure_skip_verify:
            log.warning("insecure_skip_verify = true: the broker's TLS certificate is not checked",
                        extra={"event": "tls_insecure"})

    @property
    def client(self) -> paho.Client:
        """The inputs' paho client."""
        return self.inputs.client

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed the inputs' session at the last connect."""
        return self.inputs.session_present

    @property
    def failed_attempts(self) -> int:
        return max(connection.failed_attempts for connection in self.connections)

    @property
    def publish_failures(self) -> int:
        return sum(connection.publish_failures for connection in self.connections)

    def start(self) -> None:
        """Connect in the background. With ``startup_error_behavior = "error"``, wait for the first
        connections and raise `ConnectError` if one fails; with ``"retry"``, keep trying (and logging).

        The outputs' connection first: with "error" the inputs' is opened only once the outputs' is up, so
        a failure never leaves inputs subscribed (a backlog filling the inbox before the worker runs) nor a
        retained ``online`` behind."""
        error_mode = self.broker.startup_error_behavior == "error"
        for connection in reversed(self.connections):
            connection.start()
            if error_mode:
                self._first_outcome(connection)

    def _first_outcome(self, connection: _Connection) -> None:
        """Raise `ConnectError` (after stopping) unless ``connection``'s first attempt succeeded."""
        # Connected, or failed for a reason given at once; the timeout covers a broker that never answers.
        if not connection.first_outcome.wait(self.broker.connection_timeout + 1):
            self.stop(publish_offline=False)
            raise ConnectError(f"cannot connect to the MQTT broker at {self.broker.host}:{self.broker.port}: no "
                               f"answer within connection_timeout = {self.broker.connection_timeout:g} s")
        if connection.first_failure:
            self.stop(publish_offline=False)
            raise ConnectError(connection.first_failure[0])

    def stop(self, publish_offline: bool = True, timeout: float = 5.0) -> None:
        """Say ``offline`` (retained), disconnect cleanly and stop the network threads."""
        for connection in self.connections:
            connection.stopping = True
        if publish_offline:
            self._say_offline(timeout)
        for connection in self.connections:
            connection.stop()
        self.connected.clear()

    def stop_inputs(self, timeout: float = 5.0) -> None:
        """Say ``offline`` and close the inputs' connection: nothing more arrives; predictions still go out on
        the outputs' connection (`Daemon.hand_over`)."""
        self.inputs.stopping = True
        self._say_offline(timeout)
        self.inputs.stop()

    def _say_offline(self, timeout: float) -> None:
        if self.inputs.connected.is_set():
            sent = threading.Event()
            self.inputs.publish(self.broker.status_topic, b"offline", qos=1, retain=True, on_done=sent.set)
            sent.wait(timeout)

    # ---- paho callbacks (network threads) --------------------------------------------------------
    def _inputs_connected(self) -> None:
        self._redeliveries.connected()

    def _changed(self) -> None:
        """A connection went up or down: when the link as a whole does, tell the daemon and say it on the
        status topic (``online`` only while both connections are up: predictions cannot go out otherwise;
        the Last Will covers the inputs' connection, this the outputs')."""
        with self._connected_lock:  # from either network thread, one transition at a time
            up = all(connection.connected.is_set() for connection in self.connections)
            if up == self.connected.is_set():
                return
            if up:
                self.connected.set()
            else:
                self.connected.clear()
            if self.inputs.connected.is_set() and not self.inputs.stopping:
                self.inputs.publish(self.broker.status_topic, b"online" if up else b"offline", qos=1, retain=True)
            self._on_connection(up)

    def _handle_message(self, client, userdata, message):
        payload = message.payload
        topic = message.topic
        if message.qos > 0:
            copy, acked = self._redeliveries.is_copy(message.mid, topic, payload, message.dup)
            if copy:  # the original is queued, being processed, or done: never step it twice
                log.debug("a redelivered copy of message %d on %r: not stepped", message.mid, topic)
                if acked and self.stopping:  # the worker takes nothing more: ack it here (order no longer matters)
                    client.ack(message.mid, message.qos)
                elif acked:  # its ack was lost: acked again by the worker, in its turn (acks leave in order)
                    self._deliver(Inbound(topic, payload, message.mid, message.qos, time.monotonic(), copy=True))
                return
        self._deliver(Inbound(topic, payload, message.mid, message.qos, time.monotonic()))

    # ---- used by the scheduler (worker thread) ---------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                on_done: Callable[[], None] | None = None) -> None:
        """Publish on the outputs' connection; ``on_done()`` runs (on a network thread) once the broker has
        it: PUBACK for QoS 1, PUBCOMP for QoS 2, written to the socket for QoS 0. Messages published while
        disconnected are queued by paho and sent (QoS > 0: resent) after the reconnect."""
        self.outputs.publish(topic, payload, qos, retain, on_done)

    def expect_redelivery(self, delivery: int) -> None:
        """A message journalled before a crash (`persistence.delivery_id`): when the broker delivers it
        again, it is acked (by the worker, in its turn), not stepped a second time."""
        self._redeliveries.expect(delivery >> 32, delivery)

    def ack(self, message: Inbound) -> None:
        """Acknowledge an inbound QoS 1/2 message (no-op for QoS 0)."""
        if message.qos == 0:
            return
        self._redeliveries.acked(message.mid)
        if self.inputs.connected.is_set():
            # Not while reconnecting: paho would send the PUBACK ahead of the next CONNECT (a protocol
            # error to the broker). The broker delivers the message again; its copy is acked then.
            self.inputs.client.ack(message.mid, message.qos)


def probe(broker, subscriptions=(), listen: float = 0.0, on_message=None) -> str | None:
    """Connect once as a throwaway client (``broker.client_id`` must be the prober's own, never the daemon's:
    it would take the daemon's session), clean session, no Last Will, nothing published; each of
    ``broker.servers`` in turn until one answers, as the daemon would. With ``subscriptions``, listen
    ``listen`` seconds at QoS 0 and hand each message to ``on_message(topic, payload, retained)``. Returns
    None when it connected, else why not (`describe_failure`'s sentence, of every server tried)."""
    return exchange(broker, (), subscriptions, on_message, timeout=listen)


def exchange(broker, messages, subscriptions=(), on_message=None, until=None, timeout: float = 30.0) -> str | None:
    """As a throwaway client (as `probe`, on the first of ``broker.servers`` that answers): subscribe, publish
    ``messages`` [(topic, payload)] at QoS 1, each confirmed by the broker in turn, then hand what arrives to
    ``on_message(topic, payload, retained)`` until ``until()`` holds (without ``until`` or messages: for
    ``timeout`` seconds). Returns None, or why it failed (not connected to any, a publish unconfirmed,
    ``until`` still false after ``timeout`` seconds: those two only from the broker that answered)."""
    failures = []
    for host, port in broker.servers:
        failure = _probe_one(dataclasses.replace(broker, host=host, port=port, fallback_servers=(),
                                                 persistent_session=False, startup_error_behavior="error"),
                             subscriptions, timeout, on_message, messages, until)
        if failure is None or failure.startswith("no answer"):
            return failure
        failures.append(failure)
    return "; ".join(failures)


def _probe_one(broker, subscriptions, listen: float, on_message, messages=(), until=None) -> str | None:
    def handle(client, userdata, message):
        if on_message is not None:
            on_message(message.topic, message.payload, bool(message.retain))

    connection = _Connection(broker, broker.client_id, "a check", lambda: None,
                             RateLimitedLog(log, CONNECT_FAILED_LOG_INTERVAL), lambda *_: None,
                             [(topic, 0) for topic in subscriptions], on_message=handle)
    connection.start()
    try:
        if not connection.first_outcome.wait(broker.connection_timeout + 1):
            return (f"cannot connect to the MQTT broker at {broker.host}:{broker.port}: no answer within "
                    f"connection_timeout = {broker.connection_timeout:g} s")
        if connection.first_failure:
            return connection.first_failure[0]
        if until is None and not messages:
            time.sleep(listen)
            return None
        connection.connected.wait(listen)  # set once the subscriptions are sent: they go ahead of the publishes
        deadline = time.monotonic() + listen
        for topic, payload in messages:
            if until is not None and until():  # answered already (a refusal): the rest would be ignored
                break
            confirmed = threading.Event()
            connection.publish(topic, payload, 1, on_done=confirmed.set)
            if not confirmed.wait(max(0.0, deadline - time.monotonic())):
                return f"no answer: the broker did not confirm the message to {topic!r} within {listen:g} s"
        while until is not None and not until():
            if time.monotonic() > deadline:
                return f"no answer within {listen:g} s"
            time.sleep(0.05)
        return None
    finally:
        connection.stop()
