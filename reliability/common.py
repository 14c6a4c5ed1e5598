"""What the reliability scripts share: a Mosquitto and `edgernn serve` as real processes, the daemon's
metrics, RSS, percentiles and the report.

Each script imports this first: it puts ``tests/`` (the broker, the daemon harness, random models) and
``benchmarks/`` (process figures) on the path, so the scripts drive exactly what the test suite drives.
Everything runs in a temporary folder with its own Mosquitto on a free loopback port, never the system
broker.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for _folder in ("tests", "benchmarks"):
    if str(ROOT / _folder) not in sys.path:
        sys.path.insert(0, str(ROOT / _folder))

from numba_cache import use_test_cache  # noqa: E402

use_test_cache()  # before anything imports numba: the daemons load the tests' compiled kernels

import edgernn  # noqa: E402
from broker import Client, Mosquitto, free_port  # noqa: E402
from daemon_harness import DaemonProcess, payload, sample, wait_until, write_config, write_model  # noqa: E402
from proc import cpu_seconds, rss_bytes  # noqa: E402

__all__ = ["ROOT", "Client", "Mosquitto", "DaemonProcess", "Rig", "cpu_seconds", "rss_bytes", "scrape",
           "metric", "percentiles", "arguments", "finish", "wait_until", "write_config", "write_model",
           "StreamPublisher", "Collector", "StreamHistory", "explain", "publish_all", "log_events"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[str, float]:
    """The daemon's Prometheus page as ``{'name{labels}': value}`` (labels as printed, sorted by the client)."""
    page = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    values = {}
    for line in page.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def metric(values: dict[str, float], name: str, **labels) -> float:
    """One sample of a scrape, e.g. ``metric(m, "edgernn_rejected_total", pipeline="imu", reason="not_json")``;
    0 when absent (a labelled counter appears only once it has been incremented)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return values.get(f"{name}{{{label_text}}}" if labels else name, 0.0)


def percentiles(values, qs=(50, 99, 99.9)) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ..., "p99.9": ...}`` of ``values`` (None for each when there are none)."""
    values = np.asarray(list(values), dtype=float)
    return {f"p{q:g}": (float(np.percentile(values, q)) if values.size else None) for q in qs}


class Rig:
    """A temporary folder with a Mosquitto, a model file, a config and `edgernn serve` as a process.

    ``Rig(args).start(...)`` writes the config (extra TOML per table as `daemon_harness.write_config`
    takes it, plus a metrics endpoint on a free port) and starts both; ``daemon`` is the running
    `DaemonProcess` (``kill()``/``terminate()``, then ``restart()``); ``metrics()`` scrapes it.
    """

    def __init__(self, keep: bool = False, prefix: str = "edgernn-reliability-"):
        self._stack = ExitStack()
        self.folder = Path(tempfile.mkdtemp(prefix=prefix)) if keep else \
            Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        self.broker = None
        self.daemon = None
        self.model = None
        self.metrics_port = free_port()
        self.config_path = None

    def start(self, cell: str = "gru", input_size: int = 3, hidden: int = 12, head: tuple = (2,),
              broker_config: str = "", model_path: Path | None = None, via=None, **config_tables) -> "Rig":
        """Start the broker and the daemon: with a random ``cell`` model of these sizes (`write_model`),
        or with a copy of the model file at ``model_path``. ``model`` is the loaded model. ``via(broker
        port) -> port``: the daemon connects there instead (a proxy in front of the broker)."""
        self.broker = Mosquitto(self.folder / "broker", extra_config=broker_config).start()
        self._stack.callback(self.broker.stop)
        if model_path is None:
            self.model = write_model(self.folder / "model.ern", cell, input_size=input_size, hidden=hidden, head=head)
        else:
            shutil.copyfile(model_path, self.folder / "model.ern")
            self.model = edgernn.load(self.folder / "model.ern")
        metrics = f'listen = "127.0.0.1:{self.metrics_port}"\n' + config_tables.pop("metrics", "")
        port = self.broker.port if via is None else via(self.broker.port)
        self.config_path = write_config(self.folder, port, metrics=metrics,
                                        **{"log_level": "info", **config_tables})
        self.daemon = DaemonProcess(self.config_path, self.folder / "daemon.log").start()
        self._stack.callback(self._stop_daemon)
        return self

    def restart(self) -> DaemonProcess:
        """Start the daemon again (after ``daemon.kill()`` or ``daemon.terminate()``)."""
        self.daemon = DaemonProcess(self.config_path, self.folder / "daemon.log").start()
        return self.daemon

    def terminate(self, failures: list[str]) -> int:
        """SIGTERM the daemon and wait; a non-zero exit code is a failure of the run."""
        code = self.daemon.terminate()
        if code != 0:
            failures.append(f"the daemon exited with {code} on SIGTERM")
        return code

    def client(self, subscribe: str | None = None, client_id: str = "") -> Client:
        client = Client(self.broker.port, client_id=client_id, subscribe=subscribe)
        self._stack.callback(client.close)
        return client

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def rss(self) -> int:
        return rss_bytes(self.daemon.process.pid)

    def _stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.process.poll() is None:
            self.daemon.terminate()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every reliability script has: ``--quick`` (what `make test` runs), ``--json``, ``--seed``,
    ``--keep`` (leave the temporary folder, with the daemon's log, for a post-mortem)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (the test suite runs this)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (daemon log, state)")
    return parser


def finish(name: str, results: dict, failures: list[str], json_path: Path | None) -> int:
    """Print the verdict, write the JSON (results plus ``failures``), return the exit code (1 on failure)."""
    results = {"script": name, "passed": not failures, "failures": failures, **results}
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=float))
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"{name}: {'PASSED' if not failures else 'FAILED'}", flush=True)
    return 0 if not failures else 1


