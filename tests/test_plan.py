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
    # every parameter once, plus 7 activation parameters per unit and 2 per dense layer
    assert plan.weights.size == model.spec.parameter_count() + 7 * 2 + 2 * 2


def test_an_mgu_stores_each_gate_block_transposed_on_its_own():
    """n's recurrent term needs f first, so the kernel multiplies by each block separately."""
    model = random_model("mgu", hidden=5, input_size=3, head=())
    plan = pack(model.spec, model.weights)
    row = plan.meta[HEADER:HEADER + ROW]
    W, R = model.weights["layers.0.W"], model.weights["layers.0.R"]
    np.testing.assert_array_equal(plan.weights[row[4]:row[4] + 15].reshape(3, 5), W[:5].T)
    np.testing.assert_array_equal(plan.weights[row[4] + 15:row[4] + 30].reshape(3, 5), W[5:].T)
    np.testing.assert_array_equal(plan.weights[row[5] + 25:row[5] + 50].reshape(5, 5), R[5:].T)


def test_a_bidirectional_layer_packs_two_units_forward_first():
    from edgernn.plan import F_REVERSE, F_SECOND, H_UNITS, U_FLAGS, U_STATE
    model = random_model("lstm", hidden=4, input_size=3, head=(), direction="bidirectional", layers=2)
    plan = pack(model.spec, model.weights)
    assert plan.meta[H_UNITS] == 4
    rows = [plan.meta[HEADER + ROW * u:HEADER + ROW * (u + 1)] for u in range(4)]
    assert [row[U_FLAGS] for row in rows] == [0, F_REVERSE | F_SECOND] * 2
    assert [row[U_STATE] for row in rows] == [0, 8, 16, 24]
