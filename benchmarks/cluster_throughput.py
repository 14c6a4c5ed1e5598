"""Scale-out throughput (issue 9, docs/scale-out.md): messages/s and latency through a 3-node NATS cluster with
1, 2 and 3 edgernn workers, against a bare relay through the same cluster, and the cost of checkpoints.

Everything runs on this machine (its own nats-server cluster on free loopback ports, JetStream replicas 3,
``--partitions`` partitions): the devices, three NATS nodes, the workers and the collector share its cores,
so the figures say what the whole system does on it, not what each part could do alone.

For each consumer in turn (fresh cluster each time):

- **throughput**: ``--messages`` QoS 1 JSON samples of ``--devices`` devices (seq, ts) published as fast as
  the cluster confirms them from four gateway connections (two on node 1, two on node 2, 200 unconfirmed each); the clock
  runs from the first publish to the last prediction received by a collector on node 1. msg/s = messages /
  that time; the publishers' own rate is reported beside it (``publish_msg_s``): where the two are equal,
  the consumer kept up and the cluster's intake was the limit.
- **latency**: then ``--rate`` msg/s paced for ``--seconds`` s; latency = a prediction's arrival minus the
  ``ts`` its sample carried (same clock), p50/p99.

Consumers: ``relay`` -- bare paho clients, a persistent session per partition (``part/<p>/sensors/+/imu``)
in one process: decode, publish a result at QoS 1, ack (the anchor; no model, no checkpoint);
``N workers`` -- `edgernn serve` with ``[cluster]``, each holding P/N partitions (GRU, input 3, hidden 12,
checkpoint every ``--checkpoint-interval`` s); ``1 worker, checkpoint 5 s`` (the longest ack_wait 10 s allows) -- the cost of checkpoints
is the difference to ``1 worker``. Ratios are against the relay of the same run.

    .venv/bin/python benchmarks/cluster_throughput.py --json benchmarks/results/cluster_throughput.json
    .venv/bin/python benchmarks/cluster_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from numba_cache import use_test_cache  # noqa: E402

use_test_cache()

import numpy as np  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from daemon_harness import payload, write_model  # noqa: E402
from edgernn.runtime.cluster import cluster_status  # noqa: E402
from edgernn.runtime.config import load_config  # noqa: E402
from edgernn.runtime.nats_config import pipeline_mappings  # noqa: E402
from nats_cluster import NatsCluster, Worker, worker_config  # noqa: E402


GATEWAYS = 4
"""Publishing connections, two on node 1 and two on node 2, 200 unconfirmed messages each."""


class Collector:
    """Every prediction's arrival time and its sample's ts (a clean session on ``predictions/#``)."""

    def __init__(self, port: int):
        self.arrivals: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-collector", clean_session=True)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("predictions/#", qos=1)
        assert subscribed.wait(10), "collector: no SUBACK"

    def _on_message(self, client, userdata, message):
        now = time.time()
        ts = json.loads(message.payload)["ts"]
        with self._lock:
            self.arrivals.append((now, ts))

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def since(self, index: int) -> list[tuple[float, float]]:
        with self._lock:
            return self.arrivals[index:]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Relay:
    """The anchor: decode, publish a result, ack; a persistent session per partition, as the workers have
    (one NATS MQTT session delivers about 850 msg/s here: partitions are NATS's parallelism too)."""

    def __init__(self, port: int, partitions: int):
        self.clients = [self._session(port, p) for p in range(partitions)]

    def _session(self, port: int, partition: int) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-relay-part-{partition}",
                             clean_session=False, manual_ack=True)
        client.max_inflight_messages_set(0)
        client.on_message = self._on_message
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect("127.0.0.1", port)
        client.loop_start()
        client.subscribe(f"part/{partition}/sensors/+/imu", qos=1)
        assert subscribed.wait(10), "relay: no SUBACK"
        return client

    @staticmethod
    def _on_message(client, userdata, message):
        body = json.loads(message.payload)
        key = message.topic.split("/")[3]
        client.publish(f"predictions/{key}/imu",
                       json.dumps({"y": body["x"][:2], "seq": body["seq"], "ts": body["ts"], "key": key}), qos=1)
        client.ack(message.mid, message.qos)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