# ---- seq-numbered streams and what their predictions say (crash_cycles.py, network_faults.py) ------------
class StreamPublisher:
    """``streams`` devices (topic ``sensors/dev<k>/imu``) publishing `daemon_harness.payload` samples with seq
    0, 1, 2, ... at ``rate`` Hz each, QoS 1, from a thread, straight to the broker. Like firmware, it keeps
    what it cannot send while the broker is away and sends it in order once it is back: one message in
    flight at a time (`Client.publish_in_order`), since paho, left to queue them itself, may send a message
    published just after the reconnect before those it resends (seen: seqs 407..411 of every stream
    overtaken, then dropped by the daemon as duplicates). ``times[s]``: wall time seq s was due."""

    def __init__(self, port: int, streams: int, rate: float, input_size: int = 3, first: int = 0):
        self.client = Client(port)
        self.streams, self.rate, self.input_size = streams, rate, input_size
        self.first = first  # devices dev<first> .. dev<first + streams - 1>
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    @property
    def sent(self) -> int:
        """Samples per stream taken (seqs 0 .. sent - 1); `stop` returns once the broker has them all."""
        return len(self.times)

    def start(self) -> "StreamPublisher":
        self._thread.start()
        return self

    def _run(self) -> None:
        due, waiting = time.monotonic(), deque()
        while True:
            now = time.monotonic()
            while not self._stop.is_set() and due <= now:  # every sample due by now, in seq order
                seq = len(self.times)
                waiting.extend((f"sensors/dev{k}/imu", json.dumps(payload(k, seq, self.input_size)))
                               for k in range(self.first, self.first + self.streams))
                self.times.append(time.time() - (now - due))
                due += 1.0 / self.rate
            if waiting:
                self.client.publish_in_order(*waiting[0], timeout=600)
                waiting.popleft()
            elif self._stop.is_set():
                return
            else:
                self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self, timeout: float = 60.0) -> int:
        """Stop taking samples and wait until the broker has every one taken; returns `sent`. Idempotent."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout)
            self.client.close()
        return self.sent

    def published_between(self, start: float, end: float) -> int:
        """Samples per stream published in the wall-time interval (start, end]."""
        return bisect.bisect_right(self.times, end) - bisect.bisect_right(self.times, start)


class Collector(Client):
    """A persistent-session subscriber to ``predictions/#`` keeping every copy of every prediction with its
    arrival time (monotonic): the broker keeps what arrives while the collector itself is away."""

    def __init__(self, port: int, client_id: str = "reliability-collector"):
        self.arrivals: list[float] = []
        self.last_arrival: dict[str, float] = {}  # stream key -> its latest prediction's arrival
        self.highest_seq: dict[str, int] = {}  # stream key -> the highest seq predicted
        super().__init__(port, client_id=client_id, subscribe="predictions/#")

    def _on_message(self, client, userdata, message):
        arrived = time.monotonic()
        body = json.loads(message.payload)
        key, seq = body.get("key"), body.get("seq", -1)
        with self._received:
            self.arrivals.append(arrived)
            self.last_arrival[key] = arrived
            self.highest_seq[key] = max(seq, self.highest_seq.get(key, -1))
            super()._on_message(client, userdata, message)

    def copies(self) -> dict:
        """{key: {seq: [(arrival, y), ...]}}, copies in arrival order."""
        with self._received:
            messages, arrivals = list(self.messages), list(self.arrivals)
        out: dict = {}
        for (_, body), arrived in zip(messages, arrivals):
            body = json.loads(body)
            out.setdefault(body["key"], {}).setdefault(body["seq"], []).append((arrived, body["y"]))
        return out

    def first_arrival_after(self, moment: float) -> float | None:
        with self._received:
            index = bisect.bisect_right(self.arrivals, moment)
            return self.arrivals[index] if index < len(self.arrivals) else None

    def caught_up(self, streams: int, sent: int) -> bool:
        """Whether every stream ``dev0 .. dev<streams-1>`` has a prediction for seq ``sent - 1`` or later."""
        with self._received:
            return all(self.highest_seq.get(f"dev{k}", -1) >= sent - 1 for k in range(streams))

    def resumed(self, streams: int, since: float) -> bool:
        """Whether every stream ``dev0 .. dev<streams-1>`` got a prediction after ``since`` (monotonic)."""
        with self._received:
            return all(self.last_arrival.get(f"dev{k}", -1.0) > since for k in range(streams))


@dataclass
class StreamHistory:
    """What one stream's predictions say about the states they were computed from (see `explain`)."""
    key: str
    losses: list = field(default_factory=list)  # (seq, samples before it missing from the state it was stepped on)
    unpredicted: list = field(default_factory=list)  # seqs without any prediction
    unexplained: list = field(default_factory=list)  # seqs whose prediction no state of the stream gives
    copies: int = 0  # predictions received, repeats included
    repeats_differing: int = 0  # earlier copies that differ from a seq's last copy
    max_abs_error: float = 0.0  # of each seq's last copy against the state it was explained by

    @property
    def exact(self) -> bool:
        """The uninterrupted run, every seq predicted, every repeat identical."""
        return not (self.losses or self.unpredicted or self.unexplained or self.repeats_differing)


