"""`edgernn top`: a live terminal view of a running daemon, read from its Prometheus endpoint or its stats topic.

Both sources give cumulative counters, so a `Snapshot` holds totals and `rates` turns two successive
snapshots into messages per second. Each snapshot carries its own ``clock``: the reader's monotonic clock
for a metrics page (read when it was fetched), the daemon's own uptime for a stats message (published every
``stats_interval``, whenever this reader happens to poll), so a rate never divides by the wrong interval.
Latency quantiles are since the daemon started (both sources keep cumulative histograms); Grafana's panels
give windowed ones. The view only reads: nothing is published, and the stats reader is a client of its own
(``<client_id>-top``, clean session), as `edgernn doctor`'s is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .metrics import quantile_from_buckets

PROBE_SUFFIX = "-top"
MIN_LISTEN_S = 0.5
"""The shortest a stats poll listens: the retained message comes one round trip after the subscription."""
HTTP_TIMEOUT_S = 5.0
PREFIX = "edgernn_"


class SourceError(Exception):
    """The daemon could not be read (endpoint unreachable, no stats message, not an edgernn page): one line."""


@dataclass
class PipelineSnapshot:
    """One pipeline's totals at one poll. ``rejected`` holds the reasons counted so far only."""

    name: str
    messages_in: float = 0.0
    messages_out: float = 0.0
    rejected: dict[str, float] = field(default_factory=dict)
    streams: int | None = None
    step_p50_s: float | None = None
    step_p99_s: float | None = None
    model: dict[str, str] | None = None  # {"name", "version", "fingerprint"} where the daemon says

    @property
    def rejected_total(self) -> float:
        return sum(self.rejected.values())


@dataclass
class Snapshot:
    """The daemon at one poll. ``clock``: seconds on the clock rates are taken on (see the module docstring);
    None for a figure the source does not give (the stats topic has no reconnect count)."""

    clock: float
    source: str
    pipelines: dict[str, PipelineSnapshot]
    connected: bool | None = None
    uptime_s: float | None = None
    queue_depth: int | None = None
    queue_dropped: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    reconnects: float | None = None
    publish_failures: float | None = None


@dataclass
class Rates:
    """Per second over the interval between two snapshots; None where there is no earlier snapshot."""

    messages_in: float | None = None
    messages_out: float | None = None
    rejected: float | None = None


# ---- the two sources -------------------------------------------------------------------------------------
def snapshot_from_metrics_text(text: str, clock: float | None = None, source: str = "metrics") -> Snapshot:
    """A snapshot from a Prometheus text page (`Metrics.text()`). ValueError when it holds no edgernn metric."""
    from prometheus_client.parser import text_string_to_metric_families

    pipelines: dict[str, PipelineSnapshot] = {}
    step_buckets: dict[str, list] = {}
    latency: list = []
    top: dict[str, float] = {}
    seen = False

    def of(labels) -> PipelineSnapshot:
        name = labels.get("pipeline", "")
        return pipelines.setdefault(name, PipelineSnapshot(name))

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            seen |= name.startswith(PREFIX)
            if name == "edgernn_messages_in_total":
                of(labels).messages_in = value
            elif name == "edgernn_messages_out_total":
                of(labels).messages_out = value
            elif name == "edgernn_rejected_total":
                pipeline = of(labels)
                if value:
                    pipeline.rejected[labels.get("reason", "?")] = value
            elif name == "edgernn_streams_live":
                of(labels).streams = int(value)
            elif name == "edgernn_step_seconds_bucket":
                of(labels)
                step_buckets.setdefault(labels.get("pipeline", ""), []).append((float(labels["le"]), value))
            elif name == "edgernn_latency_seconds_bucket":
                latency.append((float(labels["le"]), value))
            elif name == "edgernn_model_info" and value:
                of(labels).model = {key: labels.get(key, "") for key in ("name", "version", "fingerprint")}
            elif name in ("edgernn_queue_depth", "edgernn_queue_dropped_total", "edgernn_connected",
                          "edgernn_reconnects_total", "edgernn_publish_failures_total", "process_start_time_seconds"):
                top[name] = value
    if not seen:
        raise ValueError("no edgernn_ metric in it")
    for name, buckets in step_buckets.items():
        pipelines[name].step_p50_s = quantile_from_buckets(buckets, 0.5)
        pipelines[name].step_p99_s = quantile_from_buckets(buckets, 0.99)
    started = top.get("process_start_time_seconds")
    connected = top.get("edgernn_connected")
    return Snapshot(
        clock=time.monotonic() if clock is None else clock, source=source, pipelines=pipelines,
        connected=None if connected is None else bool(connected),
        uptime_s=None if started is None else max(0.0, time.time() - started),
        queue_depth=_int_or_none(top.get("edgernn_queue_depth")), queue_dropped=top.get("edgernn_queue_dropped_total"),
        latency_p50_s=quantile_from_buckets(latency, 0.5), latency_p99_s=quantile_from_buckets(latency, 0.99),
        reconnects=top.get("edgernn_reconnects_total"), publish_failures=top.get("edgernn_publish_failures_total"))


