"""Snapshots and the input journal of one pipeline (runtime/persistence.py), on real files."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
import pytest

from edgernn.runtime.persistence import StateStore
from edgernn.streams import StreamTable
from helpers import random_model

INPUT_SIZE = 3
COLUMNS = {"seq": ("int64", -1)}


@pytest.fixture(scope="module")
def model():
    return random_model("gru", input_size=INPUT_SIZE, hidden=8, head=(2,))


def new_table(model):
    return StreamTable(model, columns=COLUMNS, initial_capacity=2)


def make_batches(count, seed=0, keys=("a", "b", "c", "d")):
    """Micro-batches as the scheduler forms them: a key may come several times in one batch."""
    rng = np.random.default_rng(seed)
    seq = defaultdict(int)
    batches = []
    for _ in range(count):
        n = int(rng.integers(1, 7))
        batch_keys = [str(k) for k in rng.choice(keys, size=n)]
        seqs = []
        for key in batch_keys:
            seqs.append(seq[key] if rng.random() < 0.8 else -1)
            seq[key] += 1
        X = rng.standard_normal((n, INPUT_SIZE)).astype(np.float32)
        ts = np.where(rng.random(n) < 0.7, rng.uniform(1.7e9, 1.8e9, n), np.nan)
        batches.append((batch_keys, np.array(seqs, np.int64), X, ts))
    return batches


def rounds(keys):
    """Row indexes per round: round r holds the r-th sample of each key, so a step never repeats a key."""
    seen, out = defaultdict(int), []
    for index, key in enumerate(keys):
        r = seen[key]
        seen[key] += 1
        if r == len(out):
            out.append([])
        out[r].append(index)
    return out


def step(table, keys, seqs, X, ts=None):
    """Advance the table by one micro-batch, the way the daemon does (and does again on replay)."""
    for rows in rounds(keys):
        round_keys = [keys[i] for i in rows]
        table.step(round_keys, X[rows])
        table.columns["seq"][table.peek_slots(round_keys)] = seqs[rows]


def replay(table, recovery):
    """Step the recovered journal's batches, as the daemon does at start."""
    for batch in recovery.replayed:
        step(table, batch.keys, batch.seqs, batch.X)


def process(store, table, batches, first_no, done=True):
    for offset, (keys, seqs, X, ts) in enumerate(batches):
        store.append_batch(first_no + offset, keys, seqs, X, ts)
        step(table, keys, seqs, X)
        if done:
            store.mark_done(first_no + offset)
    return first_no + len(batches)


