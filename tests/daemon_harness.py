"""Building blocks of the daemon's tests: a model file, a config file, the daemon in-process or as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgernn
from edgernn.local_broker import die_with_parent
from edgernn.runtime.config import load_config
from edgernn.runtime.daemon import Daemon

from helpers import random_model

ROOT = Path(__file__).resolve().parent.parent


def write_model(path: Path, cell: str = "gru", seed: int = 0, input_size: int = 3, hidden: int = 12,
                head: tuple = (2,), sample_rate: float | None = None) -> "edgernn.Model":
    model = random_model(cell, seed=seed, input_size=input_size, hidden=hidden, head=head)
    if sample_rate is not None:
        model = with_sample_rate(model, sample_rate)
    edgernn.save(model, path)
    return edgernn.load(path)


def with_sample_rate(model, sample_rate: float) -> "edgernn.Model":
    """``model`` with the sample rate its file records (`edgernn convert --sample-rate`)."""
    import dataclasses

    return edgernn.Model(dataclasses.replace(model.spec, sample_rate=sample_rate), model.weights)


def timing_counts(daemon, pipeline: str = "imu") -> dict:
    """``edgernn_timing_total`` of ``pipeline`` by reason, the reasons counted so far only."""
    children = daemon.metrics.pipeline(pipeline)._timing.items()
    return {reason: int(child._value.get()) for reason, child in children if child._value.get()}


def write_config(directory: Path, port: int, pipeline: str = "", top: str = "", state: str = "",
                 model: str = "model.ern", client_id: str = "edgernn-test", daemon: str = "",
                 metrics: str = "", broker: str = "", log_level: str = "debug") -> Path:
    """The issue's minimal config, on the test broker's port, plus extra TOML lines per table
    (``daemon`` and ``metrics`` lines go into their tables, written only when given)."""
    path = directory / "edgernn.toml"
    daemon_table = f"[daemon]\n{daemon}\n" if daemon else ""
    metrics_table = f"[metrics]\n{metrics}\n" if metrics else ""
    path.write_text(f"""{top}
[broker]
host = "127.0.0.1"
port = {port}
client_id = "{client_id}"
min_reconnect_interval = 1.0
max_reconnect_interval = 2.0
{broker}

[[pipelines]]
name = "imu"
model = "{model}"
subscribe = "sensors/+/imu"
publish = "predictions/{{key}}/imu"
qos = 1
{pipeline}

[state]
dir = "{directory / 'state'}"
{state}

{daemon_table}
{metrics_table}
[log]
level = "{log_level}"
""")
    return path


def start_daemon(config_path: Path) -> Daemon:
    daemon = Daemon(load_config(config_path))
    daemon.start()
    # A liveness bound, not a speed check: the pure-Python broker under a loaded CI machine was seen to take
    # over 10 s to answer both connections of a restarted daemon.
    assert daemon.link.connected.wait(30), "the daemon did not connect: " + ", ".join(
        f"{c.client_id} {'up' if c.connected.is_set() else 'down'}" for c in daemon.link.connections)
    time.sleep(0.2)  # the SUBACK
    return daemon


class DaemonProcess:
    """``python -m edgernn serve`` as a real process: for SIGTERM, SIGKILL and restarts. Ready once its log
    holds ``READY``; a stop renames that event in the log, so a restart waits for the new process's own."""

    READY = b'"event": "started"'

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path, self.log_path = config_path, log_path
        self.process = None

    def start(self, status_client=None) -> "DaemonProcess":
        env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
        self._log = open(self.log_path, "ab")
        # It dies with the test (or script) that started it, even one killed by a timeout: no daemon left behind.
        self.process = subprocess.Popen([sys.executable, "-m", "edgernn", "serve", "--config", str(self.config_path)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready when its log says it serves
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            if self.READY in self.log_path.read_bytes():
                time.sleep(0.3)
                return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not start: {self.log_path.read_text()[-3000:]}")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._stopped()
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._stopped()

    def _stopped(self) -> None:
        self._log.close()
        retired = self.READY.replace(b'"event": "', b'"event": "was-')
        self.log_path.write_bytes(self.log_path.read_bytes().replace(self.READY, retired))


def wait_until(predicate, seconds: float) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass; returns its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def sample(key_index: int, seq: int, input_size: int = 3) -> np.ndarray:
    """A deterministic sample of stream ``key_index`` at ``seq`` (float32-exact through JSON)."""
    rng = np.random.default_rng(1000 * key_index + seq)
    return rng.standard_normal(input_size).astype(np.float32)


def payload(key_index: int, seq: int | None, input_size: int = 3, ts: float | None = None) -> dict:
    body = {"x": [float(v) for v in sample(key_index, seq or 0, input_size)]}
    if seq is not None:
        body["seq"] = seq
    if ts is not None:
        body["ts"] = ts
    return body


def offline(model, key_index: int, seqs, input_size: int = 3) -> np.ndarray:
    """What an uninterrupted run gives for a stream's samples ``seqs``, in order."""
    xs = np.stack([sample(key_index, s, input_size) for s in seqs])
    return model.run(xs, model.new_state())
