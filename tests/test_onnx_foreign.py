"""Whole-graph ONNX import of models another framework exported: Keras 2.15 models converted by tf2onnx 1.16.

The fixtures in tests/data/foreign/ were written by tests/data/foreign/make_fixtures.py (its docstring gives
the TensorFlow environment); each ``<name>.onnx`` has a ``<name>.npz`` with a seeded input batch ``x``
(batch, time, features) and Keras's own output ``y`` for it. No TensorFlow is needed here: Keras's numbers
are the reference, and onnxruntime checks the fixture itself.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgernn.converters import from_onnx  # noqa: E402
from edgernn.converters.onnx_import import import_graph  # noqa: E402
from edgernn.errors import ConversionError  # noqa: E402

FOREIGN = Path(__file__).resolve().parent / "data" / "foreign"

TOLERANCE = 1e-5
"""Max abs error of edgernn (float32 kernels) and of onnxruntime against Keras's float32 output."""

IMPORTED = {
    # fixture: what the edgernn model must look like ((cell, direction, hidden, bias) per layer; head
    # activations; input normalisation; whether the head reads only the last step)
    "lstm_dense_op13": ([("lstm", "forward", 8, True)], ["identity"], False, False),
    "lstm_dense_op17": ([("lstm", "forward", 8, True)], ["identity"], False, False),
    "gru_reset_after_op13": ([("gru", "forward", 6, True)], ["identity"], False, False),
    "gru_reset_after_op17": ([("gru", "forward", 6, True)], ["identity"], False, False),
    "lstm_stacked_op13": ([("lstm", "forward", 8, True), ("lstm", "forward", 6, True)], ["identity"], False, False),
    "bilstm_op13": ([("lstm", "bidirectional", 5, True)], ["identity"], False, False),
    "bilstm_op17": ([("lstm", "bidirectional", 5, True)], ["identity"], False, False),
    "lstm_last_softmax_op13": ([("lstm", "forward", 8, True)], ["softmax"], False, True),
    "lstm_no_bias_op13": ([("lstm", "forward", 6, True)], ["identity"], False, False),  # B of zeros: see below
    "gru_time_distributed_op13": ([("gru", "forward", 7, True)], ["tanh"], False, False),
    "normalized_lstm_op13": ([("lstm", "forward", 6, True)], ["relu", "identity"], True, False),
    # tf2onnx writes these as a Loop running Keras's cell; edgernn reads the loop (converters/onnx_loops.py)
    "rnn_tanh_op13": ([("rnn", "forward", 5, True)], ["identity"], False, False),
    "rnn_relu_op15": ([("rnn", "forward", 5, True)], ["identity"], False, False),
    "rnn_last_op13": ([("rnn", "forward", 6, True)], ["softmax"], False, True),
    "gru_reset_before_op13": ([("gru", "forward", 6, True)], ["identity"], False, False),
}
CELL_DETAILS = {
    # fixture: (the first layer's activations (empty: the cell's defaults), GRU linear_before_reset)
    "rnn_relu_op15": (["relu"], None),
    "rnn_tanh_op13": (["tanh"], None),
    "rnn_last_op13": (["tanh"], None),
    "gru_reset_before_op13": (["sigmoid", "tanh"], False),  # Keras's reset_after=False
    "gru_reset_after_op13": (["sigmoid", "tanh"], True),  # Keras's default reset_after=True
    "gru_reset_after_op17": (["sigmoid", "tanh"], True),
}
LOOP = "unsupported operator Loop in node '{node}' (control flow: not a Keras recurrent layer's while-loop " \
       "edgernn reads ({why}); edgernn reads ONNX's LSTM, GRU and RNN nodes, and the loops tf2onnx writes"
