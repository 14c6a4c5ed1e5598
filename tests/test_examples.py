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
