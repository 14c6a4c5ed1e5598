"""Trained initial states (PyTorch h0/c0, ONNX initial_h/initial_c) become the model's rest state."""

import contextlib
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgernn.cli import main  # noqa: E402
from edgernn.converters import from_torch  # noqa: E402
from edgernn.errors import ConversionError  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5  # float32 parity with PyTorch
STEPS = 200


class StartsFromH0(nn.Module):
    """A recurrent layer started from a learned h0 (and c0), then a Linear head: the convention edgernn reads."""

    def __init__(self, kind, input_size=3, hidden=8, layers=2, batch_first=False, as_buffers=False, squeeze=False,
                 **options):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = kind(input_size, hidden, num_layers=layers, batch_first=batch_first, **options)
        D = 2 if options.get("bidirectional") else 1
        width = options.get("proj_size") or hidden
        shape_h, shape_c = (layers * D, 1, width), (layers * D, 1, hidden)
        h0, c0 = torch.randn(shape_h) * 0.8, torch.randn(shape_c) * 0.8
        if squeeze:
            h0, c0 = h0[:, 0], c0[:, 0]
        register = self.register_buffer if as_buffers else (lambda n, t: self.register_parameter(n, nn.Parameter(t)))
        register("h0", h0)
        if kind is nn.LSTM:
            register("c0", c0)
        self.head = nn.Linear(width * D, 2)
        self.batch_first = batch_first

    def forward(self, x):
        batch = x.shape[0 if self.batch_first else 1]
        h0 = (self.h0 if self.h0.dim() == 3 else self.h0[:, None]).expand(-1, batch, -1).contiguous()
        if isinstance(self.rnn, nn.LSTM):
            c0 = (self.c0 if self.c0.dim() == 3 else self.c0[:, None]).expand(-1, batch, -1).contiguous()
            return self.head(self.rnn(x, (h0, c0))[0])
        return self.head(self.rnn(x, h0)[0])


def sequence(size, steps=STEPS, seed=1):
    return np.random.default_rng(seed).standard_normal((steps, size), dtype=np.float32)


def torch_run(module, xs, batch_first=False):
    x = torch.from_numpy(xs)
    x = x.unsqueeze(0) if batch_first else x.unsqueeze(1)
    with torch.no_grad():
        out = module.eval()(x)
    return (out[0] if batch_first else out[:, 0]).numpy()


def assert_parity(model, module, xs, batch_first=False):
    expected = torch_run(module, xs, batch_first)
    assert np.max(np.abs(model.run(xs, model.new_state()) - expected)) <= TOL
    if model.streamable:
        state = model.new_state()
        stepped = np.stack([model.step(x, state) for x in xs])
        assert np.max(np.abs(stepped - expected)) <= TOL


@pytest.mark.parametrize("kind, options", [
    (nn.LSTM, dict(batch_first=True)),
    (nn.GRU, dict(as_buffers=True, squeeze=True)),
    (nn.RNN, dict(layers=1)),
    (nn.LSTM, dict(bidirectional=True, proj_size=5)),
], ids=["lstm-2-layers", "gru-buffers-2d", "rnn", "bilstm-proj"])
def test_h0_c0_of_a_module_give_pytorchs_outputs(kind, options):
    module = StartsFromH0(kind, **options).eval()
    model = from_torch(module)  # verified against the module, from the rest state
    assert model.spec.rest_state == "trained"
    assert model.spec.rest_state_note == ("h0/c0 of the module" if kind is nn.LSTM else "h0 of the module")
    assert np.any(model.new_state() != 0)
    assert_parity(model, module, sequence(3), options.get("batch_first", False))


def test_the_state_row_is_laid_out_layer_by_layer_h_then_c():
    module = StartsFromH0(nn.LSTM, hidden=4)
    h0, c0 = module.h0.detach().numpy()[:, 0], module.c0.detach().numpy()[:, 0]
    expected = np.concatenate([h0[0], c0[0], h0[1], c0[1]])
    assert np.array_equal(from_torch(module).new_state(), expected)


def test_h0_c0_in_a_state_dict(tmp_path):
    module = StartsFromH0(nn.LSTM)
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    assert list(module.state_dict())[:2] == ["h0", "c0"]  # before the recurrent weights
    model = from_torch(tmp_path / "sd.pt")
    assert (model.spec.rest_state, model.spec.rest_state_note) == ("trained", "h0/c0 of the state dict")
    assert np.array_equal(model.new_state(), from_torch(module).new_state())
    assert_parity(model, module, sequence(3))


