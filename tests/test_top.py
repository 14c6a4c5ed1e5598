"""`edgernn top` (runtime/top.py): snapshots from both sources, rates, the frame, a real daemon read both ways,
an unreachable daemon, and the Grafana dashboard's queries against the metrics the daemon really exposes."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from broker import Client, free_port, mosquitto_binary
from daemon_harness import payload, start_daemon, wait_until, write_config, write_model
from edgernn.runtime.config import load_config
from edgernn.runtime.metrics import Metrics
from edgernn.runtime.top import Snapshot, rates, render, run_top, snapshot_from_metrics_text, snapshot_from_stats

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "edgernn-dashboard.json"
REASONS = ("not_json", "wrong_length", "non_finite", "oversize")
COLUMNS = ("pipeline", "model", "streams", "in/s", "out/s", "in", "out", "rejected", "step p50", "step p99")
ADDED_METRICS = {"edgernn_model_info", "edgernn_model_updates_total"}  # being added beside this view
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test "
                                                                        "installs it)")


def recording_console() -> Console:
    return Console(record=True, width=120, file=io.StringIO())


def screen(frame) -> str:
    console = recording_console()
    console.print(frame)
    return console.export_text()


def row(text: str, pipeline: str) -> dict:
    """The table row of ``pipeline`` on a captured screen (its last frame), by column name."""
    for line in reversed(text.splitlines()):
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == len(COLUMNS) and cells[0] == pipeline:
            return dict(zip(COLUMNS, cells))
    raise AssertionError(f"no row for {pipeline!r} on the screen:\n{text}")


def filled_metrics() -> Metrics:
    metrics = Metrics(["imu", "temp"], REASONS)
    imu = metrics.pipeline("imu")
    imu.messages_in.inc(5)
    imu.messages_out.inc(4)
    imu.rejected("not_json").inc()
    imu.rejected("oversize").inc(2)
    imu.streams_live.set(3)
    for seconds in (1e-4, 2e-4, 3e-4, 5e-4):
        imu.step_seconds.observe(seconds)
    metrics.latency_seconds.observe(2e-3)
    metrics.queue_depth.set(7)
    metrics.queue_dropped.inc(2)
    metrics.connected.set(1)
    metrics.reconnects.inc()
    return metrics


# ---- snapshots, rates, the frame -------------------------------------------------------------------------
def test_snapshot_from_a_real_metrics_page():
    metrics = filled_metrics()
    snap = snapshot_from_metrics_text(metrics.text().decode(), clock=10.0)
    imu, temp = snap.pipelines["imu"], snap.pipelines["temp"]
    assert (imu.messages_in, imu.messages_out, imu.streams) == (5, 4, 3)
    assert imu.rejected == {"not_json": 1, "oversize": 2}  # the zero reasons left out
    assert temp.rejected == {} and temp.messages_in == 0 and temp.step_p50_s is None
    assert 1e-4 <= imu.step_p50_s <= imu.step_p99_s <= 1e-3
    assert 1e-3 <= snap.latency_p50_s <= 4e-3
    assert (snap.connected, snap.queue_depth, snap.queue_dropped, snap.reconnects) == (True, 7, 2, 1)
    assert snap.publish_failures == 0 and snap.uptime_s >= 0 and snap.clock == 10.0


def test_the_stats_summary_gives_the_same_snapshot():
    metrics = filled_metrics()
    from_text = snapshot_from_metrics_text(metrics.text().decode())
    stats = json.loads(json.dumps(metrics.stats()))
    assert stats["pipelines"]["imu"]["rejected_by"] == {"not_json": 1, "oversize": 2}
    assert stats["pipelines"]["temp"]["rejected_by"] == {}
    from_stats = snapshot_from_stats(stats)
    for name in ("imu", "temp"):
        a, b = from_text.pipelines[name], from_stats.pipelines[name]
        assert (a.messages_in, a.messages_out, a.rejected, a.streams) == (b.messages_in, b.messages_out, b.rejected,
                                                                          b.streams)
    assert from_stats.clock == stats["uptime_s"] and from_stats.reconnects is None
    assert (from_stats.connected, from_stats.queue_depth, from_stats.queue_dropped) == (True, 7, 2)


def test_model_name_and_version_from_either_source():
    info = ('# HELP edgernn_model_info The model each pipeline serves\n# TYPE edgernn_model_info gauge\n'
            'edgernn_model_info{pipeline="imu",name="har-gru",version="7",fingerprint="ab12"} 1.0\n')
    snap = snapshot_from_metrics_text(filled_metrics().text().decode() + info)
    assert snap.pipelines["imu"].model == {"name": "har-gru", "version": "7", "fingerprint": "ab12"}
    stats = filled_metrics().stats()
    stats["pipelines"]["imu"]["model"] = {"name": "har-gru", "version": "7", "fingerprint": "ab12"}
    for snapshot in (snap, snapshot_from_stats(stats)):
        assert row(screen(render(None, snapshot)), "imu")["model"] == "har-gru v7"
    unnamed = snapshot_from_stats({"uptime_s": 1, "pipelines": {"imu": {"model": {"name": "None", "version": "None",
                                                                                 "fingerprint": "ab12cd34ef56"}}}})
    assert row(screen(render(None, unnamed)), "imu")["model"] == "ab12cd34ef56"


def test_rates_come_from_the_difference_between_two_polls():
    metrics = filled_metrics()
    before = snapshot_from_metrics_text(metrics.text().decode(), clock=100.0)
    metrics.pipeline("imu").messages_in.inc(20)
    metrics.pipeline("imu").messages_out.inc(10)
    metrics.pipeline("imu").rejected("not_json").inc(4)
    after = snapshot_from_metrics_text(metrics.text().decode(), clock=102.0)
    r = rates(before, after)["imu"]
    assert (r.messages_in, r.messages_out, r.rejected) == (10.0, 5.0, 2.0)
    assert rates(before, after)["temp"].messages_in == 0.0
    assert rates(None, after)["imu"].messages_in is None
    assert rates(after, after)["imu"].messages_in is None  # the clock did not move: no rate


def test_a_restarted_daemon_counts_from_zero():
    before = snapshot_from_stats({"uptime_s": 50.0, "pipelines": {"imu": {"in": 1000, "out": 1000}}})
    after = snapshot_from_stats({"uptime_s": 60.0, "pipelines": {"imu": {"in": 30, "out": 20}}})
    assert rates(before, after)["imu"].messages_in == 3.0  # counter went down: 30 since the restart
    restarted = snapshot_from_stats({"uptime_s": 5.0, "pipelines": {"imu": {"in": 30, "out": 20}}})
    assert rates(before, restarted)["imu"].messages_in is None  # its clock went back: no interval to divide by


def test_the_frame_shows_every_figure():
    metrics = filled_metrics()
    before = snapshot_from_metrics_text(metrics.text().decode(), clock=0.0)
    metrics.pipeline("imu").messages_in.inc(10)
    metrics.pipeline("imu").rejected("not_json").inc(2)
    after = snapshot_from_metrics_text(metrics.text().decode(), clock=2.0)
    text = screen(render(before, after))
    imu = row(text, "imu")
    assert imu["streams"] == "3" and imu["in/s"] == "5.0" and imu["out/s"] == "0.0"
    assert imu["in"] == "15" and imu["out"] == "4"
    assert imu["rejected"].startswith("not_json 3, oversize 2") and "+1.0/s" in imu["rejected"]
    assert imu["step p50"].endswith("µs") and imu["step p99"] != "-"
    assert row(text, "temp")["rejected"] == "0" and row(text, "temp")["step p50"] == "-"
    for words in ("connected", "uptime", "queue 7", "dropped 2", "end-to-end p50", "reconnects 1"):
        assert words in text
    assert "rates: after a second poll" in screen(render(None, after))
    assert "DISCONNECTED" in screen(render(None, Snapshot(0.0, "x", {}, connected=False)))


# ---- a real daemon ---------------------------------------------------------------------------------------
class Publisher:
    """Samples on three streams, without pause, until stopped; one not-JSON message first."""

    def __init__(self, port: int):
        self.client = Client(port)
        self.client.publish("sensors/dev0/imu", b"garbage")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seq = 0
        while not self.stopping.wait(0.005):
            for key in range(3):
                self.client.publish(f"sensors/dev{key}/imu", payload(key, seq), qos=0, wait=False)
            seq += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        self.client.close()


@pytest.fixture
def live_daemon(tmp_path, broker):
    """A daemon with both sources on, and samples flowing to it: (daemon, config path)."""
    write_model(tmp_path / "model.ern")
    config = write_config(tmp_path, broker.port, log_level="warning",
                          metrics='listen = "127.0.0.1:0"\nstats_topic = "edgernn/{client_id}/stats"\n'
                                  "stats_interval = 0.2")
    daemon = start_daemon(config)
    publisher = Publisher(broker.port)
    try:
        stats = daemon.metrics.stats
        assert wait_until(lambda: stats()["pipelines"]["imu"]["streams"] == 3
                          and stats()["pipelines"]["imu"]["rejected"] == 1, 30), stats()
        yield daemon, config
    finally:
        publisher.stop()
        daemon.stop()


@pytest.mark.broker
@needs_mosquitto
def test_a_running_daemon_through_its_metrics_endpoint(live_daemon):
    daemon, _ = live_daemon
    host, port = daemon.metrics_address
    console = recording_console()
    assert run_top(f"http://{host}:{port}/metrics", interval=0.5, once=True, console=console) == 0
    text = console.export_text()
    imu = row(text, "imu")
    assert imu["streams"] == "3"
    assert float(imu["in/s"].replace(",", "")) > 0 and float(imu["out/s"].replace(",", "")) > 0
    assert int(imu["in"].replace(",", "")) > 3 and imu["rejected"].startswith("not_json 1")
    assert imu["step p50"] != "-" and imu["step p99"] != "-"
    assert "connected" in text and "DISCONNECTED" not in text and f"http://{host}:{port}/metrics" in text
    assert "end-to-end p50 -" not in text  # predictions went out: the latency histogram has counts


@pytest.mark.broker
@needs_mosquitto
def test_a_running_daemon_through_its_stats_topic(live_daemon):
    _, config_path = live_daemon
    config = load_config(config_path)
    console = recording_console()
    assert run_top("stats", interval=0.5, once=True, console=console, config=config) == 0
    text = console.export_text()
    imu = row(text, "imu")
    assert imu["streams"] == "3" and imu["rejected"].startswith("not_json 1")
    assert int(imu["in"].replace(",", "")) > 3 and imu["in/s"] != "-"
    assert "edgernn/edgernn-test/stats" in text and "connected" in text


# ---- a daemon that cannot be read ------------------------------------------------------------------------
def test_an_unreachable_endpoint_is_one_line_and_exit_code_1(capsys):
    console = recording_console()
    url = f"http://127.0.0.1:{free_port()}/metrics"
    assert run_top(url, interval=0.1, once=True, console=console) == 1
    text = console.export_text().strip()
    assert text.startswith(f"edgernn top: cannot read {url}") and "\n" not in text
    assert "Traceback" not in capsys.readouterr().err


def test_an_unreachable_broker_for_the_stats_topic_is_one_line_and_exit_code_1(tmp_path, capsys):
    write_model(tmp_path / "model.ern")
    port = free_port()
    config = load_config(write_config(tmp_path, port, metrics='stats_topic = "edgernn/{client_id}/stats"'))
    console = recording_console()
    assert run_top("stats", interval=0.1, once=True, console=console, config=config) == 1
    text = console.export_text().strip()
    assert text.startswith("edgernn top: ") and f"127.0.0.1:{port}" in text and "\n" not in text
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_stats_without_a_stats_topic_and_a_bad_source_are_refused(tmp_path):
    write_model(tmp_path / "model.ern")
    config = load_config(write_config(tmp_path, free_port()))
    for source, kwargs in (("stats", {"config": config}), ("stats", {}), ("127.0.0.1:9108", {})):
        console = recording_console()
        assert run_top(source, once=True, console=console, **kwargs) == 1
        assert console.export_text().startswith("edgernn top: ")


def test_a_config_is_read_through_its_metrics_endpoint_else_its_stats_topic(tmp_path):
    from edgernn.runtime.top import source_for

    write_model(tmp_path / "model.ern")
    for metrics, source in (('listen = "127.0.0.1:9464"', "http://127.0.0.1:9464/metrics"),
                            ('listen = ":9464"', "http://127.0.0.1:9464/metrics"),
                            ('listen = "[::1]:9464"', "http://[::1]:9464/metrics"),
                            ('stats_topic = "edgernn/stats"', "stats")):
        assert source_for(load_config(write_config(tmp_path, 1, metrics=metrics))) == source


# ---- the Grafana dashboard -------------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: what is left once strings, label matchers, ranges,
    grouping clauses, numbers, functions (a name before "(") and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name, after = match.group(), expr[match.end():].lstrip()
        if after.startswith("(") or name.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+(ms|s|m|h|d|w|y)", name) or match.start() > 0 and expr[match.start() - 1].isdigit():
            continue
        names.add(name)
    return names


def test_metric_names_finds_the_series_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (le, pipeline) (rate(edgernn_step_seconds_bucket'
            '{pipeline=~"$pipeline"}[$__rate_interval]))) or on(pipeline) edgernn_streams_live * 1e3')
    assert metric_names(expr) == {"edgernn_step_seconds_bucket", "edgernn_streams_live"}


def exposed_series() -> set[str]:
    """Every series name a real daemon's page holds (``_total``, ``_bucket``, ``_sum``, ``_count`` as written)."""
    text = Metrics(["imu"], REASONS).text().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def test_the_grafana_dashboard_queries_only_metrics_the_daemon_exposes():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    known = exposed_series() | ADDED_METRICS
    ids, used = [], set()
    for panel in panels(dashboard):
        ids.append(panel["id"])
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            assert names <= known, f"panel {panel['title']!r}: unknown {sorted(names - known)}"
            used |= names
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            assert set(re.findall(r"edgernn_\w+", query)) <= known
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert {"edgernn_messages_in_total", "edgernn_step_seconds_bucket", "edgernn_latency_seconds_bucket",
            "edgernn_model_info", "edgernn_model_updates_total"} <= used