def snapshot_from_stats(stats: dict, source: str = "stats") -> Snapshot:
    """A snapshot from one message of the stats topic (`Metrics.stats()`); its clock is the daemon's uptime."""
    pipelines = {}
    for name, counts in stats.get("pipelines", {}).items():
        rejected = counts.get("rejected_by")
        if rejected is None and counts.get("rejected"):  # a daemon from before "rejected_by"
            rejected = {"(all)": counts["rejected"]}
        model = counts.get("model")
        pipelines[name] = PipelineSnapshot(
            name, messages_in=counts.get("in", 0), messages_out=counts.get("out", 0),
            rejected={reason: n for reason, n in (rejected or {}).items() if n}, streams=counts.get("streams"),
            step_p50_s=counts.get("step_p50_s"), step_p99_s=counts.get("step_p99_s"),
            model=model if isinstance(model, dict) else None)
    uptime = stats.get("uptime_s")
    return Snapshot(
        clock=float(uptime or 0.0), source=source, pipelines=pipelines, connected=stats.get("connected"),
        uptime_s=uptime, queue_depth=stats.get("queue_depth"), queue_dropped=stats.get("queue_dropped"),
        latency_p50_s=stats.get("latency_p50_s"), latency_p99_s=stats.get("latency_p99_s"))


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def _metrics_poller(url: str):
    """A function that fetches and parses ``url`` once; `SourceError` with one line when it cannot."""

    def poll() -> Snapshot:
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            raise SourceError(f"cannot read {url}: HTTP {error.code} {error.reason}") from None
        except http.client.HTTPException as error:  # something answered, but not in HTTP (an MQTT port?)
            raise SourceError(f"cannot read {url}: not an HTTP answer ({type(error).__name__})") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            why = getattr(reason, "strerror", None) or str(reason)
            raise SourceError(f"cannot read {url}: {why} (is the daemon running, with [metrics] listen "
                              "at that address?)") from None
        try:
            return snapshot_from_metrics_text(text, source=url)
        except ValueError as error:
            raise SourceError(f"{url} is not an edgernn metrics page: {error}") from None
    return poll


