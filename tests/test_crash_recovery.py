"""`edgernn serve` starting on damaged state files: it says what it discarded, keeps what is valid, and serves.

tests/test_persistence.py proves record by record that damage is detected and the valid prefix kept; here
the daemon as a process meets what a power cut leaves behind, and the proof is in its predictions: each
stream's next prediction equals the offline run over exactly the samples whose state was valid.

One real daemon run (journal durability) makes the files: samples 0..4 of two streams, SIGTERM (the
snapshot holds them), then samples 5..9, one message per micro-batch, and ``kill -9`` (journal 1 holds
them, and the ``imu.running`` marker says the stop was not clean). Each test damages a copy and starts a
fresh daemon on it, against a fresh broker (no redelivery muddles what the state holds).
"""

from __future__ import annotations

import json
import re
import struct
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from broker import Client, Mosquitto, free_port, mosquitto_binary
from daemon_harness import DaemonProcess, offline, payload, wait_until, write_config, write_model

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")]

ATOL = 1e-5
STREAMS = 2
JOURNAL = 'durability = "journal"\nsnapshot_interval = 3600'
_FRAME = struct.Struct("<cI")  # a journal record: type, payload length; then the payload and a CRC32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The state files of a daemon killed mid-stream: {file name: bytes}, and the model."""
    folder = tmp_path_factory.mktemp("pristine")
    model = write_model(folder / "model.ern")
    broker = Mosquitto(folder / "broker").start()
    config = write_config(folder, broker.port, state=JOURNAL, log_level="info")
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    process = DaemonProcess(config, folder / "daemon.log")
    try:
        process.start()
        _publish(sender, collector, range(5))
        assert process.terminate() == 0
        process.start()
        _publish(sender, collector, range(5, 10))
        process.kill()
    finally:
        sender.close(), collector.close()
        if process.process.poll() is None:
            process.terminate()
        broker.stop()
    state = folder / "state"
    files = {path.name: path.read_bytes() for path in state.iterdir() if path.name != "imu.lock"}
    assert sorted(files) == ["imu.journal.1", "imu.running", "imu.snapshot"], sorted(files)
    return files, model


def _publish(sender, collector, seqs) -> None:
    """One message at a time, each answered before the next: one message per micro-batch."""
    for seq in seqs:
        for k in range(STREAMS):
            answered = collector.wait_for_distinct(0, 0) + 1
            sender.publish(f"sensors/dev{k}/imu", payload(k, seq))
            assert collector.wait_for_distinct(answered, 20) == answered


