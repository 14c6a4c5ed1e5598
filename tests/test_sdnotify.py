"""systemd integration: the notify protocol (runtime/sdnotify.py) and the unit file (runtime/systemd/)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgernn.runtime.sdnotify import Notifier, watchdog_interval

UNIT = Path(__file__).resolve().parent.parent / "runtime" / "systemd" / "edgernn.service"


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's notify socket, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notifications_arrive_as_datagrams(listener):
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready()
    assert received(listener) == "READY=1"
    assert notifier.status("3 pipelines, 120 streams")
    assert received(listener) == "STATUS=3 pipelines, 120 streams"
    assert notifier.watchdog()
    assert received(listener) == "WATCHDOG=1"
    assert notifier.stopping()
    assert received(listener) == "STOPPING=1"
    notifier.close()


def test_reloading_carries_the_monotonic_time(listener):
    Notifier().reloading()
    reloading, monotonic = received(listener).split("\n")
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC" and abs(int(value) / 1e6 - time.monotonic()) < 60


def test_status_stays_on_one_line(listener):
    Notifier().status("first\nsecond")
    assert received(listener) == "STATUS=first second"


def test_abstract_socket_name(monkeypatch):
    name = f"edgernn-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert Notifier().ready()
        assert received(sock) == "READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not any((notifier.ready(), notifier.stopping(), notifier.status("x"), notifier.watchdog()))
    notifier.close()


def test_a_missing_socket_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    caplog.set_level("DEBUG", logger="edgernn.runtime.sdnotify")
    assert Notifier().ready() is False
    assert "systemd notification failed" in caplog.text


def test_environment_can_be_passed_explicitly(listener):
    assert not Notifier(environ={}).enabled
    assert Notifier(environ={"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}).watchdog()
    assert received(listener) == "WATCHDOG=1"


# ---- watchdog interval ----------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.5
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


# ---- the unit file -------------------------------------------------------------------------------------
def unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    """{(section, key): [values in order]} of a unit file (comments and blank lines skipped)."""
    directives: dict = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault((section, key.strip()), []).append(value.strip())
    return directives


def test_unit_has_the_contracted_directives():
    d = unit_directives(UNIT.read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure", "RestartSec": "5",
        "StateDirectory": "edgernn", "CacheDirectory": "edgernn", "TimeoutStopSec": "30", "KillSignal": "SIGTERM",
        "ExecStart": "/opt/edgernn/.venv/bin/edgernn serve --config /etc/edgernn/edgernn.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "DynamicUser": "yes",
    }
    for key, value in expected.items():
        assert d[("Service", key)] == [value], key
    environment = d[("Service", "Environment")]
    assert "PYTHONUNBUFFERED=1" in environment and "NUMBA_CACHE_DIR=/var/cache/edgernn" in environment
    assert ("Service", "MemoryDenyWriteExecute") not in d  # would forbid Numba's JIT
    assert d[("Install", "WantedBy")] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """Verified as shipped, with ExecStart's binary (not installed here) pointed at one that exists."""
    text = UNIT.read_text()
    assert "/opt/edgernn/.venv/bin/edgernn" in text
    unit = tmp_path / "edgernn.service"
    unit.write_text(text.replace("/opt/edgernn/.venv/bin/edgernn", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_on_the_shipped_unit_only_misses_the_binary():
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True,
                            timeout=60, cwd=UNIT.parent)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if Path("/opt/edgernn/.venv/bin/edgernn").exists():
        assert result.returncode == 0 and complaints == []
    else:
        assert complaints and all("/opt/edgernn/.venv/bin/edgernn" in line for line in complaints), complaints
