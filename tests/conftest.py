"""Test-session setup (Numba's cache: tests/numba_cache.py), and the fixtures several test modules share."""

import socket
import time

import pytest

from numba_cache import use_test_cache

use_test_cache()


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto of the test's own (tests/broker.py), stopped at the end."""
    from broker import Mosquitto
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()


@pytest.fixture
def dropping_port():
    """A loopback port that drops connection attempts, as a broker behind a firewall or under a SYN flood: it
    listens but never accepts, and its accept queue is full, so a new TCP connect times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "this system accepted beyond the accept queue"
    finally:
        probe.close()
    yield port
    for sock in fillers + [server]:
        sock.close()
