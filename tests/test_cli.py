"""The `edgernn` command line, run as a user runs it: real files in a temporary directory, the real parser.

Most tests call `edgernn.cli.main` in this process (capturing its output, which is what a process would
print); the ones about processes -- exit codes, stderr, PYTHONPATH, no traceback -- run
``python -m edgernn`` for real.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import edgernn
from edgernn.cli import main
from helpers import random_model

CLI = [sys.executable, "-m", "edgernn"]
TOL = 1e-5


def edgernn_cli(*args, stdin=None, env=None):
    return subprocess.run(CLI + [str(a) for a in args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def run_cli(capsys, *args):
    """``edgernn ARGS`` in this process -> (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *names):
    assert status == 1, err
    assert err.startswith("edgernn: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert str(name) in err


# ---- PyTorch sources ----------------------------------------------------------------------------------

try:
    import torch
    from torch import nn
except ImportError:  # the aarch64 test root has no torch: the tests that need it skip, the others run
    torch = None


def needs_torch(test):
    return pytest.mark.torch(pytest.mark.skipif(torch is None, reason="needs PyTorch (the convert extra)")(test))


def scaled(module, seed=0):
    """Input and projection weights of std 1.5/sqrt(fan_in): outputs well inside the nonlinear range."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if name.split(".")[-1].startswith(("weight_ih", "weight_hr")) or name.endswith("fc.weight"):
                weight.normal_(0.0, 1.5 / math.sqrt(weight.shape[1]))
    return module.eval()


class Net(nn.Module if torch is not None else object):
    """A recurrent layer, a Linear and an activation (module level, so a pickled one loads again)."""

    def __init__(self, rnn, outputs=3, activation=None):
        super().__init__()
        self.rnn = rnn
        width = (getattr(rnn, "proj_size", 0) or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.fc = nn.Linear(width, outputs)
        self.act = activation or nn.Tanh()

    def forward(self, x):
        return self.act(self.fc(self.rnn(x)[0]))


def bilstm(batch_first=True):
    torch.manual_seed(0)
    return scaled(Net(nn.LSTM(3, 16, num_layers=2, proj_size=5, bidirectional=True, batch_first=batch_first)))


def gru_net(batch_first=False):
    torch.manual_seed(1)
    return scaled(Net(nn.GRU(4, 12, num_layers=2, batch_first=batch_first), outputs=2, activation=nn.Sigmoid()))


def torch_outputs(module, xs, batch_first):
    x = torch.from_numpy(xs)
    x = x.unsqueeze(0) if batch_first else x.unsqueeze(1)
    with torch.no_grad():
        out = module(x)
    return (out[0] if batch_first else out[:, 0]).numpy()


def sequence(steps, size, seed=1):
    return np.random.default_rng(seed).standard_normal((steps, size), dtype=np.float32)


# ---- convert ------------------------------------------------------------------------------------------


@needs_torch
def test_convert_a_pytorch_state_dict(tmp_path):
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
    assert result.stdout.startswith(f"wrote {output}: 3 -> rnn(12) -> dense(2, sigmoid); 230 parameters, float32")
    assert len(result.stdout.splitlines()) == 1 and result.stderr == ""
    model = edgernn.load(output)
    xs = torch.randn(50, 1, 3)
    with torch.no_grad():
        expected = torch.sigmoid(head(net.rnn(xs)[0])).numpy()[:, 0]
    np.testing.assert_allclose(model.run(xs.numpy()[:, 0], model.new_state()), expected, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("how", ["script", "trace"])
def test_convert_torchscript_bidirectional_projection(tmp_path, capsys, how):
    module = bilstm()
    example = torch.zeros(1, 9, 3)
    script = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)
    torch.jit.save(script, tmp_path / "net.pt")
    status, out, err = run_cli(capsys, "convert", tmp_path / "net.pt", "-o", tmp_path / "net.ern")
    assert status == 0, err
    assert "lstm(16, bidirectional, proj 5) -> lstm(16, bidirectional, proj 5) -> dense(3, tanh)" in out
    model = edgernn.load(tmp_path / "net.ern")
    xs = sequence(300, 3)
    ref = torch_outputs(module, xs, True)
    assert np.std(ref) > 0.05
    assert np.max(np.abs(model.run(xs, model.new_state()) - ref)) <= TOL


FACTORY = '''
from torch import nn


class Tagger(nn.Module):
    def __init__(self, hidden=10):
        super().__init__()
        self.rnn = nn.GRU(3, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def make():
    return Tagger()
'''


@needs_torch
def test_factory_with_weights_in_a_real_process(tmp_path, monkeypatch):
    """`package.module:factory` imports from PYTHONPATH; --weights is a plain state dict (no pickle flag)."""
    package = tmp_path / "src" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    from mypkg.models import make

    torch.manual_seed(5)
    trained = scaled(make())
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    env = {"PYTHONPATH": str(tmp_path / "src")}
    result = edgernn_cli("convert", "mypkg.models:make", "--weights", tmp_path / "weights.pt",
                         "-o", tmp_path / "f.ern", env=env)
    assert result.returncode == 0, result.stderr
    model = edgernn.load(tmp_path / "f.ern")
    xs = sequence(100, 3)
    assert np.max(np.abs(model.run(xs, model.new_state()) - torch_outputs(trained, xs, True))) <= TOL
    result = edgernn_cli("verify", tmp_path / "f.ern", "--reference", "mypkg.models:make", "--weights",
                         tmp_path / "weights.pt", "--sequences", "2", "--steps", "50", env=env)
    assert result.returncode == 0 and "PASS" in result.stdout, result.stdout + result.stderr
    untrained = edgernn_cli("verify", tmp_path / "f.ern", "--reference", "mypkg.models:make", "--sequences", "1",
                            env=env)
    assert untrained.returncode == 1 and "FAIL" in untrained.stdout
    missing = edgernn_cli("convert", "mypkg.models:make", "-o", tmp_path / "g.ern")  # not on PYTHONPATH here
    assert missing.returncode == 1 and "cannot import mypkg.models" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@needs_torch
def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    module = gru_net()
    torch.save(module, tmp_path / "whole.pt")
    status, _, err = run_cli(capsys, "convert", tmp_path / "whole.pt", "-o", tmp_path / "m.ern")
    assert_one_line_error(status, err, tmp_path / "whole.pt", "--trust-pickle", "only if you trust")
    assert not (tmp_path / "m.ern").exists()
    status, out, err = run_cli(capsys, "convert", tmp_path / "whole.pt", "-o", tmp_path / "m.ern", "--trust-pickle")
    assert status == 0, err
    model = edgernn.load(tmp_path / "m.ern")
    xs = sequence(200, 4)
    assert np.max(np.abs(model.run(xs, model.new_state()) - torch_outputs(module, xs, False))) <= TOL


@pytest.mark.parametrize("how", ["--to", "suffix"])
def test_convert_to_an_onnx_step_model_and_verify_it(tmp_path, capsys, how):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = random_model("lstm", hidden=16, head=(3,), proj_size=6)
    edgernn.save(model, tmp_path / "m.ern")
    output = tmp_path / ("m.step" if how == "--to" else "m.onnx")
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", output,
                               *(["--to", "onnx"] if how == "--to" else []))
    assert status == 0, err
    assert out.startswith(f"wrote {output}: ONNX step model of 8 -> lstm(16, proj 6) -> dense(3)")
    if how == "--to":
        output = output.rename(tmp_path / "m_step.onnx")  # the reference is told apart by its suffix
    status, out, err = run_cli(capsys, "verify", tmp_path / "m.ern", "--reference", output, "--steps", "50",
                               "--sequences", "2")
    assert status == 0 and "an edgernn step model" in out and "PASS" in out, out + err


@needs_torch
def test_convert_onnx_in(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    module = gru_net(batch_first=True)
    torch.onnx.export(module, (torch.zeros(1, 7, 4),), tmp_path / "g.onnx", input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "time"}}, dynamo=False)
    status, out, err = run_cli(capsys, "convert", tmp_path / "g.onnx", "-o", tmp_path / "g.ern", "--dtype", "float16")
    assert status == 0, err
    assert "float16" in out
    model = edgernn.load(tmp_path / "g.ern")
    xs = sequence(200, 4)
    assert np.max(np.abs(model.run(xs, model.new_state()) - torch_outputs(module, xs, True))) <= 5e-3
    status, out, err = run_cli(capsys, "verify", tmp_path / "g.ern", "--reference", tmp_path / "g.onnx",
                               "--tolerance", "5e-3")
    assert status == 0 and "input (1, T, I)" in out and "PASS" in out, out + err


@pytest.mark.parametrize(
    "args",
    [["--dtype", "int8", "--to", "onnx"], ["--nonlinearity", "relu"], ["--weights", "w.pt"]],
    ids=["dtype-onnx", "torch-flag-on-onnx", "weights-on-onnx"],
)
def test_usage_errors_exit_2(tmp_path, capsys, args):
    status, _, err = run_cli(capsys, "convert", tmp_path / "x.onnx", "-o", tmp_path / "y.ern", *args)
    assert status == 2 and "edgernn convert: error:" in err


@needs_torch
@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not a PyTorch checkpoint"), (b"PK\x03\x04 truncated zip", "not a PyTorch checkpoint"),
     (None, "no such file")],
    ids=["empty", "truncated", "missing"],
)
def test_convert_a_bad_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    status, _, err = run_cli(capsys, "convert", path, "-o", tmp_path / "out.ern")
    assert_one_line_error(status, err, path, message)


def test_convert_garbage_onnx_is_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip("onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage that is not protobuf\xff\xff")
    status, _, err = run_cli(capsys, "convert", tmp_path / "bad.onnx", "-o", tmp_path / "out.ern")
    assert_one_line_error(status, err, "bad.onnx")


# ---- inspect ------------------------------------------------------------------------------------------


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
    assert "streamable:  yes" in result.stdout


@needs_torch
def test_inspect_variants_text_and_json(tmp_path, capsys):
    torch.manual_seed(0)
    status, _, err = run_cli(capsys, "convert", _save_state_dict(tmp_path, bilstm()), "-o", tmp_path / "b.ern",
                             "--head-activations", "tanh")
    assert status == 0, err
    status, out, err = run_cli(capsys, "inspect", tmp_path / "b.ern")
    assert status == 0, err
    assert "[0] lstm 3->16 bidirectional, proj 5 (out 10) [sigmoid,tanh,tanh]" in out
    assert "[1] lstm 10->16 bidirectional" in out and "dense 10->3 tanh" in out
    assert "streamable:  no: layer 0 is bidirectional" in out
    status, out, err = run_cli(capsys, "inspect", tmp_path / "b.ern", "--json")
    assert status == 0, err
    info = json.loads(out)
    spec = edgernn.load(tmp_path / "b.ern").spec
    assert info["layers"][0]["direction"] == "bidirectional" and info["layers"][0]["proj_size"] == 5
    assert info["layers"][0]["activations"] == [["sigmoid", "tanh", "tanh"]] * 2
    assert info["head"] == [{"in_features": 10, "out_features": 3, "bias": True, "activation": "tanh"}]
    assert (info["parameters"], info["flops_per_step"]) == (spec.parameter_count(), spec.flops_per_step())
    assert (info["input_size"], info["output_size"], info["state_size"]) == (3, 3, spec.state_size)
    assert info["streamable"] is False and info["dtype"] == "float32" and info["checksum"].startswith("sha256:")


@pytest.mark.parametrize("command", ["inspect", "stream"])
def test_a_bad_file_is_one_clear_line_and_exit_1(tmp_path, command):
    path = tmp_path / "not-a-model.ern"
    path.write_text("hello")
    result = edgernn_cli(command, path, stdin="")
    assert result.returncode == 1
    assert "not-a-model.ern" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_truncated_model_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "model.ern"
    edgernn.save(random_model("lstm", hidden=8), path)
    path.write_bytes(path.read_bytes()[:-100])
    status, _, err = run_cli(capsys, "inspect", path)
    assert_one_line_error(status, err, path, "truncated")


def test_debug_shows_the_traceback(tmp_path):
    result = edgernn_cli("--debug", "inspect", tmp_path / "missing.ern")
    assert result.returncode == 1 and "Traceback" in result.stderr and "FormatError" in result.stderr


# ---- verify -------------------------------------------------------------------------------------------


def _save_state_dict(tmp_path, module, name="sd.pt"):
    torch.save(module.state_dict(), tmp_path / name)
    return tmp_path / name


@needs_torch
def test_verify_against_pytorch_passes_and_streams(tmp_path, capsys):
    module = gru_net()
    torch.jit.save(torch.jit.script(module), tmp_path / "g.pt")
    assert run_cli(capsys, "convert", tmp_path / "g.pt", "-o", tmp_path / "g.ern")[0] == 0
    status, out, err = run_cli(capsys, "verify", tmp_path / "g.ern", "--reference", tmp_path / "g.pt",
                               "--sequences", "3", "--steps", "150", "--seed", "7")
    assert status == 0, out + err
    assert "g.pt (TorchScript), run by PyTorch" in out and "3 (450 steps" in out and "seed 7" in out
    assert "y[0]" in out and "y[1]" in out and "overall" in out
    assert "streaming:  Model.step one sample at a time: max abs err" in out
    assert out.strip().endswith("PASS: every output within tolerance 1e-05")


@needs_torch
def test_verify_a_bidirectional_model_skips_streaming_with_a_note(tmp_path, capsys):
    sd = _save_state_dict(tmp_path, bilstm())
    assert run_cli(capsys, "convert", sd, "-o", tmp_path / "b.ern", "--head-activations", "tanh")[0] == 0
    status, out, err = run_cli(capsys, "verify", tmp_path / "b.ern", "--reference", sd, "--head-activations", "tanh",
                               "--sequences", "2", "--steps", "100")
    assert status == 0, out + err
    assert "a state dict, run as PyTorch modules rebuilt" in out
    assert "streaming:  skipped: layer 0 is bidirectional" in out


@needs_torch
def test_verify_against_a_perturbed_reference_fails(tmp_path, capsys):
    module = gru_net()
    sd = _save_state_dict(tmp_path, module)
    assert run_cli(capsys, "convert", sd, "-o", tmp_path / "g.ern", "--head-activations", "sigmoid")[0] == 0
    with torch.no_grad():
        module.fc.weight[1, 0] += 0.05  # only output 1 changes
    torch.jit.save(torch.jit.script(module), tmp_path / "perturbed.pt")
    status, out, err = run_cli(capsys, "verify", tmp_path / "g.ern", "--reference", tmp_path / "perturbed.pt",
                               "--sequences", "2", "--steps", "100")
    assert status == 1, out + err
    assert "FAIL: 1 of 2 outputs exceed tolerance 1e-05: y[1]" in out


@needs_torch
def test_verify_an_int8_file_needs_a_looser_tolerance(tmp_path, capsys):
    sd = _save_state_dict(tmp_path, gru_net())
    assert run_cli(capsys, "convert", sd, "-o", tmp_path / "q.ern", "--dtype", "int8",
                   "--head-activations", "sigmoid")[0] == 0
    args = ["verify", tmp_path / "q.ern", "--reference", sd, "--head-activations", "sigmoid", "--sequences", "2"]
    assert run_cli(capsys, *args)[0] == 1
    assert run_cli(capsys, *args, "--tolerance", "0.05")[0] == 0


@needs_torch
def test_verify_with_user_inputs_npy_and_csv(tmp_path, capsys):
    module = gru_net(batch_first=True)
    torch.jit.save(torch.jit.trace(module, torch.zeros(1, 5, 4)), tmp_path / "t.pt")
    assert run_cli(capsys, "convert", tmp_path / "t.pt", "-o", tmp_path / "t.ern")[0] == 0
    np.save(tmp_path / "seqs.npy", np.random.default_rng(2).standard_normal((2, 60, 4)).astype(np.float32))
    rows = np.random.default_rng(3).standard_normal((40, 4))
    (tmp_path / "log.csv").write_text("a,b,c,d\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows))
    status, out, err = run_cli(capsys, "verify", tmp_path / "t.ern", "--reference", tmp_path / "t.pt",
                               "--sequences", "0", "--input", tmp_path / "seqs.npy", "--input", tmp_path / "log.csv")
    assert status == 0, out + err
    assert "3 (160 steps: seqs.npy[0] x60, seqs.npy[1] x60, log.csv x40" in out


@needs_torch
def test_verify_a_bad_input_file_is_one_line(tmp_path, capsys):
    edgernn.save(random_model("gru", hidden=8), tmp_path / "m.ern")
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3), np.float32))
    torch.save(nn.GRU(8, 8).state_dict(), tmp_path / "ref.pt")
    status, _, err = run_cli(capsys, "verify", tmp_path / "m.ern", "--reference", tmp_path / "ref.pt",
                             "--input", tmp_path / "wrong.npy")
    assert_one_line_error(status, err, "wrong.npy", "(10, 3)")


@needs_torch
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed-length"])
def test_verify_against_onnx_finds_the_input_layout(tmp_path, capsys, batch_first, dynamic):
    pytest.importorskip("onnxruntime")
    module = gru_net(batch_first)
    sd = _save_state_dict(tmp_path, module)
    assert run_cli(capsys, "convert", sd, "-o", tmp_path / "g.ern", "--head-activations", "sigmoid")[0] == 0
    example = torch.zeros((1, 9, 4) if batch_first else (9, 1, 4))
    axes = {"x": {0: "d0", 1: "d1"}} if dynamic else None  # names that say nothing: the graph tells
    torch.onnx.export(module, (example,), tmp_path / "g.onnx", input_names=["x"], dynamic_axes=axes, dynamo=False)
    status, out, err = run_cli(capsys, "verify", tmp_path / "g.ern", "--reference", tmp_path / "g.onnx",
                               "--sequences", "2", "--steps", "50")
    assert status == 0, out + err
    assert f"input {'(1, T, I)' if batch_first else '(T, 1, I)'}" in out
    if not dynamic:
        assert "the reference takes exactly 9 steps" in out


def test_verify_garbage_reference_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    edgernn.save(random_model("gru", hidden=8), tmp_path / "m.ern")
    (tmp_path / "ref.onnx").write_bytes(b"\x00\x01 not an onnx model")
    status, _, err = run_cli(capsys, "verify", tmp_path / "m.ern", "--reference", tmp_path / "ref.onnx")
    assert_one_line_error(status, err, "ref.onnx")


def test_verify_needs_a_reference(tmp_path, capsys):
    status, _, err = run_cli(capsys, "verify", tmp_path / "m.ern")
    assert status == 2 and "--reference" in err


# ---- stream / compile / help --------------------------------------------------------------------------


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


def test_compile_fills_the_cache_and_says_so():
    result = edgernn_cli("compile")
    assert result.returncode == 0, result.stderr
    assert "kernels compiled and cached" in result.stdout


def test_no_command_prints_help():
    result = edgernn_cli()
    assert result.returncode == 2 and "convert" in result.stdout and "verify" in result.stdout


@needs_torch
def test_stages_go_to_a_terminal_stderr_only(tmp_path, capsys, monkeypatch):
    sd = _save_state_dict(tmp_path, gru_net())
    status, out, err = run_cli(capsys, "convert", sd, "-o", tmp_path / "a.ern")
    assert status == 0 and err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    status, out, err = run_cli(capsys, "convert", sd, "-o", tmp_path / "b.ern")
    assert status == 0 and f"edgernn: loading {sd}" in err and f"edgernn: writing {tmp_path / 'b.ern'}" in err
    assert len(out.splitlines()) == 1  # the summary line stays alone on stdout
