"""Step 6 of the activity example: serve the model over MQTT as a device would, and score it live.

Everything runs as a user would run it on a gateway: a broker, `edgernn serve --config edgernn.toml` and
`edgernn simulate --labels` as their own processes. A `Scoreboard` (an ordinary MQTT client) joins each
sample's true label with the daemon's prediction for it, by device and seq.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from edgernn.demo import (PREDICTIONS, SAMPLES, STATS_TOPIC, STATUS_TOPIC, DaemonProcess, daemon_config, drain, ms,
                          percent, wait_for_daemon)
from edgernn.firmware_sim.signals import ImuSignal
from edgernn.local_broker import start_local_broker
from edgernn.scoreboard import Scoreboard


def serve_and_score(model: Path, devices: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="activity-serve-") as folder:
        folder = Path(folder)
        with start_local_broker(folder / "broker") as broker:
            config = daemon_config(folder, model, broker.host, broker.port)
            print(f"6. serve: {broker.kind} on port {broker.port}; edgernn serve --config {config.name}:")
            print("   " + config.read_text().replace("\n", "\n   ").rstrip())
            daemon = DaemonProcess(config, folder / "daemon.log")
            board = Scoreboard(broker.host, broker.port, ImuSignal.labels, SAMPLES, PREDICTIONS,
                               stats=STATS_TOPIC, status=STATUS_TOPIC)
            try:
                wait_for_daemon(daemon, board)
                command = [sys.executable, "-m", "edgernn", "simulate", "--profile", "imu", "--labels",
                           "--devices", str(devices), "--rate", "50", "--duration", str(seconds),
                           "--broker", f"{broker.host}:{broker.port}", "--seed", "777"]
                print(f"   edgernn simulate --devices {devices} --rate 50 --duration {seconds:g} --labels")
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                drain(board)  # until the last predictions are in
                snap = board.snapshot()
            finally:
                daemon.stop()
                board.close()
    daemon_step = snap["daemon"].get("pipelines", {}).get("imu", {})
    print(f"   {snap['predictions']} predictions for {snap['samples']} samples; streaming accuracy "
          f"{percent(snap['accuracy'])} (recall " + ", ".join(f"{k} {percent(v)}" for k, v in snap["recall"].items())
          + ")")
    print(f"   latency sample -> prediction p50 {ms(snap['latency_p50_s'])}, p99 {ms(snap['latency_p99_s'])}; "
          f"daemon step p50 {ms(daemon_step.get('step_p50_s'))}")
    return snap
