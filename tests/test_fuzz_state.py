"""Fuzzed messages through the daemon's own micro-batch path: state moves only for valid input.

`Scheduler.process` is what the daemon's worker calls per micro-batch (route, `Pipeline.decode`, reject or
`Pipeline.advance`, publish, ack). Here it runs in-process on a real `Pipeline` built from a config file,
with a link that records what would go to the broker and confirms it at once (the network is
reliability/fuzz_live.py's part). Each example is a list of messages mixing arbitrary bytes, near-valid
JSON (wrong lengths, NaN/Infinity, huge numbers, nesting, wrong types, unicode keys, bad seq/ts) on
arbitrary topics, with valid samples (and redeliveries) of a few tracked streams. Properties:

- nothing escapes `process` and no micro-batch fails (``rejected{reason="internal"}`` stays 0);
- a message that yields no prediction (rejected, a duplicate, or outside the subscription) leaves the table
  bitwise as it was: states, per-stream columns, keys (and, for a rejected one, their LRU order);
- every message is acked exactly once and in the order received (MQTT 3.1.1 section 4.6: a broker may
  reorder what it delivers next otherwise, see runtime/scheduler.py), and every rejected one is
  dead-lettered and counted;
- the tracked streams' predictions equal an offline run of their valid samples only (atol 1e-5), and the
  same messages cut into random micro-batches give the same outputs as one message per batch;
- any topic gives a key or None, and a key taken from a payload never holds a character brokers refuse in
  a topic (a control character made Mosquitto drop the daemon's connection on every reconnect).
"""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_harness import offline, payload, write_config, write_model
from edgernn.runtime.codecs import REJECT_REASONS, DecodeError, Decoder
from edgernn.runtime.config import load_config
from edgernn.runtime.logs import RateLimitedLog
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.mqtt import Inbound
from edgernn.runtime.pipeline import Pipeline
from edgernn.runtime.scheduler import INTERNAL_ERROR, Inbox, Scheduler

pytestmark = pytest.mark.filterwarnings("error")  # a payload must not even make NumPy warn
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
ATOL = 1e-5
UNUSED_PORT = 1883  # nothing connects: the link below stands in for the broker
MAX_PAYLOAD = 512
DEAD = "edgernn/imu/dead"
TRACKED = 3  # streams t0, t1, t2 get valid samples; sample(i, seq) of tests/daemon_harness.py
TRACKED_TOPICS = [f"sensors/t{i}/imu" for i in range(TRACKED)]
KEYED_CSV = Decoder("csv", 3, csv_columns=["device", "a", "b", "c"], key_field="device")
KEYED_JSON = Decoder("json", 3, key_field="device")


class RecordingLink:
    """The scheduler's view of MQTT: publishes are recorded and confirmed at once, acks recorded."""

    def __init__(self):
        self.published: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def publish(self, topic, payload, qos, retain=False, on_done=None):
        self.published.append((topic, payload))
        if on_done is not None:
            on_done()

    def ack(self, inbound):
        self.acked.append(inbound.mid)


class Served:
    """One pipeline as `edgernn serve` builds it, from a config file, driven by a `Scheduler`."""

    def __init__(self, folder):
        write_model(folder / "model.ern")
        pipeline = f'dead_letter = "edgernn/{{pipeline}}/dead"\nmax_payload_bytes = {MAX_PAYLOAD}'
        config = load_config(write_config(folder, UNUSED_PORT, pipeline=pipeline))
        self.metrics = Metrics(["imu"], REJECT_REASONS + (INTERNAL_ERROR,), process_metrics=False)
        self.pipeline = Pipeline(config.pipelines[0], config.state, self.metrics.pipeline("imu"))
        self.pipeline.warm_up()

    def fresh(self) -> Scheduler:
        """A scheduler over an empty table (hypothesis reuses this pipeline across examples)."""
        self.pipeline.table.clear()
        self.link = RecordingLink()
        log = RateLimitedLog(logging.getLogger("edgernn.test.fuzz"), 3600.0)
        return Scheduler([self.pipeline], self.link, Inbox(1000), self.metrics, 512, log)

    def counter(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, {"pipeline": "imu", **labels}) or 0.0

    def rejected(self) -> dict[str, float]:
        return {r: self.counter("edgernn_rejected_total", reason=r) for r in REJECT_REASONS + (INTERNAL_ERROR,)}

    def table_image(self):
        """Everything a message may change in the table, as comparable values."""
        table = self.pipeline.table
        return (table.keys(), table.states.tobytes(), {n: c.tobytes() for n, c in table.columns.items()})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return Served(tmp_path_factory.mktemp("fuzz-state"))


