"""Fuzzed MQTT messages through a live `edgernn serve`: the daemon survives them all, counts each exactly,
and its tracked streams predict as if the junk had never arrived.

Run from the repository root::

    .venv/bin/python reliability/fuzz_live.py                  # 100,000 messages
    .venv/bin/python reliability/fuzz_live.py --quick          # 3,000 (what `make test` runs)
    .venv/bin/python reliability/fuzz_live.py --count 20000 --seed 7 --json out.json [--keep]

A Mosquitto of its own and the daemon as a process (reliability/common.py `Rig`) serve two pipelines on one
model: ``imu`` (JSON, key from the topic ``sensors/+/imu``) and ``line`` (CSV ``device,seq,ts,a,b,c`` on
``lines/in``, key from the payload), both with a dead-letter topic, ``max_payload_bytes`` = 2048 and a
snapshot every 2 s (so snapshots hold fuzzed keys). One client publishes ``--count`` messages at QoS 1,
pipelined, from a seeded generator mixing

- random bytes; valid payloads mutated (bit flips, truncations, insertions, deletions, repeats);
- payloads crafted for every reject reason of runtime/codecs.py (oversize, not_utf8, not_json, not_object,
  missing_field, wrong_type, wrong_length, not_finite, bad_seq, bad_ts, bad_key, bad_csv);
- junk topics under the subscription (unicode, ``$``, ``%``, braces, empty and 1,025-character keys) and
  topics outside every subscription (the broker never delivers those);
- valid samples with seq on six tracked streams (four JSON, two CSV), and redeliveries of them.

A payload that could step a tracked stream other than its valid samples is sent under a fuzz key instead:
whether a payload decodes is known beforehand from the daemon's own `Pipeline.decode` (built here from the
same config file), which also gives the expected reject reason of each message.

"passed" means, at the end: the daemon process runs, is connected and never reconnected; per pipeline
``messages_in`` equals the messages published on its topics; ``rejected{reason}`` equals the expected count
for every reason (``internal``: 0); rejected + predictions + duplicates == messages_in exactly, and every
rejected message was dead-lettered; each tracked stream's predictions are exactly its distinct seqs, in
order, equal to an offline run of its valid samples (atol 1e-5); and SIGTERM then stops it cleanly (exit 0).
The daemon's RSS at the start and the end is reported (not judged: every fuzz key is a live stream).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter

import numpy as np
from common import Rig, arguments, finish, log_events, metric, publish_all

from daemon_harness import offline, payload, sample
from edgernn.runtime.codecs import REJECT_REASONS, DecodeError
from edgernn.runtime.config import load_config
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.pipeline import Pipeline

ATOL = 1e-5
MAX_PAYLOAD = 2048
PIPELINES = ("imu", "line")
IMU_TRACKED = [f"trk{i}" for i in range(4)]  # sample(100 + i, seq)
LINE_TRACKED = [f"trl{j}" for j in range(2)]  # sample(200 + j, seq)
TRACKED = {**{key: 100 + i for i, key in enumerate(IMU_TRACKED)}, **{key: 200 + j for j, key in enumerate(LINE_TRACKED)}}
FUZZ_KEYS = 500
LINE_TOPIC = "lines/in"
CONFIG = f'''dead_letter = "edgernn/{{pipeline}}/dead"
max_payload_bytes = {MAX_PAYLOAD}

[[pipelines]]
name = "line"
model = "model.ern"
subscribe = "{LINE_TOPIC}"
publish = "linepred/{{key}}"
qos = 1
data_format = "csv"
csv_columns = ["device", "seq", "ts", "a", "b", "c"]
key_field = "device"
dead_letter = "edgernn/{{pipeline}}/dead"
max_payload_bytes = {MAX_PAYLOAD}
'''
CATEGORIES = {"tracked": 18, "redelivery": 2, "random_bytes": 12, "mutated": 25, "crafted": 30, "junk_topic": 8,
              "unsubscribed": 5}
"""Relative weights of the generator's kinds of message."""
KEY_CHARS = list("abcXYZ019-_.:;,~!@$%^&*()[]{}<>=?'\"\\| ") + ["é", "ß", "中", "文", "😀", "\u200b", "%s", "%(key)s",
                                                                "{key}", "{}", "..", "$SYS"]
