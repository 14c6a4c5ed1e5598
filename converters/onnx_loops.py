"""Keras's recurrent while-loops, as tf2onnx writes them, folded back into ONNX ``RNN`` and ``GRU`` nodes.

tf2onnx turns Keras's LSTM and GRU(reset_after=True) layers into ONNX's LSTM and GRU operators, but writes
a SimpleRNN and a GRU(reset_after=False) as the TensorFlow while-loop Keras runs: an ONNX ``Loop`` whose
body computes one step. `fold_keras_loops` reads such a loop exactly and replaces it with the node it
computes, so the importer (`edgernn.converters.onnx_import`) only ever reads recurrent operators:

- the frame: a counter ``i`` from 0, stepped by ``Add(i, 1)``; the loop runs while ``i < T`` (its first
  condition ``0 < T``, each body's ``i + 1 < T``), ``T`` the length of axis 0 of the sequence ``X`` the body
  reads as ``Gather(X, i)``; one state carried from outside (its start becomes the node's initial_h, which
  the importer then reads like any other); every other carried value a constant passed through unchanged;
  one scan output, the new state.
- the step, evaluated symbolically: affine maps of ``x_t`` and ``h`` (MatMul by constants, Add, Split),
  gates (Sigmoid, Tanh or Relu of an affine map), ``1 - gate``, products of a gate with ``h`` or with
  ``1 - gate``, and their sum; then matched against ONNX's RNN (``h' = f(x W + h R + b)``) and GRU with
  linear_before_reset 0 (``h' = z h + (1 - z) g(x W_h + (r h) R_h + b_h)``, ``z``, ``r`` = f(x W + h R + b)).

A loop that differs in anything (a mask, another cell, a second state, extra outputs read downstream) is
left as it is, and the importer refuses it, naming the Loop node.
"""

from __future__ import annotations

import logging

import numpy as np

from .onnx_graph import GraphIndex, constant_node_value, fold_constant

log = logging.getLogger(__name__)

GATES = {"Sigmoid", "Tanh", "Relu"}


class _NotACell(Exception):
    """The loop is not one this module reads (the message says why, logged at DEBUG)."""


class _Lin:
    """``sum(source @ matrix) + bias``: ``terms`` {source: (n_in, n_out) matrix, or None for the source
    itself}; a source is "x" (this step's sample), "h" (the carried state) or ("rh", gate) (gate * h)."""

    def __init__(self, terms, bias=None):
        self.terms, self.bias = dict(terms), bias


class _Gate:
    def __init__(self, act, lin):
        self.act, self.lin = act, lin


class _OneMinus:
    def __init__(self, gate):
        self.gate = gate


class _Prod:
    def __init__(self, a, b):
        self.a, self.b = a, b


class _Sum:
    def __init__(self, parts):
        self.parts = parts


class _Mark:
    """The loop's bookkeeping inside the body: the counter, counter + 1, T, and the condition."""

    def __init__(self, kind):
        self.kind = kind


def _is_h(value) -> bool:
    return isinstance(value, _Lin) and list(value.terms) == ["h"] and value.terms["h"] is None and value.bias is None


def _fail(why):
    raise _NotACell(why)


