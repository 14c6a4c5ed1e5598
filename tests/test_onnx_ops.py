"""converters/onnx_ops.py: single ONNX LSTM/GRU/RNN nodes, converted and run by edgernn's `Model`, against
onnxruntime (CPUExecutionProvider) on the same graph; then the gate permutation, the state packing, and
the refusals.

Parity tolerance: 1e-5 max abs difference on every output (float32), on data scaled so the outputs stay
O(1) (each test checks that, so the absolute bound means something). onnxruntime runs layout 0 only, so
a layout 1 graph is checked against the same node with layout 0 on transposed inputs and outputs.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgernn.converters.onnx_ops import (  # noqa: E402
    RecurrentNode, pack_initial_state, recurrent_node, unpack_state)
from edgernn.errors import ConversionError, InputError  # noqa: E402
from edgernn.onnx_backend import EdgeRNNBackend  # noqa: E402
from edgernn.spec import RecurrentLayer  # noqa: E402

TOL = 1e-5  # max abs difference, float32
BOUND = 50.0  # outputs must stay below this for TOL to be a meaningful absolute bound
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
SLOTS = {"RNN": 1, "GRU": 2, "LSTM": 3}
DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
               "Elu", "Softsign", "Softplus"]
PARAMETERS = {"Affine": (0.7, 0.2), "LeakyRelu": (0.3, None), "ThresholdedRelu": (0.2, None),
              "ScaledTanh": (1.3, 0.6), "HardSigmoid": (0.3, 0.4), "Elu": (0.8, None)}
"""Non-default alpha (beta) for every activation that takes one."""


class Case:
    """One ONNX recurrent node with random weights and inputs, buildable in layout 0 or 1.

    W, R, B, P are initializers unless ``runtime_weights``; sequence_lens, initial_h and initial_c are
    graph inputs, or initializers when ``constant_inputs``."""

    def __init__(self, op, I=3, H=4, T=5, batch=3, direction="forward", bias=True, peepholes=False,
                 sequence_lens=None, initial_h=False, initial_c=False, opset=22, seed=0, scale=0.4,
                 runtime_weights=False, constant_inputs=False, dtype=np.float32, **attrs):
        rng = np.random.default_rng(seed)
        D = 2 if direction == "bidirectional" else 1
        G = GATES[op]
        self.op, self.D, self.H, self.opset, self.attrs = op, D, H, opset, dict(attrs, direction=direction)
        self.attrs["hidden_size"] = H
        self.dtype = dtype

        def normal(*shape, s=scale):
            return (rng.standard_normal(shape) * s).astype(dtype)

        self.weights = {"W": normal(D, G * H, I), "R": normal(D, G * H, H)}
        if bias:
            self.weights["B"] = normal(D, 2 * G * H)
        if peepholes:
            self.weights["P"] = normal(D, 3 * H)
        self.X = normal(T, batch, I, s=1.0)
        self.extra = {}
        if sequence_lens is not None:
            self.extra["sequence_lens"] = np.asarray(sequence_lens, np.int32)
        if initial_h:
            self.extra["initial_h"] = normal(D, batch, H, s=0.5)
        if initial_c:
            self.extra["initial_c"] = normal(D, batch, H, s=0.5)
        self.runtime_weights, self.constant_inputs = runtime_weights, constant_inputs

    def model(self, layout=0, attrs=None):
        names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
        present = {"X", "W", "R", *self.weights, *self.extra}
        inputs = [name if name in present else "" for name in names]
        while not inputs[-1]:
            inputs.pop()
        outputs = ["Y", "Y_h"] + (["Y_c"] if self.op == "LSTM" else [])
        attrs = dict(self.attrs if attrs is None else attrs)
        if layout:
            attrs["layout"] = layout
        node = helper.make_node(self.op, inputs, outputs, name=f"rec_{self.op.lower()}", **attrs)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        runtime = ["X"] + ([] if self.constant_inputs else list(self.extra))
        constants = dict(self.extra) if self.constant_inputs else {}
        if self.runtime_weights:
            runtime += list(self.weights)
        else:
            constants.update(self.weights)
        graph_inputs = [helper.make_tensor_value_info(
            n, TensorProto.INT32 if n == "sequence_lens" else elem, None) for n in runtime]
        graph = helper.make_graph(
            [node], "case", graph_inputs, [helper.make_tensor_value_info(n, elem, None) for n in outputs],
            [numpy_helper.from_array(self._as_layout(n, v, layout), n) for n, v in constants.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    def _as_layout(self, name, value, layout):
        if layout == 1 and name in ("X", "initial_h", "initial_c"):  # (T|D, B, .) -> (B, T|D, .)
            return np.ascontiguousarray(value.transpose(1, 0, 2))
        return value

    def feeds(self, layout=0):
        feeds = {"X": self._as_layout("X", self.X, layout)}
        if not self.constant_inputs:
            feeds.update({n: self._as_layout(n, v, layout) for n, v in self.extra.items()})
        if self.runtime_weights:
            feeds.update(self.weights)
        return feeds

    def expected(self, layout=0):
        """onnxruntime's outputs for the layout 0 node, transposed into ``layout``'s shapes."""
        session = ort.InferenceSession(self.model(0).SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, self.feeds(0))
        if layout == 1:
            outputs = [outputs[0].transpose(2, 0, 1, 3)] + [o.transpose(1, 0, 2) for o in outputs[1:]]
        return outputs

    def got(self, layout=0, engine="model"):
        return EdgeRNNBackend.prepare(self.model(layout), engine=engine).run(self.feeds(layout))


def check(case: Case, layout=0):
    expected, got = case.expected(layout), case.got(layout)
    assert len(got) == len(expected)
    for name, e, g in zip(("Y", "Y_h", "Y_c"), expected, got):
        assert g.shape == e.shape, name
        assert g.dtype == e.dtype, name
        assert np.abs(e).max() < BOUND, f"{name}: outputs too large for an absolute tolerance"
        np.testing.assert_allclose(g, e, rtol=0, atol=TOL, err_msg=name)
    return expected


# ---- parity with onnxruntime ------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("lengths", [None, [5, 3, 1]])
def test_matrix(op, direction, layout, bias, initial, lengths):
    check(Case(op, direction=direction, bias=bias, initial_h=initial, initial_c=initial and op == "LSTM",
               sequence_lens=lengths, seed=len(op) + layout), layout)


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("H", [1, 2, 3, 5, 7, 9, 11, 13, 16, 17])
def test_hidden_sizes(op, H):
    check(Case(op, I=H % 5 + 1, H=H, T=7, batch=2, direction="bidirectional", sequence_lens=[7, 4],
               initial_h=True, initial_c=op == "LSTM", peepholes=op == "LSTM", seed=H, scale=0.5 / np.sqrt(H)))


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peepholes, coupled", [(True, 0), (False, 1), (True, 1)])
@pytest.mark.parametrize("layout", [0, 1])
def test_lstm_peepholes_and_coupled_gate(direction, peepholes, coupled, layout):
    case = Case("LSTM", direction=direction, peepholes=peepholes, input_forget=coupled, initial_h=True,
                initial_c=True, sequence_lens=[5, 2, 4], seed=3)
    check(case, layout)
    layer = recurrent_node(case.model().graph.node[0], _constants(case.model()), "test").layer
    assert (layer.peepholes, layer.coupled_input_forget, layer.gates) == (peepholes, bool(coupled), 4 - coupled)


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_clip(op, direction):
    # Weights large enough that many pre-activations exceed the clip.
    case = Case(op, direction=direction, clip=0.6, scale=1.5, peepholes=op == "LSTM", initial_h=True, seed=5)
    check(case)
    unclipped = Case(op, direction=direction, scale=1.5, peepholes=op == "LSTM", initial_h=True, seed=5)
    assert np.abs(case.expected()[0] - unclipped.expected()[0]).max() > 1e-2  # the clip did bite


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_linear_before_reset(direction, linear_before_reset, bias):
    check(Case("GRU", direction=direction, linear_before_reset=linear_before_reset, bias=bias, initial_h=True,
               sequence_lens=[5, 1, 3], seed=7))


def _activation_cases():
    for op, slots in SLOTS.items():
        for name in ACTIVATIONS:
            for slot in range(slots):
                yield op, name, slot, False
                if name in PARAMETERS:
                    yield op, name, slot, True


@pytest.mark.parametrize("op, name, slot, with_parameters", list(_activation_cases()))
def test_activation(op, name, slot, with_parameters, caplog):
    activations = list(DEFAULT_ACTIVATIONS[op])
    activations[slot] = name
    attrs = {"activations": activations}
    if with_parameters:
        alpha, beta = PARAMETERS[name]
        attrs["activation_alpha"] = [alpha]
        if beta is not None:
            attrs["activation_beta"] = [beta]
    # Small weights and short sequences: an unbounded gate function (e.g. Relu for z) grows the state.
    with caplog.at_level(logging.WARNING):
        check(Case(op, T=4, scale=0.3, initial_h=True, activations=attrs.pop("activations"), seed=slot, **attrs))


@pytest.mark.parametrize("activations, alpha, beta, expected", [
    # Each list is consumed in order by the functions that take that parameter (onnxruntime's reading).
    (["HardSigmoid", "Affine", "LeakyRelu"], [0.3, 1.5, 0.2], [0.4, 0.1],
     [("hard_sigmoid", 0.3, 0.4), ("affine", 1.5, 0.1), ("leaky_relu", 0.2, 0.0)]),
    (["Sigmoid", "Relu", "ScaledTanh"], [0.9], [1.3],
     [("sigmoid", 0.0, 0.0), ("relu", 0.0, 0.0), ("scaled_tanh", 0.9, 1.3)]),
    # Lists that run out: onnxruntime's defaults (0 for Affine's alpha, ONNX's elsewhere).
    (["HardSigmoid", "Affine", "LeakyRelu"], [0.3], [0.4],
     [("hard_sigmoid", 0.3, 0.4), ("affine", 0.0, 0.0), ("leaky_relu", 0.01, 0.0)]),
    (["Elu", "Tanh", "HardSigmoid"], [], [],
     [("elu", 1.0, 0.0), ("tanh", 0.0, 0.0), ("hard_sigmoid", 0.2, 0.5)]),
])
def test_activation_parameter_lists(activations, alpha, beta, expected):
    attrs = {"activations": activations}
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    case = Case("LSTM", T=4, scale=0.3, initial_h=True, seed=11, **attrs)
    check(case)
    layer = recurrent_node(case.model().graph.node[0], _constants(case.model()), "test").layer
    assert [a.name for a in layer.activations] == [e[0] for e in expected]
    got = [(a.alpha, a.beta) for a in layer.activations]
    np.testing.assert_allclose(got, [e[1:] for e in expected], rtol=1e-7)  # ONNX attributes are float32


def test_bidirectional_activations_per_direction():
    case = Case("LSTM", direction="bidirectional", T=4, scale=0.3, seed=12,
                activations=["HardSigmoid", "Tanh", "Affine", "Sigmoid", "Softsign", "Elu"],
                activation_alpha=[0.3, 1.5, 0.5], activation_beta=[0.4, 0.1])
    check(case)
    gru = Case("GRU", direction="bidirectional", T=4, scale=0.3, seed=13,
               activations=["Sigmoid", "ScaledTanh", "HardSigmoid", "Softsign"],
               activation_alpha=[0.9, 0.25], activation_beta=[1.1, 0.45])
    check(gru)


def test_rnn_two_activations_forward_uses_the_first():
    # ONNX's RNN schema once listed ["Tanh", "Tanh"]; onnxruntime reads the first for a forward node.
    check(Case("RNN", activations=["Relu", "Tanh"], seed=14))


def test_missing_parameters_follow_onnxruntime_and_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="edgernn.converters.onnx_ops"):
        check(Case("RNN", activations=["ThresholdedRelu"], seed=15))
    assert "ThresholdedRelu has no activation_alpha value" in caplog.text


def test_thresholded_relu_is_strict_at_alpha():
    # W = identity, R = 0, no bias: the pre-activation is x itself, so x == alpha hits the boundary.
    alpha = 0.5
    X = np.array([[[0.5, 0.25, 1.0]], [[0.5, 0.75, -0.5]]], np.float32)  # (T, B, I = H)
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=3, activations=["ThresholdedRelu"],
                            activation_alpha=[alpha])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32)[None], "W"),
         numpy_helper.from_array(np.zeros((1, 3, 3), np.float32), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": X})
    got = EdgeRNNBackend.prepare(model).run({"X": X})
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[0][0, 0, 0, 0] == 0.0  # x == alpha gives 0: the comparison is x > alpha


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("opset", [7, 14, 22])
def test_opsets(op, opset):
    check(Case(op, direction="bidirectional", opset=opset, initial_h=True, sequence_lens=[5, 2, 3], seed=opset))


def test_constant_initial_state_and_lengths():
    case = Case("LSTM", direction="bidirectional", initial_h=True, initial_c=True, sequence_lens=[2, 5, 4],
                constant_inputs=True, seed=16)
    check(case)
    rec = recurrent_node(case.model().graph.node[0], _constants(case.model()), "test")
    np.testing.assert_array_equal(rec.sequence_lens, [2, 5, 4])
    np.testing.assert_array_equal(rec.initial_h, case.extra["initial_h"])
    np.testing.assert_array_equal(rec.initial_c, case.extra["initial_c"])


def test_zero_length_sequence_gives_zero_state():
    # onnxruntime: Y and Y_h/Y_c of an empty sequence are zeros, whatever initial_h/initial_c hold.
    for op in GATES:
        for direction in ("forward", "reverse", "bidirectional"):
            expected = check(Case(op, direction=direction, sequence_lens=[5, 0, 2], initial_h=True,
                                  initial_c=op == "LSTM", seed=17))
            assert not expected[1][:, 1].any()


@pytest.mark.parametrize("op", list(GATES))
def test_float64_graph(op):
    # onnxruntime has no float64 LSTM: compare with its float32 run on the same values (rounded).
    options = dict(direction="bidirectional", initial_h=True, sequence_lens=[5, 2, 4], seed=18)
    expected = Case(op, **options).expected()
    got = Case(op, dtype=np.float64, **options).got()
    for e, g in zip(expected, got):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=0, atol=TOL)


# ---- the conversion itself ----------------------------------------------------------------------------
def _constants(model):
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return values.get


def _blocks(G, H, I, values):
    """(1, G*H, I) with block k filled with values[k]."""
    return np.concatenate([np.full((H, I), v, np.float32) for v in values])[None]


@pytest.mark.parametrize("op, coupled, onnx_order, canonical", [
    ("LSTM", 0, "iofc", "ifco"),   # canonical i, f, g(=c), o
    ("LSTM", 1, "iofc", "ico"),    # coupled: i, g, o; f dropped
    ("GRU", 0, "zrh", "rzh"),      # canonical r, z, n(=h)
    ("RNN", 0, "h", "h"),
])
def test_gate_permutation(op, coupled, onnx_order, canonical):
    G, H, I = len(onnx_order), 2, 3
    code = {gate: float(k + 1) for k, gate in enumerate(onnx_order)}
    values = [code[g] for g in onnx_order]
    tensors = {"W": _blocks(G, H, I, values), "R": _blocks(G, H, H, values),
               "B": np.concatenate([_blocks(G, H, 1, values).ravel(), 10 + _blocks(G, H, 1, values).ravel()])[None]}
    inputs = ["X", "W", "R", "B"]
    if op == "LSTM":
        tensors["P"] = np.concatenate([np.full(H, v, np.float32) for v in (1.0, 2.0, 3.0)])[None]  # i, o, f
        inputs += ["", "", "", "P"]
    attrs = {"input_forget": coupled} if op == "LSTM" else {}
    node = helper.make_node(op, inputs, ["Y"], hidden_size=H, **attrs)
    rec = recurrent_node(node, tensors.get, "test")
    blocks = [code[g] for g in canonical]
    np.testing.assert_array_equal(rec.weights["W"][::H, 0], blocks)
    np.testing.assert_array_equal(rec.weights["R"][::H, 0], blocks)
    np.testing.assert_array_equal(rec.weights["Wb"][::H], blocks)
    np.testing.assert_array_equal(rec.weights["Rb"][::H], np.add(blocks, 10))
    if op == "LSTM":
        np.testing.assert_array_equal(rec.weights["P"][::H], [1.0, 2.0] if coupled else [1.0, 3.0, 2.0])
    assert {f"layers.0.{k}" for k in rec.weights} == set(rec.layer.tensor_shapes(0))


def test_bidirectional_weight_names():
    case = Case("GRU", direction="bidirectional", seed=19)
    rec = recurrent_node(case.model().graph.node[0], _constants(case.model()), "test")
    assert isinstance(rec, RecurrentNode)
    assert set(rec.weights) == {"W", "R", "Wb", "Rb", "reverse.W", "reverse.R", "reverse.Wb", "reverse.Rb"}
    np.testing.assert_array_equal(rec.weights["reverse.W"][:4], case.weights["W"][1, 4:8])  # r is ONNX block 1
    assert rec.layout == 0 and rec.initial_h is None and rec.sequence_lens is None


@pytest.mark.parametrize("cell, direction, proj", [("lstm", "bidirectional", 0), ("gru", "reverse", 0),
                                                   ("lstm", "forward", 3)])
@pytest.mark.parametrize("layout", [0, 1])
def test_pack_and_unpack_state(cell, direction, proj, layout):
    layer = RecurrentLayer(cell, 2, 5, direction=direction, proj_size=proj)
    D, B, Hp = layer.directions, 3, layer.unit_output_size
    rng = np.random.default_rng(0)
    h = rng.standard_normal((D, B, Hp)).astype(np.float32)
    c = rng.standard_normal((D, B, 5)).astype(np.float32) if cell == "lstm" else None
    as_layout = (lambda a: a.transpose(1, 0, 2)) if layout else (lambda a: a)
    rows = pack_initial_state(layer, as_layout(h), None if c is None else as_layout(c), B, layout)
    assert rows.shape == (B, layer.state_size) and rows.dtype == np.float32
    # Row layout: per direction, h then c.
    part = layer.state_size // D
    np.testing.assert_array_equal(rows[1, part * (D - 1):part * (D - 1) + Hp], h[D - 1, 1])
    Y_h, Y_c = unpack_state(layer, rows, layout)
    np.testing.assert_array_equal(Y_h, as_layout(h))
    if c is None:
        assert Y_c is None
    else:
        np.testing.assert_array_equal(Y_c, as_layout(c))
        np.testing.assert_array_equal(rows[1, Hp:Hp + 5], c[0, 1])
    zeros = pack_initial_state(layer, None, None, B, layout)
    assert zeros.shape == (B, layer.state_size) and not zeros.any()


def test_pack_refuses_wrong_shapes():
    layer = RecurrentLayer("lstm", 2, 5, direction="bidirectional")
    with pytest.raises(ConversionError, match=r"initial_h: expected shape \(2, 3, 5\)"):
        pack_initial_state(layer, np.zeros((1, 3, 5)), None, 3)
    with pytest.raises(ConversionError, match="only an LSTM has a cell state"):
        pack_initial_state(RecurrentLayer("gru", 2, 5), None, np.zeros((1, 3, 5)), 3)


# ---- refusals: ConversionError naming the node ------------------------------------------------------
def _refusal(op="LSTM", direction="forward", weights=None, inputs=None, **attrs):
    case = Case(op, direction=direction, peepholes=op == "LSTM")
    tensors = dict(case.weights, **(weights or {}))
    names = inputs or (["X", "W", "R", "B", "", "", "", "P"] if op == "LSTM" else ["X", "W", "R", "B"])
    node = helper.make_node(op, names, ["Y"], name="my_node", hidden_size=case.H, direction=direction, **attrs)
    with pytest.raises(ConversionError) as info:
        recurrent_node(node, tensors.get, "graph 'main'")
    message = str(info.value)
    assert f"graph 'main' ({op} 'my_node')" in message
    return message


def test_refuses_runtime_weights():
    assert "input W ('W_in') must be a constant" in _refusal(inputs=["X", "W_in", "R"])


def test_refuses_unknown_activation():
    assert "unsupported activation 'Gelu'" in _refusal("GRU", activations=["Sigmoid", "Gelu"])


def test_refuses_wrong_activation_count():
    assert "activations lists 2 function(s)" in _refusal("LSTM", activations=["Sigmoid", "Tanh"])


@pytest.mark.parametrize("name, shape", [("W", (1, 12, 3)), ("R", (1, 16, 3)), ("B", (1, 16)), ("P", (1, 8)),
                                         ("W", (16, 3))])
def test_refuses_wrong_shapes(name, shape):
    message = _refusal(weights={name: np.zeros(shape, np.float32)})
    assert name in message and str(shape) in message


def test_refuses_direction_mismatch():
    case = Case("RNN")  # weights for one direction
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y"], name="n", hidden_size=4, direction="bidirectional")
    with pytest.raises(ConversionError, match=r"\(RNN 'n'\): input W has shape \(1, 4, 3\), expected \(2, 4, 3\)"):
        recurrent_node(node, case.weights.get, "graph")


def test_refuses_non_float_weights():
    message = _refusal(weights={"R": np.zeros((1, 16, 4), np.int32)})
    assert "input R has dtype int32" in message


def test_refuses_non_finite_weights():
    weights = Case("RNN").weights
    weights["W"] = weights["W"].copy()
    weights["W"][0, 0, 0] = np.inf
    assert "non-finite" in _refusal("RNN", weights=weights)


@pytest.mark.parametrize("attrs, text", [
    ({"layout": 2}, "layout must be 0 or 1"),
    ({"clip": -1.0}, "clip: must be > 0"),
    ({"linear_before_reset": 1}, "linear_before_reset applies to GRU only"),
    ({"mystery": 1}, "unsupported attribute(s) mystery"),
])
def test_refuses_bad_attributes(attrs, text):
    assert text in _refusal(**attrs)


def test_refuses_bad_direction():
    case = Case("RNN")
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y"], name="n", hidden_size=4, direction="sideways")
    with pytest.raises(ConversionError, match=r"\(RNN 'n'\): direction must be"):
        recurrent_node(node, case.weights.get, "graph")


def test_refuses_input_forget_on_gru():
    assert "input_forget applies to LSTM only" in _refusal("GRU", input_forget=1)


def test_refuses_non_recurrent_node():
    node = helper.make_node("Relu", ["X"], ["Y"], name="r")
    with pytest.raises(ConversionError, match=r"\(Relu 'r'\): not a recurrent operator"):
        recurrent_node(node, {}.get, "graph")


def test_backend_refuses_bad_runtime_inputs():
    case = Case("GRU", sequence_lens=[5, 9, 1])
    with pytest.raises(InputError, match=r"sequence_lens must lie in \[0, 5\]"):
        case.got()
    case = Case("GRU", initial_h=True)
    feeds = case.feeds()
    feeds["initial_h"] = feeds["initial_h"][:, :2]
    with pytest.raises(InputError, match=r"initial_h: expected shape \(1, 3, 4\)"):
        EdgeRNNBackend.prepare(case.model()).run(feeds)
    feeds = Case("GRU").feeds()
    feeds["X"] = feeds["X"][:, :, :2]
    with pytest.raises(InputError, match=r"X must have shape \(T, B, I\) with I = 3"):
        EdgeRNNBackend.prepare(Case("GRU").model()).run(feeds)
