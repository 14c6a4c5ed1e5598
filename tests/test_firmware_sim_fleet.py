"""A simulated fleet through a real Mosquitto: what arrives is exactly what each device says it published.

Every device records its publishes (``record=True``); a subscriber on ``#`` collects what the broker
delivers. Without reconnects the two are identical, payload for payload, per device topic. Across
reconnects (storms, a broker restart) QoS 1 may deliver a message twice, so there the check is on each
device's distinct messages in order of first arrival: all of them, in order.
"""

import json
import time
from collections import defaultdict

import numpy as np
import pytest

from broker import Client
from edgernn.firmware_sim.faults import MESSAGE_FAULTS, Faults
from edgernn.firmware_sim.fleet import Fleet
from edgernn.runtime.codecs import DecodeError, Decoder

pytestmark = pytest.mark.broker


@pytest.fixture
def watcher(broker):
    client = Client(broker.port, client_id="watcher", subscribe="#")  # a persistent QoS 1 session
    yield client
    client.client.disconnect()  # first, so paho's loop thread wakes and ends at once
    client.close()


def received(client: Client, count: int, timeout: float = 20.0) -> dict:
    """{topic: [payload, ...]} of the sensor messages, once ``count`` of them arrived (or the timeout)."""
    client._wait_until(lambda: sum(topic.startswith("sensors/") for topic, _ in client.messages) >= count, timeout)
    with client._received:
        by_topic = defaultdict(list)
        for topic, payload in client.messages:
            if topic.startswith("sensors/"):
                by_topic[topic].append(payload)
        return by_topic


def statuses(client: Client, device) -> list[bytes]:
    with client._received:
        return list(client.by_topic[device.status_topic])


def first_arrivals(payloads: list[bytes]) -> list[int]:
    """The seq of each distinct payload, in the order they first arrived."""
    seen, order = set(), []
    for payload in payloads:
        if payload not in seen:
            seen.add(payload)
            order.append(json.loads(payload)["seq"])
    return order


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("qos", [1, 0])
def test_a_clean_fleet_delivers_exactly_what_each_device_published(broker, watcher, qos):
    fleet = Fleet("imu", 20, 50.0, port=broker.port, seed=1, qos=qos, record=True)
    stats = fleet.run(1.0)
    data = received(watcher, stats["published"])
    decoder = Decoder("json", 6)
    for device in fleet.devices:
        assert [m.seq for m in device.record] == list(range(device.seq))
        assert data[device.topic] == [m.payload for m in device.record]
        ts = [decoder.decode(payload).ts for payload in data[device.topic]]
        assert np.all(np.abs(np.diff(ts) - 0.02) <= 2 * 0.05 * 0.02 + 1e-6)  # the period, with 5 % jitter
    assert len(data) == 20
    assert stats["published"] == stats["samples"] == sum(device.seq for device in fleet.devices)
    assert abs(stats["samples"] - stats["expected_samples"]) <= 20  # jitter moves a sample across the end
    assert stats["acked"] == (stats["published"] if qos else 0)
    assert stats["buffered"] == stats["in_flight"] == stats["dropped_by_buffer"] == stats["disconnects"] == 0
    assert stats["connects"] == 20
    watcher.wait_for(stats["published"] + 40)
    for device in fleet.devices:
        assert statuses(watcher, device) == [b"online", b"offline"]  # on connect; on the clean stop


