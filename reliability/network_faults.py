"""Network faults: the broker restarts, the daemon's connection is cut, silently dropped, or refused for a
minute, while devices keep publishing -- the daemon recovers by itself and every stream resumes.

What runs: a Mosquitto of its own; `edgernn serve` as a process, connected through `tcp_proxy.TcpProxy`
(the faults' switch) with ``keepalive = 2`` and reconnects every 1 .. 2 s (``min/max_reconnect_interval``;
the defaults are 1 .. 30 s); a publisher of ``--streams`` streams at ``--rate`` Hz (QoS 1, seq, straight
to the broker: their samples queue in the daemon's persistent session while it is away) and a
persistent-session collector of every prediction. The faults, one after the other, ``--settle`` s apart:

- ``connection_cut``: the proxy resets the daemon's connection (RST both ways);
- ``silent_drop``: the proxy passes nothing for ``--silent`` s (quick 6 s) and keeps the connection
  open, as a pulled cable does: only the MQTT keepalive notices; at the end the held connections are reset;
- ``refused``: the proxy stops listening for ``--refused`` s (60 s; quick 5 s): every connect gets ECONNREFUSED;
- ``broker_restart``: Mosquitto stopped (SIGTERM: it saves its sessions) and started on the same port
  ``--outage`` s later;
- ``broker_kill``: Mosquitto killed (SIGKILL) and started again ``--outage`` s later. It comes back with
  the sessions it saved at the restart before: what it held only in memory -- inputs it had acked to the
  publisher, predictions it had acked to the daemon -- is gone with it. Not the daemon's loss, but the
  daemon must see it: each stream's next input is a seq gap, counted in ``edgernn_samples_missed_total``.

Measured per fault: the outage; reconnect_s (the fault ends -> the proxy relays the daemon's new
connection to the broker); first_prediction_s (the fault ends -> the first prediction after that
reconnect); the backlog (samples published, all streams, from the fault to the reconnect) and
caught_up_s (the reconnect -> every stream has its prediction for the last sample published before the
reconnect); the daemon's ``edgernn_reconnects_total`` over the fault (from its metrics).

Passed means: after every fault the daemon reconnected by itself (reconnects >= 1, ``edgernn_connected``
1) and every stream caught up within 120 s; at the end, replaying each stream's samples offline
(`common.explain`), every prediction equals the uninterrupted run (atol 1e-5, repeats identical) --
except across ``broker_kill``, where only the samples the broker lost may be missing from the states
(each found by the first prediction after it being computed from the older state) and their count
equals the daemon's ``edgernn_samples_missed_total`` over that fault; nothing rejected or dropped; the
daemon exits 0 on SIGTERM. Real packet loss and latency (``tc netem``) are not simulated: netem on the
loopback would slow every process on the machine, and a namespace of the daemon's own is more moving
parts than the faults above need (loss a TCP retransmit hides is latency; a lasting loss is the silent drop).

Run from the repository root::

    .venv/bin/python reliability/network_faults.py --json benchmarks/results/reliability/network_faults.json
    .venv/bin/python reliability/network_faults.py --quick     # short outages, what `make test` runs
"""

from __future__ import annotations

import time

from common import Collector, Rig, StreamPublisher, arguments, explain, finish, metric, wait_until  # first: paths

from tcp_proxy import TcpProxy

CATCH_UP_TIMEOUT = 120.0


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rate", type=float, default=20.0, help="samples per second per stream (default 20)")
    parser.add_argument("--refused", type=float, default=60.0, help="seconds the broker refuses (default 60)")
    parser.add_argument("--silent", type=float, default=30.0, help="seconds of the silent drop (default 30)")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds the broker is down (default 5)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of normal streaming between faults")
    args = parser.parse_args()
    if args.quick:
        args.refused, args.silent, args.outage, args.settle = 5.0, 6.0, 2.0, 1.5

    failures: list[str] = []
    proxy = TcpProxy()
    with Rig(keep=args.keep, prefix="edgernn-network-") as rig:
        rig.start(via=proxy.start, broker="keepalive = 2")
        collector = Collector(rig.broker.port)
        publisher = StreamPublisher(rig.broker.port, args.streams, args.rate).start()
        broker = rig.broker
        faults = [  # name, start it, end it, seconds between, whether the broker may lose samples
            ("connection_cut", proxy.cut, lambda: None, 0.0, False),
            ("silent_drop", proxy.blackhole, proxy.unblackhole, args.silent, False),
            ("refused", proxy.refuse, proxy.listen, args.refused, False),
            ("broker_restart", broker.stop, broker.start, args.outage, False),
            ("broker_kill", broker.kill, broker.start, args.outage, True),
            ("broker_kill_backlog", proxy.refuse, lambda: (broker.kill(), broker.start(), proxy.listen()),
             args.outage, True),
        ]
        print(f"network_faults: {args.streams} streams x {args.rate:g} Hz through a proxy; state in {rig.folder}",
              flush=True)
        results = {"streams": args.streams, "rate_hz": args.rate, "faults": {}}
        try:
            for name, begin, end, outage, lossy in faults:
                time.sleep(args.settle)
                figures = _fault(rig, proxy, collector, publisher, begin, end, outage, lossy)
                results["faults"][name] = figures
                failures += [f"{name}: {problem}" for problem in figures.pop("problems")]
                _print_row(name, figures)
            time.sleep(args.settle)
            sent = publisher.stop()
            if not wait_until(lambda: collector.caught_up(args.streams, sent), CATCH_UP_TIMEOUT):
                failures.append(f"the predictions of the last samples did not arrive within {CATCH_UP_TIMEOUT:g} s")
            time.sleep(1.0)  # repeats still on their way
            final = rig.metrics()
            rig.terminate(failures)
        finally:
            publisher.stop()
            collector.close()
            proxy.close()
        failures += _verdict(rig.model, collector, args.streams, sent, results, final)
    return finish("network_faults", results, failures, args.json)


