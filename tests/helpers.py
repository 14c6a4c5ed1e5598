"""Small random models for tests: a spec, weights drawn for it, and the Model built from both."""

from __future__ import annotations

import numpy as np

from edgernn.spec import DenseLayer, ModelSpec, RecurrentLayer

FAMILIES = {
    "rnn-tanh": dict(cell="rnn"),
    "rnn-relu": dict(cell="rnn", activations=("relu",)),
    "gru-lbr": dict(cell="gru", linear_before_reset=True),
    "gru-no-lbr": dict(cell="gru", linear_before_reset=False),
    "lstm": dict(cell="lstm"),
    "lstm-peepholes": dict(cell="lstm", peepholes=True),
    "lstm-coupled": dict(cell="lstm", coupled_input_forget=True),
    "lstm-proj": dict(cell="lstm", proj_size=5),
    "lstm-all": dict(cell="lstm", peepholes=True, coupled_input_forget=True, proj_size=3, clip=2.0,
                     activations=("hard_sigmoid", {"name": "leaky_relu", "alpha": 0.1}, "softsign")),
    "gru-clip-acts": dict(cell="gru", linear_before_reset=False, clip=1.5, activations=("sigmoid", "elu")),
    "mgu": dict(cell="mgu"),
    "leaky": dict(cell="leaky"),
    "rnn-acts": dict(cell="rnn", clip=0.8, activations=({"name": "scaled_tanh", "alpha": 1.5, "beta": 0.7},)),
}
"""Every cell family and variant the streaming kernels implement, as `random_spec` keyword arguments."""


def random_spec(cell: str = "lstm", input_size: int = 8, hidden: int = 64, layers: int = 1,
                head: tuple[int, ...] = (4,), normalize: bool = False, bias: bool = True,
                head_activations: tuple[str, ...] | None = None, **layer_options) -> ModelSpec:
    """``layers`` stacked ``cell`` layers of ``hidden`` units, then dense layers of widths ``head``.

    ``layer_options`` (RecurrentLayer fields: activations, linear_before_reset, variants) apply to every
    recurrent layer;
    ``head_activations`` gives one activation per dense layer (default identity).
    """
    recurrent, width = [], input_size
    for _ in range(layers):
        layer = RecurrentLayer(cell, width, hidden, bias=bias, **layer_options)
        recurrent.append(layer)
        width = layer.output_size
    dense = []
    for index, out in enumerate(head):
        act = head_activations[index] if head_activations else "identity"
        dense.append(DenseLayer(width, out, bias=bias, activation=act))
        width = out
    return ModelSpec(input_size, tuple(recurrent), tuple(dense), normalize=normalize)


def random_weights(spec: ModelSpec, seed: int = 0, scale: float = 0.3,
                   gain: float | None = None) -> dict[str, np.ndarray]:
    """Normal weights of std ``scale``; with ``gain``, matrices get std ``gain / sqrt(fan_in)`` instead
    (biases and the normalisation mean keep ``scale``), which keeps wide recurrent layers contractive."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.tensor_shapes().items():
        std = gain / np.sqrt(shape[1]) if gain is not None and len(shape) == 2 else scale
        weights[name] = rng.standard_normal(shape).astype(np.float32) * np.float32(std)
    for name in weights:
        if name.endswith(".leak"):  # leak rates lie in (0, 1]
            weights[name] = rng.uniform(0.05, 1.0, weights[name].shape).astype(np.float32)
    if "input.std" in weights:  # a std must be positive
        weights["input.std"] = rng.uniform(0.5, 2.0, spec.input_size).astype(np.float32)
    return weights


def random_model(cell: str = "lstm", seed: int = 0, scale: float = 0.3, gain: float | None = None,
                 **spec_options):
    from edgernn.model import Model

    spec = random_spec(cell, **spec_options)
    return Model(spec, random_weights(spec, seed, scale, gain))


def random_inputs(model, steps: int = 200, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, model.input_size)).astype(np.float32)
