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

from .activations import KERNEL_OPTIONS, sigmoid, sigmoid_reference, tanh
from .dense import gate_preactivations


def lstm_reference(x, h, c, W, R, Wb, Rb, P=None, proj=None, coupled=False,
                   f=sigmoid_reference, g=np.tanh, h_act=np.tanh, clip=None):
    """One step: x (I,), h (Hp,), c (H,), W (G*H, I), R (G*H, Hp), Wb/Rb (G*H,) or None -> (h', c').

    Variants: ``P`` peepholes (3H,) i, f, o -- (2H,) i, o when ``coupled`` (f = 1 - i, gate blocks
    i, g, o); ``proj`` (Hp, H) projects h. ``f``, ``g``, ``h_act`` are NumPy functions; ``clip`` bounds
    the gates' pre-activations (not c).
    """
    H = c.shape[0]
    gates = W @ x + R @ h
    if Wb is not None:
        gates = gates + Wb + Rb
    bound = (lambda v: v) if clip is None else (lambda v: np.clip(v, -clip, clip))
    if coupled:
        i, g_, o = np.split(gates, 3)
        p_i, p_f, p_o = (np.zeros(H), None, np.zeros(H)) if P is None else (P[:H], None, P[H:])
    else:
        i, f_, g_, o = np.split(gates, 4)
        p_i, p_f, p_o = (np.zeros(H),) * 3 if P is None else np.split(P, 3)
    i = f(bound(i + p_i * c))
    forget = 1.0 - i if coupled else f(bound(f_ + p_f * c))
    c = forget * c + i * g(bound(g_))
    o = f(bound(o + p_o * c))
    h = o * h_act(c)
    return (h if proj is None else proj @ h), c


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
