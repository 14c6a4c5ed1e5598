"""The daemon's counters, gauges and histograms, served as Prometheus text and summarised as JSON.

Each `Metrics` owns its own `CollectorRegistry` (never prometheus_client's global one), so several
daemons can run in one process, as the tests do. Every labelled metric has its children created up
front for each pipeline (and each reject reason, each reset cause), so a scrape shows zeros rather than
missing series. The hot path never calls ``.labels``: `Metrics.pipeline` hands out a `PipelineMetrics`
whose attributes are already-bound children, and recording is one ``inc``/``observe`` each.
"""

from __future__ import annotations

import logging
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest, start_http_server

from .config import parse_listen_address
from .timing import COUNTERS as TIMING_REASONS

log = logging.getLogger(__name__)

PREFIX = "edgernn"
RESET_CAUSES = ("gap", "idle", "reload")


def _log_spaced(low_exponent: int, high_exponent: int, per_decade: float = 2.5) -> tuple[float, ...]:
    """Bucket bounds from 10**low to 10**high, ``per_decade`` steps per decade (2.5 -> about x2.5 apart)."""
    steps = round((high_exponent - low_exponent) * per_decade)
    return tuple(float(f"{10 ** (low_exponent + k / per_decade):.3g}") for k in range(steps + 1))


STEP_BUCKETS = _log_spaced(-6, 0)                      # 1 us .. 1 s, one step_batch call
LATENCY_BUCKETS = _log_spaced(-5, 1)                   # 10 us .. 10 s, message received -> handed to MQTT
BATCH_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096 messages per micro-batch


class PipelineMetrics:
    """The children of every per-pipeline metric, bound once for one pipeline.

    Counters/gauges/histograms are the prometheus_client child objects: ``pm.messages_in.inc()``,
    ``pm.step_seconds.observe(dt)``, ``pm.rejected("not_json").inc()``, ``pm.resets("gap").inc()``.
    """

    def __init__(self, metrics: Metrics, name: str):
        self.name = name
        self.messages_in = metrics.messages_in.labels(name)
        self.messages_out = metrics.messages_out.labels(name)
        self.duplicates = metrics.duplicates.labels(name)
        self.seq_gaps = metrics.seq_gaps.labels(name)
        self.samples_missed = metrics.samples_missed.labels(name)
        self.evictions = metrics.evictions.labels(name)
        self.warmup_withheld = metrics.warmup_withheld.labels(name)
        self.dead_letters = metrics.dead_letters.labels(name)
        self.journal_errors = metrics.journal_errors.labels(name)
        self.streams_live = metrics.streams_live.labels(name)
        self.step_seconds = metrics.step_seconds.labels(name)
        self.filled_published = metrics.filled_published.labels(name)
        self._timing = {reason: metrics.timing.labels(name, reason) for reason in TIMING_REASONS}
        self._rejected_metric = metrics.rejected
        self._resets_metric = metrics.resets
        self._rejected = {reason: metrics.rejected.labels(name, reason) for reason in metrics.reject_reasons}
        self._resets = {cause: metrics.resets.labels(name, cause) for cause in RESET_CAUSES}

    def rejected(self, reason: str):
        """The rejected-counter child for ``reason`` (an unforeseen reason gets a child on first use)."""
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self._rejected_metric.labels(self.name, reason)
        return child

    def resets(self, cause: str):
        """The resets-counter child for ``cause`` (gap, idle or reload)."""
        child = self._resets.get(cause)
        if child is None:
            child = self._resets[cause] = self._resets_metric.labels(self.name, cause)
        return child

    def timing(self, reason: str):
        """The child of ``edgernn_timing_total`` for ``reason`` (one of `runtime.timing.COUNTERS`)."""
        return self._timing[reason]


