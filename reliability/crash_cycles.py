"""Crash cycles: `edgernn serve` killed with SIGKILL at random moments while devices stream, and restarted.

What runs: a Mosquitto of its own, the daemon as a process (a random GRU, QoS 1 in and out), a publisher of
``--streams`` streams at ``--rate`` Hz each (QoS 1, seq 0, 1, 2, ... straight to the broker, never
pausing) and a persistent-session collector of every prediction. ``--cycles`` times (seeded by ``--seed``)
the daemon is killed with SIGKILL and started again at once; at the end the publisher stops, the
backlog drains, and the daemon stops with SIGTERM. Both durabilities run, one after the other:

- ``journal`` (``snapshot_interval`` 2 s, so kills also land in journal rotations): each kill comes a
  random 0.2 .. 3 s after the process started, so some land during its start-up (imports, journal
  replay, re-publication, connecting) and the others while it serves. Passed: every stream's
  predictions, every seq of it, equal the uninterrupted offline run (atol 1e-5), repeats included
  (`common.explain`: each prediction's state is found by replaying the samples offline), and the daemon
  never counted a seq gap or a missed sample.
- ``snapshot`` (``snapshot_interval`` ``--snapshot-interval``, 1 s): each kill comes a random 0.5 ..
  0.5 + 2 x interval s after every stream got its first prediction from the new process. The states go
  back to the snapshot; the inputs acked since then are gone from the broker, so each stream's first
  input after the restart is a gap. The loss of each kill is measured three ways, which must agree:
  (1) from the snapshot file left by the kill: per stream, s - L - 1 with L the last seq the snapshot
  holds and s the first seq the next process predicted; (2) from the predictions alone: the first
  prediction after the restart equals sample s stepped on the stream's state after seq L, not after
  s - 1 (`common.explain` searches the earlier states), a loss of s - L - 1; (3) the daemon's
  ``edgernn_samples_missed_total``, scraped from the next process once every stream resumed. Passed:
  the three agree for every kill; no stream lost more than it published between the snapshot's
  write and the kill, plus 20 (Mosquitto's in-flight window: inputs sent before the snapshot and acked
  after it); no loss anywhere else; every seq predicted and explained. The first kill waits for the
  first snapshot: a stream absent from the snapshot starts from the rest state, which no seq gap shows
  (the ``unclean_stop`` warning says so instead).

Reported: cycles, messages published and predictions received, kills, the recovery time of each restart
(process start -> first prediction received from it), and the loss per kill (snapshot mode).

Run from the repository root::

    .venv/bin/python reliability/crash_cycles.py --json benchmarks/results/reliability/crash_cycles.json
    .venv/bin/python reliability/crash_cycles.py --quick       # 5 cycles per mode, what `make test` runs
"""

from __future__ import annotations

import signal
import threading
import time

from common import (Collector, DaemonProcess, Rig, StreamPublisher, arguments, explain, finish,  # first: paths
                    metric, percentiles, scrape, wait_until)

import numpy as np

from edgernn.runtime.pipeline import STREAM_COLUMNS
from edgernn.streams import StreamTable

INFLIGHT = 20
"""Mosquitto's ``max_inflight_messages`` default: QoS 1 inputs sent to the daemon before a snapshot may be
acked after it."""
JOURNAL_SNAPSHOT_INTERVAL = 2.0
KILL_DELAY = (0.2, 3.0)
"""Journal mode: seconds from the process start to the kill."""


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50, help="kills per durability (default 50)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rate", type=float, default=20.0, help="samples per second per stream (default 20)")
    parser.add_argument("--snapshot-interval", type=float, default=1.0, help="snapshot mode's (default 1 s)")
    parser.add_argument("--mode", choices=("both", "journal", "snapshot"), default="both")
    args = parser.parse_args()
    if args.quick:
        args.cycles = 5
    results, failures = {"cycles": args.cycles, "streams": args.streams, "rate_hz": args.rate,
                         "seed": args.seed}, []
    for mode in ("journal", "snapshot") if args.mode == "both" else (args.mode,):
        started = time.monotonic()
        print(f"crash_cycles: durability={mode}, {args.cycles} kills, {args.streams} streams x {args.rate:g} Hz",
              flush=True)
        outcome, problems = run(args, mode)
        outcome["wall_s"] = round(time.monotonic() - started, 1)
        results[mode] = outcome
        failures += [f"{mode}: {problem}" for problem in problems]
        _print_summary(mode, outcome)
    return finish("crash_cycles", results, failures, args.json)


