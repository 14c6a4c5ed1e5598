"""The systemd notify protocol, written out: a datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

It is a few lines; the packages that wrap it are stale or need libsystemd, which a Pi image may lack.
Outside systemd (``NOTIFY_SOCKET`` unset) every call does nothing, so the daemon calls them freely.
A notification never raises: losing one must not take the daemon down (a failure is logged at debug).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: a path, or ``@name`` for Linux's abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends READY/STOPPING/STATUS/WATCHDOG notifications to systemd; a no-op without NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.address = _socket_address(environ.get("NOTIFY_SOCKET"))
        self._socket: socket.socket | None = None
        if self.address is not None:
            self._open()  # now, so the worker and signal handlers never race to create it

    def _open(self) -> socket.socket | None:
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as error:
            log.debug("cannot open a socket for systemd notifications", extra={"notify_error": repr(error)})
        return self._socket

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when it was sent."""
        if self.address is None:
            return False
        sock = self._socket or self._open()
        if sock is None:
            return False
        try:
            sock.sendto("\n".join(assignments).encode(), self.address)
            return True
        except Exception as error:  # noqa: BLE001 - a notification must never take the daemon down
            log.debug("systemd notification failed", extra={"notify_error": repr(error)})
            return False

    def ready(self) -> bool:
        """Start-up (or a reload) is complete: systemd marks the unit active and starts the watchdog."""
        return self.notify("READY=1")

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send `ready` when it is done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        """Shutdown has begun (draining and snapshotting)."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status`` (newlines become spaces)."""
        return self.notify("STATUS=" + " ".join(str(text).splitlines()))

    def watchdog(self) -> bool:
        """Tell the watchdog the worker loop is alive."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, or None when no watchdog is set.

    None too when ``$WATCHDOG_PID`` names another process (the variable was inherited, not meant for us).
    """
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000
