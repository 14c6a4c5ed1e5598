"""One MQTT payload in -> one sample (`Decoder`); one prediction out -> one payload (`Encoder`).

Everything a payload can do wrong raises `DecodeError` with a short stable ``reason`` (a Prometheus label
value, one of `REJECT_REASONS`), before any stream state is touched. Nothing else escapes `decode`,
whatever the bytes: the daemon never crashes on a payload.

Both run once per message on a Pi, so each format's work is planned in the constructor and the hot
path is json parsing plus one float32 array. The vector is built with ``array.array('f', ...)``, which
overflows silently to inf (NumPy's cast would warn), and checked with one Python ``sum`` over it: float32
values cannot overflow a float64 sum, so the sum is finite exactly when every element is, and pure
Python float arithmetic never warns (a NumPy reduction would, for inf - inf). Both are tested.
"""

from __future__ import annotations

import array
import base64
import json
import math
import operator
import sys
from dataclasses import dataclass

import numpy as np

from edgernn.errors import InputError
from edgernn.protocol import KEY_FIELD, SEQ_FIELD, TS_FIELD, X_FIELD, Y_FIELD, refused_in_topics

REJECT_REASONS = ("oversize", "not_utf8", "not_json", "not_object", "missing_field", "wrong_type",
                  "wrong_length", "not_finite", "bad_seq", "bad_ts", "bad_key", "bad_csv")
DATA_FORMATS = ("json", "csv", "raw")
OUTPUT_FORMATS = ("json", "raw")
MAX_SEQ = 2**63 - 1
"""Largest accepted ``seq``: sequence numbers are kept in int64 arrays."""
DEAD_LETTER_MAX_PAYLOAD = 4096
"""A dead letter carries at most this many bytes of the rejected payload."""

_NUMBER_TYPES = frozenset((int, float))
_JSON_SPACE = " \t\n\r"
_KEY_FORBIDDEN = ("+", "#", "\0")  # a key ends up in a publish topic (and see `refused_in_topics`)


class DecodeError(InputError):
    """A payload cannot be decoded into a sample. ``reason`` is one of `REJECT_REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(slots=True)
class Decoded:
    """One decoded sample."""

    x: np.ndarray
    """(input_size,) float32, finite, owned by this sample."""
    seq: int | None
    """0 <= seq <= 2**63-1, or None when absent."""
    ts: float | None
    """Finite, or None when absent."""
    key: str | None
    """From the payload's key field when one is configured, else None (the key comes from the topic)."""