REFUSED = {
    # fixture: the refusal's text; {node} stands for the name of one of the graph's nodes of the operator
    # the message names, {reversed} for a ReverseSequence node's output (tf2onnx's names depend on the run)
    "masked_lstm_op13": LOOP.replace("{why}", "more than one carried state"),  # Keras carries the mask logic
    "bi_rnn_op13": LOOP.replace("{why}", "the body reads '{reversed}' from outside"),  # a reversed X
    "bilstm_last_op13": "Slice node '{node}': takes elements [0:1] of the reverse direction's output along "
                        "time: its final state, as a Keras Bidirectional layer without return_sequences",
}
ALL = sorted(IMPORTED) + sorted(REFUSED)


def fixture(name):
    data = np.load(FOREIGN / f"{name}.npz")
    return FOREIGN / f"{name}.onnx", data["x"], data["y"]


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def test_every_fixture_the_generator_makes_is_here_and_tested():
    """make_fixtures.py's MODELS (read without TensorFlow) == the files == the fixtures tested; all small."""
    tree = ast.parse((FOREIGN / "make_fixtures.py").read_text())
    models = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "MODELS" for t in node.targets))
    names = {key.value for key in models.keys}
    assert names == set(ALL)
    assert {p.stem for p in FOREIGN.glob("*.onnx")} == names == {p.stem for p in FOREIGN.glob("*.npz")}
    sizes = [p.stat().st_size for p in FOREIGN.iterdir() if p.suffix in (".onnx", ".npz")]
    assert max(sizes) < 32 * 1024 and sum(sizes) < 512 * 1024


@pytest.mark.parametrize("name", ALL)
def test_onnxruntime_matches_keras(name):
    """The fixture itself: onnxruntime on the tf2onnx graph gives Keras's output."""
    path, x, y = fixture(name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    assert max_err(got, y) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_import_graph_matches_keras(name):
    path, x, y = fixture(name)
    imported = import_graph(path)
    assert imported.input_name == "x"
    (got,) = imported.run({"x": x})
    assert max_err(got, y) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_from_onnx_model_streams_match_keras(name, caplog):
    """The edgernn Model, one stream per batch element from its rest state, gives Keras's per-step outputs
    (for a last-step head: the head at every step, compared at the last)."""
    path, x, y = fixture(name)
    layers, head, normalize, last = IMPORTED[name]
    with caplog.at_level(logging.INFO, logger="edgernn.converters.onnx_import"):
        model = from_onnx(path)
    assert ("reads only the last time step" in caplog.text) == last
    spec = model.spec
    assert [(layer.cell, layer.direction, layer.hidden_size, layer.bias) for layer in spec.layers] == layers
    assert [dense.activation.name for dense in spec.head] == head
    assert spec.normalize == normalize
    if name in CELL_DETAILS:
        activations, linear_before_reset = CELL_DETAILS[name]
        assert [a.name for a in spec.layers[0].activations] == activations
        if linear_before_reset is not None:
            assert spec.layers[0].linear_before_reset == linear_before_reset
    if name == "lstm_no_bias_op13":  # tf2onnx writes use_bias=False as an all-zero B, read as it is
        assert not model.weights["layers.0.Wb"].any() and not model.weights["layers.0.Rb"].any()
        assert not spec.head[0].bias
    for b in range(x.shape[0]):
        ys = model.run(np.ascontiguousarray(x[b]), model.new_state())
        assert max_err(ys[-1] if last else ys, y[b]) <= TOLERANCE
    if model.streamable:  # stepping sample by sample gives the same as the whole-sequence run
        state = model.new_state()
        steps = np.stack([model.step(sample, state) for sample in x[0]])
        assert max_err(steps[-1] if last else steps, y[0]) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_operator_and_node(name):
    path, _, _ = fixture(name)
    nodes = onnx.load(str(path)).graph.node
    op = "Slice" if REFUSED[name].startswith("Slice") else "Loop"

    def alternatives(names):
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    pattern = re.escape(REFUSED[name]).replace(re.escape("{node}"),
                                               alternatives(n.name for n in nodes if n.op_type == op))
    pattern = pattern.replace(re.escape("{reversed}"),
                              alternatives(n.output[0] for n in nodes if n.op_type == "ReverseSequence"))
    for read in (from_onnx, import_graph):
        with pytest.raises(ConversionError) as info:
            read(path)
        assert str(path) in str(info.value) and re.search(pattern, str(info.value)), str(info.value)


# ---- the loop reader, on loops that differ from Keras's in one detail ------------------------------------


def _loop_graph(name):
    model = onnx.load(str(FOREIGN / f"{name}.onnx"))
    loop = next(node for node in model.graph.node if node.op_type == "Loop")
    return model, loop, next(a.g for a in loop.attribute if a.name == "body")


def _set_initializer(graph, name, value):
    from onnx import numpy_helper
    init = next(i for i in graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, numpy_helper.to_array(init).dtype), name))