# ---- what the fuzzer sends ------------------------------------------------------------------------
NUMBERS = (st.floats() | st.integers(-2**70, 2**70)
           | st.sampled_from([1e39, -3.5e38, 3.4028235e38, 2**63, 2**64, -1, 10**400, 1e-45, -0.0]))
SCALARS = NUMBERS | st.booleans() | st.none() | st.text(max_size=4)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=10)


FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
NOT_FINITE = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e39, -3.5e38, 10**400, 2**128])
NOT_NUMBERS = st.sampled_from([True, False, None, "1", "", [1.0], {"v": 1}])
DEFECTS = ("x_length", "x_not_finite", "x_type", "x_not_list", "x_absent", "seq_range", "seq_type",
           "ts_not_finite", "ts_type", "unicode_fields", "nested", "in_a_list", "spaced", "cut", "doubled")


@st.composite
def near_valid_json(draw) -> bytes:
    """A valid sample with one or two defects drawn from `DEFECTS` (or none), so every check of the decoder
    is reached rather than the fuzzing stopping at the first."""
    obj = {"x": draw(st.lists(FLOAT32, min_size=3, max_size=3)), "seq": draw(st.integers(0, 2**63 - 1)),
           "ts": draw(FLOAT32 | st.integers(-2**53, 2**53))}
    defects = draw(st.lists(st.sampled_from(DEFECTS), min_size=1, max_size=2, unique=True) | st.just([]))
    x = obj["x"]
    if "x_length" in defects:
        obj["x"] = x = draw(st.lists(FLOAT32, max_size=8).filter(lambda v: len(v) != 3))
    if "x_not_finite" in defects and x:
        x[draw(st.integers(0, len(x) - 1))] = draw(NOT_FINITE)
    if "x_type" in defects and x:
        x[draw(st.integers(0, len(x) - 1))] = draw(NOT_NUMBERS)
    if "x_not_list" in defects:
        obj["x"] = draw(NOT_NUMBERS | FLOAT32 | st.just({"0": 1.0}))
    if "x_absent" in defects:
        del obj["x"]
    if "seq_range" in defects:
        obj["seq"] = draw(st.sampled_from([-1, 2**63, 2**64, -2**63]) | st.integers(max_value=-1))
    if "seq_type" in defects:
        obj["seq"] = draw(NOT_NUMBERS.filter(lambda v: v is not None) | st.sampled_from([1.0, 1e30, float("nan")]))
    if "ts_not_finite" in defects:
        obj["ts"] = draw(st.sampled_from([float("nan"), float("inf"), 10**400, -10**309]))
    if "ts_type" in defects:
        obj["ts"] = draw(NOT_NUMBERS.filter(lambda v: v is not None))
    if "unicode_fields" in defects:
        obj.update(draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))  # NaN and Infinity as JSON's extension writes them
    if "doubled" in defects:  # a repeated field: the last one wins, as in json.loads
        text = text[:-1] + ', "x": ' + json.dumps(draw(JSON_VALUES)) + "}"
    if "nested" in defects:
        text = '{"x": ' + text + "}"
    if "in_a_list" in defects:
        text = f"[{text}]"
    if "spaced" in defects:
        text = draw(st.sampled_from(["", " ", "\n\t"])) + text + draw(st.sampled_from(["", " \r\n", "\t"]))
    if "cut" in defects:
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text.encode("utf-8", "surrogatepass")


PAYLOADS = (near_valid_json() | st.binary(max_size=80) | JSON_VALUES.map(json.dumps).map(str.encode)
            | st.binary(min_size=MAX_PAYLOAD - 2, max_size=MAX_PAYLOAD + 40))
KEY_TEXT = (st.text(max_size=12) | st.text(alphabet=st.sampled_from("ab/+#$\0 é{}%\ud800\x01\x7f\x85\ufffe"), max_size=6)
            | st.sampled_from(["t0", "a" * 1024, "a" * 1025, "é" * 700]))
TOPICS = (st.sampled_from(TRACKED_TOPICS) | KEY_TEXT.map("sensors/{}/imu".format) | st.text(max_size=20)
          | st.sampled_from(["sensors/+/imu", "sensors/#", "$SYS/x/imu", "sensors/a/imu/b", DEAD]))
FUZZED = st.tuples(st.just("fuzz"), TOPICS, PAYLOADS)
EVENTS = st.lists(FUZZED | FUZZED | st.tuples(st.just("valid"), st.integers(0, TRACKED - 1), st.booleans())
                  | st.tuples(st.just("repeat"), st.integers(0, TRACKED - 1), st.booleans()), min_size=10, max_size=60)
"""Two fuzzed messages for one valid sample or redelivery of a tracked stream, on average."""