def assert_same_tables(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.state_of(key).tobytes() == b.state_of(key).tobytes(), key
        assert a.columns["seq"][a.peek_slots([key])[0]] == b.columns["seq"][b.peek_slots([key])[0]]


def assert_batches_equal(replayed, batches, first_no=0):
    assert [b.batch_no for b in replayed] == list(range(first_no, first_no + len(replayed)))
    for got, (keys, seqs, X, ts) in zip(replayed, batches):
        assert got.keys == keys
        assert got.seqs.dtype == np.int64 and got.seqs.tolist() == seqs.tolist()
        assert got.X.dtype == np.float32 and got.X.tobytes() == X.tobytes()
        assert got.ts.dtype == np.float64 and got.ts.tobytes() == ts.tobytes()  # NaN for none, bit for bit


def restart(tmp_path, model, durability="journal"):
    """A fresh process's view: a new table and store over the same files."""
    table = new_table(model)
    store = StateStore(tmp_path, "imu", durability=durability)
    return store, table, store.recover(table)


def names(tmp_path):
    return sorted(os.listdir(tmp_path))


# ---- snapshots ----------------------------------------------------------------------------------------
def test_first_start_is_empty(model, tmp_path):
    store, table, recovery = restart(tmp_path / "new" / "dir", model)
    assert (recovery.restored_streams, recovery.replayed, recovery.undone, recovery.problems,
            recovery.next_batch_no) == (0, [], set(), [], 0)
    assert names(tmp_path / "new" / "dir") == ["imu.journal.0", "imu.lock", "imu.running"]
    store.close()


def test_snapshot_round_trip_without_journal(model, tmp_path):
    store, table, _ = restart(tmp_path, model, durability="snapshot")
    process(store, table, make_batches(5), 0)
    store.snapshot(table)
    assert names(tmp_path) == ["imu.lock", "imu.running", "imu.snapshot"]  # append_batch / mark_done wrote nothing
    store.close()
    store, restored, recovery = restart(tmp_path, model, durability="snapshot")
    assert recovery.restored_streams == len(table) and recovery.replayed == [] and recovery.problems == []
    assert_same_tables(table, restored)
    store.close()


def test_an_unclean_stop_is_reported_with_the_snapshots_age(model, tmp_path, caplog):
    """``imu.running`` lives from recover to a clean close: found at a start, the last run ended without its
    final snapshot, and the start says how old the snapshot the states go back to is."""
    store, table, recovery = restart(tmp_path, model, durability="snapshot")
    assert not recovery.unclean and recovery.snapshot_age is None
    process(store, table, make_batches(3), 0)
    store.snapshot(table)
    store.close()  # clean: the marker goes
    assert "imu.running" not in names(tmp_path)
    store, table, recovery = restart(tmp_path, model, durability="snapshot")
    assert not recovery.unclean and 0 <= recovery.snapshot_age < 60
    os.utime(tmp_path / "imu.snapshot", (time.time() - 42, time.time() - 42))
    store.close(clean=False)  # as kill -9 leaves it
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgernn.runtime.persistence"):
        store, table, recovery = restart(tmp_path, model, durability="snapshot")
    assert recovery.unclean and 42 <= recovery.snapshot_age < 60
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "unclean_stop"]
    assert "snapshot of 4" in record.getMessage() and "missing" in record.getMessage()
    assert record.durability == "snapshot" and 42 <= record.snapshot_age_s < 60
    store.close(clean=False)
    StateStore(tmp_path, "imu").close()  # a store that never recovered leaves the marker where it is
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgernn.runtime.persistence"):
        store, _, recovery = restart(tmp_path, model)  # with the journal nothing is lost, and it says so
    assert recovery.unclean and "nothing lost" in caplog.records[-1].getMessage()
    store.close()
    store, _, recovery = restart(tmp_path, model)
    assert not recovery.unclean
    store.close()


# ---- the journal --------------------------------------------------------------------------------------
def test_journal_round_trip(model, tmp_path):
    batches = make_batches(4)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches[:3], 0)
    process(store, table, batches[3:], 3, done=False)
    store.close()  # as after kill -9: nothing more is written
    store, _, recovery = restart(tmp_path, model)
    assert recovery.problems == [] and recovery.restored_streams == 0
    assert_batches_equal(recovery.replayed, batches)
    assert recovery.undone == {3} and recovery.next_batch_no == 4
    store.mark_done(3)  # the daemon published batch 3 again
    store.close()
    store, _, recovery = restart(tmp_path, model)
    assert recovery.undone == set() and len(recovery.replayed) == 4
    store.close()


def test_journal_keeps_each_rows_delivery_id(model, tmp_path):
    """The daemon recognises a crash's redeliveries by these ids: they must come back exactly."""
    from edgernn.runtime.mqtt import delivery_id

    keys, seqs, X, ts = make_batches(1)[0]
    deliveries = np.array([delivery_id(60000 + i, f"sensors/{k}/imu", b"{}") if i % 2 else 0
                           for i, k in enumerate(keys)], np.uint64)
    store, table, _ = restart(tmp_path, model)
    store.append_batch(0, keys, seqs, X, ts, deliveries)
    store.close()
    store, _, recovery = restart(tmp_path, model)
    np.testing.assert_array_equal(recovery.replayed[0].deliveries, deliveries)
    assert int(deliveries[1]) >> 32 == 60001
    store.close()


