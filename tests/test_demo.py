"""`edgernn demo` runs headless for a few seconds, on each kind of local broker, and exits 0 with a summary.

The demo starts everything itself (broker, `edgernn serve`, a simulated fleet, the scoreboard); these
tests check what a newcomer sees: predictions for what the fleet published, scored against the truth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgernn
from edgernn.demo import bundled_model
from edgernn.firmware_sim.signals import ImuSignal

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path, *options):
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "edgernn", "demo", "--duration", "4", "--devices", "4",
                             "--headless", "--json", str(summary), *options],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(summary.read_text())


def test_the_bundled_model_classifies_the_simulators_activities():
    model = edgernn.load(bundled_model())
    assert model.input_size == len(ImuSignal.channels) and model.output_size == len(ImuSignal.labels)


@pytest.mark.parametrize("broker_kind", ["mosquitto", "amqtt"])
def test_demo_runs_headless_and_exits_0_with_a_summary(tmp_path, broker_kind):
    if broker_kind == "mosquitto":
        from broker import mosquitto_binary
        if mosquitto_binary() is None:
            pytest.skip("mosquitto is not installed")
    out, summary = run_demo(tmp_path, "--broker-kind", broker_kind)
    assert "edgernn demo summary" in out and f"{broker_kind} on 127.0.0.1" in out
    assert summary["daemon_exit_code"] == 0 and not summary["interrupted"]
    # 4 devices at 50 Hz for 4 s: every published sample gets its prediction (QoS 1 in, nothing dropped).
    assert summary["published"] >= 4 * 50 * 3
    assert summary["predictions"] == summary["published"]
    assert summary["daemon_rejected"] == 0
    assert summary["accuracy"] is not None and summary["accuracy"] > 0.5