UNSUBSCRIBED = ["sensors/a/b/imu", "sensors/x", "sensors", "other/x/imu", "lines/in/x", "lines", "Lines/in",
                "sensors/a/IMU", "sensors/a/imu/", "/sensors/a/imu", "lines/in/"]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80"]
INSERTS = [b'"', b",", b"[", b"]", b"{", b"}", b":", b"NaN", b"Infinity", b"-", b"1e999", b"\xff", "é".encode(),
           b"\x00", b"\n", b" ", b"null", b"true", b"0" * 30]


class Generator:
    """Seeded messages: (category, topic, payload), with the tracked streams' seqs kept in order."""

    def __init__(self, seed: int, oracle: "Oracle"):
        self.rng = random.Random(seed)
        self.oracle = oracle
        self.seqs = {key: [] for key in TRACKED}  # distinct seqs sent per tracked stream, in order
        self.sent_tracked: list[tuple[str, str, bytes]] = []  # (key, topic, payload) of each valid tracked sample
        self.redelivered = Counter()  # tracked key -> copies resent
        self.aim = None  # the reject reason the last crafted payload was made for

    def messages(self, count: int) -> list[tuple[str, str, bytes, str | None]]:
        """``count`` messages: (kind, topic, payload, the reject reason a crafted payload aims at)."""
        kinds, weights = list(CATEGORIES), list(CATEGORIES.values())
        out = []
        while len(out) < count:
            kind = self.rng.choices(kinds, weights)[0]
            message = getattr(self, kind)()
            if message is None:
                continue
            topic, body = message
            if kind not in ("tracked", "redelivery") and self.oracle.steps_tracked(topic, body):
                continue  # it would step a tracked stream: draw another
            out.append((kind, topic, body, self.aim if kind == "crafted" else None))
        return out

    # ---- valid samples of the tracked streams --------------------------------------------------------
    def tracked(self):
        key = self.rng.choice(list(TRACKED))
        seqs = self.seqs[key]
        seq = seqs[-1] + self.rng.choice([1, 1, 1, 2]) if seqs else 0  # sometimes a gap
        seqs.append(seq)
        message = (f"sensors/{key}/imu", json.dumps(payload(TRACKED[key], seq, ts=seq * 0.02)).encode()) \
            if key in IMU_TRACKED else (LINE_TOPIC, csv_line(key, seq, seq * 0.02, sample(TRACKED[key], seq)))
        self.sent_tracked.append((key, *message))
        return message

    def redelivery(self):
        """A tracked sample sent again (a device resending, a broker redelivering): a duplicate by seq."""
        if not self.sent_tracked:
            return None
        key, topic, body = self.rng.choice(self.sent_tracked[-50:])  # at most 100 seqs back: never a "restart"
        self.redelivered[key] += 1
        return topic, body

    # ---- junk ----------------------------------------------------------------------------------------
    def random_bytes(self):
        roll, rng = self.rng.random(), self.rng
        size = (rng.randint(0, 64) if roll < 0.6 else rng.randint(65, MAX_PAYLOAD) if roll < 0.95
                else rng.randint(MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD))
        return self.any_topic(), rng.randbytes(size)

    def mutated(self):
        if self.rng.random() < 0.7:
            topic, body = self.fuzz_topic(), self.valid_json()
        else:
            topic, body = LINE_TOPIC, self.valid_csv()
        data = bytearray(body)
        for _ in range(self.rng.randint(1, 3)):
            operation = self.rng.choice(["flip", "flip", "cut", "insert", "delete", "repeat"])
            at = self.rng.randint(0, len(data))
            if operation == "flip" and data:
                data[min(at, len(data) - 1)] ^= 1 << self.rng.randrange(8)
            elif operation == "cut":
                del data[at:]
            elif operation == "insert":
                data[at:at] = self.rng.choice(INSERTS)
            elif operation == "delete":
                del data[at:at + self.rng.randint(1, 8)]
            elif operation == "repeat":
                data[at:at] = data[at:at + self.rng.randint(1, 20)]
        return topic, bytes(data)

    def crafted(self):
        """A payload made for one reject reason (the oracle confirms which when the run starts)."""
        reason = self.aim = self.rng.choice(REJECT_REASONS)
        line = self.rng.random() < 0.35 and reason not in ("not_object", "missing_field", "wrong_type", "not_json")
        if reason == "bad_csv":
            line = True
        rng, x = self.rng, self.numbers()
        if line:
            key, seq, ts = self.fuzz_key(), str(rng.randint(0, 10**6)), repr(rng.uniform(0, 1e6))
            cells = [key, seq, ts] + [repr(v) for v in x]
            if reason == "oversize":
                body = ",".join(cells).encode() + b" " * rng.randint(MAX_PAYLOAD, 4 * MAX_PAYLOAD)
            elif reason == "not_utf8":
                body = ",".join(cells).encode() + rng.choice(BAD_UTF8)
            elif reason == "wrong_length":
                body = ",".join((cells + ["1.0"] * 9)[:rng.choice([1, 2, 3, 4, 5, 7, 8, 12])]).encode()
            elif reason == "not_finite":
                cells[3 + rng.randrange(3)] = rng.choice(["nan", "inf", "-inf", "1e39", "-4e38", "1e999"])
                body = ",".join(cells).encode()
            elif reason == "bad_seq":
                cells[1] = rng.choice(["-1", "1.5", "x", "9223372036854775808", "1e3", "0x10"])
                body = ",".join(cells).encode()
            elif reason == "bad_ts":
                cells[2] = rng.choice(["x", "inf", "nan", "-inf", "1e999", "now"])
                body = ",".join(cells).encode()
            elif reason == "bad_key":
                cells[0] = rng.choice(["", " ", "a+b", "#", "dev#1", "+", "\0", "dev\x01", "a\x7fb", "\x85",
                                       "k\ufffe", "\U0001ffff"])  # the last five: topics brokers refuse
                body = ",".join(cells).encode()
            else:  # bad_csv
                if rng.random() < 0.5:
                    cells[3 + rng.randrange(3)] = rng.choice(["x", "", "0x1", "--1", "1..2", "é", "1 2"])
                    body = ",".join(cells).encode()
                else:
                    body = (",".join(cells) + rng.choice(["\n1", "\r", "\n\n", "\r\r\n"])).encode()
            return LINE_TOPIC, body
        obj = {"x": x, "seq": rng.randint(0, 10**6), "ts": rng.uniform(0, 1e6)}
        topic = self.any_topic(json_only=True)
        if reason == "oversize":
            body = json.dumps(obj).encode() + b" " * rng.randint(MAX_PAYLOAD, 4 * MAX_PAYLOAD)
        elif reason == "not_utf8":
            text = json.dumps({**obj, "note": "é"}, ensure_ascii=False).encode()
            body = text.replace("é".encode(), rng.choice(BAD_UTF8)) if rng.random() < 0.5 else text.replace(
                b"[", b"[" + rng.choice(BAD_UTF8), 1)
        elif reason == "not_json":
            text = json.dumps(obj)
            body = rng.choice([text[:rng.randint(0, len(text) - 1)], "{", "", "{'x': [1, 2, 3]}", text + "}",
                               '{"x": [1, 2, 3],}', text + " extra", "[1, 2", "nul", "{\"x\": [1 2 3]}"]).encode()
        elif reason == "not_object":
            body = rng.choice(["[1, 2, 3]", "3", '"x"', "null", "true", "NaN", json.dumps([obj]), "-0.5e3"]).encode()
        elif reason == "missing_field":
            body = json.dumps(rng.choice([{}, {"X": x}, {"y": x, "seq": 1}, {"x ": x}, {"seq": 1, "ts": 2.0}])).encode()
        elif reason == "wrong_type":
            obj["x"] = rng.choice([",".join(map(str, x)), {"0": 1.0}, x[:2] + ["1"], [True, 1.0, 2.0], [None] * 3,
                                   5, [[1.0], [2.0], [3.0]], "nan"])
            body = json.dumps(obj).encode()
        elif reason == "wrong_length":
            obj["x"] = [rng.uniform(-1, 1) for _ in range(rng.choice([0, 1, 2, 4, 5, 64]))]
            body = json.dumps(obj).encode()
        elif reason == "not_finite":
            x[rng.randrange(3)] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e39, 10**400])
            body = json.dumps({**obj, "x": x}).encode()
        elif reason == "bad_seq":
            obj["seq"] = rng.choice([-1, 2**63, 2**64, 1.5, "3", True, [1], {"n": 1}, float("nan")])
            body = json.dumps(obj).encode()
        elif reason == "bad_ts":
            obj["ts"] = rng.choice(["now", float("nan"), float("inf"), 10**400, True, [1.0], {"t": 0}])
            body = json.dumps(obj).encode()
        else:  # bad_key: the key comes from the topic here
            topic = "sensors/" + rng.choice(["", "k" * 1025, "é" * 1100]) + "/imu"
            body = json.dumps(obj).encode()
        return topic, body

    def junk_topic(self):
        size = self.rng.choice([0, 1, 2, 5, 12, 40, 1024, 1025, 3000])
        key = "".join(self.rng.choice(KEY_CHARS) for _ in range(size))
        body = self.valid_json() if self.rng.random() < 0.7 else self.rng.randbytes(self.rng.randint(0, 40))
        return f"sensors/{key}/imu", body

    def unsubscribed(self):
        return self.rng.choice(UNSUBSCRIBED), self.valid_json()

    # ---- parts -------------------------------------------------------------------------------------
    def numbers(self) -> list[float]:
        return [float(np.float32(self.rng.gauss(0, 1))) for _ in range(3)]

    def fuzz_key(self) -> str:
        return f"fz{self.rng.randrange(FUZZ_KEYS)}"

    def fuzz_topic(self) -> str:
        return f"sensors/{self.fuzz_key()}/imu"

    def any_topic(self, json_only: bool = False) -> str:
        """A fuzz stream's topic, often a tracked one (the payload must then be rejected), or the CSV one."""
        roll = self.rng.random()
        if roll < 0.3:
            return f"sensors/{self.rng.choice(IMU_TRACKED)}/imu"
        if roll < 0.45 and not json_only:
            return LINE_TOPIC
        return self.fuzz_topic()

    def valid_json(self) -> bytes:
        obj = {"x": self.numbers()}
        if self.rng.random() < 0.8:
            obj["seq"] = self.rng.randint(0, 10**6)
        if self.rng.random() < 0.5:
            obj["ts"] = self.rng.uniform(0, 2e9)
        return json.dumps(obj).encode()

    def valid_csv(self) -> bytes:
        return csv_line(self.fuzz_key(), self.rng.randint(0, 10**6), self.rng.uniform(0, 2e9), self.numbers())


