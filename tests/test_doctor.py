"""`edgernn doctor` (runtime/doctor.py) against real things: a Mosquitto of the test's own with devices
publishing, a broker port where nothing listens, a state dir that cannot be created, the NumPy fallback,
a cold and a warm compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker import Client, Mosquitto, free_port, mosquitto_binary
from daemon_harness import payload, write_config, write_model
from edgernn.runtime.doctor import FAIL, OK, WARN, run_checks
from numba_cache import numba_cache_dir

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path):
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()


def _by_check(findings) -> dict:
    return {finding.check: finding for finding in findings}


def _devices(port: int, clock_offset: float, stop: threading.Event) -> threading.Thread:
    """Two devices publishing a sample with ts every 0.1 s, their clocks ``clock_offset`` s off this one (and
    one retained day-old sample)."""
    client = Client(port)
    # A sample the broker kept from a day ago: not a clock reading of now, never counted.
    client.publish("sensors/dev9/imu", json.dumps(payload(9, 0, ts=time.time() - 86400)), retain=True)

    def run():
        seq = 0
        while not stop.is_set():
            for k in range(2):
                client.publish(f"sensors/dev{k}/imu", json.dumps(payload(k, seq, ts=time.time() + clock_offset)),
                               qos=0, wait=False)
            seq += 1
            stop.wait(0.1)
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("offset, status", [(0.0, OK), (-3600.0, WARN), (1.7e12, WARN)])
def test_a_healthy_device_and_the_devices_clocks(tmp_path, broker, offset, status):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, broker.port, state=f'compile_cache = "{numba_cache_dir()}"')
    stop = threading.Event()
    devices = _devices(broker.port, offset, stop)
    try:
        findings = _by_check(run_checks(config, listen=1.5))
    finally:
        stop.set()
        devices.join(5)
    assert findings["config"].status == OK and "1 pipeline(s)" in findings["config"].detail
    assert findings["broker"].status == OK and f"127.0.0.1:{broker.port} reachable" in findings["broker"].detail
    assert "'edgernn-test-doctor'" in findings["broker"].detail  # never the daemon's own client id
    assert findings["state dir"].status == OK and "writable" in findings["state dir"].detail
    clocks = findings["device clocks"]
    assert clocks.status == status, clocks
    if offset == -3600.0:
        assert "median +3600" in clocks.detail and clocks.fix
    if offset > 1e9:  # ts in milliseconds: said as such, not as a clock 54,000 years off
        assert "not Unix seconds" in clocks.detail
    assert findings["kernels"].status == OK


def test_an_unreachable_broker_fails_and_says_why(tmp_path):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, free_port())
    findings = _by_check(run_checks(config, listen=0))
    assert findings["broker"].status == FAIL and "connection refused" in findings["broker"].detail
    assert "writable by " in findings["state dir"].detail
    assert "device clocks" not in findings


def test_a_state_dir_that_cannot_be_made_fails(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    (tmp_path / "a-file").write_text("not a directory")
    config = write_config(tmp_path, broker.port)
    config.write_text(config.read_text().replace(f'dir = "{tmp_path / "state"}"', f'dir = "{tmp_path / "a-file" / "state"}"'))
    findings = _by_check(run_checks(config, listen=0))
    assert findings["state dir"].status == FAIL and "not writable" in findings["state dir"].detail


def test_a_bad_config_is_named_and_the_rest_still_runs(tmp_path):
    config = tmp_path / "edgernn.toml"
    config.write_text("[broker]\nport = 'x'\n")
    findings = _by_check(run_checks(config, listen=0))
    assert findings["config"].status == FAIL and "broker.port" in findings["config"].detail
    assert "kernels" in findings and "broker" not in findings


def test_cold_and_warm_compile_caches(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    cold = write_config(tmp_path, broker.port, state=f'compile_cache = "{tmp_path / "empty-cache"}"')
    finding = _by_check(run_checks(cold, listen=0))["compile cache"]
    assert finding.status == WARN and "cold" in finding.detail and "edgernn warmup" in finding.fix
    warm = write_config(tmp_path, broker.port, state=f'compile_cache = "{numba_cache_dir()}"')
    from edgernn.runtime.config import load_config
    from edgernn.runtime.daemon import Daemon
    Daemon(load_config(warm)).pipelines[0].warm_up()  # fills the tests' cache, as the daemon's start does
    finding = _by_check(run_checks(warm, listen=0))["compile cache"]
    assert finding.status == OK and "warm" in finding.detail


def test_the_cli_with_the_numpy_fallback(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, broker.port)
    env = dict(os.environ, EDGERNN_DISABLE_NUMBA="1", PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-m", "edgernn", "doctor", "--config", str(config), "--listen", "0",
                           "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    findings = {f["check"]: f for f in map(json.loads, done.stdout.splitlines())}
    assert findings["kernels"]["status"] == WARN and "EDGERNN_DISABLE_NUMBA" in findings["kernels"]["detail"]
    assert findings["compile cache"]["status"] == OK and "not used" in findings["compile cache"]["detail"]
    down = subprocess.run([sys.executable, "-m", "edgernn", "doctor", "--config",
                           str(write_config(tmp_path, free_port())), "--listen", "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert down.returncode == 1 and "[fail] broker:" in down.stdout and "fix: check [broker]" in down.stdout


def test_a_dead_first_broker_is_passed_over_for_the_next_as_the_daemon_would(tmp_path, broker):
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, free_port(), broker=f'fallback_servers = ["127.0.0.1:{broker.port}"]')
    finding = _by_check(run_checks(config, listen=0))["broker"]
    assert finding.status == OK, finding