def _stats_poller(config, listen: float):
    """A function that listens ``listen`` seconds on the stats topic (the retained message, then any newer one)
    and makes a snapshot of the newest message; one connection per poll, so nothing lingers between polls."""
    from .mqtt import probe  # lazily: paho is imported by runtime/mqtt.py only

    topic = config.metrics.stats_topic
    broker = dataclasses.replace(config.broker, client_id=config.broker.client_id[:100] + PROBE_SUFFIX,
                                 connection_timeout=min(config.broker.connection_timeout, 10.0))

    def poll() -> Snapshot:
        bodies: list[bytes] = []
        with _quiet("edgernn.runtime.mqtt"):  # its connect/disconnect lines would scroll through the view
            failure = probe(broker, [topic], listen, lambda _topic, payload, _retained: bodies.append(payload))
        if failure:
            raise SourceError(failure)
        for payload in reversed(bodies):  # the newest readable one (the retained message comes first)
            try:
                stats = json.loads(payload)
            except ValueError:
                continue
            if isinstance(stats, dict) and isinstance(stats.get("pipelines"), dict):
                return snapshot_from_stats(stats, source=f"{topic} on {broker.host}:{broker.port}")
        raise SourceError(f"no stats message on {topic!r} at {broker.host}:{broker.port} within {listen:g} s "
                          "(is the daemon running, with this [metrics] stats_topic?)")
    return poll


