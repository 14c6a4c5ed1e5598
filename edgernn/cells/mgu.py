"""Minimal gated unit (Zhou et al., 2016): a GRU whose reset and update gates are one forget gate f.
Gate blocks in canonical order f, n:

    f  = sigmoid(W_f x + Wb_f + R_f h + Rb_f)
    n  = tanh(W_n x + Wb_n + R_n (f * h) + Rb_n)
    h' = (1 - f) * h + f * n

The kernel keeps each gate's weights as its own transposed block (``WT = [W_f^T | W_n^T]``, each (I, H);
``RT`` likewise), because n's recurrent term needs f first.
"""

import numpy as np

from ..jit import njit
from .activations import KERNEL_OPTIONS, clip_reference, gate, gate_numpy, sigmoid_reference
from .dense import gate_preactivations, gate_preactivations_numpy, matmul_acc, matmul_numpy


def mgu_reference(x, h, W, R, Wb, Rb, f=sigmoid_reference, g=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (2H, I), R (2H, H), Wb/Rb (2H,) or None -> h' (H,)."""
    H = h.shape[0]
    if Wb is None:
        Wb = Rb = np.zeros(2 * H)
    W_f, W_n = np.split(W, 2)
    R_f, R_n = np.split(R, 2)
    Wb_f, Wb_n = np.split(Wb, 2)
    Rb_f, Rb_n = np.split(Rb, 2)
    forget = f(clip_reference(W_f @ x + Wb_f + R_f @ h + Rb_f, clip))
    n = g(clip_reference(W_n @ x + Wb_n + R_n @ (forget * h) + Rb_n, clip))
    return (1.0 - forget) * h + forget * n


@njit(**KERNEL_OPTIONS)
def mgu_layer(inp, h, WT, RT, bW, bR, acts, params, gates, fh, S, I, H):
    """Flat row-major tiles: inp (S, I); h (S, H) advanced in place; WT = two (I, H) blocks f, n; RT = two
    (H, H) blocks; gates (S, 2H) and fh (S, H) scratch."""
    f, n = gates[:S * H], gates[S * H:2 * S * H]
    gate_preactivations(inp, h, WT[:I * H], RT[:H * H], bW[:H], bR[:H], f, S, I, H, H)
    gate(f, acts[0], params[0], params[1], params[6])  # f
    for s in range(S):
        n_s, fh_s = n[s * H:(s + 1) * H], fh[s * H:(s + 1) * H]
        f_s, h_s = f[s * H:(s + 1) * H], h[s * H:(s + 1) * H]
        for j in range(H):
            n_s[j] = bW[H + j] + bR[H + j]
        for j in range(H):
            fh_s[j] = f_s[j] * h_s[j]
    matmul_acc(inp, WT[I * H:], n, S, I, H)
    matmul_acc(fh[:S * H], RT[H * H:], n, S, H, H)  # R_n (f * h)
    gate(n, acts[1], params[2], params[3], params[6])  # n
    for j in range(S * H):
        h[j] += f[j] * (n[j] - h[j])  # (1 - f) h + f n


def mgu_layer_numpy(inp, h, WT, RT, bW, bR, acts, params):
    """`mgu_layer` in NumPy, where numba is missing: inp (S, I), h (S, H) advanced in place; WT (2, I, H) and
    RT (2, H, H), the f block then the n block."""
    H = h.shape[1]
    f = gate_preactivations_numpy(inp, h, WT[0], RT[0], bW[:H], bR[:H])
    gate_numpy(f, acts[0], params[0], params[1], params[6])
    n = (bW[H:] + bR[H:]) + matmul_numpy(inp, WT[1]) + matmul_numpy(f * h, RT[1])  # R_n (f * h)
    gate_numpy(n, acts[1], params[2], params[3], params[6])
    h += f * (n - h)  # (1 - f) h + f n
