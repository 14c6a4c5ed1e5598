"""firmware_sim.replay: a CSV file as one device, parsed row by row, and replayed through a real Mosquitto."""

import json
import logging
import os
from pathlib import Path

import pytest

from broker import Client, Mosquitto
from edgernn.firmware_sim.replay import CsvSource, replay_fleet

ROWS = [(0.5 + 0.01 * n, [n * 0.5, -n * 1.0, n * 0.25 + 1.0], ["still", "walk", "fall"][n % 3]) for n in range(40)]


def write_recording(path, rows=ROWS, header="ts,ax,ay,az,label", extra_lines=()):
    lines = [header] + [f"{ts},{x[0]},{x[1]},{x[2]},{label}" for ts, x, label in rows]
    for index, line in extra_lines:
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def drain(source):
    out = []
    while True:
        try:
            out.append(source.next())
        except StopIteration:
            return out


def open_files() -> set[Path]:
    """The files this process holds open (Linux)."""
    fds = Path("/proc/self/fd")
    paths = set()
    for fd in fds.iterdir():
        try:
            paths.add(Path(os.readlink(fd)))
        except OSError:
            pass  # closed meanwhile (e.g. the listing's own descriptor)
    return paths


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")


def test_a_recording_is_read_with_its_channels_labels_and_times(tmp_path):
    source = CsvSource(write_recording(tmp_path / "walk.csv"))
    assert source.channels == ("ax", "ay", "az")
    assert source.peek_time() == 0.5
    assert drain(source) == [(x, label) for _, x, label in ROWS]
    assert source.peek_time() is None


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    path = write_recording(tmp_path / "bad.csv", extra_lines=[
        (3, "0.52,1,oops,3,walk"),      # not a number
        (5, "0.01,1,2,3,walk"),         # ts goes backwards
        (7, "0.6,1,2"),                 # too few fields
        (9, ""), (10, "# a comment"),  # skipped silently
    ])
    with caplog.at_level(logging.WARNING, "edgernn.firmware_sim.replay"):
        source = CsvSource(path)
        rows = drain(source)
    assert rows == [(x, label) for _, x, label in ROWS]
    assert source.skipped == 3
    assert "bad.csv:4: row skipped" in caplog.text


def test_without_ts_or_labels_a_rate_is_needed(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("temp_c\n21.5\n21.6\n")
    with pytest.raises(ValueError, match="no 'ts' column, so a replay rate is needed"):
        CsvSource(path)
    source = CsvSource(path, rate_hz=10)
    assert drain(source) == [([21.5], None), ([21.6], None)]


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("ts,label\n1,walk\n", "no channel columns"),
    ("a,b,a\n1,2,3\n", "names a column twice"),
    ("ts,a\n", "no samples after the header"),
])
def test_files_that_cannot_be_replayed_say_why(tmp_path, text, message):
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        CsvSource(path)


@pytest.mark.broker
@pytest.mark.parametrize("rate", [None, 200.0])
def test_a_replay_publishes_every_row_in_order_with_its_truth(tmp_path, rate):
    broker = Mosquitto(tmp_path / "broker").start()
    watcher = Client(broker.port, subscribe="sensors/#")
    try:
        fleet = replay_fleet(write_recording(tmp_path / "walk.csv"), rate_hz=rate, profile="imu", port=broker.port,
                             record=True)
        stats = fleet.run()  # until the file ends
        assert stats["samples"] == stats["published"] == 40
        if rate is None:
            assert stats["elapsed_s"] >= 0.39  # at the file's timestamps: 40 rows 10 ms apart
        messages = watcher.wait_for(40)
        assert {topic for topic, _ in messages} == {"sensors/dev0000/imu"}
        bodies = [json.loads(payload) for _, payload in messages]
        assert [body["seq"] for body in bodies] == list(range(40))
        assert [body["x"] for body in bodies] == [x for _, x, _ in ROWS]
        assert [fleet.truth("dev0000", seq) for seq in range(40)] == [label for _, _, label in ROWS]
    finally:
        watcher.client.disconnect()  # first, so paho's loop thread wakes and ends at once
        watcher.close()
        broker.stop()


@needs_proc
@pytest.mark.parametrize("options", [dict(speed=0.0), dict(speed=float("nan")), dict(qos=2), dict(jitter=0.7)])
def test_a_replay_that_cannot_start_leaves_no_file_open(tmp_path, options):
    path = write_recording(tmp_path / "walk.csv")
    with pytest.raises(ValueError) as error:
        replay_fleet(path, port=1, **options)
    assert path not in open_files(), error.value  # the traceback still holds replay_fleet's locals


@needs_proc
def test_a_replay_cut_short_closes_its_file_and_counts_only_the_rows_due(tmp_path):
    rows = [(10.0 * n, [float(n), 0.0, 0.0], "still") for n in range(3)]  # 10 s apart: 0.3 s takes one row
    path = write_recording(tmp_path / "slow.csv", rows=rows)
    fleet = replay_fleet(path, port=1, connect_wait=0.0, drain_timeout=0.0)  # no broker: nothing to wait for
    assert path in open_files()
    stats = fleet.run(0.3)
    assert path not in open_files()
    assert stats["samples"] == stats["expected_samples"] == 1 and stats["achieved_ratio"] == 1.0
