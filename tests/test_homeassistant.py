"""Home Assistant MQTT discovery (runtime/homeassistant.py) through a real Mosquitto.

The configs are checked field by field against Home Assistant's MQTT sensor discovery schema
(https://www.home-assistant.io/integrations/sensor.mqtt/, the discovery topic format and the device block of
https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery), and each value template is rendered the
way Home Assistant renders it (Jinja's sandbox) against the predictions the daemon really published.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

import edgernn
from broker import Client, Mosquitto
from daemon_harness import payload, start_daemon, wait_until, write_config, write_model
from edgernn.runtime.config import ConfigError, load_config
from edgernn.runtime.daemon import Daemon

jinja2 = pytest.importorskip("jinja2")
sandbox = pytest.importorskip("jinja2.sandbox")

# The keys Home Assistant's MQTT sensor accepts in a discovery config (abbreviations aside), and the device's.
SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "default_entity_id",
    "device", "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture", "expire_after",
    "force_update", "icon", "json_attributes_template", "json_attributes_topic", "last_reset_value_template",
    "name", "object_id", "options", "origin", "payload_available", "payload_not_available", "platform", "qos",
    "state_class", "state_topic", "suggested_display_precision", "unique_id", "unit_of_measurement",
    "value_template",
}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
               "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
DISCOVERY_TOPIC = re.compile(r"^homeassistant/sensor/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")
LABELS = ["still", "moving"]

ENV_PIPELINE = """
[pipelines.homeassistant]
labels = ["still", "moving"]

[[pipelines]]
name = "env"
model = "env.ern"
subscribe = "sensors/+/env"
publish = "predictions/{key}/env"

[[pipelines.homeassistant.sensors]]
output = 0
name = "Temperature"
unit = "°C"
device_class = "temperature"

