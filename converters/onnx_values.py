"""The abstract values the whole-graph importer gives graph values, and the node-reading helpers.

The importer (`edgernn.converters.onnx_import`) reads a graph without running it. Besides constants, a
value is one of:

- `Sym`: a 1-D int vector (or scalar) computed from the input's shape at run time (``Shape -> Gather ->
  Concat``), its entries ints or the name of an input axis (``"X0"``, ``"X1"``, or ``"X0*X1"`` for their
  product). Exporters build zero initial states and reshape targets this way.
- `Fill`: a tensor of data-independent shape holding one value everywhere (``ConstantOfShape``, ``Expand``
  of a scalar): a zero state is one.
- `Flow`: the data computed from the graph input, with the axes it carries (see `Flow`).
- `State`: recurrent layers' final states stacked on an ``S`` axis.

Neither `Sym` nor `Fill` depends on the data, so the importer can tell "zeros from the batch size" from "a
real input" without running anything. `NodeReader` holds what reading any node needs (attributes, errors
that name it) and the shape arithmetic on `Sym` and `Fill`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgernn.errors import ConversionError

from .onnx_graph import BIG, uniform_value

INPUT_AXES = ("X0", "X1")
"""The graph input's first two axes: time and batch, told apart by the first recurrent node's layout."""

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


@dataclass(frozen=True)
class Flow:
    """Data computed from graph input ``source``: ``axes`` ((label, size), ...) as `onnx_layout` describes;
    ``version`` the model-building step it was computed at; ``last`` when time was cut to its last step."""

    source: str
    axes: tuple
    version: int
    last: bool = False
    half: int | None = None
    """The one direction (0 forward, 1 reverse) of a bidirectional layer's output this holds, sliced off
    its ``D`` axis; only concatenating both halves back on the features makes it part of the model."""


@dataclass(frozen=True)
class State:
    """Final recurrent states stacked on the ``S`` axis: ``parts`` ((layer, direction, "h"|"c"), ...)."""

    parts: tuple
    axes: tuple
    version: int


def components(label) -> list | None:
    """The input axes an axis label ``"X0*X1"`` merges (time and batch flattened together, as Keras's Dense
    and TimeDistributed do around a 2-D MatMul), or None for any other label."""
    if not isinstance(label, str) or "*" not in label:
        return None
    parts = label.split("*")
    return parts if all(p in INPUT_AXES for p in parts) and len(set(parts)) == len(parts) else None


ARITHMETIC = {"Add", "Sub", "Mul", "Div"}


def _product(entries):
    """The product of `Sym` entries: an int, ``"X0*X1"`` for input axes (the importer reads that as the two
    axes merged), or ``"?Mul"`` when an unknown size or an int factor other than 1 is mixed in."""
    number, names = 1, []
    for e in entries:
        if isinstance(e, int):
            number *= e
        else:
            names.extend(e.split("*"))
    if not names:
        return number
    return "*".join(names) if number == 1 and not any(n.startswith("?") for n in names) else "?Mul"


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
        if op == "ReduceProd":
            axes = self.axes_arg(values, 1, 1)
            if sym.scalar or axes not in (None, [0]) or (axes is None and self.attr("noop_with_empty_axes", 0)):
                self.unsupported("over a shape vector's axis other than its one")
            product = _product(sym.entries)
            return Sym((product,), scalar=not self.attr("keepdims", 1))
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
            elif op == "Mul":
                out.append(_product((x, y)))
            else:
                out.append(f"?{op}")
        scalar = all(v.scalar if isinstance(v, Sym) else np.ndim(v) == 0 for v in values)
        return Sym(tuple(out), scalar=scalar)
