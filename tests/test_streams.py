"""The many-stream state table (edgernn/streams.py): slots, growth, LRU eviction, snapshots."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import edgernn
from edgernn.errors import FormatError
from edgernn.streams import StreamTable
from helpers import random_model

@pytest.fixture(scope="module")
def model():
    return random_model("lstm", input_size=8, hidden=64)


def samples(model, n, seed):
    return np.random.default_rng(seed).standard_normal((n, model.input_size)).astype(np.float32)


# ---- stepping -----------------------------------------------------------------------------------------
def test_step_through_the_table_equals_separate_states(model):
    """Bit for bit, for batches small and large enough for the parallel kernel (model.PARALLEL_MIN_STREAMS)."""
    table = StreamTable(model, initial_capacity=2)
    reference = {}
    rng = np.random.default_rng(0)
    names = [f"sensor-{i}" for i in range(100)]
    for call in range(40):
        keys = list(rng.choice(names, size=int(rng.integers(1, 90)), replace=False))
        X = samples(model, len(keys), seed=call)
        Y = table.step(keys, X)
        assert Y.shape == (len(keys), model.output_size)
        for key, x, y in zip(keys, X, Y):
            state = reference.setdefault(key, model.new_state())
            np.testing.assert_array_equal(y, model.step(x, state))
    for key, state in reference.items():
        np.testing.assert_array_equal(table.state_of(key), state)


def test_new_stream_starts_from_new_state(model):
    table = StreamTable(model)
    table.slots_for(["a"])
    assert "a" in table and len(table) == 1
    np.testing.assert_array_equal(table.state_of("a"), model.new_state())


def test_state_of_is_a_copy(model):
    table = StreamTable(model)
    table.step(["a"], samples(model, 1, 0))
    copy = table.state_of("a")
    copy[:] = 123.0
    assert not np.array_equal(table.state_of("a"), copy)


def test_repeated_keys_in_one_step_are_refused(model):
    table = StreamTable(model)
    with pytest.raises(ValueError, match="distinct"):
        table.step(["a", "b", "a"], samples(model, 3, 0))
    with pytest.raises(ValueError, match="2 keys but 3 samples"):
        table.step(["a", "b"], samples(model, 3, 0))


def test_bad_input_leaves_states_alone(model):
    table = StreamTable(model)
    table.step(["a"], samples(model, 1, 0))
    before = table.states.copy()
    X = samples(model, 1, 1)
    X[0, 0] = np.nan
    with pytest.raises(edgernn.InputError):
        table.step(["a"], X)
    np.testing.assert_array_equal(table.states, before)


def test_reset_and_drop(model):
    table = StreamTable(model)
    table.step(["a", "b"], samples(model, 2, 0))
    table.reset("a")
    np.testing.assert_array_equal(table.state_of("a"), model.new_state())
    assert not np.array_equal(table.state_of("b"), model.new_state())
    slot_b = int(table.slots_for(["b"])[0])
    table.drop("b")
    assert "b" not in table and len(table) == 1
    assert int(table.slots_for(["c"])[0]) == slot_b  # the freed slot is reused, at new_state()
    np.testing.assert_array_equal(table.state_of("c"), model.new_state())
    for method in (table.reset, table.drop, table.state_of):
        with pytest.raises(KeyError, match="no stream 'zzz'"):
            method("zzz")


# ---- growth and eviction ------------------------------------------------------------------------------
def test_growth_doubles_and_preserves_states(model):
    table = StreamTable(model, initial_capacity=2)
    assert table.capacity == 2
    expected = {}
    for i in range(9):
        key = f"s{i}"
        table.step([key], samples(model, 1, i))
        expected[key] = table.state_of(key)
        for known, state in expected.items():  # every earlier stream survives each growth unchanged
            np.testing.assert_array_equal(table.state_of(known), state)
    assert table.capacity == 16 and len(table) == 9 and table.evictions == 0


def test_eviction_bounds_the_table(model):
    table = StreamTable(model, max_streams=5, initial_capacity=2)
    for i in range(40):
        table.step([f"s{i}", f"t{i}"], samples(model, 2, i))
        assert len(table) <= 5 and table.capacity <= 5 and table.states.shape[0] <= 5
    assert len(table) == 5
    assert table.evictions == 80 - 5
    assert table.keys() == ["t37", "s38", "t38", "s39", "t39"]


def test_eviction_is_least_recently_used(model):
    table = StreamTable(model, max_streams=3)
    table.slots_for(["a", "b", "c"])
    table.slots_for(["a"])  # a is now the most recently used; b the least
    table.slots_for(["d"])
    assert table.keys() == ["c", "a", "d"] and "b" not in table
    assert table.evictions == 1


def test_evicted_stream_returns_at_new_state(model):
    table = StreamTable(model, max_streams=2)
    x = samples(model, 1, 0)
    first = table.step(["a"], x)
    table.step(["a"], x)
    table.step(["b", "c"], samples(model, 2, 1))  # evicts a
    assert "a" not in table and table.evictions == 1
    table.slots_for(["a"])  # a returns, evicting b
    np.testing.assert_array_equal(table.state_of("a"), model.new_state())
    np.testing.assert_array_equal(table.step(["a"], x), first)  # as if it had never been seen


def test_too_many_distinct_keys_in_one_call(model):
    table = StreamTable(model, max_streams=3)
    with pytest.raises(ValueError, match="max_streams"):
        table.slots_for(["a", "b", "c", "d"])


def test_capacity_never_exceeds_max_streams(model):
    table = StreamTable(model, max_streams=3, initial_capacity=64)
    assert table.capacity == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_sizes_must_be_positive_integers(model, bad):
    with pytest.raises(ValueError):
        StreamTable(model, max_streams=bad)
    with pytest.raises(ValueError):
        StreamTable(model, initial_capacity=bad)


# ---- snapshots ----------------------------------------------------------------------------------------
def busy_table(model, streams=20, max_streams=100_000):
    table = StreamTable(model, max_streams=max_streams, initial_capacity=4)
    rng = np.random.default_rng(3)
    names = [f"sensor/{i:03d}" for i in range(streams)]
    for call in range(25):
        keys = list(rng.choice(names, size=min(6, streams), replace=False))
        table.step(keys, samples(model, len(keys), seed=100 + call))
    return table


def test_snapshot_restore_in_the_same_process(model, tmp_path):
    table = busy_table(model)
    table.drop(table.keys()[3])
    path = tmp_path / "streams.snap"
    table.snapshot(path)
    restored = StreamTable.from_snapshot(model, path)
    assert restored.keys() == table.keys()
    for key in table.keys():
        assert restored.state_of(key).tobytes() == table.state_of(key).tobytes()
    restored.slots_for(["brand-new"])  # the restored table keeps working: new streams, growth
    np.testing.assert_array_equal(restored.state_of("brand-new"), model.new_state())


RESTORE_AND_STEP = """
import sys, numpy as np, edgernn
model_path, snapshot_path, x_path, y_path = sys.argv[1:]
table = edgernn.StreamTable(edgernn.load(model_path))
table.restore(snapshot_path)
keys = table.keys()
np.save(y_path, table.step(keys, np.load(x_path)))
"""


def test_snapshot_restore_in_a_new_process_gives_identical_outputs(model, tmp_path):
    table = busy_table(model)
    edgernn.save(model, tmp_path / "model.ern")
    table.snapshot(tmp_path / "streams.snap")
    keys = table.keys()
    X = samples(model, len(keys), seed=999)
    np.save(tmp_path / "x.npy", X)
    expected = table.step(keys, X)
    subprocess.run([sys.executable, "-c", RESTORE_AND_STEP, "model.ern", "streams.snap", "x.npy", "y.npy"],
                   cwd=tmp_path, check=True, timeout=300)
    actual = np.load(tmp_path / "y.npy")
    assert actual.tobytes() == expected.tobytes()


def test_empty_snapshot(model, tmp_path):
    path = tmp_path / "empty.snap"
    StreamTable(model).snapshot(path)
    table = busy_table(model)
    table.restore(path)
    assert len(table) == 0 and table.keys() == []


def test_restore_keeps_the_most_recent_streams_that_fit(model, tmp_path):
    table = busy_table(model)
    table.snapshot(tmp_path / "s.snap")
    small = StreamTable(model, max_streams=5)
    small.restore(tmp_path / "s.snap")
    assert small.keys() == table.keys()[-5:] and small.capacity <= 5
    for key in small.keys():
        np.testing.assert_array_equal(small.state_of(key), table.state_of(key))


def test_snapshot_needs_string_keys(model, tmp_path):
    table = StreamTable(model)
    table.slots_for([("tuple", "key")])
    with pytest.raises(TypeError, match="string"):
        table.snapshot(tmp_path / "s.snap")


def assert_restore_refused(table, path, *words):
    before_keys, before_states = table.keys(), table.states.copy()
    with pytest.raises(FormatError) as caught:
        table.restore(path)
    message = str(caught.value)
    assert path.name in message
    for word in words:
        assert word in message, message
    assert table.keys() == before_keys  # a refused restore leaves the table as it was
    np.testing.assert_array_equal(table.states, before_states)


@pytest.mark.parametrize("keep", [0.3, 0.99])
def test_truncated_snapshot(model, tmp_path, keep):
    path = tmp_path / "s.snap"
    busy_table(model).snapshot(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    assert_restore_refused(busy_table(model, 3), path, "truncated")


def test_corrupted_snapshot(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_table(model).snapshot(path)
    data = bytearray(path.read_bytes())
    data[-17] ^= 0x10
    path.write_bytes(bytes(data))
    assert_restore_refused(busy_table(model, 3), path, "checksum mismatch")


def test_corrupted_keys_in_snapshot(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_table(model).snapshot(path)
    data = path.read_bytes().replace(b"sensor/007", b"sensor/008", 1)
    path.write_bytes(data)
    assert_restore_refused(busy_table(model, 3), path, "checksum mismatch")


def test_snapshot_of_another_model_is_refused(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_table(model).snapshot(path)
    other = random_model("lstm", input_size=8, hidden=64, seed=1)  # same shapes, different weights
    assert_restore_refused(StreamTable(other), path, "different model")


def test_model_file_is_not_a_snapshot(model, tmp_path):
    path = tmp_path / "model.ern"
    edgernn.save(model, path)
    assert_restore_refused(StreamTable(model), path, "model file", "not an edgernn stream snapshot")
    busy_table(model).snapshot(tmp_path / "s.snap")
    with pytest.raises(FormatError, match="stream snapshot, not an edgernn model file"):
        edgernn.load(tmp_path / "s.snap")


def test_missing_snapshot(model, tmp_path):
    assert_restore_refused(StreamTable(model), tmp_path / "absent.snap", "no such file")


def test_snapshot_is_written_atomically(model, tmp_path):
    path = tmp_path / "s.snap"
    table = busy_table(model)
    table.snapshot(path)
    table.snapshot(path)
    assert os.listdir(tmp_path) == ["s.snap"]
