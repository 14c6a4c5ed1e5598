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
from .dense import matmul_acc


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
    for s in range(S):
        g = gates[s * G:(s + 1) * G]
        for j in range(G):
            g[j] = bW[j] + bR[j]
    matmul_acc(inp, WT, gates, S, I, G)
    matmul_acc(h, RT, gates, S, H, G)
    for s in range(S):
        g_i, g_f = gates[s * G:s * G + H], gates[s * G + H:s * G + 2 * H]
        g_g, g_o = gates[s * G + 2 * H:s * G + 3 * H], gates[s * G + 3 * H:(s + 1) * G]
        h_s, c_s = h[s * H:(s + 1) * H], c[s * H:(s + 1) * H]
        for j in range(H):
            i = sigmoid(g_i[j])
            f = sigmoid(g_f[j])
            cell = tanh(g_g[j])
            o = sigmoid(g_o[j])
            c_new = f * c_s[j] + i * cell
            c_s[j] = c_new
            h_s[j] = o * tanh(c_new)
