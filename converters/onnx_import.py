"""Whole ONNX graphs -> edgernn: ``from_onnx(path_or_ModelProto) -> Model`` and ``import_graph``.

Tested on graphs from both of torch's exporters and from tf2onnx (Keras models). A graph is read, not run.
The importer walks the nodes the outputs need, in graph order, and gives each value an abstract meaning: a
constant (folded with ONNX's reference evaluator), a shape vector or a uniform fill computed from the
input's shape (`onnx_values.Sym`, `onnx_values.Fill`), the data flowing from the graph input (`Flow`), or
a recurrent layer's final state (`State`). Every op on the data flow must be one edgernn can express, in
the order edgernn runs it:

    input normalisation (Sub/Div/Add/Mul by constants) -> LSTM | GRU | RNN nodes -> dense head
    (MatMul [+ Add], Gemm, Relu, Tanh, Sigmoid, Softmax over features, LeakyRelu, HardSigmoid, ...)

with the layout glue exporters put between them (Transpose, Squeeze, Unsqueeze, Reshape, Slice, Gather,
Concat, Identity, Dropout, Cast), which only relabels the axes a `Flow` carries: the two input axes
``X0``/``X1`` (time and batch, told apart by the first recurrent node's layout; ``X0*X1`` the two merged
for a 2-D MatMul), ``F`` features, ``D`` the two directions of a bidirectional node before the exporter
folds them into the features (or slices and concatenates them back), ``1`` unit axes. Anything else
raises `ConversionError` naming the operator and node: never a silently different model. The while-loops
tf2onnx writes for Keras's SimpleRNN and GRU(reset_after=False) are read as RNN and GRU nodes first
(`onnx_loops`); any other control flow is refused as such.

A head that reads only the last time step (``fc(out[:, -1])``) becomes the head applied at every step
(logged at INFO); `ImportedGraph.run` still returns only the last step, as the graph does.

The modules, one job each: `onnx_graph` (loading, constants), `onnx_values` (the abstract values and the
shape arithmetic on them), `onnx_unrolled` (the dynamo exporter's unrolled RNN folded into RNN nodes),
`onnx_loops` (Keras's while-loops folded into RNN and GRU nodes), `onnx_layout` (the layout glue),
`onnx_chain` (normalisation and dense head), `onnx_ops` (one recurrent operator -> one layer),
`onnx_imported` (running the imported graph); this one walks the graph.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from edgernn.errors import ConversionError
from edgernn.model import Model
from edgernn.rest_state import with_rest_state

from . import onnx_graph
from .onnx_chain import ACTIVATIONS, ChainBuilder
from .onnx_imported import ImportedGraph
from .onnx_layout import LayoutReader
from .onnx_loops import fold_keras_loops
from .onnx_ops import OPS, pack_initial_state, recurrent_node
from .onnx_unrolled import fold_unrolled_rnns
from .onnx_values import ARITHMETIC, INPUT_AXES, Fill, Flow, State, Sym, components

log = logging.getLogger(__name__)

PASS = {"Identity", "Dropout", "Cast"}
CONTROL_FLOW = {"Loop", "Scan", "If"}


def from_onnx(source, *, sample_rate=None) -> Model:
    """An ONNX file or ModelProto of a recurrent model (``torch.onnx.export``, tf2onnx from Keras) -> `Model`.

    Constant ``initial_h`` / ``initial_c`` inputs (a trained initial state) become the model's rest state,
    when every sequence of the batch starts from the same one. ``sample_rate`` (Hz) is stored in the spec.
    """
    imported = import_graph(source)
    model = imported.model
    rows = imported.initial_rows
    if rows is not None:
        if not (rows == rows[0]).all():
            raise ConversionError(f"{imported.label}: the graph starts its recurrent layers from a non-zero constant "
                                  f"state that differs between the {len(rows)} sequences of its batch; an edgernn "
                                  f"model has one rest state (use import_graph to run it as is)")
        model = with_rest_state(model, rows[0], "trained", "the graph's constant initial_h/initial_c")
    if sample_rate is not None:
        model = Model(dataclasses.replace(model.spec, sample_rate=sample_rate), model.weights)
    return model


def import_graph(source) -> ImportedGraph:
    """Read a whole graph -> `ImportedGraph` (``.model``, ``.run(feeds) -> outputs``)."""
    model, label = onnx_graph.load(source)
    return _Reader(model, label).read()


class _Reader(ChainBuilder, LayoutReader):
    """One pass over a graph: abstract values in ``env``, the model assembled as the flow passes."""

    def __init__(self, model, label):
        self.label, self.opset, graph = label, onnx_graph.opset_of(model), model.graph
        self.name = graph.name if label.startswith("graph ") else Path(label).stem
        self.constants = onnx_graph.constants_of(graph)
        nodes = [n for n in graph.node if n.op_type != "Constant"]
        self.nodes, extra = fold_unrolled_rnns(nodes, self.constants, [o.name for o in graph.output])
        self.constants.update(extra)
        self.nodes, extra, self.loops = fold_keras_loops(self.nodes, self.constants, [o.name for o in graph.output])
        self.constants.update(extra)
        self.outputs = [o.name for o in graph.output]
        self.env: dict = dict(self.constants)
        self.sizes: dict = {}
        self.input_sizes: dict = {}
        sequences = self._sequence_inputs()
        for value in graph.input:
            if value.name not in self.env:
                self.env[value.name] = self._input(value) if value.name in sequences else ("input", value.name)
        self.source = self.time = self.batch = None
        self.mean = self.std = None
        self.layers, self.weights, self.head, self.initial = [], {}, [], []
        self.version = 0
        self.node = None

    # ---- the walk ------------------------------------------------------------------------------
    def read(self) -> ImportedGraph:
        needed = set(self.outputs)
        for node in reversed(self.nodes):
            if any(out in needed for out in node.output):
                needed.update(name for name in node.input if name)
        walk = [node for node in self.nodes if any(out in needed for out in node.output)]
        for node in walk:  # before the walk: the glue feeding a loop would fail first, less clearly
            if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx"):
                self.node = node
                why = self.loops.get(node.output[0] if node.output else None)
                self.unsupported("control flow" + (f": not a Keras recurrent layer's while-loop edgernn reads "
                                                   f"({why})" if why else "") +
                                 "; edgernn reads ONNX's LSTM, GRU and RNN nodes, and the loops tf2onnx writes for "
                                 "Keras's SimpleRNN and GRU(reset_after=False), not masked or reversed ones")
        for node in walk:
            self.node = node
            self._read(node)
        return self._finish()

    def _sequence_inputs(self) -> set:
        """Names the first recurrent layer's X is computed from (a graph input among them is the sequence;
        another input, e.g. an initial state, is not read as one)."""
        producer = {out: node for node in self.nodes for out in node.output}
        names = [node.input[0] for node in self.nodes if node.op_type in OPS and node.input]
        seen = set()
        while names:
            name = names.pop()
            node = producer.get(name)
            if name in seen:
                continue
            seen.add(name)
            if node is not None and node.op_type not in OPS:
                names.extend(n for n in node.input if n)
        return seen

    def _input(self, value):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) != 3:
            return ("input", value.name)
        if dims[2] is None:
            raise ConversionError(f"{self.label}: input {value.name!r} has no fixed feature size (last axis)")
        self.input_sizes[value.name] = {label: dim for label, dim in zip(INPUT_AXES, dims) if dim is not None}
        return Flow(value.name, (("X0", "X0"), ("X1", "X1"), ("F", dims[2])), 0)

    def _read(self, node):
        values = [self._value(name) for name in node.input]
        outputs = [name for name in node.output]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.unsupported(f"from domain {node.domain!r}")
        if op in OPS:
            results = self._recurrent(node, values)
        elif all(v is None or isinstance(v, np.ndarray) for v in values):
            try:
                results = onnx_graph.fold_constant(node, values)
            except Exception as exc:  # the reference evaluator raises many kinds
                self.fail(f"could not evaluate {op} on constants ({type(exc).__name__}: {exc})")
        elif any(isinstance(v, Flow | State) for v in values):
            results = self._on_flow(node, op, values)
        elif any(isinstance(v, tuple) for v in values):
            name = next(v[1] for v in values if isinstance(v, tuple))
            self.fail(f"reads graph input {name!r}, which is not a (time, batch, features) sequence; edgernn "
                      f"imports graphs whose one input is the sequence (states start at the model's rest state)")
        else:
            results = [self.symbolic(op, values)]
        for name, value in zip(outputs, results):
            if name:
                self.env[name] = value

    def _value(self, name):
        if not name:
            return None
        if name not in self.env:
            self.fail(f"input {name!r} is produced by no node")
        return self.env[name]

    # ---- recurrent nodes -----------------------------------------------------------------------
    def _recurrent(self, node, values):
        X = values[0]
        if not isinstance(X, Flow):
            self.fail("X must be the input sequence or a recurrent layer's output")
        self._at_tip(X, "a recurrent layer")
        if self.head:
            self.fail("a recurrent layer after dense layers is not something edgernn models")
        if X.last:
            self.fail("X holds only the last time step of the layer below")
        self._check_state_widths(node, values)
        rn = recurrent_node(node, lambda n: self.env.get(n) if isinstance(self.env.get(n), np.ndarray) else None,
                            self.label)
        layer = rn.layer
        labels = [label for label, _ in X.axes] + [None] * 3
        time, batch = (labels[0], labels[1]) if rn.layout == 0 else (labels[1], labels[0])
        if len(X.axes) != 3 or labels[2] != "F" or {time, batch} != set(INPUT_AXES):
            self.fail(f"X must be (time, batch, features) for layout {rn.layout}, here its axes are {X.axes}")
        if X.axes[2][1] != layer.input_size:
            self.fail(f"X has {X.axes[2][1]} features, but W takes {layer.input_size}")
        if self.time is None:
            self.time, self.batch = time, batch
        elif (time, batch) != (self.time, self.batch):
            self.fail("this layer reads time along the axis the layer below used for the batch")
        if values[4:5] and values[4] is not None:
            self.fail("sequence_lens is not supported in whole graphs (every sequence runs to its end)")
        h0 = self._initial(values[5] if len(values) > 5 else None, "initial_h")
        c0 = self._initial(values[6] if len(values) > 6 else None, "initial_c")
        index = len(self.layers)
        self.layers.append(layer)
        self.initial.append((h0, c0, rn.layout))
        self.weights.update({f"layers.{index}.{k}": v for k, v in rn.weights.items()})
        self.version += 1
        D, Hp, H = layer.directions, layer.unit_output_size, layer.hidden_size
        d_axis = ("D", 2) if D == 2 else ("1", 1)
        y_axes = ((time, time), d_axis, (batch, batch), ("F", Hp)) if rn.layout == 0 else \
            ((batch, batch), (time, time), d_axis, ("F", Hp))

        def state(kind, width):
            axes = (("S", D), (batch, batch), ("F", width))
            return State(tuple((index, d, kind) for d in range(D)),
                         axes if rn.layout == 0 else (axes[1], axes[0], axes[2]), self.version)
        return [Flow(X.source, y_axes, self.version), state("h", Hp), state("c", H)]

    def _check_state_widths(self, node, values):
        """initial_h/initial_c must end in hidden_size. torch's dynamo exporter writes an LSTM with proj_size
        as an LSTM of hidden_size proj_size and a wider initial_c: a graph no runtime accepts."""
        hidden = self.attr("hidden_size")
        for index, what in ((5, "initial_h"), (6, "initial_c")):
            value = values[index] if len(values) > index else None
            shape = value.shape if isinstance(value, np.ndarray) else value.shape if isinstance(value, Fill) else None
            if hidden is not None and shape and isinstance(shape[-1], int) and shape[-1] != hidden:
                self.fail(f"{what} has {shape[-1]} features but hidden_size is {hidden}: the graph is "
                          f"inconsistent (torch's dynamo exporter writes this for an nn.LSTM with proj_size, "
                          f"which ONNX's LSTM cannot express; onnxruntime rejects it too)")

    def _initial(self, value, what):
        if value is None or (isinstance(value, Fill) and value.value == 0):
            return None
        if isinstance(value, np.ndarray):
            return None if not np.any(value) else value
        if isinstance(value, Flow | State):
            self.fail(f"{what} comes from the graph's data ({getattr(value, 'source', 'a state')}); edgernn "
                      f"starts every sequence from the model's rest state")
        if isinstance(value, tuple):
            self.fail(f"{what} comes from graph input {value[1]!r}; edgernn starts every sequence from the "
                      f"model's rest state")
        self.fail(f"{what} must be zeros or a constant, got {value!r}")

    # ---- the data flow -------------------------------------------------------------------------
    def _on_flow(self, node, op, values):
        x = next(v for v in values if isinstance(v, Flow | State))
        if op in PASS:
            if op == "Cast" and self.attr("to") not in (1, 10, 11):  # float, float16, double
                self.fail("casts the data to a non-float type")
            if op == "Dropout" and len(values) > 2 and values[2] is not None and bool(np.any(values[2])):
                self.fail("runs in training mode")
            return [x, Fill(1.0)]
        if op == "Shape":
            start, end = self.attr("start", 0), self.attr("end")
            return [Sym(tuple(size for _, size in x.axes)[start:end])]
        if op in ("Transpose", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Gather", "Concat", "Flatten"):
            if values[0] is not x and op != "Concat":
                self.unsupported("on a non-constant index or shape")
            return [getattr(self, "_" + op.lower())(x, values)]
        if isinstance(x, State):
            flow = self._state_as_flow(x)
            values = [flow if v is x else v for v in values]
        if op in ARITHMETIC:
            return [self._arithmetic(op, values)]
        if op == "MatMul":
            return [self._matmul(values)]
        if op == "Gemm":
            return [self._gemm(values)]
        if op in ACTIVATIONS:
            return [self._activation(op, values[0])]
        self.unsupported("on the data; edgernn reads input normalisation, LSTM/GRU/RNN nodes and a dense head")

    # ---- the result ----------------------------------------------------------------------------
    def _finish(self) -> ImportedGraph:
        self.node = None
        if not self.layers:
            raise ConversionError(f"{self.label}: no LSTM, GRU or RNN node reads the input; nothing to import")
        outputs = []
        for name in self.outputs:
            value = self.env.get(name)
            if isinstance(value, Flow):
                if value.half is not None or any(components(label) for label, _ in value.axes):
                    raise ConversionError(f"{self.label}: output {name!r} is one direction of a bidirectional "
                                          f"output or has time and batch merged into one axis {value.axes}; "
                                          f"edgernn writes (time, batch, features) outputs")
                if value.version != self.version:
                    raise ConversionError(f"{self.label}: output {name!r} is an intermediate value of the model "
                                          f"(edgernn computes one output: the end of the chain)")
                outputs.append(("flow", value.axes, value.last, None))
            elif isinstance(value, State):
                outputs.append(("state", value.axes, False, value.parts))
            else:
                raise ConversionError(f"{self.label}: output {name!r} does not come from the input sequence")
        last = [o for o in outputs if o[0] == "flow" and o[2]]
        if last:
            log.info("%s: the head reads only the last time step; the edgernn model applies it at every step "
                     "(its output at the last step is the graph's)", self.label)
        model = self._model()
        rows = None
        if any(h is not None or c is not None for h, c, _ in self.initial):
            batch = {np.shape(v)[1 if layout == 0 else 0] for h, c, layout in self.initial
                     for v in (h, c) if v is not None}
            if len(batch) != 1:
                raise ConversionError(f"{self.label}: constant initial states of different batch sizes")
            B = batch.pop()
            rows = np.concatenate([pack_initial_state(layer, h, c, B, layout)
                                   for layer, (h, c, layout) in zip(self.layers, self.initial)], axis=1)
        return ImportedGraph(model, self.label, self.source, self.time, self.batch, self.sizes, outputs, rows)
