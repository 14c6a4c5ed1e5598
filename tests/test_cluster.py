"""A worker of several behind NATS (runtime/cluster.py): its config, leases and checkpoints against a real
nats-server, acks withheld until a checkpoint holds them (through a real Mosquitto), a connection that
moves to the next broker of ``fallback_servers``, and the failure script's quick mode (kill -9 and SIGTERM
of workers behind a real 3-node cluster; predictions equal the offline run)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from broker import Client, Mosquitto, free_port, mosquitto_binary
from daemon_harness import offline, payload, wait_until, write_config, write_model
from edgernn.runtime.config import ConfigError, load_config
from edgernn.runtime.daemon import Daemon
from nats_cluster import NatsCluster, needs_nats

ROOT = Path(__file__).resolve().parent.parent
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")

CLUSTER = """
[cluster]
nats = "nats://127.0.0.1:4222"
partitions = 4
"""


def _write(tmp_path, cluster: str, **tables) -> Path:
    path = write_config(tmp_path, 1883, **tables)
    path.write_text(path.read_text() + cluster)
    return path


# ---- config ----------------------------------------------------------------------------------------------
def test_cluster_section_defaults(tmp_path):
    cluster = load_config(_write(tmp_path, CLUSTER)).cluster
    assert cluster.nats == ("nats://127.0.0.1:4222",) and cluster.partitions == 4 and cluster.own is None
    assert (cluster.lease_ttl, cluster.renew_interval, cluster.checkpoint_interval, cluster.ack_wait,
            cluster.replicas) == (15.0, 3.0, 1.0, 10.0, 3)
    assert load_config(write_config(tmp_path, 1883)).cluster is None


@pytest.mark.parametrize("extra, key, problem", [
    ("own = [0, 4]", "cluster.own", "partitions from 0 to 3"),
    ('own = "some"', "cluster.own", '"auto" or an array'),
    ("renew_interval = 8.0", "cluster.renew_interval", "less than half of lease_ttl"),
    ('bucket = "a.b"', "cluster.bucket", "letters, digits"),
    ("partitions = 0", "cluster.partitions", "from 1"),
    ("lease_ttl = 12.0", "cluster.lease_ttl", "must exceed ack_wait + renew_interval"),
    ("checkpoint_interval = 6.0", "cluster.checkpoint_interval", "at most half of ack_wait"),
    ("max_partitions = 0", "cluster.max_partitions", ">= 1"),
    ("own = [1]\nmax_partitions = 1", "cluster.max_partitions", 'is for own = "auto"'),
])
def test_cluster_section_errors_name_the_key(tmp_path, extra, key, problem):
    text = CLUSTER.replace("partitions = 4", "") if extra.startswith("partitions") else CLUSTER
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, text + extra + "\n"))
    assert error.value.key == key and problem in str(error.value)


def test_cluster_needs_a_topic_key_and_snapshot_durability(tmp_path):
    with pytest.raises(ConfigError, match="key_field"):
        load_config(_write(tmp_path, CLUSTER, pipeline='key_field = "id"'))
    with pytest.raises(ConfigError, match='must be "snapshot" with \\[cluster\\]'):
        load_config(_write(tmp_path, CLUSTER, state='durability = "journal"'))
    with pytest.raises(ConfigError, match="cluster status"):
        load_config(_write(tmp_path, CLUSTER, metrics='listen = "127.0.0.1:0"'))
    with pytest.raises(ConfigError, match="too long for \\[cluster\\]"):
        load_config(_write(tmp_path, CLUSTER, client_id="c" * 118))
    for line, key in (("persistent_session = false", "broker.persistent_session"),
                      ("separate_output_connection = false", "broker.separate_output_connection"),
                      ('protocol = "5"', "broker.protocol"), ('startup_error_behavior = "error"',
                                                             "broker.startup_error_behavior")):
        with pytest.raises(ConfigError, match="with \\[cluster\\]") as error:
            load_config(_write(tmp_path, CLUSTER, broker=line))
        assert error.value.key == key


def test_fallback_servers(tmp_path):
    config = load_config(write_config(tmp_path, 1883, broker='fallback_servers = ["10.0.0.2:1884", "[::1]:1885"]'))
    assert config.broker.servers == (("127.0.0.1", 1883), ("10.0.0.2", 1884), ("::1", 1885))
    with pytest.raises(ConfigError, match="broker.fallback_servers"):
        load_config(write_config(tmp_path, 1883, broker='fallback_servers = ["10.0.0.2"]'))


def test_a_partition_serves_its_own_topics_session_and_files(tmp_path):
    from edgernn.runtime.cluster import partition_config

    config = load_config(_write(tmp_path, CLUSTER, pipeline="key_level = 1"))
    part = partition_config(config, 3)
    assert part.broker.client_id == "edgernn-test-part-3" and part.broker.status_topic.endswith("/part-3")
    assert part.pipelines[0].subscribe == ("part/3/sensors/+/imu",) and part.pipelines[0].key_level == 3
    assert part.state.dir == config.state.dir / "part-3" and part.state.snapshot_interval == 1.0
    assert part.cluster is None and part.metrics.listen is None


# ---- leases and checkpoints on a real nats-server --------------------------------------------------------
@pytest.fixture
def nats_node(tmp_path):
    cluster = NatsCluster(tmp_path / "nats", nodes=1).start()
    cluster.wait_ready()
    yield cluster
    cluster.stop()


def _cluster_config(tmp_path, nats_node, name: str, ttl: float = 2.0):
    folder = tmp_path / name
    folder.mkdir()
    text = (f'[cluster]\nnats = "nats://127.0.0.1:{nats_node.nodes[0].client_port}"\npartitions = 4\n'
            f'worker = "{name}"\nreplicas = 1\nlease_ttl = {ttl}\nrenew_interval = {ttl / 4}\nack_wait = {ttl / 4}\n'
            f'checkpoint_interval = {ttl / 8}\n')
    return load_config(_write(folder, text))


@needs_nats
def test_a_lease_is_held_by_one_worker_renewed_released_and_lapses(tmp_path, nats_node):
    from edgernn.runtime.cluster import Leases, Nats

    clients = [Nats(c.cluster.nats, name) for name, c in
               (("a", _cluster_config(tmp_path, nats_node, "a")), ("b", _cluster_config(tmp_path, nats_node, "b")))]
    try:
        config = _cluster_config(tmp_path, nats_node, "c")
        a, b = Leases(clients[0], config.cluster, "a"), Leases(clients[1], config.cluster, "b")
        lease = a.claim(1)
        assert lease is not None and a.valid(lease)
        assert b.claim(1) is None  # held
        time.sleep(3.0)  # longer than the TTL: only the renewals keep it
        assert a.valid(lease) and lease.revision > 1 and b.claim(1) is None
        a.release(lease)
        taken = b.claim(1)
        assert taken is not None  # at once, not after the TTL
        b.stop()  # no more renewals: the lease lapses after lease_ttl, and a takes it
        assert wait_until(lambda: not b.valid(taken), 3.0)  # the holder knows before it can be taken
        assert wait_until(lambda: a.claim(1) is not None, 10.0)
        a.stop()
    finally:
        for client in clients:
            client.close()


@needs_nats
def test_checkpoints_round_trip_large_files(tmp_path, nats_node):
    from edgernn.runtime.cluster import Checkpoints, Nats

    config = _cluster_config(tmp_path, nats_node, "a")
    client = Nats(config.cluster.nats, "a")
    try:
        store = Checkpoints(client, config.cluster)
        assert store.get(2, "imu") is None
        data = bytes(range(256)) * 12_000  # 3 MB: more than a KV value may hold
        store.put(2, "imu", data)
        assert store.get(2, "imu") == data and store.get(3, "imu") is None
    finally:
        client.close()


# ---- acks wait for the checkpoint (a real Mosquitto) -----------------------------------------------------
@needs_mosquitto
@pytest.mark.broker
@pytest.mark.parametrize("stored", [False, True])
def test_messages_are_acked_only_once_a_checkpoint_holds_them(tmp_path, stored):
    """With a checkpoint that fails, nothing is acked: a daemon stopped at once (its lease lost) leaves every
    message at the broker for its successor. With one that succeeds, nothing comes again."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        model = write_model(tmp_path / "model.ern")
        config_path = write_config(tmp_path, broker.port, state="snapshot_interval = 0.3")
        checkpoints = []
        first = Daemon(load_config(config_path), checkpoint=lambda pipelines: checkpoints.append(1) or stored)
        first.start()
        assert first.link.connected.wait(10)
        time.sleep(0.3)
        outputs = Client(broker.port, subscribe="predictions/#")
        devices = Client(broker.port)
        for seq in range(5):
            devices.publish("sensors/dev0/imu", json.dumps(payload(0, seq)))
        assert outputs.wait_for(5, timeout=10)
        assert wait_until(lambda: len(checkpoints) >= 2, 5)
        assert first.scheduler.withheld() == (0 if stored else 5)
        first.abort()
        for path in (tmp_path / "state").glob("imu.*"):  # no checkpoint stored: the successor starts empty
            path.unlink()
        second = Daemon(load_config(config_path))  # the successor, same client id, same (never written) state
        second.start()
        if not stored:
            outputs.wait_for(10, timeout=10)
        time.sleep(1.0)
        again = outputs.messages[5:]
        second.stop()
        if stored:
            assert again == []
        else:  # stepped again by the successor from its (empty) state: the same predictions
            expected = offline(model, 0, range(5))
            ys = np.array([json.loads(body)["y"] for _, body in again])
            assert ys.shape == expected.shape and np.allclose(ys, expected, atol=1e-5)
        devices.close()
        outputs.close()
    finally:
        broker.stop()


