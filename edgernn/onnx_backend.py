"""edgernn as an ONNX backend (`onnx.backend.base.Backend`), so ONNX's own LSTM, GRU and RNN test cases
run against the edgernn kernels unchanged.

    rep = EdgeRNNBackend.prepare(model_proto)      # or the module functions prepare / run_model / run_node
    Y, Y_h = rep.run([X])                          # outputs in the graph's order, X's dtype

A graph whose one compute node is LSTM, GRU or RNN (Constant nodes aside) runs here: the node becomes a
one-layer `Model` (`converters/onnx_ops.py`) and every batch element runs through `Model.run` with its
own state row. W, R, B and P may be graph inputs (ONNX's test cases feed them at run time): the model is
then converted on first use and cached by the weights' bytes. ``sequence_lens`` follows onnxruntime:
steps past a sequence's length give zeros in Y, Y_h/Y_c are the state at its last valid step (zeros
for a length of 0, whatever initial_h/c), and a reverse pass starts at that step. Any other graph goes to
the whole-graph importer (`edgernn.converters.onnx_import.import_graph`) when that module exists.

``prepare(..., engine="reference")`` runs the float64 NumPy oracle instead of the kernels, to tell a
conversion bug from a kernel bug.

Only the CPU device exists. onnx is imported here at module level: this module is never imported by
``edgernn/__init__.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType

from .converters.onnx_ops import OPS, describe, pack_initial_state, recurrent_node, unpack_state
from .errors import ConversionError, InputError
from .spec import ModelSpec

ENGINES = ("model", "reference")
"""``model``: the Numba kernels (`edgernn.Model`). ``reference``: the float64 NumPy oracle
(`edgernn.reference.reference_run`), to tell a conversion bug from a kernel bug."""


class _Reference:
    """`reference_run` behind `Model.run`'s interface: ``run(xs, state)`` advances ``state`` in place."""

    def __init__(self, spec: ModelSpec, weights: dict):
        self.spec, self.weights = spec, weights

    def run(self, xs, state):
        from .reference import reference_run

        ys, final = reference_run(self.spec, self.weights, xs, state)
        state[:] = final
        return ys.astype(np.float32)


def _build(spec: ModelSpec, weights: dict, engine: str):
    if engine == "reference":
        return _Reference(spec, weights)
    from .model import Model

    return Model(spec, weights)


def _constants(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' outputs, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            values[node.output[0]] = (numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto)
                                      else np.asarray(value))
    return values


def _feeds(names: list[str], inputs) -> dict[str, np.ndarray]:
    """A dict of feeds from a dict, or from a list in the order of the graph's runtime inputs."""
    if isinstance(inputs, dict):
        return {name: np.asarray(value) for name, value in inputs.items()}
    inputs = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if len(inputs) > len(names):
        raise InputError(f"got {len(inputs)} inputs, the graph takes {len(names)} ({', '.join(names)})")
    return {name: np.asarray(value) for name, value in zip(names, inputs)}


