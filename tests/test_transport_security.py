"""Transport security of `edgernn serve` against a real Mosquitto: TLS, client certificates, passwords.

One Mosquitto for the module, with a password file and several listeners: the plain one the test
clients use (anonymous, as a plain listener in production would not be), a TLS one, a TLS one requiring a
client certificate, and TLS ones with an expired certificate and a certificate for another host. Its
certificates come from tests/tls_certs.py. Where the daemon should connect it predicts end to end (a
sample in on the plain listener, the prediction out through the secured connection, equal to an offline
run); where it should not, the error says why at once, names what to check, and never holds the password.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from broker import Client, Mosquitto, free_port, mosquitto_binary
from daemon_harness import ROOT, DaemonProcess, offline, payload, start_daemon, wait_until, write_config, write_model
from edgernn.runtime.config import load_config
from edgernn.runtime.logs import extra_fields
from tls_certs import Pki, make_pki

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None or MOSQUITTO_PASSWD is None,
                                 reason="mosquitto (with mosquitto_passwd) is not installed (make test installs it)")]

USER = "edge-device"
SECRET = "Qx7-s3cret-pw"  # distinctive: any occurrence in a log line or an error is a leak
ATOL = 1e-5
FAST = 15.0
"""Seconds within which an error must come, with connection_timeout = 60: at once, not after the timeout."""


@dataclass
class SecureBroker:
    server: Mosquitto
    pki: Pki
    tls: int        # TLS, certificate signed by pki.ca
    mtls: int       # the same, requiring a client certificate signed by pki.ca
    expired: int    # TLS with an expired certificate
    wrong_host: int  # TLS with a certificate for broker.invalid

    @property
    def plain(self) -> int:
        return self.server.port

    def connections(self, client_id: str) -> list[tuple[int, str]]:
        """(listener port, "p2, c0, k60, u'user'") of each time the broker accepted ``client_id``: from its
        notice log, which says on which port each connection came and then who it is."""
        ports, found = {}, []
        for line in self.server.log_path.read_text(errors="replace").splitlines():
            if match := re.search(r"New connection from (\S+) on port (\d+)\.$", line):
                ports[match[1]] = int(match[2])
                continue
            match = re.search(r"New client connected from (\S+) as (\S+) \((.*)\)\.$", line)
            if match and match[2] == client_id:
                found.append((ports.get(match[1]), match[3]))
        return found


def write_passwords(path: Path, password: str) -> None:
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(path), USER, password], check=True, capture_output=True)


def secure_mosquitto(directory: Path, password: str = SECRET, port: int | None = None) -> SecureBroker:
    pki = make_pki(directory / "pki")
    write_passwords(directory / "passwords", password)
    ports = [free_port() for _ in range(4)]

    def tls_listener(port: int, server, client_certificate: bool = False) -> str:
        return (f"listener {port} 127.0.0.1\ncafile {pki.ca}\ncertfile {server.cert}\nkeyfile {server.key}\n"
                f"require_certificate {str(client_certificate).lower()}\n")

    # Without per_listener_settings the password file serves every listener: a client that gives a username
    # must give its password; one that gives none connects anonymously (the test clients, on the plain one).
    extra = (f"password_file {directory / 'passwords'}\nlog_type notice\n"  # notice: who connected, on which port
             + tls_listener(ports[0], pki.server) + tls_listener(ports[1], pki.server, client_certificate=True)
             + tls_listener(ports[2], pki.expired_server) + tls_listener(ports[3], pki.wrong_host_server))
    server = Mosquitto(directory / "broker", port=port, extra_config=extra).start()
    return SecureBroker(server, pki, *ports)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    broker = secure_mosquitto(tmp_path_factory.mktemp("secure"))
    yield broker
    broker.server.stop()


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model.ern")


def config(tmp_path: Path, port: int, client_id: str, broker: str) -> Path:
    """The daemon's test config on ``port``, with more ``[broker]`` lines and a fresh state dir."""
    return write_config(tmp_path, port, client_id=client_id, broker=broker)


