"""A real nats-server cluster on loopback for the scale-out tests: N nodes on free ports, each with the
config `edgernn.runtime.nats_config.server_config` writes, JetStream in the test's own directory.

Never the system server (4222): every node gets free ports. ``kill(i)`` is a kill -9, ``start(i)`` brings
a node back with its data. Readiness is `wait_ready`: every node's /healthz, then a persistent MQTT
session that really connects (a fresh cluster needs all its nodes, and a few seconds, before its
replicated MQTT streams exist).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemon_harness import DaemonProcess
from edgernn.local_broker import die_with_parent, free_port
from edgernn.runtime.nats_config import Node, server_config


def nats_server_binary() -> str | None:
    return shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server")
                                                  if Path(p).exists()), None)


needs_nats = pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed (make test installs it)")


class NatsCluster:
    def __init__(self, directory: Path, nodes: int = 3, mappings: list | None = None, ack_wait: str = "10s"):
        self.directory = Path(directory)
        self.nodes = [Node(f"n{i + 1}", "127.0.0.1", free_port(), free_port(), free_port(), free_port())
                      for i in range(nodes)]
        self.mappings = mappings or []
        self.ack_wait = ack_wait
        self.processes: list[subprocess.Popen | None] = [None] * nodes

    def config_path(self, index: int) -> Path:
        return self.directory / f"{self.nodes[index].name}.conf"

    def write_configs(self) -> list[Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        for index, node in enumerate(self.nodes):
            self.config_path(index).write_text(server_config(node, self.nodes, self.mappings,
                                                             str(self.directory / "data" / node.name),
                                                             ack_wait=self.ack_wait))
        return [self.config_path(i) for i in range(len(self.nodes))]

    def start(self, index: int | None = None) -> "NatsCluster":
        if index is None:
            self.write_configs()
            for i in range(len(self.nodes)):
                self.start(i)
            return self
        log = open(self.directory / f"{self.nodes[index].name}.log", "ab")
        self.processes[index] = subprocess.Popen([nats_server_binary(), "-c", str(self.config_path(index))],
                                                 stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()
        return self

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        self.processes[index] = None

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            self.processes[index] = None

    def healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.nodes[index].http_port}/healthz", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every running node healthy, and a persistent MQTT session accepted (the replicated streams exist)."""
        deadline = time.monotonic() + timeout
        running = [i for i, p in enumerate(self.processes) if p is not None]
        while not all(self.healthy(i) for i in running):
            assert time.monotonic() < deadline, f"nats cluster not healthy: {self.log_tail()}"
            time.sleep(0.2)
        while not self._session_works(self.nodes[running[0]].mqtt_port):
            assert time.monotonic() < deadline, f"nats cluster takes no MQTT session: {self.log_tail()}"
            time.sleep(0.5)

    @staticmethod
    def _session_works(port: int) -> bool:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edgernn-test-probe", clean_session=False)
        try:
            client.connect("127.0.0.1", port, keepalive=10)
            client.loop_start()
            deadline = time.monotonic() + 10
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            return client.is_connected()
        except OSError:
            return False
        finally:
            client.disconnect()
            client.loop_stop()

    def log_tail(self) -> str:
        return "\n".join(f"{path.name}: {path.read_text(errors='replace')[-800:]}"
                         for path in sorted(self.directory.glob("*.log")))


class Worker(DaemonProcess):
    """``edgernn serve`` with ``[cluster]`` as a process (ready once the worker runs, serving or not); its JSON
    log is read back for the checks."""

    READY = b'"event": "cluster_started"'

    def __init__(self, name: str, config_path: Path, log_path: Path):
        super().__init__(config_path, log_path)
        self.name = name
        self.killed_at = None  # wall time of a SIGKILL

    def kill(self) -> None:
        self.killed_at = time.time()
        super().kill()

    def terminate(self, timeout: float = 60) -> int:
        return super().terminate(timeout)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def serving(self, partition: int) -> bool:
        """Whether its log says it serves ``partition`` now (started, not stopped or aborted since)."""
        state = False
        for event in self.events():
            if event.get("partition") == partition:
                state = event.get("event") == "partition_started" or (state and event.get("event") not in
                                                                        ("partition_stopped", "partition_aborted"))
        return state


def worker_config(folder: Path, name: str, cluster: NatsCluster, first_node: int, partitions: int,
                  max_partitions: int | None, lease_ttl: float = 15.0, checkpoint_interval: float = 1.0,
                  ack_wait: float = 10.0) -> Path:
    """A worker's config: the cluster's nodes from ``first_node`` on (MQTT and NATS), the tests' model."""
    nodes = cluster.nodes
    order = [nodes[(first_node + i) % len(nodes)] for i in range(len(nodes))]
    fallback = ", ".join(f'"127.0.0.1:{node.mqtt_port}"' for node in order[1:])
    nats = ", ".join(f'"nats://127.0.0.1:{node.client_port}"' for node in order)
    limit = "" if max_partitions is None else f"max_partitions = {max_partitions}"
    path = folder / f"{name}.toml"
    path.write_text(f"""
[broker]
host = "127.0.0.1"
port = {order[0].mqtt_port}
fallback_servers = [{fallback}]
client_id = "edgernn"
min_reconnect_interval = 1.0
max_reconnect_interval = 2.0

[[pipelines]]
name = "imu"
model = "model.ern"
subscribe = "sensors/+/imu"
publish = "predictions/{{key}}/imu"
qos = 1

[state]
dir = "{folder / ('state-' + name)}"

[cluster]
nats = [{nats}]
partitions = {partitions}
worker = "{name}"
{limit}
lease_ttl = {lease_ttl}
renew_interval = {lease_ttl / 5}
checkpoint_interval = {checkpoint_interval}
ack_wait = {ack_wait}

[log]
level = "info"
""")
    return path
