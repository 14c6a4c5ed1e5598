"""LSTM cell, gate blocks in canonical order i, f, g, o (PyTorch's; ONNX's is i, o, f, c):

    i  = sigmoid(W_i x + Wb_i + R_i h + Rb_i)
    f  = sigmoid(W_f x + Wb_f + R_f h + Rb_f)
    g  = tanh(W_g x + Wb_g + R_g h + Rb_g)
    o  = sigmoid(W_o x + Wb_o + R_o h + Rb_o)
    c' = f * c + i * g
    h' = o * tanh(c')

Variants: peepholes add P_i * c and P_f * c to i and f, and P_o * c' to o; a coupled input-forget gate
drops the f block (blocks i, g, o) and uses f = 1 - i; a projection (PyTorch's proj_size) makes
h' = proj @ (o * tanh(c')), of proj_size floats. ONNX's clip bounds every gate's pre-activation.
"""

import numpy as np

from ..jit import njit
from .activations import (
    KERNEL_OPTIONS, TANH, activate_into, activate_numpy, clip_reference, gate, gate_numpy, sigmoid_reference, tanh,
)
from .dense import gate_preactivations, gate_preactivations_numpy, matmul_acc, matmul_numpy


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
    if coupled:
        i, g_, o = np.split(gates, 3)
        p_i, p_f, p_o = (np.zeros(H), None, np.zeros(H)) if P is None else (P[:H], None, P[H:])
    else:
        i, f_, g_, o = np.split(gates, 4)
        p_i, p_f, p_o = (np.zeros(H),) * 3 if P is None else np.split(P, 3)
    i = f(clip_reference(i + p_i * c, clip))
    forget = 1.0 - i if coupled else f(clip_reference(f_ + p_f * c, clip))
    c = forget * c + i * g(clip_reference(g_, clip))
    o = f(clip_reference(o + p_o * c, clip))
    h = o * h_act(c)
    return (h if proj is None else proj @ h), c


@njit(**KERNEL_OPTIONS)
def lstm_layer(inp, h, c, WT, RT, bW, bR, weights, peep_at, proj_at, coupled, acts, params, gates, hc, S, I, H, HP):
    """Flat row-major tiles: inp (S, I); h (S, HP), c (S, H) advanced in place; WT (I, G*H), RT (HP, G*H);
    the peepholes at ``weights[peep_at:]`` and the transposed projection (H, HP) at ``weights[proj_at:]``
    (offsets -1: none; offsets, not arrays, so the common LSTM builds no views of them); gates (S, G*H)
    and hc (S, H) scratch. ``acts`` [f, g, h] codes; ``params`` [alpha_f, beta_f, alpha_g, beta_g,
    alpha_h, beta_h, clip]."""
    G = (3 if coupled else 4) * H
    gate_preactivations(inp, h, WT, RT, bW, bR, gates, S, I, HP, G)
    bound, peep, project = params[6], peep_at >= 0, proj_at >= 0
    for s in range(S):
        # Separate passes, each touching few arrays: LLVM vectorises a loop only when it can check every
        # pair of arrays it reads and writes for overlap at run time, and gives up beyond a handful.
        g, c_s = gates[s * G:(s + 1) * G], c[s * H:(s + 1) * H]
        i, f = g[:H], g[H:2 * H]  # f is g's block when coupled, and unused
        g_g, g_o = (g[H:2 * H], g[2 * H:]) if coupled else (g[2 * H:3 * H], g[3 * H:])
        if peep:  # i += P_i * c, f += P_f * c (the previous c)
            P = weights[peep_at:peep_at + (2 if coupled else 3) * H]
            for j in range(H):
                i[j] += P[j] * c_s[j]
            if not coupled:
                for j in range(H):
                    f[j] += P[H + j] * c_s[j]
        gate(g[:H] if coupled else g[:2 * H], acts[0], params[0], params[1], bound)  # i (and f)
        gate(g_g, acts[1], params[2], params[3], bound)
        if coupled:
            for j in range(H):
                c_s[j] = (np.float32(1.0) - i[j]) * c_s[j] + i[j] * g_g[j]  # f = 1 - i
        else:
            for j in range(H):
                c_s[j] = f[j] * c_s[j] + i[j] * g_g[j]
        if peep:  # o += P_o * c'
            P_o = weights[peep_at + (1 if coupled else 2) * H:peep_at + (2 if coupled else 3) * H]
            for j in range(H):
                g_o[j] += P_o[j] * c_s[j]
        gate(g_o, acts[0], params[0], params[1], bound)
        out = hc[s * H:(s + 1) * H] if project else h[s * H:(s + 1) * H]
        if acts[2] == TANH:
            for j in range(H):
                out[j] = g_o[j] * tanh(c_s[j])
        else:
            activate_into(g_g, c_s, acts[2], params[4], params[5])  # g is spent: reuse it for h(c')
            for j in range(H):
                out[j] = g_o[j] * g_g[j]
    if project:  # h = proj @ (o * h(c'))
        for j in range(S * HP):
            h[j] = np.float32(0.0)
        matmul_acc(hc, weights[proj_at:proj_at + H * HP], h, S, H, HP)


def lstm_layer_numpy(inp, h, c, WT, RT, bW, bR, P, projT, coupled, acts, params):
    """`lstm_layer` in NumPy, where numba is missing: inp (S, I); h (S, HP), c (S, H) advanced in place;
    WT (I, G*H), RT (HP, G*H); peepholes ``P`` (i, f, o or i, o when coupled) and the transposed projection
    ``projT`` (H, HP), or None."""
    H = c.shape[1]
    gates = gate_preactivations_numpy(inp, h, WT, RT, bW, bR)
    i, f = gates[:, :H], gates[:, H:2 * H]  # f is g's block when coupled, and unused
    g, o = (gates[:, H:2 * H], gates[:, 2 * H:]) if coupled else (gates[:, 2 * H:3 * H], gates[:, 3 * H:])
    if P is not None:  # i += P_i * c, f += P_f * c (the previous c)
        i += P[:H] * c
        if not coupled:
            f += P[H:2 * H] * c
    bound = params[6]
    gate_numpy(gates[:, :H] if coupled else gates[:, :2 * H], acts[0], params[0], params[1], bound)  # i (and f)
    gate_numpy(g, acts[1], params[2], params[3], bound)
    forget = np.float32(1.0) - i if coupled else f
    c[...] = forget * c + i * g
    if P is not None:  # o += P_o * c'
        o += P[-H:] * c
    gate_numpy(o, acts[0], params[0], params[1], bound)
    out = o * activate_numpy(c, acts[2], params[4], params[5])
    h[...] = out if projT is None else matmul_numpy(out, projT)  # h = proj @ (o * h(c'))
