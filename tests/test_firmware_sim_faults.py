"""firmware_sim.faults: the spec parser, and what each fault does to a device's stream, reproducibly.

The daemon's own decoder is the oracle for "malformed": every malformed payload must be one it rejects,
and every other payload one it accepts (or, for NaN, rejects as not finite).
"""

import json
import math

import pytest

from edgernn.firmware_sim.faults import MALFORMED_KINDS, FaultInjector, Faults, encode_sample
from edgernn.firmware_sim.signals import make_signal
from edgernn.runtime.codecs import DecodeError, Decoder

SPEC = "drop=0.01,duplicate=0.01,reorder=0.01,nan=0.005,stuck=0.001,malformed=0.005,storm_every=20"


def stream(faults: Faults, samples: int = 2000, seed="faults/0/0"):
    """The messages one IMU device publishes for ``samples`` samples, and its injector."""
    injector = FaultInjector(faults, seed)
    signal = make_signal("imu", 50.0, seed=7)
    clean, out = [], []
    for seq in range(samples):
        values, _ = signal.next()
        clean.append(values)
        out += injector.inject(seq, values, 1000.0 + seq / 50)
    out += injector.release()
    return out, injector, clean


def test_parse_the_documented_spec():
    faults = Faults.parse(SPEC)
    assert faults == Faults(drop=0.01, duplicate=0.01, reorder=0.01, nan=0.005, stuck=0.001, malformed=0.005,
                            storm_every=20.0)
    assert Faults.parse(faults.spec()) == faults
    assert Faults.parse("") == Faults.parse("none") == Faults.parse(None) == Faults()
    assert Faults().spec() == "none" and not Faults().any_message_faults
    assert Faults.parse(" drop = 0.5 , stuck_run=3 ,").stuck_run == 3


@pytest.mark.parametrize("spec, message", [
    ("dorp=0.1", "unknown setting 'dorp' (known: drop, duplicate"),
    ("drop", "'drop' is not NAME=VALUE"),
    ("drop=lots", "drop='lots' is not a number"),
    ("drop=1.5", "drop is a probability per message, 0 to 1; got 1.5"),
    ("nan=-0.1", "nan is a probability"),
    ("drop=nan", "drop is a probability"),
    ("drop=0.1,drop=0.2", "drop is given twice"),
    ("stuck_run=0", "stuck_run is a mean run length"),
    ("stuck_run=2.5", "stuck_run='2.5' is not a whole number"),
    ("storm_every=-1", "storm_every is seconds"),
    ("storm_fraction=0", "storm_fraction is the share"),
    ("storm_downtime=-2", "storm_downtime is seconds"),
])
def test_parse_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as error:
        Faults.parse(spec)
    assert message in str(error.value)


def test_the_same_seed_gives_the_same_faulted_stream():
    faults = Faults(drop=0.05, duplicate=0.05, reorder=0.05, nan=0.05, stuck=0.02, malformed=0.05)
    first, injector, _ = stream(faults)
    again, _, _ = stream(faults)
    other, _, _ = stream(faults, seed="faults/0/1")
    assert first == again
    assert first != other
    assert all(count > 0 for count in injector.counts.values()), injector.counts


def test_no_faults_is_the_clean_stream():
    out, injector, clean = stream(Faults(), 100)
    assert [m.seq for m in out] == list(range(100))
    assert {m.kind for m in out} == {"ok"}
    assert [json.loads(m.payload)["x"] for m in out] == clean
    assert out[3].payload == encode_sample(clean[3], 3, 1000.0 + 3 / 50)


def test_drop_leaves_gaps_in_seq():
    out, injector, _ = stream(Faults(drop=0.2))
    seqs = [m.seq for m in out]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert injector.counts["drop"] == 2000 - len(out)
    assert 300 < injector.counts["drop"] < 500  # about 20 %


def test_duplicate_publishes_the_same_payload_twice_in_a_row():
    out, injector, _ = stream(Faults(duplicate=0.2))
    copies = [i for i, m in enumerate(out) if m.kind == "duplicate"]
    assert len(copies) == injector.counts["duplicate"] > 0
    for i in copies:
        assert out[i - 1].seq == out[i].seq and out[i - 1].payload == out[i].payload
    assert sorted({m.seq for m in out}) == list(range(2000))


