"""The model description: a stack of recurrent layers, then dense layers, with optional input normalisation.

A spec says *what* a model computes; its weights are a separate ``{name: ndarray}`` dict whose names and
shapes the spec fixes (`ModelSpec.tensor_shapes`). The spec is plain data, validated on construction,
with a JSON round trip (`to_json` / `from_json`) that refuses unknown or missing fields by name.

Tensor names and layouts (PyTorch's, which the converters permute into):

======================  =================  =================================================
name                    shape              meaning
======================  =================  =================================================
``layers.{l}.W``        (G*H, I)           input weights, gate blocks stacked in canonical order
``layers.{l}.R``        (G*H, H)           recurrent weights, same gate order
``layers.{l}.Wb``       (G*H,)             input bias (only when ``bias``)
``layers.{l}.Rb``       (G*H,)             recurrent bias (only when ``bias``)
``head.{j}.W``          (out, in)          dense weights (``y = act(W x + b)``)
``head.{j}.b``          (out,)             dense bias (only when ``bias``)
``input.mean``          (I,)               input normalisation ``(x - mean) / std``
``input.std``           (I,)               (only when ``normalize``)
======================  =================  =================================================

Canonical gate order (G gates of H units each):
  - ``rnn``  (G=1): the single pre-activation.
  - ``gru``  (G=3): r (reset), z (update), n (new)   -- PyTorch's order; ONNX's is z, r, h.
  - ``lstm`` (G=4): i (input), f (forget), g (cell), o (output) -- PyTorch's order; ONNX's is i, o, f, c.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import SpecError

SPEC_VERSION = 1

CELLS = {"rnn": 1, "gru": 3, "lstm": 4}
"""Cell family -> number of gate blocks G."""

RNN_ACTIVATIONS = ("tanh", "relu")
DENSE_ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "softmax")


def _plain_ints(obj, *names: str) -> None:
    """Store NumPy integers (what converters read from tensor shapes) as plain ints, so JSON holds them."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, np.integer):
            object.__setattr__(obj, name, int(value))


def _check_positive_int(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where}: must be a positive integer, got {value!r}")


def _check_bool(where: str, value) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")


def _check_choice(where: str, value, choices) -> None:
    if value not in choices:
        raise SpecError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class RecurrentLayer:
    """One unidirectional recurrent layer of ``hidden_size`` units."""

    cell: str
    input_size: int
    hidden_size: int
    bias: bool = True
    activation: str = "tanh"
    """rnn only: the cell nonlinearity, ``tanh`` or ``relu``."""
    linear_before_reset: bool = True
    """gru only: True computes ``r * (R_n h + Rb_n)`` (PyTorch), False ``R_n (r * h) + Rb_n`` (ONNX default)."""

    def __post_init__(self):
        _plain_ints(self, "input_size", "hidden_size")

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    @property
    def state_size(self) -> int:
        """Floats of state per stream: h, plus c for an LSTM."""
        return self.hidden_size * (2 if self.cell == "lstm" else 1)

    def validate(self, where: str) -> None:
        _check_choice(f"{where}.cell", self.cell, tuple(CELLS))
        _check_positive_int(f"{where}.input_size", self.input_size)
        _check_positive_int(f"{where}.hidden_size", self.hidden_size)
        _check_bool(f"{where}.bias", self.bias)
        _check_choice(f"{where}.activation", self.activation, RNN_ACTIVATIONS)
        if self.cell != "rnn" and self.activation != "tanh":
            raise SpecError(f"{where}.activation: only an rnn cell takes an activation, got {self.activation!r}")
        _check_bool(f"{where}.linear_before_reset", self.linear_before_reset)


@dataclass(frozen=True)
class DenseLayer:
    """``y = activation(W x + b)``, applied to the last recurrent layer's output at every step."""

    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "identity"

    def __post_init__(self):
        _plain_ints(self, "in_features", "out_features")

    def validate(self, where: str) -> None:
        _check_positive_int(f"{where}.in_features", self.in_features)
        _check_positive_int(f"{where}.out_features", self.out_features)
        _check_bool(f"{where}.bias", self.bias)
        _check_choice(f"{where}.activation", self.activation, DENSE_ACTIVATIONS)


