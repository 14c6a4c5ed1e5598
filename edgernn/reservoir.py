"""Echo-state networks: a fixed random reservoir of leaky-integrator units with a trained linear readout.

Only the readout is learned, in closed form (ridge regression), so an ESN trains in seconds on the device
itself, with no gradient and no PyTorch:

    model = echo_state_network(input_size=3, units=200, spectral_radius=0.9, leak=0.3, seed=1)
    model = fit_readout(model, [xs_a, xs_b], [ys_a, ys_b], ridge=1e-6, washout=50)
    y = model.step(x, state)          # streams like any other edgernn model

The reservoir is one `leaky` layer (`edgernn.cells.leaky`): h' = (1 - a) h + a tanh(W x + Wb + R h), with R
sparse and scaled to the requested spectral radius (below 1 gives the fading memory the method relies on).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .model import Model
from .spec import DenseLayer, ModelSpec, RecurrentLayer


def echo_state_network(input_size: int, units: int, *, spectral_radius: float = 0.9, leak=0.3,
                       input_scale: float = 1.0, bias_scale: float = 0.1, density: float = 0.1,
                       seed: int = 0) -> Model:
    """A reservoir without a readout: a Model whose output is the reservoir state h (``units`` floats).

    ``leak`` is one rate for every unit or one per unit, in (0, 1]; ``density`` the fraction of non-zero
    recurrent weights. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    spec = ModelSpec(input_size, (RecurrentLayer("leaky", input_size, units),), name="echo-state network")
    R = rng.uniform(-1.0, 1.0, (units, units)) * (rng.random((units, units)) < density)
    radius = np.abs(np.linalg.eigvals(R)).max()
    if radius > 0:
        R *= spectral_radius / radius
    weights = {
        "layers.0.W": rng.uniform(-input_scale, input_scale, (units, input_size)),
        "layers.0.R": R,
        "layers.0.Wb": rng.uniform(-bias_scale, bias_scale, units),
        "layers.0.Rb": np.zeros(units),
        "layers.0.leak": np.broadcast_to(np.asarray(leak, np.float64), (units,)),
    }
    return Model(spec, weights)


def reservoir_states(reservoir: Model, sequences) -> list[np.ndarray]:
    """Each sequence (T, input_size) run from the rest state -> its reservoir states (T, units)."""
    return [reservoir.run(xs, reservoir.new_state()) for xs in sequences]


def fit_readout(reservoir: Model, sequences, targets, *, ridge: float = 1e-6, washout: int = 0) -> Model:
    """The reservoir plus a dense readout fitted by ridge regression: ``y = W h + b``.

    ``sequences`` and ``targets`` are lists of (T, input_size) and (T, outputs) arrays (or one of each);
    the first ``washout`` steps of every sequence, while the state still remembers the rest state, are
    left out of the fit. Returns a new Model; the reservoir's weights are unchanged.
    """
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences, targets = [sequences], [targets]
    spec = reservoir.spec
    if spec.head or len(spec.layers) != 1 or spec.layers[0].cell != "leaky":
        raise InputError("reservoir: fit_readout needs a model from echo_state_network (one leaky layer, no head)")
    states = reservoir_states(reservoir, sequences)
    H = np.concatenate([h[washout:] for h in states]).astype(np.float64)
    Y = np.concatenate([np.asarray(y, np.float64).reshape(len(y), -1)[washout:] for y in targets])
    if len(H) != len(Y) or len(H) == 0:
        raise InputError(f"targets: {len(Y)} target rows for {len(H)} states after washout; give one per sample")
    X = np.hstack([H, np.ones((len(H), 1))])  # the last column fits the bias
    regulariser = ridge * np.eye(X.shape[1])
    regulariser[-1, -1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(X.T @ X + regulariser, X.T @ Y)  # (units + 1, outputs)
    head = DenseLayer(spec.layers[0].hidden_size, Y.shape[1])
    weights = dict(reservoir.weights, **{"head.0.W": solution[:-1].T, "head.0.b": solution[-1]})
    return Model(ModelSpec(spec.input_size, spec.layers, (head,), spec.normalize, spec.name), weights)
