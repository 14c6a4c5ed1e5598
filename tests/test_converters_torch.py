"""edgernn.converters.torch: parity with real PyTorch modules, checkpoints, and the refusals."""

import importlib
import math
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgernn.converters import from_torch  # noqa: E402
from edgernn.errors import ConversionError, StreamingError  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 500
TOL = 1e-5  # float32

# (cell, rnn nonlinearity, input, hidden, layers, bias, batch_first)
CASES = [
    ("rnn", "tanh", 3, 8, 1, True, False),
    ("rnn", "tanh", 5, 64, 2, False, True),
    ("rnn", "tanh", 4, 128, 1, True, True),
    ("rnn", "relu", 4, 16, 1, True, True),
    ("rnn", "relu", 6, 32, 3, True, False),
    ("gru", None, 3, 8, 1, True, False),
    ("gru", None, 7, 32, 2, False, True),
    ("gru", None, 4, 128, 3, True, False),
    ("lstm", None, 3, 8, 1, True, True),
    ("lstm", None, 5, 64, 2, True, False),
    ("lstm", None, 2, 128, 3, False, True),
    ("lstm", None, 6, 16, 1, False, False),
]


def make_recurrent(cell, nonlinearity, input_size, hidden, layers, bias, batch_first, seed=0, **options):
    """A PyTorch recurrent module whose inputs drive the units well into their nonlinear range.

    Default init gives pre-activations of ~0.1 for wide layers (nearly linear); input weights of
    std 1.5/sqrt(fan_in) give ~1 while the default recurrent weights keep the dynamics contractive,
    so float32 rounding does not grow over a long sequence.
    """
    torch.manual_seed(seed)
    kind = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
    extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    module = kind(input_size, hidden, num_layers=layers, bias=bias, batch_first=batch_first, **extra, **options)
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if name.startswith(("weight_ih", "weight_hr")):  # a projection's default init shrinks h too
                weight.normal_(0.0, 1.5 / math.sqrt(weight.shape[1]))
    return module.eval()


def linear(inputs, outputs, bias=True):
    """An nn.Linear with weights of std 2/sqrt(fan_in), so that a softmax head is far from uniform."""
    layer = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 2.0 / math.sqrt(inputs))
    return layer


def sequence(steps, size, seed=1):
    return np.random.default_rng(seed).standard_normal((steps, size), dtype=np.float32)


def torch_outputs(module, xs, batch_first):
    """The module's outputs over the whole sequence at once, as (T, O)."""
    x = torch.from_numpy(xs)
    x = x.unsqueeze(0) if batch_first else x.unsqueeze(1)
    with torch.no_grad():
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out = out[0] if batch_first else out[:, 0]
    return out.numpy()


def stepped(model, xs):
    """The model advanced one sample at a time, as a streaming caller does."""
    state = model.new_state()
    return np.stack([model.step(x, state) for x in xs])


def assert_parity(model, ref, xs):
    assert np.std(ref) > 0.05, "reference output is nearly constant: the test would prove little"
    ran = model.run(xs, model.new_state())
    assert ran.dtype == np.float32 and ran.shape == ref.shape
    assert np.max(np.abs(ran - ref)) <= TOL
    assert np.max(np.abs(stepped(model, xs) - ref)) <= TOL


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-{}-I{}-H{}-L{}-bias{}-bf{}".format(*c))
def test_recurrent_module_matches_pytorch(case):
    module = make_recurrent(*case)
    model = from_torch(module)
    layer = model.spec.layers[0]
    assert (layer.cell, len(model.spec.layers), layer.bias) == (case[0], case[4], case[5])
    xs = sequence(STEPS, case[2])
    assert_parity(model, torch_outputs(module, xs, case[6]), xs)


# ---- wrapper modules ----------------------------------------------------------------------------