@dataclass(frozen=True)
class ModelSpec:
    """A recurrent stack followed by a dense head. Validated on construction."""

    input_size: int
    layers: tuple[RecurrentLayer, ...]
    head: tuple[DenseLayer, ...] = ()
    normalize: bool = False
    """When true the model applies ``(x - input.mean) / input.std`` before the first layer."""
    name: str = ""
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(_list_of(self.layers, "layers")))
        object.__setattr__(self, "head", tuple(_list_of(self.head, "head")))
        _plain_ints(self, "input_size", "version")
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def output_size(self) -> int:
        return self.head[-1].out_features if self.head else self.layers[-1].hidden_size

    @property
    def state_size(self) -> int:
        """Floats of recurrent state per stream: every layer's h (and c), concatenated in layer order."""
        return sum(layer.state_size for layer in self.layers)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weight tensors this spec needs, by name, with their shapes (see the module docstring)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.normalize:
            shapes["input.mean"] = (self.input_size,)
            shapes["input.std"] = (self.input_size,)
        for index, layer in enumerate(self.layers):
            rows = layer.gates * layer.hidden_size
            shapes[f"layers.{index}.W"] = (rows, layer.input_size)
            shapes[f"layers.{index}.R"] = (rows, layer.hidden_size)
            if layer.bias:
                shapes[f"layers.{index}.Wb"] = (rows,)
                shapes[f"layers.{index}.Rb"] = (rows,)
        for index, dense in enumerate(self.head):
            shapes[f"head.{index}.W"] = (dense.out_features, dense.in_features)
            if dense.bias:
                shapes[f"head.{index}.b"] = (dense.out_features,)
        return shapes

    def parameter_count(self) -> int:
        count = 0
        for shape in self.tensor_shapes().values():
            size = 1
            for dim in shape:
                size *= dim
            count += size
        return count

    def flops_per_step(self) -> int:
        """Floating-point operations of one step: 2·G·H·(I+H) per recurrent layer, 2·K·N per dense layer."""
        recurrent = sum(2 * layer.gates * layer.hidden_size * (layer.input_size + layer.hidden_size)
                        for layer in self.layers)
        return recurrent + sum(2 * dense.in_features * dense.out_features for dense in self.head)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version != SPEC_VERSION:
            raise SpecError(f"version: this edgernn reads spec version {SPEC_VERSION}, got {self.version!r}")
        _check_positive_int("input_size", self.input_size)
        _check_bool("normalize", self.normalize)
        if not isinstance(self.name, str):
            raise SpecError(f"name: must be a string, got {self.name!r}")
        if not self.layers:
            raise SpecError("layers: a model needs at least one recurrent layer")
        width, source = self.input_size, "input_size"
        for index, layer in enumerate(self.layers):
            where = f"layers[{index}]"
            if not isinstance(layer, RecurrentLayer):
                raise SpecError(f"{where}: must be a RecurrentLayer, got {type(layer).__name__}")
            layer.validate(where)
            if layer.input_size != width:
                raise SpecError(f"{where}.input_size: must equal {source} ({width}), got {layer.input_size}")
            width, source = layer.hidden_size, f"{where}.hidden_size"
        for index, dense in enumerate(self.head):
            where = f"head[{index}]"
            if not isinstance(dense, DenseLayer):
                raise SpecError(f"{where}: must be a DenseLayer, got {type(dense).__name__}")
            dense.validate(where)
            if dense.in_features != width:
                raise SpecError(f"{where}.in_features: must equal {source} ({width}), got {dense.in_features}")
            width, source = dense.out_features, f"{where}.out_features"

    # ---- JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = _fields_of(cls, data, "spec")
        data["layers"] = tuple(
            RecurrentLayer(**_fields_of(RecurrentLayer, item, f"layers[{i}]"))
            for i, item in enumerate(_list_of(data.get("layers"), "layers"))
        )
        data["head"] = tuple(
            DenseLayer(**_fields_of(DenseLayer, item, f"head[{i}]"))
            for i, item in enumerate(_list_of(data.get("head", []), "head"))
        )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"spec: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def check_weights(spec: ModelSpec, weights: dict) -> dict[str, np.ndarray]:
    """float32 C-contiguous copies of exactly the tensors ``spec`` names, or a SpecError naming the tensor."""
    expected = spec.tensor_shapes()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise SpecError(f"weights: missing tensor(s) {', '.join(missing)}")
    if unexpected:
        raise SpecError(f"weights: unexpected tensor(s) {', '.join(unexpected)}")
    checked = {}
    for name, shape in expected.items():
        array = np.array(weights[name], dtype=np.float32, order="C")  # a copy: callers keep theirs
        if array.shape != shape:
            raise SpecError(f"weights[{name!r}]: expected shape {shape}, got {array.shape}")
        if not np.isfinite(array).all():
            raise SpecError(f"weights[{name!r}]: holds non-finite values")
        checked[name] = array
    if spec.normalize and not (checked["input.std"] > 0).all():
        raise SpecError("weights['input.std']: every std must be > 0")
    return checked


def _list_of(value, where: str) -> list:
    if not isinstance(value, list | tuple):
        raise SpecError(f"{where}: must be a list, got {type(value).__name__}")
    return list(value)


def _fields_of(cls, data, where: str) -> dict:
    """The keyword arguments of ``cls`` from ``data``, refusing unknown and missing fields by name."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: must be an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise SpecError(f"{where}.{key}: unknown field (known: {', '.join(known)})")
    for name, f in known.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise SpecError(f"{where}.{name}: missing required field")
    return dict(data)