class Gateway:
    """Publishes samples of its devices in seq order, at most ``window`` unconfirmed."""

    def __init__(self, port: int, devices: range, window: int = 200):
        self.devices, self.window = devices, window
        self.seq = {k: 0 for k in devices}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", clean_session=True)
        self.client.max_inflight_messages_set(window)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, count: int, rate: float | None = None) -> None:
        pending, start = [], time.monotonic()
        for index in range(count):
            k = self.devices[index % len(self.devices)]
            body = payload(k, self.seq[k], 3, ts=time.time())
            self.seq[k] += 1
            pending.append(self.client.publish(f"sensors/dev{k}/imu", json.dumps(body), qos=1))
            if len(pending) >= self.window:
                pending.pop(0).wait_for_publish(60)
            if rate:
                delay = start + (index + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        for info in pending:
            info.wait_for_publish(60)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure(folder: Path, consumer: str, workers: int, checkpoint_interval: float, args) -> dict:
    cluster = NatsCluster(folder / "nats")
    model = folder / "model.ern"
    if not model.exists():
        write_model(model, "gru")
    per_worker = -(-args.partitions // max(workers, 1))
    configs = [worker_config(folder, f"w{i + 1}", cluster, i, args.partitions, per_worker,
                             checkpoint_interval=checkpoint_interval) for i in range(workers)]
    if configs:
        cluster.mappings = pipeline_mappings(load_config(configs[0]).pipelines, args.partitions)
    else:
        probe = worker_config(folder, "probe", cluster, 0, args.partitions, None)
        cluster.mappings = pipeline_mappings(load_config(probe).pipelines, args.partitions)
    running, gateways, relay, collector = [], [], None, None
    try:
        cluster.start()
        cluster.wait_ready()
        collector = Collector(cluster.nodes[0].mqtt_port)
        if consumer == "relay":
            relay = Relay(cluster.nodes[2].mqtt_port, args.partitions)
        for index, config in enumerate(configs):
            running.append(Worker(f"w{index + 1}", config, folder / f"w{index + 1}-{consumer}.log").start())
        deadline = time.monotonic() + 90
        while running and not all(any(w.serving(p) for w in running) for p in range(args.partitions)):
            assert time.monotonic() < deadline, "the workers did not take every partition"
            time.sleep(0.2)
        time.sleep(1.0)
        share = args.devices // GATEWAYS
        gateways = [Gateway(cluster.nodes[g % 2].mqtt_port, range(g * share, (g + 1) * share)) for g in range(GATEWAYS)]
        # throughput: as fast as the cluster confirms
        start = time.time()
        threads = [threading.Thread(target=g.publish, args=(args.messages // GATEWAYS,)) for g in gateways]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        published = time.time()
        expected = GATEWAYS * (args.messages // GATEWAYS)
        deadline = time.monotonic() + 120
        while collector.count() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        received = collector.count()
        last = max(a for a, _ in collector.since(0)) if received else None
        result = {"consumer": consumer, "workers": workers, "checkpoint_interval_s": checkpoint_interval,
                  "messages": expected, "received": received,
                  "publish_msg_s": round(expected / (published - start), 1),
                  "msg_s": round(expected / (last - start), 1) if received >= expected else None}
        # latency at a paced rate
        mark = collector.count()
        threads = [threading.Thread(target=g.publish, args=(int(args.rate * args.seconds / GATEWAYS), args.rate / GATEWAYS))
                   for g in gateways]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(3.0)
        latencies = np.array([arrived - ts for arrived, ts in collector.since(mark)]) * 1000
        if latencies.size:
            result.update(latency_ms_p50=round(float(np.percentile(latencies, 50)), 2),
                          latency_ms_p99=round(float(np.percentile(latencies, 99)), 2),
                          paced_rate=args.rate, paced_received=int(latencies.size))
        if configs:  # what the workers say of their checkpoints (the lease values `cluster status` shows)
            rows = cluster_status(load_config(configs[0]))
            result["checkpoint_ms_last"] = [row.get("checkpoint_ms") for row in rows]
            result["checkpoints"] = sum(row.get("checkpoints") or 0 for row in rows)
        return result
    finally:
        for gateway in gateways:
            gateway.close()
        for worker in running:
            if worker.process.poll() is None:
                worker.terminate()
        if relay is not None:
            relay.close()
        if collector is not None:
            collector.close()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rate", type=float, default=400.0, help="msg/s of the latency phase")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.messages, args.seconds = 2_000, 3.0
    runs = [("relay", 0, 0.0), ("1 worker", 1, args.checkpoint_interval), ("2 workers", 2, args.checkpoint_interval),
            ("3 workers", 3, args.checkpoint_interval), ("1 worker, checkpoint 5 s", 1, 5.0)]
    if args.quick:
        runs = runs[:2]
    results = []
    for name, workers, interval in runs:
        with tempfile.TemporaryDirectory(prefix="edgernn-cluster-bench-") as folder:
            result = measure(Path(folder), name, workers, interval, args)
        results.append(result)
        print(json.dumps(result), flush=True)
    anchor = results[0].get("msg_s")
    for result in results[1:]:
        if anchor and result.get("msg_s"):
            result["vs_relay"] = round(result["msg_s"] / anchor, 2)
    print(f"{'consumer':<28} {'msg/s':>8} {'vs relay':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for result in results:
        print(f"{result['consumer']:<28} {result.get('msg_s') or '-':>8} {result.get('vs_relay', '-'):>8} "
              f"{result.get('latency_ms_p50', '-'):>8} {result.get('latency_ms_p99', '-'):>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0 if all(r.get("msg_s") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
