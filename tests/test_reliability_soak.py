"""reliability/soak.py --quick: the daemon under a simulated fleet, nothing lost, every row reported.

The full soak (10 minutes and more) is a script; its figures are in docs/reliability.md. This runs its
quick mode, which checks the same things over 20 s (RSS growth is reported, not judged, that short).
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


def test_quick_soak_loses_nothing_and_reports_each_interval(tmp_path):
    results_path = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(ROOT / "reliability" / "soak.py"), "--quick", "--json", str(results_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert results["passed"] and not results["failures"]
    assert results["published"] > 10_000 and results["predicted"] == results["published"]
    assert results["missing"] == 0 and results["max_abs_error"] <= 1e-5
    assert results["rejected"] == 0 and results["queue_dropped"] == 0 and results["daemon_exit_code"] == 0
    assert len(results["rows"]) >= 8
    for row in results["rows"]:
        assert row["in_per_s"] > 0 and row["rss_bytes"] > 0 and row["p50_ms"] is not None
