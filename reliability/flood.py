"""Floods against a live `edgernn serve`: memory stays bounded and every message is accounted for.

Run from the repository root::

    .venv/bin/python reliability/flood.py                      # all three parts, full size
    .venv/bin/python reliability/flood.py --quick              # what `make test` runs
    .venv/bin/python reliability/flood.py keys --keys 200000   # one part; --json out.json, --seed, --keep

Each part starts its own Mosquitto and daemon (reliability/common.py `Rig`); publishers are paho clients in
this process, QoS 1, pipelined (`publish_all`: up to 1,000 messages unconfirmed).

keys
    ``--keys`` K distinct stream keys (default 1,000,000; quick 20,000), one valid message each on
    ``sensors/k<i>/imu``, against ``max_streams`` M (``--max-streams``, default 10,000; quick 1,000), as fast
    as the daemon takes them (the publisher stays at most 5,000 messages ahead of its predictions, so what
    grows is the keys' cost, not a backlog: the speed part floods without that limit). A thread scrapes the daemon every 0.5 s; its RSS is then read at each K/20 messages the daemon has taken
    in. Passed: ``streams_live`` == M and ``evictions`` == K - M at the end, K predictions (nothing
    rejected, dropped or counted twice), the predictions of four probe keys (late ones, on reused slots)
    equal one offline step from the rest state, and RSS bounded: its peak over the second half of the run
    exceeds the first half's by less than 10%. Why that bound: the table is full after M keys, and every
    other per-key structure is bounded and full early too (the scheduler's route cache at 100,000 topics,
    the link's redelivery table at 65,535 packet ids), so the second half adds nothing but allocator noise;
    a per-key leak of even ~50 bytes would add 25 MB over the second half of the full run.
sizes
    ``max_payload_bytes`` 4,096 and Mosquitto's ``message_size_limit`` 1,000,000, one stream with seq: a
    valid JSON sample padded with whitespace to exactly 4,096 bytes (accepted), then padded to 4,097,
    40,960 and 409,600 bytes (rejected: ``oversize``, each dead-lettered with at most 4,096 bytes of the
    payload), then 1,000,001 bytes (the broker drops it: the daemon never sees it; Mosquitto 2.0.11 also
    answers that MQTT 3.1.1 publisher with a PUBACK carrying an MQTT 5 reason code, which costs the
    publisher its connection: reported), then a plain valid sample. Passed: counters exact (5 in, 3 rejected as oversize, 3 dead letters marked truncated, 2
    predictions equal to the offline run of the two valid samples), the daemon alive and connected.
speed
    A model far slower per step (LSTM, 2 layers of ``--hidden`` 1,024) and a publisher far faster than the
    daemon: ``--messages`` N (default 200,000; quick 5,000) over ``--streams`` S (default 500; quick 200)
    streams with seq, at QoS 1, with ``max_undelivered_messages`` 2,000 and Mosquitto's own in-flight window
    (``--broker-window``: its default, 20; 0 opens it, leaving the daemon's inbox alone against the flood). A
    thread samples ``edgernn_queue_depth`` and RSS every 0.25 s. Passed: max depth <= 4,000 (the inbox takes
    up to twice its bound while a snapshot waits for confirmations, see runtime/scheduler.py `Inbox`), RSS
    bounded (the 10% rule above; the default N lets the first half fill what is bounded but fills slowly:
    the link's memory of the last 65,535 deliveries, `runtime/mqtt.py` _Redeliveries), every (key, seq)
    predicted exactly once, four streams equal to the offline run. Mosquitto 2.0.11 pushes far more unacked messages than its window of 20 into the connection, so
    the daemon's own bounds are what hold the flood back. Two faults this part found, fixed: paho read as
    many packets per loop pass as it had messages in flight before writing, so predictions queued unwritten
    behind the flood until paho ran out of packet ids (now `runtime/mqtt.py` READ_BURST); and a periodic
    snapshot stalled the worker up to shutdown_timeout waiting for confirmations the full inbox kept paho
    from reading (now the inbox stretches, and a periodic snapshot waits at most 2 s). A third: the broker's
    confirmations of the predictions queued behind the flood of inputs in the one connection, so past
    65,535 predictions awaiting them paho refused to publish (63,190 of 150,000 lost); predictions now
    leave on a second connection (`runtime/mqtt.py` MqttLink).
    Then QoS 0 (the same messages published at QoS 0, so delivered at QoS 0; ``max_undelivered_messages``
    50): the inbox drops what finds it full. Passed: ``messages_in`` + ``queue_dropped`` + what Mosquitto dropped (its
    ``$SYS/broker/publish/messages/dropped``) == published, ``queue_dropped`` > 0, every prediction
    consistent (one per (key, seq) taken in).

The JSON holds each part's figures: counts, RSS series, throughput, queue depths, seconds.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
from common import Rig, arguments, finish, log_events, metric, publish_all

import edgernn
from daemon_harness import offline, payload, sample
from edgernn.runtime.codecs import DEAD_LETTER_MAX_PAYLOAD
from helpers import random_model

PARTS = ("keys", "sizes", "speed")
GROWTH_BOUND = 0.10
"""RSS may grow by less than this fraction of the first half's peak over the second half of a flood."""
QUICK_GROWTH_BOUND = 0.25
"""The bound of ``--quick`` runs: too short for the bounded per-key tables (the scheduler's 100,000 routes,
the link's 65,535 deliveries) to fill in their first half, they keep growing into the second, and one
allocator step of 15 MiB there measured 10.2% (CI, 20,000 keys). A smoke bound: it still catches a gross
leak; the full run holds the 10% rule."""
WINDOW = 1000
MiB = 2**20