@pytest.mark.parametrize("kind", MESSAGE_FAULTS)
def test_each_fault_kind_arrives_exactly_as_published(broker, watcher, kind):
    fleet = Fleet("imu", 20, 50.0, port=broker.port, seed=2, record=True,
                  faults=Faults(**{kind: 0.05 if kind == "stuck" else 0.2}))
    stats = fleet.run(0.6)
    data = received(watcher, stats["published"])
    for device in fleet.devices:
        assert data[device.topic] == [m.payload for m in device.record]
    assert stats["faults"][kind] > 0
    assert sum(stats["faults"].values()) == stats["faults"][kind]
    records = [(device, m) for device in fleet.devices for m in device.record]
    decoder = Decoder("json", 6)
    for device, message in records:
        if "malformed" in message.kind:
            with pytest.raises(DecodeError):
                decoder.decode(message.payload)
        elif "nan" in message.kind:
            with pytest.raises(DecodeError, match="not_finite"):
                decoder.decode(message.payload)
        else:
            assert decoder.decode(message.payload).seq == message.seq
    seqs = {device: [m.seq for m in device.record] for device in fleet.devices}
    if kind == "drop":
        assert stats["published"] == stats["samples"] - stats["faults"]["drop"]
        assert all(s == sorted(set(s)) for s in seqs.values())
    else:
        assert all(sorted(set(s)) == list(range(device.seq)) for device, s in seqs.items())
    if kind == "duplicate":
        assert stats["published"] == stats["samples"] + stats["faults"]["duplicate"]
        assert sum(m.kind == "duplicate" for _, m in records) == stats["faults"]["duplicate"]
    if kind == "reorder":
        swaps = sum(b < a for s in seqs.values() for a, b in zip(s, s[1:]))
        held_at_the_end = sum(s[-1] == device.seq - 1 and "reordered" in device.record[-1].kind
                              for device, s in seqs.items())  # released last: no next to swap with
        assert swaps == stats["faults"]["reorder"] - held_at_the_end > 0
    if kind in ("nan", "malformed"):
        assert sum(m.kind == kind for _, m in records) == stats["faults"][kind]
    if kind == "stuck":
        assert sum(m.kind == "stuck" for _, m in records) >= stats["faults"]["stuck"]


def test_storms_drop_devices_abruptly_their_wills_fire_and_nothing_is_lost(broker, watcher):
    faults = Faults(storm_every=0.5, storm_fraction=0.5, storm_downtime=0.3)
    fleet = Fleet("imu", 10, 50.0, port=broker.port, seed=3, faults=faults, record=True, reconnect_delay=(0.1, 0.5))
    stats = fleet.run(2.5)
    assert stats["storms"] >= 1
    assert stats["disconnects"] == stats["faults"]["storm"] > 0
    assert stats["connects"] == 10 + stats["disconnects"]
    assert stats["dropped_by_buffer"] == stats["buffered"] == stats["in_flight"] == 0
    data = received(watcher, stats["published"])
    for device in fleet.devices:
        assert first_arrivals(data[device.topic]) == list(range(device.seq))
        assert set(data[device.topic]) == {m.payload for m in device.record}
    assert wait_until(lambda: all(statuses(watcher, d)[-1:] == [b"offline"] for d in fleet.devices))
    for device in fleet.devices:  # the will ("offline") after each abrupt drop, "online" on each reconnect
        assert statuses(watcher, device) == [b"online", b"offline"] * (device.disconnects + 1)


def test_store_and_forward_loses_nothing_across_a_broker_restart(broker, watcher):
    fleet = Fleet("imu", 10, 50.0, port=broker.port, seed=4, record=True, buffer=10_000,
                  reconnect_delay=(0.1, 0.5), drain_timeout=30.0)
    fleet.start()  # until stop(): each step below takes what it takes
    try:
        assert wait_until(lambda: fleet.stats()["published"] > 200)
        broker.stop()
        assert wait_until(lambda: fleet.stats()["connected"] == 0)
        before = fleet.stats()["samples"]
        assert wait_until(lambda: fleet.stats()["samples"] > before + 300)  # readings pile up while offline
        assert fleet.stats()["buffered"] > 0
        broker.start()
        assert wait_until(lambda: fleet.stats()["connected"] == 10, timeout=30)
        assert watcher.wait_for_connects(2)  # before the clean "offline": it re-subscribes, retained included
    finally:
        stats = fleet.stop()
    assert stats["dropped_by_buffer"] == stats["buffered"] == stats["in_flight"] == 0
    assert stats["connects"] == 20 and stats["disconnects"] == 10
    expected = sum(device.seq for device in fleet.devices)
    watcher._wait_until(lambda: len({p for t, p in watcher.messages if t.startswith("sensors/")}) >= expected, 30)
    data = received(watcher, expected)
    for device in fleet.devices:
        assert first_arrivals(data[device.topic]) == list(range(device.seq))
        assert device.connects == 2
    assert wait_until(lambda: all(statuses(watcher, d)[-1:] == [b"offline"] for d in fleet.devices))
    for device in fleet.devices:  # the retained "online" again after the restart, then the clean "offline"
        assert statuses(watcher, device)[-2:] == [b"online", b"offline"]
        assert statuses(watcher, device).count(b"online") >= 2