class Classifier(nn.Module):
    """A GRU with a Linear+ReLU+Linear+Softmax head applied at every step (module level: picklable)."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.rnn = make_recurrent("gru", None, 4, 24, 2, True, batch_first)
        self.head = nn.Sequential(linear(24, 16), nn.ReLU(), nn.Dropout(0.2), linear(16, 5), nn.Softmax(dim=-1))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def test_wrapper_with_dense_head_matches_pytorch():
    module = Classifier().eval()
    model = from_torch(module)
    assert [d.activation.name for d in model.spec.head] == ["relu", "softmax"]
    xs = sequence(STEPS, 4)
    ref = torch_outputs(module, xs, True)
    assert_parity(model, ref, xs)
    assert np.allclose(model.run(xs, model.new_state()).sum(axis=1), 1.0, atol=1e-5)


class LastStep(nn.Module):
    """Reads only the last step: verification compares the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = make_recurrent("lstm", None, 3, 16, 1, True, False)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[-1])


def test_wrapper_reading_the_last_step_converts_per_step():
    module = LastStep().eval()
    model = from_torch(module)
    xs = sequence(100, 3)
    with torch.no_grad():
        last = module(torch.from_numpy(xs).unsqueeze(1))[0].numpy()
    assert np.max(np.abs(model.run(xs, model.new_state())[-1] - last)) <= TOL


class _Wrapped(nn.Module):
    """A recurrent layer then modules applied in registration order: what the converter assumes."""

    def __init__(self, rnn, *rest, forward=None):
        super().__init__()
        self.rnn = rnn
        self.rest = nn.Sequential(*rest)
        self._forward = forward

    def forward(self, x):
        out, _ = self.rnn(x)
        return self._forward(self, x, out) if self._forward else self.rest(out)


def test_activation_straight_after_the_recurrent_layer():
    wrapper = _Wrapped(make_recurrent("rnn", "relu", 3, 12, 1, True, True), nn.Sigmoid(), nn.Linear(12, 3))
    model = from_torch(wrapper)
    assert [d.activation.name for d in model.spec.head] == ["sigmoid", "identity"]
    xs = sequence(STEPS, 3)
    assert_parity(model, torch_outputs(wrapper, xs, True), xs)


def test_training_mode_is_restored_and_dropout_is_fine():
    module = _Wrapped(make_recurrent("lstm", None, 3, 8, 2, True, True), nn.Dropout(0.5), nn.Linear(8, 2))
    module.rnn.dropout = 0.5
    module.train()
    model = from_torch(module)
    assert module.training and module.rnn.training
    xs = sequence(64, 3)
    assert_parity(model, torch_outputs(module.eval(), xs, True), xs)


def _residual(self, x, out):
    return self.rest(out + x)


def _doubled(self, x, out):
    return 2 * self.rest(out)


def _reordered(self, x, out):
    return self.rest[1](torch.relu(self.rest[0](out)) - 1.0)  # Linear, ReLU, Linear run in another way


@pytest.mark.parametrize("forward", [_residual, _doubled, _reordered], ids=lambda f: f.__name__.strip("_"))
def test_forward_the_converter_cannot_see_is_refused(forward):
    module = _Wrapped(make_recurrent("gru", None, 6, 6, 1, True, True), nn.Linear(6, 4), nn.Linear(4, 2),
                      forward=forward)
    with pytest.raises(ConversionError, match="does not match the converted model.*export to ONNX instead"):
        from_torch(module)
    assert from_torch(module, verify=False).output_size == 2  # what verify=False would have let through


class NeedsLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(2, 4)

    def forward(self, x, lengths):
        return self.rnn(x)[0]


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(2, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.rnn(x)[0] * self.scale


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (lambda: _Wrapped(nn.GRU(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)), "LayerNorm.*export to ONNX instead"),
        (lambda: _Wrapped(nn.GRU(3, 8), nn.Linear(8, 2), nn.ReLU(), nn.Tanh()), "Tanh follows.*relu"),
        (lambda: _Wrapped(nn.GRU(3, 8), nn.Linear(8, 2), nn.Softmax(dim=0)), r"Softmax\(dim=0\)"),
        (lambda: _Wrapped(nn.GRU(3, 8), nn.GRU(8, 8)), "2 recurrent layers"),
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 8)), "Linear comes before the recurrent layer"),
        (lambda: NeedsLengths(), r"running NeedsLengths on a \(64, 1, 2\) input failed.*lengths"),
        (lambda: OwnParameter(), "parameters of its own \\(scale\\)"),
    ],
    ids=["unknown-child", "two-activations", "softmax-dim", "two-recurrent",
         "linear-first", "forward-fails", "own-parameter"],
)
def test_modules_edgernn_cannot_model_are_refused(module, message):
    with pytest.raises(ConversionError, match=message):
        from_torch(module())


