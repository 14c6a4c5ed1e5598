"""Why a connection to the broker failed, in one sentence; and the TLS context that lets us know.

paho reports only *that* an attempt failed. The TLS sockets made here tell the client (`mqtt._Client`:
``stage`` and ``note_failure``) how far an attempt got and every TLS error on the way, including an alert
read just after the handshake (a broker that rejects our client certificate says so only after TLS 1.3's
handshake); `describe_failure` turns that, or a refusing CONNACK, into a sentence naming the cause and the
option to check. Nothing here ever sees the password.
"""

from __future__ import annotations

import socket
import ssl

from edgernn.errors import EdgeRNNError


class ConnectError(EdgeRNNError, ConnectionError):
    """The broker cannot be reached or refused the connection (wrong address, credentials or TLS)."""


_NOT_FAILURES = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)  # non-blocking "try again"


class _TlsSocket(ssl.SSLSocket):
    """Tells `_Client` where the TLS part of an attempt stands, and of every TLS error (paho only logs
    errors on reads and writes, and logs nothing once the attempt failed)."""

    def do_handshake(self, *args, **kwargs):
        client = self.context.client
        client.stage = "tls"
        try:
            result = super().do_handshake(*args, **kwargs)
        except _NOT_FAILURES:
            raise
        except OSError as error:
            client.note_failure(error)
            raise
        client.stage = "mqtt"
        return result

    def recv(self, *args, **kwargs):
        try:
            return super().recv(*args, **kwargs)
        except _NOT_FAILURES:
            raise
        except OSError as error:
            self.context.client.note_failure(error)
            raise

    def send(self, *args, **kwargs):
        try:
            return super().send(*args, **kwargs)
        except _NOT_FAILURES:
            raise
        except OSError as error:
            self.context.client.note_failure(error)
            raise


class _TlsContext(ssl.SSLContext):
    """Makes paho's TLS sockets `_TlsSocket`s (stdlib's ``sslsocket_class`` hook: no paho internals)."""
    sslsocket_class = _TlsSocket
    client: object  # mqtt._Client: has ``stage`` and ``note_failure(error)``


def tls_context(broker, client) -> _TlsContext:
    """The TLS settings of ``[broker]``: the CA in ``tls_ca`` (else the system's), our certificate if given,
    the broker's certificate and host name checked unless ``insecure_skip_verify``; TLS 1.2 at least."""
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if broker.tls_ca:
            context.load_verify_locations(cafile=str(broker.tls_ca))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ValueError) as error:
        raise ConnectError(f"cannot use [broker] tls_ca = {broker.tls_ca}: {_os_text(error)} "
                           f"(a PEM file of CA certificates is expected)") from None
    if broker.tls_cert:
        try:
            context.load_cert_chain(str(broker.tls_cert), str(broker.tls_key))
        except (OSError, ValueError) as error:  # not PEM, a key that does not match, an encrypted key
            raise ConnectError(f"cannot use [broker] tls_cert = {broker.tls_cert} with tls_key = {broker.tls_key}: "
                               f"{_os_text(error)}") from None
    if broker.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.client = client
    return context


def uses_tls(broker) -> bool:
    """TLS whenever any TLS option asks for it: ``tls = true``, a CA, a client certificate, or
    ``insecure_skip_verify = true`` (the user expects TLS there too: plain text would be the silent fallback
    this module never makes)."""
    return bool(broker.tls or broker.tls_ca or broker.tls_cert or broker.insecure_skip_verify)


_UNTRUSTED_ISSUER = {2, 18, 19, 20, 21}  # X509_V_ERR_*: issuer unknown, self-signed, unable to verify leaf
_EXPIRED, _NOT_YET_VALID = 10, 9
_WRONG_NAME = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_AUTH_REFUSALS = {"Not authorized", "Bad user name or password"}
_NO_CLIENT_CERTIFICATE = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"}  # 1.3, 1.2