def _text(payload) -> str:
    try:
        return str(payload, "utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError("not_utf8", f"not UTF-8 at byte {error.start}") from None


_SCAN = json.JSONDecoder().scan_once  # the C scanner behind json.loads, without its whitespace regexes


def _parse_json(text: str):
    """``json.loads(text)`` (NaN and Infinity accepted, checked later), at about half its overhead."""
    try:
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:  # leading whitespace, or no value at all: let json say which
            return json.loads(text)
        if end != len(text) and text[end:].strip(_JSON_SPACE):
            json.loads(text)  # raises "Extra data" with its position
        return value
    except (ValueError, RecursionError) as error:  # JSONDecodeError; int beyond 4300 digits; deep nesting
        raise DecodeError("not_json", f"not JSON: {error}") from None


def _check_key(key, name: str) -> str:
    if type(key) is not str or not key:
        raise DecodeError("bad_key", f"{name!r}: must be a non-empty string, got {key!r:.40}")
    for char in _KEY_FORBIDDEN:
        if char in key:
            raise DecodeError("bad_key", f"{name!r}: {key!r:.40} contains {char!r}, not allowed in a topic")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError("bad_key", f"{name!r}: {key!r:.40} is not valid UTF-8") from None
    refused = refused_in_topics(key)
    if refused is not None:  # it ends up in a publish topic, which a broker may answer by closing the connection
        raise DecodeError("bad_key", f"{name!r}: {key!r:.40} contains {refused!r}, which MQTT brokers refuse in topics")
    return key


def _check_seq(seq, name: str) -> int:
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise DecodeError("bad_seq", f"{name!r}: must be an integer 0..2**63-1, got {seq!r:.40}")
    return seq


def _check_ts(ts, name: str) -> float:
    if type(ts) is float:
        if math.isfinite(ts):
            return ts
    elif type(ts) is int:
        try:
            return float(ts)
        except OverflowError:
            pass
    raise DecodeError("bad_ts", f"{name!r}: must be a finite number, got {ts!r:.40}")


class Decoder:
    """Decodes payloads of one pipeline: ``data_format`` "json" (default), "csv" or "raw".

    json: an object; the input vector is the list ``x_field`` or, with ``fields``, those scalar fields in
      order. ``seq_field``, ``ts_field`` optional (null counts as absent); ``key_field`` required when set.
    csv: one line of comma-separated values (no quoting), optional trailing newline. Without
      ``csv_columns``: exactly ``input_size`` numbers. With it: columns named ``seq_field``, ``ts_field``
      and ``key_field`` are metadata (an empty seq or ts cell counts as absent), the rest the inputs.
    raw: exactly ``input_size`` little-endian float32, nothing else.
    Any format: more than ``max_payload_bytes`` bytes is refused before parsing.
    """

    def __init__(self, data_format: str, input_size: int, *, x_field: str = X_FIELD, seq_field: str = SEQ_FIELD,
                 ts_field: str = TS_FIELD, key_field: str | None = None, fields: list[str] | None = None,
                 csv_columns: list[str] | None = None, max_payload_bytes: int = 65536):
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data_format: must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
        for name, value in (("input_size", input_size), ("max_payload_bytes", max_payload_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name, value in (("x_field", x_field), ("seq_field", seq_field), ("ts_field", ts_field)):
            _check_name(name, value)
        if key_field is not None:
            _check_name("key_field", key_field)
        if fields is not None and data_format != "json":
            raise ValueError(f"fields: only for data_format 'json', not {data_format!r}")
        if csv_columns is not None and data_format != "csv":
            raise ValueError(f"csv_columns: only for data_format 'csv', not {data_format!r}")
        self.data_format = data_format
        self.input_size = input_size
        self.max_payload_bytes = max_payload_bytes
        self.x_field, self.seq_field, self.ts_field, self.key_field = x_field, seq_field, ts_field, key_field
        self.fields = None if fields is None else list(fields)
        self.csv_columns = None if csv_columns is None else list(csv_columns)
        self._decode = {"json": self._plan_json, "csv": self._plan_csv, "raw": self._plan_raw}[data_format]()

    def decode(self, payload: bytes | bytearray | memoryview) -> Decoded:
        """The sample in ``payload``; raises `DecodeError` for anything wrong with it."""
        if len(payload) > self.max_payload_bytes:
            raise DecodeError("oversize", f"{len(payload)} bytes, more than max_payload_bytes "
                              f"({self.max_payload_bytes})")
        return self._decode(payload)

    # ---- the vector -------------------------------------------------------------------------------
    def _vector(self, numbers, where: str) -> np.ndarray:
        """``numbers`` (a list or tuple of exactly int/float, length checked) as a finite float32 array."""
        try:
            values = array.array("f", numbers)
        except OverflowError:  # an int beyond float64
            raise DecodeError("not_finite", f"{where}: a number too large for float32") from None
        if not math.isfinite(sum(values)):  # exactly when an element is nan or +-inf (module docstring)
            bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
            raise DecodeError("not_finite", f"{where}[{bad}] = {numbers[bad]!r:.40}: not a finite float32")
        return np.frombuffer(values, dtype=np.float32)

    # ---- json -------------------------------------------------------------------------------------
    def _plan_json(self):
        size, key_field = self.input_size, self.key_field
        seq_field, ts_field = self.seq_field, self.ts_field
        if self.fields is not None:
            fields = self.fields
            if len(fields) != size:
                raise ValueError(f"fields: {len(fields)} names for input_size {size}")
            for name in fields:
                _check_name("fields", name)
            data_fields = list(fields)
        else:
            data_fields = [self.x_field]
        names = data_fields + [seq_field, ts_field] + ([key_field] if key_field is not None else [])
        if len(set(names)) != len(names):
            raise ValueError(f"field names must differ: {names}")
        if self.fields is not None:
            getter = operator.itemgetter(*fields)
            self._fields_getter = (lambda obj: (getter(obj),)) if size == 1 else getter
            vector = self._json_fields_vector
        else:
            vector = self._json_list_vector

        def decode_json(payload) -> Decoded:
            obj = _parse_json(_text(payload))
            if type(obj) is not dict:
                raise DecodeError("not_object", f"a JSON object is expected, got {type(obj).__name__}")
            x = vector(obj)
            seq = obj.get(seq_field)
            if seq is not None:
                _check_seq(seq, seq_field)
            ts = obj.get(ts_field)
            if ts is not None:
                ts = _check_ts(ts, ts_field)
            key = None
            if key_field is not None:
                try:
                    key = _check_key(obj[key_field], key_field)
                except KeyError:
                    raise DecodeError("missing_field", f"no {key_field!r} field") from None
            return Decoded(x, seq, ts, key)

        return decode_json

    def _json_list_vector(self, obj: dict) -> np.ndarray:
        name = self.x_field
        try:
            numbers = obj[name]
        except KeyError:
            raise DecodeError("missing_field", f"no {name!r} field") from None
        if type(numbers) is not list:
            raise DecodeError("wrong_type", f"{name!r}: must be a list of numbers, got {type(numbers).__name__}")
        if len(numbers) != self.input_size:
            raise DecodeError("wrong_length", f"{name!r}: {len(numbers)} numbers, the model takes {self.input_size}")
        if not _NUMBER_TYPES.issuperset(map(type, numbers)):
            bad = next(v for v in numbers if type(v) not in _NUMBER_TYPES)
            raise DecodeError("wrong_type", f"{name!r}: {bad!r:.40} is not a number")
        return self._vector(numbers, name)

    def _json_fields_vector(self, obj: dict) -> np.ndarray:
        try:
            numbers = self._fields_getter(obj)
        except KeyError as error:
            raise DecodeError("missing_field", f"no {error.args[0]!r} field") from None
        if not _NUMBER_TYPES.issuperset(map(type, numbers)):
            name, bad = next((n, v) for n, v in zip(self.fields, numbers) if type(v) not in _NUMBER_TYPES)
            raise DecodeError("wrong_type", f"{name!r}: {bad!r:.40} is not a number")
        return self._vector(numbers, "fields")

    # ---- csv --------------------------------------------------------------------------------------
    def _plan_csv(self):
        size, key_field = self.input_size, self.key_field
        columns = self.csv_columns
        if columns is None:
            if key_field is not None:
                raise ValueError("key_field with data_format 'csv' needs csv_columns naming the key column")
            width, inputs, seq_at, ts_at, key_at = size, None, None, None, None
        else:
            for name in columns:
                _check_name("csv_columns", name)
            if len(set(columns)) != len(columns):
                raise ValueError(f"csv_columns: names must differ: {columns}")
            if key_field is not None and key_field not in columns:
                raise ValueError(f"key_field {key_field!r} is not one of csv_columns {columns}")
            meta = {self.seq_field, self.ts_field, key_field}
            inputs = [i for i, name in enumerate(columns) if name not in meta]
            if len(inputs) != size:
                raise ValueError(f"csv_columns: {len(inputs)} input columns for input_size {size}")
            width = len(columns)
            seq_at = columns.index(self.seq_field) if self.seq_field in columns else None
            ts_at = columns.index(self.ts_field) if self.ts_field in columns else None
            key_at = columns.index(key_field) if key_field is not None else None
            if inputs == list(range(size)):
                inputs = slice(0, size)
            else:
                picker = operator.itemgetter(*inputs)
                inputs = (lambda cells: (picker(cells),)) if size == 1 else picker
        seq_field, ts_field = self.seq_field, self.ts_field

        def decode_csv(payload) -> Decoded:
            text = _text(payload)
            if text[-1:] == "\n":
                text = text[:-2] if text[-2:] == "\r\n" else text[:-1]
            if "\n" in text or "\r" in text:
                raise DecodeError("bad_csv", "more than one line")
            cells = text.split(",")
            if len(cells) != width:
                raise DecodeError("wrong_length", f"{len(cells)} values, expected {width}")
            values = cells if inputs is None else cells[inputs] if type(inputs) is slice else inputs(cells)
            try:
                numbers = list(map(float, values))
            except ValueError:
                bad = next(v for v in values if not _is_float(v))
                raise DecodeError("bad_csv", f"{bad!r:.40} is not a number") from None
            x = self._vector(numbers, "values")
            seq = ts = key = None
            if seq_at is not None and cells[seq_at].strip():
                try:
                    seq = int(cells[seq_at])
                except ValueError:
                    raise DecodeError("bad_seq", f"{seq_field!r}: {cells[seq_at]!r:.40} is not an integer") from None
                _check_seq(seq, seq_field)
            if ts_at is not None and cells[ts_at].strip():
                try:
                    ts = float(cells[ts_at])
                except ValueError:
                    raise DecodeError("bad_ts", f"{ts_field!r}: {cells[ts_at]!r:.40} is not a number") from None
                ts = _check_ts(ts, ts_field)
            if key_at is not None:
                key = _check_key(cells[key_at].strip(), key_field)
            return Decoded(x, seq, ts, key)

        return decode_csv

    # ---- raw --------------------------------------------------------------------------------------
    def _plan_raw(self):
        if self.key_field is not None:
            raise ValueError("key_field: a raw payload has no fields; take the key from the topic")
        nbytes = 4 * self.input_size
        swap = sys.byteorder != "little"

        def decode_raw(payload) -> Decoded:
            if len(payload) != nbytes:
                raise DecodeError("wrong_length", f"{len(payload)} bytes, expected {nbytes} "
                                  f"({self.input_size} float32)")
            values = array.array("f")
            values.frombytes(payload)  # a copy: the caller's buffer may be reused
            if swap:
                values.byteswap()
            if not math.isfinite(sum(values)):
                bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
                raise DecodeError("not_finite", f"value {bad} = {values[bad]}: not finite")
            return Decoded(np.frombuffer(values, dtype=np.float32), None, None, None)

        return decode_raw


def _check_name(option: str, name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{option}: field names must be non-empty strings, got {name!r}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Encoder:
    """Encodes one prediction: "json" ``{"y": [...], "seq": s, "ts": t, "key": k}`` or "raw" float32.

    JSON floats are written with 9 significant digits, enough for every float32 to parse back to itself;
    NaN and infinities become null (JSON has none). ``seq`` and ``ts`` are left out when None.
    With a ``warm_field`` (a pipeline's ``warmup_steps`` with ``warmup_policy = "mark"``), a prediction
    encoded with ``warm=False`` carries ``"warm": false`` after ``y``; a warm one carries nothing more, so
    it reads exactly as without warm-up (a consumer checks ``payload.get("warm", True)``).
    """

    def __init__(self, output_format: str = "json", *, y_field: str = Y_FIELD, seq_field: str = SEQ_FIELD,
                 ts_field: str = TS_FIELD, key_field: str = KEY_FIELD, warm_field: str | None = None):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
        options = {"y_field": y_field, "seq_field": seq_field, "ts_field": ts_field, "key_field": key_field}
        if warm_field is not None:
            if output_format != "json":
                raise ValueError(f"warm_field: only for output_format 'json', not {output_format!r}")
            options["warm_field"] = warm_field
        names = list(options.values())
        for option, name in options.items():
            _check_name(option, name)
        if len(set(names)) != len(names):
            raise ValueError(f"field names must differ: {names}")
        self.output_format = output_format
        self._open = "{" + json.dumps(y_field) + ":["
        self._seq = "," + json.dumps(seq_field) + ":"
        self._ts = "," + json.dumps(ts_field) + ":"
        self._key = "," + json.dumps(key_field) + ":"
        self._cold = None if warm_field is None else "," + json.dumps(warm_field) + ":false"

    def encode(self, key: str, y: np.ndarray, seq: int | None, ts: float | None, warm: bool = True) -> bytes:
        """The payload of one prediction; ``y`` is (output_size,) float32; ``warm=False`` marks it (class
        docstring; refused without a ``warm_field``)."""
        if not warm and self._cold is None:
            raise ValueError("warm=False needs an Encoder made with a warm_field (JSON output)")
        if self.output_format == "raw":
            return np.ascontiguousarray(y, dtype="<f4").tobytes()
        if y.dtype != np.float32:
            y = y.astype(np.float32)
        body = ",".join(map("%.9g".__mod__, y.tolist()))
        if "n" in body:  # 'nan' or 'inf': numbers are written with digits, '.', '-', '+' and 'e' only
            body = ",".join(["%.9g" % v if math.isfinite(v) else "null" for v in y.tolist()])
        parts = [self._open, body, "]"]
        if not warm:
            parts.append(self._cold)
        if seq is not None:
            parts += [self._seq, "%d" % seq]
        if ts is not None:
            ts = float(ts)
            parts += [self._ts, repr(ts) if math.isfinite(ts) else "null"]
        if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
            parts += [self._key, '"', key, '"}']
        else:
            parts += [self._key, json.dumps(key), "}"]
        return "".join(parts).encode("ascii")


def dead_letter(pipeline: str, topic: str, payload: bytes, reason: str, message: str) -> bytes:
    """The JSON published to the dead-letter topic for a rejected payload.

    ``payload`` is the text when the (kept part of the) payload is UTF-8, else null; ``payload_base64``
    always holds the bytes. At most `DEAD_LETTER_MAX_PAYLOAD` bytes are kept (``"truncated": true``).
    """
    truncated = len(payload) > DEAD_LETTER_MAX_PAYLOAD
    data = bytes(payload[:DEAD_LETTER_MAX_PAYLOAD])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        text = None
        if truncated and error.end == len(data) and error.reason == "unexpected end of data":
            text = data[:error.start].decode("utf-8")  # the cut split a character: drop its first bytes
    letter = {"pipeline": pipeline, "topic": topic, "reason": reason, "error": message, "payload": text,
              "payload_base64": base64.b64encode(data).decode("ascii"), "truncated": truncated}
    return json.dumps(letter).encode("ascii")
