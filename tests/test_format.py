"""The compact file (edgernn/format.py): round trips per dtype, sizes, and every way a file can be bad."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import edgernn
from edgernn._files import atomic_write_bytes
from edgernn.errors import FormatError, SpecError
from edgernn.format import (
    FORMAT_VERSION, dequantize_rows, quantize_rows, read_model_file, tensor_checksum, write_model_file,
)
from helpers import random_inputs, random_model, random_spec, random_weights

SPECS = {
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru", layers=2, hidden=32),
    "rnn-no-bias": dict(cell="rnn", bias=False, head=(16, 3)),
    "normalized": dict(cell="lstm", hidden=16, normalize=True, head=()),
}


def metadata_of(path) -> dict:
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        return handle.metadata()


def rewrite(path, tensors=None, **metadata_changes) -> None:
    """Rewrite a file with changed metadata (and optionally tensors), as another writer could."""
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata.update(metadata_changes)
    path.write_bytes(safetensors.numpy.save(tensors if tensors is not None else stored, metadata=metadata))


def assert_format_error(path, *words):
    with pytest.raises(FormatError) as caught:
        read_model_file(path)
    message = str(caught.value)
    assert path.name in message
    for word in words:
        assert word in message, message
    assert isinstance(caught.value, OSError)
    return message


@pytest.fixture
def model_file(tmp_path):
    spec = random_spec()
    path = tmp_path / "model.ern"
    write_model_file(path, spec, random_weights(spec))
    return path


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", SPECS.values(), ids=SPECS.keys())
def test_float32_round_trip_is_exact(tmp_path, options):
    spec = random_spec(**options)
    weights = random_weights(spec)
    path = tmp_path / "m.ern"
    write_model_file(path, spec, weights, "float32")
    spec2, weights2 = read_model_file(path)
    assert spec2 == spec
    assert weights2.keys() == weights.keys()
    for name in weights:
        assert weights2[name].dtype == np.float32
        assert weights2[name].tobytes() == weights[name].tobytes(), name


def test_metadata_is_readable_by_safetensors(model_file):
    metadata = metadata_of(model_file)
    assert metadata["format"] == "edgernn"
    assert metadata["format_version"] == FORMAT_VERSION == "1"
    assert metadata["dtype"] == "float32"
    assert metadata["spec"] == random_spec().to_json()
    assert metadata["checksum"].startswith("sha256:")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_tensors_are_stored_in_the_dtype(tmp_path, dtype):
    spec = random_spec(normalize=True)
    path = tmp_path / f"m-{dtype}.ern"
    write_model_file(path, spec, random_weights(spec), dtype)
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    assert stored["input.mean"].dtype == np.float32  # sensor offsets need float32's range
    assert stored["layers.0.W"].dtype == np.dtype(dtype)
    assert stored["head.0.W"].dtype == np.dtype(dtype)
    if dtype == "int8":
        assert stored["layers.0.R.scale"].shape == (spec.layers[0].hidden_size * 4,)
        assert stored["layers.0.Wb"].dtype == np.float32
    else:
        assert stored["layers.0.Wb"].dtype == np.float16


def test_quantize_rows_is_symmetric_per_row():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((5, 7)).astype(np.float32)
    matrix[2] = 0.0
    q, scale = quantize_rows(matrix)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    assert scale[2] == 1.0 and not q[2].any()
    assert np.abs(q).max() <= 127
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[[0, 1, 3, 4]], 127)
    error = np.abs(dequantize_rows(q, scale) - matrix)
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()


# Max abs error of outputs over 200 steps, relative to the output scale max|y|. Measured (seeds 0-4,
# hidden 64): float16 2e-4..8e-4, int8 5e-3..2.1e-2. The bounds leave 2-3x headroom without hiding a
# broken encoder, which gives errors of order 1.
TOLERANCE = {"float16": 2e-3, "int8": 5e-2}
# A tanh RNN with recurrent weights ~N(0, 0.3^2) and 64 units is chaotic (spectral radius ~2.4): any
# perturbation, float32 rounding included, grows to order 1 within 200 steps, so no storage dtype can
# be judged on it. Its weights are drawn at 0.1 (radius ~0.8: a contracting network).
WEIGHT_SCALE = {"lstm": 0.3, "gru": 0.3, "rnn": 0.1}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_saved_model_computes_what_the_original_does(tmp_path, dtype, cell):
    model = random_model(cell, hidden=64, scale=WEIGHT_SCALE[cell])
    xs = random_inputs(model, 200)
    expected = model.run(xs, model.new_state())
    path = tmp_path / "m.ern"
    edgernn.save(model, path, dtype=dtype)
    loaded = edgernn.load(path)
    assert loaded.spec == model.spec
    actual = loaded.run(xs, loaded.new_state())
    if dtype == "float32":
        assert actual.tobytes() == expected.tobytes()
    else:
        relative = np.abs(actual - expected).max() / np.abs(expected).max()
        assert relative <= TOLERANCE[dtype], f"{dtype} {cell}: max error {relative:.2e} of output scale"


@pytest.mark.parametrize("hidden", [64, 128])
def test_int8_file_is_at_most_35_percent_of_float32(tmp_path, hidden):
    spec = random_spec("lstm", hidden=hidden)
    weights = random_weights(spec)
    sizes = {}
    for dtype in ("float32", "float16", "int8"):
        path = tmp_path / f"{dtype}.ern"
        write_model_file(path, spec, weights, dtype)
        sizes[dtype] = path.stat().st_size
    assert sizes["int8"] <= 0.35 * sizes["float32"], sizes
    assert sizes["float16"] <= 0.55 * sizes["float32"], sizes


# ---- refusing bad writes ---------------------------------------------------------------------------
def test_save_refuses_unknown_dtype(tmp_path):
    spec = random_spec(hidden=8)
    with pytest.raises(ValueError, match="bfloat16"):
        write_model_file(tmp_path / "m.ern", spec, random_weights(spec), "bfloat16")
    assert not (tmp_path / "m.ern").exists()


def test_save_refuses_float16_overflow(tmp_path):
    spec = random_spec(hidden=8)
    weights = random_weights(spec)
    weights["layers.0.R"][0, 0] = 1e6
    with pytest.raises(ValueError, match="overflows float16"):
        write_model_file(tmp_path / "m.ern", spec, weights, "float16")


def test_save_refuses_weights_not_matching_the_spec(tmp_path):
    spec = random_spec(hidden=8)
    weights = random_weights(spec)
    weights["layers.0.W"] = weights["layers.0.W"][:, :-1]
    with pytest.raises(SpecError, match="layers.0.W"):
        write_model_file(tmp_path / "m.ern", spec, weights)
    del weights["layers.0.W"]
    with pytest.raises(SpecError, match="layers.0.W"):
        write_model_file(tmp_path / "m.ern", spec, weights)


# ---- refusing bad files ----------------------------------------------------------------------------
def test_missing_file(tmp_path):
    assert_format_error(tmp_path / "absent.ern", "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ern"
    path.write_bytes(b"")
    assert_format_error(path, "empty")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(model_file, keep):
    data = model_file.read_bytes()
    model_file.write_bytes(data[:int(len(data) * keep)])
    assert_format_error(model_file, "truncated")


def test_truncated_inside_the_header(model_file):
    model_file.write_bytes(model_file.read_bytes()[:40])
    assert_format_error(model_file, "truncated")


def test_bit_flip_in_tensor_data_is_caught(model_file):
    data = bytearray(model_file.read_bytes())
    rng = np.random.default_rng(0)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(5):
        flipped = bytearray(data)
        position = int(rng.integers(header_end, len(data)))
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        model_file.write_bytes(bytes(flipped))
        assert_format_error(model_file, "checksum mismatch", "corrupted")


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(safetensors.numpy.save({"weight": np.ones((3, 3), np.float32)}))
    assert_format_error(path, "not an edgernn model file")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is a text file, not a model\n" * 10)
    assert_format_error(path, "not a safetensors file")


def test_zip_archive(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert_format_error(path, "not a safetensors file", "PyTorch")


def test_pytorch_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(torch.nn.LSTM(4, 8).state_dict(), path)
    assert_format_error(path, "not a safetensors file")


def test_directory(tmp_path):
    assert_format_error(tmp_path, "directory")


def test_unknown_format_version(model_file):
    rewrite(model_file, format_version="2")
    message = assert_format_error(model_file, "format_version 2", "reads 1")
    assert "newer edgernn" in message
    rewrite(model_file, format_version="beta")
    assert_format_error(model_file, "unknown format_version 'beta'")


def test_missing_format_version(model_file):
    with safetensors.safe_open(str(model_file), framework="numpy") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "format_version"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    model_file.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    assert_format_error(model_file, "format_version")


def test_unknown_dtype(model_file):
    rewrite(model_file, dtype="int4")
    assert_format_error(model_file, "unknown dtype 'int4'")


def test_invalid_spec_json(model_file):
    rewrite(model_file, spec="{not json")
    assert_format_error(model_file, "invalid spec", "not valid JSON")
    spec = random_spec().to_dict()
    spec["layers"][0]["cell"] = "transformer"
    import json
    rewrite(model_file, spec=json.dumps(spec))
    assert_format_error(model_file, "invalid spec", "layers[0].cell")


def test_tensors_not_matching_the_spec(model_file):
    rewrite(model_file, spec=random_spec(hidden=32).to_json())  # checksum still valid: tensors unchanged
    assert_format_error(model_file, "do not match the spec", "layers.0.W")


def test_missing_tensor_with_valid_checksum(model_file):
    with safetensors.safe_open(str(model_file), framework="numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != "head.0.b"}
    rewrite(model_file, tensors=tensors, checksum=tensor_checksum(tensors))
    assert_format_error(model_file, "missing head.0.b")


def test_int8_file_without_scales(tmp_path):
    spec = random_spec(hidden=8)
    path = tmp_path / "q.ern"
    write_model_file(path, spec, random_weights(spec), "int8")
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if not name.endswith(".scale")}
    rewrite(path, tensors=tensors, checksum=tensor_checksum(tensors))
    assert_format_error(path, "missing", "layers.0.W.scale")


def test_checksum_covers_names_and_shapes():
    a = np.arange(6, dtype=np.float32)
    base = tensor_checksum({"a": a})
    assert tensor_checksum({"b": a}) != base
    assert tensor_checksum({"a": a.reshape(2, 3)}) != base
    assert tensor_checksum({"a": a.view(np.int32)}) != base
    assert tensor_checksum({"a": a.astype(">f4")}) == base  # byte order of the array in memory does not matter


def test_load_wraps_everything_in_format_error(tmp_path):
    path = tmp_path / "junk.ern"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(FormatError, match="junk.ern"):
        edgernn.load(path)


# ---- atomic writes ---------------------------------------------------------------------------------
def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"first")
    os.chmod(path, 0o640)
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, 12345)  # fails after the temporary file exists
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_overwriting_a_model_file(tmp_path):
    spec = random_spec(hidden=8)
    path = tmp_path / "m.ern"
    write_model_file(path, spec, random_weights(spec, seed=1))
    write_model_file(path, spec, random_weights(spec, seed=2), "int8")
    assert metadata_of(path)["dtype"] == "int8"
    assert sorted(os.listdir(tmp_path)) == ["m.ern"]
