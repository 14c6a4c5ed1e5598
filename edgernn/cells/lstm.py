"""LSTM cell, gate blocks in canonical order i, f, g, o (PyTorch's; ONNX's is i, o, f, c):

    i  = sigmoid(W_i x + Wb_i + R_i h + Rb_i)
    f  = sigmoid(W_f x + Wb_f + R_f h + Rb_f)
    g  = tanh(W_g x + Wb_g + R_g h + Rb_g)
    o  = sigmoid(W_o x + Wb_o + R_o h + Rb_o)
    c' = f * c + i * g
    h' = o * tanh(c')
"""

import numpy as np
from numba import njit

from .activations import KERNEL_OPTIONS, sigmoid, tanh
from .dense import gate_preactivations


def lstm_reference(x, h, c, W, R, Wb, Rb):
    """One step: x (I,), h, c (H,), W (4H, I), R (4H, H), Wb/Rb (4H,) or None -> (h', c')."""
    gates = W @ x + R @ h
    if Wb is not None:
        gates = gates + Wb + Rb
    i, f, g, o = np.split(gates, 4)
    i, f, o = (1.0 / (1.0 + np.exp(-v)) for v in (i, f, o))
    g = np.tanh(g)
    c = f * c + i * g
    return o * np.tanh(c), c


@njit(**KERNEL_OPTIONS)
def lstm_layer(inp, h, c, WT, RT, bW, bR, gates, S, I, H):
    """Flat row-major tiles: inp (S, I); h, c (S, H) advanced in place; WT (I, 4H), RT (H, 4H);
    gates (S, 4H) scratch."""
    G = 4 * H
    gate_preactivations(inp, h, WT, RT, bW, bR, gates, S, I, H, G)
    for s in range(S):
        # Separate passes, each touching few arrays: LLVM vectorises a loop only when it can check every
        # pair of arrays it reads and writes for overlap at run time, and gives up beyond a handful.
        g = gates[s * G:(s + 1) * G]
        for j in range(2 * H):
            g[j] = sigmoid(g[j])  # i, f
        g_g, g_o = g[2 * H:3 * H], g[3 * H:]
        for j in range(H):
            g_g[j] = tanh(g_g[j])
        for j in range(H):
            g_o[j] = sigmoid(g_o[j])
        i, f = g[:H], g[H:2 * H]
        c_s, h_s = c[s * H:(s + 1) * H], h[s * H:(s + 1) * H]
        for j in range(H):
            c_s[j] = f[j] * c_s[j] + i[j] * g_g[j]
        for j in range(H):
            h_s[j] = g_o[j] * tanh(c_s[j])
