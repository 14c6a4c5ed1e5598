"""Soak: `edgernn serve` under a simulated fleet for a long time -- throughput, RSS and latency over time,
and at the end nothing lost, checked against an uninterrupted offline run.

What runs: a Mosquitto of its own, the daemon as a process (the bundled GRU activity classifier, QoS 1 in,
QoS 1 out, ``durability = "journal"`` with a snapshot every 30 s by default, so the journal rotates many
times), a `firmware_sim.Fleet` of IMU devices at 50 Hz in this process, and a collector subscribed to the
predictions. Every ``--interval`` seconds one row: messages/s in and out (the daemon's counters), queue
depth, the daemon's RSS and CPU, and the sample -> prediction latency of that interval at the collector
(arrival time minus the device's ``ts``: sampling, broker, daemon, broker again).

At the end the fleet stops and drains; then every device's predictions are compared, seq by seq, with
`Model.run` over exactly the samples it published (`firmware_sim.signals.generate`, the same seed).

Passed means: the daemon ran throughout and exited 0 on SIGTERM; every published sample got a prediction
equal to the offline run (atol 1e-5; a repeated prediction must be identical); nothing was rejected or
dropped; and RSS did not grow: the mean of the last fifth of the rows is at most 5% (or 4 MiB, whichever
is more) above the mean of the second fifth (the first fifth is warm-up: caches, allocator arenas).

Run from the repository root::

    .venv/bin/python reliability/soak.py --duration 600 --json benchmarks/results/reliability/soak.json
    .venv/bin/python reliability/soak.py --quick      # 20 s, what `make test` runs
"""

from __future__ import annotations

import json
import threading
import time

from common import Rig, arguments, cpu_seconds, finish, metric, percentiles, wait_until  # first: sets up paths

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgernn.demo import bundled_model
from edgernn.firmware_sim.fleet import Fleet, signal_seed
from edgernn.firmware_sim.signals import generate

ATOL = 1e-5
PROFILE, RATE_HZ = "imu", 50.0
RSS_GROWTH_FRACTION, RSS_GROWTH_FLOOR = 0.05, 4 * 2**20


