"""The compact model file (``.ern``): a safetensors file holding the weights, with the spec in its metadata.

Nothing in the file is executable; ``safetensors.safe_open`` reads it. Metadata (all strings):

=================  ==============================================================================
``format``         ``"edgernn"``
``format_version`` ``"1"`` -- one dispatcher (`_READERS`) refuses versions this edgernn cannot read
``spec``           ``ModelSpec.to_json()``
``dtype``          how the weights are stored: ``float32``, ``float16`` or ``int8``
``checksum``       ``"sha256:<hex>"`` over every stored tensor (`tensor_checksum`)
=================  ==============================================================================

Storage per dtype (compute is float32 whatever the file holds; `read_model_file` returns float32):
  - ``float32``: every tensor as is; the round trip is exact.
  - ``float16``: every tensor as float16, except ``input.mean``/``input.std``, kept float32 because
    sensor offsets (e.g. pressure in Pa) overflow or lose their resolution in float16, and
    ``rest_state``, kept float32 so a stream starts from exactly the state that was computed.
  - ``int8``: the 2-D weight matrices (``layers.*.W``, ``layers.*.R``, ``head.*.W``) as int8 with a
    symmetric float32 scale per output row in ``<name>.scale`` (``scale = max|row| / 127``, 1 for a
    zero row); biases, input normalisation and the rest state stay float32.

The rest state (tensor ``rest_state``, present when the spec's ``rest_state`` is not ``"zeros"``) is a
stored tensor like the weights, so the checksum covers it.

Every problem reading a file raises `FormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from ._files import atomic_write_bytes
from .errors import FormatError, SpecError
from .spec import REST_STATE, ModelSpec, check_weights

FORMAT_NAME = "edgernn"
FORMAT_VERSION = "1"
DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = ".scale"
KEEP_FLOAT32 = ("input.mean", "input.std", REST_STATE)
"""Tensors stored as float32 whatever the file's dtype (see the module docstring)."""

_KIND_NAMES = {"edgernn": "an edgernn model file", "edgernn-snapshot": "an edgernn stream snapshot"}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger "header size" means not safetensors


# ---- public API -------------------------------------------------------------------------------------
def save(model, path, dtype: str = "float32") -> None:
    """Write ``model`` to ``path`` atomically, storing its weights as ``dtype``."""
    write_model_file(path, model.spec, model.weights, dtype)


def load(path, data: bytes | None = None):
    """Read a model written by `save`. ``data``: the file's bytes, already read (and checked: a signed update),
    so that what was checked is what is loaded; ``path`` then only names it in errors."""
    from .model import Model  # lazy: keeps `import edgernn.format` free of numba

    spec, weights = read_model_file(path, data)
    try:
        return Model(spec, weights)
    except SpecError as exc:
        raise FormatError(path, f"tensors do not match the spec: {exc}") from None


def write_model_file(path, spec: ModelSpec, weights: dict, dtype: str = "float32") -> None:
    """Encode ``weights`` (float32, names and shapes from ``spec.tensor_shapes()``) as ``dtype``.

    Raises SpecError for weights that do not match the spec, ValueError for an unknown dtype or
    values the dtype cannot hold (non-finite, or beyond float16's range).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    stored = _encode(check_weights(spec, weights), dtype)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_json(),
        "dtype": dtype,
        "checksum": tensor_checksum(stored),
    }
    atomic_write_bytes(path, safetensors.numpy.save(stored, metadata=metadata))


def read_model_file(path, data: bytes | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The spec and float32 weights of a model file (or of its ``data``); `FormatError` naming it on any problem."""
    metadata, tensors = read_tensor_file(path, data)
    check_kind(path, metadata, FORMAT_NAME)
    reader = select_reader(path, metadata, _READERS)
    return reader(path, metadata, tensors)


