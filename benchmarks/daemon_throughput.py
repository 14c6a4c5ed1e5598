"""How fast `edgernn serve` drains a backlog, against a bare MQTT subscriber and a bare relay, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/daemon_throughput.py                 # 20,000 messages, 1,000 streams
    .venv/bin/python benchmarks/daemon_throughput.py --quick         # smoke run (< 60 s with a warm cache)
    .venv/bin/python benchmarks/daemon_throughput.py --json out.json # also write the numbers
    .venv/bin/python benchmarks/daemon_throughput.py --profile prof  # also profile one daemon drain (py-spy)

Everything talks to ONE Mosquitto the script starts itself (tests/broker.py: its own config, a free
loopback port, ``max_queued_messages 0``); the system broker on 1883 is never touched. Inputs are QoS 1
JSON ``{"x": [6 floats], "seq": s, "ts": t}`` on ``sensors/dev<k>/imu``, k over ``--streams`` streams
(round robin; ``seq`` counts per stream and keeps counting across phases, so the daemon never sees a
duplicate).

1. Throughput. For each consumer in turn: its persistent session is created (clean_session=False,
   subscribe ``sensors/+/imu``, disconnect), the publisher queues ``--messages`` messages in the broker
   (waiting for every PUBACK), then the consumer reconnects and drains them. The clock runs from the
   consumer's CONNACK to the N-th message done, and "done" is measured at up to three points:

   - out: the N-th message handled by the consumer's own code (subscriber: decoded; relay: its publish
     call and ack returned; daemon: ``edgernn_messages_out_total`` reached N -- predictions handed to paho);
   - PUBACK (relay only): the broker confirmed the N-th result;
   - delivered (relay, daemon): the N-th prediction arrived at a collector subscribed to
     ``predictions/+/imu`` (in this process, from before the drain).

   The consumers:

   a) bare subscriber -- paho-mqtt 2.x in a process of its own, ``json.loads`` and nothing else (auto ack);
   b) bare relay -- same, plus one ``{"y": [4 floats], "seq", "ts", "key"}`` published at QoS 1 to
      ``predictions/<key>/imu`` and then ``ack`` (manual_ack), as in PERF_NOTES; paho's outgoing
      in-flight window is the daemon's (none; ``--relay-window`` changes it);
   c) the daemon -- ``python -m edgernn serve`` as a subprocess (LSTM, input 6, hidden 64, head 4, random
      weights saved with ``edgernn.save``; output QoS 1). It is started once to create its session, stopped
      with SIGTERM, the backlog is queued, and it is started again; its process start-up (imports, model
      load) is outside the clock, which starts at the CONNACK its log reports ("event": "connected").
      ``messages_out`` is polled on its Prometheus endpoint every 100 ms (a scrape costs the daemon
      ~1.5 ms of one core); the crossing is interpolated at the drain rate, so the period adds no bias.

   The fair end point, used for the ratios, is "delivered" (for the subscriber, "out"): "out" is not
   comparable, because paho's ``publish`` only queues a message once its in-flight window is full. The
   relay acks each input right after that call, so its "out" clock stops while thousands of results
   still wait in paho's queue (out ~20,000 msg/s, PUBACK ~6,500 here); the daemon, which acks an input
   only after the broker confirmed its prediction, is held back by exactly that queue. The daemon has no
   counter of confirmed predictions, so the collector stands in for it; it sees a result about when the
   broker confirms it (compare the relay's PUBACK and delivered columns) and costs relay and daemon alike.
   Numba's cache lives in ``.numba_cache/<hash of edgernn's sources>`` (as the tests'), filled by this
   script before the daemon starts, so the daemon's first batch loads kernels rather than compiling them.
   The daemon's own metrics after the drain (mean micro-batch, time in ``step_batch``) are reported too.
2. Latency. Each consumer online, the publisher paces ``--rate`` msg/s over the streams for
   ``--duration`` s with ``ts = time.time()`` at publish; a collector subscribed to ``predictions/+/imu``
   records receive time - ts (the relay and the daemon echo ts); for the bare subscriber, decode time - ts.
   The first tenth of the run (at most 0.5 s) is left out as warm-up. p50/p99/max in ms.
3. With ``--profile FILE``: one more backlog drain of the daemon (not the timed one) under
   ``py-spy record --pid`` (install it into the venv: ``.venv/bin/pip install py-spy``); FILE gets py-spy's
   raw stacks, the table shows each thread's share of samples and the top functions, self and inclusive.
   ``--profile-gil`` samples only the thread holding the GIL: where the GIL goes.

Experiments: ``--daemon-env NAME=VALUE`` passes variables to the daemon only (NUMBA_NUM_THREADS=1,
OMP_WAIT_POLICY=PASSIVE, or a PYTHONPATH with a sitecustomize that patches something for one try);
``--broker-config`` adds mosquitto.conf lines.

This machine (2 shared cores) is noisy: run it twice and compare. The publisher and collector run in this
process, each consumer in its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/broker.py (Mosquitto) and tests/helpers.py (random_model)

from numba_cache import use_test_cache  # noqa: E402

use_test_cache()  # before anything imports numba: the daemon loads the tests' kernels, no compile

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import datetime  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

INPUT_FILTER = "sensors/+/imu"
OUTPUT_FILTER = "predictions/+/imu"
OUTPUT_WINDOW = 0
"""paho's outgoing in-flight window: the daemon's own (0, none: runtime/mqtt.py), given to the relay too."""
DAEMON_ID = "bench-daemon"
POLL = 0.1
"""Seconds between two reads of the daemon's Prometheus endpoint while it drains."""