def tls_lines(ca: Path, certificate=None) -> str:
    lines = f'tls_ca = "{ca}"'
    if certificate is not None:
        lines += f'\ntls_cert = "{certificate.cert}"\ntls_key = "{certificate.key}"'
    return lines


def assert_predicts(secure: SecureBroker, model, key_index: int = 0) -> None:
    """A sample published on the plain listener comes back as the prediction of the offline run, through
    the daemon's connection."""
    collector = Client(secure.plain, subscribe="predictions/#")
    sender = Client(secure.plain)
    try:
        sender.publish(f"sensors/dev{key_index}/imu", payload(key_index, 0))
        assert collector.wait_for_distinct(1, 30) >= 1, "no prediction came back"
        body = json.loads(collector.messages[0][1])
        np.testing.assert_allclose(body["y"], offline(model, key_index, [0])[0], atol=ATOL)
    finally:
        sender.close(), collector.close()


def connects_and_predicts(secure, model, path: Path, port: int) -> list[str]:
    """The daemon of config ``path`` connects through listener ``port`` (only) and predicts end to end;
    returns what the broker logged of its connections."""
    daemon = start_daemon(path)
    try:
        assert_predicts(secure, model)
    finally:
        daemon.stop()
    connections = secure.connections(daemon.config.broker.client_id)
    assert connections and {listener for listener, _ in connections} == {port}
    return [details for _, details in connections]


def startup_error(path: Path) -> str:
    """The `ConnectError` a daemon with ``startup_error_behavior = "error"`` stops with, from its config file."""
    from edgernn.runtime.daemon import Daemon
    from edgernn.runtime.mqtt import ConnectError

    daemon = Daemon(load_config(path))
    started = time.monotonic()
    with pytest.raises(ConnectError) as error:
        daemon.link.start()  # what Daemon.start() runs after loading the models
    assert time.monotonic() - started < FAST, "the error waited for connection_timeout instead of the real cause"
    daemon.stop()
    message = str(error.value)
    assert SECRET not in message
    return message


def leaks(records) -> list[str]:
    """Log records whose message, fields or traceback contain the secret."""
    return [record.getMessage() for record in records
            if SECRET in record.getMessage() or SECRET in repr(extra_fields(record))
            or SECRET in str(record.exc_info or "") or SECRET in str(record.exc_text or "")]


FAIL_FAST = 'startup_error_behavior = "error"\nconnection_timeout = 60.0'


# ---- TLS ----------------------------------------------------------------------------------------------
def test_tls_with_the_right_ca_predicts_end_to_end(tmp_path, secure, model):
    connects_and_predicts(secure, model, config(tmp_path, secure.tls, "tls-right-ca", tls_lines(secure.pki.ca)),
                          secure.tls)


def test_tls_true_checks_the_broker_against_the_systems_cas(tmp_path, secure, model, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.pki.ca))  # OpenSSL's default CA file: "the system's CAs"
    connects_and_predicts(secure, model, config(tmp_path, secure.tls, "tls-system-ca", "tls = true"), secure.tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.pki.other_ca))
    message = startup_error(config(tmp_path, secure.tls, "tls-system-ca-wrong", f"tls = true\n{FAIL_FAST}"))
    assert "TLS certificate verify failed" in message and "this system's CA store (no tls_ca is set)" in message


@pytest.mark.parametrize("case, expected", [
    ("wrong ca", "TLS certificate verify failed: self-signed certificate in certificate chain (the broker's "
                 "certificate is not signed by a CA in tls_ca = {other_ca})"),
    ("expired", "TLS certificate verify failed: certificate has expired (renew the broker's certificate, or "
                "check this device's clock)"),
    ("wrong host", "TLS certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1' "
                   "(connect by a name or address the broker's certificate lists, not '127.0.0.1')"),
])
def test_a_broker_certificate_that_fails_verification_is_a_startup_error(tmp_path, secure, model, case, expected):
    port, ca = {"wrong ca": (secure.tls, secure.pki.other_ca), "expired": (secure.expired, secure.pki.ca),
                "wrong host": (secure.wrong_host, secure.pki.ca)}[case]
    message = startup_error(config(tmp_path, port, "tls-bad", f"{tls_lines(ca)}\n{FAIL_FAST}"))
    assert message == (f"cannot connect to the MQTT broker at 127.0.0.1:{port}: "
                       + expected.format(other_ca=secure.pki.other_ca))