class _Body:
    """The body's values, evaluated node by node."""

    def __init__(self, body, outer_constants, X, counter, T, state, fixed):
        from onnx import numpy_helper

        self.values = {init.name: numpy_helper.to_array(init) for init in body.initializer}
        self.values.update(fixed)
        self.values[counter], self.values[T] = _Mark("i"), _Mark("T")
        self.values[state] = _Lin({"h": None})
        self.outer, self.X = outer_constants, X
        for node in body.node:
            self._eval(node)

    def value(self, name):
        if name in self.values:
            return self.values[name]
        if name in self.outer:
            return self.outer[name]
        if name == self.X:
            return _Mark("X")
        _fail(f"the body reads {name!r} from outside")

    def _eval(self, node):
        if node.domain not in ("", "ai.onnx"):
            _fail(f"{node.op_type} from domain {node.domain!r}")
        if node.op_type == "Constant":
            self.values[node.output[0]] = constant_node_value(node)
            return
        args = [self.value(name) if name else None for name in node.input]
        if all(a is None or isinstance(a, np.ndarray) for a in args):
            results = fold_constant(node, args)
        else:
            results = self._symbolic(node, args)
        for name, value in zip(node.output, results):
            if name:
                self.values[name] = value

    def _symbolic(self, node, args):
        op = node.op_type
        marks = [a.kind if isinstance(a, _Mark) else None for a in args]
        if op in ("Identity", "Cast") and marks[0] in ("i", "next", "T"):
            return [args[0]]
        if op == "Identity":
            return [args[0]]
        if op == "Add" and sorted(map(str, marks)) == ["None", "i"]:
            one = args[marks.index(None)]
            if isinstance(one, np.ndarray) and one.size == 1 and float(one.ravel()[0]) == 1.0:
                return [_Mark("next")]
        if op == "Less" and marks == ["next", "T"]:
            return [_Mark("cond")]
        if op == "Gather" and marks == ["X", "i"] and _attr(node, "axis", 0) == 0:
            return [_Lin({"x": None})]
        if any(marks):
            _fail(f"{op} on the loop's counter or bounds")
        a, b = (args + [None])[:2]
        if op == "MatMul":
            return [self._matmul(a, b)]
        if op == "Add":
            return [self._add(a, b)]
        if op == "Split":
            return self._split(node, a, args[1:])
        if op in GATES and isinstance(a, _Lin):
            return [_Gate(op, a)]
        if op == "Sub" and isinstance(a, np.ndarray) and a.size == 1 and float(a.ravel()[0]) == 1.0 \
                and isinstance(b, _Gate):
            return [_OneMinus(b)]
        if op == "Mul":
            return [self._mul(a, b)]
        _fail(f"{op} in the step")

    @staticmethod
    def _matmul(a, b):
        if not isinstance(b, np.ndarray) or b.ndim != 2:
            _fail("MatMul by a computed value")
        if isinstance(a, _Prod) and isinstance(a.a, _Gate) and _is_h(a.b):
            return _Lin({("rh", a.a): b})
        if not isinstance(a, _Lin):
            _fail("MatMul of a non-affine value")
        terms = {source: b if m is None else m @ b for source, m in a.terms.items()}
        return _Lin(terms, None if a.bias is None else a.bias @ b)

    @staticmethod
    def _add(a, b):
        if isinstance(a, _Lin) and isinstance(b, _Lin):
            terms = dict(a.terms)
            for source, m in b.terms.items():
                if source in terms:
                    if m is None or terms[source] is None:
                        _fail("a source added to itself")
                    terms[source] = terms[source] + m
                else:
                    terms[source] = m
            bias = a.bias if b.bias is None else b.bias if a.bias is None else a.bias + b.bias
            return _Lin(terms, bias)
        if isinstance(b, _Lin):
            a, b = b, a
        if isinstance(a, _Lin) and isinstance(b, np.ndarray):
            if b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1) or any(m is None for m in a.terms.values()):
                _fail("a bias that is not one vector")
            vector = np.asarray(b, np.float64).reshape(-1)
            return _Lin(a.terms, vector if a.bias is None else a.bias + vector)
        if isinstance(a, _Prod) and isinstance(b, _Prod):
            return _Sum([a, b])
        _fail("Add of values that are not affine maps or products")

    @staticmethod
    def _mul(a, b):
        if isinstance(b, _Gate) and (_is_h(a) or isinstance(a, _OneMinus)):
            a, b = b, a
        if isinstance(a, _Gate) and _is_h(b):
            return _Prod(a, b)
        if isinstance(a, _OneMinus) and isinstance(b, _Gate):
            return _Prod(a, b)
        if isinstance(a, _Gate) and isinstance(b, _OneMinus):
            return _Prod(b, a)
        _fail("Mul other than gate * h or (1 - gate) * gate")

    @staticmethod
    def _split(node, a, rest):
        if not isinstance(a, _Lin) or any(m is None for m in a.terms.values()):
            _fail("Split of a non-affine value")
        width = next(iter(a.terms.values())).shape[1]
        if _attr(node, "axis", 0) not in (-1, 1):
            _fail("Split along an axis other than the features")
        sizes = rest[0] if rest and rest[0] is not None else _attr(node, "split")
        if sizes is None:
            if width % len(node.output):
                _fail("Split into unequal parts without sizes")
            sizes = [width // len(node.output)] * len(node.output)
        sizes = [int(s) for s in np.ravel(sizes)]
        if sum(sizes) != width or len(sizes) != len(node.output):
            _fail(f"Split sizes {sizes} of width {width}")
        parts, at = [], 0
        for size in sizes:
            cut = slice(at, at + size)
            parts.append(_Lin({s: m[:, cut] for s, m in a.terms.items()},
                              None if a.bias is None else a.bias[cut]))
            at += size
        return parts


def _attr(node, name, default=None):
    from onnx import helper
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _affine(lin, sources, H):
    """``lin`` over exactly ``sources`` with H outputs -> ([matrix per source], bias (H,) or zeros)."""
    if set(lin.terms) != set(sources) or any(lin.terms[s] is None for s in sources):
        _fail("a gate reads other inputs than a cell's")
    matrices = [np.asarray(lin.terms[s], np.float64) for s in sources]
    if any(m.shape[1] != H for m in matrices):
        _fail("gates of different widths")
    bias = np.zeros(H) if lin.bias is None else np.asarray(lin.bias, np.float64)
    return matrices, bias


def _cell(state):
    """The new state's expression -> (op, activations, W (G*H, F), R (G*H, H), B (2*G*H,)) in ONNX's order."""
    if isinstance(state, _Gate):
        H = state.lin.terms.get("h").shape[1] if state.lin.terms.get("h") is not None else 0
        (W, R), b = _affine(state.lin, ("x", "h"), H)
        if R.shape != (H, H):
            _fail("the recurrent matrix is not square")
        return "RNN", [state.act], W.T, R.T, np.concatenate([b, np.zeros(H)]), {}
    if not isinstance(state, _Sum) or len(state.parts) != 2:
        _fail("the new state is neither a gate nor a GRU's z * h + (1 - z) * candidate")
    keep = next((p for p in state.parts if isinstance(p.a, _Gate) and _is_h(p.b)), None)
    new = next((p for p in state.parts if isinstance(p.a, _OneMinus)), None)
    if keep is None or new is None or new.a.gate is not keep.a:
        _fail("not a GRU's z * h + (1 - z) * candidate")
    z, candidate = keep.a, new.b
    r = next((s[1] for s in candidate.lin.terms if isinstance(s, tuple)), None)
    if r is None or r.act != z.act:
        _fail("the candidate does not read r * h through a gate like z's")
    H = z.lin.terms["h"].shape[1] if z.lin.terms.get("h") is not None else 0
    (Wz, Rz), bz = _affine(z.lin, ("x", "h"), H)
    (Wr, Rr), br = _affine(r.lin, ("x", "h"), H)
    (Wh, Rh), bh = _affine(candidate.lin, ("x", ("rh", r)), H)
    W = np.concatenate([Wz.T, Wr.T, Wh.T])  # ONNX's GRU gate order: z, r, h
    R = np.concatenate([Rz.T, Rr.T, Rh.T])
    if R.shape != (3 * H, H):
        _fail("recurrent matrices of the wrong shape")
    B = np.concatenate([bz, br, bh, np.zeros(3 * H)])
    return "GRU", [z.act, candidate.act], W, R, B, {"linear_before_reset": 0}


def _strip(g, name, *ops):
    """Follow ``name`` back through nodes of ``ops`` (their first input)."""
    node = g.node(name, *ops)
    while node is not None:
        name = node.input[0]
        node = g.node(name, *ops)
    return name


def _length_of_axis_0(g, name):
    """``name`` = Shape(X)[0] (Slice 0:1 then Squeeze, or Gather 0; Casts between) -> X, or None."""
    name = _strip(g, name, "Cast", "Squeeze", "Identity")
    node = g.node(name, "Slice", "Gather")
    if node is None:
        return None
    if node.op_type == "Slice":
        starts, ends = g.ints(node.input[1]), g.ints(node.input[2])
        axes = g.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
        steps = g.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
        if starts != [0] or ends != [1] or axes != [0] or steps != [1]:
            return None
    elif g.ints(node.input[1]) != [0] or g.attr(node, "axis", 0) != 0:
        return None
    shape = g.node(_strip(g, node.input[0], "Cast"), "Shape")
    if shape is None or g.attr(shape, "start", 0) != 0:
        return None
    return shape.input[0]


def _read_loop(g: GraphIndex, loop, index):
    """A Keras while-loop -> (nodes replacing it, new constants); raises _NotACell otherwise."""
    body = _attr(loop, "body")
    N = len(loop.input) - 2
    K = len(body.output) - 1 - N
    if loop.input[0] or N < 3 or K != 1 or len(body.input) != N + 2:
        _fail("not a while-loop with one scan output")
    inits, ins, outs = list(loop.input[2:]), [v.name for v in body.input], [v.name for v in body.output]
    counter = state = T_slot = None
    fixed = {}
    for k in range(N):
        init, name_in, name_out = inits[k], ins[2 + k], outs[1 + k]
        producer = next((n for n in body.node if name_out in n.output), None)
        if name_out == name_in:
            if g.const(init) is not None:
                fixed[name_in] = g.const(init)
            elif T_slot is None:
                T_slot = k
            else:
                _fail("more than one non-constant value passed through")
        elif producer is not None and producer.op_type == "Add" and name_in in producer.input and counter is None:
            counter = k
        elif state is None:
            state = k
        else:
            _fail("more than one carried state")
    if counter is None or state is None or T_slot is None:
        _fail("no counter, state or bound")
    start = g.const(inits[counter])
    if start is None or start.size != 1 or float(start.ravel()[0]) != 0:
        _fail("the counter does not start at 0")
    X = _length_of_axis_0(g, inits[T_slot])
    if X is None or X in g.constants or (X in g.producer and g.nodes.index(g.producer[X]) > index):
        _fail("the bound is not the length of a sequence computed before the loop")
    first = g.node(loop.input[1], "Less")
    if first is None or g.const(first.input[0]) is None or float(np.ravel(g.const(first.input[0]))[0]) != 0 or \
            _strip(g, first.input[1], "Cast", "Identity") != _strip(g, inits[T_slot], "Cast", "Identity"):
        _fail("the first condition is not 0 < T")
    step = _Body(body, g.constants, X, ins[2 + counter], ins[2 + T_slot], ins[2 + state], fixed)
    if not isinstance(step.values.get(outs[0]), _Mark) or step.values[outs[0]].kind != "cond":
        _fail("the body's condition is not i + 1 < T")
    if not isinstance(step.values.get(outs[1 + counter]), _Mark) or step.values[outs[1 + counter]].kind != "next":
        _fail("the counter does not step by 1")
    new_state, scanned = step.values.get(outs[1 + state]), step.values.get(outs[1 + N])
    if new_state is None or new_state is not scanned:
        _fail("the scan output is not the new state")
    op, acts, W, R, B, extra = _cell(new_state)
    used = [loop.output[1 + state], loop.output[N]]
    for k, name in enumerate(loop.output):
        if name and name not in used and (g.consumers.get(name) or name in g.outputs):
            _fail(f"loop output {k} is read downstream")
    return _emit(loop, index, op, acts, W, R, B, extra, X, inits[state], used)


def _emit(loop, index, op, acts, W, R, B, extra, X, h0, outputs):
    from onnx import helper

    prefix = f"_edgernn_loop_{index}_"
    constants = {prefix + "W": W[None].astype(np.float32), prefix + "R": R[None].astype(np.float32),
                 prefix + "B": B[None].astype(np.float32), prefix + "axis0": np.array([0], np.int64),
                 prefix + "axis1": np.array([1], np.int64)}
    H = R.shape[1]
    nodes = [helper.make_node("Unsqueeze", [h0, prefix + "axis0"], [prefix + "h0"], name=prefix + "h0"),
             helper.make_node(op, [X, prefix + "W", prefix + "R", prefix + "B", "", prefix + "h0"],
                              [prefix + "Y", prefix + "Y_h"], name=loop.name or prefix + op, hidden_size=H,
                              activations=acts, **extra)]
    state_out, scan_out = outputs
    if scan_out:
        nodes.append(helper.make_node("Squeeze", [prefix + "Y", prefix + "axis1"], [scan_out], name=prefix + "Y"))
    if state_out:
        nodes.append(helper.make_node("Squeeze", [prefix + "Y_h", prefix + "axis0"], [state_out],
                                      name=prefix + "Y_h"))
    return nodes, constants


def fold_keras_loops(nodes, constants, outputs):
    """-> (nodes, new constants, {a Loop left as it is: why}): every Keras recurrent while-loop replaced by
    the RNN or GRU node it runs; a Loop is keyed by its first output."""
    g = GraphIndex(list(nodes), constants, outputs)
    result, new_constants, reasons = [], {}, {}
    for index, node in enumerate(g.nodes):
        if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
            result.append(node)
            continue
        try:
            replacement, extra = _read_loop(g, node, index)
        except _NotACell as why:
            log.debug("Loop %r not read as a recurrent layer: %s", node.name, why)
            reasons[node.output[0]] = str(why)
            result.append(node)
            continue
        log.info("read Loop %r (a Keras recurrent layer's while-loop) as one %s node", node.name,
                 replacement[1].op_type)
        result.extend(replacement)
        new_constants.update(extra)
    return result, new_constants, reasons
