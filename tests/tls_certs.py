"""A small PKI for the transport-security tests, made with `cryptography` in a temporary directory.

    pki = make_pki(tmp_path / "pki")
    pki.ca, pki.server, pki.client            # the trusted CA, the broker's cert, our client cert
    pki.other_ca, pki.other_client            # an unrelated CA and a client cert it signed: the "wrong" ones
    pki.expired_server, pki.wrong_host_server # signed by the right CA, yet unacceptable to a verifying client

EC P-256 keys: generated in microseconds, where RSA keys would cost the tests time. The extensions are
those a strict verifier wants (key identifiers, key usage: Python 3.13 verifies with VERIFY_X509_STRICT).
Everything is written as PEM files, the form Mosquitto's ``cafile``/``certfile``/``keyfile`` and the
daemon's ``tls_*`` read.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"))
"""Where the tests' broker is reached: the server certificate must name both for hostname checks."""


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path                       # the CA certificate clients and the broker trust
    server: Certificate            # the broker's, for 127.0.0.1 and localhost, signed by ``ca``
    client: Certificate            # a client certificate signed by ``ca``
    other_ca: Path                 # a CA nobody here trusts
    other_client: Certificate      # a client certificate signed by ``other_ca``
    expired_server: Certificate    # signed by ``ca``, for 127.0.0.1, but expired yesterday
    wrong_host_server: Certificate  # signed by ``ca``, valid, but for broker.invalid only


def make_pki(directory: Path) -> Pki:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _authority("edgernn test CA", now)
    other_key, other_cert = _authority("some other CA", now)

    def issue(name: str, issuer, usage, names=LOOPBACK_NAMES, not_after=None) -> Certificate:
        issuer_key, issuer_cert = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_builder(name, now, not_after or now + datetime.timedelta(days=2))
                   .issuer_name(issuer_cert.subject).public_key(key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return _write(directory, name, builder.sign(issuer_key, hashes.SHA256()), key)

    _write(directory, "ca", ca_cert, ca_key)
    _write(directory, "other-ca", other_cert, other_key)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    return Pki(
        ca=directory / "ca.crt",
        server=issue("server", (ca_key, ca_cert), server),
        client=issue("client", (ca_key, ca_cert), client, names=()),
        other_ca=directory / "other-ca.crt",
        other_client=issue("other-client", (other_key, other_cert), client, names=()),
        expired_server=issue("expired-server", (ca_key, ca_cert), server,
                             not_after=now - datetime.timedelta(days=1)),
        wrong_host_server=issue("wrong-host-server", (ca_key, ca_cert), server,
                                names=(x509.DNSName("broker.invalid"),)),
    )


def _builder(common_name: str, now, not_after) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(not_after))


def _authority(common_name: str, now):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, now, now + datetime.timedelta(days=2))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _write(directory: Path, name: str, cert: x509.Certificate, key) -> Certificate:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Certificate(cert_path, key_path)
