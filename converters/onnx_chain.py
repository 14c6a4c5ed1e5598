"""The model-building ops: input normalisation and the dense head, read as they pass on the data flow.

edgernn runs ``normalise -> recurrent layers -> dense layers``; a graph must compute its data in that order.
Sub/Div/Add/Mul by a per-feature constant before the first recurrent layer fold into the input
normalisation (``x' = (x - mean) / std``); after it, MatMul, Gemm and Add/Sub/Mul/Div by constants fold into
dense layers, each closed by an activation (`ACTIVATIONS`). `ChainBuilder` keeps the chain's ``version``, so
a value from an earlier stage (a residual, a second head) is refused instead of silently dropped.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgernn.errors import ConversionError, SpecError
from edgernn.model import Model
from edgernn.spec import DenseLayer, ModelSpec

from .onnx_values import Flow, NodeReader, State


ACTIVATIONS = {
    # ONNX op -> (edgernn activation, ONNX attribute defaults (alpha, beta) or None)
    "Relu": ("relu", None), "Tanh": ("tanh", None), "Sigmoid": ("sigmoid", None),
    "LeakyRelu": ("leaky_relu", (0.01, None)), "HardSigmoid": ("hard_sigmoid", (0.2, 0.5)),
    "Elu": ("elu", (1.0, None)), "ThresholdedRelu": ("thresholded_relu", (1.0, None)),
    "Softsign": ("softsign", None), "Softplus": ("softplus", None), "Softmax": ("softmax", None),
}


class ChainBuilder(NodeReader):
    """Normalisation and dense layers assembled as the flow passes. Uses the importer's ``source`` (the
    graph input read), ``sizes``, ``input_sizes``, ``layers``, ``weights``, ``head`` ([W, b, activation]
    per dense layer), ``mean``/``std`` and ``version``."""


    # ---- model-building ops --------------------------------------------------------------------
    def _at_tip(self, x: Flow, what: str):
        if self.source is None:
            self.source = x.source
            self.sizes.update(self.input_sizes.get(x.source, {}))
        elif x.source != self.source:
            self.fail(f"reads graph input {x.source!r}; the model already reads {self.source!r}")
        if isinstance(x, Flow) and x.half is not None:
            self.fail(f"{what} on the {('forward', 'reverse')[x.half]} half of a bidirectional layer's output "
                      f"alone (edgernn computes on both halves, concatenated on the features)")
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
            self.unsupported("with the data as its second operand")
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