def run(args, mode: str) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(args.seed)
    interval = JOURNAL_SNAPSHOT_INTERVAL if mode == "journal" else args.snapshot_interval
    failures: list[str] = []
    with Rig(keep=args.keep, prefix=f"edgernn-crash-{mode}-") as rig:
        launched = time.monotonic()
        rig.start(state=f'durability = "{mode}"\nsnapshot_interval = {interval}')
        snapshot_path = rig.folder / "state" / "imu.snapshot"
        collector = Collector(rig.broker.port)
        publisher = StreamPublisher(rig.broker.port, args.streams, args.rate).start()
        runs = [{"began": launched}]  # one per process: start time, scrape before its kill, its recovery
        kills = []
        try:
            if mode == "snapshot" and not wait_until(snapshot_path.exists, 30):
                return {}, ["no snapshot was written within 30 s"]
            for cycle in range(args.cycles):
                if mode == "journal":
                    kill = _kill_journal_run(rig, runs[-1], rng, cycle)
                else:
                    kill = _kill_snapshot_run(rig, runs[-1], rng, collector, publisher, interval)
                    if kill is None:
                        failures.append(f"cycle {cycle}: the process did not resume every stream within 60 s")
                        break
                kills.append(kill)
                time.sleep(0.3)  # what the killed process had sent reaches the collector before the next starts
                runs.append({"began": time.monotonic()})
                if mode == "journal" and cycle + 1 < args.cycles:
                    continue  # the next kill starts that process itself
                rig.restart()
            last = runs[-1]
            if not wait_until(lambda: collector.resumed(args.streams, last["began"]), 60):
                failures.append("the last process did not resume every stream within 60 s")
            sent = publisher.stop()
            expected = args.streams * sent
            if collector.wait_for_distinct(expected, 120) < expected:
                failures.append(f"predictions for {collector.wait_for_distinct(expected, 0)} of {expected} samples "
                                "arrived within 120 s of the end")
            last["scrape"] = rig.metrics()
            rig.terminate(failures)
        finally:
            publisher.stop()
            collector.close()
        for run_ in runs:
            first = collector.first_arrival_after(run_["began"])
            run_["recovery_s"] = None if first is None or (run_.get("killed") and first > run_["killed"]) \
                else round(first - run_["began"], 3)
        copies = collector.copies()
        histories = [explain(rig.model, k, copies.get(f"dev{k}", {}), sent) for k in range(args.streams)]
        outcome = _outcome(runs, kills, histories, sent, args.streams)
        if mode == "journal":
            failures += _journal_verdict(histories, runs)
        else:
            failures += _snapshot_verdict(histories, runs, kills, copies, outcome)
        return outcome, failures


# ---- one cycle ----------------------------------------------------------------------------------------------
def _kill_journal_run(rig, run: dict, rng, cycle: int) -> dict:
    """Kill the running process (cycle 0) or start the next one, a random time after its process start."""
    delay = float(rng.uniform(*KILL_DELAY))
    if cycle == 0:  # the first process was started by the rig: kill it from now
        delay = max(0.0, delay - (time.monotonic() - run["began"]))
        time.sleep(delay)
        run["scrape"] = _scrape(rig)
        return _kill(rig, run)
    daemon = rig.daemon = DaemonProcess(rig.config_path, rig.folder / "daemon.log")
    timer = threading.Timer(delay, _scrape_and_kill, [rig, daemon, run])
    timer.start()
    try:
        daemon.start()
        run["served"] = True
    except RuntimeError:  # killed during its start-up
        if daemon.process is None or daemon.process.poll() != -signal.SIGKILL:
            timer.cancel()
            raise
        run["served"] = False
    timer.join()
    return _kill(rig, run, delay=delay)


