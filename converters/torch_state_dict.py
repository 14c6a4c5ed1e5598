"""A PyTorch recurrent stack's architecture read from tensor names and shapes alone.

A state dict, a TorchScript module and an ``nn.RNN``/``GRU``/``LSTM`` all carry the same tensors
(``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, each with an
optional ``_reverse`` suffix), so one reader serves all three. What shapes cannot tell -- an RNN's
nonlinearity, the head's activations -- comes from the caller.

PyTorch's layout is edgernn's canonical one (see `edgernn.spec`), so tensors are renamed, never permuted:
``weight_ih`` -> ``W``, ``weight_hh`` -> ``R``, ``bias_ih`` -> ``Wb``, ``bias_hh`` -> ``Rb``, ``weight_hr`` ->
``proj``, under ``layers.{k}.`` (``layers.{k}.reverse.`` for ``_reverse`` tensors).
"""

from __future__ import annotations

import re

import numpy as np

from edgernn.errors import ConversionError
from edgernn.spec import CELLS, RecurrentLayer

ONNX_HINT = "export to ONNX instead"
RECURRENT_KEY = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)
NONLINEARITIES = ("tanh", "relu")
_CELL_OF_GATES = {CELLS[cell]: cell for cell in ("rnn", "gru", "lstm")}  # what PyTorch has
_RENAME = (("weight_ih", "W"), ("weight_hh", "R"), ("bias_ih", "Wb"), ("bias_hh", "Rb"), ("weight_hr", "proj"))


def array(tensor) -> np.ndarray:
    """A float32 NumPy copy of a (possibly CUDA, half or bfloat16) tensor."""
    import torch

    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def recurrent_keys(tensors: dict, where: str) -> dict:
    """``{key: match}`` of the recurrent tensors, refusing none at all and several modules' worth."""
    recurrent = {key: match for key in tensors if (match := RECURRENT_KEY.match(key))}
    if not recurrent:
        raise ConversionError(f"{where}: no recurrent weights (<prefix>weight_ih_l0, weight_hh_l0, ...) found")
    prefixes = sorted({match["prefix"] for match in recurrent.values()})
    if len(prefixes) > 1:
        raise ConversionError(
            f"{where}: recurrent weights under several prefixes ({', '.join(map(repr, prefixes))}); edgernn converts "
            f"one recurrent module (stack layers with num_layers); {ONNX_HINT}"
        )
    return recurrent


def recurrent_layers(tensors: dict, recurrent: dict, where: str, nonlinearity=None):
    """Spec layers and edgernn-named float32 weights of the one recurrent module in ``tensors``.

    The cell comes from gate rows per unit, the sizes from shapes, bidirectional from ``_reverse``
    tensors, the projection from ``weight_hr``; ``nonlinearity`` (rnn cells: tanh or relu) from the caller.
    """
    prefix = next(iter(recurrent.values()))["prefix"]
    count = 1 + max(int(match["layer"]) for match in recurrent.values())
    suffixes = ("", "_reverse") if any(match["reverse"] for match in recurrent.values()) else ("",)
    layers, weights, width, cell = [], {}, None, None
    for k in range(count):
        found = [{kind: tensors.get(f"{prefix}{kind}_l{k}{suffix}") for kind, _ in _RENAME} for suffix in suffixes]
        shapes = None
        for suffix, t in zip(suffixes, found):
            label = f"{where}: {prefix}*_l{k}{suffix}"
            if t["weight_ih"] is None or t["weight_hh"] is None or (t["bias_ih"] is None) != (t["bias_hh"] is None):
                raise ConversionError(f"{where}: layer {k}{' (reverse)' if suffix else ''} of "
                                      f"{prefix or 'the recurrent module'} misses some of weight_ih_l{k}{suffix}, "
                                      f"weight_hh_l{k}{suffix}, bias_ih_l{k}{suffix}, bias_hh_l{k}{suffix}")
            these = {kind: None if v is None else tuple(v.shape) for kind, v in t.items()}
            if shapes is not None and these != shapes:
                raise ConversionError(f"{label}: shapes {these} differ from the forward direction's {shapes}")
            shapes = these
        t = found[0]
        cell, hidden, proj = _layer_shapes(t, width, cell, f"{where}: {prefix}*_l{k}")
        layer = RecurrentLayer(cell, int(t["weight_ih"].shape[1]), hidden, bias=t["bias_ih"] is not None,
                               direction="bidirectional" if len(suffixes) == 2 else "forward",
                               activations=rnn_activations(cell, nonlinearity), proj_size=proj)
        for edge, tensors_of_direction in zip(layer.prefixes(k), found):
            for kind, short in _RENAME:
                if tensors_of_direction[kind] is not None:
                    weights[edge + short] = array(tensors_of_direction[kind])
        layers.append(layer)
        width = layer.output_size
    if len({layer.bias for layer in layers}) > 1:
        raise ConversionError(f"{where}: some recurrent layers have biases and some not; one module has one bias flag")
    return layers, weights


