"""Payload codecs (runtime/codecs.py): every reject reason, every format, round trips, fuzzed payloads."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgernn.errors import InputError
from edgernn.protocol import refused_in_topics
from edgernn.runtime.codecs import (DEAD_LETTER_MAX_PAYLOAD, REJECT_REASONS, DecodeError, Decoded, Decoder, Encoder,
                                    dead_letter)

pytestmark = pytest.mark.filterwarnings("error")  # a payload must not even make NumPy warn
FAST = settings(max_examples=300, deadline=None)


def rejects(decoder: Decoder, payload, reason: str) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decoder.decode(payload)
    assert caught.value.reason == reason, str(caught.value)
    return caught.value


def check_sample(decoded: Decoded, size: int) -> None:
    assert isinstance(decoded.x, np.ndarray) and decoded.x.dtype == np.float32 and decoded.x.shape == (size,)
    assert np.isfinite(decoded.x).all()


# ---- DecodeError -------------------------------------------------------------------------------------
def test_decode_error_is_an_input_error_with_a_reason():
    error = DecodeError("not_json", "not JSON: Expecting value")
    assert isinstance(error, InputError) and isinstance(error, ValueError)
    assert error.reason == "not_json" and error.message == "not JSON: Expecting value"
    assert str(error) == "not_json: not JSON: Expecting value"
    with pytest.raises(ValueError, match="unknown reject reason"):
        DecodeError("weird", "x")


def test_reject_reasons_are_stable_label_values():
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS) == 12
    assert all(reason.replace("_", "").isalnum() and reason.islower() for reason in REJECT_REASONS)


# ---- every reason, with a payload that triggers it -------------------------------------------------
JSON = Decoder("json", 3)
JSON_KEYED = Decoder("json", 3, key_field="device")
CSV = Decoder("csv", 3)
CSV_COLUMNS = Decoder("csv", 3, csv_columns=["seq", "ts", "device", "ax", "ay", "az"], key_field="device")
RAW = Decoder("raw", 3)

REJECTED = [
    (JSON, b"{" + b" " * 65536 + b"}", "oversize"),
    (CSV, b"\xff" * 70000, "oversize"),
    (RAW, b"\0" * 65537, "oversize"),
    (JSON, b'{"x": [1, 2, 3], "k": "\xff"}', "not_utf8"),
    (JSON, '{"x": [1, 2, 3]}'.encode("utf-16"), "not_utf8"),
    (CSV, b"1,2,\xc3", "not_utf8"),
    (JSON, b"", "not_json"),
    (JSON, b"   ", "not_json"),
    (JSON, b'{"x": [1, 2, 3]', "not_json"),
    (JSON, b'{"x": [1, 2, 3]} {}', "not_json"),
    (JSON, b"{'x': [1, 2, 3]}", "not_json"),
    (JSON, '\ufeff{"x": [1, 2, 3]}'.encode(), "not_json"),
    (JSON, b'{"x": [1, 2, ' + b"9" * 5000 + b"]}", "not_json"),  # beyond Python's int digit limit
    (JSON, b"[" * 30000 + b"]" * 30000, "not_json"),  # nesting deeper than the recursion limit
    (JSON, b"[1, 2, 3]", "not_object"),
    (JSON, b"3", "not_object"),
    (JSON, b'"x"', "not_object"),
    (JSON, b"null", "not_object"),
    (JSON, b'{"y": [1, 2, 3]}', "missing_field"),
    (JSON_KEYED, b'{"x": [1, 2, 3]}', "missing_field"),
    (JSON, b'{"x": "1,2,3"}', "wrong_type"),
    (JSON, b'{"x": {"0": 1}}', "wrong_type"),
    (JSON, b'{"x": null}', "wrong_type"),
    (JSON, b'{"x": [1, true, 3]}', "wrong_type"),
    (JSON, b'{"x": [1, "2", 3]}', "wrong_type"),
    (JSON, b'{"x": [1, null, 3]}', "wrong_type"),
    (JSON, b'{"x": [1, [2], 3]}', "wrong_type"),
    (JSON, b'{"x": [1, 2]}', "wrong_length"),
    (JSON, b'{"x": [1, 2, 3, 4]}', "wrong_length"),
    (JSON, b'{"x": []}', "wrong_length"),
    (CSV, b"1,2", "wrong_length"),
    (CSV, b"1,2,3,", "wrong_length"),
    (CSV_COLUMNS, b"1,2,dev,4,5", "wrong_length"),
    (RAW, b"\0" * 11, "wrong_length"),
    (RAW, b"\0" * 16, "wrong_length"),
    (JSON, b'{"x": [1, NaN, 3]}', "not_finite"),
    (JSON, b'{"x": [Infinity, 2, 3]}', "not_finite"),
    (JSON, b'{"x": [1, 2, -Infinity]}', "not_finite"),
    (JSON, b'{"x": [1, 2, 1e400]}', "not_finite"),  # Python parses it as inf
    (JSON, b'{"x": [1, 2, 1e39]}', "not_finite"),  # finite in float64, inf in float32
    (JSON, b'{"x": [1, 2, -1000000000000000000000000000000000000000]}', "not_finite"),
    (JSON, b'{"x": [1, 2, 1' + b"0" * 400 + b"]}", "not_finite"),  # beyond float64
    (CSV, b"1,nan,3", "not_finite"),
    (CSV, b"1,2,-inf", "not_finite"),
    (CSV, b"1,2,1e39", "not_finite"),
    (RAW, np.array([1, np.nan, 3], dtype="<f4").tobytes(), "not_finite"),
    (RAW, np.array([1, 2, -np.inf], dtype="<f4").tobytes(), "not_finite"),
    (JSON, b'{"x": [1, 2, 3], "seq": -1}', "bad_seq"),
    (JSON, b'{"x": [1, 2, 3], "seq": 1.0}', "bad_seq"),
    (JSON, b'{"x": [1, 2, 3], "seq": true}', "bad_seq"),
    (JSON, b'{"x": [1, 2, 3], "seq": "5"}', "bad_seq"),
    (JSON, b'{"x": [1, 2, 3], "seq": 9223372036854775808}', "bad_seq"),
    (CSV_COLUMNS, b"1.5,0,dev,1,2,3", "bad_seq"),
    (CSV_COLUMNS, b"-1,0,dev,1,2,3", "bad_seq"),
    (JSON, b'{"x": [1, 2, 3], "ts": "2024-01-01"}', "bad_ts"),
    (JSON, b'{"x": [1, 2, 3], "ts": NaN}', "bad_ts"),
    (JSON, b'{"x": [1, 2, 3], "ts": Infinity}', "bad_ts"),
    (JSON, b'{"x": [1, 2, 3], "ts": false}', "bad_ts"),
    (JSON, b'{"x": [1, 2, 3], "ts": 1' + b"0" * 400 + b"}", "bad_ts"),
    (CSV_COLUMNS, b"1,noon,dev,1,2,3", "bad_ts"),
    (CSV_COLUMNS, b"1,inf,dev,1,2,3", "bad_ts"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": ""}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": 17}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": null}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": "a+b"}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": "a/#"}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": "a\\u0000"}', "bad_key"),
    (JSON_KEYED, b'{"x": [1, 2, 3], "device": "\\ud800"}', "bad_key"),  # a lone surrogate: not publishable
    (CSV_COLUMNS, b"1,0, ,1,2,3", "bad_key"),
    (CSV, b"1,2,three", "bad_csv"),
    (CSV, b"1,,3", "bad_csv"),
    (CSV, b"1,2,3\n4,5,6", "bad_csv"),
    (CSV, b"1,2,3\n\n", "bad_csv"),
    (CSV, b"1,2\r,3", "bad_csv"),
    (CSV_COLUMNS, b"1,0,dev,1,x,3", "bad_csv"),
]


@pytest.mark.parametrize("decoder, payload, reason", REJECTED)
def test_each_bad_payload_is_rejected_with_its_reason(decoder, payload, reason):
    error = rejects(decoder, payload, reason)
    assert isinstance(error, InputError) and error.message


def test_every_reason_has_a_payload_that_triggers_it():
    assert {reason for _, _, reason in REJECTED} == set(REJECT_REASONS)


# ---- json ------------------------------------------------------------------------------------------
def test_json_sample_with_every_field():
    decoded = JSON.decode(b'{"x": [0.5, -2, 3.25], "seq": 7, "ts": 1700000000.5, "other": {"ignored": NaN}}')
    check_sample(decoded, 3)
    assert decoded.x.tolist() == [0.5, -2.0, 3.25]
    assert (decoded.seq, decoded.ts, decoded.key) == (7, 1700000000.5, None)


def test_json_optional_fields_absent_or_null():
    for payload in (b'{"x": [1, 2, 3]}', b'{"x": [1, 2, 3], "seq": null, "ts": null}'):
        decoded = JSON.decode(payload)
        assert (decoded.seq, decoded.ts, decoded.key) == (None, None, None)


def test_json_edge_values_accepted():
    decoded = JSON.decode(b' \n{"x": [3.4028234e38, -1e-45, 0], "seq": 9223372036854775807, "ts": 1700000000}\t\r\n')
    assert decoded.x.tolist() == [np.float32(3.4028234e38), np.float32(-1e-45), 0.0]
    assert decoded.seq == 2**63 - 1 and decoded.ts == 1700000000.0 and type(decoded.ts) is float
    assert JSON.decode(b'{"x": [1, 2, 3], "seq": 0}').seq == 0


def test_json_custom_field_names_and_key():
    decoder = Decoder("json", 2, x_field="v", seq_field="n", ts_field="t", key_field="id")
    decoded = decoder.decode('{"v": [1, 2], "n": 3, "t": 4.5, "id": "site/dévice-1"}'.encode())
    assert (decoded.x.tolist(), decoded.seq, decoded.ts, decoded.key) == ([1.0, 2.0], 3, 4.5, "site/dévice-1")
    rejects(decoder, b'{"x": [1, 2], "id": "a"}', "missing_field")


def test_json_named_scalar_fields_form_the_vector_in_order():
    decoder = Decoder("json", 3, fields=["az", "ax", "ay"])
    decoded = decoder.decode(b'{"ax": 1, "ay": 2.5, "az": -3, "seq": 4}')
    assert decoded.x.tolist() == [-3.0, 1.0, 2.5] and decoded.seq == 4
    error = rejects(decoder, b'{"ax": 1, "az": 3}', "missing_field")
    assert "'ay'" in error.message
    error = rejects(decoder, b'{"ax": 1, "ay": true, "az": 3}', "wrong_type")
    assert "'ay'" in error.message
    rejects(decoder, b'{"ax": 1, "ay": [2], "az": 3}', "wrong_type")
    rejects(decoder, b'{"ax": 1, "ay": NaN, "az": 3}', "not_finite")
    single = Decoder("json", 1, fields=["t"])
    assert single.decode(b'{"t": 21.5}').x.tolist() == [21.5]
    rejects(single, b'{"t": "21.5"}', "wrong_type")


def test_payload_may_be_bytes_bytearray_or_memoryview():
    payload = b'{"x": [1, 2, 3], "seq": 1}'
    for view in (payload, bytearray(payload), memoryview(payload)):
        assert JSON.decode(view).x.tolist() == [1, 2, 3]
    raw = np.array([1, 2, 3], dtype="<f4").tobytes()
    assert RAW.decode(memoryview(raw)).x.tolist() == [1, 2, 3]
    assert CSV.decode(bytearray(b"1,2,3")).x.tolist() == [1, 2, 3]


def test_sample_owns_its_vector():
    for decoder, payload in ((JSON, b'{"x": [1, 2, 3]}'), (CSV, b"1,2,3"),
                             (RAW, np.array([1, 2, 3], dtype="<f4").tobytes())):
        buffer = bytearray(payload)
        x = decoder.decode(buffer).x
        buffer[:] = b"\0" * len(buffer)
        assert x.tolist() == [1, 2, 3] and x.flags.writeable and x.flags.c_contiguous


def test_oversize_is_checked_before_anything_else():
    decoder = Decoder("json", 3, max_payload_bytes=20)
    assert decoder.decode(b'{"x":[1,2,3]}').x.tolist() == [1, 2, 3]
    payload = b'{"x": [1, 2, 3]}    '
    assert len(payload) == 20 and decoder.decode(payload).seq is None  # exactly the limit is fine
    error = rejects(decoder, b"\xff" * 21, "oversize")
    assert "21 bytes" in error.message and "20" in error.message


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 33, 64, 100])
def test_every_non_finite_element_is_caught_in_every_position(size):
    """The finiteness check is one sum (see the module docstring): prove it per position, with large neighbours."""
    json_decoder, raw_decoder = Decoder("json", size), Decoder("raw", size)
    for position in range(size):
        for bad, literal in ((np.nan, "NaN"), (np.inf, "Infinity"), (-np.inf, "-Infinity")):
            values = [1e30] * size
            values[position] = bad
            rejects(raw_decoder, np.array(values, dtype="<f4").tobytes(), "not_finite")
            text = ",".join(literal if i == position else "-3.4e38" for i in range(size))
            error = rejects(json_decoder, ('{"x": [%s]}' % text).encode(), "not_finite")
            assert f"[{position}]" in error.message
    big = np.full(size, np.finfo(np.float32).max, dtype="<f4")
    check_sample(raw_decoder.decode(big.tobytes()), size)
    decoded = json_decoder.decode(('{"x": [%s]}' % ",".join(["3.4028234e38"] * size)).encode())
    assert decoded.x.tolist() == big.tolist()


# ---- csv ---------------------------------------------------------------------------------------------
def test_csv_line_of_numbers():
    for payload in (b"1,2.5,-3e2", b"1,2.5,-3e2\n", b"1,2.5,-3e2\r\n", b" 1, 2.5 ,-3e2"):
        decoded = CSV.decode(payload)
        assert decoded.x.tolist() == [1.0, 2.5, -300.0]
        assert (decoded.seq, decoded.ts, decoded.key) == (None, None, None)


def test_csv_columns_carry_metadata():
    decoded = CSV_COLUMNS.decode(b"12,1700000000.25, dev-1 ,0.5,1,2\n")
    assert decoded.x.tolist() == [0.5, 1.0, 2.0]
    assert (decoded.seq, decoded.ts, decoded.key) == (12, 1700000000.25, "dev-1")
    decoded = CSV_COLUMNS.decode(b",,dev-1,0.5,1,2")  # empty seq and ts cells: absent
    assert (decoded.seq, decoded.ts) == (None, None)
    interleaved = Decoder("csv", 2, csv_columns=["ax", "seq", "ay"])
    decoded = interleaved.decode(b"1,5,2")
    assert decoded.x.tolist() == [1.0, 2.0] and decoded.seq == 5
    single = Decoder("csv", 1, csv_columns=["ts", "t"])
    assert single.decode(b"3.5,21").x.tolist() == [21.0]
    renamed = Decoder("csv", 1, csv_columns=["n", "t"], seq_field="n")
    assert renamed.decode(b"9,21").seq == 9


# ---- raw ---------------------------------------------------------------------------------------------
def test_raw_little_endian_float32():
    values = np.array([1.5, -2.25, 3e-38], dtype="<f4")
    decoded = RAW.decode(values.tobytes())
    assert decoded.x.dtype == np.float32 and decoded.x.tolist() == values.tolist()
    assert (decoded.seq, decoded.ts, decoded.key) == (None, None, None)
    assert RAW.decode(values.astype(">f4").tobytes()).x.tolist() != values.tolist()


# ---- construction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, kwargs, problem", [
    (("xml", 3), {}, "data_format"),
    (("json", 0), {}, "input_size"),
    (("json", True), {}, "input_size"),
    (("json", 3), {"max_payload_bytes": 0}, "max_payload_bytes"),
    (("json", 3), {"fields": ["a", "b"]}, "2 names for input_size 3"),
    (("json", 3), {"fields": ["a", "b", "a"]}, "must differ"),
    (("json", 3), {"key_field": "seq"}, "must differ"),
    (("json", 3), {"x_field": ""}, "non-empty"),
    (("csv", 3), {"fields": ["a", "b", "c"]}, "only for data_format 'json'"),
    (("json", 3), {"csv_columns": ["a", "b", "c"]}, "only for data_format 'csv'"),
    (("csv", 3), {"csv_columns": ["seq", "a", "b"]}, "2 input columns for input_size 3"),
    (("csv", 2), {"csv_columns": ["a", "a"]}, "must differ"),
    (("csv", 2), {"key_field": "device"}, "needs csv_columns"),
    (("csv", 2), {"key_field": "device", "csv_columns": ["a", "b"]}, "not one of csv_columns"),
    (("raw", 2), {"key_field": "device"}, "raw payload has no fields"),
])
def test_decoder_configuration_errors(args, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        Decoder(*args, **kwargs)


# ---- Encoder -----------------------------------------------------------------------------------------
def test_encoder_json_layout():
    y = np.array([0.1, -2.5, 3e-7], dtype=np.float32)
    payload = Encoder().encode("dev-1", y, 7, 1700000000.125)
    assert payload.startswith(b'{"y":[0.100000001,-2.5,3.00000011e-07],"seq":7,"ts":1700000000.125,"key":"dev-1"}')
    assert list(json.loads(payload)) == ["y", "seq", "ts", "key"]
    assert json.loads(Encoder().encode("k", y, None, None)) == {"y": json.loads(payload)["y"], "key": "k"}
    assert json.loads(Encoder().encode("k", y, 3, None)).keys() == {"y", "seq", "key"}
    assert json.loads(Encoder().encode("k", y, None, 1700000000)) ["ts"] == 1700000000.0


def test_encoder_custom_field_names():
    encoder = Encoder(y_field="pred", seq_field="n", ts_field="t", key_field="stream")
    decoded = json.loads(encoder.encode("k", np.ones(2, np.float32), 1, 2.0))
    assert decoded == {"pred": [1, 1], "n": 1, "t": 2.0, "stream": "k"}
    with pytest.raises(ValueError, match="must differ"):
        Encoder(y_field="key")
    with pytest.raises(ValueError, match="output_format"):
        Encoder("csv")


def test_encoder_writes_non_finite_as_null():
    y = np.array([np.nan, 1.0, np.inf, -np.inf], dtype=np.float32)
    decoded = json.loads(Encoder().encode("k", y, None, None))
    assert decoded["y"] == [None, 1.0, None, None]


@pytest.mark.parametrize("key", ['quote"d', "back\\slash", "tab\tnewline\n", "ünïcödé/ключ", "\x7f", "\ud800"])
def test_encoder_escapes_any_key(key):
    payload = Encoder().encode(key, np.zeros(1, np.float32), None, None)
    assert json.loads(payload)["key"] == key
    payload.decode("ascii")


def test_encoder_casts_other_dtypes_to_float32():
    payload = Encoder().encode("k", np.array([0.1, 2.0]), None, None)
    assert [np.float32(v) for v in json.loads(payload)["y"]] == [np.float32(0.1), np.float32(2.0)]


def test_encoder_raw():
    y = np.array([1.5, -2.0, np.nan], dtype=np.float32)
    payload = Encoder("raw").encode("k", y, 3, 4.0)
    assert payload == y.astype("<f4").tobytes()
    assert Encoder("raw").encode("k", np.array([1.5, -2.0]), None, None) == np.array([1.5, -2.0], "<f4").tobytes()


FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@FAST
@given(st.lists(FLOAT32, min_size=1, max_size=16), st.none() | st.integers(0, 2**63 - 1),
       st.none() | st.floats(allow_nan=False, allow_infinity=False), st.text(min_size=1, max_size=12))
def test_encoded_prediction_round_trips_exactly_and_short(values, seq, ts, key):
    y = np.array(values, dtype=np.float32)
    payload = Encoder().encode(key, y, seq, ts)
    decoded = json.loads(payload)
    assert np.array_equal(np.array(decoded["y"], dtype=np.float32), y)
    assert all(len(token) <= 15 for token in payload.split(b"[", 1)[1].split(b"]", 1)[0].split(b","))
    assert decoded.get("seq") == seq and decoded.get("ts") == ts and decoded["key"] == key


@FAST
@given(st.lists(FLOAT32, min_size=3, max_size=3), st.none() | st.integers(0, 2**63 - 1),
       st.none() | st.floats(allow_nan=False, allow_infinity=False),
       st.text(min_size=1, max_size=12).filter(lambda k: not any(c in k for c in "+#\0") and k.strip() == k
                                               and not any(0xD800 <= ord(c) <= 0xDFFF for c in k)
                                               and refused_in_topics(k) is None))
def test_a_prediction_decodes_back_to_the_same_sample(values, seq, ts, key):
    y = np.array(values, dtype=np.float32)
    decoder = Decoder("json", 3, x_field="y", key_field="key")
    decoded = decoder.decode(Encoder().encode(key, y, seq, ts))
    assert np.array_equal(decoded.x, y) and (decoded.seq, decoded.ts, decoded.key) == (seq, ts, key)
    assert np.array_equal(RAW.decode(Encoder("raw").encode(key, y, seq, ts)).x, y)


# ---- dead letters ------------------------------------------------------------------------------------
def test_dead_letter_carries_text_and_bytes():
    letter = json.loads(dead_letter("imu", "sensors/dev1/imu", b'{"x": [1, 2]}', "wrong_length", "2 numbers"))
    assert letter == {"pipeline": "imu", "topic": "sensors/dev1/imu", "reason": "wrong_length", "error": "2 numbers",
                      "payload": '{"x": [1, 2]}', "payload_base64": base64.b64encode(b'{"x": [1, 2]}').decode(),
                      "truncated": False}


def test_dead_letter_of_binary_payload():
    letter = json.loads(dead_letter("imu", "t", b"\xff\x00\x01", "not_utf8", "not UTF-8 at byte 0"))
    assert letter["payload"] is None and base64.b64decode(letter["payload_base64"]) == b"\xff\x00\x01"


def test_dead_letter_truncates_big_payloads():
    payload = b"a" * 5000
    letter = json.loads(dead_letter("imu", "t", memoryview(payload), "oversize", "too big"))
    assert letter["truncated"] is True and letter["payload"] == "a" * DEAD_LETTER_MAX_PAYLOAD
    assert base64.b64decode(letter["payload_base64"]) == payload[:DEAD_LETTER_MAX_PAYLOAD]
    cut_in_a_character = "a" + "é" * 3000  # the 4096th byte is the first half of an 'é'
    letter = json.loads(dead_letter("imu", "t", cut_in_a_character.encode(), "oversize", "too big"))
    assert letter["payload"] == cut_in_a_character[:2048] and len(base64.b64decode(letter["payload_base64"])) == 4096


# ---- fuzzing: nothing but DecodeError, and every success is a finite float32 vector -------------------
FUZZED_DECODERS = [
    JSON, JSON_KEYED, Decoder("json", 2, fields=["a", "b"]), CSV, CSV_COLUMNS, RAW, Decoder("raw", 1),
    Decoder("json", 1, max_payload_bytes=64),
]


def decodes_cleanly(decoder: Decoder, payload: bytes) -> None:
    try:
        decoded = decoder.decode(payload)
    except DecodeError as error:
        assert error.reason in REJECT_REASONS
        return
    check_sample(decoded, decoder.input_size)
    assert decoded.seq is None or (type(decoded.seq) is int and 0 <= decoded.seq < 2**63)
    assert decoded.ts is None or (type(decoded.ts) is float and math.isfinite(decoded.ts))
    assert decoded.key is None or (type(decoded.key) is str and decoded.key)


@FAST
@given(st.binary(max_size=80))
def test_arbitrary_bytes_only_ever_raise_decode_error(payload):
    for decoder in FUZZED_DECODERS:
        decodes_cleanly(decoder, payload)


SCALARS = (st.floats() | st.integers(-2**70, 2**70) | st.booleans() | st.none() | st.text(max_size=4)
           | st.sampled_from([1e39, -3.5e38, 2**63, -1, 0]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["x", "a", "b", "seq", "ts", "key", "device"]), inner,
                                             max_size=4), max_leaves=12)


@st.composite
def sample_like_objects(draw):
    """Objects near a valid sample, so the fuzzing reaches every check rather than stopping at not_json."""
    obj = draw(st.dictionaries(st.sampled_from(["a", "b", "seq", "ts", "key", "device", "z"]), JSON_VALUES, max_size=5))
    if draw(st.booleans()):
        obj["x"] = draw(st.lists(SCALARS, min_size=2, max_size=4) | JSON_VALUES)
    return json.dumps(obj).encode()


@FAST
@given(sample_like_objects())
def test_json_like_payloads_only_ever_raise_decode_error(payload):
    for decoder in FUZZED_DECODERS:
        decodes_cleanly(decoder, payload)


@FAST
@given(st.lists(st.sampled_from(["1", "-2.5", "", " ", "nan", "1e39", "x", "7", "dev", "\n", "\r", "+", "#", "1_0"]),
                min_size=1, max_size=8).map(",".join).map(str.encode))
def test_csv_like_payloads_only_ever_raise_decode_error(payload):
    for decoder in FUZZED_DECODERS:
        decodes_cleanly(decoder, payload)