def csv_line(key: str, seq: int, ts: float, x) -> bytes:
    return ",".join([key, str(seq), repr(float(ts))] + [repr(float(v)) for v in x]).encode()


class Oracle:
    """The daemon's own routing and decoding (`Pipeline.topic_key`, `Pipeline.decode`), built from its config
    file in this process: which pipeline a message reaches, and its reject reason (None: it decodes)."""

    def __init__(self, rig: Rig):
        config = load_config(rig.config_path)
        state = dataclasses.replace(config.state, dir=rig.folder / "oracle-state")
        metrics = Metrics(list(PIPELINES), REJECT_REASONS, process_metrics=False)
        self.pipelines = [Pipeline(p, state, metrics.pipeline(p.name)) for p in config.pipelines]

    def classify(self, topic: str, body: bytes):
        """(pipeline name, stream key or None, reject reason or None), or None outside every subscription."""
        for pipeline in self.pipelines:
            topic_key = pipeline.topic_key(topic)
            if topic_key is None:
                continue
            try:
                key, _, _ = pipeline.decode(body, topic_key)
            except DecodeError as error:
                return pipeline.name, None, error.reason
            return pipeline.name, key, None
        return None

    def steps_tracked(self, topic: str, body: bytes) -> bool:
        outcome = self.classify(topic, body)
        return outcome is not None and outcome[2] is None and outcome[1] in TRACKED