def _scrape_and_kill(rig, daemon: DaemonProcess, run: dict) -> None:
    run["scrape"] = _scrape(rig)
    run["killed"] = time.monotonic()
    if daemon.process is not None:
        daemon.process.kill()


def _kill_snapshot_run(rig, run: dict, rng, collector, publisher, interval: float) -> dict | None:
    """Wait until every stream resumed (None if one did not), dwell a random while, scrape, kill; read what
    the snapshot left by the kill holds."""
    if not wait_until(lambda: collector.resumed(publisher.streams, run["began"]), 60):
        return None
    time.sleep(0.5 + float(rng.uniform(0, 2 * interval)))
    run["scrape"] = _scrape(rig)
    kill = _kill(rig, run)
    path = rig.folder / "state" / "imu.snapshot"
    kill["snapshot_written"] = path.stat().st_mtime
    kill["published_since_snapshot"] = publisher.published_between(kill["snapshot_written"], kill["wall"])
    kill["snapshot_seqs"] = _snapshot_seqs(rig.model, path, publisher.streams)
    return kill


def _kill(rig, run: dict, delay: float | None = None) -> dict:
    run.setdefault("killed", time.monotonic())
    wall = time.time()
    rig.daemon.kill()
    return {"wall": wall, "delay_s": None if delay is None else round(delay, 3)}


def _scrape(rig) -> dict | None:
    try:
        return scrape(rig.metrics_port, timeout=1.0)
    except OSError:  # not serving metrics yet (killed during its start-up)
        return None


def _snapshot_seqs(model, path, streams: int) -> dict[str, int]:
    """The last seq of each stream in the snapshot file (-1: not in it)."""
    table = StreamTable(model, columns=STREAM_COLUMNS)
    table.restore(path)
    keys = [f"dev{k}" for k in range(streams)]
    slots = table.peek_slots(keys)
    return {key: int(table.columns["seq"][slot]) if slot >= 0 else -1 for key, slot in zip(keys, slots)}


# ---- verdicts ----------------------------------------------------------------------------------------------
def _outcome(runs, kills, histories, sent: int, streams: int) -> dict:
    recoveries = [run["recovery_s"] for run in runs[1:] if run["recovery_s"] is not None]
    return {
        "kills": len(kills),
        "samples_per_stream": sent,
        "messages_published": streams * sent,
        "predictions_received": sum(h.copies for h in histories),
        "repeats": sum(h.copies for h in histories) - streams * sent + sum(len(h.unpredicted) for h in histories),
        "killed_during_start_up": sum(1 for run in runs if run.get("served") is False),
        "kill_delay_s": [kill["delay_s"] for kill in kills if kill.get("delay_s") is not None],
        "recovery_s": {"count": len(recoveries), **percentiles(recoveries, (50, 90, 100)),
                       "each": [run["recovery_s"] for run in runs[1:]]},
        "max_abs_error": max(h.max_abs_error for h in histories),
        "unpredicted": sum(len(h.unpredicted) for h in histories),
        "unexplained": sum(len(h.unexplained) for h in histories),
    }


def _counter(run: dict, name: str) -> float | None:
    return None if run.get("scrape") is None else metric(run["scrape"], name, pipeline="imu")


def _journal_verdict(histories, runs) -> list[str]:
    failures = [f"{h.key}: not the uninterrupted run: losses {h.losses[:5]}, unpredicted {h.unpredicted[:5]}, "
                f"unexplained {h.unexplained[:5]}, differing repeats {h.repeats_differing}"
                for h in histories if not h.exact]
    for name in ("edgernn_samples_missed_total", "edgernn_seq_gaps_total"):
        counted = [_counter(run, name) for run in runs]
        if any(counted):
            failures.append(f"{name} per process: {counted} (the journal loses nothing)")
    return failures


