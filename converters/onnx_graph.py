"""Graph plumbing for the whole-graph ONNX importer (`edgernn.converters.onnx_import`).

Three jobs, kept apart from the op-by-op reading of the graph:

- `load`: a path or ModelProto -> a ModelProto with local functions inlined (the dynamo exporter may emit
  functions), every read problem a `FormatError` naming the file.
- `Sym` / `Fill` and `NodeReader`: the two abstract values the importer needs besides constants and the
  data flow, and the node-reading helpers (attributes, errors naming the node, shape arithmetic).
  Exporters compute shapes from the input at run time (``Shape -> Gather -> Concat``) to build zero
  initial states and reshape targets; a `Sym` is such a 1-D int vector whose entries are ints or the
  name of an input axis (``"X0"``, ``"X1"``), a `Fill` a tensor of unknown shape holding one value
  everywhere (``ConstantOfShape``, ``Expand`` of a scalar). Neither depends on the data, so the
  importer can still tell "zeros from the batch size" from "a real input" without running anything.
- `fold_unrolled_rnns`: the dynamo exporter writes ``nn.RNN`` (not LSTM or GRU) as one MatMul/Add/Tanh
  group per time step. This rewrites each such chain back into the ONNX ``RNN`` node it computes (two
  chains concatenated on the features, one reading the time-reversed input, become one bidirectional
  node), so the importer only ever reads recurrent operators.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Sym:
    """A shape vector (or scalar, ``scalar=True``) computed from the input's shape: ints and axis names."""

    entries: tuple
    scalar: bool = False


@dataclass(frozen=True)
class Fill:
    """A tensor of data-independent shape whose every element is ``value`` (zeros for a rest state);
    ``shape`` its entries as in `Sym` (None where not followed), to check a state's width."""

    value: float
    shape: tuple | None = None


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


ARITHMETIC = {"Add", "Sub", "Mul", "Div"}


