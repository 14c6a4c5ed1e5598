"""edgernn -> ONNX *step* model: one graph that advances a batch of B streams by one sample.

Why a step model rather than ONNX's LSTM/GRU/RNN operators over a sequence: a daemon gets one sample per
stream per message, keeps the state itself, and must compute every variant edgernn has (peepholes with
clip, coupled gates, mgu, leaky units, projection with custom activations...), which ONNX's recurrent
operators only partly cover. So the cell equations of `edgernn.cells` are written out in plain ONNX ops
(Gemm/MatMul, Add, Mul, Sub, Split, Clip and the activation ops), weights as initializers transposed once
so the graph computes ``x @ W^T`` directly.

Inputs and outputs (all float32, B = ``batch``: the symbolic dimension ``"batch"`` or a fixed size):

==============  ==================  =========================================================
input           shape               meaning
==============  ==================  =========================================================
``x``           (B, input_size)     one raw sample per stream (normalised inside the graph)
``h{l}``        (B, Hp)             layer l's hidden state (Hp = proj_size or hidden_size)
``c{l}``        (B, hidden_size)    layer l's cell state (lstm layers only)
==============  ==================  =========================================================

Outputs: ``y`` (B, output_size), then ``h{l}_out`` / ``c{l}_out``: the next value of each state input,
to feed back as that input on the next step. Model metadata (``metadata_props``):

- ``edgernn.spec``: the spec JSON (`ModelSpec.to_json`);
- ``edgernn.state_layout``: JSON list of ``{"name", "output", "offset", "size"}``, where each state
  tensor lives in edgernn's flat state row (`state_tensors`), so a runtime maps a (n, state_size) table
  onto the inputs with ``table[:, offset:offset + size]`` slices;
- ``edgernn.state_size`` and ``edgernn.step_format`` (``"1"``, this convention's version).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from edgernn.errors import ConversionError
from edgernn.spec import ModelSpec

log = logging.getLogger(__name__)

STEP_FORMAT = "1"
MIN_OPSET = 13
"""Split takes its sizes as an input and Softmax works on one axis from opset 13 on."""

_SIMPLE = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign", "softplus": "Softplus"}


def state_tensors(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """``[(name, offset, size)]`` of every state input, in edgernn's state-row order ``[h0 (c0) h1 ...]``.

    The step model's output for input ``name`` is ``name + "_out"``.
    """
    _check_streamable(spec)
    tensors, offset = [], 0
    for index, layer in enumerate(spec.layers):
        tensors.append((f"h{index}", offset, layer.unit_output_size))
        offset += layer.unit_output_size
        if layer.cell == "lstm":
            tensors.append((f"c{index}", offset, layer.hidden_size))
            offset += layer.hidden_size
    return tensors


def to_onnx(model, path=None, *, opset: int = 17, batch="dynamic"):
    """An `edgernn.Model` (anything with ``.spec`` and float32 ``.weights``) -> ``onnx.ModelProto``.

    Writes the model to ``path`` when given. ``batch`` is ``"dynamic"`` (a symbolic dimension) or a fixed
    positive number of streams. Raises ConversionError for a model that cannot stream (reverse or
    bidirectional layers) or an opset this exporter cannot target.
    """
    import onnx
    from onnx import TensorProto, helper

    spec = model.spec
    layout = state_tensors(spec)
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConversionError(f"opset: must be an integer in [{MIN_OPSET}, {newest}], got {opset!r}")
    if batch == "dynamic":
        B = "batch"
    elif isinstance(batch, int | np.integer) and not isinstance(batch, bool) and batch > 0:
        B = int(batch)
    else:
        raise ConversionError(f"batch: must be 'dynamic' or a positive integer, got {batch!r}")

    weights = {name: np.asarray(value, np.float32) for name, value in model.weights.items()}
    g = _Graph()
    x = "x"
    if spec.normalize:  # (x - mean) / std
        x = g.op("Div", g.op("Sub", x, g.const("input.mean", weights["input.mean"])),
                 g.const("input.std", weights["input.std"]))
    states_out = {}
    for index, layer in enumerate(spec.layers):
        prefix = f"layers.{index}."
        w = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        c = f"c{index}" if layer.cell == "lstm" else None
        h, c = _recurrent(g, layer, index, w, x, f"h{index}", c)
        states_out[f"h{index}"], x = h, h
        if c is not None:
            states_out[f"c{index}"] = c
    for index, dense in enumerate(spec.head):
        b = weights.get(f"head.{index}.b")
        x = _activation(g, dense.activation, g.linear(x, f"head.{index}", weights[f"head.{index}.W"].T, b))

    g.op("Identity", x, out="y")
    for name, value in states_out.items():
        g.op("Identity", value, out=name + "_out")

    def info(name, width, doc):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, width], doc_string=doc)

    inputs = [info("x", spec.input_size, "one raw sample per stream (normalised inside the graph)")]
    outputs = [info("y", spec.output_size, "the model's output for this sample")]
    for name, offset, size in layout:
        what = f"layer {name[1:]} {'hidden' if name[0] == 'h' else 'cell'} state"
        inputs.append(info(name, size, f"{what}: edgernn state row [{offset}:{offset + size}]"))
        outputs.append(info(name + "_out", size, f"next {what}: feed back as input {name!r} on the next step"))
    graph = helper.make_graph(
        g.nodes, spec.name or "edgernn_step", inputs, outputs, g.initializers,
        doc_string="advances B streams by one sample; state outputs <name>_out feed back as inputs <name>")
    opset_id = helper.make_opsetid("", opset)
    proto = helper.make_model(graph, opset_imports=[opset_id], producer_name="edgernn",
                              ir_version=helper.find_min_ir_version_for([opset_id]),
                              doc_string="edgernn step model; its spec is metadata_props['edgernn.spec']")
    helper.set_model_props(proto, {
        "edgernn.spec": spec.to_json(),
        "edgernn.state_layout": json.dumps([{"name": n, "output": n + "_out", "offset": o, "size": s}
                                            for n, o, s in layout]),
        "edgernn.state_size": str(spec.state_size),
        "edgernn.step_format": STEP_FORMAT,
    })
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, str(path))
        log.info("wrote ONNX step model %s (opset %d, %d nodes)", path, opset, len(g.nodes))
    return proto


def _check_streamable(spec: ModelSpec) -> None:
    for index, layer in enumerate(spec.layers):
        if layer.direction != "forward":
            raise ConversionError(
                f"{layer.direction} layer {index} needs the whole sequence; a step model cannot compute it "
                "one sample at a time (edgernn runs such a model with Model.run over a sequence or window)")


def _recurrent(g: "_Graph", layer, index: int, w: dict, x: str, h: str, c: str | None):
    """Layer ``index``'s next (h, c) in ONNX nodes; the equations are those of `edgernn.cells`.
    ``w`` holds the layer's tensors by short name (W, R, Wb, Rb, P, proj, leak)."""
    H, G, name = layer.hidden_size, layer.gates, f"layers.{index}"
    # The cell's activations on clipped inputs: acts[0] for the gates (or the only one), acts[1] the candidate.
    acts = [lambda v, a=a: _activation(g, a, bound(v)) for a in layer.activations_for(0)]
    f = acts[0]
    W, R, Wb, Rb = w["W"], w["R"], w.get("Wb"), w.get("Rb")

    def bound(v):  # ONNX's clip: every activation's input in [-clip, clip]
        return v if layer.clip is None else g.op("Clip", v, g.scalar(-layer.clip), g.scalar(layer.clip))

    def split(v, *sizes):
        return g.op("Split", v, g.const(f"{v}.split", np.array(sizes, np.int64)), axis=1, outputs=len(sizes))

    if layer.cell in ("gru", "mgu"):
        # gates r, z (gru) or f (mgu) see h; the candidate n sees r * h (or r * (R_n h + Rb_n)).
        k = (G - 1) * H
        lbr = layer.cell == "gru" and layer.linear_before_reset
        bias = None if Wb is None else Wb + np.concatenate([Rb[:k], np.zeros(H, np.float32) if lbr else Rb[k:]])
        pre, x_n = split(g.linear(x, f"{name}.W", W.T, bias), k, H)
        gates = f(g.op("Add", pre, g.op("MatMul", h, g.const(f"{name}.R_gates", R[:k].T))))
        r, z = split(gates, H, H) if layer.cell == "gru" else (gates, None)  # mgu: r is f
        if lbr:   # n = g(W_n x + Wb_n + r * (R_n h + Rb_n))
            h_n = g.op("Mul", r, g.linear(h, f"{name}.R_n", R[k:].T, None if Rb is None else Rb[k:]))
        else:     # n = g(W_n x + Wb_n + R_n (r * h) + Rb_n)
            h_n = g.op("MatMul", g.op("Mul", r, h), g.const(f"{name}.R_n", R[k:].T))
        n = acts[1](g.op("Add", x_n, h_n))
        if layer.cell == "mgu":   # h' = (1 - f) h + f n
            return g.op("Add", h, g.op("Mul", r, g.op("Sub", n, h))), None
        return g.op("Add", n, g.op("Mul", z, g.op("Sub", h, n))), None   # h' = (1 - z) n + z h

    bias = None if Wb is None else Wb + Rb
    a = g.op("Add", g.linear(x, f"{name}.W", W.T, bias), g.op("MatMul", h, g.const(f"{name}.R", R.T)))
    if layer.cell == "rnn":
        return f(a), None
    if layer.cell == "leaky":   # h' = (1 - leak) h + leak f(a)
        return g.op("Add", g.op("Mul", h, g.const(f"{name}.keep", 1 - w["leak"])),
                    g.op("Mul", f(a), g.const(f"{name}.leak", w["leak"]))), None

    # lstm: i, f, g, o (i, g, o when coupled: f = 1 - i); peepholes on c for i, f and on c' for o.
    P, blocks = w.get("P"), split(a, *[H] * G)
    if layer.coupled_input_forget:
        i, cand, o = blocks
        p_i, p_f, p_o = (None, None, None) if P is None else (P[:H], None, P[H:])
    else:
        i, forget, cand, o = blocks
        p_i, p_f, p_o = (None, None, None) if P is None else np.split(P, 3)

    def peep(v, p, cell, gate):
        return v if p is None else g.op("Add", v, g.op("Mul", cell, g.const(f"{name}.P_{gate}", p)))

    i = f(peep(i, p_i, c, "i"))
    forget = g.op("Sub", g.scalar(1.0), i) if layer.coupled_input_forget else f(peep(forget, p_f, c, "f"))
    c_next = g.op("Add", g.op("Mul", forget, c), g.op("Mul", i, acts[1](cand)))
    o = f(peep(o, p_o, c_next, "o"))
    h_next = g.op("Mul", o, _activation(g, layer.activations_for(0)[2], c_next))  # h_act(c'): c is not clipped
    if "proj" in w:
        h_next = g.op("MatMul", h_next, g.const(f"{name}.proj", w["proj"].T))
    return h_next, c_next