def test_flags_are_for_state_dicts_only():
    with pytest.raises(ConversionError, match="states its own"):
        from_torch(nn.RNN(2, 3), nonlinearity="relu")


def test_source_of_the_wrong_type_is_refused():
    with pytest.raises(ConversionError, match="nn.Module, a checkpoint path or .package.module:factory., got int"):
        from_torch(42)


# ---- checkpoints ----------------------------------------------------------------------------------


def _relu_classifier():
    return _Wrapped(make_recurrent("rnn", "relu", 4, 20, 2, True, False), nn.Linear(20, 10), nn.Tanh(),
                    nn.Linear(10, 3)).eval()


@pytest.mark.parametrize("nesting", [None, "state_dict", "model_state_dict", "model"])
def test_state_dict_file_round_trip_with_flags(tmp_path, nesting):
    module = _relu_classifier()
    state = module.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if nesting is None else {"epoch": 7, nesting: state}, path)
    model = from_torch(path, nonlinearity="relu", head_activations=["tanh", "identity"])
    assert [a.name for a in model.spec.layers[0].activations] == ["relu"] and len(model.spec.layers) == 2
    xs = sequence(STEPS, 4)
    assert_parity(model, torch_outputs(module, xs, False), xs)


def test_state_dict_flags_are_what_the_model_computes(tmp_path):
    """Without the flags the model loads but computes something else: why a state dict cannot be trusted."""
    module = _relu_classifier()
    torch.save(module.state_dict(), tmp_path / "ckpt.pt")
    model = from_torch(str(tmp_path / "ckpt.pt"))
    xs = sequence(64, 4)
    assert np.max(np.abs(model.run(xs, model.new_state()) - torch_outputs(module, xs, False))) > 1e-3


@pytest.mark.parametrize(
    ("state", "options", "message"),
    [
        (lambda: _relu_classifier().state_dict(), {"head_activations": ["tanh"]}, "has 1 names.*2 dense layers"),
        (lambda: _relu_classifier().state_dict(), {"head_activations": ["gelu", "tanh"]}, "'gelu' is not one of"),
        (lambda: nn.LSTM(3, 4).state_dict(), {"nonlinearity": "relu"}, "rnn cells only"),
        (lambda: nn.RNN(3, 4).state_dict(), {"nonlinearity": "sigmoid"}, "nonlinearity must be one of"),
        (lambda: nn.Linear(3, 4).state_dict(), {}, "no recurrent weights"),
        (lambda: {**nn.Linear(3, 4).state_dict(), **nn.GRU(3, 4).state_dict()}, {}, "comes before the recurrent"),
        (lambda: {**nn.GRU(3, 4).state_dict(), "fc.weight": torch.zeros(2, 5)}, {}, "takes 5 inputs.*gives 4"),
        (lambda: {**nn.GRU(3, 4).state_dict(), "ln.weight": torch.ones(4)}, {}, "'ln.weight'.*not a Linear"),
    ],
    ids=["activations-count", "activation-name", "nonlinearity-lstm", "nonlinearity-name",
         "no-recurrent", "linear-first", "shapes-chain", "layernorm"],
)
def test_state_dicts_edgernn_cannot_read_are_refused(tmp_path, state, options, message):
    path = tmp_path / "ckpt.pt"
    torch.save(state(), path)
    with pytest.raises(ConversionError, match=message):
        from_torch(path, **options)


