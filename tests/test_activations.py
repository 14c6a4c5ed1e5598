"""The kernels' activations (edgernn/cells/activations.py) against float64 NumPy, over the whole float32 line.

The activations are ``inline="always"`` njit functions, so they take the fast-math flags of the kernel
they are inlined into: each check runs them from a small njit loop compiled with the kernels' flags
(``FASTMATH``) and again with none, so both the shipped code and the plain IEEE evaluation are covered.

Measured (numba 0.68, x86-64 AVX-512): max abs error against float64 over every ~1000th float32 plus a
dense grid over [-20, 20] is 2.6e-7 for tanh (3.5e-7 without FASTMATH) and 8.9e-8 for sigmoid; the budget
asserted here is 1e-6 absolute. sigmoid is also held to 3e-7 *relative* error down to 1e-37 (measured
1.4e-7): small gate values feed (1 - z) h + z n, where an absolute error of 1e-7 is all of a tiny z.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from edgernn.cells.activations import FASTMATH, relu, relu_reference, sigmoid, sigmoid_reference, tanh

TOLERANCE = 1e-6


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _apply_fast(xs, out_tanh, out_sigmoid, out_relu):
    for i in range(xs.shape[0]):
        out_tanh[i] = tanh(xs[i])
        out_sigmoid[i] = sigmoid(xs[i])
        out_relu[i] = relu(xs[i])


@njit(error_model="numpy", cache=True)
def _apply_ieee(xs, out_tanh, out_sigmoid, out_relu):
    for i in range(xs.shape[0]):
        out_tanh[i] = tanh(xs[i])
        out_sigmoid[i] = sigmoid(xs[i])
        out_relu[i] = relu(xs[i])


@pytest.fixture(params=["fastmath", "ieee"])
def activations(request):
    """xs (float32) -> (tanh, sigmoid, relu), each float32, as a kernel computes them."""
    kernel = _apply_fast if request.param == "fastmath" else _apply_ieee

    def apply(xs):
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        outs = tuple(np.empty_like(xs) for _ in range(3))
        kernel(xs, *outs)
        for out in outs:
            assert out.dtype == np.float32
        return outs
    return apply


def exact(xs):
    """float64 tanh and sigmoid of the float32 inputs."""
    x = np.asarray(xs, np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        return np.tanh(x), sigmoid_reference(x)


DENSE = np.linspace(-20.0, 20.0, 2_000_001).astype(np.float32)
TINY = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38, 1e-38,
                 1e-30, -1e-30, 1e-20, 1e-10, -1e-8, 1e-6, -1e-4, 1e-3], np.float32)
LARGE = np.array([7.9, 7.905311, 7.906, 8.0, 10.0, 20.0, 88.7, 100.0, 1e4, 1e6, 3e38,
                  np.finfo(np.float32).max], np.float32)
LARGE = np.concatenate([LARGE, -LARGE])
# Every 997th non-negative float32 bit pattern (denormals and huge values included), and its negation.
_SAMPLED = np.arange(0, 0x7F800000, 997, dtype=np.uint32).view(np.float32)
SAMPLED = np.concatenate([_SAMPLED, -_SAMPLED])
RANGES = {"dense [-20, 20]": DENSE, "tiny and denormal": TINY, "large": LARGE, "all float32 sampled": SAMPLED}


@pytest.mark.parametrize("name", list(RANGES))
def test_error_against_float64(activations, name):
    xs = RANGES[name]
    got_tanh, got_sigmoid, _ = activations(xs)
    want_tanh, want_sigmoid = exact(xs)
    tanh_error = np.abs(got_tanh - want_tanh)
    sigmoid_error = np.abs(got_sigmoid - want_sigmoid)
    worst = int(tanh_error.argmax())
    assert tanh_error[worst] <= TOLERANCE, f"tanh({xs[worst]!r}) = {got_tanh[worst]!r}, want {want_tanh[worst]!r}"
    worst = int(sigmoid_error.argmax())
    assert sigmoid_error[worst] <= TOLERANCE, \
        f"sigmoid({xs[worst]!r}) = {got_sigmoid[worst]!r}, want {want_sigmoid[worst]!r}"


def test_sigmoid_has_a_small_relative_error_where_it_is_tiny(activations):
    """ONNX's GRU test cases expect outputs of ~1e-7 within 1e-7: a sigmoid of -16 (1.1e-7) must be
    right to its last digits, not to 1e-7 absolute."""
    xs = np.concatenate([np.linspace(-85.0, 20.0, 200_001), -np.geomspace(1e-6, 85.0, 2001)]).astype(np.float32)
    _, got, _ = activations(xs)
    _, want = exact(xs)
    relative = np.abs(got - want) / want
    worst = int(relative.argmax())
    assert relative[worst] <= 3e-7, f"sigmoid({xs[worst]!r}) = {got[worst]!r}, want {want[worst]!r}"


def test_tanh_is_close_to_x_near_zero(activations):
    """Relative accuracy where tanh(x) ~ x, down to 1e-30 (below ~1e-36, x * p underflows into the
    denormals and only the absolute error, checked above, stays meaningful)."""
    xs = np.geomspace(1e-30, 1e-3, 2001).astype(np.float32)
    xs = np.concatenate([xs, -xs])
    got, _, _ = activations(xs)
    want, _ = exact(xs)
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want))
    got_zero = activations(np.array([0.0, -0.0], np.float32))
    np.testing.assert_array_equal(got_zero[0], [0.0, 0.0])
    np.testing.assert_array_equal(got_zero[1], [0.5, 0.5])


@pytest.mark.parametrize("name", list(RANGES))
def test_tanh_is_exactly_odd(activations, name):
    xs = RANGES[name]
    np.testing.assert_array_equal(activations(-xs)[0], -activations(xs)[0])


@pytest.mark.parametrize("name", list(RANGES))
def test_outputs_stay_in_range(activations, name):
    got_tanh, got_sigmoid, _ = activations(RANGES[name])
    assert got_tanh.min() >= -1.0 and got_tanh.max() <= 1.0
    assert got_sigmoid.min() >= 0.0 and got_sigmoid.max() <= 1.0


def test_saturation(activations):
    xs = np.array([20.0, -20.0, 1e4, -1e4, 3e38, -3e38, np.inf, -np.inf], np.float32)
    got_tanh, got_sigmoid, _ = activations(xs)
    np.testing.assert_allclose(got_tanh, np.sign(xs), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(got_sigmoid, (np.sign(xs) + 1) / 2, rtol=0, atol=TOLERANCE)


def test_relu(activations):
    xs = np.array([-np.inf, -3e38, -2.5, -1e-45, -0.0, 0.0, 1e-45, 0.75, 3e38, np.inf], np.float32)
    got = activations(xs)[2]
    np.testing.assert_array_equal(got, relu_reference(xs))
    np.testing.assert_array_equal(got, np.array([0, 0, 0, 0, 0, 0, 1e-45, 0.75, 3e38, np.inf], np.float32))
    np.testing.assert_array_equal(activations(DENSE)[2], np.maximum(DENSE, 0))
