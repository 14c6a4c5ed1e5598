"""Whole ONNX graphs -> edgernn: ``from_onnx(path_or_ModelProto) -> Model`` and ``import_graph``.

A graph is read, not run. The importer walks the nodes the outputs need, in graph order, and gives each
value an abstract meaning: a constant (folded with ONNX's reference evaluator), a shape vector or a
uniform fill computed from the input's shape (`onnx_graph.Sym`, `onnx_graph.Fill`), the data flowing
from the graph input (`Flow`), or a recurrent layer's final state (`State`). Every op on the data flow
must be one edgernn can express, in the order edgernn runs it:

    input normalisation (Sub/Div/Add/Mul by constants) -> LSTM | GRU | RNN nodes -> dense head
    (MatMul [+ Add], Gemm, Relu, Tanh, Sigmoid, Softmax over features, LeakyRelu, HardSigmoid, ...)

with the layout glue exporters put between them (Transpose, Squeeze, Unsqueeze, Reshape, Slice, Gather,
Identity, Dropout, Cast), which only relabels the axes a `Flow` carries: the two input axes ``X0``/``X1``
(time and batch, told apart by the first recurrent node's layout), ``F`` features, ``D`` the two
directions of a bidirectional node before the exporter folds them into the features, ``1`` unit axes.
Anything else raises `ConversionError` naming the operator and node: never a silently different model.

A head that reads only the last time step (``fc(out[:, -1])``) becomes the head applied at every step
(logged at INFO); `ImportedGraph.run` still returns only the last step, as the graph does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgernn.errors import ConversionError, InputError, SpecError
from edgernn.model import Model
from edgernn.spec import DenseLayer, ModelSpec

from . import onnx_graph
from .onnx_graph import ARITHMETIC, BIG, Fill, NodeReader, Sym
from .onnx_ops import OPS, pack_initial_state, recurrent_node

log = logging.getLogger(__name__)

INPUT_AXES = ("X0", "X1")
PASS = {"Identity", "Dropout", "Cast"}
ACTIVATIONS = {
    # ONNX op -> (edgernn activation, ONNX attribute defaults (alpha, beta) or None)
    "Relu": ("relu", None), "Tanh": ("tanh", None), "Sigmoid": ("sigmoid", None),
    "LeakyRelu": ("leaky_relu", (0.01, None)), "HardSigmoid": ("hard_sigmoid", (0.2, 0.5)),
    "Elu": ("elu", (1.0, None)), "ThresholdedRelu": ("thresholded_relu", (1.0, None)),
    "Softsign": ("softsign", None), "Softplus": ("softplus", None), "Softmax": ("softmax", None),
}


@dataclass(frozen=True)
class Flow:
    """Data computed from graph input ``source``: ``axes`` ((label, size), ...) as described above;
    ``version`` the model-building step it was computed at; ``last`` when time was cut to its last step."""

    source: str
    axes: tuple
    version: int
    last: bool = False


@dataclass(frozen=True)
class State:
    """Final recurrent states stacked on the ``S`` axis: ``parts`` ((layer, direction, "h"|"c"), ...)."""

    parts: tuple
    axes: tuple
    version: int


def from_onnx(source) -> Model:
    """An ONNX file or ModelProto of a recurrent model, as ``torch.onnx.export`` writes them -> `Model`."""
    imported = import_graph(source)
    if imported.initial_rows is not None:
        raise ConversionError(f"{imported.label}: the graph starts its recurrent layers from a non-zero constant "
                              f"state; an edgernn model starts from zeros (use import_graph to run it as is)")
    return imported.model


def import_graph(source) -> ImportedGraph:
    """Read a whole graph -> `ImportedGraph` (``.model``, ``.run(feeds) -> outputs``)."""
    model, label = onnx_graph.load(source)
    return _Reader(model, label).read()


class ImportedGraph:
    """The edgernn `Model` of a graph, and ``run(feeds)`` computing the graph's outputs with it."""

    def __init__(self, model, label, source, time, batch, sizes, outputs, initial_rows):
        self.model, self.label, self.input_name = model, label, source
        self._time, self._batch, self._sizes = time, batch, sizes
        self._outputs = outputs
        self.initial_rows = initial_rows
        """(B, state_size) constant starting rows the graph holds, or None for the model's rest state."""

    def run(self, feeds: dict) -> list[np.ndarray]:
        """``feeds[input name]`` (time and batch axes as the graph has them) -> every graph output, in order.
        Each batch element runs through `Model.run` with its own state row."""
        if self.input_name not in feeds:
            raise InputError(f"{self.label}: feed {self.input_name!r} missing (got {', '.join(map(repr, feeds))})")
        x = np.asarray(feeds[self.input_name])
        if x.ndim != 3:
            raise InputError(f"{self.input_name}: expected 3 dimensions, got shape {x.shape}")
        for axis, label in enumerate(INPUT_AXES + ("F",)):
            want = self._sizes.get(label)
            if want is not None and x.shape[axis] != want:
                raise InputError(f"{self.input_name}: axis {axis} must be {want} in this graph, got shape {x.shape}")
        xs = np.ascontiguousarray(np.moveaxis(x, (INPUT_AXES.index(self._time), INPUT_AXES.index(self._batch)),
                                              (0, 1)), np.float32)
        T, B = xs.shape[:2]
        if self.initial_rows is not None and len(self.initial_rows) != B:
            raise InputError(f"{self.input_name}: the graph's constant initial state is for batch "
                             f"{len(self.initial_rows)}, got batch {B}")
        rows = self.model.new_state(batch=B)
        if self.initial_rows is not None:
            rows[:] = self.initial_rows
        ys = np.empty((T, B, self.model.output_size), np.float32)
        for b in range(B):
            ys[:, b] = self.model.run(xs[:, b], rows[b])
        return [self._flow_output(ys, axes, last) if kind == "flow" else self._state_output(rows, axes, parts)
                for kind, axes, last, parts in self._outputs]

    def _flow_output(self, ys, axes, last):
        names = [self._time, self._batch, "F"]
        if any(label == "D" for label, _ in axes):
            ys, names = ys.reshape(ys.shape[0], ys.shape[1], 2, -1), [self._time, self._batch, "D", "F"]
        if last:
            ys, names = ys[-1], names[1:]
        return _arrange(ys, names, axes)

    def _state_output(self, rows, axes, parts):
        offsets = _state_offsets(self.model.spec)
        pieces = [rows[:, offsets[part][0]:offsets[part][1]] for part in parts]
        return _arrange(np.stack(pieces, axis=1), [self._batch, "S", "F"], axes)