def test_pickled_module_needs_trust_pickle(tmp_path):
    module = Classifier(batch_first=False).eval()
    path = tmp_path / "full.pt"
    torch.save(module, path)
    with pytest.raises(ConversionError, match=f"{path}.*pickled.*trust_pickle=True.*only if you trust"):
        from_torch(path)
    model = from_torch(path, trust_pickle=True)
    xs = sequence(STEPS, 4)
    assert_parity(model, torch_outputs(module, xs, False), xs)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint\x00\x01\x02", b'{"weights": [1, 2, 3]}', pickle.dumps({"a": [1, 2]}, protocol=2)],
    ids=["empty", "bytes", "json", "plain-pickle"],
)
def test_garbage_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="garbage.pt: not a PyTorch checkpoint torch can read") as info:
        from_torch(path)
    assert "trust_pickle" not in str(info.value)


def test_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConversionError, match="nothere.pt: no such file"):
        from_torch(tmp_path / "nothere.pt")


# ---- projections and both directions ------------------------------------------------------------------

# (cell, nonlinearity, input, hidden, layers, bias, batch_first, extra module options)
VARIANTS = [
    ("lstm", None, 3, 16, 1, True, False, {"proj_size": 8}),
    ("lstm", None, 5, 32, 2, False, True, {"proj_size": 4}),
    ("lstm", None, 3, 16, 2, True, True, {"bidirectional": True}),
    ("lstm", None, 4, 24, 2, True, False, {"bidirectional": True, "proj_size": 6}),
    ("gru", None, 3, 16, 2, True, True, {"bidirectional": True}),
    ("gru", None, 6, 8, 1, False, False, {"bidirectional": True}),
    ("rnn", "relu", 4, 16, 1, True, False, {"bidirectional": True}),
    ("rnn", "tanh", 3, 8, 3, False, True, {"bidirectional": True}),
]


def assert_sequence_parity(model, ref, xs):
    """Parity of a model that cannot stream: whole sequences only, and step refuses clearly."""
    assert np.std(ref) > 0.05, "reference output is nearly constant: the test would prove little"
    assert not model.spec.streamable
    ran = model.run(xs, model.new_state())
    assert ran.dtype == np.float32 and ran.shape == ref.shape
    assert np.max(np.abs(ran - ref)) <= TOL
    with pytest.raises(StreamingError):
        model.step(xs[0], model.new_state())


def check_variant(model, module, xs, batch_first, bidirectional):
    ref = torch_outputs(module, xs, batch_first)
    if bidirectional:
        assert_sequence_parity(model, ref, xs)
    else:
        assert_parity(model, ref, xs)


def _variant_id(case):
    return "{}-{}-I{}-H{}-L{}-bias{}-bf{}".format(*case[:7]) + "".join(f"-{k}{v}" for k, v in case[7].items())


@pytest.mark.parametrize("case", VARIANTS, ids=_variant_id)
def test_projection_and_bidirectional_modules_match_pytorch(case):
    module = make_recurrent(*case[:7], **case[7])
    model = from_torch(module)
    bidirectional, proj = case[7].get("bidirectional", False), case[7].get("proj_size", 0)
    for layer in model.spec.layers:
        assert layer.direction == ("bidirectional" if bidirectional else "forward") and layer.proj_size == proj
    assert model.output_size == (proj or case[3]) * (2 if bidirectional else 1)
    check_variant(model, module, sequence(STEPS, case[2]), case[6], bidirectional)


class BiClassifier(nn.Module):
    """A projected bidirectional LSTM with a softmax head: the head reads both directions at every step."""

    def __init__(self):
        super().__init__()
        self.rnn = make_recurrent("lstm", None, 4, 20, 2, True, True, bidirectional=True, proj_size=6)
        self.head = nn.Sequential(linear(12, 8), nn.Tanh(), linear(8, 3), nn.Softmax(dim=-1))

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_bidirectional_wrapper_with_a_head_matches_pytorch():
    module = BiClassifier().eval()
    model = from_torch(module)
    xs = sequence(STEPS, 4)
    assert_sequence_parity(model, torch_outputs(module, xs, True), xs)


@pytest.mark.parametrize("options", [{"proj_size": 5}, {"bidirectional": True},
                                     {"bidirectional": True, "proj_size": 3}], ids=["proj", "bidirectional", "both"])
