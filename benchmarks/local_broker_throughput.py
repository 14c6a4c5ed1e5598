"""How many QoS 1 messages per second each local broker carries (`edgernn.local_broker`): for sizing the
simulated fleet of `edgernn demo` to the broker it gets.

Per broker kind: ``--publishers`` paho clients publish ``--messages`` QoS 1 messages in all (each up to
``--window`` unacked), one paho subscriber takes them at QoS 1 (auto-ack). Reported: the publish rate
(first publish to last PUBACK) and the delivered rate (first publish to last message received), the
broker's own CPU time per message, and whether each publisher's messages arrived complete and in order.
The clients run in this process, so on a small machine they share the CPUs with the broker: the numbers are
what the demo (also clients and broker on one machine) can expect, not the broker's ceiling.

    .venv/bin/python benchmarks/local_broker_throughput.py [--messages 5000] [--kinds amqtt mosquitto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgernn.local_broker import amqtt_installed, mosquitto_binary, start_local_broker
from proc import cpu_seconds  # benchmarks/proc.py, beside this script


def _client(port: int, client_id: str = "", window: int = 20) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(window)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def measure(kind: str, messages: int, publishers: int, window: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgernn-broker-bench-") as tmp, \
            start_local_broker(Path(tmp), prefer=kind) as broker:
        received: dict[int, list[int]] = {p: [] for p in range(publishers)}
        done = threading.Event()
        count = [0]

        def on_message(client, userdata, message):
            publisher, seq = map(int, message.payload.split(b" ", 1))
            received[publisher].append(seq)
            count[0] += 1
            if count[0] >= messages:
                done.set()

        subscribed = threading.Event()
        subscriber = _client(broker.port, "bench-subscriber")
        subscriber.on_message = on_message
        subscriber.on_subscribe = lambda *a: subscribed.set()
        subscriber.subscribe("bench/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"
        senders = [_client(broker.port, f"bench-publisher-{p}", window) for p in range(publishers)]
        per_publisher = messages // publishers
        messages = per_publisher * publishers
        cpu_before = cpu_seconds(broker.process.pid)
        start = time.perf_counter()
        infos = []
        for seq in range(per_publisher):
            for p, sender in enumerate(senders):
                infos.append(sender.publish(f"bench/{p}", f"{p} {seq}".encode(), qos=1))
        for info in infos:
            info.wait_for_publish(120)
        published = time.perf_counter() - start
        complete = done.wait(120)
        delivered = time.perf_counter() - start
        cpu = cpu_seconds(broker.process.pid) - cpu_before
        for client in (subscriber, *senders):
            client.loop_stop()
            client.disconnect()
        in_order = all(seqs == list(range(per_publisher)) for seqs in received.values())
        return {"kind": kind, "messages": messages, "complete": complete, "in_order": in_order,
                "publish_per_s": messages / published, "delivered_per_s": count[0] / delivered,
                "broker_cpu_us_per_message": 1e6 * cpu / max(count[0], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--publishers", type=int, default=10)
    parser.add_argument("--window", type=int, default=20, help="each publisher's unacked QoS 1 messages")
    parser.add_argument("--kinds", nargs="+", default=["mosquitto", "amqtt"])
    args = parser.parse_args(argv)
    available = {"mosquitto": mosquitto_binary() is not None, "amqtt": amqtt_installed()}
    print(f"{os.cpu_count()} CPUs, {args.messages} QoS 1 messages from {args.publishers} publishers "
          f"(window {args.window}) to 1 subscriber")
    print(f"{'broker':<10} {'published/s':>12} {'delivered/s':>12} {'broker CPU/msg':>15}  complete, in order")
    for kind in args.kinds:
        if not available[kind]:
            print(f"{kind:<10} not installed")
            continue
        r = measure(kind, args.messages, args.publishers, args.window)
        print(f"{kind:<10} {r['publish_per_s']:>12,.0f} {r['delivered_per_s']:>12,.0f} "
              f"{r['broker_cpu_us_per_message']:>12,.0f} us  {r['complete']}, {r['in_order']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