def test_storms_draw_the_same_devices_for_the_same_seed_online_or_not(broker):
    faults = Faults(storm_every=0.1, storm_fraction=0.3, storm_downtime=0.6)
    online = Fleet("imu", 10, 20.0, port=broker.port, seed=6, faults=faults, reconnect_delay=(0.1, 0.2))
    online_stats = online.run(1.0)
    offline = Fleet("imu", 10, 20.0, port=1, seed=6, faults=faults, connect_wait=0.0, drain_timeout=0.0)
    offline_stats = offline.run(1.0)  # nobody to drop: every draw is skipped, yet the draws are the same
    storms = min(len(online.storm_victims), len(offline.storm_victims))
    assert storms >= 3 and online.storm_victims[:storms] == offline.storm_victims[:storms]
    assert all(len(victims) == 3 for victims in online.storm_victims)
    for fleet, stats in ((online, online_stats), (offline, offline_stats)):
        assert stats["storms"] == len(fleet.storm_victims)
        assert stats["faults"]["storm"] + stats["storm_victims_offline"] == 3 * stats["storms"]
    assert offline_stats["faults"]["storm"] == 0 and offline_stats["connects"] == 0
    assert online_stats["faults"]["storm"] == online_stats["disconnects"] > 0
    assert online_stats["storm_victims_offline"] > 0  # a 0.6 s downtime outlasts the 0.1 s between storms
    assert online_stats["buffered"] == online_stats["in_flight"] == 0


def test_a_broker_that_drops_connection_attempts_backs_off_the_whole_fleet(dropping_port):
    # Each attempt blocks for connect_timeout; one device after the other, 40 of them would take 20 s to
    # try once, and stopping waited for all of them (twice: connecting, then draining).
    fleet = Fleet("imu", 40, 20.0, port=dropping_port, seed=7, connect_timeout=0.5, connect_wait=0.5,
                  drain_timeout=1.0)
    fleet.start()
    time.sleep(1.0)
    fleet.stop(timeout=15.0)
    assert fleet.wait(0), "the fleet still runs 15 s after stop(): it tries each device in turn"
    stats = fleet.stats()
    assert stats["connects"] == 0 and stats["last_connect_error"] == "timed out"
    assert stats["samples"] > 0 and stats["buffered"] == stats["samples"]  # sampled meanwhile, all kept


def test_draining_gives_up_at_its_deadline_when_the_broker_is_gone(broker):
    fleet = Fleet("imu", 5, 50.0, port=broker.port, seed=8, drain_timeout=1.0, reconnect_delay=(0.05, 0.1))
    fleet.start()
    assert wait_until(lambda: fleet.stats()["published"] > 50)
    broker.stop()
    assert wait_until(lambda: fleet.stats()["connected"] == 0)
    assert wait_until(lambda: fleet.stats()["buffered"] > 0)
    stats = fleet.stop(timeout=20.0)
    assert fleet.wait(0)
    assert stats["buffered"] > 0 and stats["connects"] == 5 and stats["connected"] == 0
