"""Home Assistant MQTT discovery: every stream's predictions appear in Home Assistant with no YAML.

For each stream key of a pipeline with ``[pipelines.homeassistant]`` enabled, the daemon publishes retained
discovery configs (https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery), one per entity:

- a classifier (class names in the config or the model file): an ``enum`` sensor with the top class and a
  sensor with its confidence in % (the softmax of the outputs; the top output itself when the model's head
  already ends in softmax);
- otherwise one numeric sensor per configured output (default: every output, ``y0``, ``y1``, ...).

Each entity reads the stream's own prediction topic with a template, so predictions are not published a
second time. All of a stream's entities share a device block (the stream key, the model's name and version);
availability is the daemon's online/offline status topic (its Last Will); ``expire_after`` makes a stream
that stops reporting go "unavailable". Configs are published when a stream is first seen, for every live
stream at start-up and whenever Home Assistant's birth message (``homeassistant/status`` = ``online``) says it
restarted, and after a model update (the version shown changes); an evicted or idle-forgotten stream's
configs are removed (an empty retained payload). Ids are made from the client id, the pipeline and the
stream key only, so they are the same after every restart.

Everything here runs on the daemon's worker thread (it owns the tables); publishing goes through
``publish(topic, payload, qos, retain)``.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
import logging
import re

from edgernn import __version__

log = logging.getLogger(__name__)

MAX_NUMERIC_SENSORS = 32
"""Default numeric sensors stop here: a 200-output forecaster gets its first 32 unless ``sensors`` says more."""
ANNOUNCE_PER_PASS = 200
"""Configs published (or removed) per pass of the worker in a full re-announcement: a birth message (anyone
may publish one) re-announces every live stream, spread over passes so that predictions keep flowing and
paho's window of 65,535 unconfirmed messages is never approached."""

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


def object_id(text: str, length: int = 40) -> str:
    """A topic id Home Assistant accepts, readable and unique: a slug of ``text`` plus 8 hex of its hash."""
    slug = _NOT_ID.sub("_", text).strip("_")[:length] or "x"
    return f"{slug}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def top_class_template(y_field: str, labels) -> str:
    """Jinja that names the class of the largest output ("None", which Home Assistant shows as unknown, when
    an output is not a number: the daemon writes a non-finite one as null)."""
    return (f"{{% set y = value_json[{json.dumps(y_field)}] %}}{{% if None in y %}}None{{% else %}}"
            f"{{{{ {json.dumps(list(labels))}[y.index(y | max)] }}}}{{% endif %}}")


def confidence_template(y_field: str, probabilities: bool) -> str:
    """Jinja for the top class's probability in %: the softmax of the outputs (Jinja has ``**`` but no exp),
    or the largest output when the model already outputs probabilities."""
    head = f"{{% set y = value_json[{json.dumps(y_field)}] %}}{{% if None in y %}}None{{% else %}}"
    if probabilities:
        return head + "{{ ((y | max) * 100) | round(1) }}{% endif %}"
    return (head + "{% set m = y | max %}{% set ns = namespace(s=0) %}"
            "{% for v in y %}{% set ns.s = ns.s + 2.718281828459045 ** (v - m) %}{% endfor %}"
            "{{ (100 / ns.s) | round(1) }}{% endif %}")


def check_pipeline(source, config, model) -> None:
    """Raise ConfigError when ``[pipelines.homeassistant]`` does not fit the model (at start and at reloads)."""
    from .config import ConfigError

    settings = config.homeassistant
    if settings.labels and len(settings.labels) != model.output_size:
        raise ConfigError(source, "homeassistant.labels", f"pipeline {config.name!r}: {len(settings.labels)} "
                          f"labels for a model with {model.output_size} outputs (one label per output)")
    for sensor in settings.sensors:
        if sensor.output >= model.output_size:
            raise ConfigError(source, "homeassistant.sensors", f"pipeline {config.name!r}: sensor "
                              f"{sensor.name!r} reads output {sensor.output}, the model has {model.output_size}")


