"""Activations for the kernels: a rational tanh that vectorises, and the sigmoid built on it.

Numba lowers `math.tanh`/`math.exp` on float32 to scalar libm calls, which stops a loop from vectorising
(PERF_NOTES.md, item 1). Eigen's float32 rational approximation of tanh is a ratio of two short
polynomials; its absolute error against float64 tanh stays below 1e-6 over the whole real line
(tests/test_activations.py checks it, saturation included). sigmoid(x) = 0.5 + 0.5 tanh(x / 2).
"""

import numpy as np
from numba import njit

FASTMATH = {"nsz", "arcp", "contract", "afn"}
"""LLVM fast-math flags for every kernel. No `reassoc`: the kernels vectorise over outputs, never by
reordering a sum, and with it LLVM regrouped the same expression differently in the 4-stream and the
1-stream loops on aarch64, so a batch and single steps disagreed in the last bit. `nnan`/`ninf` stay
off because the kernels test inputs for finiteness."""

KERNEL_OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
INLINE_OPTIONS = dict(KERNEL_OPTIONS, inline="always")

_CLAMP = 7.90531110763549805  # beyond this the rational form's tanh rounds to +-1 in float32
# Numerator (odd) and denominator (even) monomial coefficients, from Eigen's generic_fast_tanh_float.
_A1, _A3, _A5, _A7 = 4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08
_A9, _A11, _A13 = -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16
_B0, _B2, _B4, _B6 = 4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06


@njit(**INLINE_OPTIONS)
def tanh(x):
    x = min(max(x, np.float32(-_CLAMP)), np.float32(_CLAMP))
    x2 = x * x
    p = np.float32(_A13)
    p = p * x2 + np.float32(_A11)
    p = p * x2 + np.float32(_A9)
    p = p * x2 + np.float32(_A7)
    p = p * x2 + np.float32(_A5)
    p = p * x2 + np.float32(_A3)
    p = p * x2 + np.float32(_A1)
    q = np.float32(_B6)
    q = q * x2 + np.float32(_B4)
    q = q * x2 + np.float32(_B2)
    q = q * x2 + np.float32(_B0)
    return x * p / q


@njit(**INLINE_OPTIONS)
def sigmoid(x):
    return np.float32(0.5) + np.float32(0.5) * tanh(np.float32(0.5) * x)


@njit(**INLINE_OPTIONS)
def relu(x):
    return max(x, np.float32(0.0))


# Activation codes, shared by the plan (which writes them) and the kernels (which dispatch on them).
(IDENTITY, RELU, TANH, SIGMOID, SOFTMAX, AFFINE, LEAKY_RELU, THRESHOLDED_RELU, SCALED_TANH, HARD_SIGMOID,
 ELU, SOFTSIGN, SOFTPLUS) = range(13)
ACTIVATION_CODES = {
    "identity": IDENTITY, "relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "softmax": SOFTMAX, "affine": AFFINE,
    "leaky_relu": LEAKY_RELU, "thresholded_relu": THRESHOLDED_RELU, "scaled_tanh": SCALED_TANH,
    "hard_sigmoid": HARD_SIGMOID, "elu": ELU, "softsign": SOFTSIGN, "softplus": SOFTPLUS,
}


@njit(**INLINE_OPTIONS)
def activate(x, code, alpha, beta):
    """Any elementwise activation by code (ONNX's definitions; `edgernn.spec.ACTIVATION_DEFAULTS`).
    The rare ones call libm's exp/log: they are not on the default path."""
    zero, one = np.float32(0.0), np.float32(1.0)
    if code == SIGMOID:
        return sigmoid(x)
    if code == TANH:
        return tanh(x)
    if code == RELU:
        return max(x, zero)
    if code == AFFINE:
        return alpha * x + beta
    if code == LEAKY_RELU:
        return x if x >= zero else alpha * x
    if code == THRESHOLDED_RELU:
        return x if x > alpha else zero
    if code == SCALED_TANH:
        return alpha * tanh(beta * x)
    if code == HARD_SIGMOID:
        return min(max(alpha * x + beta, zero), one)
    if code == ELU:
        return x if x >= zero else alpha * (np.exp(x) - one)
    if code == SOFTSIGN:
        return x / (one + abs(x))
    if code == SOFTPLUS:
        return max(x, zero) + np.log1p(np.exp(-abs(x)))
    return x  # IDENTITY


@njit(**INLINE_OPTIONS)
def activate_into(out, v, code, alpha, beta):
    """out[:] = activation(v) (``out`` may be ``v``): separate loops for the common functions, so each
    vectorises."""
    n = v.shape[0]
    if code == SIGMOID:
        for j in range(n):
            out[j] = sigmoid(v[j])
    elif code == TANH:
        for j in range(n):
            out[j] = tanh(v[j])
    elif code == RELU:
        for j in range(n):
            out[j] = max(v[j], np.float32(0.0))
    else:
        for j in range(n):
            out[j] = activate(v[j], code, alpha, beta)


@njit(**INLINE_OPTIONS)
def clip_all(v, bound):
    """v[:] = clip(v, -bound, bound): ONNX's ``clip``, applied to an activation's input."""
    for j in range(v.shape[0]):
        v[j] = min(max(v[j], -bound), bound)


@njit(**INLINE_OPTIONS)
def gate(v, code, alpha, beta, bound):
    """v[:] = activation(clip(v)): one gate block; the clip is skipped when ``bound`` is 0 (no clip)."""
    if bound > 0:
        clip_all(v, bound)
    activate_into(v, v, code, alpha, beta)


# ---- NumPy references (the test oracles), exact up to float64 rounding ----------------------------
def sigmoid_reference(x):
    return 1.0 / (1.0 + np.exp(-x))


def relu_reference(x):
    return np.maximum(x, 0.0)


def activation_reference(name: str, alpha: float = 0.0, beta: float = 0.0):
    """The NumPy function of an activation (`edgernn.spec.ACTIVATION_DEFAULTS` lists them), float64-exact."""
    functions = {
        "identity": lambda x: x,
        "sigmoid": sigmoid_reference,
        "tanh": np.tanh,
        "relu": relu_reference,
        "affine": lambda x: alpha * x + beta,
        "leaky_relu": lambda x: np.where(x >= 0, x, alpha * x),
        "thresholded_relu": lambda x: np.where(x > alpha, x, 0.0),
        "scaled_tanh": lambda x: alpha * np.tanh(beta * x),
        "hard_sigmoid": lambda x: np.clip(alpha * x + beta, 0.0, 1.0),
        "elu": lambda x: np.where(x >= 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
        "softsign": lambda x: x / (1.0 + np.abs(x)),
        "softplus": lambda x: np.logaddexp(0.0, x),
        "softmax": lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(),
    }
    return functions[name]