def test_projection_and_bidirectional_state_dicts(tmp_path, options):
    module = _Wrapped(make_recurrent("lstm", None, 3, 12, 2, True, False, **options), nn.Linear(
        options.get("proj_size", 12) * (2 if options.get("bidirectional") else 1), 4), nn.Tanh()).eval()
    torch.save(module.state_dict(), tmp_path / "ckpt.pt")
    model = from_torch(tmp_path / "ckpt.pt", head_activations=["tanh"])
    check_variant(model, module, sequence(STEPS, 3), False, options.get("bidirectional", False))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (lambda: {k: v for k, v in nn.GRU(3, 4, bidirectional=True).state_dict().items() if k != "bias_hh_l0_reverse"},
         r"layer 0 \(reverse\).*misses"),
        (lambda: {**nn.LSTM(3, 4, proj_size=2).state_dict(), "weight_hr_l0": torch.zeros(2, 5)},
         "weight_hh has shape .*not .G.H, proj_size."),
        (lambda: {**nn.GRU(3, 4).state_dict(), "weight_hr_l0": torch.zeros(2, 4), "weight_hh_l0": torch.zeros(12, 2)},
         "only an LSTM projects"),
        (lambda: {**nn.GRU(3, 4, bidirectional=True).state_dict(), "weight_ih_l0_reverse": torch.zeros(12, 5)},
         "differ from the forward direction"),
    ],
    ids=["reverse-missing", "proj-shape", "proj-on-gru", "reverse-shape"],
)
def test_broken_projection_and_reverse_tensors_are_refused(tmp_path, state, message):
    torch.save(state(), tmp_path / "ckpt.pt")
    with pytest.raises(ConversionError, match=message):
        from_torch(tmp_path / "ckpt.pt")


# ---- TorchScript ------------------------------------------------------------------------------------


class _Scriptable(nn.Module):
    """A recurrent layer and then the rest in order, written so that TorchScript can script it."""

    def __init__(self, rnn, *rest):
        super().__init__()
        self.rnn = rnn
        self.rest = nn.Sequential(*rest)

    def forward(self, x):
        return self.rest(self.rnn(x)[0])


def _script(module, how, batch_first, input_size):
    if how == "script":
        return torch.jit.script(module)
    example = torch.zeros((1, 7, input_size) if batch_first else (7, 1, input_size))
    return torch.jit.trace(module, example)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_torchscript_files_convert_and_verify(tmp_path, how, batch_first):
    module = _Scriptable(make_recurrent("lstm", None, 3, 16, 2, True, batch_first, bidirectional=True, proj_size=4),
                         linear(8, 3), nn.Sigmoid()).eval()
    path = tmp_path / f"{how}.pt"
    torch.jit.save(_script(module, how, batch_first, 3), path)
    model = from_torch(path)  # no trust_pickle: TorchScript is not pickle
    assert [d.activation.name for d in model.spec.head] == ["sigmoid"]
    check_variant(model, module, sequence(STEPS, 3), batch_first, True)


def test_scripted_module_in_memory_and_a_classifier():
    module = Classifier(batch_first=True).eval()
    model = from_torch(torch.jit.script(module))
    xs = sequence(STEPS, 4)
    assert_parity(model, torch_outputs(module, xs, True), xs)


def test_traced_rnn_nonlinearity_is_found_by_verification(tmp_path):
    """A traced nn.RNN keeps no nonlinearity: tanh is tried, then relu, and the one that matches wins."""
    module = _Scriptable(make_recurrent("rnn", "relu", 3, 12, 2, True, False), linear(12, 2)).eval()
    torch.jit.save(_script(module, "trace", False, 3), tmp_path / "traced.pt")
    model = from_torch(tmp_path / "traced.pt")
    assert [a.name for a in model.spec.layers[0].activations] == ["relu"]
    xs = sequence(STEPS, 3)
    assert_parity(model, torch_outputs(module, xs, False), xs)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = make_recurrent("gru", None, 3, 8, 1, True, False)

    def forward(self, x, scale: float):
        return self.rnn(x)[0] * scale