def _counter_start(model, loop, body):
    _set_initializer(model.graph, loop.input[2], 1)  # the counter starts at 1: one step fewer


def _counter_step(model, loop, body):
    add = next(n for n in body.node if n.op_type == "Add" and body.input[2].name in n.input)
    _set_initializer(body, next(i for i in add.input if i != body.input[2].name), 2)


def _gather_axis(model, loop, body):
    gather = next(n for n in body.node if n.op_type == "Gather")
    gather.attribute.append(onnx.helper.make_attribute("axis", 1))


def _scan_not_state(model, loop, body):
    body.output[-1].name = body.input[3].name  # scans the previous state instead of the new one


def _bound_is_a_constant(model, loop, body):
    from onnx import numpy_helper
    model.graph.initializer.append(numpy_helper.from_array(np.array(5, np.int32), "five"))
    loop.input[4] = "five"


@pytest.mark.parametrize("mutate, why", [
    (_counter_start, "the counter does not start at 0"), (_counter_step, "Add on the loop's counter or bounds"),
    (_gather_axis, "Gather on the loop's counter or bounds"), (_scan_not_state, "the scan output is not the new "
                                                                                 "state"),
    (_bound_is_a_constant, "no counter, state or bound")], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_loops_that_differ_from_kerass_are_refused(mutate, why):
    model, loop, body = _loop_graph("rnn_tanh_op13")
    mutate(model, loop, body)
    with pytest.raises(ConversionError) as info:
        import_graph(model)
    assert f"unsupported operator Loop in node '{loop.name}'" in str(info.value)
    assert f"edgernn reads ({why})" in str(info.value)


def test_a_loop_with_another_activation_is_read_as_it_runs():
    """The reader matches the cell's algebra, not Keras's names: a sigmoid SimpleRNN (an edited graph)
    imports as one and agrees with onnxruntime."""
    model, loop, body = _loop_graph("rnn_tanh_op13")
    next(n for n in body.node if n.op_type == "Tanh").op_type = "Sigmoid"
    _, x, y = fixture("rnn_tanh_op13")
    imported = import_graph(model)
    assert [a.name for a in imported.model.spec.layers[0].activations] == ["sigmoid"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    assert max_err(expected, y) > 0.01
    assert max_err(imported.run({"x": x})[0], expected) <= TOLERANCE


def test_a_gru_loop_with_z_and_r_swapped_is_read_as_it_runs():
    """h' = r * h + (1 - r) * g(x W + (z * h) R): the same algebra with the gates' roles swapped imports
    with the blocks where they act, and agrees with onnxruntime."""
    model, loop, body = _loop_graph("gru_reset_before_op13")
    producer = {out: node for node in body.node for out in node.output}
    r_in, z_in = (producer[n.input[0]] for n in body.node if n.op_type == "Sigmoid")  # in graph order
    r_in.input[:], z_in.input[:] = list(z_in.input), list(r_in.input)  # each gate now reads the other's blocks
    _, x, y = fixture("gru_reset_before_op13")
    imported = import_graph(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    assert max_err(expected, y) > 0.01  # a different model from Keras's
    assert max_err(imported.run({"x": x})[0], expected) <= TOLERANCE
