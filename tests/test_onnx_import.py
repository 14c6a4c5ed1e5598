"""Whole-graph ONNX import (converters/onnx_import.py, onnx_graph.py): PyTorch models exported by both of
torch's exporters, read back with `from_onnx` / `import_graph`, and compared with PyTorch and onnxruntime.

The matrix is a hand-picked subset: every cell, layer count, batch_first, bidirectional, exporter/opset,
static/dynamic sequence length and bias setting appears at least twice (the full product is 192 exports;
a dynamo export alone takes seconds).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from torch import nn  # noqa: E402

from edgernn.converters import from_onnx  # noqa: E402
from edgernn.converters.onnx_import import import_graph  # noqa: E402
from edgernn.errors import ConversionError, FormatError, InputError  # noqa: E402

pytestmark = pytest.mark.torch

TOLERANCE = 1e-5
"""Max abs error of edgernn (float32 kernels) against PyTorch and against onnxruntime."""

INPUT, HIDDEN = 4, 8
EXPORT_SHAPE, OTHER_SHAPE = (6, 2), (9, 3)  # (T, B): the example the graph is traced with, and another
CELLS = {"rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
         "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}
EXPORTERS = {"ts14": (False, 14), "ts17": (False, 17), "ts20": (False, 20), "dyn18": (True, 18),
             "dyn20": (True, 20)}


class Net(nn.Module):
    """A recurrent stack and a head, returning (y, h_n) or (y, h_n, c_n) as torch's modules do."""

    def __init__(self, cell, layers=1, batch_first=False, bidirectional=False, bias=True, head="linear"):
        super().__init__()
        kind, options = CELLS[cell]
        self.rnn = kind(INPUT, HIDDEN, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional,
                        bias=bias, **options)
        width = HIDDEN * (2 if bidirectional else 1)
        self.kind, self.batch_first = head, batch_first
        self.head = {
            "none": nn.Identity(),
            "linear": nn.Linear(width, 3), "last": nn.Linear(width, 3), "hn": nn.Linear(HIDDEN, 3),
            "mlp": nn.Sequential(nn.Linear(width, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(dim=-1)),
            "acts": nn.Sequential(nn.Linear(width, 6), nn.LeakyReLU(0.2), nn.Linear(6, 3), nn.Hardsigmoid()),
            "tanh": nn.Sequential(nn.Tanh(), nn.Linear(width, 5), nn.Sigmoid()),
            "norm": nn.Linear(width, 3),
        }[head]
        if head == "norm":
            self.register_buffer("mean", torch.linspace(-1.0, 2.0, INPUT))
            self.register_buffer("std", torch.linspace(0.5, 3.0, INPUT))

    def forward(self, x):
        if self.kind == "norm":
            x = (x - self.mean) / self.std
        y, state = self.rnn(x)
        if self.kind == "last":
            y = y[:, -1] if self.batch_first else y[-1]
        elif self.kind == "hn":
            y = (state[0] if isinstance(state, tuple) else state)[-1]
        return (self.head(y), *state) if isinstance(state, tuple) else (self.head(y), state)


def export(net, exporter, dynamic, path, batch_first):
    dynamo, opset = EXPORTERS[exporter]
    T, B = EXPORT_SHAPE
    x = torch.randn((B, T, INPUT) if batch_first else (T, B, INPUT))
    t_axis, b_axis = (1, 0) if batch_first else (0, 1)
    options = {}
    if dynamic and dynamo:
        options["dynamic_shapes"] = ({t_axis: torch.export.Dim("T", min=2, max=512),
                                      b_axis: torch.export.Dim("B", min=1, max=64)},)
    elif dynamic:
        options["dynamic_axes"] = {"x": {t_axis: "T", b_axis: "B"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, opset_version=opset, input_names=["x"], **options)
    return path


def sequence(shape, batch_first, seed):
    T, B = shape
    return np.random.default_rng(seed).standard_normal((B, T, INPUT) if batch_first else (T, B, INPUT),
                                                       dtype=np.float32)


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def check(net, path, batch_first, dynamic, last=False):
    """from_onnx's Model.run against PyTorch; import_graph(...).run against onnxruntime and PyTorch."""
    model, imported = from_onnx(path), import_graph(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate([EXPORT_SHAPE, OTHER_SHAPE] if dynamic else [EXPORT_SHAPE]):
        x = sequence(shape, batch_first, seed)
        with torch.no_grad():
            expected = [t.numpy() for t in net(torch.from_numpy(x))]
        # The Model, one stream per batch element, against PyTorch's first output.
        xs = np.swapaxes(x, 0, 1) if batch_first else x
        for b in range(xs.shape[1]):
            ys = model.run(np.ascontiguousarray(xs[:, b]), model.new_state())
            want = expected[0][b] if last or batch_first else expected[0][:, b]
            assert max_err(ys[-1] if last else ys, want) <= TOLERANCE
        # The whole graph, every output, against onnxruntime and PyTorch.
        try:
            reference = session.run(None, {"x": x})
        except Exception:  # the exporter baked a size in; edgernn's run refuses it the same way
            with pytest.raises(InputError):
                imported.run({"x": x})
            continue
        got = imported.run({"x": x})
        assert len(got) == len(reference) == len(expected)
        for mine, theirs, torchs in zip(got, reference, expected):
            assert max_err(mine, theirs) <= TOLERANCE
            assert max_err(mine, torchs) <= TOLERANCE


MATRIX = [
    # cell, layers, batch_first, bidirectional, exporter, dynamic, bias
    ("rnn_tanh", 1, False, False, "ts14", False, True),
    ("rnn_tanh", 2, True, True, "dyn18", False, True),
    ("rnn_tanh", 2, False, True, "ts17", True, False),
    ("rnn_tanh", 1, True, False, "dyn20", True, True),
    ("rnn_relu", 1, True, True, "ts20", True, True),
    ("rnn_relu", 2, False, False, "dyn20", False, False),
    ("rnn_relu", 2, True, False, "ts14", False, True),
    ("rnn_relu", 1, False, True, "dyn18", True, True),
    ("gru", 1, False, True, "ts14", True, True),
    ("gru", 1, True, True, "dyn20", True, True),
    ("gru", 2, False, False, "ts17", False, False),
    ("gru", 1, True, False, "dyn18", False, True),
    ("lstm", 2, True, True, "ts14", True, True),
    ("lstm", 1, False, False, "dyn18", True, True),
    ("lstm", 1, True, True, "ts20", False, False),
    ("lstm", 2, False, False, "dyn20", False, True),
]


@pytest.mark.parametrize("cell, layers, batch_first, bidirectional, exporter, dynamic, bias", MATRIX,
                         ids=["-".join(map(str, case)) for case in MATRIX])
def test_recurrent_stacks(tmp_path, cell, layers, batch_first, bidirectional, exporter, dynamic, bias):
    torch.manual_seed(len(cell) + 10 * layers)
    net = Net(cell, layers, batch_first, bidirectional, bias).eval()
    path = export(net, exporter, dynamic, tmp_path / "model.onnx", batch_first)
    check(net, path, batch_first, dynamic)


HEADS = [
    # cell, exporter, head, batch_first, bidirectional, layers
    ("lstm", "ts17", "mlp", True, False, 1),
    ("gru", "dyn18", "mlp", False, True, 1),
    ("rnn_tanh", "ts14", "last", True, False, 2),
    ("lstm", "dyn20", "last", True, True, 1),
    ("gru", "ts17", "acts", False, False, 1),
    ("lstm", "ts20", "tanh", False, True, 1),
    ("lstm", "ts20", "norm", True, True, 1),
    ("gru", "ts14", "norm", False, False, 2),
    ("lstm", "ts17", "hn", True, False, 2),
    ("rnn_relu", "ts14", "none", False, True, 1),
]


@pytest.mark.parametrize("cell, exporter, head, batch_first, bidirectional, layers", HEADS,
                         ids=["-".join(map(str, case)) for case in HEADS])
def test_heads(tmp_path, caplog, cell, exporter, head, batch_first, bidirectional, layers):
    torch.manual_seed(7)
    net = Net(cell, layers, batch_first, bidirectional, head=head).eval()
    path = export(net, exporter, True, tmp_path / "model.onnx", batch_first)
    with caplog.at_level(logging.INFO, logger="edgernn.converters.onnx_import"):
        model = from_onnx(path)
    last = head in ("last", "hn")
    assert ("reads only the last time step" in caplog.text) == last
    assert model.spec.normalize == (head == "norm")
    check(net, path, batch_first, True, last=last)


def test_head_structure(tmp_path):
    """The MLP head becomes two dense layers with the right activations; HardSigmoid keeps its alpha."""
    torch.manual_seed(3)
    net = Net("gru", head="acts").eval()
    model = from_onnx(export(net, "ts17", False, tmp_path / "m.onnx", False))
    acts = [(d.activation.name, round(d.activation.alpha, 6)) for d in model.spec.head]
    assert acts == [("leaky_relu", 0.2), ("hard_sigmoid", round(1 / 6, 6))]


# ---- what is refused -------------------------------------------------------------------------------


class ConvFront(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(INPUT, INPUT, 3, padding=1)
        self.rnn = nn.LSTM(INPUT, HIDDEN, batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(self.conv(x.transpose(1, 2)).transpose(1, 2))
        return y


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(INPUT, HIDDEN, batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(x)
        return torch.softmax(y @ y.transpose(1, 2), dim=-1) @ y


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUT, INPUT, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0] + x


@pytest.mark.parametrize("net, op", [(ConvFront(), "Conv"), (SelfAttention(), "MatMul"), (Residual(), "Add")],
                         ids=["conv", "attention", "residual"])
def test_unsupported_graphs_name_op_and_node(tmp_path, net, op):
    path = export(net.eval(), "ts17", False, tmp_path / "bad.onnx", True)
    nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == op]
    with pytest.raises(ConversionError) as info:
        from_onnx(path)
    message = str(info.value)
    assert str(path) in message and op in message
    assert any(repr(name) in message for name in nodes), message


def test_garbage_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe\x00" * 10)
    with pytest.raises(FormatError, match="garbage.onnx"):
        from_onnx(garbage)
    whole = export(Net("gru").eval(), "ts17", False, tmp_path / "whole.onnx", False)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises((FormatError, ConversionError), match="truncated.onnx"):
        from_onnx(truncated)
    with pytest.raises(FormatError, match="missing.onnx"):
        from_onnx(tmp_path / "missing.onnx")


def test_dynamo_lstm_with_projection_is_refused(tmp_path):
    """torch's dynamo exporter writes nn.LSTM(proj_size=P) as an LSTM of hidden_size P with a wider
    initial_c and no projection: a graph onnxruntime rejects at run time. edgernn refuses to import it."""
    net = nn.LSTM(INPUT, HIDDEN, proj_size=3).eval()
    x = torch.randn(*EXPORT_SHAPE, INPUT)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "proj.onnx"), dynamo=True, opset_version=18,
                          dynamic_shapes=({1: torch.export.Dim("B", min=1, max=64)},))
    with pytest.raises(ConversionError, match="proj_size"):
        from_onnx(tmp_path / "proj.onnx")


class ConstantStart(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(INPUT, HIDDEN)
        self.register_buffer("h0", torch.linspace(-0.5, 0.5, 2 * HIDDEN).reshape(1, 2, HIDDEN))
        self.register_buffer("c0", torch.linspace(0.3, -0.3, 2 * HIDDEN).reshape(1, 2, HIDDEN))

    def forward(self, x):
        return self.rnn(x, (self.h0, self.c0))[0]


def test_constant_initial_state_runs_in_import_graph_but_from_onnx_refuses(tmp_path):
    net = ConstantStart().eval()
    path = export(net, "ts17", False, tmp_path / "start.onnx", False)
    x = sequence(EXPORT_SHAPE, False, 0)
    reference = ort.InferenceSession(str(path)).run(None, {"x": x})
    got = import_graph(path).run({"x": x})
    assert max_err(got[0], reference[0]) <= TOLERANCE
    with pytest.raises(ConversionError, match="non-zero constant state"):
        from_onnx(path)


def test_hand_built_graph_with_layout_1_and_eval_glue():
    """Glue torch does not emit: an LSTM with layout 1, Dropout and Identity on the way, a Y_h output.
    onnxruntime refuses layout 1, so ONNX's reference evaluator is the reference here."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    H, O, T, B = 6, 3, 5, 2

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [const("mean", rng.standard_normal(INPUT)), const("std", rng.uniform(0.5, 2, INPUT)),
             const("W", rng.standard_normal((1, 4 * H, INPUT)) * 0.4),
             const("R", rng.standard_normal((1, 4 * H, H)) * 0.4), const("B", rng.standard_normal((1, 8 * H)) * 0.2),
             const("Wd", rng.standard_normal((H, O))), const("bd", rng.standard_normal(O)),
             numpy_helper.from_array(np.array([2], np.int64), "axes")]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
        helper.make_node("Div", ["centred", "std"], ["scaled"], name="scale"),
        helper.make_node("LSTM", ["scaled", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=H, layout=1),
        helper.make_node("Squeeze", ["Y", "axes"], ["Ys"], name="squeeze"),
        helper.make_node("Dropout", ["Ys"], ["Yd"], name="dropout"),
        helper.make_node("Identity", ["Yd"], ["Yi"], name="identity"),
        helper.make_node("MatMul", ["Yi", "Wd"], ["Z"], name="dense"),
        helper.make_node("Add", ["Z", "bd"], ["Zb"], name="bias"),
        helper.make_node("Softmax", ["Zb"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", INPUT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((B, T, INPUT)).astype(np.float32)
    reference = ReferenceEvaluator(proto).run(None, {"x": x})
    imported = import_graph(proto)
    assert imported.model.spec.normalize and [d.activation.name for d in imported.model.spec.head] == ["softmax"]
    for mine, theirs in zip(imported.run({"x": x}), reference):
        assert max_err(mine, theirs) <= TOLERANCE


def test_local_functions_are_inlined(tmp_path):
    """Modules exported as ONNX local functions (the dynamo exporter may emit functions too)."""
    torch.manual_seed(11)
    net = Net("lstm", head="mlp").eval()
    x = torch.randn(*EXPORT_SHAPE, INPUT)
    path = tmp_path / "functions.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          export_modules_as_functions={nn.Linear, nn.LSTM})
    assert onnx.load(str(path)).functions
    check(net, path, False, False)


class StateInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(INPUT, HIDDEN, num_layers=2)

    def forward(self, x, h0):
        return self.rnn(x, h0)[0]


def test_initial_state_from_a_graph_input_is_refused(tmp_path):
    path = tmp_path / "h0.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(StateInput().eval(), (torch.randn(*EXPORT_SHAPE, INPUT), torch.randn(2, 2, HIDDEN)),
                          str(path), dynamo=False, opset_version=17, input_names=["x", "h0"])
    with pytest.raises(ConversionError, match="reads graph input 'h0'"):
        from_onnx(path)