def wait_drained(rig: Rig, expected_in: dict[str, int], timeout: float) -> dict[str, float]:
    """Scrape until every message published on a pipeline's topics is accounted for (rejected, predicted or a
    duplicate), or ``timeout`` passes; returns the last scrape."""
    deadline, values = time.monotonic() + timeout, {}
    while rig.daemon.process.poll() is None:
        values = rig.metrics()
        done = all(metric(values, "edgernn_messages_in_total", pipeline=p) >= expected_in[p]
                   and accounted(values, p) >= expected_in[p] for p in PIPELINES)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return values


def rejected(values: dict, pipeline: str) -> dict[str, int]:
    return {reason: int(metric(values, "edgernn_rejected_total", pipeline=pipeline, reason=reason))
            for reason in REJECT_REASONS + ("internal",)}


def accounted(values: dict, pipeline: str) -> int:
    return (sum(rejected(values, pipeline).values()) + int(metric(values, "edgernn_messages_out_total", pipeline=pipeline))
            + int(metric(values, "edgernn_duplicates_total", pipeline=pipeline)))


def tracked_predictions(collectors) -> dict[str, list[dict]]:
    """The tracked streams' predictions, in arrival order."""
    out = {key: [] for key in TRACKED}
    for collector in collectors:
        for _, body in collector.wait_for(0, timeout=0):  # what it has received so far
            prediction = json.loads(body)
            if prediction.get("key") in out:
                out[prediction["key"]].append(prediction)
    return out


