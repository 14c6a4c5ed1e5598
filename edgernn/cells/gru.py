"""GRU cell, gate blocks in canonical order r, z, n (PyTorch's; ONNX's is z, r, h):

    r  = sigmoid(W_r x + Wb_r + R_r h + Rb_r)
    z  = sigmoid(W_z x + Wb_z + R_z h + Rb_z)
    n  = tanh(W_n x + Wb_n + r * (R_n h + Rb_n))        linear_before_reset = True  (PyTorch)
    n  = tanh(W_n x + Wb_n + R_n (r * h) + Rb_n)        linear_before_reset = False (ONNX's default)
    h' = (1 - z) * n + z * h
"""

import numpy as np

from ..jit import njit
from .activations import KERNEL_OPTIONS, clip_reference, gate, gate_numpy, sigmoid_reference
from .dense import matmul_acc, matmul_numpy


def gru_reference(x, h, W, R, Wb, Rb, linear_before_reset=True, f=sigmoid_reference, g=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (3H, I), R (3H, H), Wb/Rb (3H,) or None -> h' (H,).
    ``f`` (the gates) and ``g`` (the candidate) are NumPy functions; ``clip`` bounds their inputs."""
    H = h.shape[0]
    if Wb is None:
        Wb = Rb = np.zeros(3 * H)
    W_r, W_z, W_n = np.split(W, 3)
    R_r, R_z, R_n = np.split(R, 3)
    Wb_r, Wb_z, Wb_n = np.split(Wb, 3)
    Rb_r, Rb_z, Rb_n = np.split(Rb, 3)
    r = f(clip_reference(W_r @ x + Wb_r + R_r @ h + Rb_r, clip))
    z = f(clip_reference(W_z @ x + Wb_z + R_z @ h + Rb_z, clip))
    if linear_before_reset:
        n = g(clip_reference(W_n @ x + Wb_n + r * (R_n @ h + Rb_n), clip))
    else:
        n = g(clip_reference(W_n @ x + Wb_n + R_n @ (r * h) + Rb_n, clip))
    return (1.0 - z) * n + z * h


@njit(**KERNEL_OPTIONS)
def gru_layer(inp, h, WT, RT, bW, bR, linear_before_reset, acts, params, gx, gh, rh, S, I, H):
    """Flat row-major tiles: inp (S, I); h (S, H) advanced in place; WT (I, 3H), RT (H, 3H);
    gx, gh (S, 3H) and rh (S, H) scratch. ``acts`` [f, g] codes, ``params`` [alpha_f, beta_f, alpha_g,
    beta_g, -, -, clip]."""
    G = 3 * H
    for s in range(S):
        gx_s, gh_s = gx[s * G:(s + 1) * G], gh[s * G:(s + 1) * G]
        for j in range(G):
            gx_s[j] = bW[j]
            gh_s[j] = bR[j]
    matmul_acc(inp, WT, gx, S, I, G)
    matmul_acc(h, RT, gh, S, H, G)  # without linear_before_reset, the n block is redone below
    for s in range(S):
        x_r, x_z, x_n = gx[s * G:s * G + H], gx[s * G + H:s * G + 2 * H], gx[s * G + 2 * H:(s + 1) * G]
        h_r, h_z, h_n = gh[s * G:s * G + H], gh[s * G + H:s * G + 2 * H], gh[s * G + 2 * H:(s + 1) * G]
        h_s, rh_s = h[s * H:(s + 1) * H], rh[s * H:(s + 1) * H]
        # Short passes over few arrays each, so LLVM can vectorise them (see lstm_layer).
        for j in range(H):
            x_r[j] += h_r[j]
        for j in range(H):
            x_z[j] += h_z[j]
        gate(gx[s * G:s * G + 2 * H], acts[0], params[0], params[1], params[6])  # r, z
        if linear_before_reset:
            for j in range(H):
                x_n[j] += x_r[j] * h_n[j]  # W_n x + Wb_n + r * (R_n h + Rb_n)
        else:
            # n's recurrent term sees the reset hidden state: R_n (r * h) + Rb_n (RT's last H columns).
            for j in range(H):
                rh_s[j] = x_r[j] * h_s[j]
            for j in range(H):
                h_n[j] = bR[2 * H + j]
            for k in range(H):
                a = rh_s[k]
                R_n = RT[k * G + 2 * H:(k + 1) * G]
                for j in range(H):
                    h_n[j] += a * R_n[j]
            for j in range(H):
                x_n[j] += h_n[j]
        gate(x_n, acts[1], params[2], params[3], params[6])  # n
        for j in range(H):
            h_s[j] = (np.float32(1.0) - x_z[j]) * x_n[j] + x_z[j] * h_s[j]  # h' = (1 - z) n + z h


def gru_layer_numpy(inp, h, WT, RT, bW, bR, linear_before_reset, acts, params):
    """`gru_layer` in NumPy, where numba is missing: inp (S, I), h (S, H) advanced in place; WT (I, 3H),
    RT (H, 3H)."""
    H = h.shape[1]
    gx = bW + matmul_numpy(inp, WT)
    x_r, x_z, x_n = gx[:, :H], gx[:, H:2 * H], gx[:, 2 * H:]
    if linear_before_reset:
        gh = bR + matmul_numpy(h, RT)
    else:  # n's recurrent term comes after r: only the r and z blocks now
        gh = bR[:2 * H] + matmul_numpy(h, RT[:, :2 * H])
    x_r += gh[:, :H]
    x_z += gh[:, H:2 * H]
    gate_numpy(gx[:, :2 * H], acts[0], params[0], params[1], params[6])  # r, z
    if linear_before_reset:
        x_n += x_r * gh[:, 2 * H:]  # W_n x + Wb_n + r * (R_n h + Rb_n)
    else:
        x_n += bR[2 * H:] + matmul_numpy(x_r * h, RT[:, 2 * H:])  # R_n (r * h) + Rb_n
    gate_numpy(x_n, acts[1], params[2], params[3], params[6])  # n
    h[...] = (np.float32(1.0) - x_z) * x_n + x_z * h  # h' = (1 - z) n + z h
