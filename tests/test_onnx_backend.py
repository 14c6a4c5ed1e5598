"""edgernn.onnx_backend: ONNX's own LSTM, GRU and RNN node test cases, unchanged, through ONNX's backend
test runner; then the backend's own behaviour (run_node, run_model, dispatch to the graph importer).

The node test cases ship inside the onnx package (generated from `onnx.backend.test.case.node`), so
these tests run offline.
"""

from __future__ import annotations

import importlib.machinery
import re
import subprocess
import sys
import types
import unittest
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnx.backend.test  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.backend.test.case.node import collect_testcases  # noqa: E402
from onnx.backend.test.runner import Runner  # noqa: E402

import edgernn.onnx_backend as backend  # noqa: E402
from edgernn.errors import ConversionError  # noqa: E402

PATTERN = r"^test_(lstm|gru|simple_rnn|rnn)_"

# ---- ONNX's node tests through ONNX's runner, on the Numba kernels -----------------------------------
def _node_test_case() -> type[unittest.TestCase]:
    """ONNX's runner's test class holding only the included CPU tests (it keeps every other operator's
    test as a skipped one, thousands of them)."""
    with warnings.catch_warnings():  # generating onnx's cases for other operators warns (overflow, log 0)
        warnings.simplefilter("ignore", RuntimeWarning)
        backend_test = onnx.backend.test.BackendTest(backend, __name__)
    backend_test.include(PATTERN)
    tests = backend_test.test_cases["OnnxBackendNodeModelTest"]
    selected = {name: getattr(tests, name) for name in dir(tests) if re.match(PATTERN + r".*_cpu$", name)}
    test_case = type("OnnxBackendNodeModelTest", (unittest.TestCase,), selected)
    test_case.__module__ = __name__
    return test_case


OnnxBackendNodeModelTest = _node_test_case()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    CASES = [case for case in collect_testcases(None) if re.match(PATTERN, case.name)]


def test_all_eighteen_cases_are_collected():
    assert len(CASES) == 18
    assert sorted(n for n in dir(OnnxBackendNodeModelTest) if n.startswith("test_")) == sorted(
        f"{case.name}_cpu" for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_node_cases_reference(case):
    """The same cases on the float64 reference engine: the conversion itself is exact."""
    rep = backend.prepare(case.model, "CPU", engine="reference")
    for inputs, expected in case.data_sets:
        Runner.assert_similar_outputs(expected, rep.run(inputs), rtol=case.rtol, atol=case.atol)




# ---- the backend interface ----------------------------------------------------------------------------
def test_supports_cpu_only():
    assert backend.supports_device("CPU")
    assert not backend.supports_device("CUDA")
    with pytest.raises(ConversionError, match="CPU only"):
        backend.prepare(CASES[0].model, "CUDA")


def _lstm_node_and_inputs(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4, 2, 3)).astype(np.float32)
    W = (rng.standard_normal((1, 20, 3)) * 0.3).astype(np.float32)
    R = (rng.standard_normal((1, 20, 5)) * 0.3).astype(np.float32)
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h", "Y_c"], hidden_size=5)
    return node, X, W, R


def test_run_node_matches_prepared_graph():
    node, X, W, R = _lstm_node_and_inputs()
    Y, Y_h, Y_c = backend.run_node(node, [X, W, R])
    assert Y.shape == (4, 1, 2, 5) and Y_h.shape == Y_c.shape == (1, 2, 5)
    np.testing.assert_array_equal(Y[-1], Y_h)


def test_runtime_weights_are_converted_per_value():
    node, X, W, R = _lstm_node_and_inputs()
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in ("X", "W", "R")],
                              [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)])
    rep = backend.prepare(helper.make_model(graph))
    first = rep.run([X, W, R])[0]
    np.testing.assert_array_equal(rep.run({"X": X, "W": W, "R": R})[0], first)
    assert not np.allclose(rep.run([X, W * 2, R])[0], first)  # new weights, new model
    np.testing.assert_array_equal(rep.run([X, W, R])[0], first)


def test_constant_nodes_feed_weights():
    node, X, W, R = _lstm_node_and_inputs()
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
                 for name, value in (("W", W), ("R", R))]
    graph = helper.make_graph(constants + [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    got = backend.run_model(helper.make_model(graph), [X])
    np.testing.assert_array_equal(got[0], backend.run_node(node, [X, W, R])[0])


def test_outputs_follow_the_graph_order():
    node, X, W, R = _lstm_node_and_inputs()
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y_c", "Y")],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    Y_c, Y = backend.run_model(helper.make_model(graph), {"X": X})
    assert Y_c.shape == (1, 2, 5) and Y.shape == (4, 1, 2, 5)


def _two_node_model():
    node, X, W, R = _lstm_node_and_inputs()
    relu = helper.make_node("Relu", ["Y_h"], ["out"])
    graph = helper.make_graph([node, relu], "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    return helper.make_model(graph), X


def test_other_graphs_go_to_the_importer(monkeypatch):
    calls = []

    class Imported:
        def run(self, feeds):
            calls.append(feeds)
            return [np.ones(1, np.float32)]

    fake = types.ModuleType("edgernn.converters.onnx_import")
    fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, None)
    fake.import_graph = lambda model: Imported()
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model, X = _two_node_model()
    assert backend.run_model(model, [X])[0].tolist() == [1.0]
    assert list(calls[0]) == ["X"]


def test_other_graphs_without_importer_are_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "edgernn.converters.onnx_import" else real(name, *a))
    model, _ = _two_node_model()
    with pytest.raises(ConversionError, match="only graphs of one LSTM, GRU or RNN node.*LSTM, Relu"):
        backend.prepare(model)


def test_importing_edgernn_does_not_import_onnx():
    code = "import sys, edgernn; assert 'onnx' not in sys.modules and 'edgernn.onnx_backend' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
