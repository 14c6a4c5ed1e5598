"""The model description: a stack of recurrent layers, then dense layers, with optional input normalisation.

A spec says *what* a model computes; its weights are a separate ``{name: ndarray}`` dict whose names and
shapes the spec fixes (`ModelSpec.tensor_shapes`). The spec is plain data, validated on construction,
with a JSON round trip (`to_json` / `from_json`) that refuses unknown or missing fields by name.

Tensor names and layouts (PyTorch's, which the converters permute into). ``{p}`` is ``layers.{l}.`` for a
layer's (only or forward) direction and ``layers.{l}.reverse.`` for the second direction of a
bidirectional one; H is ``hidden_size``, Hp is ``proj_size`` when set, else H:

======================  =================  =================================================
name                    shape              meaning
======================  =================  =================================================
``{p}W``                (G*H, I)           input weights, gate blocks stacked in canonical order
``{p}R``                (G*H, Hp)          recurrent weights, same gate order
``{p}Wb``               (G*H,)             input bias (only when ``bias``)
``{p}Rb``               (G*H,)             recurrent bias (only when ``bias``)
``{p}P``                (3H,) or (2H,)     lstm peepholes i, f, o (i, o when coupled)
``{p}proj``             (Hp, H)            lstm projection, ``h = proj @ (o * tanh(c))``
``{p}leak``             (H,)               leaky: leak rate per unit, in (0, 1]
``head.{j}.W``          (out, in)          dense weights (``y = act(W x + b)``)
``head.{j}.b``          (out,)             dense bias (only when ``bias``)
``input.mean``          (I,)               input normalisation ``(x - mean) / std``
``input.std``           (I,)               (only when ``normalize``)
``rest_state``          (state_size,)      the state a stream starts from (only when ``rest_state``
                                           is not ``"zeros"``; see `REST_STATE_ORIGINS`)
======================  =================  =================================================

Canonical gate order (G gates of H units each):
  - ``rnn``, ``leaky`` (G=1): the single pre-activation.
  - ``mgu``  (G=2): f (forget), n (new).
  - ``gru``  (G=3): r (reset), z (update), n (new)   -- PyTorch's order; ONNX's is z, r, h.
  - ``lstm`` (G=4): i (input), f (forget), g (cell), o (output) -- PyTorch's order; ONNX's is i, o, f, c.
    With ``coupled_input_forget`` (G=3): i, g, o, and f = 1 - i.

State layout per stream: layer after layer, each direction's h (Hp floats) then, for an LSTM, c (H).

Fields added after version 2 (``sample_rate``, ``rest_state``, ``rest_state_note``, ``labels``,
``model_version``) are optional and
written only when set: a spec without them is the same JSON as before (the same model fingerprint, so
stream snapshots and journals stay valid), and an older edgernn refuses a spec that uses them by the
field's name rather than silently starting streams from zeros.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import SpecError

SPEC_VERSION = 2
"""Version 1 specs (one ``activation`` string per rnn layer) are upgraded on read (`_upgrade`)."""

CELLS = {"rnn": 1, "leaky": 1, "mgu": 2, "gru": 3, "lstm": 4}
"""Cell family -> number of gate blocks G (an LSTM with a coupled input-forget gate has 3)."""

DIRECTIONS = ("forward", "reverse", "bidirectional")

REST_STATE = "rest_state"
"""Name of the tensor holding the rest state, (state_size,) float32."""
REST_STATE_ORIGINS = {
    # origin: how `edgernn inspect` names it. Only "zeros" has no tensor.
    "zeros": "zeros",
    "trained": "trained",                 # a learned initial state (PyTorch h0/c0, ONNX initial_h/initial_c)
    "idle": "idle",                       # settled under a constant idle input (`edgernn.rest_state.settle`)
    "calibration": "calibration file",    # the final state after a calibration sequence
    "given": "state file",                # a state given as is
}

ACTIVATION_DEFAULTS = {
    # name: (alpha, beta) -- ONNX's defaults for the recurrent operators' activation functions.
    "identity": (0.0, 0.0), "sigmoid": (0.0, 0.0), "tanh": (0.0, 0.0), "relu": (0.0, 0.0),
    "affine": (1.0, 0.0),            # alpha * x + beta
    "leaky_relu": (0.01, 0.0),       # x if x >= 0 else alpha * x
    "thresholded_relu": (1.0, 0.0),  # x if x > alpha else 0
    "scaled_tanh": (1.0, 1.0),       # alpha * tanh(beta * x)
    "hard_sigmoid": (0.2, 0.5),      # min(max(alpha * x + beta, 0), 1)
    "elu": (1.0, 0.0),               # x if x >= 0 else alpha * (exp(x) - 1)
    "softsign": (0.0, 0.0),          # x / (1 + |x|)
    "softplus": (0.0, 0.0),          # log(1 + exp(x))
    "softmax": (0.0, 0.0),           # dense layers only: over the layer's outputs
}
ELEMENTWISE = tuple(name for name in ACTIVATION_DEFAULTS if name != "softmax")

CELL_ACTIVATIONS = {
    # cell: its activation slots and their defaults, in the order ONNX lists them (f, g, h).
    "rnn": ("tanh",), "leaky": ("tanh",), "gru": ("sigmoid", "tanh"), "mgu": ("sigmoid", "tanh"),
    "lstm": ("sigmoid", "tanh", "tanh"),
}


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


def _check_finite_number(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise SpecError(f"{where}: must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Activation:
    """An activation function with ONNX's optional parameters (see `ACTIVATION_DEFAULTS` for each)."""

    name: str
    alpha: float | None = None
    beta: float | None = None

    def __post_init__(self):
        defaults = ACTIVATION_DEFAULTS.get(self.name, (0.0, 0.0))
        for attr, default in zip(("alpha", "beta"), defaults):
            value = getattr(self, attr)
            if value is None:
                object.__setattr__(self, attr, default)
            elif isinstance(value, int | float | np.floating) and not isinstance(value, bool):
                object.__setattr__(self, attr, float(value))  # anything else is refused by validate

    def validate(self, where: str, choices=ELEMENTWISE) -> None:
        _check_choice(where, self.name, choices)
        _check_finite_number(f"{where}.alpha", self.alpha)
        _check_finite_number(f"{where}.beta", self.beta)

    def to_json_value(self):
        """A bare name when the parameters are the defaults, else ``{"name", "alpha", "beta"}``."""
        if (self.alpha, self.beta) == ACTIVATION_DEFAULTS.get(self.name, (0.0, 0.0)):
            return self.name
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta}

    def __str__(self):
        text = self.to_json_value()
        return text if isinstance(text, str) else f"{self.name}({self.alpha:g}, {self.beta:g})"


