"""Scale-out under failures (issue 9, docs/scale-out.md): workers behind a 3-node NATS cluster lose a worker
to ``kill -9``, hand one back with SIGTERM, and lose a NATS node, while a fleet of devices streams.

What runs, all on loopback ports of its own (never the system's NATS): a 3-node nats-server cluster with
JetStream (replicas 3), an MQTT listener per node and the partition mapping `edgernn cluster config` writes
(``--partitions`` P); ``--workers`` workers (`edgernn serve` with ``[cluster]``, at most P / workers
partitions each) plus one standby (no limit: it takes whatever is free), each connected first to a
different node with the others as ``fallback_servers``; ``--devices`` devices streaming seq-numbered
samples at ``--rate`` Hz (QoS 1, from four gateway connections on nodes 1 and 2); a persistent-session
collector of every prediction on node 1. In turn, ``--phase`` seconds apart:

1. a worker is killed with SIGKILL: the standby claims its partitions once their leases lapse
   (``lease_ttl``) and resumes from their last checkpoints;
2. another worker gets SIGTERM: its final checkpoint is stored, its leases deleted, the standby takes over
   at its next look for free partitions;
3. (not with ``--quick``) NATS node 3 is killed with SIGKILL: the workers connected to it move to the
   others (``fallback_servers``), every MQTT client waits while stream leaders are elected again.

Then the devices stop, every prediction is awaited, the workers stop. Passed when:

- every device's predictions equal the uninterrupted offline run (`common.explain`: every seq predicted,
  none computed from a state that missed a sample, every repeat identical to the first copy);
- each device's predictions arrived in seq order: dropping the repeats of seqs already predicted (a new
  owner re-publishes what it steps again from the checkpoint), the seqs increase one by one;
- each partition was served by one worker at a time: from the workers' logs, the intervals from
  ``partition_started`` to ``partition_stopped``/``partition_aborted`` (or the kill) of different workers
  never overlap.

Reported: takeover time of each failure (the failure -> the first prediction after it of every device of the
partitions involved, p50 and max over devices), repeats, messages and predictions.

Run from the repository root::

    .venv/bin/python reliability/cluster_faults.py --json benchmarks/results/reliability/cluster_faults.json
    .venv/bin/python reliability/cluster_faults.py --quick       # what `make test` runs (no node kill)
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

from common import (Collector, StreamPublisher, arguments, explain, finish, percentiles,  # first: paths
                    wait_until, write_model)

from nats_cluster import NatsCluster, Worker, nats_server_binary, worker_config

from edgernn.runtime.config import load_config
from edgernn.runtime.nats_config import partition_of, pipeline_mappings

GATEWAYS = 4


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def serving_intervals(workers: list[Worker], end: float) -> dict[int, list[tuple[float, float, str]]]:
    """partition -> [(start, end, worker)] from the workers' logs (a killed worker's open ones end at the kill)."""
    intervals: dict[int, list] = {}
    for worker in workers:
        open_since: dict[int, float] = {}
        for event in worker.events():
            partition, what = event.get("partition"), event.get("event")
            if what == "partition_started":
                open_since[partition] = _ts(event)
            elif what in ("partition_stopped", "partition_aborted") and partition in open_since:
                intervals.setdefault(partition, []).append((open_since.pop(partition), _ts(event), worker.name))
        for partition, since in open_since.items():
            intervals.setdefault(partition, []).append((since, worker.killed_at or end, worker.name))
    return intervals


def overlaps(intervals: dict) -> list[str]:
    found = []
    for partition, spans in intervals.items():
        spans = sorted(spans)
        for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
            if w1 != w2 and s2 < e1:
                found.append(f"partition {partition}: {w1} until {e1:.3f} and {w2} from {s2:.3f}")
    return found


def in_seq_order(collector: Collector) -> list[str]:
    """Per device: the seqs in arrival order, repeats of seqs seen before dropped, must go up one by one."""
    problems, last = [], {}
    with collector._received:
        messages = list(collector.messages)
    for _, body in messages:
        body = json.loads(body)
        key, seq = body["key"], body["seq"]
        previous = last.get(key, -1)
        if seq <= previous:
            continue  # a repeat (re-stepped from the checkpoint by the next owner): explain() checks its value
        if seq != previous + 1:
            problems.append(f"{key}: seq {seq} arrived after {previous}")
        last[key] = seq
    return problems[:20]


def takeover(collector: Collector, moment_mono: float, devices: list[int]) -> dict:
    """Seconds from a failure to each device's first prediction after it (p50, max), over ``devices``."""
    copies_after = {}
    with collector._received:
        messages, arrivals = list(collector.messages), list(collector.arrivals)
    for (_, body), arrived in zip(messages, arrivals):
        if arrived > moment_mono:
            key = json.loads(body)["key"]
            copies_after.setdefault(key, arrived - moment_mono)
    waits = [copies_after.get(f"dev{k}") for k in devices]
    missing = sum(w is None for w in waits)
    waits = [w for w in waits if w is not None]
    return {"devices": len(devices), "without_prediction": missing,
            **{f"{q}_s": round(v, 2) if v is not None else None for q, v in percentiles(waits, (50, 100)).items()}}


