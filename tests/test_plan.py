"""The packed layout the kernels read (edgernn/plan.py)."""

import numpy as np
import pytest

from edgernn.plan import ALIGNMENT, HEADER, ROW, aligned_zeros, pack
from helpers import random_model


@pytest.mark.parametrize("shape", [(1,), (37,), (5, 13), (64, 128)])
def test_aligned_zeros_start_on_a_cache_line(shape):
    array = aligned_zeros(shape)
    assert array.shape == shape and array.dtype == np.float32 and array.flags.c_contiguous
    assert array.ctypes.data % ALIGNMENT == 0
    assert not array.any()


def test_aligned_zeros_of_nothing_is_an_empty_array():
    assert aligned_zeros((0, 4)).shape == (0, 4)


def test_buffers_the_kernels_stream_through_are_aligned():
    model = random_model("gru", hidden=24, layers=2, head=(5,))
    assert model._packed.ctypes.data % ALIGNMENT == 0
    assert model._work.ctypes.data % ALIGNMENT == 0
    assert model.new_state(batch=7).ctypes.data % ALIGNMENT == 0
    model.step_batch(model.new_state(batch=3), [0, 1, 2], np.zeros((3, model.input_size), np.float32))
    rows = model._tile_work
    assert all(row.ctypes.data % ALIGNMENT == 0 for row in rows)


def test_pack_stores_every_weight_transposed_at_its_offset():
    model = random_model("lstm", hidden=16, layers=2, head=(6, 3), normalize=True)
    plan = pack(model.spec, model.weights)
    for index, layer in enumerate(model.spec.layers):
        row = plan.meta[HEADER + ROW * index:HEADER + ROW * (index + 1)]
        G, H, I = layer.gates, layer.hidden_size, layer.input_size
        WT = plan.weights[row[4]:row[4] + I * G * H].reshape(I, G * H)
        RT = plan.weights[row[5]:row[5] + H * G * H].reshape(H, G * H)
        np.testing.assert_array_equal(WT, model.weights[f"layers.{index}.W"].T)
        np.testing.assert_array_equal(RT, model.weights[f"layers.{index}.R"].T)
    assert plan.weights.size == model.spec.parameter_count()
