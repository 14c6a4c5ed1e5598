"""The `edgernn` command line, run as a user runs it: a real process, real files."""

import os
import subprocess
import sys

import numpy as np
import pytest

import edgernn
from helpers import random_model

CLI = [sys.executable, "-m", "edgernn.cli"]


def edgernn_cli(*args, stdin=None):
    return subprocess.run(CLI + [str(a) for a in args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())


def test_inspect_describes_a_model_file(tmp_path):
    model = random_model("gru", hidden=32, head=(8, 3), normalize=True)
    path = tmp_path / "model.ern"
    edgernn.save(model, path, dtype="int8")
    result = edgernn_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "gru 8->32" in result.stdout and "dense 8->3" in result.stdout
    assert "int8" in result.stdout and "sha256:" in result.stdout
    assert f"{model.spec.parameter_count():,}" in result.stdout
    assert f"{model.spec.flops_per_step():,}" in result.stdout


def test_stream_prints_one_prediction_per_sample_and_skips_bad_lines(tmp_path):
    model = random_model("lstm", hidden=16, head=(2,))
    path = tmp_path / "model.ern"
    edgernn.save(model, path)
    xs = np.random.default_rng(0).standard_normal((5, model.input_size)).astype(np.float32)
    lines = [",".join(repr(float(v)) for v in x) for x in xs]
    lines.insert(2, "1,2,3")                      # wrong length
    lines.insert(4, ",".join(["nan"] * model.input_size))
    result = edgernn_cli("stream", path, stdin="\n".join(lines) + "\n")
    assert result.returncode == 1  # some lines were rejected
    assert "line 3 skipped" in result.stderr and "line 5 skipped" in result.stderr
    got = np.array([[float(v) for v in line.split(",")] for line in result.stdout.split()])
    expected = model.run(xs, model.new_state())  # the bad lines left the state alone
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_convert_a_pytorch_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("rnn", torch.nn.RNN(3, 12, nonlinearity="relu"))
    head = torch.nn.Linear(12, 2)
    state = {f"rnn.{k}": v for k, v in net.rnn.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    checkpoint, output = tmp_path / "ckpt.pt", tmp_path / "model.ern"
    torch.save(state, checkpoint)
    result = edgernn_cli("convert", checkpoint, "-o", output, "--nonlinearity", "relu",
                         "--head-activations", "sigmoid")
    assert result.returncode == 0, result.stderr
    model = edgernn.load(output)
    xs = torch.randn(50, 1, 3)
    with torch.no_grad():
        expected = torch.sigmoid(head(net.rnn(xs)[0])).numpy()[:, 0]
    np.testing.assert_allclose(model.run(xs.numpy()[:, 0], model.new_state()), expected, atol=1e-5)


@pytest.mark.parametrize("command", ["inspect", "stream"])
def test_a_bad_file_is_one_clear_line_and_exit_1(tmp_path, command):
    path = tmp_path / "not-a-model.ern"
    path.write_text("hello")
    result = edgernn_cli(command, path, stdin="")
    assert result.returncode == 1
    assert "not-a-model.ern" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compile_fills_the_cache_and_says_so():
    result = edgernn_cli("compile")
    assert result.returncode == 0, result.stderr
    assert "kernels compiled and cached" in result.stdout


def test_no_command_prints_help():
    result = edgernn_cli()
    assert result.returncode == 2 and "convert" in result.stdout