def explain(model, key_index: int, copies: dict, total: int, atol: float = 1e-5, max_search: int = 5000,
            max_unexplained: int = 20) -> StreamHistory:
    """Replay stream ``key_index``'s samples 0 .. total-1 offline and find the state each prediction came from.

    The last copy of seq s must equal stepping sample s on the state after seq s-1 (the uninterrupted run),
    or else on the state after an earlier seq i-1 (searched back from s): then samples i .. s-1 are missing
    from the daemon's state, a loss of s - i samples, recorded at s -- what the daemon counts as
    ``seq - last - 1`` at that gap. A seq without a prediction is taken as stepped (its prediction was lost,
    not its sample) unless a later prediction says otherwise. Earlier copies must equal the last, except
    that a loss may make them differ (an input stepped before a crash and again, on an older state, after).
    """
    history = StreamHistory(f"dev{key_index}")
    states = [model.new_state()]  # states[i]: after seqs < i, along the path the predictions took
    for seq in range(total):
        x = sample(key_index, seq, model.input_size)
        got = copies.get(seq)
        if not got:
            history.unpredicted.append(seq)
        else:
            last = np.asarray(got[-1][1], np.float32)
            history.copies += len(got)
            history.repeats_differing += sum(copy[1] != got[-1][1] for copy in got[:-1])
            for start in range(seq, max(-1, seq - max_search - 1), -1):
                state = states[start].copy()
                error = float(np.max(np.abs(model.step(x, state) - last)))
                if error <= atol:
                    if start < seq:
                        history.losses.append((seq, seq - start))
                    history.max_abs_error = max(history.max_abs_error, error)
                    states.append(state)
                    break
            else:
                history.unexplained.append(seq)
                if len(history.unexplained) >= max_unexplained:
                    break
                got = None
        if not got:  # carry on as if it was stepped
            state = states[-1].copy()
            model.step(x, state)
            states.append(state)
    return history


# ---- pipelined publishing (fuzz_live.py, flood.py) ------------------------------------------------------
def publish_all(client: Client, messages, qos: int = 1, window: int = 1000, timeout: float = 120.0) -> int:
    """Publish ``messages`` ((topic, payload) pairs, consumed lazily) as fast as the broker confirms them, with
    at most ``window`` unconfirmed at a time: pipelined like a busy gateway (paho sends them through its own
    in-flight window, 20 by default), yet a million messages never sit in paho's queue at once. Returns how
    many were published; raises if the broker stops confirming."""
    paho_client = client.client
    pending: deque = deque()
    count = 0
    for topic, body in messages:
        pending.append(paho_client.publish(topic, body, qos=qos))
        count += 1
        if len(pending) >= window:
            _confirmed(pending.popleft(), timeout)
    while pending:
        _confirmed(pending.popleft(), timeout)
    return count


def _confirmed(info, timeout: float) -> None:
    info.wait_for_publish(timeout)
    if not info.is_published():
        raise TimeoutError(f"the broker did not confirm message {info.mid} within {timeout:g} s (rc {info.rc})")


def log_events(rig: Rig) -> dict[str, int]:
    """Warning and error events in the daemon's log (``snapshot_skipped``, ``queue_dropped``, ...), counted."""
    counts: dict[str, int] = {}
    for line in (rig.folder / "daemon.log").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("warning", "error", "critical"):
            event = record.get("event", record.get("msg", "")[:40])
            counts[event] = counts.get(event, 0) + 1
    return counts