def as_activation(value):
    """An `Activation` from a name, a ``{"name", "alpha", "beta"}`` mapping or an Activation; anything
    else is returned as it is, for `check_activation` to refuse with the field's full path."""
    if isinstance(value, str):
        return Activation(value)
    if isinstance(value, dict) and set(value) <= {"name", "alpha", "beta"} and "name" in value:
        return Activation(**value)
    return value


def check_activation(where: str, value, choices=ELEMENTWISE) -> None:
    if isinstance(value, dict):
        _fields_of(Activation, value, where)  # names the unknown or missing field
    if not isinstance(value, Activation):
        raise SpecError(f"{where}: must be one of {', '.join(choices)} (or {{name, alpha, beta}}), got {value!r}")
    value.validate(where, choices)


@dataclass(frozen=True)
class RecurrentLayer:
    """One recurrent layer of ``hidden_size`` units, run forward, reversed or in both directions.

    Variants (see the cell modules for the equations): ``peepholes``, ``coupled_input_forget`` and
    ``proj_size`` for an LSTM; ``linear_before_reset`` for a GRU; ``clip`` bounds every activation's input
    to [-clip, clip] (ONNX's ``clip``). ``activations`` overrides the cell's default functions
    (`CELL_ACTIVATIONS`): one per slot, or one per slot per direction for a bidirectional layer
    (forward's first, as ONNX lists them).
    """

    cell: str
    input_size: int
    hidden_size: int
    bias: bool = True
    direction: str = "forward"
    activations: tuple = ()
    clip: float | None = None
    linear_before_reset: bool = True
    """gru only: True computes ``r * (R_n h + Rb_n)`` (PyTorch), False ``R_n (r * h) + Rb_n`` (ONNX default)."""
    peepholes: bool = False
    coupled_input_forget: bool = False
    proj_size: int = 0

    def __post_init__(self):
        _plain_ints(self, "input_size", "hidden_size", "proj_size")
        if isinstance(self.activations, list | tuple):
            object.__setattr__(self, "activations", tuple(as_activation(a) for a in self.activations))
        if isinstance(self.clip, int | np.floating) and not isinstance(self.clip, bool):
            object.__setattr__(self, "clip", float(self.clip))

    @property
    def gates(self) -> int:
        """Gate blocks per direction: i, f, g, o for an LSTM (i, g, o when the input-forget gate is coupled)."""
        return CELLS[self.cell] - (1 if self.coupled_input_forget else 0)

    @property
    def directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def unit_output_size(self) -> int:
        """Width of one direction's h: ``proj_size`` when the LSTM projects, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    @property
    def output_size(self) -> int:
        """Width of what the layer hands on: one direction's h, or both concatenated (forward first)."""
        return self.unit_output_size * self.directions

    @property
    def state_size(self) -> int:
        """Floats of state per stream: per direction h, plus c (``hidden_size``) for an LSTM."""
        return self.directions * (self.unit_output_size + (self.hidden_size if self.cell == "lstm" else 0))

    def activations_for(self, direction: int) -> tuple[Activation, ...]:
        """The activation of every slot of the cell for direction 0 (forward) or 1 (reverse)."""
        slots = len(CELL_ACTIVATIONS[self.cell])
        if not self.activations:
            return tuple(Activation(name) for name in CELL_ACTIVATIONS[self.cell])
        if len(self.activations) == slots:
            return self.activations
        return self.activations[direction * slots:(direction + 1) * slots]

    def prefixes(self, index: int) -> tuple[str, ...]:
        """Tensor name prefix of each direction: ``layers.{index}.`` then ``layers.{index}.reverse.``."""
        return (f"layers.{index}.", f"layers.{index}.reverse.")[:self.directions]

    def tensor_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        rows, H = self.gates * self.hidden_size, self.hidden_size
        shapes = {}
        for prefix in self.prefixes(index):
            shapes[prefix + "W"] = (rows, self.input_size)
            shapes[prefix + "R"] = (rows, self.unit_output_size)
            if self.bias:
                shapes[prefix + "Wb"] = (rows,)
                shapes[prefix + "Rb"] = (rows,)
            if self.peepholes:
                shapes[prefix + "P"] = ((2 if self.coupled_input_forget else 3) * H,)
            if self.proj_size:
                shapes[prefix + "proj"] = (self.proj_size, H)
            if self.cell == "leaky":
                shapes[prefix + "leak"] = (H,)
        return shapes

    def validate(self, where: str) -> None:
        _check_choice(f"{where}.cell", self.cell, tuple(CELLS))
        _check_positive_int(f"{where}.input_size", self.input_size)
        _check_positive_int(f"{where}.hidden_size", self.hidden_size)
        _check_bool(f"{where}.bias", self.bias)
        _check_choice(f"{where}.direction", self.direction, DIRECTIONS)
        if not isinstance(self.activations, tuple):
            raise SpecError(f"{where}.activations: must be a list, got {type(self.activations).__name__}")
        slots = len(CELL_ACTIVATIONS[self.cell])
        if self.activations and len(self.activations) not in {slots, slots * self.directions}:
            raise SpecError(f"{where}.activations: a {self.direction} {self.cell} layer takes {slots} "
                            f"activation(s) (or one set per direction), got {len(self.activations)}")
        for i, activation in enumerate(self.activations):
            check_activation(f"{where}.activations[{i}]", activation)
        if self.clip is not None:
            _check_finite_number(f"{where}.clip", self.clip)
            if self.clip <= 0:
                raise SpecError(f"{where}.clip: must be > 0, got {self.clip!r}")
        for flag in ("linear_before_reset", "peepholes", "coupled_input_forget"):
            _check_bool(f"{where}.{flag}", getattr(self, flag))
        if self.cell != "gru" and not self.linear_before_reset:
            raise SpecError(f"{where}.linear_before_reset: only a gru layer takes it")
        if isinstance(self.proj_size, bool) or not isinstance(self.proj_size, int) or self.proj_size < 0:
            raise SpecError(f"{where}.proj_size: must be a non-negative integer, got {self.proj_size!r}")
        for flag in ("peepholes", "coupled_input_forget", "proj_size"):
            if getattr(self, flag) and self.cell != "lstm":
                raise SpecError(f"{where}.{flag}: only an lstm layer takes it")