class Discovery:
    """The discovery configs of every pipeline's streams: what to announce, what to remove."""

    def __init__(self, config, broker, pipelines, publish):
        """``pipelines`` serve models checked against their sensors already (`daemon.load_checked`)."""
        self.config = config
        self.node = object_id(broker.client_id)
        self.availability = [{"topic": broker.status_topic, "payload_available": "online",
                              "payload_not_available": "offline"}]
        self.pipelines = [p for p in pipelines if p.config.homeassistant.enabled]
        self._publish = publish
        self.pending = True  # announce every live stream at the next chance (start-up, a birth message)
        self.announced = 0  # configs published (a counter for tests and logs)
        self._queue: deque = deque()  # (pipeline, key) still to re-announce
        self._removals: deque = deque()  # (pipeline, key, suffix) of entities a model change took away
        self._suffixes: dict = {}  # pipeline -> the entity suffixes last announced
        for pipeline in self.pipelines:
            pipeline.on_streams_added = lambda keys, p=pipeline: self.announce(p, keys)
            pipeline.on_stream_removed = lambda key, p=pipeline: self.remove(p, key)

    def handle_birth(self, payload: bytes) -> None:
        """Home Assistant's status topic said ``online``: it restarted and forgot what it was told."""
        if payload.strip() == b"online":
            self.pending = True

    def announce_pending(self) -> None:
        """Re-announce every live stream (after start-up, a birth message, a model change), a pass at a time;
        entities a model change took away (a classifier's, or outputs beyond the new model's) are removed."""
        if self.pending:
            self.pending = False
            self._queue = deque((pipeline, key) for pipeline in self.pipelines for key in pipeline.table.keys())
            current = {}
            for pipeline in self.pipelines:
                current[pipeline.name] = {s for s, _ in self.entities(pipeline)}
                gone = set(self._suffixes.get(pipeline.name, ())) - current[pipeline.name]
                self._suffixes[pipeline.name] = sorted(current[pipeline.name])
                if gone:
                    self._removals.extend((pipeline, key, suffix) for key in pipeline.table.keys() for suffix in gone)
            # a removal queued by an earlier change must not delete an entity the model has again (A -> B -> A)
            self._removals = deque(r for r in self._removals if r[2] not in current[r[0].name])
        budget = ANNOUNCE_PER_PASS
        while self._removals and budget > 0:
            pipeline, key, suffix = self._removals.popleft()
            self._publish(self._topic(self._stream(pipeline, key), suffix), b"", 1, True)
            budget -= 1
        while self._queue and budget > 0:
            pipeline, key = self._queue.popleft()
            if key in pipeline.table:  # not evicted or forgotten since the pass began
                self.announce(pipeline, [key])
                budget -= len(self._suffixes[pipeline.name])

    def announce(self, pipeline, keys) -> None:
        entities = self.entities(pipeline)
        if pipeline.name not in self._suffixes:
            self._suffixes[pipeline.name] = sorted(suffix for suffix, _ in entities)
        for key in keys:
            for topic, config in self.components(pipeline, key, entities):
                self._publish(topic, json.dumps(config, separators=(",", ":")).encode(), 1, True)
                self.announced += 1

    def remove(self, pipeline, key) -> None:
        stream = self._stream(pipeline, key)
        for suffix, _ in self.entities(pipeline):
            self._publish(self._topic(stream, suffix), b"", 1, True)

    # ---- the payloads ------------------------------------------------------------------------------
    def components(self, pipeline, key: str, entities=None) -> list[tuple[str, dict]]:
        """[(discovery topic, config)] of one stream's entities (``entities``: `entities` of the pipeline)."""
        stream = self._stream(pipeline, key)
        spec = pipeline.model.spec
        device = {"identifiers": [f"edgernn_{self.node}_{stream}"], "name": f"{key} ({pipeline.name})",
                  "manufacturer": "edgernn", "model": spec.name or pipeline.name,
                  "sw_version": spec.model_version or "unversioned"}
        common = {"state_topic": pipeline.output_topic(key), "availability": self.availability, "device": device,
                  "origin": {"name": "edgernn", "sw_version": __version__}}
        if self.config.expire_after:
            common["expire_after"] = self.config.expire_after
        return [(self._topic(stream, suffix), {**entity, "unique_id": f"edgernn_{self.node}_{stream}_{suffix}", **common})
                for suffix, entity in entities or self.entities(pipeline)]

    def entities(self, pipeline) -> list[tuple[str, dict]]:
        """[(id suffix, the entity's own fields)] the pipeline's model and config make for every stream."""
        spec = pipeline.model.spec
        y_field = pipeline.config.y_field
        labels = pipeline.config.homeassistant.labels or spec.labels
        if labels:
            probabilities = bool(spec.head) and spec.head[-1].activation.name == "softmax"
            return [("class", {"name": "Class", "device_class": "enum", "options": list(labels),
                               "value_template": top_class_template(y_field, labels)}),
                    ("confidence", {"name": "Confidence", "unit_of_measurement": "%", "state_class": "measurement",
                                    "suggested_display_precision": 1,
                                    "value_template": confidence_template(y_field, probabilities)})]
        entities = []
        for sensor in self._sensors(pipeline):
            entity = {"name": sensor.name, "value_template": f"{{{{ value_json[{json.dumps(y_field)}][{sensor.output}] }}}}"}
            for field, value in (("unit_of_measurement", sensor.unit), ("device_class", sensor.device_class),
                                 ("state_class", sensor.state_class)):
                if value is not None:
                    entity[field] = value
            entities.append((f"y{sensor.output}", entity))
        return entities

    @staticmethod
    def _stream(pipeline, key: str) -> str:
        """The stream's id in topics and unique ids."""
        return object_id(f"{pipeline.name}/{key}", 48)

    def _topic(self, stream: str, suffix: str) -> str:
        return f"{self.config.discovery_prefix}/sensor/{self.node}/{stream}_{suffix}/config"

    def _sensors(self, pipeline):
        from .config import HomeAssistantSensor

        configured = pipeline.config.homeassistant.sensors
        outputs = pipeline.model.output_size
        return configured or [HomeAssistantSensor(output=i, name=f"y{i}") for i in range(min(outputs, MAX_NUMERIC_SENSORS))]
