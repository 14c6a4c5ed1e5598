"""`edgernn demo`: the whole pipeline on one machine, no set-up, watched live.

A broker (a local Mosquitto, else an embedded pure-Python one; or ``--broker HOST:PORT``), the daemon as
its own process (`edgernn serve`, exactly as it runs on a device), a simulated fleet of IMU wearables
publishing over MQTT, and a `Scoreboard` that joins samples and predictions to show, per device, the true
activity, the predicted class and its confidence, messages/s and a running accuracy. The model is the
bundled GRU activity classifier (``edgernn/data/imu_activity.ern``, trained by
``examples/activity_gru/activity_gru.py --save-bundled``) unless ``--model`` names another.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from edgernn.local_broker import die_with_parent, start_local_broker, stop_child

DEMO_CLIENT_ID = "edgernn-demo"
STATUS_TOPIC = "edgernn/demo/status"
STATS_TOPIC = "edgernn/demo/stats"
SAMPLES, PREDICTIONS = "sensors/+/imu", "predictions/+/imu"
DAEMON_START_TIMEOUT_S = 300  # a first run on a Pi compiles the kernels: minutes


def bundled_model() -> Path:
    return Path(str(resources.files("edgernn") / "data" / "imu_activity.ern"))


def daemon_config(folder: Path, model: Path, host: str, port: int) -> Path:
    """The daemon's TOML for the demo: one pipeline, stats every second for the view."""
    path = folder / "edgernn.toml"
    path.write_text(f"""# Written by `edgernn demo`.
[broker]
host = {json.dumps(host)}
port = {port}
client_id = "{DEMO_CLIENT_ID}"
persistent_session = false
status_topic = "{STATUS_TOPIC}"

[[pipelines]]
name = "imu"
model = {json.dumps(str(model))}
subscribe = "{SAMPLES}"
publish = "predictions/{{key}}/imu"
qos = 1
publish_qos = 0

[state]
dir = {json.dumps(str(folder / 'state'))}

[metrics]
stats_topic = "{STATS_TOPIC}"
stats_interval = 1.0

[log]
level = "info"
""")
    return path


class DaemonProcess:
    """`edgernn serve` in its own process (as on a device), its log in a file; stopped with SIGTERM."""

    def __init__(self, config: Path, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # Its own session: a Ctrl-C in the terminal reaches the demo only, which then stops the fleet, lets
        # the daemon answer what was sent, and stops it. It dies with the demo, however the demo ends.
        self.process = subprocess.Popen([sys.executable, "-m", "edgernn", "serve", "--config", str(config)],
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent)

    def failed(self) -> str | None:
        """The end of the daemon's log when it has exited, else None."""
        if self.process.poll() is None:
            return None
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self, timeout: float = 20.0) -> int:
        stop_child(self.process, timeout)
        self._log.close()
        return self.process.returncode