# ---- consumers in their own process -----------------------------------------------------------------
class BareConsumer:
    """The reference consumers: a subscriber that only decodes, or a relay that decodes, publishes, acks."""

    def __init__(self, relay: bool, port: int, client_id: str, n: int, window: int = OUTPUT_WINDOW):
        self.relay, self.port, self.client_id, self.n, self.window = relay, port, client_id, n, window
        self.count = self.confirmed = 0
        self.connected_at = self.done_at = self.confirmed_at = None
        self.done = threading.Event()
        self.seen: list[tuple[float, float]] = []  # (ts, decode time) after the backlog: the latency phase
        self._seen_enough = threading.Condition()
        self.client = None

    def _new_client(self, clean: bool) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean,
                             manual_ack=self.relay)
        client.max_inflight_messages_set(self.window)
        client.max_queued_messages_set(0)
        return client

    def create_session(self) -> None:
        subscribed = threading.Event()
        client = self._new_client(clean=False)
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        client.subscribe(INPUT_FILTER, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError(f"{self.client_id}: no SUBACK")
        client.disconnect()
        client.loop_stop()

    def connect(self) -> None:
        self.client = self._new_client(clean=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_relay if self.relay else self._on_subscriber
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if self.connected_at is None:
            self.connected_at = time.time()

    def _on_subscriber(self, client, userdata, message):
        body = json.loads(message.payload)
        self._count(body)

    def _on_relay(self, client, userdata, message):
        body = json.loads(message.payload)
        key = message.topic.split("/")[1]
        result = json.dumps({"y": body["x"][:4], "seq": body["seq"], "ts": body["ts"], "key": key})
        client.publish(f"predictions/{key}/imu", result, qos=1)
        client.ack(message.mid, message.qos)
        self._count(body)

    def _count(self, body: dict) -> None:
        self.count += 1
        if self.count == self.n:
            self.done_at = time.time()
            self.done.set()
        elif self.count > self.n:
            with self._seen_enough:
                self.seen.append((body["ts"], time.time()))
                self._seen_enough.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.confirmed += 1
        if self.confirmed == self.n:
            self.confirmed_at = time.time()

    def wait_seen(self, count: int, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        with self._seen_enough:
            while len(self.seen) < count and (left := deadline - time.monotonic()) > 0:
                self._seen_enough.wait(left)
            return list(self.seen)

    def forget_session(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        client = self._new_client(clean=True)  # a clean connect deletes the persistent session
        client.connect("127.0.0.1", self.port)
        client.disconnect()


def consumer_process(relay: bool, port: int, client_id: str, n: int, window: int, timeout: float, conn) -> None:
    """The consumer's side of the conversation with the parent (multiprocessing, spawn)."""
    consumer = BareConsumer(relay, port, client_id, n, window)
    consumer.create_session()
    conn.send("session")
    conn.recv()  # "drain": the backlog is queued
    consumer.connect()
    finished = consumer.done.wait(timeout)
    deadline = time.monotonic() + 10
    while relay and finished and consumer.confirmed_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.send({"connected": consumer.connected_at, "done": consumer.done_at if finished else None,
               "confirmed": consumer.confirmed_at, "received": consumer.count})
    _, expected, wait_s = conn.recv()  # ("stop", messages expected in the latency phase, timeout)
    conn.send(consumer.wait_seen(expected, wait_s))
    consumer.forget_session()


# ---- this process: publisher, collector, the daemon ---------------------------------------------------
class Publisher:
    """Publishes QoS 1 samples round robin over the streams; ``seq`` counts per stream across calls."""

    def __init__(self, port: int, streams: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.pool = [[float(v) for v in row] for row in rng.standard_normal((997, 6)).astype(np.float32)]
        self.streams = streams
        self.seqs = [0] * streams
        self.topics = [f"sensors/dev{k}/imu" for k in range(streams)]
        self.next_stream = 0
        self.sent = self.acked = 0
        self._acks = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
        self.client.max_inflight_messages_set(0)  # unlimited: paho's window scan costs O(window) per PUBACK
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._acks:
            self.acked += 1
            self._acks.notify_all()

    def publish_one(self) -> None:
        k = self.next_stream
        self.next_stream = (k + 1) % self.streams
        seq = self.seqs[k]
        self.seqs[k] = seq + 1
        body = json.dumps({"x": self.pool[(7 * k + seq) % len(self.pool)], "seq": seq, "ts": time.time()})
        self.client.publish(self.topics[k], body, qos=1)
        self.sent += 1

    def wait_acked(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self._acks:
            while self.acked < self.sent:
                if (left := deadline - time.monotonic()) <= 0:
                    raise RuntimeError(f"the broker confirmed {self.acked} of {self.sent} messages")
                self._acks.wait(left)

    def backlog(self, n: int) -> float:
        """Queue n messages in the broker; returns the publish rate (msg/s) to every PUBACK."""
        start = time.perf_counter()
        for _ in range(n):
            self.publish_one()
        self.wait_acked()
        return n / (time.perf_counter() - start)

    def paced(self, rate: float, duration: float) -> tuple[float, int]:
        """``rate`` msg/s for ``duration`` s; returns (wall start, messages sent)."""
        total = int(rate * duration)
        start_wall, start = time.time(), time.monotonic()
        for j in range(total):
            delay = start + j / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.publish_one()
        self.wait_acked()
        return start_wall, total

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watcher:
    """Records (receive time, payload) of everything on ``topic_filter``."""

    def __init__(self, port: int, topic_filter: str, client_id: str):
        self.received: list[tuple[float, bytes]] = []
        self._arrived = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError(f"{client_id}: no SUBACK")

    def _on_message(self, client, userdata, message):
        with self._arrived:
            self.received.append((time.time(), message.payload))
            self._arrived.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not predicate(self.received):
                if (left := deadline - time.monotonic()) <= 0:
                    return False
                self._arrived.wait(left)
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DaemonUnderTest:
    """``python -m edgernn serve`` as a subprocess, with its config, log files and Prometheus endpoint."""

    def __init__(self, directory: Path, broker_port: int, metrics_port: int, env: dict[str, str]):
        import edgernn
        from helpers import random_model

        self.directory = directory
        model = random_model("lstm", seed=0, input_size=6, hidden=64, head=(4,))
        edgernn.save(model, directory / "model.ern")
        _warm_numba_cache(model)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.config = directory / "edgernn.toml"
        self.config.write_text(f"""
[broker]
host = "127.0.0.1"
port = {broker_port}
client_id = "{DAEMON_ID}"

[[pipelines]]
name = "imu"
model = "{directory / 'model.ern'}"
subscribe = "{INPUT_FILTER}"
publish = "predictions/{{key}}/imu"
qos = 1

[state]
dir = "{directory / 'state'}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[log]
level = "info"
format = "json"
""")
        self.env = dict(os.environ, **env)
        self.process = None
        self.log_path = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.directory / f"daemon-{self.starts}.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "edgernn", "serve", "--config", str(self.config)],
                                            stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + 120
        while self._event("started") is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        if code != 0:
            raise RuntimeError(f"the daemon exited with {code}: {self.log_path.read_text()[-3000:]}")

    def _event(self, name: str) -> dict | None:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"event": "{name}"' in line:
                return json.loads(line)
        return None

    def connected_at(self) -> float:
        """Wall time of this start's CONNACK, from its log (millisecond resolution)."""
        deadline = time.monotonic() + 30
        while (entry := self._event("connected")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not connect: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return datetime.fromisoformat(entry["ts"]).timestamp()

    def metrics(self) -> dict[str, float]:
        """Every sample of the endpoint, ``name{labels}`` -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def messages_out(self) -> float:
        return self.metrics().get('edgernn_messages_out_total{pipeline="imu"}', 0.0)

    def wait_out(self, target: float, timeout: float) -> float:
        """Wall time at which ``messages_out`` reached ``target``, interpolated between polls."""
        polls = []
        deadline = time.monotonic() + timeout
        while True:
            polls.append((time.time(), self.messages_out()))
            if polls[-1][1] >= target:
                break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the daemon published {polls[-1][1]:.0f} of {target:.0f} predictions "
                                   f"in {timeout:g} s: {self.log_path.read_text()[-2000:]}")
            time.sleep(POLL)
        return _crossing(polls, target)


def _crossing(polls: list[tuple[float, float]], target: float) -> float:
    """When a counter polled at [(t, value)] reached ``target``: the last poll below it plus the rest at the
    rate of the two polls before (the drain rate is steady), never after the first poll at or above it."""
    t_hit = polls[-1][0]
    if len(polls) < 3 or polls[-2][1] <= polls[-3][1]:
        return t_hit
    (t0, c0), (t1, c1) = polls[-3], polls[-2]
    rate = (c1 - c0) / (t1 - t0)
    return min(t_hit, t1 + (target - c1) / rate)


def _warm_numba_cache(model) -> None:
    """Call both batch kernels once here, so Numba's cache holds them before the daemon needs them."""
    import numpy as np

    from edgernn.model import PARALLEL_MIN_STREAMS

    for rows in (1, PARALLEL_MIN_STREAMS):
        model.step_batch(model.new_state(batch=rows), np.arange(rows), np.zeros((rows, 6), np.float32))


# ---- the measurements -----------------------------------------------------------------------------------
def latency_stats(pairs: list[tuple[float, float]], start: float, duration: float, published: int) -> dict:
    """p50/p99/max (ms) of receive - ts over [(ts, receive time)] of messages published from ``start``
    on, the warm-up left out."""
    import numpy as np

    warmup = min(0.5, duration / 10)
    kept = np.array([received - ts for ts, received in pairs if ts >= start + warmup]) * 1e3
    result = {"received": sum(1 for ts, _ in pairs if ts >= start), "published": published,
              "measured": int(kept.size)}
    if kept.size:
        result.update(p50_ms=float(np.percentile(kept, 50)), p99_ms=float(np.percentile(kept, 99)),
                      max_ms=float(kept.max()))
    return result


def _rate(n: int, since: float, until: float | None) -> float | None:
    return n / (until - since) if until is not None else None


def _delivered_at(collector: Watcher, n: int, timeout: float) -> float:
    """Wall time the collector received the n-th prediction."""
    if not collector.wait_for(lambda got: len(got) >= n, timeout):
        raise RuntimeError(f"the collector received {len(collector.received)} of {n} predictions in {timeout:g} s")
    return collector.received[n - 1][0]


def _collected_latency(collector: Watcher, publisher: Publisher, args) -> dict:
    """The paced phase, measured on predictions arriving at ``collector`` (after the n of the drain)."""
    start, sent = publisher.paced(args.rate, args.duration)
    collector.wait_for(lambda got: len(got) >= args.messages + sent, args.settle)
    collector.close()
    pairs = [(json.loads(payload)["ts"], received) for received, payload in collector.received]
    return latency_stats(pairs, start, args.duration, sent)


def run_bare(relay: bool, port: int, publisher: Publisher, args) -> tuple[dict, dict]:
    """(throughput, latency) of the bare subscriber or relay, in a process of its own."""
    name = "relay" if relay else "subscriber"
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    child = context.Process(target=consumer_process, args=(relay, port, f"bench-{name}", args.messages,
                                                           args.relay_window, args.timeout, there), daemon=True)
    child.start()
    collector = None
    try:
        _expect(here, "session", name)
        publish_rate = publisher.backlog(args.messages)
        collector = Watcher(port, OUTPUT_FILTER, "bench-collector") if relay else None
        here.send("drain")
        drained = here.recv()
        if drained["done"] is None:
            raise RuntimeError(f"the bare {name} got {drained['received']} of {args.messages} messages")
        since = drained["connected"]
        throughput = {"publish_rate": publish_rate, "out_per_s": _rate(args.messages, since, drained["done"])}
        if relay:
            throughput["confirmed_per_s"] = _rate(args.messages, since, drained["confirmed"])
            throughput["delivered_per_s"] = _rate(args.messages, since,
                                                  _delivered_at(collector, args.messages, args.timeout))
            latency = _collected_latency(collector, publisher, args)
            here.send(("stop", 0, 0))
            here.recv()
        else:
            start, sent = publisher.paced(args.rate, args.duration)
            here.send(("stop", sent, args.settle))
            latency = latency_stats(here.recv(), start, args.duration, sent)
        child.join(30)
        return throughput, latency
    finally:
        if collector is not None:
            collector.close()
        if child.is_alive():
            child.kill()


def _expect(conn, word: str, name: str) -> None:
    if not conn.poll(60) or conn.recv() != word:
        raise RuntimeError(f"the bare {name} did not say {word!r}")


def run_daemon(daemon: DaemonUnderTest, port: int, publisher: Publisher, args) -> tuple[dict, dict, dict | None]:
    """(throughput, latency, profile) of the daemon; profile only with ``--profile``."""
    status = Watcher(port, f"edgernn/{DAEMON_ID}/status", "bench-status")
    daemon.start()  # creates the persistent session; "online" follows its SUBSCRIBE on the same connection
    if not status.wait_for(lambda got: any(p == b"online" for _, p in got), 30):
        raise RuntimeError("the daemon never said online")
    status.close()
    daemon.stop()
    publish_rate = publisher.backlog(args.messages)
    collector = Watcher(port, OUTPUT_FILTER, "bench-collector")
    daemon.start()
    out = daemon.wait_out(args.messages, args.timeout)
    delivered = _delivered_at(collector, args.messages, args.timeout)
    since = daemon.connected_at()
    time.sleep(0.2)
    throughput = {"publish_rate": publish_rate, "out_per_s": _rate(args.messages, since, out),
                  "delivered_per_s": _rate(args.messages, since, delivered),
                  **_daemon_internals(daemon.metrics())}
    latency = _collected_latency(collector, publisher, args)

    profile = None
    if args.profile:
        daemon.stop()
        publisher.backlog(args.messages)
        collector = Watcher(port, OUTPUT_FILTER, "bench-collector")
        daemon.start()
        profile = profile_drain(daemon, collector, args)
        collector.close()
    daemon.stop()
    return throughput, latency, profile


def _daemon_internals(metrics: dict) -> dict:
    """What the daemon's own counters say about the drain just timed."""
    batches = metrics.get("edgernn_batch_size_count", 0)
    return {
        "batches": int(batches),
        "mean_batch": metrics.get("edgernn_batch_size_sum", 0) / batches if batches else None,
        "step_batch_seconds": metrics.get('edgernn_step_seconds_sum{pipeline="imu"}'),
        "messages_in": metrics.get('edgernn_messages_in_total{pipeline="imu"}'),
        "duplicates": metrics.get('edgernn_duplicates_total{pipeline="imu"}'),
        "process_cpu_seconds": metrics.get("process_cpu_seconds_total"),
    }


def profile_drain(daemon: DaemonUnderTest, collector: Watcher, args) -> dict:
    """py-spy on the running daemon until ``collector`` has every prediction of the backlog; the raw stacks
    go to ``args.profile``."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise RuntimeError(f"--profile needs py-spy beside {sys.executable}: .venv/bin/pip install py-spy")
    rate = 250
    command = [str(py_spy), "record", "--pid", str(daemon.process.pid), "--threads", "--rate", str(rate),
               "--format", "raw", "--output", str(args.profile), "--nonblocking"]
    if args.profile_gil:
        command.append("--gil")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.time()
    _delivered_at(collector, args.messages, args.timeout)
    seconds = time.time() - started
    spy.send_signal(signal.SIGINT)
    spy.wait(30)
    summary = summarize_profile(Path(args.profile), seconds * rate)
    return {"file": str(args.profile), "seconds": seconds, "gil": args.profile_gil, **summary}


def summarize_profile(path: Path, expected_per_thread: float, top: int = 15) -> dict:
    """Per thread: samples, share of wall time sampled (on CPU, or holding the GIL with ``--gil``) and its top
    functions (self); over all threads: top functions, self and inclusive (threading's own frames left out)."""
    threads, self_time, inclusive = Counter(), Counter(), Counter()
    self_by_thread: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        functions = [re.sub(r":\d+\)$", ")", frame) for frame in frames[1:]] or ["(no python frame)"]
        threads[thread] += count
        self_time[functions[-1]] += count
        self_by_thread.setdefault(thread, Counter())[functions[-1]] += count
        for function in set(functions):
            if "(threading.py)" not in function or function == functions[-1]:
                inclusive[function] += count
    total = sum(threads.values())
    return {
        "samples": total,
        "threads": {name: {"samples": n, "cpu_share": n / expected_per_thread if expected_per_thread else None,
                           "self": [(function, k / n) for function, k in self_by_thread[name].most_common(8)]}
                    for name, n in threads.most_common()},
        "self": [(function, n / total) for function, n in self_time.most_common(top)] if total else [],
        "inclusive": [(function, n / total) for function, n in inclusive.most_common(top)] if total else [],
    }


# ---- report ---------------------------------------------------------------------------------------------
def report(results: dict) -> str:
    t, lat, cfg, ratios = results["throughput"], results["latency"], results["config"], results["ratios"]
    lines = [f"Drain of {cfg['messages']:,} queued QoS 1 JSON messages over {cfg['streams']:,} streams "
             f"(Mosquitto {results['machine']['mosquitto']}, one broker, same run), msg/s from CONNACK to:",
             f"{'consumer':<12}{'N-th out':>10}{'N-th PUBACK':>13}{'N-th delivered':>16}   note"]
    d = t["daemon"]
    notes = {"subscriber": "out = json.loads done (auto ack)",
             "relay": "out = publish call + ack",
             "daemon": f"out = messages_out; mean micro-batch {d['mean_batch'] or 0:.1f}, "
                       f"step_batch {d['step_batch_seconds'] or 0:.2f} s in {d['batches']} batches"}

    def cell(value, width):
        return f"{value:>{width},.0f}" if value else f"{'-':>{width}}"

    for name in ("subscriber", "relay", "daemon"):
        row = t[name]
        lines.append(f"{name:<12}{cell(row['out_per_s'], 10)}{cell(row.get('confirmed_per_s'), 13)}"
                     f"{cell(row.get('delivered_per_s'), 16)}   {notes[name]}")
    lines.append(f"daemon / subscriber = {ratios['daemon_per_subscriber']:.2f}x   "
                 f"daemon / relay = {ratios['daemon_per_relay']:.2f}x   (delivered; "
                 f"out / out: {ratios['daemon_per_relay_out']:.2f}x)   backlog published at "
                 f"~{d['publish_rate']:,.0f} msg/s")
    lines += ["", f"Latency at {cfg['rate']:,.0f} msg/s for {cfg['duration']:g} s (ts at publish; warm-up left out)",
              f"{'consumer':<28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'received':>10}{'published':>10}"]
    for name, what in (("subscriber", "subscriber (decoded)"), ("relay", "relay (output received)"),
                       ("daemon", "daemon (output received)")):
        s = lat[name]
        lines.append(f"{what:<28}{s.get('p50_ms', float('nan')):>10.2f}{s.get('p99_ms', float('nan')):>10.2f}"
                     f"{s.get('max_ms', float('nan')):>10.2f}{s['received']:>10}{s['published']:>10}")
    profile = results.get("profile")
    if profile:
        lines += ["", f"Daemon profile over one drain ({profile['seconds']:.2f} s, {profile['samples']} samples, "
                      f"raw stacks in {profile['file']})"]
        for name, thread in profile["threads"].items():
            share = thread["cpu_share"]
            doing = "holding the GIL" if profile["gil"] else "on CPU"
            lines.append(f"  thread {name:<34}{thread['samples']:>6} samples  ~{share:.0%} of wall time {doing}")
            if thread["samples"] >= profile["samples"] / 20:
                lines += [f"      {part:6.1%}  {function}" for function, part in thread["self"]]
        for kind in ("self", "inclusive"):
            lines.append(f"  top functions of all threads, {kind} (share of all samples):")
            lines += [f"    {share:6.1%}  {function}" for function, share in profile[kind]]
    load = results["machine"]["load_average"]
    lines += ["", f"load average before/after: {load['before']:.2f} / {load['after']:.2f} "
                  f"({results['machine']['cpus']} CPUs)"]
    return "\n".join(lines)


def _ratios(throughput: dict) -> dict:
    """The fair end points: decoded for the subscriber, the N-th prediction delivered for relay and daemon."""
    subscriber, relay, daemon = (throughput[name] for name in ("subscriber", "relay", "daemon"))
    for row, key in ((subscriber, "out_per_s"), (relay, "delivered_per_s"), (daemon, "delivered_per_s")):
        row["messages_per_s"] = row[key]
    return {"daemon_per_subscriber": daemon["messages_per_s"] / subscriber["messages_per_s"],
            "daemon_per_relay": daemon["messages_per_s"] / relay["messages_per_s"],
            "daemon_per_relay_out": daemon["out_per_s"] / relay["out_per_s"]}


def _mosquitto_version(binary: str) -> str:
    done = subprocess.run([binary, "-h"], capture_output=True, text=True)
    match = re.search(r"version (\S+)", done.stdout + done.stderr)
    return match.group(1) if match else "?"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="backlog drained by each consumer")
    parser.add_argument("--streams", type=int, default=1_000, help="sensor streams the messages spread over")
    parser.add_argument("--rate", type=float, default=2_000, help="latency phase: messages per second")
    parser.add_argument("--duration", type=float, default=5.0, help="latency phase: seconds per consumer")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 messages, 100 streams, 500/s, 1 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="profile one more daemon drain with py-spy; raw stacks to FILE")
    parser.add_argument("--profile-gil", action="store_true", help="with --profile: sample only the GIL holder")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the daemon only (repeatable), e.g. NUMBA_NUM_THREADS=1")
    parser.add_argument("--relay-window", type=int, default=OUTPUT_WINDOW, metavar="K",
                        help="the relay's paho max_inflight_messages (default: the daemon's, 0 = unlimited)")
    parser.add_argument("--broker-config", default="", metavar="LINES",
                        help="extra mosquitto.conf lines, e.g. 'max_inflight_messages 1000'")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.streams, args.rate, args.duration = 2_000, 100, 500.0, 1.0
    try:
        args.daemon_env = dict(item.split("=", 1) for item in args.daemon_env)
    except ValueError:
        parser.error("--daemon-env takes NAME=VALUE")
    args.timeout = max(60.0, args.messages / 200)  # a drain slower than 200 msg/s is broken, not slow
    args.settle = 10.0  # seconds the latency phase waits for late outputs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from broker import Mosquitto, free_port, mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        print("mosquitto is not installed (make broker installs it)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgernn-bench-") as tmp:
        tmp = Path(tmp)
        extra = args.broker_config.replace("\\n", "\n")
        broker = Mosquitto(tmp / "broker", extra_config=extra + ("\n" if extra else "")).start()
        daemon = None
        try:
            daemon = DaemonUnderTest(tmp, broker.port, free_port(), args.daemon_env)
            publisher = Publisher(broker.port, args.streams)
            throughput, latency = {}, {}
            for relay in (False, True):
                name = "relay" if relay else "subscriber"
                throughput[name], latency[name] = run_bare(relay, broker.port, publisher, args)
            throughput["daemon"], latency["daemon"], profile = run_daemon(daemon, broker.port, publisher, args)
            publisher.close()
        finally:
            if daemon is not None and daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
            broker.stop()
    results = {
        "config": {"messages": args.messages, "streams": args.streams, "rate": args.rate, "duration": args.duration,
                   "broker_config": args.broker_config, "relay_window": args.relay_window,
                   "daemon_env": args.daemon_env, "model": "lstm input 6 hidden 64 head 4",
                   "numba_cache": os.environ["NUMBA_CACHE_DIR"]},
        "machine": {"cpus": os.cpu_count(), "mosquitto": _mosquitto_version(binary),
                    "paho": importlib.metadata.version("paho-mqtt"),
                    "load_average": {"before": load_before, "after": os.getloadavg()[0]},
                    "date": datetime.now().isoformat(timespec="seconds")},
        "throughput": throughput,
        "ratios": _ratios(throughput),
        "latency": latency,
    }
    if profile:
        results["profile"] = profile
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
