"""The demo's live terminal view (rich): one row per device, totals and the daemon's own figures below."""

from __future__ import annotations

import io
import time

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from edgernn.demo import ms, percent

ROWS = 16
"""Devices shown; the totals cover the whole fleet."""


def render(snap: dict, fleet_stats: dict, args, model_name: str, broker_name: str, end: float) -> Group:
    """One frame from a `Scoreboard.snapshot()` and the fleet's stats."""
    table = Table(expand=True, title=f"{args.devices} devices, {args.rate:g} Hz each -- model {model_name}",
                  title_justify="left")
    for column, justify in (("device", "left"), ("true activity", "left"), ("predicted", "left"),
                            ("confidence", "right"), ("msg/s", "right"), ("accuracy", "right")):
        table.add_column(column, justify=justify)
    for key, stream in list(snap["streams"].items())[:ROWS]:
        style = {True: "green", False: "bold red"}.get(stream["last_correct"], "")
        predicted = Text(stream["predicted"] or "-", style=style)
        table.add_row(key, stream["truth"] or "-", predicted, f"{stream['confidence']:.2f}",
                      f"{stream['rate']:.0f}", percent(stream["accuracy"]))
    hidden = len(snap["streams"]) - ROWS
    if hidden > 0:
        table.add_row(f"... {hidden} more", "", "", "", "", "")

    pipeline = snap["daemon"].get("pipelines", {}).get("imu", {})
    recall = "  ".join(f"{name} {percent(value)}" for name, value in snap["recall"].items())
    totals = Text.assemble(
        ("predictions ", "dim"), f"{snap['predictions']:,}  ",
        ("rate ", "dim"), f"{snap['rate']:.0f}/s  ",
        ("accuracy ", "dim"), (percent(snap["accuracy"]), "bold"), "  ",
        ("recall ", "dim"), recall, "\n",
        ("end-to-end latency ", "dim"), f"p50 {ms(snap['latency_p50_s'])}  p99 {ms(snap['latency_p99_s'])}  ",
        ("daemon step ", "dim"), f"p50 {ms(pipeline.get('step_p50_s'))}  p99 {ms(pipeline.get('step_p99_s'))}  ",
        ("rejected ", "dim"), f"{pipeline.get('rejected', 0)}  ",
        ("published ", "dim"), f"{fleet_stats.get('published', 0):,}",
    )
    left = max(0.0, end - time.monotonic())
    header = Text.assemble(("edgernn demo", "bold cyan"), f"  broker {broker_name}  ",
                           ("time left ", "dim"), f"{left:.0f} s  ", ("Ctrl-C stops", "dim"))
    return Group(header, table, Panel(totals, title="totals", title_align="left"))


def save_screenshot(path, frame, width: int = 110) -> None:
    """One frame of the view as an SVG picture (for the README and the docs)."""
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    console.print(frame)
    console.save_svg(str(path), title="edgernn demo")