def test_reorder_swaps_a_message_with_the_next():
    out, injector, _ = stream(Faults(reorder=1.0), samples=7)
    assert [m.seq for m in out] == [1, 0, 3, 2, 5, 4, 6]  # the last one held has no next: released at the end
    assert [m.kind for m in out][:2] == ["ok", "reordered"]
    out, injector, _ = stream(Faults(reorder=0.1))
    seqs = [m.seq for m in out]
    assert sorted(seqs) == list(range(2000))
    swaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b < a)
    assert swaps == injector.counts["reorder"] > 100


def test_nan_puts_one_nan_in_the_values_and_the_decoder_refuses_it():
    out, injector, clean = stream(Faults(nan=0.1))
    decoder = Decoder("json", 6)
    nans = [m for m in out if m.kind == "nan"]
    assert len(nans) == injector.counts["nan"] > 100
    for message in nans:
        x = json.loads(message.payload)["x"]
        assert sum(math.isnan(v) for v in x) == 1
        assert [v for v in x if not math.isnan(v)] == [v for v, w in zip(clean[message.seq], x) if not math.isnan(w)]
        with pytest.raises(DecodeError) as error:
            decoder.decode(message.payload)
        assert error.value.reason == "not_finite"


def test_stuck_holds_one_channel_at_its_last_value_for_a_run():
    out, injector, clean = stream(Faults(stuck=0.01, stuck_run=10))
    assert injector.counts["stuck"] > 5
    stuck = [m for m in out if m.kind == "stuck"]
    assert len(stuck) > injector.counts["stuck"]  # runs are longer than one sample
    by_seq = {m.seq: json.loads(m.payload)["x"] for m in out}
    for message in stuck:
        x = by_seq[message.seq]
        changed = [c for c in range(6) if x[c] != clean[message.seq][c]]
        assert len(changed) <= 1  # one channel frozen (it may equal the clean value by chance: never here)
        channel = changed[0]
        assert x[channel] == by_seq[message.seq - 1][channel]  # the value it had the sample before


def test_malformed_payloads_are_each_rejected_and_the_rest_accepted():
    out, injector, _ = stream(Faults(malformed=0.2))
    decoder = Decoder("json", 6)
    reasons = set()
    for message in out:
        if message.kind == "malformed":
            with pytest.raises(DecodeError) as error:
                decoder.decode(message.payload)
            reasons.add(error.value.reason)
        else:
            assert decoder.decode(message.payload).seq == message.seq
    assert sum(m.kind == "malformed" for m in out) == injector.counts["malformed"] > 300
    assert all(injector.malformed_counts[kind] > 0 for kind in MALFORMED_KINDS), injector.malformed_counts
    assert {"not_json", "missing_field", "wrong_type", "wrong_length"} <= reasons


def test_faults_combine():
    out, injector, _ = stream(Faults(nan=0.3, duplicate=0.3, reorder=0.3))
    kinds = {m.kind for m in out}
    assert {"ok", "nan", "duplicate", "reordered", "nan+reordered"} <= kinds
    assert sorted({m.seq for m in out}) == list(range(2000))


@pytest.mark.parametrize("values", [[0.25, -1.0, 3.0], [math.nan, 1.0, 2.0]])
def test_a_label_rides_in_the_payload_and_the_daemon_ignores_it(values):
    payload = encode_sample(values, 7, 12.5, "walk")
    body = json.loads(payload)
    assert body["label"] == "walk" and body["seq"] == 7 and body["ts"] == 12.5
    assert encode_sample(values, 7, 12.5) != payload and "label" not in json.loads(encode_sample(values, 7, 12.5))
    if math.isfinite(sum(values)):
        decoded = Decoder("json", 3).decode(payload)
        assert list(decoded.x) == values and decoded.seq == 7


def test_faulted_messages_carry_the_label_too():
    injector = FaultInjector(Faults(duplicate=1.0), seed=1)
    messages = injector.inject(0, [1.0, 2.0], 0.0, "run")
    assert len(messages) == 2 and all(json.loads(m.payload)["label"] == "run" for m in messages)