def test_tls_config_against_a_plain_listener_fails_and_never_talks_plain_mqtt(tmp_path, secure, model):
    client_id = "tls-to-plain"
    path = config(tmp_path, secure.plain, client_id, f"{tls_lines(secure.pki.ca)}\n{FAIL_FAST}")
    assert startup_error(path) == (
        f"cannot connect to the MQTT broker at 127.0.0.1:{secure.plain}: the broker closed the connection during "
        f"the TLS handshake (Connection reset by peer): is {secure.plain} a TLS port (8883 by convention), not "
        f"plain MQTT (1883)?")
    assert not secure.connections(client_id), "the daemon connected in plain text"


# ---- client certificates ------------------------------------------------------------------------------
def test_a_client_certificate_signed_by_the_brokers_ca_predicts_end_to_end(tmp_path, secure, model):
    path = config(tmp_path, secure.mtls, "mtls-right-cert", tls_lines(secure.pki.ca, secure.pki.client))
    connects_and_predicts(secure, model, path, secure.mtls)


@pytest.mark.parametrize("certificate", ["none", "other ca"])
def test_a_missing_or_foreign_client_certificate_is_a_startup_error(tmp_path, secure, model, certificate):
    client = None if certificate == "none" else secure.pki.other_client
    path = config(tmp_path, secure.mtls, "mtls-bad", f"{tls_lines(secure.pki.ca, client)}\n{FAIL_FAST}")
    message = startup_error(path)
    where = f"cannot connect to the MQTT broker at 127.0.0.1:{secure.mtls}"
    if client is None:  # TLS 1.3 alert; TLS 1.2 says "sslv3 alert handshake failure" and gets the same advice
        assert message.startswith(f"{where}: the broker rejected the TLS connection (")
        assert message.endswith("): it requires a client certificate (set [broker] tls_cert and tls_key)")
    else:
        assert message == (f"{where}: the broker rejected our TLS client certificate tls_cert = {client.cert} "
                           f"(tlsv1 alert unknown ca): it is not signed by a CA the broker trusts")
    assert not secure.connections("mtls-bad")