def test_replay_reproduces_the_uninterrupted_states(model, tmp_path):
    batches = make_batches(30, seed=1)
    reference = new_table(model)
    for batch in batches:
        step(reference, *batch)

    store, table, _ = restart(tmp_path, model)
    next_no = process(store, table, batches[:12], 0)
    store.snapshot(table)
    next_no = process(store, table, batches[12:25], next_no)
    store.close()  # crash
    store, table, recovery = restart(tmp_path, model)
    assert recovery.problems == [] and recovery.next_batch_no == 25
    assert_batches_equal(recovery.replayed, batches[12:25], first_no=12)
    replay(table, recovery)
    process(store, table, batches[25:], recovery.next_batch_no)
    store.close()  # crash again, after more batches on the continued journal
    store, table, recovery = restart(tmp_path, model)
    replay(table, recovery)
    assert_same_tables(reference, table)
    store.close()


def two_batch_journal(model, tmp_path):
    """A journal with: header, batch 0, done 0, batch 1; the file's size after each record."""
    batches = make_batches(2, seed=2)
    store, table, _ = restart(tmp_path, model)
    path = store.journal_path
    ends = [path.stat().st_size]
    store.append_batch(0, *batches[0])
    ends.append(path.stat().st_size)
    store.mark_done(0)
    ends.append(path.stat().st_size)
    store.append_batch(1, *batches[1])
    ends.append(path.stat().st_size)
    store.close()
    return path, path.read_bytes(), batches, ends


def test_truncation_at_every_byte_offset(model, tmp_path):
    """A power cut may leave any prefix: replay keeps the whole batches and reports the rest."""
    path, data, batches, ends = two_batch_journal(model, tmp_path)
    header_end, batch0_end, done_end, batch1_end = ends
    assert batch1_end == len(data)
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        store, _, recovery = restart(tmp_path, model, durability="snapshot")  # reads, writes nothing
        store.close()
        whole = sum(cut >= end for end in (batch0_end, batch1_end))
        assert_batches_equal(recovery.replayed, batches[:whole])
        assert recovery.undone == ({0, 1} - ({0} if cut >= done_end else set())) & set(range(whole))
        if cut in ends:
            assert recovery.problems == [], cut
        else:
            assert len(recovery.problems) == 1, cut
            problem = recovery.problems[0]
            assert str(path) in problem
            offset = 0 if cut < header_end else max(end for end in ends if end <= cut)
            assert f"byte offset {offset}" in problem or (cut == 0 and "empty journal" in problem), problem


def test_bit_flips_are_detected(model, tmp_path):
    path, data, batches, ends = two_batch_journal(model, tmp_path)
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 1 << (index % 8)
        path.write_bytes(bytes(flipped))
        store, _, recovery = restart(tmp_path, model, durability="snapshot")
        store.close()
        assert len(recovery.problems) == 1, index
        record_start = max(end for end in [0] + ends if end <= index)
        assert f"byte offset {record_start}" in recovery.problems[0]
        assert_batches_equal(recovery.replayed, batches[:sum(index >= end for end in ends[1::2])])


def test_truncated_journal_is_cut_and_the_journal_continues(model, tmp_path):
    path, data, batches, ends = two_batch_journal(model, tmp_path)
    path.write_bytes(data[:ends[2] + 10])  # batch 1 half written
    store, table, recovery = restart(tmp_path, model)
    assert len(recovery.problems) == 1 and "truncated" in recovery.problems[0]
    assert recovery.next_batch_no == 1 and len(recovery.replayed) == 1
    assert path.stat().st_size == ends[2]  # cut after the last whole record
    kept = [name for name in names(tmp_path) if ".corrupt-" in name]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_bytes() == data[:ends[2] + 10]
    store.append_batch(1, *batches[1])
    store.close()
    store, table, recovery = restart(tmp_path, model)
    assert recovery.problems == []
    assert_batches_equal(recovery.replayed, batches)
    store.close()


