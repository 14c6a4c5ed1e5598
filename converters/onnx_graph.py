"""Graph plumbing for the whole-graph ONNX importer (`edgernn.converters.onnx_import`): reading a model
and its constants.

- `load`: a path or ModelProto -> a ModelProto with local functions inlined (the dynamo exporter may emit
  functions), every read problem a `FormatError` naming the file.
- `constants_of`, `fold_constant`: initializers and Constant nodes by name, and a node on constants
  evaluated with ONNX's reference evaluator.
- `GraphIndex`, `is_zero`: producer/consumer indexes over a node list and the structural questions the
  graph rewrites (`onnx_unrolled`, `onnx_loops`) ask before the importer reads the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgernn.errors import ConversionError, FormatError

log = logging.getLogger(__name__)

BIG = 2 ** 31 - 1
"""Slice ends at or past this mean "to the end" (exporters write INT64_MAX or INT32_MAX)."""


def load(source):
    """(ModelProto with local functions inlined, a label for messages: the file name or the graph name)."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(source, onnx.ModelProto):
        model, label = source, f"graph {source.graph.name!r}"
    elif isinstance(source, str | Path):
        path = Path(source)
        try:
            model = onnx.load(str(path))
        except FileNotFoundError:
            raise FormatError(path, "no such file") from None
        except (DecodeError, ValueError, RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise FormatError(path, f"not an ONNX model onnx can read ({type(exc).__name__}: {first})") from None
        label = str(path)
        if not model.graph.node or not model.graph.output:
            # A truncated protobuf often still parses, as a model missing its tail.
            raise FormatError(path, "not an ONNX model: no graph nodes or outputs (truncated or not an .onnx file?)")
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise FormatError(path, f"not a valid ONNX model ({str(exc).strip().splitlines()[0]})") from None
    else:
        raise ConversionError(f"from_onnx takes a path or an onnx.ModelProto, got {type(source).__name__}")
    if model.functions:
        log.debug("%s: inlining %d local function(s)", label, len(model.functions))
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    return model, label


def opset_of(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def constants_of(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values, by name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values


def constant_node_value(node):
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(value)
        if attr.name in ("value_float", "value_floats"):
            return np.array(value, np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(value, np.int64)
    return None


def uniform_value(array: np.ndarray):
    """The one value every element of ``array`` holds, or None."""
    flat = np.asarray(array).ravel()
    if flat.size and flat.dtype.kind in "fiub" and np.all(flat == flat[0]):
        return float(flat[0])
    return None


def fold_constant(node, values: list):
    """Evaluate a node whose inputs are all constants (None for an omitted input) with ONNX's reference."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.input, values) if name}
    outputs = ReferenceEvaluator(node).run(None, feeds)
    return [np.asarray(value) for value in outputs]


class GraphIndex:
    """Producer and consumer indexes over a node list."""

    def __init__(self, nodes, constants, outputs):
        self.nodes, self.constants, self.outputs = nodes, constants, set(outputs)
        self.producer = {out: node for node in nodes for out in node.output if out}
        self.consumers: dict[str, list] = {}
        for node in nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def node(self, name, *ops):
        node = self.producer.get(name)
        return node if node is not None and node.op_type in ops and node.domain in ("", "ai.onnx") else None

    def const(self, name):
        return self.constants.get(name) if name else None

    def ints(self, name):
        value = self.const(name)
        return None if value is None or value.dtype.kind not in "iu" else [int(v) for v in np.ravel(value)]

    def attr(self, node, name, default=None):
        from onnx import helper
        for attr in node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def affine(self, name):
        """``name`` = MatMul(S, Wt) [+ b] with constant Wt (I, H) -> (S, Wt, b, nodes) or None."""
        add, b = self.node(name, "Add"), None
        if add is not None:
            for first, second in ((0, 1), (1, 0)):
                if self.const(add.input[second]) is not None and self.node(add.input[first], "MatMul"):
                    name, b = add.input[first], self.const(add.input[second])
                    break
            else:
                return None
        matmul = self.node(name, "MatMul")
        if matmul is None or self.const(matmul.input[1]) is None or self.const(matmul.input[1]).ndim != 2:
            return None
        nodes = [matmul] + ([add] if add is not None else [])
        return matmul.input[0], self.const(matmul.input[1]), b, nodes


def is_zero(g: GraphIndex, name, depth=0) -> bool:
    """Whether ``name`` is all zeros whatever the input: a zero constant, or zeros of a run-time shape
    (ConstantOfShape, Expand of a zero) passed through layout ops."""
    value = g.const(name)
    if value is not None:
        return value.size > 0 and not np.any(value)
    node = g.producer.get(name)
    if node is None or depth > 16:
        return False
    if node.op_type == "ConstantOfShape":
        from onnx import numpy_helper
        fill = g.attr(node, "value")
        return fill is None or not np.any(numpy_helper.to_array(fill))
    if node.op_type in ("Expand", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Identity", "Gather",
                        "Cast"):
        return is_zero(g, node.input[0], depth + 1)
    return False