# ---- fallback servers ------------------------------------------------------------------------------------
@needs_mosquitto
@pytest.mark.broker
def test_a_dead_broker_is_left_for_the_next_of_fallback_servers(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        write_model(tmp_path / "model.ern")
        dead = free_port()  # nothing listens there
        config = load_config(write_config(tmp_path, dead, broker=f'fallback_servers = ["127.0.0.1:{broker.port}"]'))
        daemon = Daemon(config)
        daemon.start()
        try:
            assert daemon.link.connected.wait(15), "never moved to the live broker"
            assert all(c.server.port == broker.port for c in daemon.link.connections)
        finally:
            daemon.stop()
    finally:
        broker.stop()


# ---- the failure script ----------------------------------------------------------------------------------
@needs_nats
@pytest.mark.broker
def test_cluster_faults_quick(tmp_path):
    """Workers behind a real 3-node NATS cluster: one killed with -9, one stopped with SIGTERM; every device's
    predictions equal the offline run, arrive in seq order, each partition served by one worker at a time."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "reliability" / "cluster_faults.py"), "--quick",
                           "--json", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.exists(), f"no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(report.read_text())
    assert results["passed"] and done.returncode == 0, f"{results['failures']}\n{done.stdout[-3000:]}"
    kill, handover = results["events"]["worker_kill9"], results["events"]["worker_sigterm"]
    assert kill["devices"] > 0 and handover["devices"] > 0  # each failure moved real devices
    assert results["samples_per_device"] > 20 and results["repeats"] >= 0
    served_by = {w for spans in results["serving"].values() for _, _, w in spans}
    assert "standby" in served_by  # the standby took partitions over


# ---- a worker in this process, and `edgernn cluster status` ----------------------------------------------
@needs_nats
@pytest.mark.broker
def test_a_worker_serves_every_free_partition_and_status_shows_it(tmp_path):
    """One worker behind a 1-node NATS (its MQTT listener and the partition mapping): it takes all 4
    partitions, predicts for devices in each, checkpoints; `cluster status` names it with lag 0; at its stop
    the leases go back (free at once) and the checkpoints hold every stream."""
    from edgernn.runtime.cluster import Checkpoints, ClusterWorker, Nats, cluster_status
    from edgernn.runtime.nats_config import partition_of, pipeline_mappings
    from edgernn.runtime.pipeline import STREAM_COLUMNS
    from edgernn.streams import StreamTable

    model = write_model(tmp_path / "model.ern")
    nats = NatsCluster(tmp_path / "nats", nodes=1)
    node = nats.nodes[0]
    path = write_config(tmp_path, node.mqtt_port, client_id="edgernn")
    path.write_text(path.read_text() + f'[cluster]\nnats = "nats://127.0.0.1:{node.client_port}"\npartitions = 4\n'
                                       f'worker = "solo"\nreplicas = 1\ncheckpoint_interval = 0.2\n')
    config = load_config(path)
    nats.mappings = pipeline_mappings(config.pipelines, 4)
    nats.start()
    worker = ClusterWorker(config)
    try:
        nats.wait_ready()
        worker.start()
        assert wait_until(lambda: worker.tick() or len(worker.partitions) == 4, 60)
        devices = [f"dev{k}" for k in range(12)]
        assert {partition_of(d, 4) for d in devices} == {0, 1, 2, 3}  # every partition gets devices
        outputs = Client(node.mqtt_port, subscribe="predictions/#")
        publisher = Client(node.mqtt_port)
        for seq in range(3):
            for k, device in enumerate(devices):
                publisher.publish(f"sensors/{device}/imu", json.dumps(payload(k, seq)))
        assert outputs.wait_for_distinct(36, timeout=30) == 36
        predictions = outputs.predictions()
        for k, device in enumerate(devices):
            expected = offline(model, k, range(3))
            assert np.allclose([predictions[device][s] for s in range(3)], expected, atol=1e-5)
        assert wait_until(lambda: all(p.daemon.scheduler.withheld() == 0 for p in worker.partitions.values()), 10)
        rows = []

        def settled() -> bool:  # acks reach NATS, and the stats a renewal (every 3 s) writes into the lease
            rows[:] = cluster_status(config)
            return all(r["worker"] == "solo" and r["lag"] == 0 and r.get("checkpoints", 0) >= 1 for r in rows)

        assert wait_until(settled, 15), rows
        assert [r["partition"] for r in rows] == [0, 1, 2, 3]
        assert sum(r["streams"] for r in rows) == 12
        shown = subprocess.run([sys.executable, "-m", "edgernn", "cluster", "status", "--config", str(path)],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.count(" solo ") == 4, shown.stdout + shown.stderr
        publisher.close()
        outputs.close()
        assert worker.stop()
        rows = cluster_status(config)
        assert all(r["worker"] is None for r in rows)  # released, not left to expire
        client = Nats(config.cluster.nats, "check")
        try:
            store = Checkpoints(client, config.cluster)
            restored = 0
            for number in range(4):
                snapshot = tmp_path / f"p{number}.snapshot"
                snapshot.write_bytes(store.get(number, "imu"))
                table = StreamTable(model, columns=STREAM_COLUMNS)
                table.restore(snapshot)
                restored += len(table)
            assert restored == 12
        finally:
            client.close()
    finally:
        if worker.nats is not None and not worker.stopping.is_set():
            worker.stop()
        nats.stop()


@needs_nats
@pytest.mark.broker
def test_a_worker_that_cannot_renew_stops_serving_before_its_leases_expire(tmp_path):
    """Renewals stopped (as when NATS is out of reach): the fencer stops each partition (MQTT connections
    closed, nothing acked) once its last renewal is lease_ttl - renew_interval old, before the lease can
    expire; only then can another worker claim it."""
    from edgernn.runtime.cluster import ClusterWorker, Leases, Nats

    write_model(tmp_path / "model.ern")
    nats = NatsCluster(tmp_path / "nats", nodes=1).start()
    node = nats.nodes[0]
    path = write_config(tmp_path, node.mqtt_port, client_id="edgernn")
    path.write_text(path.read_text() + f'[cluster]\nnats = "nats://127.0.0.1:{node.client_port}"\npartitions = 2\n'
                                       'worker = "a"\nreplicas = 1\nlease_ttl = 3.0\nrenew_interval = 0.5\n'
                                       'ack_wait = 1.0\ncheckpoint_interval = 0.2\n')
    config = load_config(path)
    worker = ClusterWorker(config)
    other = None
    try:
        nats.wait_ready()
        worker.start()
        assert wait_until(lambda: worker.tick() or len(worker.partitions) == 2, 60)
        daemons = [p.daemon for p in worker.partitions.values()]
        leases = list(worker.leases.held.values())
        worker.leases.stop()  # no more renewals
        last_renewal = max(lease.renewed for lease in leases)
        assert wait_until(lambda: not worker.partitions, 5)
        fenced_after = time.monotonic() - last_renewal
        assert fenced_after < 3.0, fenced_after  # before the server lets the lease expire
        assert all(not d.link.inputs.connected.is_set() and not d.link.outputs.connected.is_set() for d in daemons)
        other = Nats(config.cluster.nats, "b")
        claimer = Leases(other, config.cluster, "b")
        assert claimer.claim(0) is None or time.monotonic() - last_renewal >= 3.0  # not while it may live
        assert wait_until(lambda: claimer.claim(0) is not None, 10)
        claimer.stop()
    finally:
        worker.stop()
        if other is not None:
            other.close()
        nats.stop()