def test_initial_state_argument_on_a_bare_module():
    torch.manual_seed(2)
    gru = nn.GRU(3, 6, num_layers=2).eval()
    h0 = torch.randn(2, 1, 6)
    model = from_torch(gru, initial_state=h0, verify=False)
    assert model.spec.rest_state_note == "initial_state argument"
    xs = sequence(3)
    with torch.no_grad():
        expected = gru(torch.from_numpy(xs).unsqueeze(1), h0)[0][:, 0].numpy()
    assert np.max(np.abs(model.run(xs, model.new_state()) - expected)) <= TOL
    lstm = nn.LSTM(3, 6).eval()
    h0, c0 = torch.randn(1, 6), torch.randn(1, 6)
    model = from_torch(lstm, initial_state=(h0, c0), verify=False)
    with torch.no_grad():
        expected = lstm(torch.from_numpy(xs).unsqueeze(1), (h0[:, None], c0[:, None]))[0][:, 0].numpy()
    assert np.max(np.abs(model.run(xs, model.new_state()) - expected)) <= TOL


class ScriptableGRU(nn.Module):
    """StartsFromH0 for a GRU, in what TorchScript compiles."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(3, 8, num_layers=2)
        self.register_buffer("h0", torch.randn(2, 1, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(x, self.h0.expand(-1, x.shape[1], -1).contiguous())[0])


class FixedBatchLSTM(nn.Module):
    """Starts from constant buffers of batch 1: exported, they are the LSTM node's initial_h / initial_c."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(3, 8)
        self.register_buffer("h0", torch.randn(1, 1, 8))
        self.register_buffer("c0", torch.randn(1, 1, 8))

    def forward(self, x):
        return self.rnn(x, (self.h0, self.c0))[0]


def test_scripted_module_with_h0_buffers():
    module = ScriptableGRU().eval()
    scripted = torch.jit.script(module)
    model = from_torch(scripted)
    assert np.array_equal(model.new_state(), from_torch(module).new_state())
    assert_parity(model, module, sequence(3))


def test_bad_initial_states_are_refused_by_name():
    gru = nn.GRU(3, 6, num_layers=2)
    with pytest.raises(ConversionError, match=r"h0 has shape \(1, 6\); expected \(2, 6\) or \(2, 1, 6\)"):
        from_torch(gru, initial_state=torch.zeros(1, 6), verify=False)
    with pytest.raises(ConversionError, match="c0 given, but only an LSTM has a cell state"):
        from_torch(gru, initial_state=(torch.zeros(2, 6), torch.zeros(2, 6)), verify=False)


class IgnoresItsH0(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 6)
        self.h0 = nn.Parameter(torch.ones(1, 1, 6))

    def forward(self, x):
        return self.rnn(x)[0]


def test_verification_catches_a_forward_that_does_not_start_from_h0():
    with pytest.raises(ConversionError, match="starts from the trained initial state, h0 of the module"):
        from_torch(IgnoresItsH0())


def run_cli(capsys, *args):
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def test_convert_and_verify_a_state_dict_with_h0(tmp_path, capsys):
    module = StartsFromH0(nn.LSTM)
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    status, out, err = run_cli(capsys, "convert", tmp_path / "sd.pt", "-o", tmp_path / "m.ern")
    assert status == 0, err
    assert out.splitlines()[1:] == ["rest state: trained (h0/c0 of the state dict)"]
    status, out, err = run_cli(capsys, "inspect", tmp_path / "m.ern")
    assert "rest state:  trained (h0/c0 of the state dict)" in out
    # the reference rebuilt from the state dict starts from its h0/c0 too
    status, out, err = run_cli(capsys, "verify", tmp_path / "m.ern", "--reference", tmp_path / "sd.pt",
                               "--sequences", "2", "--steps", "50")
    assert status == 0 and "PASS" in out, out + err


def test_onnx_constant_initial_state_becomes_the_rest_state(tmp_path):
    pytest.importorskip("onnx")
    from edgernn.converters import from_onnx

    module = FixedBatchLSTM().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(20, 1, 3),), str(tmp_path / "m.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "T"}})
    model = from_onnx(tmp_path / "m.onnx", sample_rate=25)
    assert (model.spec.rest_state, model.spec.sample_rate) == ("trained", 25.0)
    assert np.array_equal(model.new_state(), from_torch(module).new_state())
    assert_parity(model, module, sequence(3))
