"""A private MQTT broker on a free loopback port, for `edgernn demo` and the tests: zero set-up.

    with start_local_broker(workdir) as broker:      # Mosquitto if installed, else the embedded amqtt
        run_everything(broker.host, broker.port)     # stopped (port freed) when the block ends

Both kinds run as child processes, so that they can be stopped, killed and restarted alike (the daemon's
tests do all three) and a pure-Python broker does not compete with the demo for its interpreter:

- `MosquittoBroker`: the ``mosquitto`` binary with a config of its own in ``directory``: persistence there,
  ``max_queued_messages 0`` (Mosquitto's default keeps only 1000 QoS 1 messages per offline session and
  drops the rest), ``user <current user>`` (started as root, Mosquitto drops to user "mosquitto", which
  cannot write ``directory``: it would keep no sessions across a restart and say so only in its log).
- `AmqttBroker`: amqtt (pure Python, ``pip install edgernn[demo]``) in ``python _amqtt_server.py``,
  which makes it keep persistent sessions and QoS 1 messages the way the daemon needs (that file lists
  what it changes and what still differs from Mosquitto). It is for trying edgernn out, not for
  production: each message costs it some 17 times Mosquitto's CPU time (about 0.5 ms, measured by
  benchmarks/local_broker_throughput.py), and it keeps nothing across its own restart.

Importing this module loads no MQTT code (neither paho nor amqtt): only the standard library and edgernn.
"""

from __future__ import annotations

import atexit
import getpass
import importlib.util
import logging
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

from .errors import EdgeRNNError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
"""Seconds a broker gets to accept connections after it was started."""
STOP_TIMEOUT = 10.0
"""Seconds a broker gets to exit after SIGTERM (Mosquitto writes its persistence file then) before SIGKILL."""
KINDS = ("mosquitto", "amqtt")


class BrokerStartError(EdgeRNNError, RuntimeError):
    """No local broker could be started (none installed, or it exited or did not listen in time)."""


def mosquitto_binary() -> str | None:
    """The mosquitto executable: on PATH, else where Debian and source installs put it (not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


def amqtt_installed() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def free_port() -> int:
    """A loopback port free right now (another process may still take it before the broker binds it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def accepts_connections(port: int, host: str = LOOPBACK) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


_running: "weakref.WeakSet[LocalBroker]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Brokers still running when the interpreter exits normally (not by a signal) are stopped too."""
    for broker in list(_running):
        broker.stop()


class LocalBroker:
    """A broker child process listening on ``host:port`` (loopback only, anonymous, no TLS).

    ``start()`` returns once the port accepts connections, or raises `BrokerStartError`; ``stop()`` ends it
    cleanly (SIGTERM, then SIGKILL after `STOP_TIMEOUT`) and returns once the process is gone;
    ``kill()`` is a crash (SIGKILL); ``restart()`` keeps the port, so clients reconnect to it.
    ``process`` is the `subprocess.Popen` of the running broker (the tests kill it directly).
    """

    kind = ""
    host = LOOPBACK
    _talks_on_pipes = False  # whether the child reads stdin and writes stdout (else both are /dev/null)

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.log_path = self.directory / f"{self.kind}.log"

    @property
    def address(self) -> str:
        """``host:port``, as ``--broker`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "LocalBroker":
        if self.running:
            return self
        pipe = subprocess.PIPE if self._talks_on_pipes else subprocess.DEVNULL
        with open(self.log_path, "ab") as log_file:  # the child keeps its own descriptor
            # A session of its own: a Ctrl-C in the terminal reaches the demo, which stops its clients first
            # and the broker last, instead of the broker dying under them.
            self.process = subprocess.Popen(self._command(), stdin=pipe, stdout=pipe, stderr=log_file,
                                            start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_until_listening()
        except BaseException:
            self._end(graceful=False)
            raise
        _running.add(self)
        log.info("%s broker listening on %s", self.kind, self.address,
                 extra={"event": "broker_started", "kind": self.kind, "port": self.port})
        return self

    def stop(self) -> None:
        """A clean stop: the broker closes its connections (Mosquitto also writes its persistence file)."""
        self._end(graceful=True)

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would end it: nothing is written."""
        self._end(graceful=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.kind} {self.host}:{self.port} {state}>"

    # ---- for the kinds ----------------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _port_from_child(self) -> int | None:
        """The port the child says it bound, for a child given port 0; None while it has not said yet."""
        return self.port

    def _listening(self, port: int) -> bool:
        return accepts_connections(port)

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            port = self._port_from_child()  # first: a child that said why it failed has exited by now
            if port and self._listening(port) and self.process.poll() is None:
                self.port = port
                return
            if self.process.poll() is not None:
                raise BrokerStartError(f"{self.kind} exited with code {self.process.returncode} at start: "
                                       f"{self._log_tail() or '(nothing logged)'}")
            time.sleep(0.05)
        raise BrokerStartError(f"{self.kind} did not accept connections on {self.host}:{self.port or '?'} within "
                               f"{START_TIMEOUT:g} s: {self._log_tail() or '(nothing logged)'}")

    def _end(self, graceful: bool) -> None:
        process = self.process
        _running.discard(self)
        if process is None:
            return
        if graceful:
            if not stop_child(process, STOP_TIMEOUT):
                log.warning("%s broker ignored SIGTERM for %g s; killed it", self.kind, STOP_TIMEOUT,
                            extra={"event": "broker_killed", "kind": self.kind})
        elif process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""


class MosquittoBroker(LocalBroker):
    """Mosquitto with its own config and persistence in ``directory`` (see the module docstring).

    ``extra_config``: more mosquitto.conf lines (e.g. ``max_inflight_messages 1000``), newline-terminated.
    """

    kind = "mosquitto"

    def __init__(self, directory: Path, port: int | None = None, extra_config: str = "", binary: str | None = None):
        super().__init__(directory, port)
        self.binary = binary or mosquitto_binary()
        self.extra_config = extra_config
        self._port_chosen = port is None  # a port of our choosing may be taken before Mosquitto binds it
        self.port = port or free_port()
        self.config = self.directory / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        self.config.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 0\n"
            f"user {getpass.getuser()}\n"
            # Errors and warnings only (a start that fails says why); log_dest none would hide them.
            "log_dest stderr\nlog_type error\nlog_type warning\n" + self.extra_config)

    def start(self) -> "MosquittoBroker":
        if self.binary is None:
            raise BrokerStartError("mosquitto is not installed (Debian, Raspberry Pi OS: apt-get install mosquitto)")
        try:
            return super().start()
        except BrokerStartError:
            # The first start on a port we picked: someone took it meanwhile. Once, on another port.
            if not self._port_chosen or "in use" not in self._log_tail(200):
                raise
            self._port_chosen = False
            self.port = free_port()
            self._write_config()
            return super().start()
        finally:
            self._port_chosen = False  # a restart must come back on the same port

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config)]