def _batch_records(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each batch record of a journal, in order."""
    offset, found = 0, []
    while offset < len(data):
        kind, length = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length + 4
        if kind == b"B":
            found.append((offset, end))
        offset = end
    return found


def _flip_a_state_bit(data: bytes) -> bytes:
    """One bit of the states tensor, the snapshot's last 96 bytes (a bit of the model fingerprint in its
    header is not caught: it reads as a retrained model of the same shapes, whose states are kept)."""
    flipped = bytearray(data)
    flipped[-40] ^= 0x10
    return bytes(flipped)


def _cut_last_batch(data: bytes) -> bytes:
    start, end = _batch_records(data)[-1]
    return data[:(start + end) // 2]


ALL = {k: list(range(10)) for k in range(STREAMS)}
NONE = {k: [] for k in range(STREAMS)}
SNAPSHOT_ONLY = {k: list(range(5)) for k in range(STREAMS)}

# name: (damage {file: bytes -> bytes, or None to add}, the file named in the log, words of the reason,
#        samples each stream's state holds afterwards)
CASES = {
    "snapshot_bit_flip": ({"imu.snapshot": _flip_a_state_bit}, "imu.snapshot", "moved aside", NONE),
    "snapshot_half_written": ({"imu.snapshot": lambda d: d[:len(d) // 2]}, "imu.snapshot", "moved aside", NONE),
    "snapshot_zero_length": ({"imu.snapshot": lambda d: b""}, "imu.snapshot", "moved aside", NONE),
    "snapshot_temp_file_left": ({".imu.snapshot.x7k2q9.tmp": None}, ".imu.snapshot.x7k2q9.tmp",
                                "left by an interrupted write", ALL),
    "journal_truncated_tail": ({"imu.journal.1": _cut_last_batch}, "imu.journal.1", "truncated record",
                               {0: list(range(10)), 1: list(range(9))}),
    "journal_garbage_appended": ({"imu.journal.1": lambda d: d + b"\x07 power cut garbage \xff\xfe" * 3},
                                 "imu.journal.1", "corrupt record", ALL),
    "journal_zero_length": ({"imu.journal.1": lambda d: b""}, "imu.journal.1", "empty journal", SNAPSHOT_ONLY),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_state_file_is_reported_and_the_valid_part_serves(case, pristine, tmp_path, broker):
    files, model = pristine
    damage, named, reason, kept = CASES[case]
    state = tmp_path / "state"
    state.mkdir()
    for name, data in files.items():
        (state / name).write_bytes(data)
    for name, change in damage.items():
        (state / name).write_bytes(files["imu.snapshot"][:1000] if change is None else change(files[name]))
    write_model(tmp_path / "model.ern")  # the same seed: the same model
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, state=JOURNAL, log_level="info",
                          metrics=f'listen = "127.0.0.1:{metrics_port}"')
    process = DaemonProcess(config, tmp_path / "daemon.log").start()
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        for seq in (10, 11):
            for k in range(STREAMS):
                sender.publish(f"sensors/dev{k}/imu", payload(k, seq))
        # Wait for 10 and 11 themselves, not for a count: the pristine run's kill may come before the last
        # batch's 'done' record, and then the restart publishes sample 9's prediction again (at least once).
        assert wait_until(lambda: all({10, 11} <= set(collector.predictions().get(f"dev{k}", {}))
                                      for k in range(STREAMS)), 30), collector.predictions()
        got = collector.predictions()
        for k in range(STREAMS):
            want = offline(model, k, kept[k] + [10, 11])[-2:]
            np.testing.assert_allclose([got[f"dev{k}"][10], got[f"dev{k}"][11]], want, atol=ATOL, err_msg=f"dev{k}")
        missed = sum(10 - kept[k][-1] - 1 for k in range(STREAMS) if kept[k])
        assert _counter(metrics_port, "edgernn_samples_missed_total") == missed
    finally:
        sender.close(), collector.close()
        assert process.terminate() == 0
    events = _events(tmp_path / "daemon.log")
    discarded = [e for e in events if e.get("event") == "state_discarded"]
    assert discarded, "nothing said what was discarded"
    assert any(Path(e["file"]).name == named and reason in e["msg"] for e in discarded), discarded
    assert all(e["level"] == "warning" and e["pipeline"] == "imu" for e in discarded)
    unclean = [e for e in events if e.get("event") == "unclean_stop"]
    assert len(unclean) == 1 and "nothing lost" in unclean[0]["msg"]  # the kill -9 before: the journal covers it


def test_kill_9_with_snapshots_only_says_so_and_counts_the_samples_missing(tmp_path, broker):
    """Without the journal a kill -9 takes the states back to the snapshot: the restart names the snapshot's
    age, each stream's next sample is a gap of the samples acked since, and they are counted."""
    model = write_model(tmp_path / "model.ern")
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, state="snapshot_interval = 3600", log_level="info",
                          metrics=f'listen = "127.0.0.1:{metrics_port}"')
    process = DaemonProcess(config, tmp_path / "daemon.log")
    collector = Client(broker.port, subscribe="predictions/#")
    sender = Client(broker.port)
    try:
        process.start()
        _publish(sender, collector, range(5))
        assert process.terminate() == 0  # the snapshot holds samples 0..4
        assert not (tmp_path / "state" / "imu.running").exists()  # a clean stop removes the marker
        process.start()
        _publish(sender, collector, range(5, 9))
        time.sleep(0.3)  # the inputs' acks reach the broker: they are gone from it
        process.kill()
        assert (tmp_path / "state" / "imu.running").exists()
        process.start()
        for k in range(STREAMS):
            sender.publish(f"sensors/dev{k}/imu", payload(k, 9))
        assert collector.wait_for_distinct(10 * STREAMS, 30) == 10 * STREAMS
        got = collector.predictions()
        for k in range(STREAMS):  # sample 9 stepped on the snapshot's state: samples 5..8 are missing from it
            np.testing.assert_allclose(got[f"dev{k}"][9], offline(model, k, [0, 1, 2, 3, 4, 9])[-1], atol=ATOL)
            np.testing.assert_allclose([got[f"dev{k}"][s] for s in range(9)], offline(model, k, range(9)), atol=ATOL)
        assert _counter(metrics_port, "edgernn_samples_missed_total") == 4 * STREAMS
        assert _counter(metrics_port, "edgernn_seq_gaps_total") == STREAMS
    finally:
        sender.close(), collector.close()
        if process.process.poll() is None:
            assert process.terminate() == 0
    unclean = [e for e in _events(tmp_path / "daemon.log") if e.get("event") == "unclean_stop"]
    assert len(unclean) == 1, unclean
    assert unclean[0]["level"] == "warning" and unclean[0]["durability"] == "snapshot"
    assert 0 < unclean[0]["snapshot_age_s"] < 120
    assert "s ago" in unclean[0]["msg"] and "missing" in unclean[0]["msg"]


def _events(log_path: Path) -> list[dict]:
    events = []
    for line in log_path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def _counter(port: int, name: str) -> float:
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^{name}{{pipeline="imu"}} (\S+)$', page, re.M)
    assert match, f"{name} is not on the metrics page"
    return float(match.group(1))
