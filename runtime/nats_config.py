"""The NATS server configuration for scale-out (docs/scale-out.md): an N-node cluster with JetStream and
an MQTT listener, and subject mappings that put each device's topic into one of P partitions.

Devices keep publishing ``sensors/<device>/imu`` over MQTT. NATS turns the topic into the subject
``sensors.<device>.imu`` and a mapping rewrites it to ``part.<p>.sensors.<device>.imu``, where ``p`` is
NATS's ``partition(P, i)``: FNV-1a (32 bit) of the i-th wildcard token, modulo P (`partition_of` computes
the same here, checked against a real nats-server in the tests). A worker that owns partition ``p``
subscribes over MQTT to ``part/<p>/sensors/+/imu`` (`partition_filter`), so each device's stream reaches
exactly one worker, in the order the broker received it.

Pure text: nothing here talks to NATS (`edgernn cluster config` prints what it builds). Facts behind the
settings were measured on nats-server 2.9.10 (the Debian 12 package); docs/scale-out.md has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..protocol import TopicFilter, key_level

PARTITION_PREFIX = "part"
"""First level of a partitioned topic: ``part/<p>/<device topic>``."""
MAX_PARTITIONS = 1024
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT_LEVEL = re.compile(r"[A-Za-z0-9_-]+")
"""Literal topic levels a mapping carries unchanged (NATS 2.9's MQTT refuses topics with '.' or ' ': a
device whose id holds one is disconnected at its first publish, so it cannot be partitioned either)."""
_DURATION = re.compile(r"[1-9][0-9]*(ms|s|m|h)")


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a, the hash of NATS's ``partition()`` subject-mapping function."""
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def partition_of(key: str, partitions: int) -> int:
    """The partition NATS's ``partition(partitions, i)`` gives a topic whose i-th wildcard level is ``key``."""
    return fnv1a32(key.encode("utf-8")) % partitions


def partition_filter(pattern: str, partition: int) -> str:
    """The MQTT filter a worker subscribes to for one partition of a device filter."""
    return f"{PARTITION_PREFIX}/{partition}/{pattern}"


def partition_mapping(pattern: str, level: int | None, partitions: int) -> tuple[str, str]:
    """(source subject, destination) of the NATS mapping that partitions ``pattern`` by its topic level
    ``level`` (None: the first '+', as the daemon's key). The key level must be a '+' level and the filter
    may not end in '#': NATS partitions only on single-token wildcards."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions: must be from 1 to {MAX_PARTITIONS}, got {partitions}")
    topic_filter = TopicFilter(pattern)
    if topic_filter.multi_level:
        raise ValueError(f"subscription {pattern!r}: a partitioned subscription cannot end in '#' (NATS "
                         "partitions on single-level wildcards): use '+' levels")
    level = key_level(topic_filter, level)
    if level not in topic_filter.wildcard_levels:
        raise ValueError(f"subscription {pattern!r}: the stream key (level {level}) must be a '+' level to "
                         "partition by it")
    source, destination = [], [PARTITION_PREFIX, None]
    for index, text in enumerate(pattern.split("/")):
        if text == "+":
            number = topic_filter.wildcard_levels.index(index) + 1
            source.append("*")
            destination.append(f"{{{{wildcard({number})}}}}")
            if index == level:
                destination[1] = f"{{{{partition({partitions},{number})}}}}"
        elif _SUBJECT_LEVEL.fullmatch(text):
            source.append(text)
            destination.append(text)
        else:
            raise ValueError(f"subscription {pattern!r}: level {text!r} cannot be mapped to a NATS subject "
                             "(letters, digits, '_' and '-' only)")
    return ".".join(source), ".".join(destination)


@dataclass(frozen=True)
class Node:
    """One nats-server of the cluster: its name and where it listens."""

    name: str
    host: str
    client_port: int = 4222
    cluster_port: int = 6222
    mqtt_port: int = 1883
    http_port: int = 8222

    @classmethod
    def parse(cls, text: str) -> "Node":
        """``NAME=HOST[:CLIENT[:CLUSTER[:MQTT[:HTTP]]]]`` (defaults 4222, 6222, 1883, 8222)."""
        name, equals, address = text.partition("=")
        parts = address.split(":")
        if not equals or not _NODE_NAME.fullmatch(name) or not parts[0] or len(parts) > 5:
            raise ValueError(f"node {text!r}: must be NAME=HOST[:CLIENT[:CLUSTER[:MQTT[:HTTP]]]]")
        ports = []
        for port in parts[1:]:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"node {text!r}: port {port!r} is not 1-65535")
            ports.append(int(port))
        return cls(name, parts[0], *ports)


def server_config(node: Node, nodes: list[Node], mappings: list[tuple[str, str]], store_dir: str,
                  cluster_name: str = "edgernn", replicas: int | None = None, ack_wait: str = "10s",
                  max_ack_pending: int = 8192) -> str:
    """nats-server's config file for ``node`` of ``nodes``: JetStream in ``store_dir``, routes to the other
    nodes, an MQTT listener whose sessions and messages are replicated ``replicas`` times (default: every
    node, at most 3), and the partition ``mappings``."""
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"nodes: names must be distinct, got {names}")
    if node not in nodes:
        raise ValueError(f"node {node.name!r} is not one of the nodes")
    replicas = min(len(nodes), 3) if replicas is None else replicas
    if not 1 <= replicas <= len(nodes):
        raise ValueError(f"replicas: must be from 1 to the number of nodes ({len(nodes)}), got {replicas}")
    if not 1 <= max_ack_pending <= 65535:
        raise ValueError(f"max_ack_pending: must be from 1 to 65535 (MQTT packet ids), got {max_ack_pending}")
    if not _DURATION.fullmatch(ack_wait):
        raise ValueError(f"ack_wait: must be a duration like 10s, 500ms or 2m, got {ack_wait!r}")
    routes = "\n".join(f"    nats-route://{other.host}:{other.cluster_port}" for other in nodes if other != node)
    cluster = f"""
