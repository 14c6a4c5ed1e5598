"""The rest state: the state every stream starts from (and a reset returns to), stored in the model file.

A model trained from zeros does not necessarily *rest* at zeros: fed its idle input it drifts to a
state of its own, and its first predictions after a start or a reset are off until it gets there. The
rest state is computed once, at conversion, and stored as the tensor ``rest_state`` (see `edgernn.spec`):

    settled = settle(model)                          # constant idle input until the state stops moving
    state = from_sequence(model, xs)                 # the final state after a calibration sequence (T, I)
    state, origin, note = read_npy("calib.npy", model)   # a calibration sequence, or a state as is
    model = with_rest_state(model, state, "idle", settled.note)

A trained initial state (PyTorch h0/c0, ONNX initial_h/initial_c) comes from the converters instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FormatError, InputError, StreamingError
from .model import Model
from .spec import REST_STATE

TOLERANCE = 1e-6
"""`settle` stops when no state value moved more than this (times max(1, max |state|)) in one step."""
MAX_STEPS = 10_000
"""`settle` gives up after this many steps (a model may oscillate or drift forever)."""


@dataclass(frozen=True)
class Settled:
    """What `settle` found: the ``state`` after ``steps`` steps, and whether it stopped moving."""

    state: np.ndarray
    steps: int
    converged: bool
    change: float
    """The largest change of one state value in the last step."""

    @property
    def note(self) -> str:
        """``converged after 412 steps``, or why not: the words ``edgernn inspect`` shows."""
        if self.converged:
            return f"converged after {self.steps} steps"
        return f"did not converge in {self.steps} steps (last change {self.change:.2g})"


def idle_input(model: Model) -> np.ndarray:
    """The input of a sensor at rest: the training mean when the model normalises its input (what the
    normalisation maps to zero), else zeros. (input_size,) float32."""
    if model.spec.normalize:
        return model.weights["input.mean"].copy()
    return np.zeros(model.input_size, np.float32)


def settle(model: Model, idle=None, *, tolerance: float = TOLERANCE, max_steps: int = MAX_STEPS) -> Settled:
    """Step ``model`` from zeros on a constant ``idle`` input (default `idle_input`) until the state stops
    moving: no value changes by more than ``tolerance * max(1, max |state|)`` in one step (relative above
    1, since float32 cannot resolve 1e-6 on larger values), or ``max_steps`` steps have run.

    Raises StreamingError for a model that cannot step one sample at a time, InputError when the state
    becomes non-finite (the model diverges under that input).
    """
    if not model.streamable:
        index, layer = next((i, l) for i, l in enumerate(model.spec.layers) if l.direction != "forward")
        raise StreamingError(f"settling steps one sample at a time, but layer {index} is {layer.direction}; "
                             "give a calibration sequence (a .npy of shape (T, input_size)) instead")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
        raise InputError(f"max_steps: must be a positive integer, got {max_steps!r}")
    if not np.isfinite(tolerance) or tolerance <= 0:
        raise InputError(f"tolerance: must be a positive number, got {tolerance!r}")
    x = idle_input(model) if idle is None else np.asarray(idle, np.float32)
    if x.shape != (model.input_size,):
        raise InputError(f"idle: expected shape ({model.input_size},), got {x.shape}")
    state = np.zeros(model.state_size, np.float32)
    before = state.copy()
    out = np.empty(model.output_size, np.float32)
    change = np.inf
    for steps in range(1, max_steps + 1):
        model.step(x, state, out)
        if not np.isfinite(state).all():
            raise InputError(f"the state diverged (non-finite after {steps} steps) under a constant idle input; "
                             "give a calibration sequence instead")
        change = float(np.max(np.abs(state - before), initial=0.0))
        if change <= tolerance * max(1.0, float(np.max(np.abs(state), initial=0.0))):
            return Settled(state, steps, True, change)
        before[:] = state
    return Settled(state, max_steps, False, change)


def from_sequence(model: Model, xs) -> np.ndarray:
    """The final state after running ``xs`` (T, input_size) from zeros: (state_size,) float32."""
    xs = np.asarray(xs)
    if xs.ndim != 2 or xs.shape[0] == 0:
        raise InputError(f"a calibration sequence must be (T, {model.input_size}) with T >= 1, got shape {xs.shape}")
    state = np.zeros(model.state_size, np.float32)
    model.run(xs, state)
    return state


def read_npy(path, model: Model) -> tuple[np.ndarray, str, str]:
    """A .npy file -> (state, origin, note): a (T, input_size) calibration sequence is run (`from_sequence`),
    a (state_size,) array is the state itself. FormatError or InputError naming the file otherwise."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, not a .npy file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(path, f"not a .npy array file ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise FormatError(path, "an .npz archive; give one array saved with numpy.save")
    if array.dtype.kind not in "fiu":
        raise InputError(f"{path}: must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise InputError(f"{path}: holds non-finite values")
    name = Path(path).name
    if array.shape == (model.state_size,):
        return array.astype(np.float32), "given", name
    if array.ndim == 2 and array.shape[1] == model.input_size and len(array):
        return from_sequence(model, array), "calibration", f"{name}, {len(array)} samples"
    raise InputError(f"{path}: shape {array.shape} is neither a calibration sequence (T, {model.input_size}) "
                     f"nor a state ({model.state_size},) of this model")


def with_rest_state(model: Model, state, origin: str, note: str = "") -> Model:
    """``model`` starting from ``state`` ((state_size,); None with origin ``"zeros"``), recording where it
    came from (`edgernn.spec.REST_STATE_ORIGINS`) and a note for ``edgernn inspect``."""
    weights = {name: value for name, value in model.weights.items() if name != REST_STATE}
    if origin != "zeros":
        weights[REST_STATE] = np.asarray(state, np.float32)
    spec = dataclasses.replace(model.spec, rest_state=origin, rest_state_note="" if origin == "zeros" else note)
    return Model(spec, weights)


def source_start(model: Model) -> np.ndarray:
    """The state the model's *source* starts from, for comparing the two: the rest state when it came
    with the source (trained), zeros when edgernn computed it (idle, calibration, given)."""
    if model.spec.rest_state == "trained":
        return model.new_state()
    return np.zeros(model.state_size, np.float32)