@contextlib.contextmanager
def _quiet(name: str):
    """Logger ``name`` silenced for the block: the view owns the terminal, and a failure is returned anyway."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def source_for(config) -> str:
    """What `run_top` reads for a daemon config: its metrics endpoint when it serves one, else "stats"."""
    listen = config.metrics.listen
    if not listen:
        return "stats"
    from .config import parse_listen_address

    host, port = parse_listen_address(listen)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


# ---- rates and the frame ---------------------------------------------------------------------------------
def rates(previous: Snapshot | None, current: Snapshot) -> dict[str, Rates]:
    """Per-pipeline rates from ``previous`` to ``current``. A counter that went down means the daemon
    restarted, so it counts from zero (as PromQL's ``rate`` does); a clock that did not advance gives None."""
    elapsed = None if previous is None else current.clock - previous.clock
    out = {}
    for name, now in current.pipelines.items():
        before = None if previous is None else previous.pipelines.get(name)
        if before is None or not elapsed or elapsed <= 0:
            out[name] = Rates()
            continue
        out[name] = Rates(_rate(before.messages_in, now.messages_in, elapsed),
                          _rate(before.messages_out, now.messages_out, elapsed),
                          _rate(before.rejected_total, now.rejected_total, elapsed))
    return out


def _rate(before: float, now: float, elapsed: float) -> float:
    return (now - before if now >= before else now) / elapsed


def render(previous: Snapshot | None, current: Snapshot):
    """One frame: two header lines (source, connection, uptime; queue, end-to-end latency, the broker counters
    where the source has them), then a row per pipeline. Rates are "-" without ``previous``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    connected = {True: ("connected", "bold green"), False: ("DISCONNECTED", "bold red"), None: ("?", "")}
    header = Text.assemble(("edgernn top", "bold cyan"), f"  {current.source}  ", connected[current.connected],
                           "  ", ("uptime ", "dim"), _duration(current.uptime_s), "\n",
                           ("queue ", "dim"), f"{_count(current.queue_depth)}  ",
                           ("dropped ", "dim"), f"{_count(current.queue_dropped)}  ",
                           ("end-to-end ", "dim"), f"p50 {_seconds(current.latency_p50_s)}  ",
                           f"p99 {_seconds(current.latency_p99_s)}")
    for label, value in (("reconnects", current.reconnects), ("publish failures", current.publish_failures)):
        if value is not None:  # the stats topic does not carry them
            header.append(f"  {label} ", "dim")
            header.append(_count(value), "bold red" if value else "")
    table = Table(expand=True)
    for column, justify in (("pipeline", "left"), ("model", "left"), ("streams", "right"), ("in/s", "right"),
                            ("out/s", "right"), ("in", "right"), ("out", "right"), ("rejected", "left"),
                            ("step p50", "right"), ("step p99", "right")):
        table.add_column(column, justify=justify)
    per_second = rates(previous, current)
    for name, p in sorted(current.pipelines.items()):
        r = per_second[name]
        rejected = Text(", ".join(f"{reason} {_count(n)}" for reason, n in sorted(p.rejected.items())) or "0",
                        style="yellow" if p.rejected else "")
        if r.rejected:
            rejected.append(f" (+{r.rejected:.1f}/s)", "bold yellow")
        table.add_row(Text(name), Text(_model(p.model)), _count(p.streams), _per_second(r.messages_in),
                      _per_second(r.messages_out), _count(p.messages_in), _count(p.messages_out), rejected,
                      _seconds(p.step_p50_s), _seconds(p.step_p99_s))
    if previous is None:
        return Group(header, table, Text("rates: after a second poll with new counts", style="dim"))
    return Group(header, table)


def _model(model: dict | None) -> str:
    """The model's name and version ("pump-lstm v1.2"); its fingerprint where the file records neither (a
    Prometheus label of a missing value may read "None")."""
    if not model:
        return "-"
    name, version = (model.get(key) if model.get(key) not in ("", "None") else None for key in ("name", "version"))
    text = " ".join(part for part in (name, version and f"v{version}") if part)
    return text or (model.get("fingerprint") or "-")


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _count(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


# ---- the loop --------------------------------------------------------------------------------------------
def run_top(source: str, interval: float = 1.0, once: bool = False, console=None, config=None) -> int:
    """Show the daemon read from ``source`` (a metrics URL, or "stats": ``config``'s stats topic) every
    ``interval`` seconds until Ctrl-C; ``once``: two polls, one frame, return. Returns the exit code: 0 (Ctrl-C
    is how the live view ends), 1 with one line on ``console`` (else stderr) when the daemon cannot be read at
    the first poll, 130 for Ctrl-C before the first frame. Later failures are shown in the view while it keeps
    trying: a restarting daemon comes back."""
    from rich.console import Console

    try:
        poll, settle = _poller(source, config, interval)
        started = time.monotonic()
        first = poll()
        if once:
            _pace(started, interval)
            current = poll()
            # The stats topic may still hold the same message: wait (bounded) for the daemon's next one.
            deadline = time.monotonic() + settle
            while current.clock == first.clock and time.monotonic() < deadline:
                current = poll()
    except SourceError as error:
        (console or Console(stderr=True)).print(f"edgernn top: {error}", style="red", markup=False,
                                                highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 130
    console = console or Console()
    if once:
        console.print(render(first, current) if current.clock != first.clock else render(None, current))
        return 0
    return _live(poll, interval, console, first, started)


def _poller(source: str, config, interval: float):
    """(poll, settle): a function that reads the source once, and how long ``once`` waits for a new stats message."""
    if source == "stats":
        if config is None or not config.metrics.stats_topic:
            raise SourceError('"stats" reads the daemon\'s [metrics] stats_topic: give the daemon\'s config, '
                              "with stats_topic set")
        return _stats_poller(config, max(interval, MIN_LISTEN_S)), config.metrics.stats_interval + interval
    if source.startswith(("http://", "https://")):
        return _metrics_poller(source), 0.0
    raise SourceError(f'read from a metrics URL (http://host:port/metrics) or "stats", not {source!r}')


def _pace(started: float, interval: float) -> None:
    """Sleep until ``interval`` after ``started`` (a stats poll has spent it listening already)."""
    time.sleep(max(0.0, started + interval - time.monotonic()))


def _live(poll, interval: float, console, current: Snapshot, started: float) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    previous = None
    # Redrawn at each poll only (no refresh timer): on a Pi the view should cost next to nothing.
    with Live(render(previous, current), console=console, auto_refresh=False) as live:
        try:
            while True:
                _pace(started, interval)
                started = time.monotonic()
                try:
                    snapshot = poll()
                except SourceError as error:
                    live.update(Group(render(previous, current), Text(f"{error}; retrying", style="bold red")),
                                refresh=True)
                    continue
                if snapshot.clock != current.clock:  # the same stats message again: nothing new to show
                    previous, current = current, snapshot
                live.update(render(previous, current), refresh=True)
        except KeyboardInterrupt:
            return 0