def _layer_shapes(t: dict, width, cell, where: str):
    """(cell, hidden, proj_size) of one layer, checking every shape against the others and the layer below."""
    W, R, hr = t["weight_ih"], t["weight_hh"], t["weight_hr"]
    if hr is not None and (hr.dim() != 2 or 0 in hr.shape):
        raise ConversionError(f"{where}: weight_hr has shape {tuple(hr.shape)}, not (proj_size, H)")
    columns = hr.shape[1] if hr is not None else (R.shape[1] if R.dim() == 2 else 0)
    expected_R = "(G*H, proj_size)" if hr is not None else "(G*H, H)"
    if R.dim() != 2 or columns == 0 or R.shape[0] % columns or (hr is not None and R.shape[1] != hr.shape[0]):
        raise ConversionError(f"{where}: weight_hh has shape {tuple(R.shape)}, not {expected_R}")
    rows, hidden = R.shape[0], int(columns)
    found = _CELL_OF_GATES.get(rows // hidden)
    if found is None:
        raise ConversionError(f"{where}: weight_hh has {rows // hidden} gate blocks; rnn has 1, gru 3, lstm 4")
    if hr is not None and found != "lstm":
        raise ConversionError(f"{where}: weight_hr (a projection) on a {found} layer; only an LSTM projects")
    if cell is not None and found != cell:
        raise ConversionError(f"{where}: a {found} layer on top of {cell} layers; one module has one cell type")
    if W.dim() != 2 or W.shape[0] != rows or (width is not None and W.shape[1] != width):
        raise ConversionError(f"{where}: weight_ih has shape {tuple(W.shape)}, expected ({rows}, "
                              f"{width if width is not None else 'input_size'})")
    for kind in ("bias_ih", "bias_hh"):
        b = t[kind]
        if b is not None and tuple(b.shape) != (rows,):
            raise ConversionError(f"{where}: biases must have shape ({rows},), got {tuple(b.shape)}")
    return found, hidden, 0 if hr is None else int(hr.shape[0])


def rnn_activations(cell: str, nonlinearity) -> tuple:
    """The spec's ``activations`` for PyTorch's nonlinearity flag: () (the default tanh) or ("relu",)."""
    if cell != "rnn":
        if nonlinearity is not None:
            raise ConversionError(f"nonlinearity={nonlinearity!r} applies to rnn cells only; this is a {cell}")
        return ()
    if nonlinearity is None or nonlinearity == "tanh":
        return ()
    if nonlinearity not in NONLINEARITIES:
        raise ConversionError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
    return (nonlinearity,)


def linear_head(tensors: dict, keys: list, width: int, where: str) -> list:
    """Dense layers ``[name, W, b, activation]`` from the keys after the recurrent ones, in order."""
    head, index = [], 0
    while index < len(keys):
        key = keys[index]
        W = tensors[key]
        if not key.endswith("weight") or W.dim() != 2:
            raise ConversionError(
                f"{where}: {key!r} {tuple(W.shape)} is not a Linear layer's weight; edgernn reads a recurrent module "
                f"followed by nn.Linear layers; {ONNX_HINT}"
            )
        name = key[: -len("weight")]
        if W.shape[1] != width:
            raise ConversionError(f"{where}: {key!r} takes {W.shape[1]} inputs, but the layer before gives {width}")
        b = None
        if index + 1 < len(keys) and keys[index + 1] == f"{name}bias":
            b = tensors[keys[index + 1]]
            if tuple(b.shape) != (W.shape[0],):
                raise ConversionError(f"{where}: {name}bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
            index += 1
        head.append([name.rstrip(".") or "weight", array(W), None if b is None else array(b), "identity"])
        width, index = W.shape[0], index + 1
    return head


# ---- initial states: PyTorch's h0 / c0 <-> an edgernn state row -------------------------------------
INITIAL_STATE_NAMES = ("h0", "c0")
"""A trained initial state, by convention: a parameter or buffer ``h0`` (and, for an LSTM, ``c0``) of the
module around the recurrent layer, or state dict entries ``[<prefix>.]h0`` / ``c0``. Shapes as PyTorch's
``nn.LSTM(x, (h0, c0))`` takes them: (num_layers * directions, Hp) or with a batch axis of 1,
(num_layers * directions, 1, Hp); c0 with ``hidden_size`` features."""


def initial_state_row(layers, h0, c0, where: str) -> np.ndarray:
    """PyTorch h0 / c0 (either may be None for zeros) of one recurrent module -> its (state_size,) state row."""
    from .onnx_ops import pack_initial_state  # ONNX's initial_h per layer is PyTorch's h0 sliced by layer

    first = layers[0]
    count, D = len(layers), first.directions
    if c0 is not None and first.cell != "lstm":
        raise ConversionError(f"{where}: c0 given, but only an LSTM has a cell state (this is a {first.cell})")
    parts = []
    for value, width, what in ((h0, first.unit_output_size, "h0"), (c0, first.hidden_size, "c0")):
        if value is None:
            parts.append(None)
            continue
        value = array(value) if hasattr(value, "detach") else np.asarray(value, np.float32)  # a tensor, or not
        shape = value.shape
        if value.ndim == 2:
            value = value[:, None, :]
        if value.shape != (count * D, 1, width):
            raise ConversionError(f"{where}: {what} has shape {tuple(shape)}; expected ({count * D}, {width}) "
                                  f"or ({count * D}, 1, {width}): (num_layers * directions, [batch 1,] "
                                  f"{'hidden_size' if what == 'c0' or not first.proj_size else 'proj_size'})")
        parts.append(value)
    h0, c0 = parts
    rows = [pack_initial_state(layer, None if h0 is None else h0[k * D:(k + 1) * D],
                               None if c0 is None else c0[k * D:(k + 1) * D], 1)[0]
            for k, layer in enumerate(layers)]
    return np.concatenate(rows)


def initial_state_tensors(layers, row: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of `initial_state_row`: (h0 (num_layers * D, 1, Hp), c0 (num_layers * D, 1, H) or None)."""
    from .onnx_ops import unpack_state

    hs, cs, at = [], [], 0
    for layer in layers:
        h, c = unpack_state(layer, row[None, at:at + layer.state_size])
        hs.append(h)
        cs.append(c)
        at += layer.state_size
    return np.concatenate(hs), None if cs[0] is None else np.concatenate(cs)
