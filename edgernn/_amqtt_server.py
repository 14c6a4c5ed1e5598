"""The embedded broker's child process: an amqtt 0.12 broker on one loopback port, until SIGTERM or until
its parent goes away. `edgernn.local_broker` runs it as ``python -P this_file.py``; it imports amqtt and
the standard library only (not the edgernn package), and nothing imports it.

It prints ``listening <port>`` on stdout once its listener is bound (``--port 0`` takes a free port, with
no race), or ``error <why>`` and exits 1; it logs to ``--log``, never to the parent's terminal.

amqtt as it comes breaks what the daemon relies on (MQTT 3.1.1 persistent sessions, manual acks, QoS 1
in and out); this process changes it where it does (each change is tested in tests/test_local_broker.py):

1. Persistent sessions. amqtt's anonymous-auth plugin marks every session anonymous, and amqtt keeps
   neither the session nor its QoS 1 messages for an anonymous client once it disconnects: nothing was
   queued while the daemon was away. `OpenDoor` lets every client in without that mark.
2. QoS 1 redelivery. amqtt forgets a QoS 1 message in flight to a client when the client disconnects
   before its PUBACK, and gives up on any PUBACK after 5 s (logging a traceback): an input the daemon
   received but had not acked when it stopped was never delivered again. `Handler` keeps the message until
   its PUBACK, however long that takes, and resends it (DUP set) when the session reconnects, as MQTT
   3.1.1 section 4.4 says and Mosquitto does.
3. Order across a reconnect. amqtt sends new messages to a reconnecting client at once, and the messages
   in flight at the disconnect and those queued while it was away after them: a stream's seq went
   backwards, and the daemon drops a lower seq as a duplicate. It also waited for all of those to be acked
   before it handled anything the client sent (its SUBSCRIBE, for one), and it set the RETAIN flag on the
   queued ones (3.3.1.3: it must be 0). `Handler` and `Broker` send oldest first, as ordinary messages,
   without waiting.
4. At every CONNECT amqtt sent the client (at QoS 0) the retained messages matching *any* client's
   subscription. `Broker` sends only those matching the client's own subscriptions.

Left as they are (nothing here depends on them): nothing survives a restart of this broker (no
persistence); a QoS 0 publish reaches a QoS 1 subscription at QoS 1; there is no in-flight window (a
backlog goes to a client all at once, up to 65535 unacked messages); no $SYS topics.

The changes override private methods of amqtt 0.12.1 (`Broker._publish_session_retained_messages`,
`_publish_retained_messages_for_subscription`, `ProtocolHandler._retry_deliveries`,
`_handle_qos1_message_flow`, `mqtt_publish`): the tests fail if another amqtt changes them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import amqtt.broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import OUTGOING


class OpenDoor(BaseAuthPlugin):
    """Accepts every client, without marking its session anonymous (change 1)."""

    async def authenticate(self, *, session) -> bool:
        return True


class Handler(BrokerProtocolHandler):
    """amqtt's protocol handler for one connection, with QoS 1 messages kept until their PUBACK and sent in
    order across a reconnect (changes 2 and 3).

    A resumed session's messages go out oldest first: those in flight at the disconnect (resent with DUP),
    then those queued while it was away, then those published since it reconnected (held back until
    `resume`): amqtt sent the newest first, and a stream's seq went backwards. Once stopped, messages go
    to the session's queue for the next connection.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._resumed = False
        self._held: list[_Message] = []
        self._stopped = False

    def mqtt_publish(self, topic, data, qos, retain, ack_timeout=None):
        # Decided now, not when the returned coroutine first runs: that may be after `resume`, and then
        # this message would overtake older ones.
        if self._stopped or not self._resumed:
            if qos or not self._stopped:  # a stopped connection's QoS 0 messages are lost, as in MQTT
                self._hold(_Message(topic, data, qos, retain))
            return _nothing()
        return super().mqtt_publish(topic, data, qos, retain, ack_timeout)

    def _hold(self, message: "_Message") -> None:
        if self._stopped:
            self.session.retained_messages.put_nowait(message)
        else:
            self._held.append(message)

    def resume(self, queued: list) -> list[asyncio.Future]:
        """Send ``queued`` (kept while the client was away), then what was held; later messages follow."""
        messages, self._held = [*queued, *self._held], []
        self._resumed = True
        return [asyncio.ensure_future(super(Handler, self).mqtt_publish(m.topic, m.data, m.qos, retain=m.retain))
                for m in messages]

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            for message in self._held:  # never resumed: the next connection sends them, in order
                self.session.retained_messages.put_nowait(message)
            self._held = []
        await super().stop()

    async def _retry_deliveries(self) -> None:
        """Resend what was in flight at the last disconnect, in order, without waiting for the acks
        (amqtt waited up to 10 s for them before it handled anything else of the client's)."""
        for message in [*self.session.inflight_in.values(), *self.session.inflight_out.values()]:
            asyncio.ensure_future(self._handle_message_flow(message)).add_done_callback(_quiet)

    async def _handle_qos1_message_flow(self, app_message) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        if app_message.puback_packet is not None:
            return
        packet_id = app_message.packet_id
        # In the session, not the handler: the next connection's handler resends it (`_retry_deliveries`).
        self.session.inflight_out[packet_id] = app_message
        if self._stopped:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter  # before the send: a fast PUBACK must find it
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            if self._stopped:  # stopped while sending: `stop` did not see this waiter to cancel it
                return
            app_message.puback_packet = await waiter  # cancelled at a disconnect: kept for the next one
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        self.session.inflight_out.pop(packet_id, None)