class Collector:
    """Every prediction by (device, seq), and the latency of each, from its own paho client."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.predictions: dict[str, dict[int, list]] = {}
        self.latencies: list[float] = []  # since the last row
        self.all_latencies: list[float] = []
        self.repeats_differing: list[tuple[str, int]] = []
        self.count = 0
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-collector", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("predictions/+/imu", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the collector got no SUBACK"

    def _on_message(self, client, userdata, message):
        arrived = time.time()
        body = json.loads(message.payload)
        key, seq, y = body["key"], body["seq"], body["y"]
        with self.lock:
            seen = self.predictions.setdefault(key, {})
            if seq in seen:
                if seen[seq] != y:
                    self.repeats_differing.append((key, seq))
                return
            seen[seq] = y
            self.count += 1
            self.latencies.append(arrived - body["ts"])

    def take_latencies(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
        self.all_latencies.extend(taken)
        return taken

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def offline_check(model, fleet: Fleet, collector: Collector, seed: int) -> dict:
    """Each device's predictions against `Model.run` over the samples it published."""
    missing, worst = 0, 0.0
    for index, device in enumerate(fleet.devices):
        n = device.seq
        got = collector.predictions.get(device.id, {})
        missing += sum(1 for s in range(n) if s not in got)
        if not got:
            continue
        X, _ = generate(PROFILE, n, RATE_HZ, signal_seed(seed, index))
        want = model.run(X, model.new_state())
        seqs = sorted(s for s in got if s < n)
        if seqs:
            worst = max(worst, float(np.max(np.abs(np.array([got[s] for s in seqs]) - want[seqs]))))
    return {"missing": missing, "max_abs_error": worst}


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of streaming (default 600)")
    parser.add_argument("--devices", type=int, default=20, help="simulated IMU devices at 50 Hz (default 20)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--durability", choices=("snapshot", "journal"), default="journal")
    parser.add_argument("--snapshot-interval", type=float, default=30.0)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.interval, args.snapshot_interval = 20.0, 2.0, 5.0

    failures: list[str] = []
    with Rig(keep=args.keep, prefix="edgernn-soak-") as rig:
        rig.start(model_path=bundled_model(), state=f'durability = "{args.durability}"\n'
                                                   f'snapshot_interval = {args.snapshot_interval}')
        model = rig.model
        pid = rig.daemon.process.pid
        collector = Collector(rig.broker.port)
        fleet = Fleet(PROFILE, devices=args.devices, rate_hz=RATE_HZ, port=rig.broker.port, seed=args.seed)
        print(f"soak: {args.devices} devices x {RATE_HZ:g} Hz for {args.duration:g} s, "
              f"durability={args.durability}, state in {rig.folder}", flush=True)
        print(f"{'t_s':>6} {'in/s':>7} {'out/s':>7} {'queue':>5} {'rss_MiB':>8} {'cpu%':>5} "
              f"{'p50_ms':>7} {'p99_ms':>7} {'p99.9_ms':>8}", flush=True)
        rows = []
        start = time.monotonic()
        fleet.start()
        last = (start, 0.0, 0.0, cpu_seconds(pid))
        while time.monotonic() - start < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (time.monotonic() - start))))
            if rig.daemon.process.poll() is not None:
                failures.append(f"the daemon exited with {rig.daemon.process.returncode}")
                break
            values, now, cpu = rig.metrics(), time.monotonic(), cpu_seconds(pid)
            messages_in = metric(values, "edgernn_messages_in_total", pipeline="imu")
            messages_out = metric(values, "edgernn_messages_out_total", pipeline="imu")
            span = now - last[0]
            latency = percentiles(collector.take_latencies())
            row = {"t_s": round(now - start, 1), "in_per_s": (messages_in - last[1]) / span,
                   "out_per_s": (messages_out - last[2]) / span,
                   "queue_depth": metric(values, "edgernn_queue_depth"), "rss_bytes": rig.rss(),
                   "cpu_fraction": (cpu - last[3]) / span,
                   **{f"{q}_ms": None if v is None else v * 1e3 for q, v in latency.items()}}
            rows.append(row)
            last = (now, messages_in, messages_out, cpu)
            print(f"{row['t_s']:6.0f} {row['in_per_s']:7.0f} {row['out_per_s']:7.0f} {row['queue_depth']:5.0f} "
                  f"{row['rss_bytes'] / 2**20:8.1f} {100 * row['cpu_fraction']:5.1f} "
                  f"{_ms(row['p50_ms'])} {_ms(row['p99_ms'])} {_ms(row['p99.9_ms'], 8)}", flush=True)
        fleet_stats = fleet.stop()
        published = sum(device.seq for device in fleet.devices)
        wait_until(lambda: collector.count >= published, 60)
        collector.take_latencies()
        final = rig.metrics()
        check = offline_check(model, fleet, collector, args.seed)
        exit_code = rig.terminate(failures)
        collector.close()

        rejected = sum(v for k, v in final.items() if k.startswith("edgernn_rejected_total"))
        dropped = metric(final, "edgernn_queue_dropped_total")
        if fleet_stats["dropped_by_buffer"] or fleet_stats["acked"] != published:
            failures.append(f"the fleet lost samples before the broker: {fleet_stats['dropped_by_buffer']} dropped "
                            f"by its buffer, {fleet_stats['acked']} of {published} acked")
        if check["missing"]:
            failures.append(f"{check['missing']} of {published} samples got no prediction")
        if check["max_abs_error"] > ATOL:
            failures.append(f"predictions differ from the offline run by {check['max_abs_error']:.2e} > {ATOL}")
        if collector.repeats_differing:
            failures.append(f"{len(collector.repeats_differing)} repeated predictions differ from the first")
        if rejected or dropped:
            failures.append(f"{rejected:.0f} rejected, {dropped:.0f} dropped by the inbox")
        rss = _rss_verdict(rows)
        if rss["growth_bytes"] is not None and rss["growth_bytes"] > rss["allowed_bytes"] and not args.quick:
            failures.append(f"RSS grew by {rss['growth_bytes'] / 2**20:.1f} MiB "
                            f"(allowed {rss['allowed_bytes'] / 2**20:.1f} MiB)")
        results = {
            "config": {"devices": args.devices, "rate_hz": RATE_HZ, "duration_s": args.duration,
                       "interval_s": args.interval, "durability": args.durability,
                       "snapshot_interval_s": args.snapshot_interval, "model": "bundled imu_activity.ern GRU(32)"},
            "published": published, "predicted": collector.count, **check,
            "messages_in": metric(final, "edgernn_messages_in_total", pipeline="imu"),
            "rejected": rejected, "queue_dropped": dropped, "daemon_exit_code": exit_code,
            "fleet": {k: fleet_stats[k] for k in ("samples", "acked", "dropped_by_buffer", "achieved_ratio", "lag")},
            "rss": rss, "rows": rows, "summary": _summary(rows),
            "latency_ms": {q: None if v is None else v * 1e3 for q, v in percentiles(collector.all_latencies).items()},
        }
        print(f"published {published:,}, predicted {collector.count:,}, missing {check['missing']}, "
              f"max |error| {check['max_abs_error']:.1e}; RSS {_mib(rss['early_mean_bytes'])} -> "
              f"{_mib(rss['late_mean_bytes'])} MiB", flush=True)
    return finish("soak", results, failures, args.json)


def _rss_verdict(rows: list[dict]) -> dict:
    """Mean RSS of the second fifth of the rows against the last fifth (the first fifth is warm-up)."""
    n = len(rows)
    fifth = max(1, n // 5)
    if n < 5:
        return {"early_mean_bytes": None, "late_mean_bytes": None, "growth_bytes": None, "allowed_bytes": None}
    early = float(np.mean([r["rss_bytes"] for r in rows[fifth:2 * fifth]]))
    late = float(np.mean([r["rss_bytes"] for r in rows[-fifth:]]))
    return {"early_mean_bytes": early, "late_mean_bytes": late, "growth_bytes": late - early,
            "allowed_bytes": max(RSS_GROWTH_FRACTION * early, RSS_GROWTH_FLOOR),
            "max_bytes": max(r["rss_bytes"] for r in rows)}


def _summary(rows: list[dict]) -> dict:
    """Over the rows after the first (start-up): throughput, CPU and the spread of per-row latency."""
    steady = rows[1:] or rows

    def column(name):
        return [r[name] for r in steady if r[name] is not None]

    return {"in_per_s_mean": float(np.mean(column("in_per_s"))), "out_per_s_min": float(np.min(column("out_per_s"))),
            "cpu_fraction_mean": float(np.mean(column("cpu_fraction"))),
            "p50_ms_median": float(np.median(column("p50_ms"))), "p99_ms_median": float(np.median(column("p99_ms"))),
            "p99_ms_max": float(np.max(column("p99_ms"))), "p99.9_ms_max": float(np.max(column("p99.9_ms"))),
            "queue_depth_max": float(np.max(column("queue_depth")))}


def _ms(value, width: int = 7) -> str:
    return f"{value:{width}.1f}" if value is not None else " " * (width - 1) + "-"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