def main() -> int:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="messages to publish (default 100,000; --quick 3,000)")
    args = parser.parse_args()
    count = args.count or (3000 if args.quick else 100_000)
    failures: list[str] = []
    results: dict = {"count": count, "seed": args.seed, "max_payload_bytes": MAX_PAYLOAD}
    started = time.monotonic()
    with Rig(keep=args.keep, prefix="edgernn-fuzz-live-") as rig:
        rig.start(pipeline=CONFIG, state="snapshot_interval = 2.0")
        if args.keep:
            print(f"folder: {rig.folder}")
        oracle = Oracle(rig)
        generator = Generator(args.seed, oracle)
        messages = generator.messages(count)
        expected_in = Counter()
        expected_reasons = {p: Counter() for p in PIPELINES}
        expected_valid = Counter()
        kinds = Counter(kind for kind, *_ in messages)
        missed = Counter()  # crafted payloads the decoder rejects for another reason than the one aimed at
        for kind, topic, body, aim in messages:
            outcome = oracle.classify(topic, body)
            if outcome is None:
                continue
            name, _, reason = outcome
            if aim is not None and reason != aim:
                missed[f"{aim} -> {reason}"] += 1
            expected_in[name] += 1
            if reason is None:
                expected_valid[name] += 1
            else:
                expected_reasons[name][reason] += 1
        results["generated"] = dict(kinds)
        results["generate_seconds"] = time.monotonic() - started
        if missed:
            failures.append(f"crafted payloads missed their reason: {dict(missed)}")
        reached = sorted({r for counts in expected_reasons.values() for r in counts})
        if set(reached) != set(REJECT_REASONS):
            failures.append(f"the generator reached only these reject reasons: {reached}")

        collectors = [rig.client(subscribe="predictions/+/imu"), rig.client(subscribe="linepred/#")]
        rss_start = rig.rss()
        publisher = rig.client()
        published_at = time.monotonic()
        publish_all(publisher, ((topic, body) for _, topic, body, _ in messages), qos=1, window=500)
        publish_seconds = time.monotonic() - published_at
        values = wait_drained(rig, expected_in, timeout=120 + count / 200)
        drain_seconds = time.monotonic() - published_at
        rss_end = rig.rss() if rig.daemon.process.poll() is None else 0
        tracked_total = sum(len(seqs) for seqs in generator.seqs.values())
        done = lambda: sum(map(len, tracked_predictions(collectors).values())) >= tracked_total  # noqa: E731
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.2)  # the streams_live gauge is set once a second, between micro-batches
        if rig.daemon.process.poll() is None:
            values = rig.metrics()

        # ---- the verdict ---------------------------------------------------------------------------
        alive = rig.daemon.process.poll() is None
        if not alive:
            failures.append(f"the daemon exited with {rig.daemon.process.returncode}")
        if metric(values, "edgernn_connected") != 1 or metric(values, "edgernn_reconnects_total") != 0:
            failures.append(f"connected = {metric(values, 'edgernn_connected')}, reconnects = "
                            f"{metric(values, 'edgernn_reconnects_total')} (expected 1 and 0)")
        per_pipeline = {}
        for p in PIPELINES:
            got_in = int(metric(values, "edgernn_messages_in_total", pipeline=p))
            got_reasons = rejected(values, p)
            out = int(metric(values, "edgernn_messages_out_total", pipeline=p))
            duplicates = int(metric(values, "edgernn_duplicates_total", pipeline=p))
            dead = int(metric(values, "edgernn_dead_letters_total", pipeline=p))
            per_pipeline[p] = {"published": expected_in[p], "messages_in": got_in, "predictions": out,
                               "duplicates": duplicates, "dead_letters": dead, "expected_valid": expected_valid[p],
                               "rejected": got_reasons, "expected_rejected": dict(expected_reasons[p])}
            if got_in != expected_in[p]:
                failures.append(f"{p}: messages_in {got_in}, published on its topics {expected_in[p]}")
            for reason in REJECT_REASONS + ("internal",):
                if got_reasons[reason] != expected_reasons[p][reason]:
                    failures.append(f"{p}: rejected {reason} {got_reasons[reason]}, expected "
                                    f"{expected_reasons[p][reason]}")
            total_rejected = sum(got_reasons.values())
            if total_rejected + out + duplicates != got_in:
                failures.append(f"{p}: rejected {total_rejected} + predictions {out} + duplicates {duplicates} "
                                f"!= messages_in {got_in}")
            if out + duplicates != expected_valid[p]:
                failures.append(f"{p}: predictions {out} + duplicates {duplicates} != valid messages "
                                f"{expected_valid[p]}")
            if dead != total_rejected:
                failures.append(f"{p}: {dead} dead letters for {total_rejected} rejected messages")
        results["pipelines"] = per_pipeline

        model = rig.model
        worst, tracked_report = 0.0, {}
        for key, predictions in tracked_predictions(collectors).items():
            sent = generator.seqs[key]
            seqs = [p["seq"] for p in predictions]
            tracked_report[key] = {"samples": len(sent), "predictions": len(predictions),
                                   "redelivered": generator.redelivered[key]}
            if seqs != sent:
                failures.append(f"{key}: predicted seqs differ from the valid samples sent "
                                f"({len(seqs)} predictions for {len(sent)} samples)")
                continue
            if sent:
                error = float(np.max(np.abs(np.array([p["y"] for p in predictions], np.float32)
                                            - offline(model, TRACKED[key], sent))))
                worst = max(worst, error)
                if error > ATOL:
                    failures.append(f"{key}: predictions differ from the offline run by {error:.3g}")
        results["tracked"] = tracked_report
        results["tracked_max_abs_error"] = worst
        results["rss_mib"] = {"start": rss_start / 2**20, "end": rss_end / 2**20}
        results["live_streams"] = {p: metric(values, "edgernn_streams_live", pipeline=p) for p in PIPELINES}
        results["seconds"] = {"publish": publish_seconds, "drain": drain_seconds}
        results["messages_per_s"] = count / drain_seconds
        results["log_events"] = log_events(rig)
        if alive:
            results["exit_code"] = rig.terminate(failures)
    results["seconds"]["total"] = time.monotonic() - started
    report(results)
    return finish("fuzz_live", results, failures, args.json)


