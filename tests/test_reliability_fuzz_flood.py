"""The quick modes of reliability/fuzz_live.py and reliability/flood.py, as `make test` runs them.

Each script starts its own Mosquitto and `edgernn serve`, and judges itself (see their docstrings); these
tests run them as subprocesses and check the verdict plus the counts their JSON reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker import mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(ROOT / "reliability" / f"{name}.py"), "--quick", "--json", str(out),
                           *args], capture_output=True, text=True, timeout=300)
    assert out.exists(), f"{name} wrote no JSON (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(out.read_text())
    assert results["passed"], f"{name} failed: {results['failures']}\n{done.stdout[-3000:]}"
    assert done.returncode == 0
    return results


def test_fuzz_live_quick(tmp_path):
    results = run_script("fuzz_live", tmp_path)
    assert results["count"] == 3000
    for name, p in results["pipelines"].items():
        assert p["messages_in"] == p["published"] > 0, name
        assert sum(p["rejected"].values()) + p["predictions"] + p["duplicates"] == p["messages_in"], name
        assert p["rejected"] == {r: p["expected_rejected"].get(r, 0) for r in p["rejected"]}, name
        assert p["rejected"]["internal"] == 0
    reasons = {r for p in results["pipelines"].values() for r, n in p["rejected"].items() if n}
    assert len(reasons) == 12, f"every reject reason is reached: {sorted(reasons)}"
    assert all(t["predictions"] == t["samples"] > 0 for t in results["tracked"].values())
    assert results["tracked_max_abs_error"] <= 1e-5
    assert results["exit_code"] == 0


def test_flood_quick(tmp_path):
    results = run_script("flood", tmp_path)
    keys = results["keys"]
    counts = keys["counts"]
    assert counts["messages_out_total"] == keys["keys"] == 20_000
    assert counts["streams_live"] == keys["max_streams"] == 1_000
    assert counts["evictions_total"] == 19_000
    assert keys["rss_growth"]["growth_fraction"] < 0.25  # the quick runs' smoke bound (flood.py QUICK_GROWTH_BOUND)
    sizes = results["sizes"]["counts"]
    assert sizes == {"messages_in": 5, "oversize": 3, "rejected_total": 3, "predictions": 2, "dead_letters": 3}
    qos1, qos0 = results["speed"]["qos1"], results["speed"]["qos0"]
    assert qos1["max_queue_depth"] <= qos1["max_undelivered_messages"]
    assert qos1["predicted_distinct"] == qos1["predictions_published"] == results["speed"]["messages"]
    assert qos1["max_abs_error"] <= 1e-5
    assert qos0["messages_in"] + qos0["queue_dropped"] + qos0["broker_dropped"] == qos0["published"]
    assert qos0["queue_dropped"] > 0
