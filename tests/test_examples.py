"""Every example runs, in a quick mode, as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_trains_converts_and_streams():
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, ROOT / "examples" / "quickstart.py", "--train-seconds", "0.5",
                             "--steps", "200"], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert "streamed 200 samples" in result.stdout
    error = float(result.stdout.split("max |edgernn - PyTorch| = ")[1].split()[0])
    assert error <= 1e-5


def test_rest_state_example_shows_the_start_up_transient_it_removes():
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, ROOT / "examples" / "rest_state" / "pump_transient.py", "--quick"],
                            capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    rows = {line[:35].strip(): [float(v) for v in line[35:].split()]
            for line in result.stdout.splitlines() if len(line) > 35 and line[35:].split()
            and all(v.replace(".", "", 1).isdigit() for v in line[35:].split())}
    assert set(rows) == {"zeros (no rest state)", "--rest-state idle (input 0)", "idle at 3 bar (constant calib)",
                         "--rest-state calib.npy", "steady state (same samples)"}
    assert all(len(errors) == 4 for errors in rows.values())
    # From zeros the first forecast misses by about the 3 bar operating point; from the calibration state by
    # about the steady-state error.
    assert rows["zeros (no rest state)"][0] > 2 * rows["--rest-state calib.npy"][0]
    assert rows["--rest-state calib.npy"][0] < 2 * rows["steady state (same samples)"][0]
