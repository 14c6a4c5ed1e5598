"""What the reliability scripts share: a Mosquitto and `edgernn serve` as real processes, the daemon's
metrics, RSS, percentiles and the report.

Each script imports this first: it puts ``tests/`` (the broker, the daemon harness, random models) and
``benchmarks/`` (process figures) on the path, so the scripts drive exactly what the test suite drives.
Everything runs in a temporary folder with its own Mosquitto on a free loopback port, never the system
broker.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
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
from daemon_harness import DaemonProcess, wait_until, write_config, write_model  # noqa: E402
from proc import cpu_seconds, rss_bytes  # noqa: E402

__all__ = ["ROOT", "Client", "Mosquitto", "DaemonProcess", "Rig", "cpu_seconds", "rss_bytes", "scrape",
           "metric", "percentiles", "arguments", "finish", "wait_until", "write_config", "write_model"]

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
              broker_config: str = "", model_path: Path | None = None, **config_tables) -> "Rig":
        """Start the broker and the daemon: with a random ``cell`` model of these sizes (`write_model`),
        or with a copy of the model file at ``model_path``. ``model`` is the loaded model."""
        self.broker = Mosquitto(self.folder / "broker", extra_config=broker_config).start()
        self._stack.callback(self.broker.stop)
        if model_path is None:
            self.model = write_model(self.folder / "model.ern", cell, input_size=input_size, hidden=hidden, head=head)
        else:
            shutil.copyfile(model_path, self.folder / "model.ern")
            self.model = edgernn.load(self.folder / "model.ern")
        metrics = f'listen = "127.0.0.1:{self.metrics_port}"\n' + config_tables.pop("metrics", "")
        self.config_path = write_config(self.folder, self.broker.port, metrics=metrics,
                                        **{"log_level": "info", **config_tables})
        self.daemon = DaemonProcess(self.config_path, self.folder / "daemon.log").start()
        self._stack.callback(self._stop_daemon)
        return self

    def restart(self) -> DaemonProcess:
        """Start the daemon again (after ``daemon.kill()`` or ``daemon.terminate()``)."""
        self.daemon = DaemonProcess(self.config_path, self.folder / "daemon.log").start()
        return self.daemon

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
