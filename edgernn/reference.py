"""The whole model in plain NumPy, transcribed from the cell equations: the oracle the kernels are tested
against. Slow and clear; it keeps the state as a list of per-layer vectors, in float64 by default."""

import numpy as np

from .cells.dense import dense_reference
from .cells.gru import gru_reference
from .cells.lstm import lstm_reference
from .cells.rnn import rnn_reference
from .spec import ModelSpec


def reference_run(spec: ModelSpec, weights: dict, xs, state=None, dtype=np.float64):
    """xs (T, I) -> (ys (T, O), final state row). ``state`` is a row laid out like `Model.new_state()`."""
    w = {name: np.asarray(value, dtype) for name, value in weights.items()}
    state = np.zeros(spec.state_size, dtype) if state is None else np.asarray(state, dtype).copy()
    ys = []
    for x in np.asarray(xs, dtype):
        if spec.normalize:
            x = (x - w["input.mean"]) / w["input.std"]
        offset = 0
        for index, layer in enumerate(spec.layers):
            H = layer.hidden_size
            W, R = w[f"layers.{index}.W"], w[f"layers.{index}.R"]
            Wb, Rb = w.get(f"layers.{index}.Wb"), w.get(f"layers.{index}.Rb")
            h = state[offset:offset + H]
            if layer.cell == "lstm":
                c = state[offset + H:offset + 2 * H]
                h, c = lstm_reference(x, h, c, W, R, Wb, Rb)
                state[offset + H:offset + 2 * H] = c
            elif layer.cell == "gru":
                h = gru_reference(x, h, W, R, Wb, Rb, layer.linear_before_reset)
            else:
                h = rnn_reference(x, h, W, R, Wb, Rb, layer.activation)
            state[offset:offset + H] = h
            offset += layer.state_size
            x = h
        for index, dense in enumerate(spec.head):
            x = dense_reference(x, w[f"head.{index}.W"], w.get(f"head.{index}.b"), dense.activation)
        ys.append(x)
    return np.array(ys).reshape(-1, spec.output_size), state
