"""Activations for the kernels: a rational tanh and an exp-based sigmoid, both of which vectorise.

Numba lowers `math.tanh`/`math.exp` on float32 to scalar libm calls, which stops a loop from vectorising
(PERF_NOTES.md, item 1). tanh is Eigen's float32 rational approximation, a ratio of two short
polynomials: absolute error below 3e-7 over the whole real line, relative error as small near 0.
sigmoid(x) = 1 / (1 + exp(-x)) with Cephes' float32 exp (range reduction by powers of two, a degree-6
polynomial, the power of two built from its exponent bits): its error is relative, ~1.4e-7, also where
sigmoid is tiny. (The obvious 0.5 + 0.5 tanh(x / 2) is off by up to 2.3e-7 in absolute terms, which
is 100% of a sigmoid of 1e-7; ONNX's GRU test cases, with an absolute tolerance of 1e-7, caught it.)
tests/test_activations.py measures both against float64 over the whole float32 line.
"""

import numpy as np

from ..jit import NUMBA_AVAILABLE, njit

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


if NUMBA_AVAILABLE:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _float_from_bits(typingctx, bits):
        """The float32 whose IEEE bits are the int32 ``bits`` (a free reinterpretation, so loops vectorise)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen
else:  # the kernels stay plain Python (edgernn.jit)
    def _float_from_bits(bits):
        return np.int32(bits).view(np.float32)


@njit(**INLINE_OPTIONS)
def exp(x):
    """Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a polynomial, times 2^n from its bits.
    Clamped to [-87, 88] so 2^n stays a normal float (exp(-87) = 1.6e-38)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)  # ln2 in two parts, so r is exact
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(**INLINE_OPTIONS)
def sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + exp(-x))


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
    Softplus calls libm's log1p: it is not on the default path."""
    zero, one = np.float32(0.0), np.float32(1.0)
    if code == SIGMOID:
        return sigmoid(x)
    if code == TANH:
        return tanh(x)
    if code == RELU:
        return relu(x)
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
        return x if x >= zero else alpha * (exp(x) - one)
    if code == SOFTSIGN:
        return x / (one + abs(x))
    if code == SOFTPLUS:
        return max(x, zero) + np.log1p(exp(-abs(x)))
    return x  # IDENTITY


@njit(**INLINE_OPTIONS)
def activate_into(out, v, code, alpha, beta):
    """out[:] = activation(v) (``out`` may be ``v``). The common functions get their own inlined loops,
    which vectorise; the others share one compiled loop, which keeps every call site small (compile time)."""
    n = v.shape[0]
    if code == SIGMOID:
        for j in range(n):
            out[j] = sigmoid(v[j])
    elif code == TANH:
        for j in range(n):
            out[j] = tanh(v[j])
    elif code == RELU:
        for j in range(n):
            out[j] = relu(v[j])
    else:
        _activate_any(out, v, code, alpha, beta)


@njit(**KERNEL_OPTIONS)
def _activate_any(out, v, code, alpha, beta):
    for j in range(v.shape[0]):
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


def clip_reference(v, clip):
    """ONNX's clip of an activation's input: ``v`` bounded to [-clip, clip], or as it is for None."""
    return v if clip is None else np.clip(v, -clip, clip)


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


# ---- NumPy kernels (`edgernn.numpy_stack`, where numba is missing): the formulas above on float32 arrays ----
# Elementwise +, *, /, floor and bit casts only, so each element's bits do not depend on the array around it.
_F32 = np.float32


def tanh_numpy(x):
    x = np.minimum(np.maximum(x, _F32(-_CLAMP)), _F32(_CLAMP))
    x2 = x * x
    p = x2 * _F32(_A13)  # in place from here on: fewer temporaries, ~10% faster on large batches
    for a in (_A11, _A9, _A7, _A5, _A3):
        p += _F32(a)
        p *= x2
    p += _F32(_A1)
    q = x2 * _F32(_B6)
    for b in (_B4, _B2):
        q += _F32(b)
        q *= x2
    q += _F32(_B0)
    p *= x
    p /= q
    return p


def exp_numpy(x):
    """`exp` on an array: 2^n from the exponent bits of (n + 127) << 23, as ``_float_from_bits``."""
    x = np.minimum(np.maximum(x, _F32(-87.0)), _F32(88.0))
    n = x * _F32(1.44269504088896341)
    n += _F32(0.5)
    np.floor(n, out=n)
    x -= n * _F32(0.693359375)  # x is r from here on
    x -= n * _F32(-2.12194440e-4)
    p = x * _F32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1):
        p += _F32(c)
        p *= x
    p += _F32(5.0000001201e-1)
    p *= x * x
    p += x
    p += _F32(1.0)
    p *= ((n.astype(np.int32) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p


def sigmoid_numpy(x):
    return _F32(1.0) / (_F32(1.0) + exp_numpy(-x))


def activate_numpy(x, code, alpha, beta):
    """`activate` on a float32 array (``alpha``, ``beta`` float32); a new array, or ``x`` for identity."""
    zero, one = _F32(0.0), _F32(1.0)
    if code == SIGMOID:
        return sigmoid_numpy(x)
    if code == TANH:
        return tanh_numpy(x)
    if code == RELU:
        return np.maximum(x, zero)
    if code == AFFINE:
        return alpha * x + beta
    if code == LEAKY_RELU:
        return np.where(x >= zero, x, alpha * x)
    if code == THRESHOLDED_RELU:
        return np.where(x > alpha, x, zero)
    if code == SCALED_TANH:
        return alpha * tanh_numpy(beta * x)
    if code == HARD_SIGMOID:
        return np.minimum(np.maximum(alpha * x + beta, zero), one)
    if code == ELU:
        return np.where(x >= zero, x, alpha * (exp_numpy(x) - one))
    if code == SOFTSIGN:
        return x / (one + np.abs(x))
    if code == SOFTPLUS:
        return np.maximum(x, zero) + np.log1p(exp_numpy(-np.abs(x)))
    return x  # IDENTITY


def gate_numpy(v, code, alpha, beta, bound):
    """v[...] = activation(clip(v)) in place, as `gate` (no clip when ``bound`` is 0)."""
    if bound > 0:
        np.minimum(np.maximum(v, -bound, out=v), bound, out=v)
    v[...] = activate_numpy(v, code, alpha, beta)