def wait_for_partitions(workers: list[Worker], partitions: int, timeout: float) -> bool:
    return wait_until(lambda: all(any(w.process.poll() is None and w.serving(p) for w in workers)
                                  for p in range(partitions)), timeout)


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0, help="samples per second per device")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--workers", type=int, default=3, help="workers besides the standby")
    parser.add_argument("--phase", type=float, default=15.0, help="seconds between two failures")
    parser.add_argument("--lease-ttl", type=float, default=15.0)
    parser.add_argument("--ack-wait", type=float, default=10.0, help="nats-server's mqtt ack_wait, s")
    parser.add_argument("--checkpoint-interval", type=float, default=1.0)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.partitions, args.workers, args.phase = 30, 4, 2, 8.0
        args.lease_ttl, args.ack_wait = 6.0, 3.0
    if nats_server_binary() is None:
        print("nats-server is not installed (make broker installs it)")
        return 1
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="edgernn-cluster-faults-"))
    failures: list[str] = []
    results: dict = {"devices": args.devices, "rate_hz": args.rate, "partitions": args.partitions,
                     "workers": args.workers, "lease_ttl_s": args.lease_ttl, "ack_wait": args.ack_wait,
                     "checkpoint_interval_s": args.checkpoint_interval, "folder": str(folder)}
    model = write_model(folder / "model.ern", "gru")
    cluster = NatsCluster(folder / "nats", ack_wait=f"{args.ack_wait:g}s")
    per_worker = -(-args.partitions // args.workers)
    timing = dict(lease_ttl=args.lease_ttl, checkpoint_interval=args.checkpoint_interval, ack_wait=args.ack_wait)
    configs = [worker_config(folder, f"w{i + 1}", cluster, i, args.partitions, per_worker, **timing)
               for i in range(args.workers)]
    configs.append(worker_config(folder, "standby", cluster, args.workers, args.partitions, None, **timing))
    cluster.mappings = pipeline_mappings(load_config(configs[0]).pipelines, args.partitions)
    workers, publishers, collector = [], [], None
    try:
        cluster.start()
        cluster.wait_ready()
        collector = Collector(cluster.nodes[0].mqtt_port, client_id="cluster-collector")
        for index, config in enumerate(configs[:-1]):
            workers.append(Worker(f"w{index + 1}", config, folder / f"w{index + 1}.log").start())
        if not wait_for_partitions(workers, args.partitions, 90):
            raise RuntimeError("the workers did not take every partition")
        workers.append(Worker("standby", configs[-1], folder / "standby.log").start())
        time.sleep(1.0)  # the last SUBACKs: a session stores only what is published after it subscribed
        share = -(-args.devices // GATEWAYS)
        for gateway in range(GATEWAYS):
            first = gateway * share
            count = min(share, args.devices - first)
            node = cluster.nodes[gateway % 2]  # nodes 1 and 2: node 3 is the one killed
            publishers.append(StreamPublisher(node.mqtt_port, count, args.rate, first=first).start())
        started = time.monotonic()
        time.sleep(args.phase)

        def devices_of(worker: Worker) -> list[int]:
            owned = [p for p in range(args.partitions) if worker.serving(p)]
            return [k for k in range(args.devices) if partition_of(f"dev{k}", args.partitions) in owned]

        events = {}
        victim = workers[0]
        affected = devices_of(victim)
        moment = time.monotonic()
        victim.kill()
        print(f"killed {victim.name} (-9): {len(affected)} devices to take over", flush=True)
        time.sleep(args.phase + args.lease_ttl)
        events["worker_kill9"] = takeover(collector, moment, affected)
        leaving = workers[1]
        affected = devices_of(leaving)
        moment = time.monotonic()
        code = leaving.terminate()
        if code != 0:
            failures.append(f"{leaving.name} exited with {code} on SIGTERM")
        print(f"stopped {leaving.name} (SIGTERM): {len(affected)} devices to hand over", flush=True)
        time.sleep(args.phase)
        events["worker_sigterm"] = takeover(collector, moment, affected)
        if not args.quick:
            moment = time.monotonic()
            cluster.kill(2)
            print("killed NATS node n3 (-9)", flush=True)
            time.sleep(args.phase + 10)
            events["nats_node_kill9"] = takeover(collector, moment, list(range(args.devices)))
        sent = [publisher.stop(timeout=120) for publisher in publishers]
        total = min(sent)
        results["seconds"] = round(time.monotonic() - started, 1)
        results["samples_per_device"] = total
        if not wait_until(lambda: collector.caught_up(args.devices, total), 120):
            failures.append("not every device's last sample was predicted within 120 s")
        time.sleep(2)
        for worker in workers:
            if worker.process.poll() is None and worker.terminate() != 0:
                failures.append(f"{worker.name} did not stop cleanly")
        end = time.time()
        results["events"] = events
        for name, event in events.items():
            if event["without_prediction"]:
                failures.append(f"{name}: {event['without_prediction']} devices got no prediction after it")
        copies = collector.copies()
        inexact, repeats = [], 0
        for k in range(args.devices):
            history = explain(model, k, copies.get(f"dev{k}", {}), total)
            repeats += history.copies - (total - len(history.unpredicted))
            if not history.exact:
                inexact.append(f"dev{k}: lost {history.losses[:3]}, unpredicted {history.unpredicted[:5]}, "
                               f"unexplained {history.unexplained[:3]}, repeats differing {history.repeats_differing}")
        results["predictions"] = sum(len(c) for device in copies.values() for c in device.values())
        results["repeats"] = repeats
        failures += [f"not the offline run: {line}" for line in inexact[:20]]
        failures += [f"out of order: {line}" for line in in_seq_order(collector)]
        intervals = serving_intervals(workers, end)
        results["serving"] = {str(p): [(round(s, 3), round(e, 3), w) for s, e, w in spans]
                              for p, spans in sorted(intervals.items())}
        failures += [f"two workers at once: {line}" for line in overlaps(intervals)]
    except Exception as error:  # noqa: BLE001 -- reported as the run's failure, with the logs kept
        failures.append(f"{type(error).__name__}: {error}")
        args.keep = True
    finally:
        for publisher in publishers:
            publisher.stop(timeout=10)
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
        if collector is not None:
            collector.close()
        cluster.stop()
    if not args.keep and not failures:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"logs kept in {folder}")
    print(json.dumps({k: v for k, v in results.items() if k != "serving"}, indent=2))
    return finish("cluster_faults", results, failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
