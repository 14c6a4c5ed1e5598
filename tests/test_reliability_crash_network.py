"""The quick modes of reliability/crash_cycles.py and reliability/network_faults.py, as `make test` runs them.

Each script proves its own verdict (its docstring says what "passed" means); here each runs as a
subprocess and its JSON is checked for the verdict and the figures that make it mean something: kills
and faults really happened, the daemon counted what it had to, and nothing was lost where nothing may be.
Slow-ish (each about 20 to 45 s): they start real daemons many times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker import mosquitto_binary

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, tmp_path: Path) -> dict:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "reliability" / script), "--quick", "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.exists(), f"{script} wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(report.read_text())
    assert results["passed"] and done.returncode == 0, f"{results['failures']}\n{done.stdout[-3000:]}"
    return results


def test_crash_cycles_quick(tmp_path):
    results = _run("crash_cycles.py", tmp_path)
    journal, snapshot = results["journal"], results["snapshot"]
    for mode in (journal, snapshot):
        assert mode["kills"] == 5
        assert mode["unpredicted"] == 0 and mode["unexplained"] == 0 and mode["max_abs_error"] <= 1e-5
        assert mode["recovery_s"]["count"] >= 1
    assert journal["predictions_received"] >= journal["messages_published"]
    loss = snapshot["loss_per_kill"]
    assert len(loss["samples"]) == 5 and loss["total"] > 0  # the snapshot's age is never zero at a kill
    for row in snapshot["per_kill"]:
        assert row["counted"] == row["from_snapshot"] == row["from_predictions"]
        assert row["worst_stream"] <= row["worst_bound"]


def test_network_faults_quick(tmp_path):
    results = _run("network_faults.py", tmp_path)
    faults = results["faults"]
    assert sorted(faults) == sorted(["connection_cut", "silent_drop", "refused", "broker_restart", "broker_kill",
                                     "broker_kill_backlog"])
    for name, fault in faults.items():
        assert fault["reconnects"] >= 1, name
        assert fault["reconnect_s"] is not None and fault["caught_up_s"] is not None, name
        if not fault["lossy"]:
            assert fault["samples_missed"] == 0, name
    assert faults["refused"]["outage_s"] >= 5 and faults["silent_drop"]["outage_s"] >= 6
    assert faults["broker_kill_backlog"]["samples_missed"] > 0  # the backlog the broker held in memory only
    assert results["samples_lost_at_the_broker"] == sum(f["samples_missed"] for f in faults.values())
    assert results["repeats_differing"] == 0 and results["max_abs_error"] <= 1e-5
    assert results["rejected"] == 0 and results["queue_dropped"] == 0
