"""`edgernn demo` runs headless for a few seconds, on each kind of local broker, and exits 0 with a summary.

The demo starts everything itself (broker, `edgernn serve`, a simulated fleet, the scoreboard); these
tests check what a newcomer sees: predictions for what the fleet published, scored against the truth."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgernn
from edgernn.demo import bundled_model
from edgernn.firmware_sim.signals import ImuSignal

from helpers import random_model

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
    out, summary = run_demo(tmp_path, "--broker-kind", broker_kind, "--screenshot", str(tmp_path / "view.svg"))
    assert "edgernn demo summary" in out and f"{broker_kind} on 127.0.0.1" in out
    picture = (tmp_path / "view.svg").read_text()
    assert picture.startswith("<svg") and "dev0003" in picture and "accuracy" in picture
    assert summary["daemon_exit_code"] == 0 and not summary["interrupted"]
    # 4 devices at 50 Hz for 4 s: every published sample gets its prediction (QoS 1 in, nothing dropped).
    assert summary["published"] >= 4 * 50 * 3
    assert summary["predictions"] == summary["published"]
    assert summary["daemon_rejected"] == 0
    assert summary["accuracy"] is not None and summary["accuracy"] > 0.5


def demo_processes(folder_prefix: str) -> list[str]:
    """Command lines of live processes started for a demo (the daemon's config and the broker's data live in
    its temporary folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder_prefix in command:
            found.append(command)
    return found


def sigint_as_in_a_terminal() -> None:
    """A background job of a shell (CI, `make test &`) starts with SIGINT ignored, and Python keeps it so;
    the demo under test must get Ctrl-C as it would in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_terminal_stops_everything_with_nothing_lost(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C does: the demo stops the fleet, waits for the
    daemon to answer what was sent, prints the summary, and leaves no process or folder behind."""
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the demo's temporary folder lands here, to check it is gone
    demo = subprocess.Popen([sys.executable, "-m", "edgernn", "demo", "--duration", "120", "--devices", "6",
                             "--headless", "--json", str(summary_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("[demo] fleet:"):
                break
        assert demo_processes(str(tmp_path / "edgernn-demo-")), "no daemon or broker running"
        time.sleep(2.0)
        os.killpg(demo.pid, signal.SIGINT)
        out = "".join(lines) + demo.stdout.read()
        assert demo.wait(60) == 0, out
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert "edgernn demo summary (stopped by Ctrl-C)" in out
    summary = json.loads(summary_path.read_text())
    assert summary["interrupted"] and summary["published"] > 0
    assert summary["predictions"] == summary["published"] and summary["daemon_exit_code"] == 0
    time.sleep(0.5)
    assert demo_processes(str(tmp_path / "edgernn-demo-")) == []
    assert not list(tmp_path.glob("edgernn-demo-*"))


def test_a_model_the_fleet_cannot_feed_is_refused_before_anything_starts(tmp_path):
    path = tmp_path / "wrong.ern"
    edgernn.save(random_model("gru", input_size=3, hidden=8, head=(2,)), path)
    result = subprocess.run([sys.executable, "-m", "edgernn", "demo", "--model", str(path), "--headless"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "wrong.ern: takes 3 inputs and gives 2 outputs" in result.stderr and "broker" not in result.stdout
