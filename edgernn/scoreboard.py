"""Live scoring of a daemon's predictions against the simulator's ground truth, over MQTT.

A `Scoreboard` is an ordinary MQTT client beside the daemon: it subscribes to the samples (which
`edgernn simulate --labels` tags with their true label), the predictions and the daemon's stats topic,
and joins samples and predictions by (stream key, seq). It needs nothing from inside the daemon or the
simulator, so it scores a daemon in another process, or on another machine, the same way.

It measures what a user sees: end-to-end latency is the time from a sample reaching this client to its
prediction reaching it (broker and daemon included); the daemon's own step latency comes from its stats.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgernn.protocol import KEY_FIELD, LABEL_FIELD, SEQ_FIELD, TopicFilter, Y_FIELD, key_level

PENDING_PER_STREAM = 2048
"""Samples kept per stream while their predictions are on their way; older ones are forgotten."""
RATE_WINDOW_S = 2.0
LATENCY_SAMPLES = 4096


@dataclass
class StreamScore:
    """What one stream (device) looks like right now."""

    truth: str = ""       # the label of the latest sample
    predicted: str = ""   # the class of the latest prediction
    confidence: float = 0.0
    last_correct: bool | None = None  # whether the latest scored prediction matched its own sample's label
    correct: int = 0
    scored: int = 0
    predictions: int = 0
    arrivals: deque = field(default_factory=lambda: deque(maxlen=1024))  # prediction arrival times

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    def rate(self, now: float) -> float:
        """Predictions per second over the last `RATE_WINDOW_S`."""
        recent = sum(1 for t in self.arrivals if now - t <= RATE_WINDOW_S)
        return recent / RATE_WINDOW_S


class Scoreboard:
    """Joins samples and predictions per (key, seq); the class of a prediction is its largest output."""

    def __init__(self, host: str, port: int, classes: tuple[str, ...], samples: str = "sensors/+/imu",
                 predictions: str = "predictions/+/imu", stats: str | None = None, status: str | None = None,
                 client_id: str = ""):
        self.classes = classes
        self.streams: dict[str, StreamScore] = {}
        self.daemon_stats: dict = {}
        self.daemon_status = ""  # the daemon's retained "online" / "offline" (its LWT)
        self.samples_seen = 0
        self.unmatched = 0  # predictions whose sample this client never saw (or forgot)
        self.confusion = [[0] * len(classes) for _ in classes]  # [truth][predicted]
        self._latencies: deque = deque(maxlen=LATENCY_SAMPLES)
        self._pending: dict[str, OrderedDict] = {}
        self._index = {name: i for i, name in enumerate(classes)}
        self._lock = threading.Lock()
        self._samples, self._predictions = TopicFilter(samples), TopicFilter(predictions)
        self._key_level = key_level(self._samples, None)  # where the daemon finds the stream key, by default
        self._subscriptions = [(samples, 0), (predictions, 0)] + [(t, 0) for t in (stats, status) if t]
        self._stats_topic, self._status_topic = stats, status
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda client, *_: client.subscribe(self._subscriptions)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise ConnectionError(f"the scoreboard could not subscribe on {host}:{port}")

    # ---- network thread ---------------------------------------------------------------------------
    def _on_message(self, client, userdata, message) -> None:
        now = time.monotonic()
        if message.topic == self._status_topic:
            self.daemon_status = message.payload.decode(errors="replace")
            return
        try:
            body = json.loads(message.payload)
        except ValueError:
            return  # a malformed sample (fault injection): the daemon rejects it too
        if not isinstance(body, dict):
            return
        with self._lock:
            if message.topic == self._stats_topic:
                self.daemon_stats = body
            elif self._predictions.match(message.topic) is not None:
                self._prediction(body, now)
            elif self._samples.match(message.topic) is not None:
                self._sample(message.topic, body, now)

    def _sample(self, topic: str, body: dict, now: float) -> None:
        key = topic.split("/")[self._key_level]
        seq, label = body.get(SEQ_FIELD), body.get(LABEL_FIELD)
        self.samples_seen += 1
        if not isinstance(seq, int) or label not in self._index:
            return
        pending = self._pending.setdefault(key, OrderedDict())
        pending[seq] = (label, now)
        if len(pending) > PENDING_PER_STREAM:
            pending.popitem(last=False)
        self.streams.setdefault(key, StreamScore()).truth = label

    def _prediction(self, body: dict, now: float) -> None:
        key, seq, y = body.get(KEY_FIELD), body.get(SEQ_FIELD), body.get(Y_FIELD)
        if not isinstance(key, str) or not isinstance(y, list) or len(y) != len(self.classes):
            return
        stream = self.streams.setdefault(key, StreamScore())
        best = max(range(len(y)), key=y.__getitem__)
        stream.predicted, stream.confidence = self.classes[best], float(y[best])
        stream.predictions += 1
        stream.arrivals.append(now)
        sample = self._pending.get(key, {}).pop(seq, None)
        if sample is None:
            self.unmatched += 1
            return
        label, arrived = sample
        self._latencies.append(now - arrived)
        truth = self._index[label]
        self.confusion[truth][best] += 1
        stream.scored += 1
        stream.correct += truth == best
        stream.last_correct = truth == best

    # ---- readers (any thread) ---------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything a view or a summary needs, consistent at one instant."""
        now = time.monotonic()
        with self._lock:
            streams = {key: {"truth": s.truth, "predicted": s.predicted, "confidence": s.confidence,
                             "last_correct": s.last_correct,
                             "accuracy": s.accuracy, "rate": s.rate(now), "predictions": s.predictions}
                       for key, s in sorted(self.streams.items())}
            correct = sum(s.correct for s in self.streams.values())
            scored = sum(s.scored for s in self.streams.values())
            latencies = sorted(self._latencies)
            return {
                "streams": streams,
                "samples": self.samples_seen,
                "predictions": sum(s.predictions for s in self.streams.values()),
                "scored": scored,
                "accuracy": correct / scored if scored else None,
                "recall": {name: (row[i] / sum(row) if sum(row) else None)
                           for i, (name, row) in enumerate(zip(self.classes, self.confusion))},
                "rate": sum(s.rate(now) for s in self.streams.values()),
                "latency_p50_s": _percentile(latencies, 0.50),
                "latency_p99_s": _percentile(latencies, 0.99),
                "unmatched": self.unmatched,
                "daemon": dict(self.daemon_stats),
            }

    def close(self) -> None:
        self.client.disconnect()  # first: the network loop then ends at once, not at its next select timeout
        self.client.loop_stop()


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