def test_journal_of_another_model_is_ignored(model, tmp_path):
    batches = make_batches(2)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches, 0)
    store.close()
    other = random_model("gru", input_size=INPUT_SIZE, hidden=8, head=(2,), seed=7)
    table = new_table(other)
    store = StateStore(tmp_path, "imu", durability="journal")
    recovery = store.recover(table)
    assert recovery.replayed == [] and len(recovery.problems) == 1
    assert "different model" in recovery.problems[0] and "imu.journal.0" in recovery.problems[0]
    assert [name for name in names(tmp_path) if ".ignored-" in name]
    store.append_batch(0, *batches[0])  # a fresh journal for the new model
    store.close()
    store = StateStore(tmp_path, "imu", durability="journal")
    recovery = store.recover(new_table(other))
    assert recovery.problems == []
    assert_batches_equal(recovery.replayed, batches[:1])
    store.close()


# ---- generations --------------------------------------------------------------------------------------
def test_snapshot_rotates_the_journal(model, tmp_path):
    batches = make_batches(9, seed=3)
    store, table, _ = restart(tmp_path, model)
    next_no = process(store, table, batches[:3], 0)
    store.snapshot(table)
    assert store.generation == 1
    assert names(tmp_path) == ["imu.journal.1", "imu.lock", "imu.running", "imu.snapshot"]
    next_no = process(store, table, batches[3:6], next_no)
    store.snapshot(table)
    assert names(tmp_path) == ["imu.journal.2", "imu.lock", "imu.running", "imu.snapshot"]
    assert StreamTable(model).restore(tmp_path / "imu.snapshot") == {
        "journal_generation": "2", "next_batch_no": "6", "pipeline": "imu"}
    process(store, table, batches[6:], next_no)
    store.close()
    store, _, recovery = restart(tmp_path, model)
    assert store.generation == 2 and recovery.restored_streams == len(table)
    assert_batches_equal(recovery.replayed, batches[6:], first_no=6)
    assert recovery.next_batch_no == 9
    store.close()


def test_crash_between_snapshot_and_new_journal(model, tmp_path):
    """Snapshot 1 is written but journal 1 not yet started: journal 0 is stale, nothing is replayed."""
    batches = make_batches(4, seed=4)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches, 0)
    store.close()
    table.snapshot(tmp_path / "imu.snapshot",  # what StateStore.snapshot writes first
                   {"journal_generation": "1", "next_batch_no": "4", "pipeline": "imu"})
    store, restored, recovery = restart(tmp_path, model)
    assert recovery.replayed == [] and recovery.problems == [] and recovery.next_batch_no == 4
    assert_same_tables(table, restored)
    assert names(tmp_path) == ["imu.journal.1", "imu.lock", "imu.running", "imu.snapshot"]
    store.close()


def test_crash_before_the_old_journal_is_deleted(model, tmp_path):
    batches = make_batches(6, seed=5)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches[:3], 0)
    old_journal = store.journal_path.read_bytes()
    store.snapshot(table)
    process(store, table, batches[3:], 3)
    store.close()
    (tmp_path / "imu.journal.0").write_bytes(old_journal)  # its deletion did not reach the disk
    (tmp_path / ".imu.snapshot.abc123.tmp").write_bytes(b"half a snapshot")  # an interrupted write
    store, _, recovery = restart(tmp_path, model)
    assert recovery.problems == []
    assert_batches_equal(recovery.replayed, batches[3:], first_no=3)
    assert names(tmp_path) == ["imu.journal.1", "imu.lock", "imu.running", "imu.snapshot"]
    store.close()