def test_the_live_view_shows_a_lost_daemon_keeps_polling_and_ctrl_c_ends_it(monkeypatch):
    import edgernn.runtime.top as top

    metrics, calls = filled_metrics(), []

    def poll():
        calls.append(len(calls))
        if len(calls) == 2:
            raise top.SourceError("cannot read http://pi:9108/metrics: Connection refused")
        if len(calls) == 5:
            raise KeyboardInterrupt
        metrics.pipeline("imu").messages_in.inc(10)
        return snapshot_from_metrics_text(metrics.text().decode(), clock=float(len(calls)))

    monkeypatch.setattr(top, "_metrics_poller", lambda url: poll)
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    assert run_top("http://pi:9108/metrics", interval=0.01, console=console) == 0
    text = console.export_text()
    assert "Connection refused; retrying" in text and len(calls) == 5
    after_the_loss = text.split("Connection refused")[-1]
    assert row(after_the_loss, "imu")["in/s"] == "10.0"  # the last frame: polls 3 and 4, one second apart


def test_the_cli_runs_it_and_needs_a_source(capsys):
    from edgernn.cli import main

    assert main(["top", "--url", f"http://127.0.0.1:{free_port()}/metrics", "--once", "--interval", "0.1"]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["top"])
    assert usage.value.code == 2 and "--config FILE" in capsys.readouterr().err