cluster {{
  name: {cluster_name}
  listen: {node.host}:{node.cluster_port}
  routes: [
{routes}
  ]
}}
""" if len(nodes) > 1 else ""
    mapped = "\n".join(f'  "{source}": "{destination}"' for source, destination in mappings)
    return f"""# nats-server config for node {node.name} of {len(nodes)} (written by `edgernn cluster config`)
server_name: {node.name}
listen: {node.host}:{node.client_port}
http: {node.host}:{node.http_port}

jetstream {{
  store_dir: "{store_dir}"
}}
{cluster}
mqtt {{
  listen: {node.host}:{node.mqtt_port}
  # sessions, messages and QoS 1 consumers on {replicas} node(s): with 3 they survive the loss of one
  stream_replicas: {replicas}
  consumer_replicas: {replicas}
  consumer_memory_storage: false
  # how long an unacked QoS 1 message waits before it is sent again: after a worker dies, its
  # successor gets what it had not acked this long after the death
  ack_wait: "{ack_wait}"
  # unacked QoS 1 messages a session may have (NATS's default is 1024): a worker acks only after each
  # checkpoint, so a partition's rate x checkpoint_interval must stay below it
  max_ack_pending: {max_ack_pending}
}}

# each device topic goes to exactly one partition (the global account: MQTT clients without auth land there)
mappings {{
{mapped}
}}
"""


def pipeline_mappings(pipelines, partitions: int) -> list[tuple[str, str]]:
    """The mappings of every pipeline's subscriptions (each source once); a key from the payload cannot be
    partitioned by topic."""
    mappings: dict[str, str] = {}
    for pipeline in pipelines:
        if pipeline.key_field is not None:
            raise ValueError(f"pipeline {pipeline.name!r}: key_field = {pipeline.key_field!r}: partitions follow "
                             "the topic, so the stream key must be a topic level (key_level or a '+')")
        for pattern in pipeline.subscribe:
            source, destination = partition_mapping(pattern, pipeline.key_level, partitions)
            if mappings.setdefault(source, destination) != destination:
                raise ValueError(f"pipeline {pipeline.name!r}: subscription {pattern!r} is partitioned by another "
                                 "level in another pipeline")
    return list(mappings.items())
