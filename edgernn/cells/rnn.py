"""Vanilla (Elman) RNN cell:  h' = f(W x + Wb + R h + Rb),  f = tanh by default.

`rnn_reference` transcribes the equation for one sample; `rnn_layer` is the Numba kernel for a tile of S
streams (weights transposed: WT (I, H), RT (H, H)), which advances ``h`` in place. Any activation
(`edgernn.spec.ACTIVATION_DEFAULTS`) may stand in for tanh; ``clip`` bounds its input (ONNX's clip).
"""

import numpy as np

from ..jit import njit
from .activations import KERNEL_OPTIONS, clip_reference, gate, gate_numpy
from .dense import gate_preactivations, gate_preactivations_numpy


def rnn_reference(x, h, W, R, Wb, Rb, f=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (H, I), R (H, H), Wb/Rb (H,) or None -> h' (H,). ``f`` is a NumPy
    function; ``clip`` bounds its input to [-clip, clip]."""
    a = W @ x + R @ h
    if Wb is not None:
        a = a + Wb + Rb
    return f(clip_reference(a, clip))


@njit(**KERNEL_OPTIONS)
def rnn_layer(inp, h, WT, RT, bW, bR, acts, params, gates, S, I, H):
    """Flat row-major tiles: inp (S, I), h (S, H) advanced in place; WT (I, H), RT (H, H); gates (S, H)
    scratch. ``acts`` [f] activation code; ``params`` [alpha_f, beta_f, ..., clip] (clip 0: none)."""
    gate_preactivations(inp, h, WT, RT, bW, bR, gates, S, I, H, H)
    a = gates[:S * H]
    gate(a, acts[0], params[0], params[1], params[6])
    for j in range(S * H):
        h[j] = a[j]


def rnn_layer_numpy(inp, h, WT, RT, bW, bR, acts, params):
    """`rnn_layer` in NumPy, where numba is missing: inp (S, I), h (S, H) advanced in place; WT (I, H),
    RT (H, H)."""
    a = gate_preactivations_numpy(inp, h, WT, RT, bW, bR)
    gate_numpy(a, acts[0], params[0], params[1], params[6])
    h[...] = a