def _activation(g: "_Graph", act, v: str) -> str:
    """An `edgernn.spec.Activation` (name, alpha, beta, as ONNX's recurrent operators define them) on v."""
    if act.name == "identity":
        return v
    if act.name in _SIMPLE:
        return g.op(_SIMPLE[act.name], v)
    if act.name == "affine":
        return g.op("Add", g.op("Mul", v, g.scalar(act.alpha)), g.scalar(act.beta))
    if act.name == "scaled_tanh":
        return g.op("Mul", g.op("Tanh", g.op("Mul", v, g.scalar(act.beta))), g.scalar(act.alpha))
    if act.name == "hard_sigmoid":
        return g.op("HardSigmoid", v, alpha=act.alpha, beta=act.beta)
    if act.name == "softmax":
        return g.op("Softmax", v, axis=-1)
    op = {"leaky_relu": "LeakyRelu", "thresholded_relu": "ThresholdedRelu", "elu": "Elu"}[act.name]
    return g.op(op, v, alpha=act.alpha)


class _Graph:
    """Collects nodes and initializers, naming every intermediate value uniquely (``v0``, ``v1``...)."""

    def __init__(self):
        self.nodes, self.initializers, self._count, self._scalars = [], [], 0, {}

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value: float) -> str:
        """A float32 scalar initializer, one per distinct value."""
        key = float(np.float32(value))
        if key not in self._scalars:
            self._scalars[key] = self.const(f"scalar_{len(self._scalars)}", np.array(key, np.float32))
        return self._scalars[key]

    def op(self, op_type: str, *inputs: str, out: str | None = None, outputs: int = 1, **attrs):
        """Append one node; returns its output name (a tuple of ``outputs`` names when more than one)."""
        from onnx import helper

        names = [out] if out else [f"v{self._count + j}" for j in range(outputs)]
        self._count += 0 if out else outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type}_{len(self.nodes)}",
                                           **attrs))
        return names[0] if outputs == 1 else tuple(names)

    def linear(self, v: str, name: str, WT, b) -> str:
        """v @ WT (+ b): Gemm with the bias when there is one, else MatMul."""
        if b is None:
            return self.op("MatMul", v, self.const(name, WT))
        return self.op("Gemm", v, self.const(name, WT), self.const(name + ".bias", b))
