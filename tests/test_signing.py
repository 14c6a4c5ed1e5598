"""Signed model files (edgernn/signing.py, `edgernn keygen` / `edgernn sign`, ``[signing] trusted_keys``): a
signed file passes; an unsigned, tampered, wrongly signed or forged one is refused with its name and the
reason, at the daemon's start, by `serve --check`, and at a reload (which keeps the current model)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import Client, Mosquitto, mosquitto_binary
from daemon_harness import payload, wait_until, write_config, write_model
from edgernn.errors import SignatureError
from edgernn.runtime.config import ConfigError, load_config
from edgernn.runtime.daemon import Daemon, check
from edgernn.signing import generate_keys, load_public_key, sign_file, signature_path, verify_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: "release" (trusted) and "other" (not)."""
    (tmp_path / "keys").mkdir()
    ids = {name: generate_keys(tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pub")
           for name in ("release", "other")}
    return tmp_path / "keys", ids


def _trusted(directory: Path) -> list:
    return [load_public_key(directory / "release.pub")]


def test_a_signed_file_passes_and_names_its_key(tmp_path, keys):
    directory, ids = keys
    model = tmp_path / "model.ern"
    write_model(model)
    assert (directory / "release.key").stat().st_mode & 0o777 == 0o600
    sign_file(model, directory / "release.key")
    assert verify_file(model, _trusted(directory)) == ids["release"]
    assert json.loads(signature_path(model).read_text())["key_id"] == ids["release"]


def test_unsigned_tampered_wrong_key_and_forged_files_are_refused(tmp_path, keys):
    directory, ids = keys
    model = tmp_path / "model.ern"
    write_model(model)
    with pytest.raises(SignatureError, match="unsigned") as refused:
        verify_file(model, _trusted(directory))
    assert refused.value.reason == "unsigned"
    sign_file(model, directory / "other.key")
    with pytest.raises(SignatureError, match=f"signed by key {ids['other']}, which is not trusted") as refused:
        verify_file(model, _trusted(directory))
    assert refused.value.reason == "untrusted"
    sign_file(model, directory / "release.key")
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="changed after it was signed") as refused:
        verify_file(model, _trusted(directory))
    assert refused.value.reason == "tampered"
    # A signature that claims the new content's digest but was not made by the key: forged.
    import hashlib
    signature = json.loads(signature_path(model).read_text())
    signature["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    signature_path(model).write_text(json.dumps(signature))
    with pytest.raises(SignatureError, match="forged"):
        verify_file(model, _trusted(directory))
    signature["signature"] = base64.b64encode(b"x" * 10).decode() + "!"
    signature_path(model).write_text(json.dumps(signature))
    with pytest.raises(SignatureError, match="not a valid signature file"):
        verify_file(model, _trusted(directory))
    with pytest.raises(SignatureError, match="not an Ed25519 public key|not a readable public key"):
        load_public_key(directory / "release.key")


def test_the_cli_makes_keys_signs_and_checks(tmp_path):
    model = tmp_path / "model.ern"
    write_model(model)
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgernn", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, cwd=tmp_path)
    made = run("keygen", "--out", "keys", "--name", "release")
    assert made.returncode == 0 and "key id" in made.stdout, made.stderr
    assert run("keygen", "--out", "keys", "--name", "release").returncode == 1  # never over an existing key
    assert run("sign", "model.ern", "--key", "keys/release.key").returncode == 0
    checked = run("sign", "model.ern", "--check", "--key", "keys/release.pub")
    assert checked.returncode == 0 and "signature valid" in checked.stdout
    model.write_bytes(model.read_bytes() + b" ")
    refused = run("sign", "model.ern", "--check", "--key", "keys/release.pub")
    assert refused.returncode == 1 and "changed after it was signed" in refused.stderr


def _signed_config(tmp_path, port: int, keys_dir: Path) -> Path:
    config = write_config(tmp_path, port, top=f'[signing]\ntrusted_keys = ["{keys_dir / "release.pub"}"]\n')
    return config


def test_the_config_names_a_missing_key_file(tmp_path):
    write_model(tmp_path / "model.ern")
    with pytest.raises(ConfigError, match="signing.trusted_keys: key file not found"):
        load_config(write_config(tmp_path, 1883, top='[signing]\ntrusted_keys = ["nowhere.pub"]\n'))


def test_the_daemon_refuses_an_unsigned_model_at_start_and_check(tmp_path, keys):
    directory, _ = keys
    write_model(tmp_path / "model.ern")
    config = load_config(_signed_config(tmp_path, 1883, directory))
    with pytest.raises(SignatureError, match="model.ern: unsigned"):
        Daemon(config)
    with pytest.raises(SignatureError, match="unsigned"):
        check(config)
    sign_file(tmp_path / "model.ern", directory / "release.key")
    assert len(check(config)) == 1
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    sign_file(tmp_path / "model.ern", directory / "other.key")
    served = subprocess.run([sys.executable, "-m", "edgernn", "serve", "--config", str(config.source)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert served.returncode == 1 and "which is not trusted" in served.stderr


def test_an_unsigned_onnx_step_model_is_refused_too(tmp_path, keys):
    import dataclasses

    from edgernn.runtime.daemon import check_signatures

    directory, _ = keys
    write_model(tmp_path / "model.ern")
    sign_file(tmp_path / "model.ern", directory / "release.key")
    (tmp_path / "step.onnx").write_bytes(b"an ONNX step model")
    config = load_config(_signed_config(tmp_path, 1883, directory))
    pipeline = dataclasses.replace(config.pipelines[0], backend="onnxruntime", onnx_model=tmp_path / "step.onnx")
    with pytest.raises(SignatureError, match="step.onnx: unsigned"):
        check_signatures(config, pipeline)
    sign_file(tmp_path / "step.onnx", directory / "release.key")
    check_signatures(config, pipeline)


def test_an_empty_key_list_is_refused(tmp_path):
    write_model(tmp_path / "model.ern")
    with pytest.raises(ConfigError, match="signing.trusted_keys: is empty"):
        load_config(write_config(tmp_path, 1883, top="[signing]\ntrusted_keys = []\n"))


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")
def test_a_reload_loads_a_signed_file_and_refuses_an_unsigned_one(tmp_path, keys, caplog):
    directory, _ = keys
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        first = write_model(tmp_path / "model.ern", seed=1)
        sign_file(tmp_path / "model.ern", directory / "release.key")
        daemon = Daemon(load_config(_signed_config(tmp_path, broker.port, directory)))
        daemon.start()

        def serving(model) -> bool:
            current = daemon.pipelines[0].model.weights
            return all((current[name] == model.weights[name]).all() for name in model.weights)

        try:
            assert daemon.link.connected.wait(10)
            second = write_model(tmp_path / "model.ern", seed=2)  # replaced; its .sig is the old file's
            daemon.reload()
            assert wait_until(lambda: "reload failed" in caplog.text, 10) and "changed after it was signed" in caplog.text
            assert serving(first)
            outputs = Client(broker.port, subscribe="predictions/#")
            Client(broker.port).publish("sensors/dev0/imu", json.dumps(payload(0, 0)))
            assert outputs.wait_for(1, timeout=10)  # still serving, with the signed model
            outputs.close()
            sign_file(tmp_path / "model.ern", directory / "release.key")
            daemon.reload()
            assert wait_until(lambda: serving(second), 10)  # signed now: loaded
        finally:
            daemon.stop()
    finally:
        broker.stop()
