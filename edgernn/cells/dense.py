"""The dense layer ``y = act(W x + b)`` and the tile matrix product every cell is built on.

Weights are held transposed, ``WT`` of shape (K, N), so the innermost loop runs unit-stride over the N
outputs and vectorises; the K loop is unrolled by four so each output is loaded and stored once per four
inputs; and a tile of S streams shares each weight row while it sits in L1 (PERF_NOTES.md, item 3).
"""

import numpy as np

from ..jit import njit
from .activations import KERNEL_OPTIONS, SOFTMAX, activate_into, activate_numpy, activation_reference, exp_numpy


@njit(**KERNEL_OPTIONS)
def matmul_acc(A, WT, out, S, K, N):
    """out (S, N) += A (S, K) @ WT (K, N), all flat row-major 1-D arrays.

    Register blocking: four inputs k at a time and four streams at a time, so each weight vector that
    is loaded feeds 4 multiply-adds per stream and each output vector is loaded and stored once per
    16 multiply-adds (~90% of one core's float32 peak from a tile of 8+ streams, PERF_NOTES.md).
    Flat arrays rather than 2-D views, because a Numba `reshape` costs a helper call; inner loops index
    1-D row slices with the bare loop variable, so no negative-index wraparound blocks vectorisation.
    """
    k = 0
    while k + 4 <= K:
        w0, w1 = WT[k * N:(k + 1) * N], WT[(k + 1) * N:(k + 2) * N]
        w2, w3 = WT[(k + 2) * N:(k + 3) * N], WT[(k + 3) * N:(k + 4) * N]
        s = 0
        while s + 4 <= S:
            a, b = A[s * K + k:s * K + k + 4], A[(s + 1) * K + k:(s + 1) * K + k + 4]
            c, d = A[(s + 2) * K + k:(s + 2) * K + k + 4], A[(s + 3) * K + k:(s + 3) * K + k + 4]
            a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
            b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
            c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
            d0, d1, d2, d3 = d[0], d[1], d[2], d[3]
            out_a, out_b = out[s * N:(s + 1) * N], out[(s + 1) * N:(s + 2) * N]
            out_c, out_d = out[(s + 2) * N:(s + 3) * N], out[(s + 3) * N:(s + 4) * N]
            for j in range(N):
                x0, x1, x2, x3 = w0[j], w1[j], w2[j], w3[j]
                out_a[j] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                out_b[j] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
                out_c[j] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
                out_d[j] += (d0 * x0 + d1 * x1) + (d2 * x2 + d3 * x3)
            s += 4
        while s < S:
            a = A[s * K + k:s * K + k + 4]
            a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
            out_a = out[s * N:(s + 1) * N]
            for j in range(N):
                out_a[j] += (a0 * w0[j] + a1 * w1[j]) + (a2 * w2[j] + a3 * w3[j])
            s += 1
        k += 4
    while k < K:
        w0 = WT[k * N:(k + 1) * N]
        for s in range(S):
            a0 = A[s * K + k]
            out_a = out[s * N:(s + 1) * N]
            for j in range(N):
                out_a[j] += a0 * w0[j]
        k += 1


@njit(**KERNEL_OPTIONS)
def gate_preactivations(inp, h, WT, RT, bW, bR, gates, S, I, H, G):
    """gates (S, G) = inp (S, I) @ WT (I, G) + Wb + h (S, H) @ RT (H, G) + Rb: every gate of an RNN or
    LSTM cell before its nonlinearity."""
    for s in range(S):
        g = gates[s * G:(s + 1) * G]
        for j in range(G):
            g[j] = bW[j] + bR[j]
    matmul_acc(inp, WT, gates, S, I, G)
    matmul_acc(h, RT, gates, S, H, G)


@njit(**KERNEL_OPTIONS)
def dense_layer(inp, WT, b, activation, alpha, beta, out, S, K, N):
    """out (S, N) = activation(inp (S, K) @ WT (K, N) + b (N,)), flat arrays as in `matmul_acc`."""
    for s in range(S):
        o = out[s * N:(s + 1) * N]
        for j in range(N):
            o[j] = b[j]
    matmul_acc(inp, WT, out, S, K, N)
    for s in range(S):
        o = out[s * N:(s + 1) * N]
        if activation == SOFTMAX:
            # exp is rare here (once per output per step), so the exact libm call is fine.
            top = o[0]
            for j in range(1, N):
                top = max(top, o[j])
            total = np.float32(0.0)
            for j in range(N):
                o[j] = np.exp(o[j] - top)
                total += o[j]
            for j in range(N):
                o[j] /= total
        else:
            activate_into(o, o, activation, alpha, beta)


def dense_reference(x, W, b, activation, alpha=0.0, beta=0.0):
    """y = activation(W x + b) for one sample, in NumPy (the oracle)."""
    return activation_reference(activation, alpha, beta)(W @ x + (0.0 if b is None else b))


# ---- NumPy kernels (`edgernn.numpy_stack`, where numba is missing) ---------------------------------------
_MAX_TERMS = 1 << 20
"""Products `matmul_numpy` holds at once (4 MiB): a large batch is summed a slice of streams at a time."""


def matmul_numpy(A, WT):
    """A (S, K) @ WT (K, N), summed over K in a fixed pairwise order rather than BLAS's (which depends on S
    and on the machine), so a row's bits depend on that row alone: a stream gets the same result whether it
    steps alone or in a batch, as with the Numba kernels."""
    S, K = A.shape
    out = np.zeros((S, WT.shape[1]), np.float32)
    rows = max(1, _MAX_TERMS // max(1, K * WT.shape[1]))
    for first in range(0, S if K else 0, rows):
        terms = A[first:first + rows, :, None] * WT  # (rows, K, N): exact float32 products
        while terms.shape[1] > 1:
            half = terms.shape[1] // 2
            summed = terms[:, :half] + terms[:, half:2 * half]
            if terms.shape[1] % 2:
                summed[:, 0] += terms[:, 2 * half]
            terms = summed
        out[first:first + rows] = terms[:, 0]
    return out


def gate_preactivations_numpy(inp, h, WT, RT, bW, bR):
    """`gate_preactivations` on 2-D arrays: inp (S, I) @ WT (I, G) + Wb + h (S, H) @ RT (H, G) + Rb -> (S, G)."""
    return (bW + bR) + matmul_numpy(inp, WT) + matmul_numpy(h, RT)


def dense_layer_numpy(inp, WT, b, activation, alpha, beta):
    """`dense_layer` on 2-D arrays: activation(inp (S, K) @ WT (K, N) + b) -> a new (S, N) array."""
    o = b + matmul_numpy(inp, WT)
    if activation != SOFTMAX:
        return activate_numpy(o, activation, alpha, beta)
    e = exp_numpy(o - o.max(axis=1, keepdims=True))
    total = e[:, 0].copy()
    for j in range(1, e.shape[1]):  # one output at a time, as the Numba kernel adds them
        total += e[:, j]
    return e / total[:, None]