class Sampler:
    """Scrapes the daemon every ``period`` seconds from a thread: (seconds, RSS, metrics) rows."""

    def __init__(self, rig: Rig, period: float):
        self.rig, self.period = rig, period
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.take()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.take()

    def take(self) -> dict:
        values = self.rig.metrics()
        row = {"t": time.monotonic() - self._start, "rss": self.rig.rss(),
               "in": metric(values, "edgernn_messages_in_total", pipeline="imu"),
               "out": metric(values, "edgernn_messages_out_total", pipeline="imu"),
               "depth": metric(values, "edgernn_queue_depth"),
               "dropped": metric(values, "edgernn_queue_dropped_total"),
               "live": metric(values, "edgernn_streams_live", pipeline="imu"),
               "evictions": metric(values, "edgernn_evictions_total", pipeline="imu")}
        self.rows.append(row)
        return row


def rss_growth(rows: list[dict], total: int) -> dict:
    """Peak RSS over the first and the second half of the messages taken in, and the growth between them."""
    first = [r["rss"] for r in rows if r["in"] <= total / 2]
    second = [r["rss"] for r in rows if r["in"] > total / 2]
    first_peak, second_peak = max(first, default=0), max(second, default=0)
    return {"first_half_peak_mib": first_peak / MiB, "second_half_peak_mib": second_peak / MiB,
            "growth_mib": (second_peak - first_peak) / MiB,
            "growth_fraction": (second_peak - first_peak) / first_peak if first_peak else None}


def check_growth(growth: dict, failures: list[str], part: str, quick: bool = False) -> None:
    fraction, bound = growth["growth_fraction"], QUICK_GROWTH_BOUND if quick else GROWTH_BOUND
    if fraction is None or growth["second_half_peak_mib"] == 0:
        failures.append(f"{part}: too few RSS samples to judge growth")
    elif fraction >= bound:
        failures.append(f"{part}: RSS grew by {growth['growth_mib']:.1f} MiB ({fraction:.1%}) over the second half "
                        f"(bound {bound:.0%} of the first half's peak, {growth['first_half_peak_mib']:.1f} MiB)")


