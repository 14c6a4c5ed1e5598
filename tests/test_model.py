"""The public Model API (edgernn/model.py): states, step/run/step_batch, input checks, weights checks, threads."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

import edgernn
from edgernn.errors import EdgeRNNError, InputError, SpecError
from edgernn.model import PARALLEL_MIN_STREAMS, Model
from helpers import FAMILIES, random_inputs, random_spec, random_weights



def make(family="lstm", seed=0, **options):
    """A small, well-conditioned model: input 5, two layers of 12, a dense head of 3 (unless overridden)."""
    case = dict(FAMILIES[family], input_size=5, hidden=12, layers=2, head=(3,))
    case.update(options)
    spec = random_spec(**case)
    return Model(spec, random_weights(spec, seed, scale=0.1, gain=0.5))


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return make(request.param)


@pytest.fixture(scope="module")
def lstm():
    return make("lstm", normalize=True)


def busy_state(model, seed=3):
    """A state that is not the rest state, so that an unwanted change is visible."""
    state = model.new_state()
    model.run(random_inputs(model, 7, seed), state)
    return state


# ---- states -------------------------------------------------------------------------------------------
def test_new_state(model):
    state = model.new_state()
    assert state.shape == (model.state_size,) == (model.spec.state_size,)
    assert state.dtype == np.float32 and state.flags.c_contiguous and state.flags.writeable
    assert not state.any()
    state[:] = 1.0  # a fresh array each time, not a view of the rest state
    assert not model.new_state().any()


@pytest.mark.parametrize("batch", [0, 1, 5, np.int64(3)])
def test_new_state_for_a_batch(model, batch):
    states = model.new_state(batch=batch)
    assert states.shape == (int(batch), model.state_size) and states.dtype == np.float32
    assert states.flags.c_contiguous and not states.any()


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_new_state_refuses_a_bad_batch(model, bad):
    with pytest.raises(InputError, match="batch"):
        model.new_state(batch=bad)


def test_sizes_and_repr():
    model = make("gru-lbr", head=(6, 2), head_activations=("relu", "softmax"))
    assert (model.input_size, model.output_size, model.state_size) == (5, 2, 24)
    assert repr(model) == "<edgernn.Model 5 -> gru(12) -> gru(12) -> dense(6, relu) -> dense(2, softmax)>"
    assert repr(make("lstm", head=())) == "<edgernn.Model 5 -> lstm(12) -> lstm(12)>"


def test_reset_puts_rows_back_to_new_state(lstm):
    states = lstm.new_state(batch=6)
    lstm.step_batch(states, np.arange(6), random_inputs(lstm, 6, 0))
    before = states.copy()
    lstm.reset(states, [4, 1])
    for row in (1, 4):
        assert states[row].tobytes() == lstm.new_state().tobytes()
    for row in (0, 2, 3, 5):
        assert states[row].tobytes() == before[row].tobytes()
    lstm.reset(states, np.arange(6))
    assert states.tobytes() == lstm.new_state(batch=6).tobytes()


def test_a_reset_stream_continues_like_a_new_one(lstm):
    xs = random_inputs(lstm, 30, 4)
    states = lstm.new_state(batch=2)
    lstm.step_batch(states, [0, 1], random_inputs(lstm, 2, 5))
    lstm.reset(states, [1])
    want = lstm.run(xs, lstm.new_state())
    got = np.stack([lstm.step_batch(states, [1], x[None])[0] for x in xs])
    assert got.tobytes() == want.tobytes()


# ---- step, run ----------------------------------------------------------------------------------------
def test_step_and_run_agree_bit_for_bit(model):
    xs = random_inputs(model, 300, 1)
    stepped_state, run_state = model.new_state(), model.new_state()
    stepped = np.stack([model.step(x, stepped_state) for x in xs])
    ran = model.run(xs, run_state)
    assert ran.shape == (300, model.output_size) and ran.dtype == np.float32
    assert stepped.tobytes() == ran.tobytes()
    assert stepped_state.tobytes() == run_state.tobytes()


def test_run_continues_where_step_left_off(model):
    xs = random_inputs(model, 40, 2)
    whole = model.run(xs, model.new_state())
    state = model.new_state()
    first = np.stack([model.step(x, state) for x in xs[:15]])
    rest = model.run(xs[15:], state)
    assert np.concatenate([first, rest]).tobytes() == whole.tobytes()


def test_step_returns_a_fresh_array(model):
    state = model.new_state()
    x = random_inputs(model, 2, 3)
    y0 = model.step(x[0], state)
    keep = y0.copy()
    model.step(x[1], state)
    assert y0.tobytes() == keep.tobytes()  # not a view of scratch the next call overwrites


def test_run_on_an_empty_sequence(model):
    state = busy_state(model)
    before = state.copy()
    ys = model.run(np.zeros((0, model.input_size), np.float32), state)
    assert ys.shape == (0, model.output_size) and ys.dtype == np.float32
    assert state.tobytes() == before.tobytes()
    states = model.new_state(batch=3)
    assert model.run(np.zeros((0, 3, model.input_size)), states).shape == (0, 3, model.output_size)


def test_batch_state_step_and_run_equal_separate_streams(model):
    B, T = 5, 25
    X = np.random.default_rng(6).standard_normal((T, B, model.input_size)).astype(np.float32)
    separate = [model.new_state() for _ in range(B)]
    want = np.stack([np.stack([model.step(X[t, b], separate[b]) for b in range(B)]) for t in range(T)])
    states = model.new_state(batch=B)
    got_step = np.stack([model.step(X[t], states) for t in range(T)])
    assert got_step.shape == (T, B, model.output_size)
    assert got_step.tobytes() == want.tobytes()
    assert states.tobytes() == np.stack(separate).tobytes()
    states = model.new_state(batch=B)
    got_run = model.run(X, states)
    assert got_run.tobytes() == want.tobytes()
    assert states.tobytes() == np.stack(separate).tobytes()


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.int32, np.uint8])
def test_other_real_dtypes_are_converted(lstm, dtype):
    raw = np.random.default_rng(7).uniform(0, 9, (6, lstm.input_size))
    xs = raw.astype(dtype)
    as_f32 = xs.astype(np.float32)
    want_state, state = lstm.new_state(), lstm.new_state()
    want = np.stack([lstm.step(x, want_state) for x in as_f32])
    assert np.stack([lstm.step(x, state) for x in xs]).tobytes() == want.tobytes()
    assert state.tobytes() == want_state.tobytes()
    assert lstm.run(xs, lstm.new_state()).tobytes() == want.tobytes()
    assert lstm.step_batch(lstm.new_state(batch=6), np.arange(6), xs).tobytes() == \
        lstm.step_batch(lstm.new_state(batch=6), np.arange(6), as_f32).tobytes()


def test_lists_and_strided_arrays_are_accepted(lstm):
    x = np.random.default_rng(8).standard_normal(2 * lstm.input_size).astype(np.float32)
    want = lstm.step(np.ascontiguousarray(x[::2]), lstm.new_state())
    assert lstm.step(x[::2], lstm.new_state()).tobytes() == want.tobytes()
    assert lstm.step(x[::2].tolist(), lstm.new_state()).tobytes() == want.tobytes()


# ---- bad input: InputError, state unchanged -----------------------------------------------------------
def refused(call, state, *words):
    """``call()`` raises InputError mentioning ``words`` and leaves ``state`` bit for bit as it was."""
    before = state.copy()
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    for word in words:
        assert word in message, message
    assert state.tobytes() == before.tobytes(), "a refused call changed the state"
    return message


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, EdgeRNNError)


@pytest.mark.parametrize("length", [0, 4, 6, 50])
def test_wrong_length(lstm, length):
    state = busy_state(lstm)
    x = np.ones(length, np.float32)
    refused(lambda: lstm.step(x, state), state, "x", "expected 5 features", f"({length},)")
    xs = np.ones((3, length), np.float32)
    refused(lambda: lstm.run(xs, state), state, "xs", "expected 5 features")


def test_wrong_ndim(lstm):
    state = busy_state(lstm)
    refused(lambda: lstm.step(np.float32(1.0), state), state, "x", "1 dimension")
    refused(lambda: lstm.step(np.ones((1, 5), np.float32), state), state, "x", "1 dimension", "(1, 5)")
    refused(lambda: lstm.run(np.ones(5, np.float32), state), state, "xs", "2 dimension")
    refused(lambda: lstm.run(np.ones((2, 1, 5), np.float32), state), state, "xs", "2 dimension")
    states = lstm.new_state(batch=2)
    refused(lambda: lstm.run(np.ones((3, 5), np.float32), states), states, "xs", "3 dimension")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_step(lstm, value, dtype):
    state = busy_state(lstm)
    x = np.zeros(5, dtype)
    x[3] = value
    refused(lambda: lstm.step(x, state), state, "x", "non-finite", "index 3", "not changed")


def test_non_finite_run_names_the_step_and_feature(lstm):
    state = busy_state(lstm)
    xs = random_inputs(lstm, 10, 0)
    xs[7, 2] = np.nan  # steps 0..6 are fine: the whole sequence is still refused before any step
    refused(lambda: lstm.run(xs, state), state, "xs", "non-finite", "(7, 2)")


def test_a_float64_value_beyond_float32_range_is_refused(lstm):
    """1e39 is finite in float64 but becomes inf as float32: an InputError, like any non-finite value."""
    state = busy_state(lstm)
    x = np.array([0.0, 0.0, 1e39, 0.0, 0.0])
    with np.errstate(over="ignore"):
        refused(lambda: lstm.step(x, state), state, "x", "index 2")
        refused(lambda: lstm.run(x[None], state), state, "xs", "(0, 2)")


@pytest.mark.parametrize("x", [
    np.ones(5, np.complex64), np.array(["1"] * 5), np.ones(5, bool), np.array([1.0] * 4 + [None], object),
    np.array([b"1"] * 5),
], ids=["complex", "str", "bool", "object", "bytes"])
def test_dtypes_that_are_not_real_numbers(lstm, x):
    state = busy_state(lstm)
    refused(lambda: lstm.step(x, state), state, "x", "real numbers", str(x.dtype))
    refused(lambda: lstm.run(x[None], state), state, "xs", "real numbers")
    states = lstm.new_state(batch=1)
    refused(lambda: lstm.step_batch(states, [0], x[None]), states, "X", "real numbers")


def test_state_of_the_wrong_size(lstm):
    x = np.ones(5, np.float32)
    for size in (0, lstm.state_size - 1, lstm.state_size + 1):
        state = np.zeros(size, np.float32)
        refused(lambda: lstm.step(x, state), state, "state", str(lstm.state_size))
        refused(lambda: lstm.run(x[None], state), state, "state", str(lstm.state_size))
    states = np.zeros((3, lstm.state_size + 2), np.float32)
    refused(lambda: lstm.step_batch(states, [0], x[None]), states, "state", str(lstm.state_size))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_state_of_the_wrong_dtype(lstm, dtype):
    state = np.zeros(lstm.state_size, dtype)
    x = np.ones(5, np.float32)
    refused(lambda: lstm.step(x, state), state, "state", "float32", "new_state")
    refused(lambda: lstm.run(x[None], state), state, "state", "float32")
    states = np.zeros((2, lstm.state_size), dtype)
    refused(lambda: lstm.step_batch(states, [0], x[None]), states, "state", "float32")


def test_state_that_is_not_an_array(lstm):
    state = [0.0] * lstm.state_size
    with pytest.raises(InputError, match="state: must be a float32 array"):
        lstm.step(np.ones(5, np.float32), state)
    assert state == [0.0] * lstm.state_size


def test_non_contiguous_state(lstm):
    backing = np.zeros(2 * lstm.state_size, np.float32)
    state = backing[::2]
    x = np.ones(5, np.float32)
    refused(lambda: lstm.step(x, state), backing, "state", "C-contiguous")
    refused(lambda: lstm.run(x[None], state), backing, "state", "C-contiguous")
    table = np.zeros((4, 2 * lstm.state_size), np.float32)
    refused(lambda: lstm.step_batch(table[:, ::2], [0], x[None]), table, "state", "C-contiguous")
    refused(lambda: lstm.step_batch(np.asfortranarray(table[:, :lstm.state_size]), [0], x[None]), table,
            "state", "C-contiguous")


def test_read_only_state(lstm):
    state = busy_state(lstm)
    state.flags.writeable = False
    x = np.ones(5, np.float32)
    refused(lambda: lstm.step(x, state), state, "state", "writeable")
    refused(lambda: lstm.run(x[None], state), state, "state", "writeable")
    states = lstm.new_state(batch=2)
    states.flags.writeable = False
    refused(lambda: lstm.step_batch(states, [0], x[None]), states, "state", "writeable")


@pytest.mark.parametrize("slot", [-1, 8, 100, -9])
def test_step_batch_slot_out_of_range(lstm, slot):
    states = lstm.new_state(batch=8)
    lstm.step_batch(states, np.arange(8), random_inputs(lstm, 8, 0))
    slots = [0, 3, slot]
    refused(lambda: lstm.step_batch(states, slots, random_inputs(lstm, 3, 1)), states, "slots", "[0, 8)", str(slot))


@pytest.mark.parametrize("n", [3, PARALLEL_MIN_STREAMS + 3])
def test_step_batch_with_mismatched_slots_and_samples(lstm, n):
    """len(slots) != len(X): the message says so, rather than blaming the feature count."""
    states = lstm.new_state(batch=2 * n)
    message = refused(lambda: lstm.step_batch(states, np.arange(n), random_inputs(lstm, n + 1, 0)), states)
    assert "slots" in message and str(n) in message and str(n + 1) in message, message


def test_batch_state_with_the_wrong_number_of_rows(lstm):
    """A (B, state_size) state stepped with x for another number of streams: the message names the two counts."""
    states = lstm.new_state(batch=2)
    message = refused(lambda: lstm.step(np.ones((3, 5), np.float32), states), states)
    assert "2" in message and "3" in message and "features" not in message, message


@pytest.mark.parametrize("n", [5, PARALLEL_MIN_STREAMS + 10])  # the serial and the parallel kernel
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_in_one_row_of_a_batch_changes_no_row(lstm, n, value):
    states = lstm.new_state(batch=n + 4)
    lstm.step_batch(states, np.arange(n + 4), random_inputs(lstm, n + 4, 0))
    X = random_inputs(lstm, n, 1)
    X[n - 2, 4] = value
    slots = np.random.default_rng(2).permutation(n + 4)[:n]
    refused(lambda: lstm.step_batch(states, slots, X), states, "X", "non-finite", f"({n - 2}, 4)")


def test_step_batch_with_no_streams(lstm):
    states = busy_state(lstm)[None].repeat(3, axis=0)
    before = states.copy()
    Y = lstm.step_batch(states, np.zeros(0, np.int64), np.zeros((0, 5), np.float32))
    assert Y.shape == (0, lstm.output_size) and states.tobytes() == before.tobytes()


# ---- weights ------------------------------------------------------------------------------------------
@pytest.fixture
def spec_and_weights():
    spec = random_spec("gru", input_size=4, hidden=6, layers=2, head=(3,), normalize=True)
    return spec, random_weights(spec, 0)


def weights_refused(spec, weights, *words):
    with pytest.raises(SpecError) as caught:
        Model(spec, weights)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_weights_missing_a_tensor(spec_and_weights):
    spec, weights = spec_and_weights
    del weights["layers.1.Rb"]
    weights_refused(spec, weights, "missing", "layers.1.Rb")


def test_weights_with_an_extra_tensor(spec_and_weights):
    spec, weights = spec_and_weights
    weights["layers.2.W"] = np.zeros((18, 6), np.float32)
    weights_refused(spec, weights, "unexpected", "layers.2.W")


@pytest.mark.parametrize("name, shape", [("layers.0.W", (18, 5)), ("layers.1.R", (6, 18)), ("head.0.b", (3, 1)),
                                         ("input.mean", (4, 1)), ("head.0.W", (3,))])
def test_weights_of_the_wrong_shape(spec_and_weights, name, shape):
    spec, weights = spec_and_weights
    weights[name] = np.zeros(shape, np.float32)
    weights_refused(spec, weights, name, str(spec.tensor_shapes()[name]), str(shape))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["layers.0.R", "head.0.b", "input.std"])
def test_non_finite_weights(spec_and_weights, name, value):
    spec, weights = spec_and_weights
    weights[name].flat[1] = value
    weights_refused(spec, weights, name, "non-finite")


@pytest.mark.parametrize("value", [0.0, -1.0, -0.0])
def test_non_positive_std(spec_and_weights, value):
    spec, weights = spec_and_weights
    weights["input.std"][2] = value
    weights_refused(spec, weights, "input.std", "> 0")


def test_weights_of_other_dtypes_are_converted(spec_and_weights):
    spec, weights = spec_and_weights
    want = Model(spec, weights)
    model = Model(spec, {name: array.astype(np.float64) for name, array in weights.items()})
    xs = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    assert model.run(xs, model.new_state()).tobytes() == want.run(xs, want.new_state()).tobytes()


def test_spec_must_be_a_model_spec(spec_and_weights):
    spec, weights = spec_and_weights
    with pytest.raises(SpecError, match="spec: must be a ModelSpec"):
        Model(spec.to_dict(), weights)


def test_the_model_keeps_its_own_copy_of_the_weights(spec_and_weights):
    """Changing the caller's arrays afterwards changes neither what the model computes nor `model.weights`
    (which `edgernn.save` writes and the snapshot checksum hashes)."""
    spec, weights = spec_and_weights
    model = Model(spec, weights)
    kept = {name: array.copy() for name, array in weights.items()}
    xs = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    want = model.run(xs, model.new_state())
    for array in weights.values():
        array[...] = 0.5
    assert model.run(xs, model.new_state()).tobytes() == want.tobytes()
    for name, array in kept.items():
        assert model.weights[name].tobytes() == array.tobytes(), f"model.weights[{name!r}] changed"


def test_public_names():
    assert edgernn.Model is Model and edgernn.InputError is InputError and edgernn.SpecError is SpecError


# ---- threads ------------------------------------------------------------------------------------------
def test_two_threads_step_separate_states(lstm):
    """One model, two threads, each stepping its own state 2,000 times: the same outputs and states as
    alone. The GIL switch interval is cut to 1 µs so that a thread switch lands between any two bytecodes
    of `step` many times per run (with the default 5 ms it would take many runs to see a race)."""
    steps = 2000
    xs = [random_inputs(lstm, steps, seed) for seed in (11, 12)]
    alone = []
    for x in xs:
        state = lstm.new_state()
        alone.append((np.stack([lstm.step(v, state) for v in x]), state))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(3):
            results = [None, None]
            barrier = threading.Barrier(2)

            def work(i):
                state = lstm.new_state()
                barrier.wait()
                results[i] = (np.stack([lstm.step(v, state) for v in xs[i]]), state)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            for i in range(2):
                ys, state = results[i]
                wrong = np.flatnonzero((ys != alone[i][0]).any(axis=1))
                assert wrong.size == 0, f"trial {trial}, thread {i}: {wrong.size} of {steps} outputs differ " \
                                        f"from stepping alone, first at step {wrong[:1]}"
                assert state.tobytes() == alone[i][1].tobytes(), f"trial {trial}, thread {i}: state differs"
    finally:
        sys.setswitchinterval(interval)


def test_step_into_out_equals_step_and_refuses_a_wrong_out():
    spec = random_spec("lstm", hidden=16, head=(3,))
    model = Model(spec, random_weights(spec))
    xs = random_inputs(model, steps=20)
    expected_state, state = model.new_state(), model.new_state()
    out = np.empty(model.output_size, np.float32)
    for x in xs:
        expected = model.step(x, expected_state)
        assert model.step(x, state, out=out) is out
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(state, expected_state)
    for bad in (np.empty(model.output_size), np.empty(model.output_size + 1, np.float32), [0.0] * 3):
        with pytest.raises(InputError, match="out"):
            model.step(xs[0], state, out=bad)
    np.testing.assert_array_equal(state, expected_state)


def test_step_batch_into_out_equals_step_batch_and_refuses_a_wrong_out():
    spec = random_spec("gru", hidden=16, head=(3,))
    model = Model(spec, random_weights(spec))
    X = np.random.default_rng(3).standard_normal((70, model.input_size)).astype(np.float32)
    expected_states, states = model.new_state(batch=80), model.new_state(batch=80)
    slots = np.arange(5, 75)
    out = np.empty((70, model.output_size), np.float32)
    for _ in range(3):
        expected = model.step_batch(expected_states, slots, X)
        assert model.step_batch(states, slots, X, out=out) is out
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(states, expected_states)
    for bad in (np.empty((70, model.output_size)), np.empty((69, model.output_size), np.float32), [[0.0]]):
        with pytest.raises(InputError, match="out"):
            model.step_batch(states, slots, X, out=bad)
    np.testing.assert_array_equal(states, expected_states)
