"""A tampered model file never serves: `edgernn serve` refuses it at start, a SIGHUP reload to it keeps the
model that was serving, and `edgernn inspect` names the checksum it expected.

The checksum (``sha256`` over every stored tensor, in the file's metadata) is verified on every load; the
unit tests of the format (tests/test_format.py) flip bits in each part of a file. Here the same refusal is
checked where a user meets it: the daemon's process, its exit code and its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from broker import Client, mosquitto_binary
from daemon_harness import DaemonProcess, payload, sample, wait_until, write_config, write_model

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]


def tamper(path) -> None:
    """Flip one bit in the last tensor's bytes (the file still parses: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def test_serve_refuses_a_tampered_model_naming_the_file(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    tamper(tmp_path / "model.ern")
    done = subprocess.run([sys.executable, "-m", "edgernn", "serve", "--config", str(write_config(tmp_path, broker.port))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "model.ern" in done.stderr and "checksum mismatch" in done.stderr, done.stderr[-2000:]


def test_inspect_refuses_a_tampered_model_and_shows_both_checksums(tmp_path):
    write_model(tmp_path / "model.ern")
    intact = subprocess.run([sys.executable, "-m", "edgernn", "inspect", str(tmp_path / "model.ern")],
                            capture_output=True, text=True, timeout=120)
    assert intact.returncode == 0 and "checksum:    sha256:" in intact.stdout
    stored = intact.stdout.split("checksum:")[1].split()[0]
    tamper(tmp_path / "model.ern")
    done = subprocess.run([sys.executable, "-m", "edgernn", "inspect", str(tmp_path / "model.ern")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"stored {stored}, computed sha256:" in done.stderr


def test_a_reload_to_a_tampered_model_keeps_the_serving_one(tmp_path, broker):
    model = write_model(tmp_path / "model.ern")
    log_path = tmp_path / "daemon.log"
    process = DaemonProcess(write_config(tmp_path, broker.port), log_path).start()
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        sender.publish("sensors/dev0/imu", payload(0, 0))
        assert collector.wait_for_distinct(1) == 1
        write_model(tmp_path / "model.ern", seed=11)  # a retrained model, damaged on its way to the device
        tamper(tmp_path / "model.ern")
        process.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: b'"event": "reload_failed"' in log_path.read_bytes(), 30), log_path.read_text()[-2000:]
        assert b"checksum mismatch" in log_path.read_bytes()
        sender.publish("sensors/dev0/imu", payload(0, 1))
        assert collector.wait_for_distinct(2) == 2
        state = model.new_state()
        want = [model.step(sample(0, seq), state) for seq in (0, 1)]
        got = collector.predictions()["dev0"]
        np.testing.assert_allclose([got[0], got[1]], want, atol=1e-5)  # the old model, its state kept
    finally:
        sender.close(), collector.close()
        assert process.terminate() == 0
