"""Leaky-integrator unit, the cell of an echo-state network: each unit keeps part of its old value,

    h' = (1 - a) * h + a * tanh(W x + Wb + R h + Rb)        a = leak (H,), one rate per unit in (0, 1]

a = 1 is a plain RNN; a small a is a slow unit (time constant 1/a steps). In an echo-state network W and
R are a fixed random reservoir and only the dense head is trained (`edgernn.reservoir`).
"""

import numpy as np

from ..jit import njit
from .activations import KERNEL_OPTIONS, clip_reference, gate, gate_numpy
from .dense import gate_preactivations, gate_preactivations_numpy


def leaky_reference(x, h, W, R, Wb, Rb, leak, f=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (H, I), R (H, H), Wb/Rb (H,) or None, leak (H,) -> h' (H,)."""
    a = W @ x + R @ h
    if Wb is not None:
        a = a + Wb + Rb
    return (1.0 - leak) * h + leak * f(clip_reference(a, clip))


@njit(**KERNEL_OPTIONS)
def leaky_layer(inp, h, WT, RT, bW, bR, leak, acts, params, gates, S, I, H):
    """Flat row-major tiles as in `edgernn.cells.rnn.rnn_layer`; ``leak`` (H,) the rate of each unit."""
    gate_preactivations(inp, h, WT, RT, bW, bR, gates, S, I, H, H)
    a = gates[:S * H]
    gate(a, acts[0], params[0], params[1], params[6])
    for s in range(S):
        h_s, a_s = h[s * H:(s + 1) * H], a[s * H:(s + 1) * H]
        for j in range(H):
            h_s[j] += leak[j] * (a_s[j] - h_s[j])  # (1 - leak) h + leak f(...)


def leaky_layer_numpy(inp, h, WT, RT, bW, bR, leak, acts, params):
    """`leaky_layer` in NumPy, where numba is missing: 2-D arrays as in `edgernn.cells.rnn.rnn_layer_numpy`."""
    a = gate_preactivations_numpy(inp, h, WT, RT, bW, bR)
    gate_numpy(a, acts[0], params[0], params[1], params[6])
    h += leak * (a - h)