def report(results: dict) -> None:
    print(f"fuzz_live: {results['count']} messages (seed {results['seed']}): "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(results["generated"].items())))
    pipelines = results["pipelines"]
    print(f"{'(daemon / expected)':22}" + "".join(f"{p:>16}" for p in PIPELINES))
    for row in ("published", "messages_in", "predictions", "duplicates", "dead_letters"):
        print(f"{row:22}" + "".join(f"{pipelines[p][row]:>16}" for p in PIPELINES))
    for reason in REJECT_REASONS + ("internal",):
        print(f"{'rejected ' + reason:22}" + "".join(
            f"{pipelines[p]['rejected'][reason]:>9} / {pipelines[p]['expected_rejected'].get(reason, 0):<4}"
            for p in PIPELINES))
    print(f"tracked: {results['tracked']}, max |y - offline| {results['tracked_max_abs_error']:.2g}")
    print(f"warnings in the daemon's log: {results['log_events']}")
    print(f"live streams {results['live_streams']}; RSS {results['rss_mib']['start']:.1f} -> "
          f"{results['rss_mib']['end']:.1f} MiB; publish {results['seconds']['publish']:.1f} s, drained in "
          f"{results['seconds']['drain']:.1f} s ({results['messages_per_s']:.0f} msg/s)")


if __name__ == "__main__":
    raise SystemExit(main())
