"""Test-session setup, and the fixtures several test modules share.

Numba's on-disk cache is keyed by each kernel's own source file, so editing a cell module leaves the
cached entry points in stack.py stale. The tests therefore compile into a cache directory named by a
hash of all of edgernn's sources: a changed source always means a fresh compile, never stale kernels.
"""

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "edgernn").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache" / _sources_digest()))


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
