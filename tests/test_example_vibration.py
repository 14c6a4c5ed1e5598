"""examples/vibration_lstm runs in its quick mode, as a user would run it, and draws its picture."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "vibration_lstm" / "vibration_lstm.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.torch


def figure(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    assert match, f"no line matching {pattern!r} in:\n{output}"
    return float(match.group(1))


def test_vibration_example_detects_the_fault_streams_in_parity_and_draws_a_png(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plots" / "vibration.png"
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--plot", plot], capture_output=True, text=True,
                            timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr

    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert figure(result.stdout, r"max \|edgernn - PyTorch\| = (\S+)") <= 1e-5
    # The quick model is a lightly trained one and still separates the fault by a wide margin (about 0.9999
    # on this stream), so a modest bound is robust.
    assert figure(result.stdout, r"ROC AUC (\S+)") > 0.9
    assert re.search(r"detection: 1 of 1 faults raised an alarm", result.stdout), result.stdout
