"""A TCP relay between the daemon and its broker that the network-fault script can break on command.

`TcpProxy` listens on a loopback port and relays each connection to the broker's port, bytes unchanged,
one thread per direction. Faults, each what a real network does:

- `cut`: every relayed connection is reset at once (RST on both sides: a router or NAT that dropped
  the connection, a broker host that rebooted);
- `refuse` / `listen`: the port stops listening, so a connect gets ECONNREFUSED (a broker that is down,
  or a firewall that rejects), until `listen` opens it again on the same port;
- `blackhole` / `unblackhole`: the relay keeps every connection open but passes nothing, either way,
  and says nothing of the broker closing its side (a cable pulled, WiFi gone: only keepalives notice).
  New connections are accepted and swallowed too. Ending it resets the connections it held, as the
  first packet after a lost NAT entry does.

A connection is relayed only once the broker accepted it; ``upstream_connects`` lists the (monotonic) time
of each, which tells when the daemon got through again after a fault. The daemon should be its only client.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

HOST = "127.0.0.1"
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class TcpProxy:
    def __init__(self, host: str = HOST):
        self.host = host
        self.port: int | None = None
        self.upstream_port: int | None = None
        self.upstream_connects: list[float] = []
        self._listener: socket.socket | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._blackhole = False
        self._closed = False

    def start(self, upstream_port: int) -> int:
        """Relay to ``upstream_port``; returns the port to connect to instead (``Rig.start(via=...)`` calls it)."""
        self.upstream_port = upstream_port
        self.listen()
        return self.port

    # ---- faults ---------------------------------------------------------------------------------------
    def listen(self) -> None:
        """Accept connections (again, on the same port after `refuse`)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port or 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True).start()

    def refuse(self) -> int:
        """Stop listening (connects get ECONNREFUSED) and cut what is open; returns how many were cut."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        return self.cut()

    def cut(self) -> int:
        """Reset every relayed connection now; returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        return len(pairs)

    def blackhole(self) -> None:
        self._blackhole = True

    def unblackhole(self) -> int:
        """Pass traffic again; the connections held meanwhile are reset (returns how many)."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
            self._blackhole = False
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self.refuse()

    # ---- relaying -------------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by refuse()
                return
            threading.Thread(target=self._connect, args=(client,), name="proxy-connect", daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.host, self.upstream_port), timeout=5)
        except OSError:  # the broker is down: the client sees its connection reset, as with no proxy
            _reset(client)
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            if self._closed:
                _reset(client), _reset(upstream)
                return
            self._pairs.add(pair)
            if not self._blackhole:
                self.upstream_connects.append(time.monotonic())
        for source, target in (pair, pair[::-1]):
            threading.Thread(target=self._pump, args=(source, target, pair), name="proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, pair) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                if self._blackhole:  # the other end never hears of it
                    return
                if self._forget(pair):  # (else a fault took the pair and ends it itself)
                    for sock in pair:  # one side closed: close the other the same way (a FIN, not a reset)
                        _close(sock)
                return
            if self._blackhole:
                continue
            try:
                target.sendall(data)
            except OSError:
                if self._forget(pair):
                    for sock in pair:
                        _reset(sock)
                return

    def _forget(self, pair) -> bool:
        """Take ``pair`` out of the relayed connections; False when a fault took it already."""
        with self._lock:
            if pair not in self._pairs:
                return False
            self._pairs.discard(pair)
            return True


def _reset(sock: socket.socket) -> None:
    """Close with RST. ``shutdown(SHUT_RD)`` sends nothing but wakes the thread blocked in ``recv``."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