def _fault(rig, proxy, collector, publisher, begin, end, outage: float, lossy: bool) -> dict:
    """One fault while the streams flow: its figures, and ``problems`` (an empty list when it passed)."""
    before = rig.metrics()
    started_wall, started = time.time(), time.monotonic()
    sent_before = publisher.sent
    begin()
    time.sleep(outage)
    end()
    ended = time.monotonic()
    problems = []
    reconnect = _wait_for(lambda: next((t for t in list(proxy.upstream_connects) if t > ended), None), 60)
    if reconnect is None:
        return {"problems": ["the daemon did not reconnect within 60 s"], "outage_s": round(ended - started, 3)}
    sent_at_reconnect = publisher.published_between(0, started_wall + (reconnect - started))
    first = _wait_for(lambda: collector.first_arrival_after(reconnect), 60)
    caught_up = wait_until(lambda: collector.caught_up(publisher.streams, sent_at_reconnect), CATCH_UP_TIMEOUT)
    caught_up_at = time.monotonic()
    after = rig.metrics()
    reconnects = metric(after, "edgernn_reconnects_total") - metric(before, "edgernn_reconnects_total")
    if not caught_up:
        problems.append(f"the streams did not catch up within {CATCH_UP_TIMEOUT:g} s of the reconnect")
    if reconnects < 1 or metric(after, "edgernn_connected") != 1:
        problems.append(f"reconnects {reconnects:g}, connected {metric(after, 'edgernn_connected'):g}")
    missed = (metric(after, "edgernn_samples_missed_total", pipeline="imu")
              - metric(before, "edgernn_samples_missed_total", pipeline="imu"))
    if missed and not lossy:
        problems.append(f"the daemon counted {missed:g} samples missing")
    return {
        "problems": problems,
        "lossy": lossy,
        "outage_s": round(ended - started, 3),
        "reconnect_s": round(reconnect - ended, 3),
        "first_prediction_s": None if first is None else round(first - ended, 3),
        "backlog_samples": (sent_at_reconnect - sent_before) * publisher.streams,
        "caught_up_s": round(caught_up_at - reconnect, 3) if caught_up else None,
        "reconnects": reconnects,
        "samples_missed": missed,
        "seqs": [sent_before, publisher.sent],  # samples published from the fault to the catch-up
    }


def _wait_for(find, seconds: float):
    """Poll ``find()`` until it gives something other than None (or ``seconds`` pass)."""
    deadline = time.monotonic() + seconds
    while (found := find()) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def _verdict(model, collector, streams: int, sent: int, results: dict, final: dict) -> list[str]:
    failures = []
    copies = collector.copies()
    histories = [explain(model, k, copies.get(f"dev{k}", {}), sent) for k in range(streams)]
    # Samples in flight at a broker kill went out a little before it: 50 seqs of margin before each window.
    windows = [(f["seqs"][0] - 50, f["seqs"][1]) for f in results["faults"].values() if f.get("lossy") and "seqs" in f]

    def excused(seq: int) -> bool:
        return any(low <= seq <= high for low, high in windows)

    lost = 0
    for h in histories:
        outside = [seq for seq, _ in h.losses if not excused(seq)]
        unpredicted = [seq for seq in h.unpredicted if not excused(seq)]
        if outside or unpredicted or h.unexplained:
            failures.append(f"{h.key}: not the uninterrupted run outside the broker kills: losses at {outside[:5]}, "
                            f"unpredicted {unpredicted[:5]}, unexplained {h.unexplained[:5]}")
        lost += sum(count for _, count in h.losses)
    counted = sum(f.get("samples_missed", 0) for f in results["faults"].values() if f.get("lossy"))
    if lost != counted:
        failures.append(f"the predictions say {lost} samples went missing, edgernn_samples_missed_total says {counted:g}")
    differing = sum(h.repeats_differing for h in histories)
    results.update({
        "samples_per_stream": sent,
        "messages_published": streams * sent,
        "predictions_received": sum(h.copies for h in histories),
        "unpredicted": sum(len(h.unpredicted) for h in histories),
        "samples_lost_at_the_broker": lost,
        "repeats_differing": differing,
        "max_abs_error": max(h.max_abs_error for h in histories),
        "reconnects_total": metric(final, "edgernn_reconnects_total"),
        "rejected": sum(v for k, v in final.items() if k.startswith("edgernn_rejected_total")),
        "queue_dropped": metric(final, "edgernn_queue_dropped_total"),
    })
    if results["rejected"] or results["queue_dropped"]:
        failures.append(f"rejected {results['rejected']:g}, dropped {results['queue_dropped']:g}")
    return failures


def _print_row(name: str, figures: dict) -> None:
    print(f"  {name:15} outage {figures.get('outage_s')} s, reconnect {figures.get('reconnect_s')} s, first prediction "
          f"{figures.get('first_prediction_s')} s, backlog {figures.get('backlog_samples')} samples caught up in "
          f"{figures.get('caught_up_s')} s, reconnects {figures.get('reconnects')}, missed "
          f"{figures.get('samples_missed')}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
