"""Ed25519 signatures of model files: `edgernn keygen`, `edgernn sign`, and the daemon's check at start and
at reload when ``[signing] trusted_keys`` is set, and of model updates over MQTT (`verify_bytes`).

A signature is a small JSON file beside the model, ``model.ern.sig``::

    {"format": "edgernn-signature", "version": 1, "algorithm": "ed25519", "key_id": "3f2a...",
     "sha256": "<hex of the file>", "signature": "<base64>"}

What is signed is ``b"edgernn-model-v1\\0"`` followed by the file's SHA-256 digest: the content, not the
name (a file may be renamed or delivered another way), and never mistaken for another use of the key.
What it does not say: which file name or version it was made for. Any file signed by a trusted key passes
under any name, so an older signed model copied back in place passes too (signed updates over MQTT refuse a
model whose signed ``model_version`` is not newer: runtime/updates.py). `read_verified` hands back the bytes
it checked, and the daemon loads those, not the file a second time.
``key_id`` is the first 16 hex digits of the SHA-256 of the raw 32-byte public key: it names the key in
errors. Keys are PEM files: the private key PKCS#8 (written with mode 0600), the public key
SubjectPublicKeyInfo. The ``cryptography`` package is imported only here, and only when used
(``pip install 'edgernn[signing]'``; it has aarch64 wheels).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .errors import SignatureError

SIGNATURE_SUFFIX = ".sig"
DOMAIN = b"edgernn-model-v1\0"
FORMAT = "edgernn-signature"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("model signatures need the cryptography package: pip install 'edgernn[signing]'") from None
    return serialization, ed25519


def signature_path(model_path) -> Path:
    return Path(f"{model_path}{SIGNATURE_SUFFIX}")


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(private_path, public_path) -> str:
    """Write a new key pair (the private key readable by its owner only); returns its key id."""
    serialization, ed25519 = _crypto()
    private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    with os.fdopen(descriptor, "wb") as file:
        file.write(private_pem)
    Path(public_path).write_bytes(public_pem)
    return key_id(private_key.public_key())


def load_private_key(path):
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise SignatureError(f"{path}: not a readable private key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path):
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as error:
        raise SignatureError(f"{path}: not a readable public key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SignatureError(f"{path}: cannot read it to check its signature ({error.strerror or error})",
                             "unreadable") from None


def sign_file(model_path, private_key_path, out=None) -> Path:
    """Write ``model_path``'s signature (default ``<model_path>.sig``); returns its path."""
    key = load_private_key(private_key_path)
    digest = hashlib.sha256(_read(model_path)).digest()
    signature = {"format": FORMAT, "version": 1, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
                 "sha256": digest.hex(), "signature": base64.b64encode(key.sign(DOMAIN + digest)).decode()}
    path = Path(out) if out is not None else signature_path(model_path)
    path.write_text(json.dumps(signature, indent=2) + "\n")
    return path


def verify_file(model_path, public_keys: list, signature_file=None) -> str:
    """Check ``model_path`` against its signature and the trusted ``public_keys`` (loaded keys); returns the
    id of the key that signed it. Raises `SignatureError` naming the file and what is wrong."""
    return read_verified(model_path, public_keys, signature_file)[1]


def read_verified(model_path, public_keys: list, signature_file=None) -> tuple[bytes, str]:
    """The bytes of ``model_path`` once checked (load these, not the file again), and the signing key's id."""
    path = Path(signature_file) if signature_file is not None else signature_path(model_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SignatureError(f"{model_path}: unsigned (no {path.name} beside it): trusted_keys are set, so "
                             f"every model must be signed (edgernn sign {model_path} --key KEY)", "unsigned") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SignatureError(f"{path}: not a valid signature file ({error})", "bad_signature") from None
    data = _read(model_path)
    return data, verify_bytes(data, text, public_keys, str(model_path), path.name)


def verify_bytes(data: bytes, signature, public_keys: list, name: str, signature_name: str = "its signature") -> str:
    """Check ``data`` (a model file's content, called ``name`` in errors) against ``signature`` (the JSON of a
    ``.sig`` file, as text or parsed) and the trusted keys; returns the signing key's id."""
    _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        if isinstance(signature, str | bytes):
            signature = json.loads(signature)
        if signature.get("format") != FORMAT or signature.get("algorithm") != "ed25519":
            raise ValueError("not an edgernn Ed25519 signature")
        signed_digest, raw = bytes.fromhex(signature["sha256"]), base64.b64decode(signature["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SignatureError(f"{name}: {signature_name} is not a valid signature file ({error})", "bad_signature") from None
    digest = hashlib.sha256(data).digest()
    if digest != signed_digest:
        raise SignatureError(f"{name}: does not match {signature_name}: the file changed after it was signed "
                             "(tampered, or not the signed file)", "tampered")
    ids = []
    for key in public_keys:
        ids.append(key_id(key))
        try:
            key.verify(raw, DOMAIN + digest)
        except InvalidSignature:
            continue
        return ids[-1]
    raise SignatureError(f"{name}: signed by key {signature.get('key_id', '?')}, which is not trusted here "
                         f"(trusted: {', '.join(ids) or 'none'}), or the signature is forged", "untrusted")