class AmqttBroker(LocalBroker):
    """The embedded pure-Python broker (amqtt) in a child process; ``port=None`` lets it bind any free port.

    The child stops on SIGTERM, and also when this process exits in any way (it watches its stdin pipe), so
    no broker outlives the demo. Its log is ``directory/amqtt.log`` (warnings and errors).
    """

    kind = "amqtt"
    SERVER = Path(__file__).with_name("_amqtt_server.py")
    _talks_on_pipes = True

    def start(self) -> "AmqttBroker":
        if not amqtt_installed():
            raise BrokerStartError("the embedded broker needs amqtt: pip install 'edgernn[demo]' "
                                   "(or install mosquitto)")
        return super().start()

    def _command(self) -> list[str]:
        # -P: the script's folder (edgernn/) must not shadow top-level modules; the child needs amqtt only.
        return [sys.executable, "-P", str(self.SERVER), "--port", str(self.port or 0), "--log", str(self.log_path)]

    def _listening(self, port: int) -> bool:
        return True  # the child says so only once its listener is bound (a probe would log a warning there)

    def _port_from_child(self) -> int | None:
        """The child prints ``listening <port>`` once its listener is bound, or ``error <why>`` and exits."""
        ready, _, _ = select.select([self.process.stdout], [], [], 0.05)
        if not ready:
            return None
        line = self.process.stdout.readline().decode(errors="replace").strip()
        word, _, rest = line.partition(" ")
        if word == "listening" and rest.isdigit():
            return int(rest)
        if word == "error":
            raise BrokerStartError(f"the amqtt broker did not start on {self.host}:{self.port or '(any port)'}: {rest}")
        if not line:  # it closed stdout without a word: it is exiting; the caller reports the code and the log
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            return None
        raise BrokerStartError(f"the amqtt broker said {line!r} instead of its port: {self._log_tail()}")


def stop_child(process: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` s; True when it stopped by itself."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    return True


def die_with_parent() -> None:
    """In a child before it runs (``preexec_fn``): on Linux, SIGTERM it when its parent dies, even by SIGKILL
    (strictly: when the thread that started it ends; start children from the main thread).

    prctl is looked up in the parent (`_prctl`): the forked child only calls it, no loader lock taken.
    """
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _find_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the parent's exit handlers stop the child instead


_prctl = _find_prctl()


def start_local_broker(directory: Path, prefer: str = "auto", port: int | None = None) -> LocalBroker:
    """Start a broker of the preferred kind on ``port`` (None: a free one) and return it, listening.

    ``prefer``: "mosquitto" or "amqtt" insist on that kind; "auto" takes Mosquitto where it is installed
    (on PATH or in /usr/sbin) and the embedded amqtt otherwise, or when Mosquitto fails to start.
    Stop it with ``stop()`` or a ``with`` block; one still running at interpreter exit is stopped then.
    """
    if prefer not in ("auto", *KINDS):
        raise ValueError(f"prefer must be 'auto', 'mosquitto' or 'amqtt', got {prefer!r}")
    directory = Path(directory)
    if prefer == "amqtt":
        return AmqttBroker(directory / "amqtt", port).start()
    if prefer == "mosquitto":
        return MosquittoBroker(directory / "mosquitto", port).start()
    if mosquitto_binary() is None:
        if not amqtt_installed():
            raise BrokerStartError("no MQTT broker: install mosquitto (apt-get install mosquitto) or "
                                   "pip install 'edgernn[demo]' for the embedded one, or pass --broker HOST:PORT")
        log.info("mosquitto is not installed: using the embedded broker (amqtt)", extra={"event": "broker_embedded"})
        return AmqttBroker(directory / "amqtt", port).start()
    try:
        return MosquittoBroker(directory / "mosquitto", port).start()
    except BrokerStartError as error:
        if not amqtt_installed():
            raise
        log.warning("mosquitto did not start (%s): using the embedded broker (amqtt)", error,
                    extra={"event": "broker_embedded"})
        return AmqttBroker(directory / "amqtt", port).start()
