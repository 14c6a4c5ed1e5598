"""examples/keras_or_other_onnx runs in quick mode as a user would run it: a hand-built ONNX LSTM graph
(peepholes, coupled input-forget gate, HardSigmoid gates) converts, verifies and streams."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "keras_or_other_onnx" / "hand_built_lstm.py"
TOLERANCE = 1e-5  # float32 parity, the project's standard and `edgernn verify`'s default


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"no match for {pattern!r} in:\n{text}"
    return float(found.group(1))


def test_hand_built_onnx_lstm_converts_verifies_and_streams():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=300,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LSTM with peepholes, input_forget=1, HardSigmoid gates" in out
    assert "peepholes, coupled-input-forget [hard_sigmoid(0.2, 0.5),tanh,tanh]" in out  # edgernn inspect
    assert "PASS: every output within tolerance 1e-05" in out  # edgernn verify against onnxruntime
    whole = number(r"max \|edgernn - onnxruntime\| = (\S+) \(model\.run\)", out)
    streamed = number(r", (\S+) \(model\.step, one sample at a time\)", out)
    assert whole <= TOLERANCE and streamed <= TOLERANCE
    assert number(r"step graph, one sample per session\.run: max \|difference\| to its whole-sequence run (\S+)",
                  out) <= TOLERANCE
    assert number(r"accuracy (\S+)% held out", out) >= 90.0  # seeded data and weights: a fixed model
    assert re.search(r"edgernn model\.step \S+ µs, onnxruntime session\.run \S+ µs", out)