def describe_failure(broker, error: BaseException | None = None, stage: str = "mqtt", reason=None) -> str:
    """Why a connection attempt failed, in one sentence with what to check: from the error it ended with
    (during ``stage``) or the CONNACK ``reason`` that refused it. Never contains the password."""
    where = f"cannot connect to the MQTT broker at {broker.host}:{broker.port}"
    if reason is not None:
        text = f"{where}: the broker refused the connection: {reason}"
        if str(reason) in _AUTH_REFUSALS:
            text += (" (check [broker] username and password)" if broker.username is not None else
                     " (it wants a username and password: set [broker] username and password or password_file)")
        return text
    if isinstance(error, ssl.SSLCertVerificationError):
        text = f"{where}: TLS certificate verify failed: {error.verify_message.rstrip('.')}"
        code = error.verify_code
        if code in _UNTRUSTED_ISSUER:
            trusted = f"tls_ca = {broker.tls_ca}" if broker.tls_ca else "this system's CA store (no tls_ca is set)"
            text += f" (the broker's certificate is not signed by a CA in {trusted})"
        elif code == _EXPIRED:
            text += " (renew the broker's certificate, or check this device's clock)"
        elif code == _NOT_YET_VALID:
            text += " (check this device's clock)"
        elif code in _WRONG_NAME:
            text += f" (connect by a name or address the broker's certificate lists, not {broker.host!r})"
        return text
    ssl_reason = getattr(error, "reason", None) or ""  # OpenSSL's name of the error, on an SSLError
    if isinstance(error, ssl.SSLError) and "ALERT" in ssl_reason:
        alert = _ssl_text(error)
        if broker.tls_cert is None and ssl_reason in _NO_CLIENT_CERTIFICATE:
            return (f"{where}: the broker rejected the TLS connection ({alert}): it requires a client certificate "
                    f"(set [broker] tls_cert and tls_key)")
        if broker.tls_cert is not None and ("CERTIFICATE" in ssl_reason or "UNKNOWN_CA" in ssl_reason):
            text = f"{where}: the broker rejected our TLS client certificate tls_cert = {broker.tls_cert} ({alert})"
            if "UNKNOWN_CA" in ssl_reason:
                text += ": it is not signed by a CA the broker trusts"
            return text
        return f"{where}: the broker rejected the TLS connection ({alert})"
    if stage == "tls" and isinstance(error, (ConnectionError, EOFError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return (f"{where}: the broker closed the connection during the TLS handshake ({_os_text(error)}): is "
                f"{broker.port} a TLS port (8883 by convention), not plain MQTT (1883)?")
    if isinstance(error, ssl.SSLError):
        text = f"{where}: TLS handshake failed: {_ssl_text(error)}"
        if ssl_reason == "WRONG_VERSION_NUMBER":
            text += f" (is {broker.port} a TLS port? the broker did not answer in TLS)"
        return text
    if isinstance(error, ConnectionRefusedError):
        return f"{where}: connection refused (no broker listens on that port, or a firewall rejects it)"
    if isinstance(error, TimeoutError):
        what = {"tcp": "no TCP connection", "tls": "the TLS handshake did not finish"}.get(stage, "no answer")
        return f"{where}: {what} within connection_timeout = {broker.connection_timeout:g} s"
    if isinstance(error, socket.gaierror):
        return f"{where}: cannot resolve the host name {broker.host!r} ({_os_text(error)})"
    closed = f"the broker closed the connection before answering CONNECT ({_os_text(error)})" if error else \
        "the broker closed the connection before answering CONNECT"
    if stage == "mqtt" and uses_tls(broker) and (error is None or isinstance(error, (ConnectionError, EOFError))):
        # Closed right after the TLS handshake without an alert we could read: most likely our certificate.
        return (f"{where}: {closed}: if it requires a client certificate, set [broker] tls_cert and tls_key"
                if broker.tls_cert is None else f"{where}: {closed}: it may not accept tls_cert = {broker.tls_cert}")
    if isinstance(error, ConnectionError) and stage == "mqtt" or error is None:
        return f"{where}: {closed}"
    return f"{where}: {_os_text(error)}"


def _ssl_text(error: ssl.SSLError) -> str:
    """'tlsv1 alert unknown ca' from '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)'."""
    text = str(error.args[1] if len(error.args) > 1 else error)
    text = text.split("] ", 1)[-1]
    return text.split(" (_ssl.c", 1)[0] or type(error).__name__


def _os_text(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return _ssl_text(error)
    return (getattr(error, "strerror", None) or str(error) or type(error).__name__).rstrip(".")
