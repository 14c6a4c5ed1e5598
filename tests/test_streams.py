"""The many-stream state table (edgernn/streams.py): slots, growth, LRU eviction, columns, snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import edgernn
from edgernn.errors import FormatError
from edgernn.format import tensor_checksum
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


# ---- per-stream columns -------------------------------------------------------------------------------
COLUMNS = {"seq": ("int64", -1), "last_seen": (np.float64, 0.0), "flagged": ("bool", False)}


def column_table(model, **kwargs):
    return StreamTable(model, columns=COLUMNS, **kwargs)


def column_values(table, key):
    slot = int(table.peek_slots([key])[0])
    return {name: table.columns[name][slot].item() for name in table.columns}


DEFAULTS = {"seq": -1, "last_seen": 0.0, "flagged": False}


def test_columns_are_arrays_by_slot_at_their_defaults(model):
    table = column_table(model, initial_capacity=4)
    assert set(table.columns) == set(COLUMNS)
    for name, (dtype, default) in COLUMNS.items():
        column = table.columns[name]
        assert column.dtype == np.dtype(dtype) and column.shape == (table.capacity,)
        assert (column == default).all()
    slots = table.slots_for(["a", "b"])
    table.columns["seq"][slots] = [10, 20]
    assert column_values(table, "a") == {**DEFAULTS, "seq": 10}
    assert column_values(table, "b") == {**DEFAULTS, "seq": 20}


def test_columns_survive_growth(model):
    table = column_table(model, initial_capacity=2)
    for i in range(9):
        slot = table.slots_for([f"s{i}"])[0]
        table.columns["seq"][slot] = i  # read table.columns after slots_for: growth replaces the arrays
        table.columns["last_seen"][slot] = 100.0 + i
    assert table.capacity == 16 and table.columns["seq"].shape == (16,)
    for i in range(9):
        assert column_values(table, f"s{i}") == {"seq": i, "last_seen": 100.0 + i, "flagged": False}
    free = np.setdiff1d(np.arange(16), table.peek_slots(table.keys()))
    assert (table.columns["seq"][free] == -1).all() and (table.columns["last_seen"][free] == 0).all()


def test_columns_reset_with_the_stream(model):
    table = column_table(model)
    table.step(["a", "b"], samples(model, 2, 0))
    slots = table.slots_for(["a", "b"])
    table.columns["seq"][slots] = 5
    table.columns["flagged"][slots] = True
    table.reset("a")
    assert column_values(table, "a") == DEFAULTS
    assert column_values(table, "b") == {**DEFAULTS, "seq": 5, "flagged": True}
    slot_b = int(table.peek_slots(["b"])[0])
    table.drop("b")
    assert table.columns["seq"][slot_b] == -1 and not table.columns["flagged"][slot_b]
    assert int(table.slots_for(["c"])[0]) == slot_b
    assert column_values(table, "c") == DEFAULTS


def test_evicted_slot_comes_back_with_default_columns_and_on_evict_is_told(model):
    evicted = []
    table = column_table(model, max_streams=3, on_evict=evicted.append)
    table.columns["seq"][table.slots_for(["a", "b", "c"])] = [1, 2, 3]
    table.slots_for(["a"])
    table.slots_for(["d", "e"])  # evicts b, then c
    assert evicted == ["b", "c"] and table.evictions == 2
    assert table.keys() == ["a", "d", "e"]
    assert column_values(table, "a")["seq"] == 1
    assert column_values(table, "d")["seq"] == -1 and column_values(table, "e")["seq"] == -1
    table.drop("a")
    table.clear()
    assert evicted == ["b", "c"]  # drop and clear are not evictions


def test_on_evict_sees_a_consistent_table(model):
    seen = []

    def on_evict(key):
        seen.append((key, key in table, len(table)))
        raise RuntimeError("callback failure")

    table = StreamTable(model, max_streams=2, on_evict=on_evict)
    table.slots_for(["a", "b"])
    with pytest.raises(RuntimeError):
        table.slots_for(["c", "d"])
    assert seen == [("a", False, 2)]
    assert table.keys() == ["b", "c"]  # c got a's slot before the callback ran
    table.on_evict = None
    table.slots_for(["d"])
    assert table.keys() == ["c", "d"]


def test_peek_slots_creates_nothing_and_keeps_the_order(model):
    table = StreamTable(model)
    slots = table.slots_for(["a", "b"])
    peeked = table.peek_slots(["b", "zzz", "a"])
    assert peeked.dtype == np.int64 and peeked.tolist() == [slots[1], -1, slots[0]]
    assert table.keys() == ["a", "b"] and "zzz" not in table
    assert table.peek_slots([]).shape == (0,)


def test_stale_compares_a_whole_column(model):
    table = column_table(model, initial_capacity=2)
    keys = [f"s{i}" for i in range(7)]
    slots = table.slots_for(keys)  # first: `table.columns[...][table.slots_for(...)]` indexes the old array
    table.columns["last_seen"][slots] = [10, 50, 20, 60, 5, 70, 30]
    assert sorted(table.stale("last_seen", 25.0)) == ["s0", "s2", "s4"]
    assert table.stale("last_seen", 0.0) == []
    table.drop("s0")  # free slots hold the default (0 < 25) but are no streams
    assert sorted(table.stale("last_seen", 25.0)) == ["s2", "s4"]
    assert sorted(table.stale("seq", 0)) == sorted(table.keys())
    with pytest.raises(KeyError, match="no column 'nope'"):
        table.stale("nope", 1)


def test_clear_forgets_every_stream(model):
    table = column_table(model, initial_capacity=2)
    table.step(["a", "b", "c"], samples(model, 3, 0))
    table.columns["seq"][table.slots_for(["a"])] = 4
    capacity = table.capacity
    table.clear()
    assert len(table) == 0 and table.capacity == capacity
    assert (table.columns["seq"] == -1).all()
    assert (table.states == model.new_state()).all()
    table.slots_for(["x"])
    assert column_values(table, "x") == DEFAULTS


@pytest.mark.parametrize("columns, match", [
    ({"Seq": ("int64", 0)}, "must match"),
    ({"1st": ("int64", 0)}, "must match"),
    ({"a-b": ("int64", 0)}, "must match"),
    ({"s": ("U3", "x")}, "bool, integer or float"),
    ({"s": ("complex64", 0)}, "bool, integer or float"),
    ({"s": ("uint8", -1)}, "does not fit"),
    ({"s": ("int8", 0.5)}, "does not fit"),
    ({"s": ("float32", 1e300)}, "does not fit"),
    ({"s": ("int64", [1])}, "must be a number"),
    ({"s": ("int64", None)}, "must be a number"),
    ({"s": "int64"}, r"expected \(dtype, default\)"),
    ({"s": ("no-such-dtype", 0)}, r"expected \(dtype, default\)"),
])
def test_column_declarations_are_checked(model, columns, match):
    with pytest.raises(ValueError, match=match):
        StreamTable(model, columns=columns)


def test_nan_default_is_allowed(model):
    table = StreamTable(model, columns={"t": ("float32", float("nan"))})
    table.slots_for(["a"])
    assert np.isnan(table.columns["t"]).all()
    assert table.stale("t", 1e9) == []  # NaN is never "older"


def test_replace_model_keeping_states(model):
    table = column_table(model, initial_capacity=4)
    table.step(["a", "b"], samples(model, 2, 0))
    table.columns["seq"][table.slots_for(["a"])] = 7
    table.drop("b")
    before = table.state_of("a")
    fingerprint = table.fingerprint()
    other = random_model("lstm", input_size=8, hidden=64, seed=3)
    table.replace_model(other, keep_states=True)
    assert table.model is other and table.fingerprint() != fingerprint
    assert table.state_of("a").tobytes() == before.tobytes() and column_values(table, "a")["seq"] == 7
    free = np.setdiff1d(np.arange(table.capacity), table.peek_slots(table.keys()))
    assert (table.states[free] == other.new_state()).all()
    state = before.copy()
    x = samples(model, 1, 1)
    np.testing.assert_array_equal(table.step(["a"], x)[0], other.step(x[0], state))


def test_replace_model_resetting_states(model):
    table = column_table(model)
    table.step(["a", "b"], samples(model, 2, 0))
    table.columns["seq"][table.slots_for(["a", "b"])] = [3, 4]
    smaller = random_model("gru", input_size=8, hidden=16)
    with pytest.raises(ValueError, match="state size"):
        table.replace_model(smaller, keep_states=True)
    table.replace_model(smaller, keep_states=False)
    assert table.keys() == ["a", "b"] and table.states.shape == (table.capacity, smaller.state_size)
    for key, seq in (("a", 3), ("b", 4)):
        np.testing.assert_array_equal(table.state_of(key), smaller.new_state())
        assert column_values(table, key)["seq"] == seq  # redeliveries are still duplicates
    table.step(["c"], samples(smaller, 1, 0))
    assert len(table) == 3


# ---- snapshots with columns (format version 2) --------------------------------------------------------
def busy_column_table(model, **kwargs):
    table = busy_table(model)
    copy = column_table(model, **kwargs)
    rng = np.random.default_rng(5)
    for key in table.keys():  # same streams, same LRU order, with column values
        slot = copy.slots_for([key])[0]
        copy.states[slot] = table.state_of(key)
        copy.columns["seq"][slot] = rng.integers(0, 1000)
        copy.columns["last_seen"][slot] = rng.uniform(0, 1e6)
        copy.columns["flagged"][slot] = rng.integers(0, 2)
    return copy


def assert_same_streams(a, b, keys=None):
    """``b`` holds exactly the streams ``keys`` (default: all of ``a``'s), with ``a``'s states and columns."""
    keys = a.keys() if keys is None else keys
    assert b.keys() == keys
    assert_same_values(a, b, keys)


def assert_same_values(a, b, keys):
    for key in keys:
        assert a.state_of(key).tobytes() == b.state_of(key).tobytes()
        assert column_values(a, key) == column_values(b, key)


def test_columns_travel_in_snapshots(model, tmp_path):
    table = busy_column_table(model)
    table.drop(table.keys()[2])
    table.snapshot(tmp_path / "s.snap", metadata={"journal_generation": "7", "note": "ünïcode"})
    restored = column_table(model, initial_capacity=2)
    assert restored.restore(tmp_path / "s.snap") == {"journal_generation": "7", "note": "ünïcode"}
    assert_same_streams(table, restored)
    assert restored.columns["seq"].shape == (restored.capacity,)
    free = np.setdiff1d(np.arange(restored.capacity), restored.peek_slots(restored.keys()))
    assert (restored.columns["seq"][free] == -1).all()
    restored.slots_for([f"new{i}" for i in range(40)])  # growth after a restore keeps every column
    assert_same_values(table, restored, table.keys())
    assert column_values(restored, "new39") == DEFAULTS


def test_restore_with_fewer_slots_keeps_the_columns_of_the_newest(model, tmp_path):
    table = busy_column_table(model)
    table.snapshot(tmp_path / "s.snap")
    small = column_table(model, max_streams=5)
    assert small.restore(tmp_path / "s.snap") == {}
    assert_same_streams(table, small, keys=table.keys()[-5:])


def test_undeclared_column_in_the_file_is_ignored_and_missing_one_defaults(model, tmp_path, caplog):
    table = busy_column_table(model)
    table.snapshot(tmp_path / "s.snap")
    other = StreamTable(model, columns={"seq": ("int64", -1), "extra": ("int32", 9)})
    with caplog.at_level("DEBUG", logger="edgernn.streams"):
        other.restore(tmp_path / "s.snap")
    assert "ignoring column 'last_seen'" in caplog.text
    for key in table.keys():
        slot = other.peek_slots([key])[0]
        assert other.columns["seq"][slot] == column_values(table, key)["seq"]
        assert other.columns["extra"][slot] == 9
    plain = StreamTable(model)  # no columns at all
    plain.restore(tmp_path / "s.snap")
    assert plain.columns == {} and plain.keys() == table.keys()


def test_column_of_another_dtype_is_refused(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_column_table(model).snapshot(path)
    wrong = StreamTable(model, columns={"seq": ("int32", -1)})
    assert_restore_refused(wrong, path, "column 'seq' is int64", "expected int32")


def test_column_of_another_length_is_refused(model, tmp_path):
    table = busy_column_table(model)
    keys_json = json.dumps(table.keys())
    slots = table.peek_slots(table.keys())
    tensors = {"states": table.states[slots], "column.seq": table.columns["seq"][slots][:-1]}
    shapes = json.dumps([list(shape) for shape in model.spec.state_shapes])
    prefix = keys_json.encode() + b"\0{}\0" + shapes.encode() + b"\0" + table.fingerprint().encode()
    metadata = {"format": "edgernn-snapshot", "format_version": "3", "keys": keys_json, "model": table.fingerprint(),
                "state_shapes": shapes, "extra": "{}", "checksum": tensor_checksum(tensors, prefix)}
    path = tmp_path / "s.snap"
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    assert_restore_refused(column_table(model), path, "column 'seq' is int64[19]", "expected int64[20]")
    tensors = {"states": table.states[slots], "stray": np.zeros(3, np.float32)}
    metadata["checksum"] = tensor_checksum(tensors, prefix)
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    assert_restore_refused(column_table(model), path, "expected 'states' and 'column.*' tensors")


def test_snapshot_metadata_is_covered_by_the_checksum(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_table(model).snapshot(path, metadata={"journal_generation": "7"})
    data = path.read_bytes()
    assert data.count(b'\\"7\\"') == 1
    path.write_bytes(data.replace(b'\\"7\\"', b'\\"8\\"'))
    assert_restore_refused(busy_table(model, 3), path, "checksum mismatch")


def test_snapshot_metadata_must_be_strings(model, tmp_path):
    with pytest.raises(TypeError, match="strings"):
        busy_table(model).snapshot(tmp_path / "s.snap", metadata={"generation": 7})
    assert not (tmp_path / "s.snap").exists()


def write_v1_snapshot(table, path):
    """A snapshot exactly as edgernn wrote them before per-stream columns (format_version 1)."""
    keys = table.keys()
    keys_json = json.dumps(keys, ensure_ascii=False)
    tensors = {"states": np.ascontiguousarray(table.states[table.peek_slots(keys)])}
    metadata = {"format": "edgernn-snapshot", "format_version": "1", "keys": keys_json,
                "model": table.fingerprint(), "checksum": tensor_checksum(tensors, keys_json.encode())}
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))


def test_version_1_snapshot_still_restores(model, tmp_path):
    table = busy_table(model)
    path = tmp_path / "v1.snap"
    write_v1_snapshot(table, path)
    restored = column_table(model)
    assert restored.restore(path) == {}
    assert restored.keys() == table.keys()
    for key in table.keys():
        assert restored.state_of(key).tobytes() == table.state_of(key).tobytes()
        assert column_values(restored, key) == DEFAULTS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert_restore_refused(restored, path, "checksum mismatch")


def test_version_2_snapshot_still_restores(model, tmp_path):
    """Version 2: as version 3, with a checksum that leaves out the model fingerprint."""
    table = busy_column_table(model)
    keys_json = json.dumps(table.keys())
    slots = table.peek_slots(table.keys())
    tensors = {"states": table.states[slots], **{f"column.{name}": table.columns[name][slots] for name in table.columns}}
    shapes = json.dumps([list(shape) for shape in model.spec.state_shapes])
    metadata = {"format": "edgernn-snapshot", "format_version": "2", "keys": keys_json, "model": table.fingerprint(),
                "state_shapes": shapes, "extra": "{}",
                "checksum": tensor_checksum(tensors, keys_json.encode() + b"\0{}\0" + shapes.encode())}
    path = tmp_path / "v2.snap"
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    restored = column_table(model)
    restored.restore(path)
    assert restored.keys() == table.keys()
    for key in table.keys():
        assert restored.state_of(key).tobytes() == table.state_of(key).tobytes()


def test_a_damaged_model_fingerprint_is_a_checksum_mismatch(model, tmp_path):
    """Not "a snapshot of another model": the fingerprint is covered by the checksum since version 3."""
    path = tmp_path / "s.snap"
    table = busy_table(model)
    table.snapshot(path)
    fingerprint = table.fingerprint().encode()
    data = path.read_bytes()
    assert data.count(fingerprint) == 1
    damaged = fingerprint[:-1] + (b"0" if fingerprint[-1:] != b"0" else b"1")
    path.write_bytes(data.replace(fingerprint, damaged))
    assert_restore_refused(busy_table(model, 3), path, "checksum mismatch")


def test_snapshots_are_written_as_version_3(model, tmp_path):
    path = tmp_path / "s.snap"
    busy_column_table(model).snapshot(path)
    with safetensors.safe_open(path, "numpy") as file:
        assert file.metadata()["format_version"] == "3"
        assert sorted(file.keys()) == ["column.flagged", "column.last_seen", "column.seq", "states"]


def test_a_snapshot_of_a_retrained_model_with_the_same_shapes_restores_when_accepted(tmp_path):
    """A retrained model (same architecture, new weights) continues from the old model's states when the
    caller accepts it -- the daemon does, as a SIGHUP reload does -- and is refused otherwise."""
    from edgernn.errors import FormatError
    from helpers import random_model

    old, new, other = random_model("gru", seed=0), random_model("gru", seed=1), random_model("gru", seed=1, hidden=8)
    table = StreamTable(old)
    table.step(["a", "b"], np.ones((2, old.input_size), np.float32))
    table.snapshot(tmp_path / "s")
    with pytest.raises(FormatError, match="different model"):
        StreamTable(new).restore(tmp_path / "s")
    restored = StreamTable(new)
    restored.restore(tmp_path / "s", accept_model_change=True)
    np.testing.assert_array_equal(restored.state_of("b"), table.state_of("b"))
    with pytest.raises(FormatError, match="state shapes differ"):
        StreamTable(other).restore(tmp_path / "s", accept_model_change=True)