@dataclass(frozen=True)
class DenseLayer:
    """``y = activation(W x + b)``, applied to the last recurrent layer's output at every step."""

    in_features: int
    out_features: int
    bias: bool = True
    activation: Activation | str = "identity"

    def __post_init__(self):
        _plain_ints(self, "in_features", "out_features")
        object.__setattr__(self, "activation", as_activation(self.activation))

    def validate(self, where: str) -> None:
        _check_positive_int(f"{where}.in_features", self.in_features)
        _check_positive_int(f"{where}.out_features", self.out_features)
        _check_bool(f"{where}.bias", self.bias)
        check_activation(f"{where}.activation", self.activation, tuple(ACTIVATION_DEFAULTS))


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
    sample_rate: float | None = None
    """Samples per second (Hz) the model was trained at, or None when unknown (`sample_period`)."""
    rest_state: str = "zeros"
    """Where the state a stream starts from came from (`REST_STATE_ORIGINS`); not "zeros": tensor ``rest_state``."""
    rest_state_note: str = ""
    """A few words on how the rest state was made (``converged after 412 steps``), shown by ``edgernn inspect``."""
    labels: tuple[str, ...] = ()
    """A classifier's class names, one per output (Home Assistant shows the top one); empty when not set."""
    model_version: str = ""
    """The trained model's version, dotted numbers (``"3"``, ``"1.4.2"``): signed model updates refuse one that
    is not newer than the model serving (`version_key`); empty when not set."""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(_list_of(self.layers, "layers")))
        object.__setattr__(self, "head", tuple(_list_of(self.head, "head")))
        _plain_ints(self, "input_size", "version")
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.sample_rate, int | np.integer | np.floating) and not isinstance(self.sample_rate, bool):
            object.__setattr__(self, "sample_rate", float(self.sample_rate))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def output_size(self) -> int:
        return self.head[-1].out_features if self.head else self.layers[-1].output_size

    @property
    def state_size(self) -> int:
        """Floats of recurrent state per stream: every layer's h (and c), concatenated in layer order."""
        return sum(layer.state_size for layer in self.layers)

    @property
    def sample_period(self) -> float | None:
        """Seconds between samples (``1 / sample_rate``), or None when the sample rate is not set."""
        return None if self.sample_rate is None else 1.0 / self.sample_rate

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weight tensors this spec needs, by name, with their shapes (see the module docstring)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.normalize:
            shapes["input.mean"] = (self.input_size,)
            shapes["input.std"] = (self.input_size,)
        for index, layer in enumerate(self.layers):
            shapes.update(layer.tensor_shapes(index))
        for index, dense in enumerate(self.head):
            shapes[f"head.{index}.W"] = (dense.out_features, dense.in_features)
            if dense.bias:
                shapes[f"head.{index}.b"] = (dense.out_features,)
        if self.rest_state != "zeros":
            shapes[REST_STATE] = (self.state_size,)
        return shapes

    def parameter_count(self) -> int:
        """Weights, biases and normalisation; the rest state is a state, not counted."""
        count = 0
        for name, shape in self.tensor_shapes().items():
            if name == REST_STATE:
                continue
            size = 1
            for dim in shape:
                size *= dim
            count += size
        return count

    @property
    def state_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """What a state row holds, layer by layer: (directions, h size, c size or 0). Two models with the same
        shapes can take over each other's states (a retrained model of the same architecture)."""
        return tuple((layer.directions, layer.unit_output_size, layer.hidden_size if layer.cell == "lstm" else 0)
                     for layer in self.layers)

    @property
    def streamable(self) -> bool:
        """True when every layer runs forward in time, so the model can advance one sample at a time.
        Reverse and bidirectional layers need the whole sequence (or a window of it): `Model.run` only."""
        return all(layer.direction == "forward" for layer in self.layers)

    def flops_per_step(self) -> int:
        """Floating-point operations of one step: 2·G·H·(I+H) per recurrent layer and direction (plus
        2·P·H for a projection), 2·K·N per dense layer."""
        recurrent = sum(
            layer.directions * (2 * layer.gates * layer.hidden_size * (layer.input_size + layer.unit_output_size)
                                + 2 * layer.proj_size * layer.hidden_size)
            for layer in self.layers)
        return recurrent + sum(2 * dense.in_features * dense.out_features for dense in self.head)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version != SPEC_VERSION:
            raise SpecError(f"version: this edgernn reads spec version {SPEC_VERSION} (and upgrades version 1 "
                            f"files), got {self.version!r}")
        _check_positive_int("input_size", self.input_size)
        _check_bool("normalize", self.normalize)
        if not isinstance(self.name, str):
            raise SpecError(f"name: must be a string, got {self.name!r}")
        if self.sample_rate is not None:
            _check_finite_number("sample_rate", self.sample_rate)
            if self.sample_rate <= 0:
                raise SpecError(f"sample_rate: must be > 0 Hz (or null when unknown), got {self.sample_rate!r}")
        _check_choice("rest_state", self.rest_state, tuple(REST_STATE_ORIGINS))
        if not isinstance(self.rest_state_note, str):
            raise SpecError(f"rest_state_note: must be a string, got {self.rest_state_note!r}")
        if self.rest_state == "zeros" and self.rest_state_note:
            raise SpecError("rest_state_note: a zeros rest state takes no note")
        if not isinstance(self.model_version, str) or (self.model_version and version_key(self.model_version) is None):
            raise SpecError(f"model_version: must be dotted numbers such as \"3\" or \"1.4.2\", got {self.model_version!r}")
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
            width, source = layer.output_size, f"{where} output"
        for index, dense in enumerate(self.head):
            where = f"head[{index}]"
            if not isinstance(dense, DenseLayer):
                raise SpecError(f"{where}: must be a DenseLayer, got {type(dense).__name__}")
            dense.validate(where)
            if dense.in_features != width:
                raise SpecError(f"{where}.in_features: must equal {source} ({width}), got {dense.in_features}")
            width, source = dense.out_features, f"{where}.out_features"
        self._validate_labels()

    def _validate_labels(self) -> None:
        if not isinstance(self.labels, tuple) or not all(isinstance(label, str) and label.strip()
                                                         for label in self.labels):
            raise SpecError(f"labels: must be a list of non-empty strings, got {self.labels!r}")
        if self.labels and len(self.labels) != self.output_size:
            raise SpecError(f"labels: one per output: the model has {self.output_size} outputs, got "
                            f"{len(self.labels)} labels")
        if len(set(self.labels)) != len(self.labels):
            raise SpecError(f"labels: must be distinct, got {list(self.labels)!r}")

    # ---- JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Fields added after version 2 are left out at their defaults (see the module docstring)."""
        data = dataclasses.asdict(self)
        for name, default in _OPTIONAL_FIELDS.items():
            if data[name] == default:
                del data[name]
        for layer, item in zip(self.layers, data["layers"]):
            item["activations"] = [a.to_json_value() for a in layer.activations]
        for dense, item in zip(self.head, data["head"]):
            item["activation"] = dense.activation.to_json_value()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = _upgrade(data)
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