# ---- username and password ----------------------------------------------------------------------------
def test_password_from_a_file_over_tls_predicts_and_is_never_logged_nor_printed(tmp_path, secure, model, caplog,
                                                                               capsys):
    from edgernn.cli import main

    (tmp_path / "mqtt-password").write_text(SECRET + "\n")
    path = config(tmp_path, secure.tls, "password-file",
                  f'{tls_lines(secure.pki.ca)}\nusername = "{USER}"\npassword_file = "{tmp_path / "mqtt-password"}"')
    caplog.set_level(logging.DEBUG, logger="edgernn")
    assert all(details.endswith(f"u'{USER}'") for details in connects_and_predicts(secure, model, path, secure.tls))
    assert any(record.getMessage().startswith("connected to") for record in caplog.records)
    assert not leaks(caplog.records)
    assert main(["serve", "--config", str(path), "--check"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err and '"password": "***"' in out


def test_password_from_the_environment_in_a_real_process_is_never_logged(tmp_path, secure, model, monkeypatch):
    monkeypatch.setenv("EDGERNN_TEST_MQTT_PASSWORD", SECRET)
    path = config(tmp_path, secure.tls, "password-env",
                  f'{tls_lines(secure.pki.ca)}\nusername = "{USER}"\npassword = "${{EDGERNN_TEST_MQTT_PASSWORD}}"')
    assert SECRET not in path.read_text()
    process = DaemonProcess(path, tmp_path / "daemon.log").start()  # [log] level = "debug"
    try:
        assert_predicts(secure, model)
    finally:
        assert process.terminate() == 0
    assert {listener for listener, _ in secure.connections("password-env")} == {secure.tls}
    log_text = (tmp_path / "daemon.log").read_text()
    assert '"event": "connected"' in log_text and '"password": "***"' in log_text
    assert SECRET not in log_text


def test_a_wrong_password_stops_the_start_with_not_authorized(tmp_path, secure, model, caplog):
    caplog.set_level(logging.DEBUG, logger="edgernn")
    path = config(tmp_path, secure.tls, "wrong-password",
                  f'{tls_lines(secure.pki.ca)}\nusername = "{USER}"\npassword = "{SECRET}-not"\n{FAIL_FAST}')
    assert startup_error(path) == (f"cannot connect to the MQTT broker at 127.0.0.1:{secure.tls}: the broker "
                                   f"refused the connection: Not authorized (check [broker] username and password)")
    assert not leaks(caplog.records)


def test_the_cli_reports_a_wrong_password_without_it(tmp_path, secure, model):
    """`edgernn serve` as a process: exit code 1 and one clear line, the password nowhere in its output."""
    path = config(tmp_path, secure.plain, "wrong-password-cli",
                  f'username = "{USER}"\npassword = "wrong-{SECRET}"\n{FAIL_FAST}')
    result = subprocess.run([sys.executable, "-m", "edgernn", "serve", "--config", str(path)], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")))
    assert result.returncode == 1
    assert (f"edgernn: error: cannot connect to the MQTT broker at 127.0.0.1:{secure.plain}: the broker refused "
            f"the connection: Not authorized (check [broker] username and password)") in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_tcp_connection_that_times_out_says_so(tmp_path, dropping_port, model):
    path = config(tmp_path, dropping_port, "timeout", 'startup_error_behavior = "error"\nconnection_timeout = 1.0')
    assert startup_error(path) == (f"cannot connect to the MQTT broker at 127.0.0.1:{dropping_port}: no TCP "
                                   f"connection within connection_timeout = 1 s")


# ---- startup_error_behavior = "retry" -----------------------------------------------------------------
def test_retry_logs_the_refusal_rate_limited_and_connects_once_the_broker_accepts(tmp_path, model, caplog):
    caplog.set_level(logging.DEBUG, logger="edgernn")
    secure = secure_mosquitto(tmp_path / "secure", password="not-the-daemons-password")
    path = config(tmp_path, secure.tls, "retrying",
                  f'{tls_lines(secure.pki.ca)}\nusername = "{USER}"\npassword = "{SECRET}"')  # retry: the default
    from edgernn.runtime.daemon import Daemon

    daemon = Daemon(load_config(path))
    daemon.start()  # returns at once: the daemon serves (nothing yet) and keeps trying
    try:
        assert wait_until(lambda: daemon.link.failed_attempts >= 3, 30), "the daemon stopped retrying"
        refusals = [r for r in caplog.records if getattr(r, "event", None) == "connect_failed"]
        assert [r.getMessage() for r in refusals] == [
            f"cannot connect to the MQTT broker at 127.0.0.1:{secure.tls}: the broker refused the connection: "
            f"Not authorized (check [broker] username and password); retrying"]  # once, not once per attempt
        assert refusals[0].levelno == logging.WARNING and not daemon.link.connected.is_set()

        write_passwords(tmp_path / "secure" / "passwords", SECRET)  # the broker now accepts the daemon
        secure.server.restart()
        assert daemon.link.connected.wait(30), "the daemon did not connect once the broker accepted it"
        connected = [r for r in caplog.records if getattr(r, "event", None) == "connected"]
        assert connected[-1].failed_attempts >= 3
        time.sleep(0.3)  # the SUBACK
        assert_predicts(secure, model)
    finally:
        daemon.stop()
        secure.server.stop()
    assert not leaks(caplog.records)