def test_crash_before_the_snapshot_is_replaced(model, tmp_path):
    """Snapshot 0's successor never landed: snapshot 0 with all of journal 0 gives the same states."""
    batches = make_batches(6, seed=6)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches, 0)
    store.close()
    store, restored, recovery = restart(tmp_path, model)
    replay(restored, recovery)
    assert_same_tables(table, restored)
    store.close()


def test_snapshot_durability_replays_a_journal_left_by_journal_durability(model, tmp_path):
    batches = make_batches(3, seed=7)
    store, table, _ = restart(tmp_path, model)
    process(store, table, batches, 0)
    store.close()
    store, restored, recovery = restart(tmp_path, model, durability="snapshot")
    assert_batches_equal(recovery.replayed, batches)
    replay(restored, recovery)
    store.snapshot(restored)
    assert names(tmp_path) == ["imu.lock", "imu.running", "imu.snapshot"]
    store.close()


# ---- damaged snapshots, the directory, misuse ---------------------------------------------------------
def test_corrupt_snapshot_is_moved_aside(model, tmp_path):
    store, table, _ = restart(tmp_path, model)
    process(store, table, make_batches(3), 0)
    store.snapshot(table)
    process(store, table, make_batches(2, seed=9), 3)
    store.close()
    data = bytearray((tmp_path / "imu.snapshot").read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "imu.snapshot").write_bytes(bytes(data))
    store, restored, recovery = restart(tmp_path, model)
    assert recovery.restored_streams == 0 and len(restored) == 0
    assert recovery.replayed == []  # journal 1 followed a snapshot that is gone: it is stale
    assert len(recovery.problems) == 1 and "checksum mismatch" in recovery.problems[0]
    aside = [name for name in names(tmp_path) if name.startswith("imu.snapshot.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == bytes(data)
    assert names(tmp_path) == sorted(aside + ["imu.journal.0", "imu.lock", "imu.running"])
    store.close()


def test_snapshot_of_another_model_is_moved_aside(model, tmp_path):
    store, table, _ = restart(tmp_path, model)
    process(store, table, make_batches(3), 0)
    store.snapshot(table)
    store.close()
    other = random_model("gru", input_size=INPUT_SIZE, hidden=6, head=(2,), seed=8)  # other state shapes
    store = StateStore(tmp_path, "imu", durability="journal")
    recovery = store.recover(new_table(other))
    assert recovery.restored_streams == 0 and "different model" in recovery.problems[0]
    assert any(name.startswith("imu.snapshot.corrupt-") for name in names(tmp_path))
    store.close()


def test_a_retrained_model_of_the_same_shapes_keeps_the_snapshots_states(model, tmp_path):
    """A model file replaced by a retrained one (same architecture) and a restart: states are kept, as a
    SIGHUP reload keeps them, instead of every stream restarting from zero."""
    store, table, _ = restart(tmp_path, model)
    process(store, table, make_batches(3), 0)
    store.snapshot(table)
    store.close()
    retrained = random_model("gru", input_size=INPUT_SIZE, hidden=8, head=(2,), seed=9)
    store = StateStore(tmp_path, "imu", durability="journal")
    restored = new_table(retrained)
    recovery = store.recover(restored)
    assert recovery.restored_streams == len(table)
    assert all("journal of a different model" in problem for problem in recovery.problems)  # the old model's
    for key in table.keys():
        np.testing.assert_array_equal(restored.state_of(key), table.state_of(key))
    store.close()


def test_pipelines_share_a_directory(model, tmp_path):
    """Names that extend one another ("imu", "imu.journal") never touch each other's files."""
    batches = make_batches(2)
    stores = {name: StateStore(tmp_path, name, durability="journal")
              for name in ("imu", "imu-2", "imu.journal", "imu.journal.3", "imu.snapshot")}
    tables = {name: new_table(model) for name in stores}
    for name, store in stores.items():
        store.recover(tables[name])
    process(stores["imu"], tables["imu"], batches, 0)
    for name, store in stores.items():
        if name != "imu":
            process(store, tables[name], batches, 0)
            store.snapshot(tables[name])
        store.close()
    leftovers = [".imu.journal.snapshot.abcd1234.tmp", ".imu.snapshot.snapshot.abcd1234.tmp"]
    for name in leftovers:  # another pipeline's half-written files
        (tmp_path / name).write_bytes(b"")
    before = set(names(tmp_path))
    store, _, recovery = restart(tmp_path, model)
    assert_batches_equal(recovery.replayed, batches)
    store.close()
    assert set(names(tmp_path)) == before
    for name in ("imu-2", "imu.journal", "imu.journal.3", "imu.snapshot"):
        store = StateStore(tmp_path, name, durability="journal")
        table = new_table(model)
        recovery = store.recover(table)
        assert recovery.replayed == [] and recovery.problems == []
        assert_same_tables(tables[name], table)
        store.close()


def test_state_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"state dir {blocker / 'state'}: cannot create it"):
        StateStore(blocker / "state", "imu")


def test_one_store_per_pipeline_at_a_time(tmp_path):
    first = StateStore(tmp_path, "imu")
    with pytest.raises(OSError, match="'imu' is in use by another process"):
        StateStore(tmp_path, "imu")
    StateStore(tmp_path, "other").close()
    first.close()
    StateStore(tmp_path, "imu").close()


@pytest.mark.parametrize("name", ["", "a/b", "../x", "a b", "ü", "a*"])
def test_pipeline_names_must_be_safe_file_names(tmp_path, name):
    with pytest.raises(ValueError, match="pipeline name"):
        StateStore(tmp_path, name)


def test_misuse_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="durability"):
        StateStore(tmp_path, "imu", durability="always")
    store = StateStore(tmp_path, "imu", durability="journal")
    keys, seqs, X, _ = make_batches(1)[0]
    with pytest.raises(RuntimeError, match="recover"):
        store.append_batch(0, keys, seqs, X)
    busy = new_table(model)
    busy.slots_for(["a"])
    with pytest.raises(ValueError, match="empty"):
        store.recover(busy)
    table = new_table(model)
    store.recover(table)
    with pytest.raises(RuntimeError, match="already"):
        store.recover(new_table(model))
    store.append_batch(5, keys, seqs, X)
    with pytest.raises(ValueError, match="must increase"):
        store.append_batch(5, keys, seqs, X)
    with pytest.raises(ValueError, match="shape"):
        store.append_batch(6, keys, seqs, X[:, :2])
    with pytest.raises(ValueError, match="shape"):
        store.append_batch(6, keys, seqs[:-1], X)
    with pytest.raises(ValueError, match="shape"):
        store.append_batch(6, keys, seqs, X, np.zeros(len(keys) + 1))
    with pytest.raises(ValueError, match="65535"):
        store.append_batch(6, ["k" * 70_000], np.array([1]), X[:1])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.snapshot(table)
    store, _, recovery = restart(tmp_path, model)  # the refused batches left no trace
    assert [batch.batch_no for batch in recovery.replayed] == [5] and recovery.problems == []
    store.close()


def test_each_batch_appends_one_whole_record(model, tmp_path):
    """Frame (5) + batch_no and n (12) + per row key, seq, ts and delivery + X + CRC (4): nothing else, nothing less."""
    store, table, _ = restart(tmp_path, model)
    sizes = [store.journal_path.stat().st_size]
    for number, batch in enumerate(make_batches(5)):
        store.append_batch(number, *batch)
        sizes.append(store.journal_path.stat().st_size)
    store.close()
    keys_bytes = [sum(2 + len(k.encode()) + 8 + 8 + 8 for k in keys) for keys, *_ in make_batches(5)]
    rows = [len(keys) for keys, *_ in make_batches(5)]
    expected = [5 + 12 + kb + 4 * n * INPUT_SIZE + 4 for kb, n in zip(keys_bytes, rows)]
    assert np.diff(sizes).tolist() == expected
