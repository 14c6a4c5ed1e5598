"""`edgernn simulate` run as a user runs it: a real process, a real Mosquitto, the summary it prints."""

import json
import signal
import subprocess
import sys
import time

import pytest

from broker import Client
from edgernn.cli import main

CLI = [sys.executable, "-m", "edgernn", "simulate"]


def simulate(*args, timeout=60):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.broker
def test_simulate_runs_a_fleet_and_prints_a_json_summary(broker):
    watcher = Client(broker.port, subscribe="plant/#")
    try:
        done = simulate("--devices", 3, "--rate", 20, "--broker", f"127.0.0.1:{broker.port}", "--duration", 1,
                        "--seed", 3, "--faults", "drop=0.1,duplicate=0.1", "--topic", "plant/{device}/{profile}",
                        "--id-prefix", "m-", "--profile", "temperature", "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["devices"] == 3 and summary["profile"] == "temperature" and summary["rate_hz"] == 20
        assert summary["samples"] > 0 and summary["interrupted"] is False
        assert summary["faults"]["drop"] > 0 and summary["faults"]["duplicate"] > 0
        assert summary["published"] == summary["samples"] - summary["faults"]["drop"] + summary["faults"]["duplicate"]
        assert summary["acked"] == summary["published"] and summary["buffered"] == 0
        messages = watcher.wait_for(summary["published"])
        assert len(messages) == summary["published"]
        assert {topic for topic, _ in messages} == {f"plant/m-000{i}/temperature" for i in range(3)}
        assert all(len(json.loads(payload)["x"]) == 1 for _, payload in messages)
    finally:
        watcher.client.disconnect()  # first, so paho's loop thread wakes and ends at once
        watcher.close()


@pytest.mark.broker
def test_ctrl_c_stops_cleanly_with_a_summary(broker):
    watcher = Client(broker.port, subscribe="sensors/#")
    process = subprocess.Popen(CLI + ["--devices", "2", "--broker", f"127.0.0.1:{broker.port}"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    try:
        assert len(watcher.wait_for(20, timeout=30)) >= 20  # it runs
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        watcher.client.disconnect()
        watcher.close()
    assert process.returncode == 0, err
    assert "simulated 2 imu devices at 50 Hz" in out and "-- interrupted" in out
    published = int(out.split("published: ")[1].split()[0].replace(",", ""))
    assert f"(acknowledged {published:,})" in out and "still buffered 0" in out
    assert "error" not in err


def interrupt(args: list, when) -> tuple[int, str, str]:
    """Run ``simulate ARGS``, send SIGINT once ``when()`` is true; (exit status, stdout, stderr)."""
    process = subprocess.Popen(CLI + [str(a) for a in args], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    try:
        when()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def test_ctrl_c_while_the_broker_drops_connection_attempts_stops_and_exits_1(dropping_port):
    # Before: each of the 20 devices' connects blocked in turn, twice, and Ctrl-C waited for them (minutes).
    code, out, err = interrupt(["--devices", 20, "--broker", f"127.0.0.1:{dropping_port}", "--connect-timeout", 0.5,
                                "--drain-timeout", 1], lambda: time.sleep(2.0))
    assert code == 1, err
    assert "-- interrupted" in out and "0 connects" in out
    assert f"edgernn: error: no device could connect to 127.0.0.1:{dropping_port} (timed out)" in err


@pytest.mark.broker
def test_messages_left_undelivered_after_draining_exit_1(broker):
    watcher = Client(broker.port, subscribe="sensors/#")
    try:
        def broker_gone_while_sampling():
            assert len(watcher.wait_for(20, timeout=30)) >= 20
            broker.stop()
            time.sleep(0.5)  # readings pile up in the buffers

        code, out, err = interrupt(["--devices", 2, "--broker", f"127.0.0.1:{broker.port}", "--drain-timeout", 0.5,
                                    "--json"], broker_gone_while_sampling)
    finally:
        watcher.client.disconnect()
        watcher.close()
    assert code == 1, err
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["connects"] == 2 and summary["buffered"] > 0
    assert (f"edgernn: error: {summary['buffered'] + summary['in_flight']:,} messages not delivered to "
            f"127.0.0.1:{broker.port} after draining (still buffered {summary['buffered']:,}") in err


@pytest.mark.broker
def test_simulate_replays_a_csv_file(broker, tmp_path):
    recording = tmp_path / "rec.csv"
    recording.write_text("ts,temp_c,label\n" + "".join(f"{n * 0.01},{20 + n * 0.1},normal\n" for n in range(25)))
    done = simulate("--replay", recording, "--broker", f"127.0.0.1:{broker.port}", "--profile", "temperature",
                    "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["devices"] == 1 and summary["samples"] == summary["published"] == summary["acked"] == 25


@pytest.mark.parametrize("args, message", [
    (["--faults", "dorp=1"], "argument --faults: faults: unknown setting 'dorp'"),
    (["--broker", "host:99999"], "argument --broker: must be HOST:PORT"),
    (["--broker", "[::1"], "argument --broker: must be HOST:PORT or [IPv6]:PORT"),
    (["--rate", "0"], "argument --rate: must be a positive number"),
    (["--qos", "2"], "argument --qos: invalid choice"),
    (["--connect-timeout", "0"], "argument --connect-timeout: must be a positive number"),
    (["--drain-timeout", "-1"], "argument --drain-timeout: must be a positive number"),
    (["--replay", "x.csv", "--devices", "4"], "--replay runs one device"),
])
def test_usage_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate"] + args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_replay_file_is_one_line(capsys, tmp_path):
    assert main(["simulate", "--replay", str(tmp_path / "none.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgernn: error: ") and "none.csv" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_profile_is_one_line(capsys):
    assert main(["simulate", "--profile", "sonar", "--broker", "127.0.0.1:1"]) == 1
    assert "unknown profile 'sonar': choose one of imu, vibration, temperature" in capsys.readouterr().err