def test_torchscript_forward_that_takes_more_is_converted_unverified(tmp_path, caplog):
    torch.jit.save(torch.jit.script(_TwoInputs().eval()), tmp_path / "two.pt")
    with caplog.at_level("WARNING"):
        model = from_torch(tmp_path / "two.pt")
    assert "WITHOUT verification" in caplog.text and model.output_size == 8


def test_torchscript_doing_something_else_is_refused(tmp_path):
    module = _Wrapped(make_recurrent("gru", None, 6, 6, 1, True, True), nn.Linear(6, 4), nn.Linear(4, 2),
                      forward=_residual)

    class Scriptable(nn.Module):  # TorchScript cannot script the stored Python callable: write it out
        def __init__(self):
            super().__init__()
            self.rnn, self.rest = module.rnn, module.rest

        def forward(self, x):
            return self.rest(self.rnn(x)[0] + x)

    torch.jit.save(torch.jit.script(Scriptable().eval()), tmp_path / "residual.pt")
    with pytest.raises(ConversionError, match="does not match the converted model"):
        from_torch(tmp_path / "residual.pt")


def test_torchscript_with_an_unknown_child_is_refused_by_its_name(tmp_path):
    module = _Scriptable(nn.GRU(3, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    torch.jit.save(_script(module, "trace", False, 3), tmp_path / "ln.pt")
    with pytest.raises(ConversionError, match="LayerNorm is not something edgernn models"):
        from_torch(tmp_path / "ln.pt")


# ---- package.module:factory ---------------------------------------------------------------------------

FACTORY_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.rnn = nn.LSTM(3, hidden, num_layers=2, proj_size=6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def make():
    return Net()


def not_a_module():
    return 42


def broken():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module on sys.path with factories, and the state dict of one trained (here: re-drawn) instance."""
    name = f"edgernn_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(3)
    trained = importlib.import_module(name).make().eval()
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.normal_(0.0, 0.4)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    return name, tmp_path / "weights.pt", trained


def test_factory_with_weights_matches_the_trained_module(factory_module):
    name, weights, trained = factory_module
    model = from_torch(f"{name}:make", weights=weights)
    assert model.spec.layers[0].proj_size == 6
    xs = sequence(STEPS, 3)
    assert_parity(model, torch_outputs(trained, xs, True), xs)


@pytest.mark.parametrize(
    ("source", "use_weights", "message"),
    [
        ("edgernn_no_such_module:make", True, "cannot import edgernn_no_such_module"),
        ("{name}:missing", True, "has no missing"),
        ("{name}:not_a_module", True, r"not_a_module\(\) returned int, not an nn.Module"),
        ("{name}:broken", True, r"calling broken\(\) failed \(RuntimeError: no GPU here\)"),
    ],
    ids=["no-module", "no-factory", "not-a-module", "factory-fails"],
)
def test_factory_problems_are_named(factory_module, source, use_weights, message):
    name, weights, _ = factory_module
    with pytest.raises(ConversionError, match=message):
        from_torch(source.format(name=name), weights=weights if use_weights else None)


def test_factory_weights_that_do_not_fit_are_refused(factory_module, tmp_path):
    name, _, _ = factory_module
    torch.save(nn.GRU(3, 4).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="other.pt: does not fit .*Missing key"):
        from_torch(f"{name}:make", weights=tmp_path / "other.pt")


def test_factory_weights_follow_the_pickle_rule(factory_module, tmp_path):
    name, _, trained = factory_module
    torch.save({"model": trained}, tmp_path / "pickled.pt")  # a whole module: pickled Python objects
    with pytest.raises(ConversionError, match="pickled.pt: holds pickled Python objects.*trust_pickle"):
        from_torch(f"{name}:make", weights=tmp_path / "pickled.pt")
    model = from_torch(f"{name}:make", weights=tmp_path / "pickled.pt", trust_pickle=True)
    xs = sequence(64, 3)
    assert_parity(model, torch_outputs(trained, xs, True), xs)


def test_weights_go_with_a_factory_only(tmp_path):
    torch.save(nn.GRU(3, 4).state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(ConversionError, match="goes with a 'package.module:factory' source"):
        from_torch(tmp_path / "ckpt.pt", weights=tmp_path / "ckpt.pt")
