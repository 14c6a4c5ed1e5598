"""The whole model in plain NumPy, transcribed from the cell equations: the oracle the kernels are tested
against. Slow and clear; it runs layer after layer over the whole sequence (which is what reverse and
bidirectional layers need), in float64 by default."""

import numpy as np

from .cells.activations import activation_reference
from .cells.dense import dense_reference
from .cells.gru import gru_reference
from .cells.leaky import leaky_reference
from .cells.lstm import lstm_reference
from .cells.mgu import mgu_reference
from .cells.rnn import rnn_reference
from .spec import ModelSpec, RecurrentLayer


def reference_run(spec: ModelSpec, weights: dict, xs, state=None, dtype=np.float64):
    """xs (T, I) -> (ys (T, O), final state row). ``state`` is a row laid out like `Model.new_state()`.

    For a reverse direction the final state is the one after its last step, i.e. after reading xs[0].
    """
    w = {name: np.asarray(value, dtype) for name, value in weights.items()}
    state = np.zeros(spec.state_size, dtype) if state is None else np.asarray(state, dtype).copy()
    xs = np.asarray(xs, dtype).reshape(-1, spec.input_size)
    if spec.normalize:
        xs = (xs - w["input.mean"]) / w["input.std"]
    offset = 0
    for index, layer in enumerate(spec.layers):
        outputs = []
        for direction, prefix in enumerate(layer.prefixes(index)):
            size = layer.state_size // layer.directions
            reverse = direction == 1 or layer.direction == "reverse"
            part = state[offset:offset + size]
            outputs.append(layer_reference(layer, direction, {k[len(prefix):]: v for k, v in w.items()
                                                             if k.startswith(prefix) and "." not in k[len(prefix):]},
                                           xs, part, reverse))
            offset += size
        xs = np.concatenate(outputs, axis=1)
    for index, dense in enumerate(spec.head):
        act = dense.activation
        xs = np.array([dense_reference(x, w[f"head.{index}.W"], w.get(f"head.{index}.b"), act.name, act.alpha,
                                       act.beta) for x in xs]).reshape(len(xs), dense.out_features)
    return xs.reshape(-1, spec.output_size), state


def layer_reference(layer: RecurrentLayer, direction: int, w: dict, xs, state, reverse: bool):
    """One direction of one layer over a sequence: xs (T, I) -> hs (T, Hp), in input order.
    ``w`` holds this direction's tensors by short name (W, R, Wb, ...); ``state`` (h, c) is updated in place."""
    acts = [activation_reference(a.name, a.alpha, a.beta) for a in layer.activations_for(direction)]
    Hp, H = layer.unit_output_size, layer.hidden_size
    W, R, Wb, Rb = w["W"], w["R"], w.get("Wb"), w.get("Rb")
    hs = np.zeros((len(xs), Hp), state.dtype)
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    for t in order:
        h = state[:Hp]
        if layer.cell == "lstm":
            h, c = lstm_reference(xs[t], h, state[Hp:Hp + H], W, R, Wb, Rb, w.get("P"), w.get("proj"),
                                  layer.coupled_input_forget, *acts, clip=layer.clip)
            state[Hp:Hp + H] = c
        elif layer.cell == "gru":
            h = gru_reference(xs[t], h, W, R, Wb, Rb, layer.linear_before_reset, *acts, clip=layer.clip)
        elif layer.cell == "mgu":
            h = mgu_reference(xs[t], h, W, R, Wb, Rb, *acts, clip=layer.clip)
        elif layer.cell == "leaky":
            h = leaky_reference(xs[t], h, W, R, Wb, Rb, w["leak"], *acts, clip=layer.clip)
        else:
            h = rnn_reference(xs[t], h, W, R, Wb, Rb, *acts, clip=layer.clip)
        state[:Hp] = h
        hs[t] = h
    return hs