class RecurrentRep(BackendRep):
    """A prepared graph of one LSTM/GRU/RNN node. ``run(inputs)`` -> the graph's outputs, in order."""

    def __init__(self, model: onnx.ModelProto, node, engine: str = "model"):
        graph = model.graph
        self.node, self.engine = node, engine
        self.where = f"graph {graph.name!r}" if graph.name else "graph"
        self.constants = _constants(graph)
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        missing = [name for name in self.output_names if name not in node.output]
        if missing:
            raise ConversionError(f"{self.where}: output(s) {', '.join(missing)} are not outputs of "
                                  f"its {node.op_type} node")
        self._cache: dict = {}
        weights = [name for name in list(node.input)[1:4] + list(node.input)[7:8] if name]
        if all(name in self.constants for name in weights):
            self._converted(self.constants.get)  # convert now: errors surface at prepare

    def _converted(self, constant):
        """(RecurrentNode, runner) for these weights, converted once per distinct weight bytes."""
        digest = hashlib.sha256()
        for name in list(self.node.input)[1:4] + list(self.node.input)[7:8]:
            value = constant(name) if name else None
            if value is not None:
                digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
        key = digest.hexdigest()
        if key not in self._cache:
            rec = recurrent_node(self.node, constant, self.where)
            spec = ModelSpec(rec.layer.input_size, (rec.layer,))
            weights = {f"layers.0.{name}": value for name, value in rec.weights.items()}
            self._cache = {key: (rec, _build(spec, weights, self.engine))}  # keep one: weights rarely change
        return self._cache[key]

    def run(self, inputs, **kwargs):
        feeds = _feeds(self.input_names, inputs)

        def constant(name):
            return feeds[name] if name in feeds else self.constants.get(name)

        rec, runner = self._converted(constant)
        layer, node = rec.layer, self.node
        names = list(node.input) + [""] * (8 - len(node.input))
        X = constant(names[0])
        where = describe(node, self.where)
        if X is None:
            raise InputError(f"{where}: input X ({names[0]!r}) was not given")
        if X.dtype.type not in (np.float16, np.float32, np.float64):
            raise InputError(f"{where}: X has dtype {X.dtype}; only float16, float32 and float64 are supported")
        if X.ndim != 3 or X.shape[2] != layer.input_size:
            raise InputError(f"{where}: X must have shape {'(T, B, I)' if rec.layout == 0 else '(B, T, I)'} "
                             f"with I = {layer.input_size}, got {X.shape}")
        xs = X if rec.layout == 1 else X.transpose(1, 0, 2)  # (B, T, I)
        batch, T = xs.shape[:2]
        lens = constant(names[4]) if names[4] else None
        if lens is None:
            lens = np.full(batch, T)
        elif np.shape(lens) != (batch,) or np.asarray(lens).dtype.kind not in "iu":
            raise InputError(f"{where}: sequence_lens must be {batch} integers, got {np.shape(lens)} "
                             f"{np.asarray(lens).dtype}")
        elif ((lens < 0) | (lens > T)).any():
            raise InputError(f"{where}: sequence_lens must lie in [0, {T}], got {lens.tolist()}")
        h0 = constant(names[5]) if names[5] else None
        c0 = constant(names[6]) if names[6] else None
        try:
            rows = pack_initial_state(layer, h0, c0, batch, rec.layout)
        except ConversionError as exc:
            raise InputError(f"{where}: {exc}") from None
        D, Hp = layer.directions, layer.unit_output_size
        Y = np.zeros((batch, T, D, Hp), np.float32)
        for b in range(batch):
            length = int(lens[b])
            if length:
                ys = runner.run(np.ascontiguousarray(xs[b, :length], np.float32), rows[b])
                Y[b, :length] = ys.reshape(length, D, Hp)
            else:
                rows[b] = 0.0  # onnxruntime: an empty sequence's Y_h/Y_c are zeros, not initial_h/c
        Y_h, Y_c = unpack_state(layer, rows, rec.layout)
        values = dict(zip(node.output, (Y if rec.layout == 1 else Y.transpose(1, 2, 0, 3), Y_h, Y_c)))
        return [np.ascontiguousarray(values[name], X.dtype) for name in self.output_names]


class GraphRep(BackendRep):
    """A graph the whole-graph importer prepared; its ``run(feeds: dict)`` returns a list of outputs."""

    def __init__(self, model: onnx.ModelProto, imported):
        constants = _constants(model.graph)
        self.input_names = [i.name for i in model.graph.input if i.name not in constants]
        self.imported = imported

    def run(self, inputs, **kwargs):
        return list(self.imported.run(_feeds(self.input_names, inputs)))


class EdgeRNNBackend(Backend):
    """ONNX backend interface over edgernn (CPU only)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", engine: str = "model", **kwargs) -> BackendRep:
        if not cls.supports_device(device):
            raise ConversionError(f"edgernn runs on the CPU only, not {device!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        # No onnx.checker.check_model here: it refuses graphs onnxruntime runs (e.g. outputs declared
        # without a shape); every node is checked where it is converted, with errors that name it.
        compute = [node for node in model.graph.node if node.op_type != "Constant"]
        if len(compute) == 1 and compute[0].op_type in OPS and compute[0].domain in ("", "ai.onnx"):
            return RecurrentRep(model, compute[0], engine)
        if importlib.util.find_spec("edgernn.converters.onnx_import") is None:
            raise ConversionError(f"graph {model.graph.name!r}: only graphs of one LSTM, GRU or RNN node are "
                                  f"supported here (got {', '.join(n.op_type for n in compute) or 'no nodes'})")
        importer = importlib.import_module("edgernn.converters.onnx_import")
        return GraphRep(model, importer.import_graph(model))

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        """One node on ``inputs`` (positional, for its non-empty inputs in order) -> its outputs."""
        super().run_node(node, inputs, device, outputs_info, **kwargs)  # onnx.checker
        names = [name for name in node.input if name]
        values = [np.asarray(value) for value in (inputs.values() if isinstance(inputs, dict) else inputs)]
        graph = helper.make_graph(
            [node], "run_node",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for n, v in zip(names, values)],
            [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output if n])
        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return cls.prepare(model, device, **kwargs).run(dict(zip(names, values)))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return Device(device).type == DeviceType.CPU


prepare = EdgeRNNBackend.prepare
run_model = EdgeRNNBackend.run_model
run_node = EdgeRNNBackend.run_node
supports_device = EdgeRNNBackend.supports_device