_OPTIONAL_FIELDS = {"sample_rate": None, "rest_state": "zeros", "rest_state_note": "", "labels": (),
                    "model_version": ""}
"""Fields written only when they differ from these defaults."""


def version_key(version: str) -> tuple[int, ...] | None:
    """``"1.10.2"`` -> (1, 10, 2), which orders versions as people number them; None when not dotted numbers."""
    parts = version.split(".") if isinstance(version, str) else []
    if not parts or len(version) > 64 or not all(part.isascii() and part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


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
    for name, array in checked.items():
        if name.endswith(".leak") and not ((array > 0) & (array <= 1)).all():
            raise SpecError(f"weights[{name!r}]: every leak rate must lie in (0, 1]")
    return checked


def _upgrade(data):
    """A version 1 spec dict as version 2: an rnn layer's ``activation`` string became ``activations``."""
    if not isinstance(data, dict) or data.get("version") != 1:
        return data
    data = dict(data, version=SPEC_VERSION)
    layers = []
    for item in _list_of(data.get("layers"), "layers"):
        if isinstance(item, dict) and "activation" in item:
            item = dict(item)
            activation = item.pop("activation")
            item["activations"] = [] if activation == "tanh" else [activation]
        layers.append(item)
    data["layers"] = layers
    return data


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