# ---- checksums shared with stream snapshots ---------------------------------------------------------
def tensor_checksum(tensors: dict[str, np.ndarray], prefix: bytes = b"") -> str:
    """``"sha256:<hex>"`` over ``prefix`` then each tensor by sorted name: name, dtype, shape, raw bytes.

    The bytes are hashed little-endian (as safetensors stores them), so the checksum is the same on
    every machine. Any changed bit of tensor data, a renamed tensor or a reshaped one changes it.
    """
    digest = hashlib.sha256(prefix)
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{name}\0{array.dtype.name}\0{list(array.shape)}\0".encode())
        digest.update(little.tobytes())
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model) -> str:
    """Identifies what a model computes: its spec and its float32 weights (not the file's dtype)."""
    prefix = model.spec.to_json().encode() + b"\0"
    return tensor_checksum({name: np.asarray(w, np.float32) for name, w in model.weights.items()}, prefix)


# ---- reading safetensors with errors that say what is wrong -----------------------------------------
def read_tensor_file(path, data: bytes | None = None) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of a safetensors file (or of its bytes ``data``), refusing missing, truncated
    and foreign files."""
    try:
        data = Path(path).read_bytes() if data is None else data
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, not a file") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    header = _parse_header(path, data)
    try:
        tensors = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise FormatError(path, f"not a valid safetensors file ({exc})") from None
    return header.get("__metadata__") or {}, tensors


def _parse_header(path, data: bytes) -> dict:
    """Check the safetensors framing ourselves: safetensors' own messages do not say *truncated*."""
    not_safetensors = "not a safetensors file"
    if not data:
        raise FormatError(path, "empty file (truncated?)")
    if len(data) < 9:
        raise FormatError(path, f"truncated: {len(data)} bytes, shorter than a safetensors header")
    header_size = int.from_bytes(data[:8], "little")
    if data[8:9] != b"{" or header_size > _MAX_HEADER_BYTES:
        if data.startswith(b"PK\x03\x04"):
            raise FormatError(path, f"{not_safetensors}: a zip archive (a PyTorch .pt checkpoint? "
                                    "convert it with `edgernn convert`)")
        if data.startswith(b"\x80"):
            raise FormatError(path, f"{not_safetensors}: a Python pickle (an old PyTorch checkpoint? "
                                    "convert it with `edgernn convert`)")
        raise FormatError(path, f"{not_safetensors} (no safetensors header at the start)")
    if len(data) < 8 + header_size:
        raise FormatError(path, f"truncated: the header needs {header_size} bytes, the file has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + header_size])
    except (ValueError, UnicodeDecodeError):
        raise FormatError(path, f"{not_safetensors} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(path, f"{not_safetensors} (its header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, f"{not_safetensors} (its metadata is not a string map)")
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            needed = max(needed, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise FormatError(path, f"{not_safetensors} (bad header entry for {name!r})") from None
    available = len(data) - 8 - header_size
    if available < needed:
        raise FormatError(path, f"truncated: the tensors need {needed} bytes after the header, "
                                f"the file has {available}")
    return header


def check_kind(path, metadata: dict, expected: str) -> None:
    """Refuse a safetensors file that is not of the ``expected`` edgernn kind."""
    kind = metadata.get("format")
    if kind is None:
        raise FormatError(path, f"a safetensors file, but not {_KIND_NAMES[expected]} "
                                "(no 'format' metadata: written by another tool?)")
    if kind != expected:
        raise FormatError(path, f"this is {_KIND_NAMES.get(kind, f'a {kind!r} file')}, "
                                f"not {_KIND_NAMES[expected]}")


def select_reader(path, metadata: dict, readers: dict):
    """The one place a format version is dispatched; unknown versions are refused by name."""
    version = metadata.get("format_version")
    if version in readers:
        return readers[version]
    known = ", ".join(sorted(readers))
    if version is None:
        raise FormatError(path, "no 'format_version' in the metadata")
    if version.isdigit() and int(version) > max(int(v) for v in readers):
        raise FormatError(path, f"written by a newer edgernn? format_version {version}, this edgernn reads {known}")
    raise FormatError(path, f"unknown format_version {version!r}, this edgernn reads {known}")


def verify_checksum(path, metadata: dict, tensors: dict, prefix: bytes = b"") -> None:
    expected = metadata.get("checksum")
    if expected is None:
        raise FormatError(path, "no 'checksum' in the metadata")
    actual = tensor_checksum(tensors, prefix)
    if actual != expected:
        raise FormatError(path, f"checksum mismatch, the file is corrupted (stored {expected}, computed {actual})")


# ---- version 1 --------------------------------------------------------------------------------------
def _read_v1(path, metadata: dict, tensors: dict) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    for key in ("spec", "dtype"):
        if key not in metadata:
            raise FormatError(path, f"no {key!r} in the metadata")
    verify_checksum(path, metadata, tensors)
    dtype = metadata["dtype"]
    if dtype not in DTYPES:
        raise FormatError(path, f"unknown dtype {dtype!r} (this edgernn reads {', '.join(DTYPES)})")
    try:
        spec = ModelSpec.from_json(metadata["spec"])
    except SpecError as exc:
        raise FormatError(path, f"invalid spec: {exc}") from None
    layout = _storage_layout(spec, dtype)
    _check_layout(path, layout, tensors)
    weights = _decode(tensors, spec, dtype)
    for name, array in weights.items():
        if not np.isfinite(array).all():
            raise FormatError(path, f"tensor {name!r} has non-finite values")
    return spec, weights


_READERS = {"1": _read_v1}


# ---- encoding ---------------------------------------------------------------------------------------
def _storage_layout(spec: ModelSpec, dtype: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor a file of this spec and dtype holds: stored name -> (numpy dtype, shape)."""
    layout = {}
    for name, shape in spec.tensor_shapes().items():
        if name in KEEP_FLOAT32 or dtype == "float32":
            layout[name] = (np.dtype(np.float32), shape)
        elif dtype == "float16":
            layout[name] = (np.dtype(np.float16), shape)
        elif len(shape) == 2:  # int8: the weight matrices
            layout[name] = (np.dtype(np.int8), shape)
            layout[name + SCALE_SUFFIX] = (np.dtype(np.float32), shape[:1])
        else:
            layout[name] = (np.dtype(np.float32), shape)
    return layout


def _check_layout(path, layout: dict, tensors: dict) -> None:
    missing = sorted(set(layout) - set(tensors))
    extra = sorted(set(tensors) - set(layout))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise FormatError(path, f"tensors do not match the spec: {'; '.join(parts)}")
    for name, (dtype, shape) in layout.items():
        array = tensors[name]
        if array.dtype != dtype or tuple(array.shape) != tuple(shape):
            raise FormatError(path, f"tensors do not match the spec: {name} is {array.dtype.name}"
                                    f"{list(array.shape)}, expected {dtype.name}{list(shape)}")


def _encode(weights: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    stored = {}
    for name, array in weights.items():
        if name in KEEP_FLOAT32 or dtype == "float32":
            stored[name] = array
        elif dtype == "float16":
            largest = float(np.abs(array).max(initial=0.0))
            if largest > float(np.finfo(np.float16).max):
                raise ValueError(f"weights[{name!r}]: {largest:g} overflows float16; save as float32")
            stored[name] = array.astype(np.float16)
        elif array.ndim == 2:
            stored[name], stored[name + SCALE_SUFFIX] = quantize_rows(array)
        else:
            stored[name] = array
    return stored


def _decode(tensors: dict[str, np.ndarray], spec: ModelSpec, dtype: str) -> dict[str, np.ndarray]:
    weights = {}
    for name in spec.tensor_shapes():
        array = tensors[name]
        if array.dtype == np.int8:
            weights[name] = dequantize_rows(array, tensors[name + SCALE_SUFFIX])
        else:
            weights[name] = np.ascontiguousarray(array, dtype=np.float32)
    return weights


def quantize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: ``matrix ~= q * scale[:, None]``, ``|q| <= 127``."""
    largest = np.abs(matrix).max(axis=1)
    scale = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(q.astype(np.float32) * scale[:, None])
