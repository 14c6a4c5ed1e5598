"""Smoke test of benchmarks/daemon_throughput.py: the quick run finishes and reports every figure.

No timing assertions: this machine's speed drifts too much for them; the benchmark itself is the measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker import mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "daemon_throughput.py"

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make broker)")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(results)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    return done, results


def test_quick_run_exits_cleanly_and_prints_both_tables(quick_run):
    done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("Drain of 2,000 queued QoS 1 JSON messages over 100 streams", "daemon / subscriber =",
                    "daemon / relay =", "Latency at 500 msg/s for 1 s"):
        assert heading in done.stdout
    for consumer in ("subscriber", "relay", "daemon"):
        assert consumer in done.stdout


def test_quick_run_writes_every_figure_to_json(quick_run):
    done, path = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(path.read_text())
    assert results["config"]["messages"] == 2000 and results["config"]["streams"] == 100
    throughput = results["throughput"]
    for consumer in ("subscriber", "relay", "daemon"):
        assert throughput[consumer]["messages_per_s"] > 0
        assert throughput[consumer]["out_per_s"] > 0
    assert throughput["relay"]["confirmed_per_s"] > 0
    assert throughput["relay"]["delivered_per_s"] > 0 and throughput["daemon"]["delivered_per_s"] > 0
    assert throughput["daemon"]["messages_in"] == 2000  # the timed drain saw exactly the backlog, once
    assert throughput["daemon"]["mean_batch"] > 0
    assert results["ratios"]["daemon_per_subscriber"] > 0 and results["ratios"]["daemon_per_relay"] > 0
    for consumer in ("subscriber", "relay", "daemon"):
        latency = results["latency"][consumer]
        assert latency["published"] == 500
        assert latency["received"] == latency["published"]  # every paced message came through
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