def may_be_valid(body: bytes) -> bool:
    """Whether a payload could decode, judged without the decoder: only a JSON object with "x" can."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "x" in obj


def messages(events) -> tuple[list[Inbound], dict[int, list[int]]]:
    """The inbound messages of ``events``, and each tracked stream's distinct seqs in order.

    "valid" is tracked stream i's next sample (seq + 1, or + 2 with the flag: a gap); "repeat" sends its
    last one again (a redelivery: a duplicate). A fuzzed payload that might decode goes to a stream of its
    own, never a tracked one: the tracked streams must see their valid samples only.
    """
    inbound, seqs, last = [], {i: [] for i in range(TRACKED)}, {}
    for kind, a, b in events:
        if kind == "valid":
            seq = (seqs[a][-1] + (2 if b else 1)) if seqs[a] else 0
            seqs[a].append(seq)
            last[a] = (TRACKED_TOPICS[a], json.dumps(payload(a, seq)).encode())
            inbound.append(last[a])
        elif kind == "repeat":
            if a in last:
                inbound.append(last[a])
        else:
            topic = "sensors/fuzzed/imu" if a in TRACKED_TOPICS and may_be_valid(b) else a
            inbound.append((topic, b))
    return [Inbound(topic, body, mid, 1, 0.0) for mid, (topic, body) in enumerate(inbound, 1)], seqs


def outputs_by_topic(link: RecordingLink) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for topic, body in link.published:
        out.setdefault(topic, []).append(body)
    return out


def check_tracked(served: Served, outputs: dict, seqs: dict[int, list[int]]) -> None:
    model = served.pipeline.model
    for i, sent in seqs.items():
        got = [json.loads(body) for body in outputs.get(f"predictions/t{i}/imu", [])]
        assert [p["seq"] for p in got] == sent, f"t{i}: predicted seqs differ from the valid ones sent"
        if sent:
            np.testing.assert_allclose(np.array([p["y"] for p in got], np.float32), offline(model, i, sent),
                                       atol=ATOL, err_msg=f"t{i}")


# ---- the properties ---------------------------------------------------------------------------------
@FUZZ
@given(EVENTS)
def test_only_valid_messages_touch_state_one_per_micro_batch(served, events):
    inbound, seqs = messages(events)
    scheduler = served.fresh()
    rejected_before = served.rejected()
    for message in inbound:
        before, published_before = served.table_image(), len(served.link.published)
        rejected = sum(served.rejected().values())
        scheduler.process([message])  # nothing may escape
        new = served.link.published[published_before:]
        predicted = [t for t, _ in new if t != DEAD]
        dead = [t for t, _ in new if t == DEAD]
        assert len(predicted) + len(dead) <= 1
        assert len(dead) == sum(served.rejected().values()) - rejected, "each rejected payload is dead-lettered"
        after = served.table_image()
        if dead or served.pipeline.topic_key(message.topic) is None:
            assert after == before, f"a rejected or unrouted message changed the table: {message!r:.200}"
        elif not predicted:  # a duplicate: only its stream's LRU position may move
            assert sorted(after[0]) == sorted(before[0]) and after[1:] == before[1:]
    assert served.rejected()[INTERNAL_ERROR] == rejected_before[INTERNAL_ERROR], "a micro-batch failed"
    assert served.link.acked == [m.mid for m in inbound], "every message is acked once, in the order received"
    assert scheduler.wait_idle(0)
    check_tracked(served, outputs_by_topic(served.link), seqs)


@FUZZ
@given(EVENTS, st.randoms(use_true_random=False))
def test_micro_batches_give_what_one_message_per_batch_gives(served, events, rnd: random.Random):
    inbound, seqs = messages(events)
    scheduler = served.fresh()
    for message in inbound:
        scheduler.process([message])
    alone = outputs_by_topic(served.link)
    scheduler = served.fresh()
    internal = served.rejected()[INTERNAL_ERROR]
    start = 0
    while start < len(inbound):
        size = rnd.randint(1, 12)
        scheduler.process(inbound[start:start + size])
        start += size
    batched = outputs_by_topic(served.link)
    assert served.rejected()[INTERNAL_ERROR] == internal, "a micro-batch failed"
    assert served.link.acked == [m.mid for m in inbound], "every message is acked once, in the order received"
    assert batched.keys() == alone.keys()
    for topic, bodies in alone.items():
        if topic == DEAD:
            assert batched[topic] == bodies
            continue
        a, b = [json.loads(x) for x in bodies], [json.loads(x) for x in batched[topic]]
        assert [p.get("seq") for p in a] == [p.get("seq") for p in b], topic
        np.testing.assert_allclose(np.array([p["y"] for p in b], np.float32),
                                   np.array([p["y"] for p in a], np.float32), atol=ATOL, err_msg=topic)
    check_tracked(served, batched, seqs)


@settings(max_examples=300, deadline=None)
@given(TOPICS | st.text())
def test_any_topic_yields_a_key_or_none_and_decode_refuses_bad_keys_only(served, topic):
    """`topic_key` never raises; a key it gives either makes the output topic or is refused as ``bad_key``
    (the one documented failure: `DecodeError`), before any state is touched."""
    key = served.pipeline.topic_key(topic)
    if key is None:
        return
    assert type(key) is str and topic.split("/")[1] == key
    before = served.table_image()
    try:
        got, out_topic, decoded = served.pipeline.decode(json.dumps(payload(0, 0)).encode(), key)
    except DecodeError as error:
        assert error.reason == "bad_key"
    else:
        assert got == key and out_topic == f"predictions/{key}/imu"
    assert served.table_image() == before


def test_a_stream_at_the_largest_seq_fails_no_micro_batch(served):
    """seq 2**63 - 1 is a valid seq (the codecs accept it); the gap test ``seq > last + 1`` overflowed int64 on
    the next message of that stream and counted a negative number of missed samples, which raised: the whole
    micro-batch was dropped as ``internal``, the other streams' messages in it too."""
    top = json.dumps({"x": [0.5, 0.5, 0.5], "seq": 2**63 - 1}).encode()
    scheduler = served.fresh()
    internal = served.rejected()[INTERNAL_ERROR]
    scheduler.process([Inbound("sensors/big/imu", top, 1, 1, 0.0)])
    scheduler.process([Inbound("sensors/big/imu", top, 2, 1, 0.0),  # a redelivery: a duplicate
                       Inbound(TRACKED_TOPICS[0], json.dumps(payload(0, 0)).encode(), 3, 1, 0.0)])
    assert served.rejected()[INTERNAL_ERROR] == internal, "a micro-batch failed"
    check_tracked(served, outputs_by_topic(served.link), {0: [0], 1: [], 2: []})