class NodeReader:
    """Reading one node at a time (``self.node``): its attributes and integer inputs, errors that name it,
    and the shape arithmetic exporters do on `Sym` and `Fill` values. The importer's reader extends it."""

    label = ""
    node = None

    def where(self) -> str:
        node = self.node
        return f"node {node.name!r}" if node.name else f"the node computing {node.output[0]!r}"

    def fail(self, problem: str):
        """ConversionError: "<file>: <Op> node '<name>': <problem>"."""
        raise ConversionError(f"{self.label}: {self.node.op_type} {self.where()}: {problem}")

    def unsupported(self, what: str = ""):
        """ConversionError: "<file>: unsupported operator <Op> in node '<name>' (<what>)"."""
        raise ConversionError(f"{self.label}: unsupported operator {self.node.op_type} in {self.where()}"
                              + (f" ({what})" if what else ""))

    def attr(self, name, default=None):
        from onnx import helper
        for attr in self.node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def ints(self, value, what):
        if isinstance(value, Sym):
            return list(value.entries)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
            self.fail(f"{what} must be constant integers")
        return [int(v) for v in np.ravel(value)]

    def axes_arg(self, values, index, rank, name="axes"):
        """Axes from input ``index`` (opset 13+) or the ``axes`` attribute, normalised to >= 0."""
        raw = self.ints(values[index], name) if len(values) > index and values[index] is not None else \
            self.attr(name)
        return None if raw is None else [a + rank if a < 0 else a for a in raw]

    # ---- shape arithmetic ----------------------------------------------------------------------
    def symbolic(self, op, values):
        """A node on `Sym` / `Fill` values (and constants) -> its one `Sym` or `Fill` result."""
        fill = values[0] if isinstance(values[0], Fill) else None
        if op == "ConstantOfShape":
            value = self.attr("value")
            from onnx import numpy_helper
            return Fill(float(numpy_helper.to_array(value).ravel()[0]) if value is not None else 0.0,
                        values[0].entries if isinstance(values[0], Sym) else None)
        if op == "Expand" and isinstance(values[0], np.ndarray) and uniform_value(values[0]) is not None:
            shape = values[1].entries if isinstance(values[1], Sym) and values[0].ndim <= len(values[1].entries) \
                else None
            return Fill(uniform_value(values[0]), shape)
        if fill is not None and op in ("Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Cast",
                                       "Identity", "Expand", "Tile"):
            return Fill(fill.value, self._fill_shape(op, fill.shape, values))
        if op == "Concat" and all(isinstance(v, Fill) or (isinstance(v, np.ndarray) and v.size and
                                                           uniform_value(v) is not None) for v in values):
            found = {v.value if isinstance(v, Fill) else uniform_value(v) for v in values}
            if len(found) == 1:
                return Fill(found.pop())
        sym = values[0]
        if not isinstance(sym, Sym) and op not in ("Concat", *ARITHMETIC):
            self.unsupported("on values computed from the input's shape")
        if op in ("Identity", "Cast"):
            return sym
        if op == "Gather":
            index = np.asarray(values[1])
            picked = tuple(sym.entries[int(i)] for i in index.ravel())
            return Sym(picked, scalar=index.ndim == 0)
        if op == "Slice":
            s, e = self.ints(values[1], "starts")[0], self.ints(values[2], "ends")[0]
            return Sym(sym.entries[s:e])
        if op == "Unsqueeze" and sym.scalar:
            return Sym(sym.entries)
        if op == "Squeeze" and len(sym.entries) == 1:
            return Sym(sym.entries, scalar=True)
        if op == "Reshape" and len(self.ints(values[1], "shape")) == 1:
            return Sym(sym.entries)
        if op == "Concat":
            return Sym(tuple(e for v in values for e in (v.entries if isinstance(v, Sym) else
                                                          [int(i) for i in np.ravel(v)])))
        if op in ARITHMETIC:
            return self._sym_arithmetic(op, values)
        self.unsupported("on values computed from the input's shape")

    def _fill_shape(self, op, shape, values):
        """The shape of a layout op's result on a `Fill` of ``shape``, where cheap to follow; else None."""
        if shape is None or op in ("Reshape", "Expand", "Tile"):
            return None
        rank = len(shape)
        if op in ("Cast", "Identity"):
            return shape
        if op == "Transpose":
            return tuple(shape[p] for p in self.attr("perm", list(range(rank))[::-1]))
        if op == "Squeeze":
            axes = self.axes_arg(values, 1, rank)
            return None if axes is None else tuple(d for i, d in enumerate(shape) if i not in axes)
        if op == "Unsqueeze":
            out = list(shape)
            for a in sorted(self.axes_arg(values, 1, rank + len(self.axes_arg(values, 1, 0)))):
                out.insert(a, 1)
            return tuple(out)
        if op == "Slice" and all(isinstance(v, np.ndarray) for v in values[1:] if v is not None):
            out = list(shape)
            starts, ends = self.ints(values[1], "starts"), self.ints(values[2], "ends")
            axes = self.axes_arg(values, 3, rank) or list(range(len(starts)))
            for axis, start, end in zip(axes, starts, ends):
                size = out[axis]
                out[axis] = len(range(*slice(start, end).indices(size))) if isinstance(size, int) else \
                    size if start == 0 and end >= BIG else "?"
            return tuple(out)
        return None

    def _sym_arithmetic(self, op, values):
        a, b = ([e for e in v.entries] if isinstance(v, Sym) else [int(i) for i in np.ravel(v)] for v in values)
        if len(a) != len(b):
            a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))
        neutral = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}[op]
        out = []
        for x, y in zip(a, b):
            if isinstance(x, int) and isinstance(y, int):
                out.append({"Add": x + y, "Sub": x - y, "Mul": x * y, "Div": x // y if y else 0}[op])
            elif y == neutral or (op in ("Add", "Mul") and x == neutral):
                out.append(x if y == neutral else y)
            else:
                out.append(f"?{op}")
        scalar = all(v.scalar if isinstance(v, Sym) else np.ndim(v) == 0 for v in values)
        return Sym(tuple(out), scalar=scalar)


# ---- the dynamo exporter's unrolled nn.RNN -------------------------------------------------------------

_ACTS = {"Tanh": "Tanh", "Relu": "Relu"}


class _Graph:
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


def _step_input(g: _Graph, name):
    """``name`` = Squeeze(Slice(P, t, t+1, axis 0), 0) or Gather(P, t, axis 0) -> (P, t, nodes) or None."""
    gather = g.node(name, "Gather")
    if gather is not None and g.attr(gather, "axis", 0) == 0 and g.const(gather.input[1]) is not None \
            and g.const(gather.input[1]).ndim == 0:
        return gather.input[0], int(g.const(gather.input[1])), [gather]
    squeeze = g.node(name, "Squeeze")
    if squeeze is None or len(squeeze.input) < 2 or g.ints(squeeze.input[1]) != [0]:
        return None
    sl = g.node(squeeze.input[0], "Slice")
    if sl is None:
        return None
    starts, ends = g.ints(sl.input[1]), g.ints(sl.input[2])
    axes = g.ints(sl.input[3]) if len(sl.input) > 3 and sl.input[3] else [0]
    steps = g.ints(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
    if starts is None or ends is None or axes != [0] or steps != [1] or ends[0] != starts[0] + 1 or starts[0] < 0:
        return None
    return sl.input[0], starts[0], [sl, squeeze]


def _is_zero(g: _Graph, name, depth=0) -> bool:
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
        return _is_zero(g, node.input[0], depth + 1)
    return False


def _step(g: _Graph, act):
    """One unrolled step ``h = act(u_t + (h_prev @ Rt + rb))`` -> a dict, or None."""
    node = g.node(act.input[0], "Add")
    operands = list(node.input) if node is not None else [None, act.input[0]]
    for first, second in ((0, 1), (1, 0)):
        found = _step_input(g, operands[second]) if operands[second] else None
        if found is None:
            continue
        P, t, nodes = found
        step = dict(act=act, P=P, t=t, nodes=nodes + [act] + ([node] if node is not None else []),
                    prev=None, Rt=None, rb=None, start=None)
        other = operands[first]
        if other is None:
            step["start"] = np.zeros(1, np.float32)
            return step
        if g.const(other) is not None:
            step["start"] = g.const(other)
            return step
        rec = g.affine(other)
        if rec is not None and _is_zero(g, rec[0]):  # the first step, from a zero state built at run time
            step["start"] = np.zeros(rec[1].shape[1], np.float32) if rec[2] is None else rec[2]
            step["nodes"] += rec[3]
            return step
        if rec is None or g.node(rec[0], *_ACTS) is None:
            return None
        step["prev"], step["Rt"], step["rb"] = rec[0], rec[1], rec[2]
        step["nodes"] += rec[3]
        return step
    return None


def _chains(g: _Graph):
    """Every maximal chain of unrolled steps, in time order of computation."""
    steps = {}
    for node in g.nodes:
        if node.op_type in _ACTS and node.domain in ("", "ai.onnx"):
            step = _step(g, node)
            if step is not None:
                steps[node.output[0]] = step
    following: dict[str, list] = {}
    for out, step in steps.items():
        if step["prev"] is not None:
            following.setdefault(step["prev"], []).append(out)
    chains = []
    for out, step in steps.items():
        if step["prev"] is not None:
            continue
        chain = [step]
        while len(following.get(chain[-1]["act"].output[0], [])) == 1:
            chain.append(steps[following[chain[-1]["act"].output[0]][0]])
        chains.append(chain)
    return chains


def _read_chain(g: _Graph, chain):
    """Check a chain is one RNN direction over its whole input; -> description dict, or None."""
    first, rest = chain[0], chain[1:]
    if len(chain) < 2:
        return None  # a single step never multiplies by R: the recurrent weights cannot be recovered
    act = first["act"].op_type
    Rt, rb = rest[0]["Rt"], rest[0]["rb"]
    for t, step in enumerate(chain):
        if step["P"] != first["P"] or step["t"] != t or step["act"].op_type != act:
            return None
        if step is not first and (not np.array_equal(step["Rt"], Rt) or
                                  (step["rb"] is None) != (rb is None) or
                                  (rb is not None and not np.array_equal(step["rb"], rb))):
            return None
    H = Rt.shape[1]
    if Rt.shape != (H, H):
        return None
    expected = np.zeros(H, np.float32) if rb is None else np.asarray(rb, np.float32).reshape(-1)
    start = np.asarray(first["start"], np.float32)
    if start.shape[-1:] not in ((H,), (1,)) or not np.allclose(start, expected, rtol=0, atol=1e-7):
        return None  # a non-zero initial state was folded in: not ours to guess
    P, nodes, reverse = first["P"], [n for s in chain for n in s["nodes"]], False
    flip = g.node(P, "Slice")
    if flip is not None:
        starts, ends = g.ints(flip.input[1]), g.ints(flip.input[2])
        axes = g.ints(flip.input[3]) if len(flip.input) > 3 else None
        steps = g.ints(flip.input[4]) if len(flip.input) > 4 else None
        if starts != [-1] or axes != [0] or steps != [-1] or ends is None or ends[0] > -BIG:
            return None
        P, reverse, nodes = flip.input[0], True, nodes + [flip]
    projection = g.affine(P)
    if projection is None or projection[1].shape[1] != H:
        return None
    S, Wt, wb, more = projection
    outs = [s["act"].output[0] for s in chain]
    cat = None
    for consumer in g.consumers.get(outs[0], []):
        order = outs[::-1] if reverse else outs
        if consumer.op_type == "Concat" and list(consumer.input) == order and g.attr(consumer, "axis") == 0:
            cat = consumer
    return dict(S=S, W=Wt.T, R=Rt.T, wb=wb, rb=rb, act=act, reverse=reverse, H=H, cat=cat,
                last=outs[-1], nodes=nodes + more + ([cat] if cat is not None else []))


def fold_unrolled_rnns(nodes, constants, outputs):
    """-> (nodes, new constants): every unrolled RNN chain replaced by the RNN node it computes."""
    from onnx import helper

    g = _Graph(list(nodes), constants, outputs)
    found = [c for c in (_read_chain(g, chain) for chain in _chains(g)) if c is not None]
    if not found:
        return list(nodes), {}
    pairs, singles = [], list(found)
    for node in g.nodes:  # forward and reverse chains over one input, concatenated on the features
        if node.op_type != "Concat" or len(node.input) != 2 or g.attr(node, "axis") not in (2, -1):
            continue
        fwd = next((c for c in singles if c["cat"] is not None and c["cat"].output[0] == node.input[0]), None)
        rev = next((c for c in singles if c["cat"] is not None and c["cat"].output[0] == node.input[1]), None)
        if fwd and rev and not fwd["reverse"] and rev["reverse"] and fwd["S"] == rev["S"] and \
                fwd["act"] == rev["act"] and fwd["H"] == rev["H"] and (fwd["wb"] is None) == (rev["wb"] is None):
            singles.remove(fwd)
            singles.remove(rev)
            pairs.append((node, fwd, rev))
    new_constants, emitted, removed = {}, [], set()

    def const(name, value):
        name = f"_edgernn_unrolled_{len(new_constants)}_{name}"
        new_constants[name] = np.ascontiguousarray(value)
        return name

    def recurrent(parts, direction, outputs_):
        H, biased = parts[0]["H"], parts[0]["wb"] is not None or parts[0]["rb"] is not None
        W = np.stack([p["W"] for p in parts]).astype(np.float32)
        R = np.stack([p["R"] for p in parts]).astype(np.float32)
        inputs = [parts[0]["S"], const("W", W), const("R", R)]
        if biased:
            zeros = np.zeros(H, np.float32)
            B = np.stack([np.concatenate([np.ravel(p["wb"]) if p["wb"] is not None else zeros,
                                          np.ravel(p["rb"]) if p["rb"] is not None else zeros]) for p in parts])
            inputs.append(const("B", B.astype(np.float32)))
        return helper.make_node("RNN", inputs, outputs_, hidden_size=H, direction=direction,
                                activations=[parts[0]["act"]] * len(parts))

    groups = [([c], c["cat"].output[0] if c["cat"] is not None else None, None) for c in singles]
    groups += [([fwd, rev], concat.output[0], concat) for concat, fwd, rev in pairs]
    plans = []
    for parts, y_name, concat in groups:
        used = {n.output[0] for p in parts for n in p["nodes"]} | ({concat.output[0]} if concat else set())
        keep = {p["last"] for p in parts} | ({y_name} if y_name else set())
        inner = [n for n in g.nodes if n.output and n.output[0] in used]
        leaks = [out for n in inner for out in n.output if out not in keep and
                 (out in g.outputs or any(c.output[0] not in used for c in g.consumers.get(out, [])))]
        if leaks:
            log.debug("unrolled RNN over %r not folded: %s used elsewhere", parts[0]["S"], leaks[0])
            continue
        k = len(plans)
        Y, Yh = f"_edgernn_unrolled_{k}_Y", f"_edgernn_unrolled_{k}_Yh"
        new = [recurrent(parts, "bidirectional" if concat else ("reverse" if parts[0]["reverse"] else "forward"),
                         [Y, Yh])]
        if concat is None:
            if y_name:
                new.append(helper.make_node("Squeeze", [Y, const("axes", np.array([1], np.int64))], [y_name]))
            new.append(helper.make_node("Identity", [Yh], [parts[0]["last"]]))
        else:
            new.append(helper.make_node("Transpose", [Y], [Y + "_t"], perm=[0, 2, 1, 3]))
            new.append(helper.make_node("Reshape", [Y + "_t", const("shape", np.array([0, 0, -1], np.int64))],
                                        [y_name]))
            for d, part in enumerate(parts):
                new.append(helper.make_node("Slice", [Yh, const("start", np.array([d], np.int64)),
                                                      const("end", np.array([d + 1], np.int64)),
                                                      const("axis", np.array([0], np.int64))], [part["last"]]))
        first = min(i for i, n in enumerate(g.nodes) if n.output and n.output[0] in used)
        plans.append((first, new))
        removed |= {id(n) for n in inner}
        log.info("read an unrolled %s RNN (%d steps) over %r as one %s RNN node", parts[0]["act"],
                 sum(1 for n in parts[0]["nodes"] if n.op_type in _ACTS),
                 parts[0]["S"], "bidirectional" if concat else ("reverse" if parts[0]["reverse"] else "forward"))
    result, inserts = [], {}
    for first, new in plans:
        inserts.setdefault(first, []).extend(new)
    for i, node in enumerate(g.nodes):
        result.extend(inserts.get(i, []))
        if id(node) not in removed:
            result.append(node)
    return result, new_constants
