"""Sliding windows (edgernn/window.py): a bidirectional model served one sample at a time."""

import numpy as np
import pytest

from edgernn.errors import InputError
from edgernn.window import SlidingWindow
from helpers import random_model


@pytest.fixture(scope="module")
def bidirectional():
    return random_model("gru", input_size=3, hidden=6, head=(2,), direction="bidirectional")


def test_each_output_is_the_model_run_over_the_last_samples(bidirectional):
    xs = np.random.default_rng(0).standard_normal((23, 3)).astype(np.float32)
    window = SlidingWindow(bidirectional, size=5, min_fill=2)
    for t, x in enumerate(xs):
        y = window.push(x)
        if t == 0:
            assert y is None
            continue
        recent = xs[max(0, t - 4):t + 1]
        np.testing.assert_array_equal(y, bidirectional.run(recent, bidirectional.new_state())[-1])
    assert window.filled == 5
    window.clear()
    assert window.push(xs[0]) is None and window.filled == 1


def test_bad_samples_and_sizes_are_refused(bidirectional):
    window = SlidingWindow(bidirectional, size=3)
    with pytest.raises(InputError, match="x: expected 3 finite floats"):
        window.push([1.0, np.nan, 0.0])
    assert window.filled == 0
    for size, fill in ((0, None), (3, 4), (True, None)):
        with pytest.raises(InputError):
            SlidingWindow(bidirectional, size=size, min_fill=fill)
