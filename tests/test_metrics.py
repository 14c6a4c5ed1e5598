"""The daemon's metrics (runtime/metrics.py): zeros up front, pre-bound children, own registry, HTTP, stats."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from edgernn.runtime.metrics import (BATCH_BUCKETS, LATENCY_BUCKETS, RESET_CAUSES, STEP_BUCKETS, Metrics,
                                     quantile_from_buckets)

REASONS = ("not_json", "wrong_length", "non_finite", "oversize")


@pytest.fixture
def metrics():
    m = Metrics(["imu", "temp"], REASONS)
    yield m
    m.stop()


def samples(metrics: Metrics) -> dict:
    """{(sample name, sorted labels): value} from the text exposition, as a scraper reads it."""
    found = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


# ---- buckets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("buckets, low, high", [(STEP_BUCKETS, 1e-6, 1.0), (LATENCY_BUCKETS, 1e-5, 10.0)])
def test_time_buckets_span_the_range_about_2_5_apart(buckets, low, high):
    assert buckets[0] == pytest.approx(low) and buckets[-1] == pytest.approx(high)
    ratios = np.diff(np.log(buckets))
    assert np.all(np.abs(np.exp(ratios) - 2.5) < 0.1)


def test_batch_buckets_are_powers_of_two_to_4096():
    assert BATCH_BUCKETS == tuple(float(2**k) for k in range(13))


# ---- exposition -------------------------------------------------------------------------------------------
def test_every_labelled_series_exists_at_zero(metrics):
    found = samples(metrics)
    for pipeline in ("imu", "temp"):
        for name in ("messages_in", "messages_out", "duplicates", "seq_gaps", "samples_missed", "evictions",
                     "dead_letters"):
            assert found[f"edgernn_{name}_total", (("pipeline", pipeline),)] == 0
        assert found["edgernn_streams_live", (("pipeline", pipeline),)] == 0
        assert found["edgernn_step_seconds_count", (("pipeline", pipeline),)] == 0
        for reason in REASONS:
            assert found["edgernn_rejected_total", (("pipeline", pipeline), ("reason", reason))] == 0
        for cause in RESET_CAUSES:
            assert found["edgernn_resets_total", (("cause", cause), ("pipeline", pipeline))] == 0
    for name in ("edgernn_queue_dropped_total", "edgernn_reconnects_total", "edgernn_publish_failures_total",
                 "edgernn_batches_total",
                 "edgernn_queue_depth", "edgernn_connected", "edgernn_batch_size_count", "edgernn_latency_seconds_count"):
        assert found[name, ()] == 0


def test_pre_bound_pipeline_children_record_under_their_labels(metrics):
    imu = metrics.pipeline("imu")
    assert metrics.pipeline("imu") is imu
    imu.messages_in.inc(5)
    imu.messages_out.inc(3)
    imu.rejected("not_json").inc()
    imu.rejected("oversize").inc(2)
    imu.resets("gap").inc()
    imu.streams_live.set(7)
    imu.step_seconds.observe(2e-4)
    metrics.queue_depth.set(11)
    metrics.batch_size.observe(64)
    found = samples(metrics)
    assert found["edgernn_messages_in_total", (("pipeline", "imu"),)] == 5
    assert found["edgernn_messages_in_total", (("pipeline", "temp"),)] == 0
    assert found["edgernn_messages_out_total", (("pipeline", "imu"),)] == 3
    assert found["edgernn_rejected_total", (("pipeline", "imu"), ("reason", "oversize"))] == 2
    assert found["edgernn_resets_total", (("cause", "gap"), ("pipeline", "imu"))] == 1
    assert found["edgernn_streams_live", (("pipeline", "imu"),)] == 7
    assert found["edgernn_step_seconds_count", (("pipeline", "imu"),)] == 1
    assert found["edgernn_queue_depth", ()] == 11
    assert found["edgernn_batch_size_bucket", (("le", "64.0"),)] == 1
    assert found["edgernn_batch_size_bucket", (("le", "32.0"),)] == 0


def test_unforeseen_reason_and_pipeline_get_series_on_first_use(metrics):
    metrics.pipeline("late").rejected("something_new").inc()
    found = samples(metrics)
    assert found["edgernn_rejected_total", (("pipeline", "late"), ("reason", "something_new"))] == 1


def test_each_instance_has_its_own_registry_and_the_global_one_is_untouched():
    first, second = Metrics(["imu"], REASONS), Metrics(["imu"], REASONS)
    first.pipeline("imu").messages_in.inc()
    assert samples(first)["edgernn_messages_in_total", (("pipeline", "imu"),)] == 1
    assert samples(second)["edgernn_messages_in_total", (("pipeline", "imu"),)] == 0
    assert not any(name.startswith("edgernn_") for name in REGISTRY._names_to_collectors)


def test_process_metrics_are_included_unless_turned_off():
    assert b"process_resident_memory_bytes" in Metrics(["imu"], REASONS).text()
    assert b"process_" not in Metrics(["imu"], REASONS, process_metrics=False).text()


# ---- HTTP endpoint ----------------------------------------------------------------------------------------
def test_serve_on_a_free_port_then_stop(metrics):
    metrics.pipeline("imu").messages_in.inc(2)
    host, port = metrics.serve("127.0.0.1:0")
    assert host == "127.0.0.1" and port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'edgernn_messages_in_total{pipeline="imu"} 2.0' in body
    with pytest.raises(RuntimeError):
        metrics.serve("127.0.0.1:0")
    metrics.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.stop()  # a second stop does nothing


# ---- quantiles and the stats summary ---------------------------------------------------------------------
def test_quantile_interpolates_inside_the_bucket():
    buckets = [(1.0, 10), (2.0, 30), (4.0, 40), (math.inf, 40)]
    assert quantile_from_buckets(buckets, 0.25) == pytest.approx(1.0)
    assert quantile_from_buckets(buckets, 0.5) == pytest.approx(1.5)
    assert quantile_from_buckets(buckets, 0.1) == pytest.approx(0.4)   # first bucket starts at 0
    assert quantile_from_buckets(buckets, 1.0) == pytest.approx(2.0 + 2.0 * 10 / 10)


def test_quantile_in_the_inf_bucket_answers_the_highest_finite_bound():
    assert quantile_from_buckets([(1.0, 1), (2.0, 1), (math.inf, 10)], 0.99) == 2.0


def test_quantile_of_an_empty_histogram_is_none_and_q_is_checked():
    assert quantile_from_buckets([(1.0, 0), (math.inf, 0)], 0.5) is None
    assert quantile_from_buckets([], 0.5) is None
    with pytest.raises(ValueError):
        quantile_from_buckets([(1.0, 1), (math.inf, 1)], 1.5)


def test_quantile_estimate_lands_in_the_bucket_of_the_true_quantile():
    rng = np.random.default_rng(0)
    durations = rng.lognormal(mean=math.log(3e-4), sigma=1.0, size=5000)
    m = Metrics(["imu"], REASONS, process_metrics=False)
    for d in durations:
        m.pipeline("imu").step_seconds.observe(d)
    for q in (0.5, 0.99):
        estimate = m.stats()["pipelines"]["imu"][f"step_p{round(q * 100)}_s"]
        true = float(np.quantile(durations, q))
        assert true / 2.5 <= estimate <= true * 2.5


def test_stats_summarises_counts_and_is_json(metrics):
    imu = metrics.pipeline("imu")
    imu.messages_in.inc(10)
    imu.messages_out.inc(7)
    imu.rejected("not_json").inc(2)
    imu.rejected("non_finite").inc()
    imu.duplicates.inc()
    imu.seq_gaps.inc(4)
    imu.samples_missed.inc(9)
    imu.streams_live.set(3)
    metrics.queue_depth.set(5)
    metrics.queue_dropped.inc()
    metrics.connected.set(1)
    metrics.latency_seconds.observe(0.002)
    stats = json.loads(json.dumps(metrics.stats()))
    assert stats["pipelines"]["imu"] == {"in": 10, "out": 7, "rejected": 3, "duplicates": 1, "gaps": 4, "missed": 9,
                                         "streams": 3, "step_p50_s": None, "step_p99_s": None,
                                         "rejected_by": {"not_json": 2, "non_finite": 1}}
    assert stats["pipelines"]["temp"]["in"] == 0
    assert stats["queue_depth"] == 5 and stats["queue_dropped"] == 1 and stats["connected"] is True
    assert 1e-3 <= stats["latency_p50_s"] <= 4e-3
    assert stats["uptime_s"] >= 0