class _Message:
    """A message waiting for a connection, as amqtt's session queue holds them."""

    __slots__ = ("topic", "data", "qos", "retain")

    def __init__(self, topic, data, qos, retain=False):
        self.topic, self.data, self.qos, self.retain = topic, data, qos, retain


async def _nothing() -> None:
    return None


def _quiet(task: asyncio.Future) -> None:
    """A resend cut short by a disconnect is resent at the next connection: nothing to report."""
    if not task.cancelled():
        task.exception()


class Broker(amqtt.broker.Broker):
    """amqtt's broker with changes 3 and 4."""

    async def _publish_session_retained_messages(self, session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        queued = []
        while not session.retained_messages.empty():
            queued.append(session.retained_messages.get_nowait())
        # Reaped by the broadcast loop like every other delivery; not awaited: the client's own packets
        # (its SUBSCRIBE, say) are handled meanwhile.
        self._tasks_queue.extend(handler.resume([_Message(m.topic, m.data, m.qos) for m in queued]))

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(subscriber.client_id == session.client_id for subscriber, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def broker_config(port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {f"{OpenDoor.__module__}.{OpenDoor.__qualname__}": {}},
    }


async def serve(port: int) -> None:
    # amqtt creates its handlers by this module-level name; this process runs nothing else of amqtt's.
    amqtt.broker.BrokerProtocolHandler = Handler
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The parent holds our stdin open; it closes when the parent exits, even by SIGKILL: stop then too.
    loop.add_reader(sys.stdin.fileno(), _stop_at_eof, loop, stop)
    broker = Broker(broker_config(port))
    try:
        await broker.start()
    except Exception as error:  # amqtt has logged the traceback; the parent shows this line
        print(f"error {error}", flush=True)
        raise SystemExit(1) from None
    bound = broker._servers["default"].instance.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    await stop.wait()
    await broker.shutdown()


def _stop_at_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    try:
        data = os.read(sys.stdin.fileno(), 4096)
    except OSError:
        data = b""
    if not data:
        loop.remove_reader(sys.stdin.fileno())
        stop.set()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--log", help="log file (default: stderr)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    # transitions logs every session's state change at INFO; amqtt's INFO is a line per connection.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