def test_a_redelivered_copy_is_acked_in_its_turn_and_touches_nothing(served):
    """A copy of a message acked before a reconnect or a crash (`Inbound.copy`: runtime/mqtt.py) is acked
    again in the order received, after the valid message before it whose prediction the broker has not
    confirmed yet -- it used to be acked on arrival, ahead of it -- and it steps no state."""
    scheduler = served.fresh()  # a new RecordingLink, whose confirmations are held here
    held = []
    served.link.publish = lambda topic, body, qos, retain=False, on_done=None: held.append(on_done)
    messages_in = served.counter("edgernn_messages_in_total")
    scheduler.process([Inbound(TRACKED_TOPICS[1], json.dumps(payload(1, 0)).encode(), 1, 1, 0.0),
                       Inbound(TRACKED_TOPICS[0], json.dumps(payload(0, 0)).encode(), 2, 1, 0.0, copy=True)])
    assert served.link.acked == [] and len(held) == 1, "the copy waits for the message before it"
    assert served.counter("edgernn_messages_in_total") == messages_in + 1
    assert "t0" not in served.pipeline.table, "a copy never steps a stream"
    held[0]()
    assert served.link.acked == [1, 2]


def test_at_a_stop_the_copies_left_in_the_inbox_are_acked_and_nothing_else(served):
    """Their originals are in the final snapshot's states: left unacked, the next process would get them again
    without expecting them, and step a stream without seq twice. Ordinary messages stay unacked (the broker
    delivers them again after the restart)."""
    scheduler = served.fresh()
    body = json.dumps(payload(0, 0)).encode()
    for mid, copy in ((1, False), (2, True), (3, False)):
        scheduler.inbox.put(Inbound(TRACKED_TOPICS[0], body, mid, 1, 0.0, copy=copy))
    scheduler.inbox.close()
    assert scheduler.ack_leftover_copies() == 1
    assert served.link.acked == [2] and len(scheduler.inbox) == 0


def refused_by_brokers(text: str) -> bool:
    """Control characters and noncharacters: Mosquitto closes the connection of a client publishing to a topic
    holding one (MQTT 3.1.1 section 1.5.3 lets it)."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE
               for c in text)


@settings(max_examples=300, deadline=None)
@given(KEY_TEXT | st.text(max_size=8))
def test_a_key_from_the_payload_never_makes_a_topic_brokers_refuse(key):
    """A CSV (or JSON) key field holding a control character became the prediction's topic: Mosquitto closed the
    connection, paho published it again after each reconnect, and the daemon reconnected for ever."""
    for decoder, body in ((KEYED_CSV, f"{key},1,2,3".encode("utf-8", "surrogatepass")),
                          (KEYED_JSON, json.dumps({"x": [1, 2, 3], "device": key}).encode())):
        try:
            got = decoder.decode(body).key
        except DecodeError as error:
            assert error.reason in REJECT_REASONS
            continue
        assert not refused_by_brokers(got), f"{got!r} makes a topic brokers refuse"
