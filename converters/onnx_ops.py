"""ONNX's recurrent operators (LSTM, GRU, RNN; opsets 1-22) -> one edgernn `RecurrentLayer` and its weights.

Written the way the ONNX operator spec reads, with its letters: ``X`` (T, B, I) (layout 0) or (B, T, I)
(layout 1); ``W`` (D, G*H, I); ``R`` (D, G*H, H); ``B`` (D, 2*G*H) = [Wb, Rb]; ``sequence_lens`` (B,);
``initial_h`` (D, B, H); ``initial_c`` (D, B, H); ``P`` (D, 3H). D is 2 for a bidirectional node, else 1.

ONNX stacks the gate blocks in its own order (LSTM i, o, f, c; GRU z, r, h; P i, o, f); edgernn's
canonical order is PyTorch's (LSTM i, f, g, o; GRU r, z, n; P i, f, o), so every tensor is split into its
gate blocks here and restacked. With ``input_forget`` the LSTM computes f = 1 - i: the f blocks of W, R,
B and P are never read, and are dropped (the spec's coupled LSTM has 3 blocks i, g, o).

Activation parameters follow onnxruntime, the reference this module is tested against:
``activation_alpha`` and ``activation_beta`` are consumed in order by the activations that take that
parameter only (Affine takes both, LeakyRelu one alpha, ...), a function left without a value gets
onnxruntime's default (`_activations` says where that is not ONNX's), and names match case-insensitively.
Anything this cannot express exactly raises `ConversionError` naming the node, never a silently different
model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgernn.errors import ConversionError, SpecError
from edgernn.spec import ACTIVATION_DEFAULTS, CELL_ACTIVATIONS, Activation, RecurrentLayer

OPS = {"RNN": "rnn", "GRU": "gru", "LSTM": "lstm"}
"""ONNX op type -> edgernn cell."""

ONNX_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
"""Gate blocks ONNX stores per direction (an LSTM keeps 4 even with ``input_forget``)."""

ACTIVATIONS = {
    # ONNX name, lower-cased (onnxruntime matches names case-insensitively) -> (edgernn name, uses alpha, uses beta)
    "relu": ("relu", False, False), "tanh": ("tanh", False, False), "sigmoid": ("sigmoid", False, False),
    "affine": ("affine", True, True), "leakyrelu": ("leaky_relu", True, False),
    "thresholdedrelu": ("thresholded_relu", True, False), "scaledtanh": ("scaled_tanh", True, True),
    "hardsigmoid": ("hard_sigmoid", True, True), "elu": ("elu", True, False),
    "softsign": ("softsign", False, False), "softplus": ("softplus", False, False),
}

ATTRIBUTES = {
    "activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size", "layout",
    "input_forget", "linear_before_reset",
    "output_sequence",  # opsets 1-6: whether Y is produced; Y is computed either way
}
ORT_DEFAULTS = {"affine": (0.0, None), "thresholded_relu": (0.0, None), "scaled_tanh": (0.0, 0.0)}
"""onnxruntime's value for a parameter its list does not reach, where it differs from ONNX's default
(`edgernn.spec.ACTIVATION_DEFAULTS`); None keeps edgernn's (= ONNX's) default."""
FLOATS = (np.float16, np.float32, np.float64)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecurrentNode:
    """One ONNX recurrent node, converted. ``weights`` holds canonical tensors without the ``layers.{l}.``
    prefix ("W", "R", "Wb", "Rb", "P", "reverse.W", ...), float32, ready for `RecurrentLayer.tensor_shapes`."""

    layer: RecurrentLayer
    weights: dict[str, np.ndarray]
    layout: int
    initial_h: np.ndarray | None
    initial_c: np.ndarray | None
    sequence_lens: np.ndarray | None


def recurrent_node(node, constant, where: str) -> RecurrentNode:
    """``node``: an onnx.NodeProto of op LSTM, GRU or RNN; ``constant(name)`` -> ndarray or None (from
    initializers and Constant nodes); ``where`` names the node in errors. W, R, B and P must be constant;
    initial_h, initial_c and sequence_lens are returned when constant, else None (given at run time)."""
    where = describe(node, where)

    def fail(problem: str):
        raise ConversionError(f"{where}: {problem}")

    cell = OPS.get(node.op_type)
    if cell is None or node.domain not in ("", "ai.onnx"):
        fail(f"not a recurrent operator (expected one of {', '.join(OPS)})")
    attrs = _attributes(node, fail)
    unknown = sorted(set(attrs) - ATTRIBUTES)
    if unknown:
        fail(f"unsupported attribute(s) {', '.join(unknown)}")
    if len(node.input) > (8 if cell == "lstm" else 6):
        fail(f"has {len(node.input)} inputs; {node.op_type} takes at most {8 if cell == 'lstm' else 6}")
    names = list(node.input) + [""] * (8 - len(node.input))
    X_, W_, R_, B_, seq_, h0_, c0_, P_ = names[:8]
    if cell != "lstm" and (c0_ or P_):
        fail("has inputs beyond initial_h (only LSTM takes initial_c and P)")

    def const(name: str, what: str, required: bool):
        value = constant(name) if name else None
        if value is None:
            if required:
                fail(f"input {what} ({name!r}) must be a constant (an initializer or Constant node)")
            return None
        value = np.asarray(value)
        if what == "sequence_lens":
            if value.dtype.kind not in "iu":
                fail(f"input {what} must be int32, got {value.dtype}")
            return value.astype(np.int64)
        if value.dtype.type not in FLOATS:
            fail(f"input {what} has dtype {value.dtype}; only float16, float32 and float64 are supported")
        return value

    W, R = const(W_, "W", True), const(R_, "R", True)
    B = const(B_, "B", False)
    P = const(P_, "P", False)
    sequence_lens = const(seq_, "sequence_lens", False)
    initial_h, initial_c = const(h0_, "initial_h", False), const(c0_, "initial_c", False)

    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    if direction not in ("forward", "reverse", "bidirectional"):
        fail(f"direction must be forward, reverse or bidirectional, got {direction!r}")
    D = 2 if direction == "bidirectional" else 1
    G = ONNX_GATES[cell]
    if W.ndim != 3 or R.ndim != 3:
        fail(f"W and R must have 3 dimensions, got shapes {W.shape} and {R.shape}")
    H = int(attrs.get("hidden_size", R.shape[-1]))
    I = W.shape[2]
    if H <= 0 or I <= 0:
        fail(f"hidden_size and input size must be positive, got {H} and {I}")
    expected = {"W": ((D, G * H, I), W), "R": ((D, G * H, H), R), "B": ((D, 2 * G * H), B),
                "P": ((D, 3 * H), P)}
    for name, (shape, value) in expected.items():
        if value is not None and value.shape != shape:
            fail(f"input {name} has shape {value.shape}, expected {shape} "
                 f"({direction}, hidden_size {H}, input size {I})")
    if sequence_lens is not None and sequence_lens.ndim != 1:
        fail(f"input sequence_lens must have 1 dimension, got shape {sequence_lens.shape}")
    for name, value in (("initial_h", initial_h), ("initial_c", initial_c)):
        if value is not None and (value.ndim != 3 or value.shape[-1] != H):
            fail(f"input {name} has shape {value.shape}, expected 3 dimensions ending in hidden_size {H}")

    layout = int(attrs.get("layout", 0))
    if layout not in (0, 1):
        fail(f"layout must be 0 or 1, got {layout}")
    coupled = bool(attrs.get("input_forget", 0))
    if cell != "lstm" and "input_forget" in attrs:
        fail("input_forget applies to LSTM only")
    linear_before_reset = bool(attrs.get("linear_before_reset", 0)) if cell == "gru" else True
    if cell != "gru" and "linear_before_reset" in attrs:
        fail("linear_before_reset applies to GRU only")
    clip = attrs.get("clip")
    activations = _activations(cell, D, attrs, fail, where)

    try:
        layer = RecurrentLayer(cell, I, H, bias=B is not None, direction=direction, activations=activations,
                               clip=None if clip is None else float(clip),
                               linear_before_reset=linear_before_reset, peepholes=P is not None,
                               coupled_input_forget=coupled)
        layer.validate("layer")
    except SpecError as exc:
        fail(str(exc))

    weights = {}
    for d, prefix in enumerate(("", "reverse.")[:D]):
        weights[prefix + "W"] = _canonical(cell, coupled, W[d])
        weights[prefix + "R"] = _canonical(cell, coupled, R[d])
        if B is not None:
            Wb, Rb = np.split(B[d], 2)
            weights[prefix + "Wb"] = _canonical(cell, coupled, Wb)
            weights[prefix + "Rb"] = _canonical(cell, coupled, Rb)
        if P is not None:
            weights[prefix + "P"] = _canonical_peepholes(coupled, P[d])
    for name, value in weights.items():
        if not np.isfinite(value).all():
            fail(f"weights {name} hold non-finite values (or overflow float32)")
    return RecurrentNode(layer, weights, layout, initial_h, initial_c, sequence_lens)


def _canonical(cell: str, coupled: bool, tensor) -> np.ndarray:
    """One direction's W, R, Wb or Rb with its gate blocks moved from ONNX's order to the canonical one."""
    if cell == "lstm":
        i, o, f, c = np.split(tensor, 4)
        blocks = (i, c, o) if coupled else (i, f, c, o)  # coupled: f = 1 - i, its own block is never read
    elif cell == "gru":
        z, r, h = np.split(tensor, 3)
        blocks = (r, z, h)
    else:
        blocks = (tensor,)
    return np.concatenate(blocks).astype(np.float32)


def _canonical_peepholes(coupled: bool, P) -> np.ndarray:
    """ONNX's P (3H,) i, o, f -> canonical i, f, o (i, o when coupled)."""
    p_i, p_o, p_f = np.split(P, 3)
    return np.concatenate((p_i, p_o) if coupled else (p_i, p_f, p_o)).astype(np.float32)


