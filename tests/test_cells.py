"""The compiled cells and layer stack (edgernn/cells/*.py, edgernn/stack.py) against the float64 NumPy oracle
(edgernn/reference.py), and the tiled many-stream kernels against one stream at a time.

Weights: every matrix has std ``GAIN / sqrt(fan_in)`` (biases std 0.1), so each layer is a contraction and
the dynamics are not chaotic. With a flat std of 0.3 a 128-unit tanh RNN has a recurrent spectral radius
near 3.4: it is chaotic, float32 rounding (~1e-7 per step) grows exponentially, and after 500 steps the
kernel and a float64 oracle differ by O(1) although both are correct (measured: 16 at H=128), and a relu
RNN overflows to inf. At GAIN = 0.5 the measured max abs error over 500 steps, across all the parity cases
below, is 2.5e-7 on outputs and 4.2e-7 on states (rnn-tanh, H=128), 20x inside the 1e-5 budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgernn import stack
from edgernn.model import PARALLEL_MIN_STREAMS, Model
from edgernn.reference import reference_run
from helpers import FAMILIES, random_spec, random_weights

from edgernn.errors import StreamingError

TOLERANCE = 1e-5
STEPS = 500
GAIN, BIAS_SCALE = 0.5, 0.1

HIDDEN = (1, 7, 32, 64, 128)
INPUTS = (1, 13, 8, 5, 17, 3, 24, 33, 2, 9)  # mostly not multiples of 8: matmul_acc unrolls k by 8
HEADS = [
    ((), ()),
    ((5,), ("identity",)),
    ((6,), ("relu",)),
    ((9, 3), ("tanh", "sigmoid")),
    ((4, 7), ("relu", "softmax")),
    ((1,), ("sigmoid",)),
    ((11, 1), ("identity", "softmax")),
]


def parity_cases():
    """Every family x every hidden size, the other options cycled so each value occurs in many cases."""
    cases, n = [], 0
    for family, options in FAMILIES.items():
        for hidden in HIDDEN:
            head, acts = HEADS[n % len(HEADS)]
            case = dict(options, hidden=hidden, input_size=INPUTS[n % len(INPUTS)], layers=1 + n % 3,
                        bias=n % 2 == 0, normalize=n % 4 in (1, 2), head=head, head_activations=acts)
            ident = (f"{family}-H{hidden}-I{case['input_size']}-L{case['layers']}"
                     f"{'' if case['bias'] else '-nobias'}{'-norm' if case['normalize'] else ''}"
                     f"-head{'+'.join(acts) or 'none'}")
            cases.append(pytest.param(case, n, id=ident))
            n += 1
    return cases


def build(case: dict, seed: int):
    spec = random_spec(**case)
    weights = random_weights(spec, seed, scale=BIAS_SCALE, gain=GAIN)
    return spec, weights, Model(spec, weights)


def inputs(model, steps, seed):
    return np.random.default_rng(seed).standard_normal((steps, model.input_size)).astype(np.float32)


@pytest.mark.parametrize("case, seed", parity_cases())
def test_run_matches_the_float64_reference(case, seed):
    spec, weights, model = build(case, seed)
    xs = inputs(model, STEPS, seed + 100)
    state = model.new_state()
    ys = model.run(xs, state)
    want_ys, want_state = reference_run(spec, weights, xs)
    assert ys.shape == want_ys.shape == (STEPS, spec.output_size) and ys.dtype == np.float32
    assert np.isfinite(want_ys).all()
    np.testing.assert_allclose(ys, want_ys, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(state, want_state, rtol=0, atol=TOLERANCE)
    if spec.head and spec.head[-1].activation.name == "softmax":
        np.testing.assert_allclose(ys.sum(axis=1), 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_run_from_a_given_state_matches_the_reference(family):
    """A run resumed from an arbitrary state (a restored stream), with the state's h and c in layer order."""
    case = dict(FAMILIES[family], hidden=32, input_size=11, layers=2, head=(3,))
    spec, weights, model = build(case, seed=7)
    start = np.random.default_rng(8).uniform(-0.9, 0.9, spec.state_size).astype(np.float32)
    xs = inputs(model, STEPS, 9)
    state = start.copy()
    ys = model.run(xs, state)
    want_ys, want_state = reference_run(spec, weights, xs, state=start)
    np.testing.assert_allclose(ys, want_ys, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(state, want_state, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_step_matches_the_reference_step_by_step(family):
    """The first steps alone: an error that only shows before the state settles is not averaged away."""
    case = dict(FAMILIES[family], hidden=7, input_size=5, layers=3, head=(4,), head_activations=("tanh",))
    spec, weights, model = build(case, seed=11)
    xs = inputs(model, 20, 12)
    state = model.new_state()
    want_ys, _ = reference_run(spec, weights, xs)
    for t, x in enumerate(xs):
        np.testing.assert_allclose(model.step(x, state), want_ys[t], rtol=0, atol=TOLERANCE, err_msg=f"step {t}")
        np.testing.assert_allclose(state, reference_run(spec, weights, xs[:t + 1])[1], rtol=0, atol=TOLERANCE)


# ---- tiles of many streams ----------------------------------------------------------------------------
BATCH_MODELS = {
    "rnn-tanh": dict(cell="rnn", hidden=7, input_size=3, layers=2, head=(2,)),
    "rnn-relu": dict(cell="rnn", activations=("relu",), hidden=32, input_size=13, bias=False, head=()),
    "gru-lbr": dict(cell="gru", hidden=64, input_size=9, normalize=True, head=(5, 3),
                    head_activations=("relu", "softmax")),
    "gru-no-lbr": dict(cell="gru", linear_before_reset=False, hidden=17, input_size=8, layers=2, head=(4,),
                       head_activations=("sigmoid",)),
    "lstm": dict(cell="lstm", hidden=64, input_size=5, layers=2, head=(6,), head_activations=("tanh",)),
    "lstm-all": dict(FAMILIES["lstm-all"], hidden=13, input_size=6, layers=2, head=(3,)),
    "lstm-proj": dict(FAMILIES["lstm-proj"], hidden=24, input_size=4, head=()),
    "mgu": dict(cell="mgu", hidden=20, input_size=7, layers=2, head=(2,)),
    "leaky": dict(cell="leaky", hidden=33, input_size=3, head=(4,), head_activations=("hard_sigmoid",)),
}
# Around the 4-stream register blocks of matmul_acc, the tile (stack.TILE) and the switch to the parallel
# kernel (PARALLEL_MIN_STREAMS), read from the code so the sweep follows the lead's tuning.
_T, _P = stack.TILE, PARALLEL_MIN_STREAMS
BATCH_SIZES = tuple(sorted({1, 3, 4, 5, 7, 8, 9, _T - 1, _T, _T + 1, _P - 1, _P, _P + 1, 200}))


def test_batch_sizes_cross_the_kernel_boundaries():
    assert 1 < _T < _P < 200
    assert {n % _T for n in BATCH_SIZES} >= {0, 1, _T - 1}
    assert min(BATCH_SIZES) < _P <= max(BATCH_SIZES) and _P in BATCH_SIZES and _P - 1 in BATCH_SIZES


@pytest.fixture(scope="module")
def batch_models():
    return {name: build(case, seed=20 + i)[2] for i, (name, case) in enumerate(BATCH_MODELS.items())}


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("family", list(BATCH_MODELS))
def test_step_batch_equals_one_stream_at_a_time(batch_models, family, n):
    model = batch_models[family]
    rng = np.random.default_rng(1000 + n)
    capacity = 2 * n + 13
    table = rng.uniform(-0.9, 0.9, (capacity, model.state_size)).astype(np.float32)
    alone = {slot: table[slot].copy() for slot in range(capacity)}
    for tick in range(3):
        slots = rng.permutation(capacity)[:n]  # scattered, shuffled, a different set each tick
        X = rng.standard_normal((n, model.input_size)).astype(np.float32)
        before = table.copy()
        Y = model.step_batch(table, slots, X)
        assert Y.shape == (n, model.output_size) and Y.dtype == np.float32
        for row, slot in enumerate(slots):
            want = model.step(X[row], alone[slot])
            assert Y[row].tobytes() == want.tobytes(), f"tick {tick}, row {row}, slot {slot}: output differs"
            assert table[slot].tobytes() == alone[slot].tobytes(), f"tick {tick}, slot {slot}: state differs"
        untouched = np.setdiff1d(np.arange(capacity), slots)
        assert table[untouched].tobytes() == before[untouched].tobytes(), "a row not named was changed"


@pytest.mark.parametrize("family", ["gru-lbr", "lstm"])
def test_parallel_and_serial_kernels_agree(batch_models, family):
    """Serial (step_rows) and parallel (step_rows_parallel) tiles of the same 130 streams, bit for bit."""
    model = batch_models[family]
    rng = np.random.default_rng(5)
    X = rng.standard_normal((130, model.input_size)).astype(np.float32)
    slots = rng.permutation(300)[:130]
    big = model.new_state(batch=300)
    small = big.copy()
    Y_parallel = model.step_batch(big, slots, X)  # >= PARALLEL_MIN_STREAMS: the parallel kernel
    Y_serial = np.concatenate([model.step_batch(small, slots[i:i + 60], X[i:i + 60]) for i in range(0, 130, 60)])
    assert Y_parallel.tobytes() == Y_serial.tobytes()
    assert big.tobytes() == small.tobytes()


# ---- whole-sequence layers: reverse and bidirectional -------------------------------------------------
DIRECTION_CASES = {
    f"{family}-{direction}": dict(FAMILIES[family], direction=direction)
    for family in ("rnn-tanh", "gru-no-lbr", "lstm", "lstm-all", "mgu", "leaky")
    for direction in ("reverse", "bidirectional")
}


@pytest.mark.parametrize("family", list(DIRECTION_CASES))
def test_reverse_and_bidirectional_layers_match_the_reference(family):
    case = dict(DIRECTION_CASES[family], hidden=9, input_size=4, layers=2, head=(3,), head_activations=("tanh",))
    spec, weights, model = build(case, seed=3)
    xs = inputs(model, 60, 4)
    start = np.random.default_rng(5).uniform(-0.5, 0.5, model.state_size).astype(np.float32)
    state = start.copy()
    ys = model.run(xs, state)
    want_ys, want_state = reference_run(spec, weights, xs, start)
    np.testing.assert_allclose(ys, want_ys, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(state, want_state, rtol=0, atol=TOLERANCE)
    batch = np.stack([start, start])
    np.testing.assert_array_equal(model.run(np.stack([xs, xs], axis=1), batch)[:, 1], ys)
    np.testing.assert_array_equal(batch[1], state)


def test_a_bidirectional_layer_reads_the_future():
    """Changing the last sample changes the first output: the reverse direction really runs backwards."""
    spec, weights, model = build(dict(cell="gru", direction="bidirectional", hidden=6, input_size=3, head=(2,)), 1)
    xs = inputs(model, 10, 2)
    changed = xs.copy()
    changed[-1] += 1.0
    first, second = model.run(xs, model.new_state()), model.run(changed, model.new_state())
    assert np.abs(first[0] - second[0]).max() > 1e-4


@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_step_refuses_a_model_that_needs_the_whole_sequence(direction):
    spec, _, model = build(dict(cell="lstm", hidden=4, input_size=3, layers=2, head=(), direction=direction), 0)
    assert not model.streamable
    state, before = model.new_state(), model.new_state()
    for call in (lambda: model.step(np.zeros(3, np.float32), state),
                 lambda: model.step_batch(model.new_state(batch=2), [0, 1], np.zeros((2, 3), np.float32))):
        with pytest.raises(StreamingError, match=f"layer 0 is {direction}: it needs the whole sequence"):
            call()
    assert state.tobytes() == before.tobytes()