class Metrics:
    """All of the daemon's metrics in one registry, plus the HTTP endpoint that serves them.

    Labelled metrics are reached per pipeline through `pipeline` (pre-bound); the unlabelled ones
    (``queue_dropped``, ``queue_depth``, ``connected``, ``reconnects``, ``batches``, ``batch_size``,
    ``latency_seconds``) are attributes used directly. prometheus_client metrics are thread-safe, so the
    paho thread and the worker may both record.
    """

    def __init__(self, pipelines: list[str], reject_reasons: tuple[str, ...], *, process_metrics: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        self.reject_reasons = tuple(reject_reasons)
        self._started = time.monotonic()
        self._server = None
        self._thread = None
        r = self.registry

        def counter(name, doc, labels=()):
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.messages_in = counter("messages_in", "Messages received", ["pipeline"])
        self.messages_out = counter("messages_out", "Predictions published", ["pipeline"])
        self.rejected = counter("rejected", "Messages rejected before touching state", ["pipeline", "reason"])
        self.duplicates = counter("duplicates", "Redeliveries dropped by seq", ["pipeline"])
        self.seq_gaps = counter("seq_gaps", "Gaps seen in seq", ["pipeline"])
        self.samples_missed = counter("samples_missed", "Samples missing from stream states: seq - last - 1 summed "
                                      "over the gaps (lost on the way, or since the snapshot after a crash)",
                                      ["pipeline"])
        self.resets = counter("resets", "Streams reset to the model's starting state", ["pipeline", "cause"])
        self.evictions = counter("evictions", "Streams evicted (least recently used) past max_streams", ["pipeline"])
        self.warmup_withheld = counter("warmup_withheld", "Predictions withheld during a stream's warmup_steps "
                                       '(warmup_policy = "withhold"; their inputs are acked)', ["pipeline"])
        self.dead_letters = counter("dead_letters", "Rejected messages published to the dead-letter topic", ["pipeline"])
        self.journal_errors = counter("journal_errors", "Micro-batches served without the journal (write failed)",
                                      ["pipeline"])
        self.timing = counter("timing", "Samples the time stage (reorder_window, gap_policy, input_rate) held back, "
                              "dropped, filled or could not place, by reason (README: Time, order and gaps)",
                              ["pipeline", "reason"])
        self.filled_published = counter("filled_published", "Predictions of filled steps published "
                                        "(publish_filled = true); also counted in messages_out", ["pipeline"])
        self.queue_dropped = counter("queue_dropped", "Messages dropped because the work queue was full")
        self.reconnects = counter("reconnects", "Reconnections to the broker")
        self.publish_failures = counter("publish_failures", "Publishes the MQTT client refused at once (those "
                                        "predictions are lost; the log says why)")
        self.batches = counter("batches", "Micro-batches processed")
        self.queue_depth = gauge("queue_depth", "Messages waiting in the work queue")
        self.streams_live = gauge("streams_live", "Streams with a state in memory", ["pipeline"])
        self.connected = gauge("connected", "1 while connected to the broker, else 0")
        self.model_info = gauge("model_info", "1 for the model each pipeline serves: its name, model_version and "
                                "fingerprint (the first 12 hex digits)", ["pipeline", "name", "version", "fingerprint"])
        self.model_updates = counter("model_updates", "Model updates over MQTT by what became of them: installed, "
                                     "shadow_started, promoted, shadow_failed, rolled_back, refused_<reason>",
                                     ["pipeline", "result"])
        self._models: dict = {}  # pipeline -> the model_info labels it shows
        self.step_seconds = Histogram(f"{PREFIX}_step_seconds", "Duration of one step_batch call", ["pipeline"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Messages per micro-batch", buckets=BATCH_BUCKETS, registry=r)
        self.latency_seconds = Histogram(f"{PREFIX}_latency_seconds", "Message received -> prediction handed to MQTT",
                                         buckets=LATENCY_BUCKETS, registry=r)
        if process_metrics:
            ProcessCollector(registry=r)  # process_* (memory, CPU, fds): what a Pi operator watches first

        self._pipelines = {name: PipelineMetrics(self, name) for name in pipelines}

    def set_model(self, pipeline: str, model) -> None:
        """Show ``model`` as what ``pipeline`` serves (`edgernn_model_info`, the stats' ``model``)."""
        from edgernn.format import model_fingerprint

        labels = (pipeline, model.spec.name, model.spec.model_version, model_fingerprint(model)[7:19])
        previous = self._models.get(pipeline)
        if previous is not None and previous != labels:
            self.model_info.remove(*previous)
        self._models[pipeline] = labels
        self.model_info.labels(*labels).set(1)

    def pipeline(self, name: str) -> PipelineMetrics:
        """The pre-bound metrics of pipeline ``name`` (created on first use if it was not listed)."""
        bound = self._pipelines.get(name)
        if bound is None:
            bound = self._pipelines[name] = PipelineMetrics(self, name)
        return bound

    # ---- exposition ---------------------------------------------------------------------------------
    def serve(self, listen: str) -> tuple[str, int]:
        """Serve the Prometheus endpoint on ``"host:port"`` (port 0: any free port) from a daemon thread.

        Returns the address actually bound. ``"[::1]:9464"`` for IPv6; an empty host means all IPv4.
        """
        if self._server is not None:
            raise RuntimeError("metrics endpoint already serving")
        host, port = parse_listen_address(listen)
        served = start_http_server(port, host, registry=self.registry)
        if not isinstance(served, tuple):  # prometheus_client < 0.15 returned nothing: no way to stop it
            raise RuntimeError("prometheus-client >= 0.17 is required (start_http_server must return the server)")
        self._server, self._thread = served
        bound_host, bound_port = self._server.server_address[:2]
        log.info("metrics endpoint listening", extra={"host": bound_host, "port": bound_port})
        return bound_host, bound_port

    def stop(self) -> None:
        """Shut the HTTP endpoint down (no-op when not serving)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    def text(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def stats(self) -> dict:
        """A compact JSON-able summary for the retained stats topic (computed from the metrics themselves)."""
        inputs = _by_label(self.messages_in, "pipeline")
        outputs = _by_label(self.messages_out, "pipeline")
        duplicates = _by_label(self.duplicates, "pipeline")
        gaps = _by_label(self.seq_gaps, "pipeline")
        missed = _by_label(self.samples_missed, "pipeline")
        streams = _by_label(self.streams_live, "pipeline")
        rejected = _by_label(self.rejected, "pipeline")
        step_buckets = _buckets_by_label(self.step_seconds, "pipeline")
        rejected_by: dict = {}  # {pipeline: {reason: count}}, the reasons counted so far only
        for family in self.rejected.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    reasons = rejected_by.setdefault(sample.labels["pipeline"], {})
                    reasons[sample.labels["reason"]] = int(sample.value)
        pipelines = {}
        for name in self._pipelines:
            buckets = step_buckets.get(name, [])
            pipelines[name] = {
                "in": int(inputs.get(name, 0)),
                "out": int(outputs.get(name, 0)),
                "rejected": int(rejected.get(name, 0)),
                "rejected_by": rejected_by.get(name, {}),
                "duplicates": int(duplicates.get(name, 0)),
                "gaps": int(gaps.get(name, 0)),
                "missed": int(missed.get(name, 0)),
                "streams": int(streams.get(name, 0)),
                "step_p50_s": _rounded(quantile_from_buckets(buckets, 0.5)),
                "step_p99_s": _rounded(quantile_from_buckets(buckets, 0.99)),
            }
            if name in self._models:
                pipelines[name]["model"] = dict(zip(("name", "version", "fingerprint"), self._models[name][1:]))
        latency = _buckets_by_label(self.latency_seconds, None).get(None, [])
        return {
            "uptime_s": round(time.monotonic() - self._started, 1),
            "connected": bool(_by_label(self.connected, None).get(None, 0)),
            "queue_depth": int(_by_label(self.queue_depth, None).get(None, 0)),
            "queue_dropped": int(_by_label(self.queue_dropped, None).get(None, 0)),
            "latency_p50_s": _rounded(quantile_from_buckets(latency, 0.5)),
            "latency_p99_s": _rounded(quantile_from_buckets(latency, 0.99)),
            "pipelines": pipelines,
        }


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Estimate quantile ``q`` from cumulative histogram buckets [(upper_bound, count), ...], +Inf last.

    Linear interpolation inside the bucket holding the rank, as PromQL's ``histogram_quantile`` does:
    the first bucket starts at 0, and a rank in the +Inf bucket answers the highest finite bound.
    None when the histogram is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(upper_bound):
                return lower_bound
            return lower_bound + (upper_bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def _label_of(sample, label: str | None):
    return None if label is None else sample.labels.get(label)


def _by_label(metric, label: str | None) -> dict:
    """Sum of a counter's or gauge's current values per value of ``label`` (None: the unlabelled total)."""
    totals: dict = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = _label_of(sample, label)
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _buckets_by_label(histogram, label: str | None) -> dict:
    """Cumulative buckets [(le, count)] of a histogram per value of ``label``."""
    buckets: dict = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = _label_of(sample, label)
                buckets.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
    return buckets
