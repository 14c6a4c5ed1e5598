"""The dense layer ``y = act(W x + b)`` and the tile matrix product every cell is built on.

Weights are held transposed, ``WT`` of shape (K, N), so the innermost loop runs unit-stride over the N
outputs and vectorises; the K loop is unrolled by four so each output is loaded and stored once per four
inputs; and a tile of S streams shares each weight row while it sits in L1 (PERF_NOTES.md, item 3).
"""

import numpy as np
from numba import njit

from .activations import KERNEL_OPTIONS, relu, sigmoid, tanh

IDENTITY, RELU, TANH, SIGMOID, SOFTMAX = 0, 1, 2, 3, 4
ACTIVATION_CODES = {"identity": IDENTITY, "relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "softmax": SOFTMAX}


@njit(**KERNEL_OPTIONS)
def matmul_acc(A, WT, out, S, K, N):
    """out (S, N) += A (S, K) @ WT (K, N), all flat row-major 1-D arrays.

    Flat arrays with explicit sizes rather than 2-D views: a `reshape` in Numba costs a helper call,
    more than the arithmetic at these sizes. Inner loops index 1-D row slices with the bare loop
    variable, so Numba emits no negative-index wraparound and LLVM sees contiguous, vectorisable loads.
    """
    k = 0
    while k + 8 <= K:
        w0, w1, w2, w3 = WT[k * N:(k + 1) * N], WT[(k + 1) * N:(k + 2) * N], WT[(k + 2) * N:(k + 3) * N], \
            WT[(k + 3) * N:(k + 4) * N]
        w4, w5, w6, w7 = WT[(k + 4) * N:(k + 5) * N], WT[(k + 5) * N:(k + 6) * N], WT[(k + 6) * N:(k + 7) * N], \
            WT[(k + 7) * N:(k + 8) * N]
        for s in range(S):
            a = A[s * K + k:s * K + k + 8]
            a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
            o = out[s * N:(s + 1) * N]
            for j in range(N):
                o[j] += ((a0 * w0[j] + a1 * w1[j]) + (a2 * w2[j] + a3 * w3[j])) + \
                        ((a4 * w4[j] + a5 * w5[j]) + (a6 * w6[j] + a7 * w7[j]))
        k += 8
    while k < K:
        w0 = WT[k * N:(k + 1) * N]
        for s in range(S):
            a0 = A[s * K + k]
            o = out[s * N:(s + 1) * N]
            for j in range(N):
                o[j] += a0 * w0[j]
        k += 1


@njit(**KERNEL_OPTIONS)
def dense_layer(inp, WT, b, activation, out, S, K, N):
    """out (S, N) = activation(inp (S, K) @ WT (K, N) + b (N,)), flat arrays as in `matmul_acc`."""
    for s in range(S):
        o = out[s * N:(s + 1) * N]
        for j in range(N):
            o[j] = b[j]
    matmul_acc(inp, WT, out, S, K, N)
    for s in range(S):
        o = out[s * N:(s + 1) * N]
        if activation == RELU:
            for j in range(N):
                o[j] = relu(o[j])
        elif activation == TANH:
            for j in range(N):
                o[j] = tanh(o[j])
        elif activation == SIGMOID:
            for j in range(N):
                o[j] = sigmoid(o[j])
        elif activation == SOFTMAX:
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


def dense_reference(x, W, b, activation):
    """y = activation(W x + b) for one sample, in NumPy (the oracle)."""
    y = W @ x + (0.0 if b is None else b)
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "tanh":
        return np.tanh(y)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if activation == "softmax":
        e = np.exp(y - y.max())
        return e / e.sum()
    return y