[[pipelines.homeassistant.sensors]]
output = 1
name = "Humidity"
unit = "%"
device_class = "humidity"
"""


def _render(template: str, prediction: bytes) -> str:
    """What Home Assistant shows for ``prediction`` (its templates run in Jinja's immutable sandbox)."""
    environment = sandbox.ImmutableSandboxedEnvironment()
    return environment.from_string(template).render(value_json=json.loads(prediction)).strip()


def _configs(client: Client) -> dict:
    """{discovery topic: config (None once removed)}, the latest of each."""
    found = {}
    for topic, body in list(client.messages):
        if topic.startswith("homeassistant/") and topic.endswith("/config"):
            found[topic] = json.loads(body) if body else None
    return found


def _check_schema(topic: str, config: dict, status_topic: str) -> None:
    assert DISCOVERY_TOPIC.match(topic), topic
    assert set(config) <= SENSOR_KEYS, set(config) - SENSOR_KEYS
    assert isinstance(config["state_topic"], str) and config["state_topic"]
    assert isinstance(config["unique_id"], str) and re.fullmatch(r"[A-Za-z0-9_-]+", config["unique_id"])
    assert isinstance(config["name"], str) and config["name"]
    assert config["availability"] == [{"topic": status_topic, "payload_available": "online",
                                       "payload_not_available": "offline"}]
    for item in config["availability"]:
        assert set(item) <= AVAILABILITY_KEYS
    device = config["device"]
    assert set(device) <= DEVICE_KEYS and device["identifiers"] and all(isinstance(i, str) for i in device["identifiers"])
    assert set(config["origin"]) <= ORIGIN_KEYS and config["origin"]["name"] == "edgernn"
    assert config["expire_after"] == 60 and isinstance(config["expire_after"], int)
    if "state_class" in config:
        assert config["state_class"] in STATE_CLASSES
    if config.get("device_class") == "enum":
        assert "options" in config and "unit_of_measurement" not in config


@pytest.fixture
def setup(tmp_path):
    model = write_model(tmp_path / "model.ern", hidden=8)
    env = write_model(tmp_path / "env.ern", seed=3, hidden=6)
    with Mosquitto(tmp_path / "broker").start() as broker:
        config = write_config(tmp_path, broker.port, top="[homeassistant]\nexpire_after = 60\n",
                              pipeline="max_streams = 2\n" + ENV_PIPELINE)
        yield tmp_path, broker, config, model, env


def test_discovery_announces_each_stream_by_the_schema_and_templates_read_the_predictions(setup):
    tmp_path, broker, config_path, model, env = setup
    watcher = Client(broker.port, subscribe="#")
    daemon = start_daemon(config_path)
    try:
        publisher = Client(broker.port)
        for device in (0, 1):
            publisher.publish(f"sensors/dev{device}/imu", payload(device, 1))
            publisher.publish(f"sensors/dev{device}/env", payload(device, 1))
        assert wait_until(lambda: len(_configs(watcher)) == 8 and sum(t.startswith("predictions/") for t, _ in
                                                                       watcher.messages) == 4, 20), _configs(watcher)
        configs = _configs(watcher)
        status_topic = daemon.config.broker.status_topic
        for topic, config in configs.items():
            _check_schema(topic, config, status_topic)
        assert len({c["unique_id"] for c in configs.values()}) == 8
        late = Client(broker.port, subscribe="homeassistant/#")  # what Home Assistant finds when it (re)subscribes
        assert wait_until(lambda: _configs(late) == configs, 10) and all(late.retained)
        late.close()
        predictions = {topic: body for topic, body in watcher.messages if topic.startswith("predictions/")}
        for config in configs.values():
            prediction = predictions[config["state_topic"]]  # each entity reads its stream's own predictions
            y = np.array(json.loads(prediction)["y"])
            shown = _render(config["value_template"], prediction)
            if config.get("device_class") == "enum":
                assert config["options"] == LABELS and shown == LABELS[int(np.argmax(y))]
            elif config.get("unit_of_measurement") == "%" and config["name"] == "Confidence":
                expected = 100 / np.exp(y - y.max()).sum()
                assert math.isclose(float(shown), round(expected, 1), abs_tol=0.051)
            else:
                output = {"Temperature": 0, "Humidity": 1}[config["name"]]
                assert float(shown) == pytest.approx(y[output], rel=1e-6)
                assert config["state_class"] == "measurement"
                assert config["device_class"] == {"Temperature": "temperature", "Humidity": "humidity"}[config["name"]]
        imu = [c for c in configs.values() if c["state_topic"] == "predictions/dev0/imu"]
        assert {c["name"] for c in imu} == {"Class", "Confidence"} and len({json.dumps(c["device"]) for c in imu}) == 1
        assert imu[0]["device"]["name"] == "dev0 (imu)" and imu[0]["device"]["model"] == (model.spec.name or "imu")

        # Home Assistant restarted (its birth message): every live stream is announced again, same ids.
        watcher.messages.clear()
        publisher.publish("homeassistant/status", b"online")
        assert wait_until(lambda: len(_configs(watcher)) == 8, 20)
        assert _configs(watcher) == configs

        # A third imu stream evicts the least recently used (max_streams = 2): its entities are removed.
        watcher.messages.clear()
        publisher.publish("sensors/dev1/imu", payload(1, 2))
        publisher.publish("sensors/dev2/imu", payload(2, 1))
        assert wait_until(lambda: len(_configs(watcher)) == 4, 20), _configs(watcher)
        changed = _configs(watcher)
        removed = {topic for topic, config in changed.items() if config is None}
        assert removed == {t for t, c in configs.items() if c["state_topic"] == "predictions/dev0/imu"}
        assert all(c["state_topic"] == "predictions/dev2/imu" for c in changed.values() if c is not None)
    finally:
        daemon.stop()

    # Restarted: the restored streams are announced at start with the same unique ids; the removed stay removed.
    late = Client(broker.port, subscribe="homeassistant/#")  # retained configs: what Home Assistant finds
    assert wait_until(lambda: len(_configs(late)) == 8, 10)
    retained = _configs(late)
    assert {c["state_topic"] for c in retained.values()} == {"predictions/dev1/imu", "predictions/dev2/imu",
                                                             "predictions/dev0/env", "predictions/dev1/env"}
    watcher.messages.clear()
    daemon = start_daemon(config_path)
    try:
        assert wait_until(lambda: len(_configs(watcher)) == 8, 20)
        assert {c["unique_id"] for c in _configs(watcher).values()} == {c["unique_id"] for c in retained.values()}
    finally:
        daemon.stop()


def test_a_model_file_with_labels_and_a_softmax_head_needs_no_labels_in_the_config(tmp_path):
    base = write_model(tmp_path / "plain.ern", hidden=8)
    head = tuple(dataclasses.replace(d, activation="softmax") if i == len(base.spec.head) - 1 else d
                 for i, d in enumerate(base.spec.head))
    spec = dataclasses.replace(base.spec, head=head, labels=("idle", "busy"), model_version="2.1", name="activity")
    edgernn.save(edgernn.Model(spec, base.weights), tmp_path / "model.ern")
    config = load_config(write_config(tmp_path, 1, top="[homeassistant]\n"))
    daemon = Daemon(config)
    try:
        components = daemon.discovery.components(daemon.pipelines[0], "dev/7")
    finally:
        daemon.link.stop(publish_offline=False)
        for pipeline in daemon.pipelines:
            pipeline.store.close()
    classes, confidence = (c for _, c in components)
    assert classes["options"] == ["idle", "busy"] and confidence["expire_after"] == 300
    assert classes["device"]["model"] == "activity" and classes["device"]["sw_version"] == "2.1"
    assert _render(confidence["value_template"], b'{"y": [0.25, 0.75]}') == "75.0"  # probabilities as they are
    assert _render(classes["value_template"], b'{"y": [0.25, 0.75]}') == "busy"
    # A non-finite output is published as null: Home Assistant reads "None" as unknown, not a template error.
    assert _render(classes["value_template"], b'{"y": [null, 0.75]}') == "None"
    assert _render(confidence["value_template"], b'{"y": [0.25, null]}') == "None"


@pytest.mark.parametrize("top, pipeline, problem", [
    ("[homeassistant]\n", "retain = true", 'expire_after: pipeline "imu" publishes retained predictions'),
    ("[homeassistant]\n", 'output_format = "raw"\n[pipelines.homeassistant]\nenabled = true',
     "homeassistant.enabled: Home Assistant reads JSON predictions"),
    ("[homeassistant]\ndiscovery_prefix = \"home assistant\"\n", "", "discovery_prefix: must be topic levels"),
    ("[homeassistant]\n", '[pipelines.homeassistant]\nlabels = ["a", "a"]', "labels: must be distinct"),
    ("[homeassistant]\n", '[[pipelines.homeassistant.sensors]]\noutput = 0\nname = "a"\n'
                          '[[pipelines.homeassistant.sensors]]\noutput = 0\nname = "b"', "two sensors read the same output"),
])
def test_config_errors_name_the_option(tmp_path, top, pipeline, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(write_config(tmp_path, 1, top=top, pipeline=pipeline))


def test_labels_that_do_not_fit_the_model_stop_the_start_with_the_option_named(tmp_path):
    write_model(tmp_path / "model.ern")  # 2 outputs
    config = load_config(write_config(tmp_path, 1, top="[homeassistant]\n",
                                      pipeline='[pipelines.homeassistant]\nlabels = ["a", "b", "c"]'))
    with pytest.raises(ConfigError, match=r"homeassistant.labels: pipeline 'imu': 3 labels for a model with 2 outputs"):
        Daemon(config)


def test_a_stream_forgotten_as_idle_is_removed_from_home_assistant(tmp_path):
    write_model(tmp_path / "model.ern", hidden=8)
    with Mosquitto(tmp_path / "broker").start() as broker:
        config = write_config(tmp_path, broker.port, top="[homeassistant]\n", pipeline="idle_reset = 1.0")
        watcher = Client(broker.port, subscribe="homeassistant/#")
        daemon = start_daemon(config)
        try:
            Client(broker.port).publish("sensors/dev0/imu", payload(0, 1))
            assert wait_until(lambda: len(_configs(watcher)) == 2 and all(_configs(watcher).values()), 20)
            assert wait_until(lambda: not any(_configs(watcher).values()), 20)  # both removed, empty and retained
            late = Client(broker.port, subscribe="homeassistant/#")
            assert not wait_until(lambda: late.messages, 1)
        finally:
            daemon.stop()


def test_a_pipeline_with_raw_predictions_is_not_announced_unless_asked(tmp_path):
    config = load_config(write_config(tmp_path, 1, top="[homeassistant]\n", pipeline='output_format = "raw"'))
    assert config.pipelines[0].homeassistant.enabled is False