def wait_for(predicate, timeout: float, period: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(period)
    return True


def alive_and_connected(rig: Rig, failures: list[str], part: str) -> None:
    if rig.daemon.process.poll() is not None:
        failures.append(f"{part}: the daemon exited with {rig.daemon.process.returncode}")
        return
    values = rig.metrics()
    if metric(values, "edgernn_connected") != 1 or metric(values, "edgernn_reconnects_total") != 0:
        failures.append(f"{part}: connected {metric(values, 'edgernn_connected')}, reconnects "
                        f"{metric(values, 'edgernn_reconnects_total')} (expected 1 and 0)")


def first_step(model, x: np.ndarray) -> np.ndarray:
    return model.run(x[None, :], model.new_state())[0]


# ---- keys ---------------------------------------------------------------------------------------------
BODIES = 1000
KEYS_LEAD = 5000
"""Messages the keys flood's publisher may be ahead of the daemon: the keys' memory is measured, not a backlog's
(with Mosquitto 2.0.11 the daemon's unconfirmed backlog is not bounded by the broker's window; see the speed part)."""
"""Distinct payloads the keys flood cycles through (key i sends body i % BODIES: sample(i % BODIES, 0))."""


def flood_keys(args, failures: list[str]) -> dict:
    keys = args.keys or (20_000 if args.quick else 1_000_000)
    max_streams = args.max_streams or (1_000 if args.quick else 10_000)
    bodies = [json.dumps(payload(b, None)).encode() for b in range(BODIES)]
    probes = [max_streams + 1, keys // 2 + 7, keys - 3, keys - 1]
    with Rig(keep=args.keep, prefix="edgernn-flood-keys-") as rig:
        rig.start(pipeline=f"max_streams = {max_streams}", **({"broker": f'protocol = "{args.protocol}"'} if args.protocol else {}))
        probe_clients = {i: rig.client(subscribe=f"predictions/k{i}/imu") for i in probes}
        publisher = rig.client()
        started = time.monotonic()
        with Sampler(rig, 0.5) as sampler:
            def paced():
                """Each key's message, at most `KEYS_LEAD` ahead of the daemon's predictions (last scrape)."""
                for i in range(keys):
                    while i % 1000 == 0 and sampler.rows and i - sampler.rows[-1]["out"] > KEYS_LEAD:
                        time.sleep(0.05)
                    yield f"sensors/k{i}/imu", bodies[i % BODIES]
            publish_all(publisher, paced(), window=WINDOW)
            published = time.monotonic() - started
            wait_for(lambda: sampler.rows[-1]["out"] >= keys if sampler.rows else False, 120 + keys / 500)
            drained = time.monotonic() - started
            time.sleep(1.5)  # streams_live is set once a second
        values = rig.metrics()
        rows = sampler.rows
        series = []
        for step in range(1, 21):
            mark = keys * step / 20
            row = next((r for r in rows if r["in"] >= mark), rows[-1])
            series.append({"taken_in": int(row["in"]), "rss_mib": row["rss"] / MiB, "streams_live": int(row["live"])})
        growth = rss_growth(rows, keys)
        counts = {name: int(metric(values, f"edgernn_{name}", pipeline="imu")) for name in
                  ("messages_in_total", "messages_out_total", "duplicates_total", "evictions_total", "streams_live")}
        counts["rejected_total"] = int(sum(v for k, v in values.items() if k.startswith("edgernn_rejected_total")))
        counts["queue_dropped_total"] = int(metric(values, "edgernn_queue_dropped_total"))
        expected = {"messages_in_total": keys, "messages_out_total": keys, "duplicates_total": 0,
                    "evictions_total": keys - max_streams, "streams_live": max_streams, "rejected_total": 0,
                    "queue_dropped_total": 0}
        for name, want in expected.items():
            if counts[name] != want:
                failures.append(f"keys: {name} = {counts[name]}, expected {want}")
        check_growth(growth, failures, "keys", args.quick)
        worst = 0.0
        for i, client in probe_clients.items():
            got = client.wait_for(1, timeout=30)
            if len(got) != 1:
                failures.append(f"keys: probe k{i} got {len(got)} predictions, expected 1")
                continue
            y = np.array(json.loads(got[0][1])["y"], np.float32)
            worst = max(worst, float(np.max(np.abs(y - first_step(rig.model, sample(i % BODIES, 0))))))
        if worst > 1e-5:
            failures.append(f"keys: a probe's prediction differs from one offline step by {worst:.3g}")
        alive_and_connected(rig, failures, "keys")
        events = log_events(rig)
    return {"keys": keys, "log_events": events, "max_streams": max_streams, "counts": counts, "rss_series": series, "rss_growth": growth,
            "probe_max_abs_error": worst, "seconds": {"publish": published, "drain": drained},
            "publish_per_s": keys / published, "daemon_per_s": keys / drained}


# ---- sizes --------------------------------------------------------------------------------------------
MAX_PAYLOAD = 4096
BROKER_LIMIT = 1_000_000


def padded(body: bytes, size: int) -> bytes:
    """``body`` with whitespace around it up to exactly ``size`` bytes (still the same JSON object)."""
    room = size - len(body)
    return b" " * (room // 2) + body + b"\n" * (room - room // 2)


def flood_sizes(args, failures: list[str]) -> dict:
    key_index = 7
    body0 = json.dumps(payload(key_index, 0)).encode()
    body1 = json.dumps(payload(key_index, 1)).encode()
    sends = [("at max_payload_bytes", padded(body0, MAX_PAYLOAD)), ("max + 1", padded(body1, MAX_PAYLOAD + 1)),
             ("10 x max", padded(body1, 10 * MAX_PAYLOAD)), ("100 x max", padded(body1, 100 * MAX_PAYLOAD)),
             ("broker limit + 1", padded(body1, BROKER_LIMIT + 1)), ("plain", body1)]
    with Rig(keep=args.keep, prefix="edgernn-flood-sizes-") as rig:
        rig.start(broker_config=f"message_size_limit {BROKER_LIMIT}\n",
                  pipeline=f'max_payload_bytes = {MAX_PAYLOAD}\ndead_letter = "edgernn/{{pipeline}}/dead"')
        predictions = rig.client(subscribe="predictions/+/imu")
        dead = rig.client(subscribe="edgernn/imu/dead")
        rss_before = rig.rss()
        publisher = rig.client()
        started = time.monotonic()
        for name, body in sends:  # one at a time: each confirmed by the broker before the next
            if name == "broker limit + 1":
                # Mosquitto 2.0.11 drops it and answers an MQTT 3.1.1 client with an MQTT 5 PUBACK (reason code
                # 0x95), which paho takes for a protocol error: that client's connection is lost. Its own client.
                dropper = rig.client()
                publish_all(dropper, [("sensors/big/imu", body)], window=1)
                wait_for(lambda: not dropper.client.is_connected(), 3, period=0.1)
                dropper_kept = dropper.client.is_connected()
                continue
            publish_all(publisher, [("sensors/big/imu", body)], window=1)
        predictions.wait_for(2, timeout=60)
        dead.wait_for(3, timeout=60)
        seconds = time.monotonic() - started
        time.sleep(0.5)
        values = rig.metrics()
        counts = {"messages_in": int(metric(values, "edgernn_messages_in_total", pipeline="imu")),
                  "oversize": int(metric(values, "edgernn_rejected_total", pipeline="imu", reason="oversize")),
                  "rejected_total": int(sum(v for k, v in values.items() if k.startswith("edgernn_rejected_total"))),
                  "predictions": int(metric(values, "edgernn_messages_out_total", pipeline="imu")),
                  "dead_letters": int(metric(values, "edgernn_dead_letters_total", pipeline="imu"))}
        for name, want in {"messages_in": 5, "oversize": 3, "rejected_total": 3, "predictions": 2,
                           "dead_letters": 3}.items():
            if counts[name] != want:
                failures.append(f"sizes: {name} = {counts[name]}, expected {want}")
        letters = [json.loads(body) for _, body in dead.messages]
        letter_sizes = [len(body) for _, body in dead.messages]
        kept = [len(base64.b64decode(letter["payload_base64"])) for letter in letters]
        if len(letters) != 3 or kept != [DEAD_LETTER_MAX_PAYLOAD] * 3 or \
                not all(letter["truncated"] and letter["reason"] == "oversize" for letter in letters):
            failures.append(f"sizes: dead letters {[(l.get('reason'), l.get('truncated')) for l in letters]} of "
                            f"{letter_sizes} bytes holding {kept} payload bytes (3 oversize ones truncated to {DEAD_LETTER_MAX_PAYLOAD} expected)")
        got = predictions.messages
        ys = np.array([json.loads(body)["y"] for _, body in got], np.float32)
        error = None
        if len(got) != 2:
            failures.append(f"sizes: {len(got)} predictions, expected 2")
        else:
            error = float(np.max(np.abs(ys - offline(rig.model, key_index, [0, 1]))))
            if error > 1e-5:
                failures.append(f"sizes: predictions differ from the offline run by {error:.3g}")
        alive_and_connected(rig, failures, "sizes")
        rss_after = rig.rss()
        events = log_events(rig)
    return {"max_payload_bytes": MAX_PAYLOAD, "log_events": events, "broker_message_size_limit": BROKER_LIMIT,
            "sent": [[name, len(body)] for name, body in sends], "counts": counts,
            "dead_letter_bytes": letter_sizes, "max_abs_error": error,
            "broker_limit_publisher_kept_connection": dropper_kept,
            "rss_mib": {"before": rss_before / MiB, "after": rss_after / MiB}, "seconds": seconds}


# ---- speed --------------------------------------------------------------------------------------------
QUEUE_BOUND = 2000
QOS0_BOUND = 50


def sys_dropped(rig: Rig) -> int | None:
    """Mosquitto's count of messages it dropped (``$SYS/broker/publish/messages/dropped``, every second)."""
    watcher = rig.client(subscribe="$SYS/broker/publish/messages/dropped")
    got = watcher.wait_for(1, timeout=5)
    return int(got[-1][1]) if got else None


def flood_speed(args, failures: list[str]) -> dict:
    n = args.messages or (5_000 if args.quick else 200_000)
    streams = args.streams or (200 if args.quick else 500)
    per_stream = -(-n // streams)
    model = random_model("lstm", input_size=3, hidden=args.hidden, layers=2, head=(2,), gain=0.9)
    messages = [(f"sensors/s{k}/imu", json.dumps(payload(k, seq)).encode())
                for seq in range(per_stream) for k in range(streams)][:n]
    results = {"messages": n, "streams": streams, "model": f"lstm 2 x {args.hidden}",
               "broker_window": args.broker_window if args.broker_window is not None else "mosquitto default (20)"}
    with Rig(keep=args.keep, prefix="edgernn-flood-speed-") as rig:
        edgernn.save(model, rig.folder / "slow.ern")
        window = "" if args.broker_window is None else f"max_inflight_messages {args.broker_window}\n"
        rig.start(model_path=rig.folder / "slow.ern", broker_config=window,
                  daemon=f"max_undelivered_messages = {QUEUE_BOUND}")
        collector = rig.client(subscribe="predictions/+/imu")
        publisher = rig.client()
        started = time.monotonic()
        with Sampler(rig, 0.25) as sampler:
            publish_all(publisher, messages, window=WINDOW)
            published = time.monotonic() - started
            wait_for(lambda: sampler.rows[-1]["out"] >= n if sampler.rows else False, 120 + n / 100)
            drained = time.monotonic() - started
        collector.wait_for(n, timeout=60)
        rows = sampler.rows
        depth = max(r["depth"] for r in rows)
        growth = rss_growth(rows, n)
        seen: dict = {}
        for _, body in collector.messages:
            prediction = json.loads(body)
            seen.setdefault((prediction["key"], prediction["seq"]), []).append(prediction["y"])
        repeats = sum(len(v) - 1 for v in seen.values())
        differing = sum(any(y != v[0] for y in v) for v in seen.values())
        values = rig.metrics()
        out = int(metric(values, "edgernn_messages_out_total", pipeline="imu"))
        duplicates = int(metric(values, "edgernn_duplicates_total", pipeline="imu"))
        if depth > 2 * QUEUE_BOUND:  # twice: while a snapshot waits for confirmations (runtime/scheduler.py Inbox)
            failures.append(f"speed: queue depth reached {depth:.0f} > 2 x max_undelivered_messages {QUEUE_BOUND}")
        check_growth(growth, failures, "speed", args.quick)
        if len(seen) != n or out != n or duplicates or differing:
            failures.append(f"speed: {len(seen)} distinct (key, seq) predicted, {out} published, {duplicates} "
                            f"duplicates, {differing} repeats differing (expected {n}, {n}, 0, 0)")
        worst = 0.0
        for k in (0, 1, streams // 2, streams - 1):
            seqs = [s for s in range(per_stream) if s * streams + k < n]
            if any((f"s{k}", s) not in seen for s in seqs):
                continue  # counted above
            got = np.array([seen[(f"s{k}", s)][-1] for s in seqs], np.float32)
            worst = max(worst, float(np.max(np.abs(got - offline(model, k, seqs)))))
        if worst > 1e-5:
            failures.append(f"speed: predictions differ from the offline run by {worst:.3g}")
        alive_and_connected(rig, failures, "speed")
        results["qos1"] = {"log_events": log_events(rig),
            "max_undelivered_messages": QUEUE_BOUND, "max_queue_depth": depth,
            "queue_depth_series": [[round(r["t"], 2), r["depth"]] for r in rows],
            "rss_series_mib": [[round(r["t"], 2), round(r["rss"] / MiB, 1)] for r in rows],
            "rss_growth": growth, "predicted_distinct": len(seen), "predictions_published": out,
            "repeats_received": repeats, "max_abs_error": worst,
            "seconds": {"publish": published, "drain": drained},
            "publish_per_s": n / published, "daemon_per_s": n / drained}

    with Rig(keep=args.keep, prefix="edgernn-flood-qos0-") as rig:
        edgernn.save(model, rig.folder / "slow.ern")
        rig.start(model_path=rig.folder / "slow.ern", broker_config="sys_interval 1\n",
                  daemon=f"max_undelivered_messages = {QOS0_BOUND}")
        collector = rig.client(subscribe="predictions/+/imu")
        dropped_before = sys_dropped(rig) or 0
        publisher = rig.client()
        started = time.monotonic()
        with Sampler(rig, 0.25) as sampler:
            publish_all(publisher, messages, qos=0, window=WINDOW)  # delivered at QoS 0 (the lower of the two)
            published = time.monotonic() - started

            def settled() -> bool:  # nothing arrives any more and the inbox is empty
                rows = sampler.rows
                return len(rows) > 8 and rows[-1]["depth"] == 0 and \
                    rows[-1]["in"] + rows[-1]["dropped"] == rows[-8]["in"] + rows[-8]["dropped"]
            wait_for(settled, 120 + n / 100)
            drained = time.monotonic() - started
        time.sleep(2.5)  # $SYS is published every second
        broker_dropped = (sys_dropped(rig) or 0) - dropped_before
        values = rig.metrics()
        taken = int(metric(values, "edgernn_messages_in_total", pipeline="imu"))
        queue_dropped = int(metric(values, "edgernn_queue_dropped_total"))
        out = int(metric(values, "edgernn_messages_out_total", pipeline="imu"))
        duplicates = int(metric(values, "edgernn_duplicates_total", pipeline="imu"))
        depth = max(r["depth"] for r in sampler.rows)
        if taken + queue_dropped + broker_dropped != n:
            failures.append(f"speed qos0: messages_in {taken} + queue_dropped {queue_dropped} + broker dropped "
                            f"{broker_dropped} != published {n}")
        if queue_dropped == 0:
            failures.append("speed qos0: the inbox never overflowed (the publisher was not faster than the daemon)")
        if out + duplicates != taken or depth > QOS0_BOUND:
            failures.append(f"speed qos0: {out} predictions + {duplicates} duplicates for {taken} taken in; max depth "
                            f"{depth} (bound {QOS0_BOUND})")
        alive_and_connected(rig, failures, "speed qos0")
        results["qos0"] = {"log_events": log_events(rig),"max_undelivered_messages": QOS0_BOUND, "published": n, "messages_in": taken,
                           "queue_dropped": queue_dropped, "broker_dropped": broker_dropped, "predictions": out,
                           "predictions_received": len(collector.messages), "max_queue_depth": depth,
                           "seq_gaps": int(metric(values, "edgernn_seq_gaps_total", pipeline="imu")),
                           "rss_growth": rss_growth(sampler.rows, taken),
                           "seconds": {"publish": published, "settled": drained}}
    return results


def report(results: dict) -> None:
    keys = results.get("keys")
    if keys:
        c = keys["counts"]
        print(f"keys: {keys['keys']} keys, max_streams {keys['max_streams']}: in {c['messages_in_total']}, "
              f"predicted {c['messages_out_total']}, evictions {c['evictions_total']}, live {c['streams_live']}, "
              f"rejected {c['rejected_total']}, queue dropped {c['queue_dropped_total']}")
        print("  RSS (MiB) per 1/20 of the keys taken in: " + " ".join(f"{r['rss_mib']:.0f}" for r in keys["rss_series"]))
        g = keys["rss_growth"]
        print(f"  first half peak {g['first_half_peak_mib']:.1f} MiB, second half peak {g['second_half_peak_mib']:.1f} "
              f"MiB ({g['growth_mib']:+.1f} MiB); publish {keys['publish_per_s']:.0f} msg/s, daemon "
              f"{keys['daemon_per_s']:.0f} msg/s, {keys['seconds']['drain']:.0f} s")
    sizes = results.get("sizes")
    if sizes:
        print(f"sizes: sent {sizes['sent']}; {sizes['counts']}; dead letters {sizes['dead_letter_bytes']} bytes; "
              f"RSS {sizes['rss_mib']['before']:.1f} -> {sizes['rss_mib']['after']:.1f} MiB")
    speed = results.get("speed")
    if speed:
        q1, q0 = speed["qos1"], speed["qos0"]
        g = q1["rss_growth"]
        print(f"speed ({speed['model']}, {speed['messages']} messages over {speed['streams']} streams): QoS 1: "
              f"publish {q1['publish_per_s']:.0f} msg/s, daemon {q1['daemon_per_s']:.0f} msg/s, max queue depth "
              f"{q1['max_queue_depth']:.0f}/{q1['max_undelivered_messages']}, RSS {g['first_half_peak_mib']:.1f} -> "
              f"{g['second_half_peak_mib']:.1f} MiB, {q1['predicted_distinct']} (key, seq) predicted, "
              f"max |y - offline| {q1['max_abs_error']:.2g}")
        print(f"  QoS 0 (inbox {q0['max_undelivered_messages']}): published {q0['published']} = in {q0['messages_in']} "
              f"+ queue dropped {q0['queue_dropped']} + broker dropped {q0['broker_dropped']}; max depth "
              f"{q0['max_queue_depth']:.0f}; predictions {q0['predictions']}")


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="part", help=f"{', '.join(PARTS)} (default: all)")
    parser.add_argument("--keys", type=int, help="distinct keys (default 1,000,000; quick 20,000)")
    parser.add_argument("--max-streams", type=int, help="max_streams (default 10,000; quick 1,000)")
    parser.add_argument("--messages", type=int, help="speed: messages (default 200,000; quick 5,000)")
    parser.add_argument("--streams", type=int, help="speed: streams (default 500; quick 200)")
    parser.add_argument("--protocol", choices=("3.1.1", "5"), help="the daemon's MQTT version (default: its default)")
    parser.add_argument("--broker-window", type=int, help="speed: Mosquitto's max_inflight_messages (default: "
                        "its default, 20; 0 = none, so the daemon's inbox is all that holds the flood back)")
    parser.add_argument("--hidden", type=int, default=1024, help="speed: LSTM width (2 layers)")
    args = parser.parse_args()
    parts = args.parts or list(PARTS)
    if set(parts) - set(PARTS):
        parser.error(f"parts: choose from {', '.join(PARTS)}")
    failures: list[str] = []
    results: dict = {"quick": args.quick, "parts": parts}
    started = time.monotonic()
    for part in parts:
        part_started = time.monotonic()
        results[part] = {"keys": flood_keys, "sizes": flood_sizes, "speed": flood_speed}[part](args, failures)
        results[part]["part_seconds"] = time.monotonic() - part_started
        print(f"{part}: done in {results[part]['part_seconds']:.0f} s", flush=True)
    results["seconds"] = time.monotonic() - started
    report(results)
    return finish("flood", results, failures, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