def run(args) -> int:
    """The demo from the CLI's arguments (see `edgernn demo --help`); 0 when it ran and stopped cleanly."""
    from edgernn.firmware_sim.fleet import Fleet
    from edgernn.firmware_sim.signals import ImuSignal
    from edgernn.scoreboard import Scoreboard

    model = Path(args.model) if args.model else bundled_model()
    check_model(model, len(ImuSignal.channels), len(ImuSignal.labels))
    headless = args.headless or not sys.stdout.isatty()
    with contextlib.ExitStack() as stack:
        for signum in (signal.SIGTERM, signal.SIGHUP):  # stop as Ctrl-C does: everything started is stopped
            stack.callback(signal.signal, signum, signal.signal(signum, _interrupt))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgernn-demo-")))
        if args.broker:
            host, port = args.broker
            broker_name = f"{host}:{port}"
        else:
            broker = stack.enter_context(start_local_broker(folder / "broker", prefer=args.broker_kind))
            host, port, broker_name = broker.host, broker.port, f"{broker.kind} on {broker.host}:{broker.port}"
        say(f"broker: {broker_name}")
        daemon = DaemonProcess(daemon_config(folder, model, host, port), folder / "daemon.log")
        stack.callback(daemon.stop)
        board = Scoreboard(host, port, ImuSignal.labels, SAMPLES, PREDICTIONS, stats=STATS_TOPIC,
                           status=STATUS_TOPIC)  # after the fork above: no paho thread to fork beside
        stack.callback(board.close)
        say(f"daemon: edgernn serve with {model.name} (a first run compiles the kernels: up to a minute)")
        wait_for_daemon(daemon, board)
        fleet = Fleet("imu", devices=args.devices, rate_hz=args.rate, host=host, port=port, seed=args.seed,
                      labels=True)
        fleet.start()
        stack.callback(fleet.stop)
        say(f"fleet: {args.devices} simulated IMU wearables at {args.rate:g} Hz; "
            f"{'running' if headless else 'watching'} for {args.duration:g} s (Ctrl-C stops)")
        interrupted = _watch(board, fleet, args, model.name, broker_name, headless)
        last_frame = (board.snapshot(), fleet.stats())
        fleet.stop()
        drain(board)
        summary = _summary(board.snapshot(), fleet.stats(), args, broker_name, interrupted)
        summary["daemon_exit_code"] = daemon.stop()
        print(_format_summary(summary), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        if args.screenshot:
            from edgernn.demo_view import render, save_screenshot
            try:
                save_screenshot(args.screenshot, render(*last_frame, args, model.name, broker_name, time.monotonic()))
            except OSError as error:
                say(f"could not save the screenshot: {error}")
        return 0 if summary["daemon_exit_code"] == 0 else 1


def check_model(path: Path, inputs: int, outputs: int) -> None:
    """Refuse, before anything starts, a model the imu fleet cannot feed or the scoreboard cannot score.

    Reads the file's spec only: building the model here would compile (or load) its kernels in this
    process too, when only the daemon runs them.
    """
    from edgernn.format import read_model_file
    spec, _ = read_model_file(path)
    if (spec.input_size, spec.output_size) != (inputs, outputs):
        raise ValueError(f"{path}: takes {spec.input_size} inputs and gives {spec.output_size} outputs; the demo's "
                         f"IMU samples have {inputs} values and its activities {outputs} classes")


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def wait_for_daemon(daemon: DaemonProcess, board) -> None:
    """Until the daemon's retained status says online (it has loaded its model and subscribed)."""
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while board.daemon_status != "online":
        failure = daemon.failed()
        if failure is not None:
            raise RuntimeError(f"the daemon exited while starting; the end of its log:\n{failure}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon did not come online within {DAEMON_START_TIMEOUT_S} s "
                               f"(its log: {daemon.log_path})")
        time.sleep(0.1)


def _watch(board, fleet, args, model_name: str, broker_name: str, headless: bool) -> bool:
    """Show the view until the duration ends or Ctrl-C; True when interrupted."""
    end = time.monotonic() + args.duration
    try:
        if headless:
            next_line = time.monotonic() + 2.0
            while time.monotonic() < end and not fleet.wait(0):  # a fleet that failed ends the demo
                if time.monotonic() >= next_line:
                    snap = board.snapshot()
                    say(f"{snap['predictions']} predictions, {snap['rate']:.0f}/s, accuracy "
                        f"{percent(snap['accuracy'])}, latency p50 {ms(snap['latency_p50_s'])}")
                    next_line += 2.0
                time.sleep(0.1)
        else:
            from rich.live import Live

            from edgernn.demo_view import render
            with Live(render(board.snapshot(), fleet.stats(), args, model_name, broker_name, end),
                      refresh_per_second=4, screen=False) as live:
                while time.monotonic() < end and not fleet.wait(0):
                    time.sleep(0.25)
                    live.update(render(board.snapshot(), fleet.stats(), args, model_name, broker_name, end))
    except KeyboardInterrupt:
        return True
    return False


def drain(board, timeout: float = 5.0) -> None:
    """Wait until predictions stop arriving (the daemon has answered what the fleet sent)."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        count = board.snapshot()["predictions"]
        if count == last:
            return
        last = count
        time.sleep(0.5)


def _summary(snap: dict, fleet_stats: dict, args, broker_name: str, interrupted: bool) -> dict:
    pipeline = snap["daemon"].get("pipelines", {}).get("imu", {})
    return {
        "interrupted": interrupted,
        "broker": broker_name,
        "devices": args.devices,
        "rate_hz": args.rate,
        "published": fleet_stats.get("published"),
        "samples_seen": snap["samples"],
        "predictions": snap["predictions"],
        "accuracy": snap["accuracy"],
        "recall": snap["recall"],
        "latency_p50_s": snap["latency_p50_s"],
        "latency_p99_s": snap["latency_p99_s"],
        "daemon_step_p50_s": pipeline.get("step_p50_s"),
        "daemon_step_p99_s": pipeline.get("step_p99_s"),
        "daemon_rejected": pipeline.get("rejected"),
        "daemon_latency_p50_s": snap["daemon"].get("latency_p50_s"),
        "daemon_latency_p99_s": snap["daemon"].get("latency_p99_s"),
    }


def _format_summary(s: dict) -> str:
    recall = ", ".join(f"{name} {percent(value)}" for name, value in s["recall"].items())
    lines = [
        "edgernn demo summary" + (" (stopped by Ctrl-C)" if s["interrupted"] else ""),
        f"  broker            {s['broker']}",
        f"  devices           {s['devices']} at {s['rate_hz']:g} Hz, {s['published']} samples published",
        f"  predictions       {s['predictions']} ({s['samples_seen']} samples seen by the scoreboard)",
        f"  accuracy          {percent(s['accuracy'])} (recall: {recall})",
        f"  end-to-end        p50 {ms(s['latency_p50_s'])}, p99 {ms(s['latency_p99_s'])} (sample -> prediction)",
        f"  daemon step       p50 {ms(s['daemon_step_p50_s'])}, p99 {ms(s['daemon_step_p99_s'])} per micro-batch; "
        f"received -> published p50 {ms(s['daemon_latency_p50_s'])}, p99 {ms(s['daemon_latency_p99_s'])}",
        f"  daemon            exit code {s['daemon_exit_code']}, {s['daemon_rejected'] or 0} samples rejected",
    ]
    return "\n".join(lines)


