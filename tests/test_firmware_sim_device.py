"""firmware_sim.device and the fleet's set-up, without a broker: a device that never connected is offline,
so everything it samples waits in its store-and-forward buffer."""

import json

import numpy as np
import pytest

from edgernn.firmware_sim.fleet import Fleet, signal_seed
from edgernn.firmware_sim.signals import PROFILES, generate


def offline_fleet(**options):
    return Fleet("imu", options.pop("devices", 3), 50.0, port=1, seed=5, **options)


def test_the_buffer_is_bounded_keeps_the_newest_in_order_and_counts_what_it_dropped():
    device = offline_fleet(buffer=10).devices[0]
    for n in range(25):
        device.sample(ts=100.0 + n / 50)
    assert [m.seq for m in device.buffer] == list(range(15, 25))
    assert device.buffer_dropped == 15
    assert device.seq == 25 and device.published == 0 and not device.settled
    assert [json.loads(m.payload)["ts"] for m in device.buffer] == [100.0 + n / 50 for n in range(15, 25)]


def test_a_device_measures_its_signal_exactly_and_remembers_the_truth():
    fleet = offline_fleet(truth_window=8)
    device = fleet.devices[2]
    for n in range(20):
        device.sample(ts=float(n))
    X, y = generate("imu", 20, 50.0, seed=signal_seed(5, 2))
    sent = [json.loads(m.payload) for m in device.buffer]
    assert [body["seq"] for body in sent] == list(range(20))
    np.testing.assert_array_equal(np.array([body["x"] for body in sent], np.float32), X)
    labels = PROFILES["imu"].labels
    assert [fleet.truth("dev0002", seq) for seq in range(12, 20)] == [labels[i] for i in y[12:]]
    assert fleet.truth("dev0002", 11) is None  # older than the truth window
    assert fleet.truth("dev0002", 20) is None  # not sampled yet
    assert fleet.truth("nosuch", 0) is None


def test_device_ids_topics_and_client_ids():
    fleet = offline_fleet(devices=12, id_prefix="pump-", topic="plant/{profile}/{device}/data")
    assert [d.id for d in fleet.devices][:2] == ["pump-0000", "pump-0001"]
    assert fleet.devices[11].topic == "plant/imu/pump-0011/data"
    assert fleet.devices[0].client._client_id == b"sim-pump-0000"
    assert fleet.devices[0].status_topic == "devices/pump-0000/status"


def test_fleets_with_the_same_seed_measure_the_same():
    a, b = offline_fleet(), offline_fleet()
    for device in a.devices + b.devices:
        for n in range(5):
            device.sample(ts=float(n))
    assert [list(d.buffer) for d in a.devices] == [list(d.buffer) for d in b.devices]
    assert list(a.devices[0].buffer) != list(a.devices[1].buffer)


@pytest.mark.parametrize("options, message", [
    (dict(devices=0), "devices must be a positive integer"),
    (dict(qos=2), "qos must be 0 or 1"),
    (dict(topic="sensors/all"), "needs {device} in its topic"),
    (dict(topic="sensors/{key}"), "unknown placeholder {key}"),
    (dict(topic="sensors/+/{device}"), "wildcard"),
    (dict(id_prefix="a/b"), "id prefix"),
    (dict(buffer=0), "buffer holds at least one"),
])
def test_fleet_options_are_checked(options, message):
    with pytest.raises(ValueError) as error:
        Fleet(**{"profile": "imu", "devices": 2, "port": 1, **options})
    assert message in str(error.value)


def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown profile 'sonar': choose one of imu, vibration, temperature"):
        Fleet("sonar", 1)
