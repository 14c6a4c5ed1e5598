"""examples/activity_gru runs end to end in quick mode: train, export, convert, verify, serve, score."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.torch]
ROOT = Path(__file__).resolve().parent.parent


def test_activity_example_quick_mode(tmp_path):
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, ROOT / "examples" / "activity_gru" / "activity_gru.py", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert (tmp_path / "activity_gru.onnx").is_file() and (tmp_path / "activity_gru.ern").is_file()
    error = float(re.search(r"max \|edgernn - onnxruntime\| = (\S+)", out).group(1))
    assert error <= 1e-5
    predictions, samples = map(int, re.search(r"(\d+) predictions for (\d+) samples", out).groups())
    assert samples >= 4 * 50 * 4 and predictions == samples  # every sample answered
    assert re.search(r"streaming accuracy \d+\.\d%", out)
