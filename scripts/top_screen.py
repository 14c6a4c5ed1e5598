"""One frame of `edgernn top` against a real daemon, printed as text: the captured screen in docs/live-view.md.

A Mosquitto of its own on a free loopback port, the daemon in this process with two pipelines on small random
models given a name and version (tests/daemon_harness.py), four devices publishing on each and a few bad
messages, then `run_top` once from the metrics endpoint, or with ``--stats`` from the stats topic. Needs
mosquitto and the dev extra.

    .venv/bin/python scripts/top_screen.py [--stats] [--width 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rich.console import Console  # noqa: E402

import edgernn  # noqa: E402

from broker import Client, Mosquitto  # noqa: E402
from daemon_harness import payload, start_daemon, wait_until, write_model  # noqa: E402
from edgernn.runtime.config import load_config  # noqa: E402
from edgernn.runtime.top import run_top  # noqa: E402

CONFIG = """
[broker]
host = "127.0.0.1"
port = {port}
client_id = "edgernn-pi-07"

[[pipelines]]
name = "imu"
model = "imu.ern"
subscribe = "sensors/+/imu"
publish = "predictions/{{key}}/imu"

[[pipelines]]
name = "vibration"
model = "vibration.ern"
subscribe = "sensors/+/vibration"
publish = "predictions/{{key}}/vibration"

[state]
dir = "{folder}/state"

[metrics]
listen = "127.0.0.1:0"
stats_topic = "edgernn/{{client_id}}/stats"
stats_interval = 0.5

[log]
level = "error"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", action="store_true", help="read the stats topic instead of the metrics endpoint")
    parser.add_argument("--width", type=int, default=120)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the daemon's log lines (the bad messages, the disconnects) are not the screen
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        broker = Mosquitto(folder / "broker").start()
        for file, name, version, options in (("imu.ern", "activity-gru", "3", dict(cell="gru")),
                                             ("vibration.ern", "pump-lstm", "1.2", dict(cell="lstm", hidden=32))):
            model = write_model(folder / file, input_size=3, **options)
            spec = dataclasses.replace(model.spec, name=name, model_version=version)  # the model column
            edgernn.save(edgernn.Model(spec, model.weights), folder / file)
        config_path = folder / "edgernn.toml"
        config_path.write_text(CONFIG.format(port=broker.port, folder=folder))
        daemon = start_daemon(config_path)
        client, stop = Client(broker.port), threading.Event()

        def publish() -> None:  # about 200 samples/s per pipeline, on four devices each
            seq = 0
            while not stop.wait(0.02):
                for key in range(4):
                    client.publish(f"sensors/dev{key}/imu", payload(key, seq), qos=0, wait=False)
                    client.publish(f"sensors/pump{key}/vibration", payload(key, seq), qos=0, wait=False)
                seq += 1

        publisher = threading.Thread(target=publish, daemon=True)
        try:
            for bad in (b"garbage", b'{"x": [1, 2]}', b'{"x": [1, 2]}'):
                client.publish("sensors/dev9/imu", bad)
            publisher.start()
            wait_until(lambda: daemon.metrics.stats()["pipelines"]["vibration"]["streams"] == 4, 60)
            time.sleep(2.0)  # a few micro-batches into the histograms
            console = Console(record=True, width=args.width, file=io.StringIO())
            host, port = daemon.metrics_address
            source = "stats" if args.stats else f"http://{host}:{port}/metrics"
            code = run_top(source, interval=1.0, once=True, console=console, config=load_config(config_path))
            print(console.export_text(), end="")
            if code:
                sys.exit(code)
        finally:
            stop.set()
            if publisher.is_alive():
                publisher.join(5)
            client.close()
            daemon.stop()
            broker.stop()


if __name__ == "__main__":
    main()
