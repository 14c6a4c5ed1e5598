"""Scale-out's NATS configuration (runtime/nats_config.py, `edgernn cluster config`): the mappings, the
config text, and a real 3-node nats-server cluster built from it that puts every device into the
partition `partition_of` predicts, and only there."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgernn.runtime.config import load_config
from edgernn.runtime.nats_config import (Node, fnv1a32, partition_filter, partition_mapping, partition_of,
                                         pipeline_mappings, server_config)
from nats_cluster import NatsCluster, nats_server_binary, needs_nats


CONFIG = """
[broker]
host = "127.0.0.1"

[[pipelines]]
name = "imu"
model = "model.ern"
subscribe = ["sensors/+/imu", "plant/+/line/+/vib"]
publish = "predictions/{key}/imu"
{extra}
"""


def _config(tmp_path, extra: str = "") -> object:
    path = tmp_path / "edgernn.toml"
    path.write_text(CONFIG.replace("{extra}", extra))
    return load_config(path)


def test_fnv1a32_is_the_reference_hash():
    assert fnv1a32(b"") == 0x811C9DC5 and fnv1a32(b"a") == 0xE40C292C and fnv1a32(b"foobar") == 0xBF9CF968


@pytest.mark.parametrize("pattern, level, expected", [
    ("sensors/+/imu", None, ("sensors.*.imu", "part.{{partition(8,1)}}.sensors.{{wildcard(1)}}.imu")),
    ("plant/+/line/+/vib", 3, ("plant.*.line.*.vib",
                               "part.{{partition(8,2)}}.plant.{{wildcard(1)}}.line.{{wildcard(2)}}.vib")),
    ("+/temp", None, ("*.temp", "part.{{partition(8,1)}}.{{wildcard(1)}}.temp")),
])
def test_a_filter_maps_to_a_partitioned_subject(pattern, level, expected):
    assert partition_mapping(pattern, level, 8) == expected
    assert partition_filter(pattern, 3) == f"part/3/{pattern}"


@pytest.mark.parametrize("pattern, level, partitions, message", [
    ("sensors/#", None, 4, "cannot end in '#'"),
    ("sensors/+/imu", 0, 4, "must be a '+' level"),
    ("sensors/dev.1/+", None, 4, "cannot be mapped to a NATS subject"),
    ("sensors/+/imu", None, 0, "partitions: must be from 1 to 1024"),
    ("sensors", None, 4, "has no '+' level"),
])
def test_a_filter_nats_cannot_partition_is_refused_with_the_reason(pattern, level, partitions, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        partition_mapping(pattern, level, partitions)


def test_pipelines_need_the_key_in_the_topic(tmp_path):
    assert pipeline_mappings(_config(tmp_path).pipelines, 4)[1][0] == "plant.*.line.*.vib"
    config = _config(tmp_path, 'key_field = "device"').pipelines
    with pytest.raises(ValueError, match="key_field = 'device': partitions follow the topic"):
        pipeline_mappings(config, 4)


def test_node_addresses():
    assert Node.parse("n1=10.0.0.5") == Node("n1", "10.0.0.5", 4222, 6222, 1883, 8222)
    assert Node.parse("edge-2=127.0.0.1:14222:16222:11882:18222") == Node("edge-2", "127.0.0.1", 14222, 16222,
                                                                          11882, 18222)
    for bad in ("n1", "n1=", "n 1=host", "n1=host:0", "n1=host:1:2:3:4:5"):
        with pytest.raises(ValueError, match="node"):
            Node.parse(bad)


def test_server_config_routes_to_the_other_nodes_and_replicates_mqtt():
    nodes = [Node.parse(f"n{i}=127.0.0.1:{4220 + i}:{6220 + i}:{1880 + i}:{8220 + i}") for i in (1, 2, 3)]
    text = server_config(nodes[1], nodes, [("a.*", "part.{{partition(2,1)}}.a.{{wildcard(1)}}")], "/data/n2")
    assert "server_name: n2" in text and 'store_dir: "/data/n2"' in text
    assert "nats-route://127.0.0.1:6221" in text and "nats-route://127.0.0.1:6223" in text
    assert "nats-route://127.0.0.1:6222" not in text and "stream_replicas: 3" in text
    assert "max_ack_pending: 8192" in text  # workers ack once per checkpoint: NATS's 1024 would throttle them
    assert '"a.*": "part.{{partition(2,1)}}.a.{{wildcard(1)}}"' in text
    with pytest.raises(ValueError, match="names must be distinct"):
        server_config(nodes[0], [nodes[0], nodes[0]], [], "/data")
    with pytest.raises(ValueError, match="ack_wait: must be a duration"):
        server_config(nodes[0], nodes, [], "/data", ack_wait="10 s")
    with pytest.raises(ValueError, match="max_ack_pending"):
        server_config(nodes[0], nodes, [], "/data", max_ack_pending=70000)


@needs_nats
def test_cluster_config_writes_what_nats_server_accepts(tmp_path):
    _config(tmp_path)
    out = tmp_path / "nats"
    command = [sys.executable, "-m", "edgernn", "cluster", "config", "--config", str(tmp_path / "edgernn.toml"),
               "--partitions", "4", "--out", str(out), "--store-dir", str(tmp_path / "js" / "{node}")]
    command += [arg for i in (1, 2, 3) for arg in ("--node", f"n{i}=127.0.0.1:{24220 + i}:{26220 + i}:{21880 + i}")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("n1", "n2", "n3"):
        checked = subprocess.run([nats_server_binary(), "-t", "-c", str(out / f"{name}.conf")], capture_output=True,
                                 text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert str(tmp_path / "js" / name) in (out / f"{name}.conf").read_text()


@needs_nats
def test_a_three_node_cluster_puts_each_device_into_the_partition_predicted(tmp_path):
    partitions, devices = 4, [f"dev{i:03d}" for i in range(40)]
    cluster = NatsCluster(tmp_path / "nats", 3, [partition_mapping("sensors/+/imu", None, partitions)]).start()
    received: dict[int, list[str]] = {p: [] for p in range(partitions)}
    lock = threading.Lock()
    subscribed = threading.Semaphore(0)
    workers = []
    try:
        cluster.wait_ready()
        for p in range(partitions):  # a persistent session per partition, spread over the nodes
            worker = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edgernn-test-part-{p}", clean_session=False)
            worker.on_message = lambda c, u, m, p=p: (lock.acquire(), received[p].append(m.topic), lock.release())
            worker.on_subscribe = lambda *args: subscribed.release()
            worker.connect("127.0.0.1", cluster.nodes[p % 3].mqtt_port)
            worker.loop_start()
            assert worker.subscribe(partition_filter("sensors/+/imu", p), qos=1)[0] == paho.MQTT_ERR_SUCCESS
            workers.append(worker)
        for _ in range(partitions):  # each SUBACK: the replicated consumer exists
            assert subscribed.acquire(timeout=60), "a partition's subscription was not acknowledged"
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id="edgernn-test-devices")
        device.connect("127.0.0.1", cluster.nodes[2].mqtt_port)
        device.loop_start()
        for name in devices:
            device.publish(f"sensors/{name}/imu", b'{"x": [1, 2, 3]}', qos=1).wait_for_publish(10)
        device.disconnect(), device.loop_stop()
        deadline = time.monotonic() + 20
        while sum(map(len, received.values())) < len(devices) and time.monotonic() < deadline:
            time.sleep(0.1)
        with lock:
            where = {topic.split("/")[3]: p for p, topics in received.items() for topic in topics}
            assert sum(map(len, received.values())) == len(devices)  # each exactly once, in one partition
        assert where == {name: partition_of(name, partitions) for name in devices}
        assert all(received.values())  # 40 devices reach all 4 partitions
    finally:
        for worker in workers:
            worker.disconnect(), worker.loop_stop()
        cluster.stop()