def _snapshot_verdict(histories, runs, kills, copies, outcome) -> list[str]:
    failures = []
    losses = {h.key: dict(h.losses) for h in histories}
    accounted = {h.key: set() for h in histories}
    per_kill = []
    for number, (kill, run) in enumerate(zip(kills, runs[1:])):
        end = run.get("killed", float("inf"))
        row = {"kill": number, "snapshot_age_s": round(kill["wall"] - kill["snapshot_written"], 3),
               "from_snapshot": 0, "from_predictions": 0, "counted": _counter(run, "edgernn_samples_missed_total"),
               "worst_stream": 0, "worst_bound": 0}
        for key, last in kill["snapshot_seqs"].items():
            seqs = [seq for seq, got in copies.get(key, {}).items() if any(run["began"] < t <= end for t, _ in got)]
            if not seqs:
                failures.append(f"kill {number}: {key} got no prediction from the next process")
                continue
            first = min(seqs)
            from_snapshot = first - last - 1 if last >= 0 else 0
            from_predictions = losses[key].get(first, 0)
            accounted[key].add(first)
            bound = kill["published_since_snapshot"] + INFLIGHT
            row["from_snapshot"] += from_snapshot
            row["from_predictions"] += from_predictions
            if from_snapshot > row["worst_stream"]:
                row["worst_stream"], row["worst_bound"] = from_snapshot, bound
            if from_snapshot != from_predictions:
                failures.append(f"kill {number}: {key}: the snapshot says {from_snapshot} samples missing, the "
                                f"predictions say {from_predictions}")
            if from_snapshot > bound:
                failures.append(f"kill {number}: {key} lost {from_snapshot} samples, more than the "
                                f"{kill['published_since_snapshot']} published since the snapshot + {INFLIGHT}")
        if row["counted"] != row["from_snapshot"]:
            failures.append(f"kill {number}: edgernn_samples_missed_total of the next process is {row['counted']}, "
                            f"the snapshot and predictions say {row['from_snapshot']}")
        per_kill.append(row)
    for key, events in losses.items():
        stray = sorted(set(events) - accounted[key])
        if stray:
            failures.append(f"{key}: losses at seqs {stray[:5]} that no kill explains")
    failures += [f"{h.key}: seqs {h.unpredicted[:5]} never predicted" for h in histories if h.unpredicted]
    failures += [f"{h.key}: predictions for seqs {h.unexplained[:5]} match no state of the stream"
                 for h in histories if h.unexplained]
    missing = [row["from_snapshot"] for row in per_kill]
    outcome["loss_per_kill"] = {"samples": missing, "mean": round(float(np.mean(missing)), 2) if missing else None,
                                "max": max(missing, default=None), "total": int(sum(missing)),
                                "snapshot_age_s": percentiles([r["snapshot_age_s"] for r in per_kill], (50, 100))}
    outcome["per_kill"] = per_kill
    return failures


def _print_summary(mode: str, outcome: dict) -> None:
    if not outcome:
        return
    recovery = outcome["recovery_s"]
    print(f"  {outcome['kills']} kills, {outcome['messages_published']} messages, "
          f"{outcome['predictions_received']} predictions received ({outcome['repeats']} repeats), "
          f"recovery p50 {recovery['p50']} s, max {recovery['p100']} s, wall {outcome['wall_s']} s", flush=True)
    if "loss_per_kill" in outcome:
        loss = outcome["loss_per_kill"]
        print(f"  loss per kill (samples, all streams): mean {loss['mean']}, max {loss['max']}, total "
              f"{loss['total']}; snapshot age at the kill p50 {loss['snapshot_age_s']['p50']} s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