def _arrange(array, names, axes):
    """``array`` with axes ``names`` -> the layout ``axes`` asks for (units inserted, an S of 1 dropped)."""
    if "S" in names and not any(label == "S" for label, _ in axes):
        array, names = array[:, 0], [n for n in names if n != "S"]
    order = [names.index(label) for label, _ in axes if label != "1"]
    array = array.transpose(order)
    shape, it = [], iter(array.shape)
    for label, _ in axes:
        shape.append(1 if label == "1" else next(it))
    return np.ascontiguousarray(array.reshape(shape), np.float32)


def _state_offsets(spec) -> dict:
    """(layer, direction, "h"|"c") -> (start, end) in a state row (see `edgernn.spec`)."""
    offsets, at = {}, 0
    for index, layer in enumerate(spec.layers):
        for d in range(layer.directions):
            offsets[(index, d, "h")] = (at, at + layer.unit_output_size)
            at += layer.unit_output_size
            if layer.cell == "lstm":
                offsets[(index, d, "c")] = (at, at + layer.hidden_size)
                at += layer.hidden_size
    return offsets


class _Reader(NodeReader):
    """One pass over a graph: abstract values in ``env``, the model assembled as the flow passes."""

    def __init__(self, model, label):
        self.label, self.opset, graph = label, onnx_graph.opset_of(model), model.graph
        self.name = graph.name if label.startswith("graph ") else Path(label).stem
        self.constants = onnx_graph.constants_of(graph)
        nodes = [n for n in graph.node if n.op_type != "Constant"]
        self.nodes, extra = onnx_graph.fold_unrolled_rnns(nodes, self.constants, [o.name for o in graph.output])
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
        for node in self.nodes:
            if any(out in needed for out in node.output):
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
        self.unsupported(f"on the data; edgernn reads input normalisation, LSTM/GRU/RNN nodes and a dense head")

    def _with(self, x, axes, **changes):
        return replace(x, axes=tuple(axes), **changes)

    def _transpose(self, x, values):
        perm = self.attr("perm", list(range(len(x.axes)))[::-1])
        return self._with(x, [x.axes[p] for p in perm])

    def _squeeze(self, x, values):
        axes = self.axes_arg(values, 1, len(x.axes))
        if axes is None:
            self.fail("squeezes without axes (which depends on the run-time batch size)")
        for a in axes:
            if x.axes[a][1] != 1:
                self.fail(f"squeezes axis {a} ({x.axes[a][0]}), which is not of size 1")
        return self._with(x, [ax for i, ax in enumerate(x.axes) if i not in axes])

    def _unsqueeze(self, x, values):
        rank = len(x.axes) + len(self.axes_arg(values, 1, 0))
        positions = sorted(self.axes_arg(values, 1, rank))
        axes = list(x.axes)
        for a in positions:
            axes.insert(a, ("1", 1))
        return self._with(x, axes)

    def _flatten(self, x, values):
        axis = self.attr("axis", 1)
        axis = axis + len(x.axes) if axis < 0 else axis
        return self._with(x, [self._merge(x.axes[:axis], x.axes, "Flatten"),
                              self._merge(x.axes[axis:], x.axes, "Flatten")])

    def _concat(self, x, values):
        if not all(isinstance(v, State) for v in values):
            self.unsupported("joining the data with something else")
        axis = self.attr("axis")
        axis = axis + len(x.axes) if axis < 0 else axis
        rest = [[ax for i, ax in enumerate(v.axes) if i != axis] for v in values]
        if any(r != rest[0] for r in rest) or any(v.axes[axis][0] not in ("S", "1") for v in values):
            self.unsupported("of states along an axis other than their stacking axis")
        parts = tuple(p for v in values for p in v.parts)
        axes = list(x.axes)
        axes[axis] = ("S", len(parts))
        return State(parts, tuple(axes), max(v.version for v in values))

    def _gather(self, x, values):
        index = values[1]
        if not isinstance(index, np.ndarray) or index.size != 1:
            self.unsupported("with an index that is not one constant")
        axis = self.attr("axis", 0)
        axis = axis + len(x.axes) if axis < 0 else axis
        i, keep = int(index.ravel()[0]), index.ndim > 0
        return self._take(x, axis, i, i + 1 if i != -1 else BIG, keep)

    def _slice(self, x, values):
        starts, ends = self.ints(values[1], "starts"), self.ints(values[2], "ends")
        axes = self.axes_arg(values, 3, len(x.axes)) or list(range(len(starts)))
        steps = self.ints(values[4], "steps") if len(values) > 4 and values[4] is not None else [1] * len(starts)
        for axis, start, end, step in zip(axes, starts, ends, steps):
            if step != 1:
                self.fail(f"steps by {step} along axis {axis} ({x.axes[axis][0]}): only step 1 is supported")
            x = self._take(x, axis, start, end, True)
        return x

    def _take(self, x, axis, start, end, keep):
        """Elements [start, end) of ``axis``; ``keep`` False drops the axis (one element, as Gather does)."""
        label, size = x.axes[axis]
        if isinstance(end, str):
            end = BIG if end == size else None
        if not isinstance(start, int) or not isinstance(end, int):
            self.fail(f"takes a part of axis {axis} ({label}) computed at run time")
        if isinstance(x, State) and label == "S":
            s, e = slice(start, end).indices(len(x.parts))[:2]
            axes = list(x.axes)
            axes[axis] = ("S", max(0, e - s))
            return State(x.parts[s:e], tuple(axes) if keep else tuple(axes[:axis] + axes[axis + 1:]), x.version)
        known = self.sizes.get(size, size) if isinstance(size, str) else size
        if isinstance(known, int):
            s, e = slice(start, end).indices(known)[:2]
            whole, last = e - s >= known, e - s == 1 and e == known
        else:
            whole, last = start == 0 and end >= BIG, start == -1 and end >= BIG
        if whole and (keep or known == 1):
            return self._with(x, x.axes if keep else x.axes[:axis] + x.axes[axis + 1:])
        if not (last and isinstance(x, Flow) and label == self.time):
            self.fail(f"takes elements [{start}:{end}] of axis {axis} ({label}); edgernn reads whole sequences, "
                      f"all features, or the last time step")
        axes = list(x.axes)
        axes[axis] = ("1", 1)
        return replace(x, axes=tuple(axes) if keep else tuple(axes[:axis] + axes[axis + 1:]), last=True)

    def _reshape(self, x, values):
        target = self.ints(values[1], "shape")
        allowzero = self.attr("allowzero", 0)
        axes = list(x.axes)
        entries = []
        for i, e in enumerate(target):
            if e == 0 and not allowzero:
                if i >= len(axes):
                    self.fail(f"copies axis {i} of a {len(axes)}-axis value")
                e = axes[i][1]
            elif isinstance(e, str) and e not in INPUT_AXES:
                self.fail("reshapes to a shape computed at run time")
            entries.append(e)
        if entries.count(-1) > 1:
            self.fail("has more than one -1 in its shape")
        k = entries.index(-1) if -1 in entries else None
        left, right = (entries, []) if k is None else (entries[:k], entries[k + 1:])
        out_left, i = self._match(axes, left)
        out_right, j = self._match(axes[i:][::-1], right[::-1])
        out_right = [group[::-1] for group in out_right[::-1]]
        middle = axes[i:len(axes) - j]
        if k is None and any(size != 1 for _, size in middle):
            self.fail(f"reshapes {x.axes} to {target}")
        groups = out_left + ([middle] if k is not None else []) + out_right
        return self._with(x, [self._merge(group, x.axes, target) for group in groups])

    def _match(self, axes, entries):
        """Input axes grouped onto ``entries`` from the front -> (groups, axes consumed)."""
        groups, i = [], 0
        for e in entries:
            if e == 1:
                if i < len(axes) and axes[i][1] == 1:
                    groups.append([axes[i]])
                    i += 1
                else:
                    groups.append([])
                continue
            while i < len(axes) and axes[i][1] == 1 and axes[i][0] != e:
                i += 1
            if i >= len(axes):
                self.fail(f"reshapes to {entries}, which does not fit the value's axes")
            label, size = axes[i]
            if isinstance(e, str) or isinstance(size, str):
                want = self.sizes.get(e, e) if isinstance(e, str) else e
                have = self.sizes.get(size, size) if isinstance(size, str) else size
                if isinstance(e, int) and isinstance(have, str):
                    self.sizes[size] = e  # the exporter baked this size in: the graph only runs with it
                    log.info("%s: node %r reshapes with input axis %s fixed at %d: the graph only runs with "
                             "that size (import_graph(...).run checks it); the edgernn model takes any",
                             self.label, self.node.name, size, e)
                elif e != size and not (isinstance(want, int) and want == have):
                    self.fail(f"reshapes axis {label} to {e}")
                groups.append([axes[i]])
                i += 1
                continue
            group, product = [], 1
            while product < e and i < len(axes) and isinstance(axes[i][1], int):
                group.append(axes[i])
                product *= axes[i][1]
                i += 1
            if product != e:
                self.fail(f"reshapes to {entries}, which splits an axis")
            groups.append(group)
        return groups, i

    def _merge(self, group, before, target):
        real = [ax for ax in group if ax[1] != 1]
        if not real:
            return ("1", 1)
        if len(real) == 1:
            return real[0]
        if [label for label, _ in real] == ["D", "F"]:
            return ("F", 2 * real[1][1])  # bidirectional: forward's features, then reverse's
        self.fail(f"reshapes {before} to {target}, merging axes {[label for label, _ in real]}")

    def _state_as_flow(self, x: State):
        """A head reading ``h_n[-1]`` of a forward top layer reads the output's last step."""
        top = len(self.layers) - 1
        if x.parts != ((top, 0, "h"),) or self.layers[top].direction != "forward" or \
                any(label == "S" for label, _ in x.axes):
            self.fail(f"computes on recurrent state {x.parts} (only a forward top layer's final h, which equals "
                      f"its last output step, can feed the head)")
        return Flow(self.source, x.axes, x.version, last=True)

    # ---- model-building ops --------------------------------------------------------------------
    def _at_tip(self, x: Flow, what: str):
        if self.source is None:
            self.source = x.source
            self.sizes.update(self.input_sizes.get(x.source, {}))
        elif x.source != self.source:
            self.fail(f"reads graph input {x.source!r}; the model already reads {self.source!r}")
        if x.version != self.version:
            self.fail(f"{what} here would branch the model: this value is from an earlier stage than the "
                      f"model built so far (a residual, a skip or a second head?)")

    def _features(self, x: Flow, c: np.ndarray, what: str) -> np.ndarray:
        """Constant ``c`` broadcast against ``x`` varying along the features only -> (F,) float64."""
        f_axis = next((i for i, (label, _) in enumerate(x.axes) if label == "F"), None)
        if f_axis is None or any(label == "D" for label, _ in x.axes):
            self.fail(f"{what} on a value whose features are not one axis {x.axes}")
        c = np.asarray(c, np.float64)
        extra = c.ndim - len(x.axes)
        if extra > 0 and any(d != 1 for d in c.shape[:extra]):
            self.fail(f"{what}: constant of shape {c.shape} adds axes to the data")
        shape = (1,) * max(0, -extra) + c.shape[max(0, extra):]
        for i, d in enumerate(shape):
            if d != 1 and (i != f_axis or d != x.axes[f_axis][1]):
                self.fail(f"{what}: constant of shape {c.shape} varies along axis {i} ({x.axes[i][0]}), "
                          f"not only the features")
        return np.broadcast_to(c.reshape(-1), (x.axes[f_axis][1],)).copy() if c.size > 1 else \
            np.full(x.axes[f_axis][1], float(c.reshape(-1)[0]) if c.size else 0.0)

    def _arithmetic(self, op, values):
        flows = [v for v in values if isinstance(v, Flow | State)]
        if len(flows) != 1 or not all(isinstance(v, Flow | np.ndarray) for v in values):
            self.unsupported("between two computed values" if len(flows) > 1 else "with a run-time operand")
        x = next(v for v in values if isinstance(v, Flow))
        first = values[0] is x
        c = values[1] if first else values[0]
        if op in ("Sub", "Div") and not first:
            self.unsupported(f"with the data as its second operand")
        vector = self._features(x, c, op)
        extra = max(0, np.ndim(c) - len(x.axes))
        x = self._with(x, (("1", 1),) * extra + x.axes)
        self._at_tip(x, op)
        if not self.layers:  # input normalisation: x' = (x - mean) / std
            if self.mean is None:
                self.mean, self.std = np.zeros_like(vector), np.ones_like(vector)
            if op == "Sub":
                self.mean = self.mean + vector * self.std
            elif op == "Add":
                self.mean = self.mean - vector * self.std
            elif op == "Div":
                self.std = self.std * vector
            else:
                self.std = self.std / vector
        else:
            dense = self._open_dense(x)
            if op in ("Add", "Sub"):
                dense[1] = (0 if dense[1] is None else dense[1]) + (vector if op == "Add" else -vector)
            else:
                scale = vector if op == "Mul" else 1.0 / vector
                dense[0] = dense[0] * scale[:, None]
                dense[1] = None if dense[1] is None else dense[1] * scale
        return self._advance(x)

    def _open_dense(self, x: Flow) -> list:
        """The last dense layer when it has no activation yet, else a new identity one (exact: 1*x + 0)."""
        if self.head and self.head[-1][2] is None:
            return self.head[-1]
        width = x.axes[-1][1]
        self.head.append([np.eye(width), None, None])
        return self.head[-1]

    def _advance(self, x: Flow) -> Flow:
        self.version += 1
        return replace(x, version=self.version)

    def _head_input(self, x, what):
        if not isinstance(x, Flow):
            self.fail(f"{what} takes the data as its first operand")
        self._at_tip(x, what)
        if not self.layers:
            self.fail(f"{what} before the recurrent layers is not something edgernn models")
        if x.axes[-1][0] != "F" or any(label == "D" for label, _ in x.axes):
            self.fail(f"{what} on a value whose last axis is not the features {x.axes}")
        return x

    def _matmul(self, values):
        x, W = values
        if isinstance(W, Flow | State) or not isinstance(W, np.ndarray):
            self.unsupported("between two computed values" if isinstance(W, Flow | State) else "")
        x = self._head_input(x, "MatMul")
        if W.ndim != 2 or W.shape[0] != x.axes[-1][1]:
            self.fail(f"multiplies {x.axes[-1][1]} features by a constant of shape {W.shape}")
        self.head.append([np.asarray(W, np.float64).T, None, None])
        return self._advance(self._with(x, x.axes[:-1] + (("F", W.shape[1]),)))

    def _gemm(self, values):
        x, B = values[0], values[1]
        C = values[2] if len(values) > 2 else None
        if not isinstance(B, np.ndarray) or not (C is None or isinstance(C, np.ndarray)):
            self.unsupported("with a computed weight")
        x = self._head_input(x, "Gemm")
        if self.attr("transA", 0) or len(x.axes) != 2:
            self.fail("Gemm must read a (batch, features) value untransposed")
        alpha, beta = self.attr("alpha", 1.0), self.attr("beta", 1.0)
        W = alpha * np.asarray(B, np.float64)
        W = W if self.attr("transB", 0) else W.T
        if W.shape[1] != x.axes[-1][1]:
            self.fail(f"multiplies {x.axes[-1][1]} features by a weight of shape {B.shape}")
        out = self._with(x, x.axes[:-1] + (("F", W.shape[0]),))
        b = None if C is None else self._features(out, beta * np.asarray(C, np.float64), "Gemm bias")
        self.head.append([W, b, None])
        return self._advance(out)

    def _activation(self, op, x):
        x = self._head_input(x, op)
        name, defaults = ACTIVATIONS[op]
        alpha = beta = None
        if defaults:
            alpha = self.attr("alpha", defaults[0])
            beta = self.attr("beta", defaults[1]) if defaults[1] is not None else None
        if op == "Softmax":
            axis = self.attr("axis", -1 if self.opset >= 13 else 1)
            if (axis + len(x.axes) if axis < 0 else axis) != len(x.axes) - 1:
                self.fail(f"Softmax over axis {axis}, not the features (the last axis)")
        dense = self._open_dense(x)
        dense[2] = (name, alpha, beta)
        return self._advance(x)

    # ---- the result ----------------------------------------------------------------------------
    def _finish(self) -> ImportedGraph:
        self.node = None
        if not self.layers:
            raise ConversionError(f"{self.label}: no LSTM, GRU or RNN node reads the input; nothing to import")
        outputs = []
        for name in self.outputs:
            value = self.env.get(name)
            if isinstance(value, Flow):
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

    def _model(self) -> Model:
        weights = dict(self.weights)
        dense = []
        for j, (W, b, act) in enumerate(self.head):
            name, alpha, beta = act if act is not None else ("identity", None, None)
            dense.append(DenseLayer(W.shape[1], W.shape[0], bias=b is not None,
                                    activation={"name": name, "alpha": alpha, "beta": beta}))
            weights[f"head.{j}.W"] = W.astype(np.float32)
            if b is not None:
                weights[f"head.{j}.b"] = np.asarray(b, np.float32)
        if self.mean is not None:
            if not (self.std > 0).all():
                raise ConversionError(f"{self.label}: the input normalisation divides by a non-positive scale")
            weights["input.mean"], weights["input.std"] = self.mean.astype(np.float32), self.std.astype(np.float32)
        try:
            spec = ModelSpec(self.layers[0].input_size, tuple(self.layers), tuple(dense),
                             normalize=self.mean is not None, name=self.name)
            return Model(spec, weights)
        except SpecError as exc:
            raise ConversionError(f"{self.label}: the graph reads as an invalid edgernn model ({exc})") from None