def describe(node, where: str) -> str:
    """How errors name a node: ``where (LSTM 'name')``, or ``where (LSTM)`` for an unnamed one."""
    return f"{where} ({node.op_type} {node.name!r})" if node.name else f"{where} ({node.op_type})"


def _attributes(node, fail) -> dict:
    from onnx import helper

    attrs = {}
    for attr in node.attribute:
        if attr.ref_attr_name:
            fail(f"attribute {attr.name} refers to a function attribute; only literal values are supported")
        attrs[attr.name] = helper.get_attribute_value(attr)
    return attrs


def _activations(cell: str, D: int, attrs: dict, fail, where: str) -> tuple[Activation, ...]:
    """ONNX's ``activations`` with ``activation_alpha``/``activation_beta``, read as onnxruntime reads them.

    Each list is consumed in order by the functions that take that parameter; a function the list does
    not reach gets onnxruntime's default, which is ONNX's for LeakyRelu (0.01), HardSigmoid (0.2, 0.5)
    and Elu (1.0) but 0.0 for Affine, ThresholdedRelu and ScaledTanh (ONNX's Affine and ThresholdedRelu
    default alpha to 1.0): logged as a warning, since another runtime may read such a node differently.
    A forward RNN given two functions uses the first (ONNX's RNN schema once listed Tanh, Tanh).
    """
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in attrs.get("activations", [])]
    alphas = [float(a) for a in attrs.get("activation_alpha", [])]
    betas = [float(b) for b in attrs.get("activation_beta", [])]
    slots = len(CELL_ACTIVATIONS[cell])
    if not names:
        if alphas or betas:
            _log.warning("%s: activation_alpha/activation_beta given without activations: ignored", where)
        return ()
    if cell == "rnn" and D == 1 and len(names) == 2:
        names = names[:1]
    if len(names) not in (slots, slots * D):
        fail(f"activations lists {len(names)} function(s); {cell.upper()} takes {slots} per direction "
             f"({slots * D} for {D} direction(s))")
    result = []
    for name in names:
        entry = ACTIVATIONS.get(name.lower())
        if entry is None:
            fail(f"unsupported activation {name!r} (supported: Relu, Tanh, Sigmoid, Affine, LeakyRelu, "
                 "ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign, Softplus)")
        edgernn_name, uses_alpha, uses_beta = entry
        defaults = ORT_DEFAULTS.get(edgernn_name, (None, None))
        onnx_defaults = ACTIVATION_DEFAULTS[edgernn_name]
        values = []
        for uses, pending, default, onnx_default, what in (
                (uses_alpha, alphas, defaults[0], onnx_defaults[0], "alpha"),
                (uses_beta, betas, defaults[1], onnx_defaults[1], "beta")):
            if uses and pending:
                values.append(pending.pop(0))
                continue
            if uses and default is not None and default != onnx_default:
                _log.warning("%s: %s has no activation_%s value; using onnxruntime's default %g, which differs "
                             "from the ONNX operator's", where, name, what, default)
            values.append(default)
        result.append(Activation(edgernn_name, *values))
    if alphas or betas:
        _log.warning("%s: activation_alpha/activation_beta hold %d/%d value(s) no activation uses: ignored, "
                     "as onnxruntime does", where, len(alphas), len(betas))
    return tuple(result)


