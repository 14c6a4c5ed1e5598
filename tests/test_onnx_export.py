"""edgernn.converters.onnx_export: the ONNX step model computes what `Model.step` does, for every variant.

Each parity case exports a model, runs it in onnxruntime for STEPS steps on a batch of STREAMS streams,
feeding the state outputs back as inputs through a (streams, state_size) table sliced by `state_tensors`
(as a runtime would), and compares y and the whole state table after every step with `Model.step_batch`
and `Model.step` on the same inputs, and with the float64 oracle `reference_run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgernn  # noqa: E402
from edgernn.converters import to_onnx  # noqa: E402
from edgernn.converters.onnx_export import state_tensors  # noqa: E402
from edgernn.errors import ConversionError  # noqa: E402
from edgernn.reference import reference_run  # noqa: E402
from edgernn.spec import ACTIVATION_DEFAULTS, ELEMENTWISE, DenseLayer, ModelSpec, RecurrentLayer  # noqa: E402

STEPS, STREAMS = 50, 3
TOL = 1e-5
"""Max abs error of y and every state value against Model.step over STEPS steps. edgernn's kernels use a
rational tanh (and sigmoid built on it) accurate to ~3e-7, onnxruntime its own functions, so each step
differs by a few 1e-7; with weights of a realistic (contractive) scale that does not grow."""

# Non-default parameters, so a mix-up of alpha and beta (or a dropped one) shows.
PARAMS = {"affine": (0.7, 0.2), "leaky_relu": (0.1, 0.0), "thresholded_relu": (0.3, 0.0),
          "scaled_tanh": (1.3, 0.7), "hard_sigmoid": (0.25, 0.45), "elu": (0.8, 0.0)}


def act(name):
    alpha, beta = PARAMS.get(name, (None, None))
    return {"name": name, "alpha": alpha, "beta": beta} if name in PARAMS else name


def make_spec(input_size, layers, head=(), normalize=False) -> ModelSpec:
    """``layers``: (cell, hidden_size, options) chained by width; ``head``: (out_features, activation)."""
    recurrent, width = [], input_size
    for cell, hidden, options in layers:
        recurrent.append(RecurrentLayer(cell, width, hidden, **options))
        width = recurrent[-1].output_size
    dense = []
    for out, activation in head:
        dense.append(DenseLayer(width, out, activation=act(activation)))
        width = out
    return ModelSpec(input_size, tuple(recurrent), tuple(dense), normalize=normalize)


def make_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Matrices of std 1/sqrt(fan_in) (units in their nonlinear range, recurrence not chaotic), vectors
    of std 0.3, leak rates in [0.1, 1], normalisation with a large offset."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.tensor_shapes().items():
        std = 1 / np.sqrt(shape[1]) if len(shape) == 2 else 0.3
        weights[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        if name.endswith(".leak"):
            weights[name] = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    if spec.normalize:
        weights["input.mean"] = rng.uniform(-50, 50, spec.input_size).astype(np.float32)
        weights["input.std"] = rng.uniform(0.5, 4.0, spec.input_size).astype(np.float32)
    return weights


def model_of(spec: ModelSpec, seed: int = 0):
    return edgernn.Model(spec, make_weights(spec, seed))


def inputs_for(model, steps=STEPS, streams=STREAMS, seed=1) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((steps, streams, model.input_size)).astype(np.float32)
    if model.spec.normalize:  # samples around the sensor offset, as real ones would be
        X = X * model.weights["input.std"] + model.weights["input.mean"]
    return X.astype(np.float32)


def session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_step(sess, spec, x, states):
    """One step of the exported model on rows of a (n, state_size) table, updated in place -> y."""
    layout = state_tensors(spec)
    feeds = {"x": x} | {name: np.ascontiguousarray(states[:, o:o + s]) for name, o, s in layout}
    y, *new = sess.run(["y"] + [name + "_out" for name, _, _ in layout], feeds)
    for (name, o, s), value in zip(layout, new):
        states[:, o:o + s] = value
    return y


def parity(model, X=None):
    """Max abs errors (vs Model.step_batch, vs Model.step, vs reference_run) of y and the state table."""
    X = inputs_for(model) if X is None else X
    sess = session(to_onnx(model))
    ours, batch = model.new_state(batch=len(X[0])), model.new_state(batch=len(X[0]))
    singles = [model.new_state() for _ in X[0]]
    oracle = [np.zeros(model.state_size) for _ in X[0]]
    errors = {"step_batch": 0.0, "step": 0.0, "reference": 0.0}
    for x in X:
        y = ort_step(sess, model.spec, x, ours)
        y_batch = model.step_batch(batch, np.arange(len(x)), x)
        errors["step_batch"] = max(errors["step_batch"], np.abs(y - y_batch).max(), np.abs(ours - batch).max())
        for s, row in enumerate(singles):
            y_s = model.step(x[s], row)
            y_ref, oracle[s] = reference_run(model.spec, model.weights, x[s][None], oracle[s])
            errors["step"] = max(errors["step"], np.abs(y[s] - y_s).max(), np.abs(ours[s] - row).max())
            errors["reference"] = max(errors["reference"], np.abs(y[s] - y_ref[0]).max(),
                                      np.abs(ours[s] - oracle[s]).max())
    return errors


def assert_parity(model, X=None):
    errors = parity(model, X)
    assert max(errors.values()) <= TOL, errors


# ---- every variant -------------------------------------------------------------------------------------
LSTM_ACTS = [act("hard_sigmoid"), act("scaled_tanh"), "softsign"]
VARIANTS = {
    "rnn-tanh-h1": (3, [("rnn", 1, {})], [], False),
    "rnn-relu-h5": (4, [("rnn", 5, dict(activations=["relu"]))], [(2, "identity")], False),
    "rnn-no-bias-h13": (4, [("rnn", 13, dict(bias=False))], [], False),
    "rnn-clip": (4, [("rnn", 5, dict(clip=0.5))], [], False),
    "leaky-h13": (4, [("leaky", 13, {})], [(3, "tanh")], False),
    "leaky-relu-clip": (4, [("leaky", 5, dict(activations=["relu"], clip=1.0))], [], False),
    "mgu-h5": (4, [("mgu", 5, {})], [], False),
    "mgu-no-bias-h13": (4, [("mgu", 13, dict(bias=False, activations=[act("hard_sigmoid"), "softsign"]))], [], False),
    "gru-lbr-h13": (4, [("gru", 13, {})], [], False),
    "gru-no-lbr-h13": (4, [("gru", 13, dict(linear_before_reset=False))], [], False),
    "gru-no-lbr-no-bias-h1": (4, [("gru", 1, dict(linear_before_reset=False, bias=False))], [], False),
    "gru-lbr-clip-acts": (4, [("gru", 5, dict(clip=0.8, activations=[act("hard_sigmoid"), act("scaled_tanh")]))],
                          [], False),
    "lstm-h5": (4, [("lstm", 5, {})], [], False),
    "lstm-h1-no-bias": (2, [("lstm", 1, dict(bias=False))], [], False),
    "lstm-peepholes-h13": (4, [("lstm", 13, dict(peepholes=True))], [], False),
    "lstm-coupled-h5": (4, [("lstm", 5, dict(coupled_input_forget=True))], [], False),
    "lstm-coupled-peepholes": (4, [("lstm", 13, dict(coupled_input_forget=True, peepholes=True))], [], False),
    "lstm-proj": (4, [("lstm", 13, dict(proj_size=5))], [], False),
    "lstm-clip": (4, [("lstm", 5, dict(clip=0.7))], [], False),
    "lstm-acts": (4, [("lstm", 5, dict(activations=LSTM_ACTS))], [], False),
    "lstm-everything": (4, [("lstm", 13, dict(peepholes=True, coupled_input_forget=True, proj_size=5, clip=1.2,
                                             activations=LSTM_ACTS))], [(3, "softmax")], True),
    "stacked-lstm-2": (4, [("lstm", 5, {}), ("lstm", 13, dict(peepholes=True))], [(2, "identity")], False),
    "stacked-mixed-3": (5, [("lstm", 13, dict(proj_size=5)), ("gru", 5, dict(linear_before_reset=False)),
                            ("rnn", 13, dict(activations=["relu"]))], [(8, "relu"), (3, "identity")], False),
    "stacked-mgu-leaky": (4, [("mgu", 5, {}), ("leaky", 13, {})], [], True),
    "normalized-gru": (6, [("gru", 13, {})], [(2, "identity")], True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_model_matches_model_step(variant):
    input_size, layers, head, normalize = VARIANTS[variant]
    assert_parity(model_of(make_spec(input_size, layers, head, normalize)))


@pytest.mark.parametrize("activation", ELEMENTWISE)
def test_every_recurrent_activation(activation):
    spec = make_spec(4, [("rnn", 5, dict(activations=[act(activation)]))], [(2, "identity")])
    assert_parity(model_of(spec))


@pytest.mark.parametrize("activation", ACTIVATION_DEFAULTS)
def test_every_head_activation(activation):
    spec = make_spec(4, [("gru", 5, {})], [(6, activation), (3, activation)])
    assert_parity(model_of(spec))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantised_file_exports_its_dequantised_weights(tmp_path, dtype):
    spec = make_spec(4, [("lstm", 13, dict(peepholes=True)), ("gru", 5, {})], [(3, "tanh")], normalize=True)
    edgernn.save(model_of(spec), tmp_path / "model.ern", dtype=dtype)
    loaded = edgernn.load(tmp_path / "model.ern")
    assert_parity(loaded)


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["bidirectional", "reverse"])
def test_non_streamable_model_is_refused(direction):
    spec = make_spec(4, [("gru", 5, {}), ("lstm", 5, dict(direction=direction))])
    model = SimpleNamespace(spec=spec, weights=make_weights(spec))  # Model.run serves it; no step model
    with pytest.raises(ConversionError, match=f"{direction} layer 1 needs the whole sequence; a step model cannot"):
        to_onnx(model)
    with pytest.raises(ConversionError, match=direction):
        state_tensors(spec)


@pytest.mark.parametrize("options", [dict(opset=12), dict(opset="17"), dict(batch=0), dict(batch="static")])
def test_bad_options_are_refused(options):
    with pytest.raises(ConversionError, match=next(iter(options))):
        to_onnx(model_of(make_spec(4, [("rnn", 5, {})])), **options)


# ---- the file, its interface and metadata ---------------------------------------------------------------
def test_file_reloads_and_passes_the_checker(tmp_path):
    model = model_of(make_spec(4, [("lstm", 13, dict(proj_size=5)), ("rnn", 1, {})], [(3, "softmax")]))
    proto = to_onnx(model, tmp_path / "step.onnx")
    loaded = onnx.load(str(tmp_path / "step.onnx"))
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.SerializeToString() == proto.SerializeToString()

    assert [i.name for i in loaded.graph.input] == ["x", "h0", "c0", "h1"]
    assert [o.name for o in loaded.graph.output] == ["y", "h0_out", "c0_out", "h1_out"]
    widths = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*loaded.graph.input, *loaded.graph.output]}
    assert widths == {"x": ["batch", 4], "h0": ["batch", 5], "c0": ["batch", 13], "h1": ["batch", 1],
                      "y": ["batch", 3], "h0_out": ["batch", 5], "c0_out": ["batch", 13], "h1_out": ["batch", 1]}
    assert all(v.doc_string for v in [*loaded.graph.input, *loaded.graph.output])

    props = {p.key: p.value for p in loaded.metadata_props}
    assert edgernn.ModelSpec.from_json(props["edgernn.spec"]) == model.spec
    assert props["edgernn.state_size"] == str(model.state_size) == "19"
    assert json.loads(props["edgernn.state_layout"]) == [
        {"name": "h0", "output": "h0_out", "offset": 0, "size": 5},
        {"name": "c0", "output": "c0_out", "offset": 5, "size": 13},
        {"name": "h1", "output": "h1_out", "offset": 18, "size": 1},
    ]
    assert state_tensors(model.spec) == [("h0", 0, 5), ("c0", 5, 13), ("h1", 18, 1)]
    # Weights are initializers, the matrices transposed for x @ W^T.
    inits = {i.name: tuple(i.dims) for i in loaded.graph.initializer}
    assert inits["layers.0.W"] == (4, 4 * 13) and inits["layers.0.proj"] == (13, 5)


def test_batch_of_1_and_of_1000_run():
    model = model_of(make_spec(4, [("gru", 13, {}), ("lstm", 5, {})], [(2, "identity")]))
    sess = session(to_onnx(model))
    for streams in (1, 1000):
        X = inputs_for(model, steps=3, streams=streams)
        ours, theirs = model.new_state(batch=streams), model.new_state(batch=streams)
        for x in X:
            y = ort_step(sess, model.spec, x, ours)
            assert y.shape == (streams, model.output_size)
            assert np.abs(y - model.step_batch(theirs, np.arange(streams), x)).max() <= TOL
            assert np.abs(ours - theirs).max() <= TOL


def test_fixed_batch_size():
    model = model_of(make_spec(4, [("mgu", 5, {})]))
    proto = to_onnx(model, batch=2)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 4]
    assert_parity(model, inputs_for(model, steps=5, streams=2))


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets(opset):
    model = model_of(make_spec(4, [("lstm", 5, dict(peepholes=True, clip=1.0))], [(3, "softmax")]))
    proto = to_onnx(model, opset=opset)
    assert proto.opset_import[0].version == opset
    X = inputs_for(model, steps=5)
    sess, states = session(proto), model.new_state(batch=STREAMS)
    expected = model.new_state(batch=STREAMS)
    for x in X:
        y = ort_step(sess, model.spec, x, states)
        assert np.abs(y - model.step_batch(expected, np.arange(STREAMS), x)).max() <= TOL


def test_importing_edgernn_does_not_import_onnx():
    code = ("import sys, edgernn, edgernn.converters, edgernn.converters.onnx_export; "
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules, 'onnx imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