# ---- state: ONNX's initial_h / initial_c / Y_h / Y_c <-> edgernn state rows --------------------------
def pack_initial_state(layer: RecurrentLayer, initial_h, initial_c, batch: int, layout: int = 0) -> np.ndarray:
    """ONNX initial_h (D, B, Hp) and initial_c (D, B, H) ((B, D, .) with ``layout`` 1), either may be None
    for zeros -> (B, layer.state_size) float32 rows, each direction's h then (LSTM) c."""
    D, Hp, H = layer.directions, layer.unit_output_size, layer.hidden_size
    rows = np.zeros((batch, D, layer.state_size // D), np.float32)
    parts = [(initial_h, 0, Hp, "initial_h")]
    if layer.cell == "lstm":
        parts.append((initial_c, Hp, H, "initial_c"))
    elif initial_c is not None:
        raise ConversionError(f"initial_c: only an LSTM has a cell state ({layer.cell} layer)")
    for value, start, width, what in parts:
        if value is None:
            continue
        value = np.asarray(value)
        expected = (D, batch, width) if layout == 0 else (batch, D, width)
        if value.shape != expected:
            raise ConversionError(f"{what}: expected shape {expected} (layout {layout}), got {value.shape}")
        rows[:, :, start:start + width] = value if layout == 1 else value.transpose(1, 0, 2)
    return rows.reshape(batch, layer.state_size)


def unpack_state(layer: RecurrentLayer, rows, layout: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, state_size) rows -> ONNX Y_h (D, B, Hp) and Y_c (D, B, H) (None unless an LSTM);
    (B, D, .) with ``layout`` 1."""
    D, Hp, H = layer.directions, layer.unit_output_size, layer.hidden_size
    rows = np.asarray(rows).reshape(len(rows), D, layer.state_size // D)
    Y_h = rows[:, :, :Hp]
    Y_c = rows[:, :, Hp:Hp + H] if layer.cell == "lstm" else None
    order = (0, 1, 2) if layout == 1 else (1, 0, 2)
    return (np.ascontiguousarray(Y_h.transpose(order)),
            None if Y_c is None else np.ascontiguousarray(Y_c.transpose(order)))
