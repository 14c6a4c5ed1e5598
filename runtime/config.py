"""The daemon's configuration: one TOML file (stdlib `tomllib`) read into frozen dataclasses.

A daemon that runs for months on a device must refuse a wrong config at start, not misbehave later, so
every value is checked here: unknown keys (with a "did you mean" suggestion), wrong types (a bool is not
an integer), ranges, choices and the combinations that make no sense. Every error is a `ConfigError`
whose message starts with the file name and names the key path::

    daemon.toml: pipelines[0].qos: must be 0, 1 or 2, got 3

Topic filters, publish templates and the stream-key level are checked with `edgernn.protocol` (imported
lazily), the code the daemon itself runs them through, so a config that loads is one the daemon can run.
Option names follow Telegraf's ``inputs.mqtt_consumer`` where they mean the same thing. Secrets follow
Telegraf too: ``${NAME}`` in any string is replaced by the environment variable NAME (``$${`` writes a
literal ``${``), and ``password_file`` / ``username_file`` read the value from a file. No secret value
ever appears in an error message or a ``repr``; `redacted` gives the config as a dict safe to log.
``runtime/examples/full.toml`` shows every option with its default.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeRNNError
from .timing import GAP_POLICIES, MAX_FILL, MAX_REORDER_WINDOW

MAX_CLIENT_ID_LENGTH = 128
REDACTED = "***"
DEFAULT_STATUS_TOPIC = "edgernn/{client_id}/status"
OUTPUT_CLIENT_ID_SUFFIX = "-out"
_REQUIRED = object()  # the default of an option that must be given


class ConfigError(EdgeRNNError, ValueError):
    """The config file cannot be read or holds an invalid value; the message names the file and the key."""

    def __init__(self, source, key: str | None, problem: str):
        self.source = str(source)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: {key}: {problem}" if key else f"{self.source}: {problem}")


def _default_client_id() -> str:
    return f"edgernn-{socket.gethostname()}"[:MAX_CLIENT_ID_LENGTH]


# ---- the configuration -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """``[broker]``: the MQTT connection. After `parse_config`, ``status_topic`` is the final topic."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = field(default_factory=_default_client_id)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 60
    connection_timeout: float = 30.0
    persistent_session: bool = True
    min_reconnect_interval: float = 1.0
    max_reconnect_interval: float = 30.0
    protocol: str = "3.1.1"
    tls: bool = False  # TLS even without tls_ca or a client certificate: the system's CAs check the broker
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_skip_verify: bool = False
    status_topic: str = DEFAULT_STATUS_TOPIC
    startup_error_behavior: str = "retry"
    separate_output_connection: bool = True  # predictions on a connection of their own (runtime/mqtt.py)
    # Other brokers of the same cluster, tried in turn after host:port when a connection fails or is lost
    # (a NATS cluster's MQTT listeners: docs/scale-out.md); ((host, port), ...)
    fallback_servers: tuple[tuple[str, int], ...] = ()

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """Every broker address to try, host:port first."""
        return ((self.host, self.port),) + self.fallback_servers

    @property
    def output_client_id(self) -> str:
        """The client id of the predictions' connection."""
        return self.client_id + OUTPUT_CLIENT_ID_SUFFIX


@dataclass(frozen=True, slots=True)
class HomeAssistantSensor:
    """One numeric sensor Home Assistant shows for a regressor's or forecaster's output ``output``."""

    output: int
    name: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"


@dataclass(frozen=True, slots=True)
class PipelineHomeAssistant:
    """``[pipelines.homeassistant]``: how the pipeline's streams appear in Home Assistant (runtime/homeassistant.py).
    A classifier (class names here or in the model file) shows its top class and its confidence; otherwise
    one numeric sensor per entry of ``sensors`` (default: one per output, ``y0``, ``y1``, ...)."""

    enabled: bool = True
    labels: tuple[str, ...] = ()
    sensors: tuple[HomeAssistantSensor, ...] = ()


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """``[[pipelines]]``: topics in, one model, topics out. Templates keep ``{key}``/``{pipeline}``."""

    name: str
    model: Path
    subscribe: tuple[str, ...]
    publish: str
    qos: int = 1
    publish_qos: int | None = None
    retain: bool = False
    data_format: str = "json"
    output_format: str = "json"
    x_field: str = "x"
    seq_field: str = "seq"
    ts_field: str = "ts"
    y_field: str = "y"
    fields: tuple[str, ...] | None = None
    csv_columns: tuple[str, ...] | None = None
    key_field: str | None = None
    key_level: int | None = None
    seq_gap: str = "ignore"
    idle_reset: float = 0.0
    warmup_steps: int = 0
    warmup_policy: str = "mark"
    reorder_window: int = 0
    reorder_timeout_ms: float = 200.0
    gap_policy: str = "ignore"
    max_fill: int = 0
    input_rate: float | None = None
    publish_filled: bool = False
    max_streams: int = 100_000
    max_payload_bytes: int = 65536
    dead_letter: str | None = None
    backend: str = "numba"
    onnx_model: Path | None = None
    homeassistant: PipelineHomeAssistant = PipelineHomeAssistant()

    @property
    def effective_publish_qos(self) -> int:
        """The QoS predictions are published with: ``publish_qos``, or ``qos`` when that is None."""
        return self.qos if self.publish_qos is None else self.publish_qos


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where stream states are snapshotted (and journalled) so a restart continues them."""

    dir: Path
    snapshot_interval: float = 30.0
    durability: str = "snapshot"
    journal_fsync: bool = True
    # Numba's compiled kernels; None: NUMBA_CACHE_DIR from the environment, else <dir>/numba-cache
    # (runtime/compile_cache.py decides, before numba is imported).
    compile_cache: Path | None = None


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """``[daemon]``: micro-batching and the bound of the in-process queue."""

    max_batch: int = 512
    max_undelivered_messages: int = 10000
    shutdown_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (off when ``listen`` is None) and the retained stats topic."""

    listen: str | None = None
    stats_topic: str | None = None
    stats_interval: float = 10.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: level and format of the logs on stdout, and the rate limit for bad-input lines."""

    level: str = "info"
    format: str = "json"
    bad_input_interval: float = 10.0


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """``[signing]``: with trusted keys, every model file the daemon loads (at start, at a reload) must carry a
    valid Ed25519 signature by one of them (`edgernn.signing`)."""

    trusted_keys: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class HomeAssistantConfig:
    """``[homeassistant]``: MQTT discovery of every stream's predictions (runtime/homeassistant.py)."""

    discovery_prefix: str = "homeassistant"
    expire_after: int = 300  # seconds without a prediction before Home Assistant shows "unavailable"; 0: never
    status_topic: str = ""  # Home Assistant's birth topic; "" means <discovery_prefix>/status

    @property
    def birth_topic(self) -> str:
        return self.status_topic or f"{self.discovery_prefix}/status"


@dataclass(frozen=True, slots=True)
class UpdatesConfig:
    """``[updates]``: signed model updates over MQTT (runtime/updates.py, README "Model updates")."""

    topic: str  # updates for pipeline P arrive on <topic>/P
    events_topic: str  # what became of each update (JSON, QoS 1, not retained)
    dir: Path  # the installed models, the last good ones, the manifest
    states: str = "keep"  # "keep": kept when the state shapes are unchanged (else reset); "reset": always reset
    shadow_messages: int = 0  # > 0: the candidate runs beside the current model for this many predictions first
    max_divergence: float = math.inf  # shadow: the largest |candidate - current| allowed for promotion
    shadow_topic: str = "edgernn/shadow/{pipeline}/{key}"
    probation_messages: int = 1000  # a non-finite prediction within this many after a swap rolls it back
    max_bytes: int = 64 << 20
    chunk_timeout: float = 60.0  # an update whose chunks stop coming for this long is dropped (said)
    allow_paths: tuple[Path, ...] = ()  # local-path updates only from files under these directories


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: this daemon is one worker of several behind a NATS cluster (runtime/cluster.py,
    docs/scale-out.md). It serves only the partitions whose lease it holds."""

    nats: tuple[str, ...]  # NATS client URLs of the cluster's nodes (nats://host:4222)
    partitions: int  # P of the servers' mappings (`edgernn cluster config --partitions P`)
    own: tuple[int, ...] | None = None  # these partitions only; None: "auto", any free one
    max_partitions: int | None = None  # with "auto": hold at most this many (None: as many as are free)
    worker: str = field(default_factory=socket.gethostname)  # shown by `edgernn cluster status`
    lease_ttl: float = 15.0
    renew_interval: float = 3.0
    checkpoint_interval: float = 1.0
    ack_wait: float = 10.0  # the servers' mqtt ack_wait (`edgernn cluster config --ack-wait`), in seconds
    replicas: int = 3  # of the lease bucket and the checkpoint store
    bucket: str = "edgernn"  # names the KV bucket <bucket>_leases and the object store <bucket>_checkpoints


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file; ``source`` is the path it was read from."""

    broker: BrokerConfig
    pipelines: tuple[PipelineConfig, ...]
    state: StateConfig
    daemon: DaemonConfig
    metrics: MetricsConfig
    log: LogConfig
    source: Path
    cluster: ClusterConfig | None = None
    signing: SigningConfig = SigningConfig()
    homeassistant: HomeAssistantConfig | None = None
    updates: UpdatesConfig | None = None


# ---- public API ---------------------------------------------------------------------------------------
def load_config(path) -> Config:
    """Read and check the TOML file at ``path``; relative paths in it are taken from its directory."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(source, None, "not valid UTF-8 (a TOML file must be UTF-8)") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read the config file: {exc.strerror or exc}") from None
    return parse_config(data, source, Path(os.path.abspath(path)).parent)


def parse_config(data: dict, source: str = "<config>", base_dir: Path = Path(".")) -> Config:
    """Check ``data`` (parsed TOML) and build the `Config`; ``source`` starts every error message."""
    try:
        data = _substitute_env(data, "")
        top = _Table(data, "", _TOP_LEVEL_TABLES, Path(base_dir))
        broker = _parse_broker(top.table("broker", _known(BrokerConfig, "username_file", "password_file")))
        pipelines = _parse_pipelines(top)
        state = _parse_state(top, "state" in data)
        daemon = _parse_daemon(top.table("daemon", _known(DaemonConfig)))
        metrics = _parse_metrics(top.table("metrics", _known(MetricsConfig)), broker.client_id)
        log = _parse_log(top.table("log", _known(LogConfig)))
        cluster = _parse_cluster(top, pipelines, state, broker) if "cluster" in data else None
        signing = _parse_signing(top.table("signing", _known(SigningConfig)))
        homeassistant = _parse_homeassistant(top, pipelines) if "homeassistant" in data else None
        updates = _parse_updates(top, broker, state, signing, pipelines) if "updates" in data else None
        if cluster is not None and (homeassistant is not None or updates is not None):
            raise _Invalid("homeassistant" if homeassistant is not None else "updates",
                           "is not supported by a [cluster] worker yet")
        if cluster is not None and metrics.listen is not None:
            raise _Invalid("metrics.listen", "is not served by a [cluster] worker yet (each partition has its own "
                                             "daemon): `edgernn cluster status` shows each partition")
    except _Invalid as exc:
        raise ConfigError(source, exc.key, exc.problem) from None
    return Config(broker, pipelines, state, daemon, metrics, log, Path(source), cluster, signing, homeassistant,
                  updates)


def redacted(config: Config) -> dict:
    """The config as plain JSON-ready data (paths as strings, tuples as lists), the password as ``***``."""
    plain = _plain(dataclasses.asdict(config))
    if plain["broker"]["password"] is not None:
        plain["broker"]["password"] = REDACTED
    return plain


def parse_listen_address(listen: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port). ``":9100"`` means every interface (``0.0.0.0``); IPv6 in brackets."""
    if listen.startswith("["):
        host, bracket, rest = listen[1:].partition("]")
        if not bracket or not rest.startswith(":") or not host:
            raise ValueError(f'must be "host:port" or "[ipv6]:port", got {_quote(listen)}')
        port_text = rest[1:]
    else:
        host, colon, port_text = listen.rpartition(":")
        if not colon:
            raise ValueError(f'must be "host:port" (e.g. "127.0.0.1:9100" or ":9100"), got {_quote(listen)}')
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, e.g. \"[::1]:9100\", got {_quote(listen)}")
        host = host or "0.0.0.0"
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {_quote(listen)}")
    return host, int(port_text)


# ---- sections -----------------------------------------------------------------------------------------
def _parse_servers(t: _Table, name: str) -> tuple[tuple[str, int], ...]:
    if name not in t.data:
        return ()
    servers = []
    for text in t.strings(name):
        try:
            host, port = parse_listen_address(text)
        except ValueError as error:
            raise t.invalid(name, str(error)) from None
        if not port or not text.rpartition(":")[0]:
            raise t.invalid(name, f'each must be "host:port" with a port from 1 to 65535, got {_quote(text)}')
        servers.append((host, port))
    return tuple(servers)


def _parse_broker(t: _Table) -> BrokerConfig:
    client_id = t.string("client_id", _default_client_id())
    separate_output = t.boolean("separate_output_connection", True)
    longest = MAX_CLIENT_ID_LENGTH - (len(OUTPUT_CLIENT_ID_SUFFIX) if separate_output else 0)
    if len(client_id) > longest:
        raise t.invalid("client_id", f"must be at most {longest} characters, got {len(client_id)}"
                        + (f" (the outputs' connection adds {OUTPUT_CLIENT_ID_SUFFIX!r})" if separate_output else ""))
    min_reconnect = t.number("min_reconnect_interval", 1.0, above=0.0)
    max_reconnect = t.number("max_reconnect_interval", 30.0, above=0.0)
    if min_reconnect > max_reconnect:
        raise t.invalid("min_reconnect_interval",
                        f"must be <= max_reconnect_interval ({max_reconnect:g}), got {min_reconnect:g}")
    tls_cert, tls_key = t.existing_file("tls_cert"), t.existing_file("tls_key")
    if (tls_cert is None) != (tls_key is None):
        given, missing = ("tls_cert", "tls_key") if tls_key is None else ("tls_key", "tls_cert")
        raise t.invalid(given, f"needs {missing} too (a client certificate and its key go together)")
    status_topic = _topic_template(t, "status_topic", ("client_id",), DEFAULT_STATUS_TOPIC, {"client_id": client_id})
    return BrokerConfig(
        host=t.string("host", "127.0.0.1"),
        port=t.integer("port", 1883, minimum=1, maximum=65535),
        client_id=client_id,
        username=_secret(t, "username", secret=False),
        password=_secret(t, "password", secret=True),
        keepalive=t.integer("keepalive", 60, minimum=0, maximum=65535),
        connection_timeout=t.number("connection_timeout", 30.0, above=0.0),
        persistent_session=t.boolean("persistent_session", True),
        min_reconnect_interval=min_reconnect,
        max_reconnect_interval=max_reconnect,
        protocol=t.string("protocol", "3.1.1", choices=("3.1.1", "5")),
        tls=t.boolean("tls", False),
        tls_ca=t.existing_file("tls_ca"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure_skip_verify=t.boolean("insecure_skip_verify", False),
        status_topic=status_topic,
        startup_error_behavior=t.string("startup_error_behavior", "retry", choices=("error", "retry")),
        separate_output_connection=separate_output,
        fallback_servers=_parse_servers(t, "fallback_servers"),
    )


def _parse_pipelines(top: _Table) -> tuple[PipelineConfig, ...]:
    tables = top.data.get("pipelines")
    if isinstance(tables, dict):
        raise _Invalid("pipelines", "must be an array of tables: write [[pipelines]], not [pipelines]")
    if tables is None or (isinstance(tables, list) and not tables):
        raise _Invalid("pipelines", "at least one [[pipelines]] table is required")
    if not isinstance(tables, list):
        raise _Invalid("pipelines", f"must be an array of tables ([[pipelines]]), got {_describe(tables)}")
    pipelines, first_index = [], {}
    for index, data in enumerate(tables):
        t = _Table(data, f"pipelines[{index}]", _known(PipelineConfig), top.base_dir)
        pipeline = _parse_pipeline(t)
        if pipeline.name in first_index:
            raise t.invalid("name", f"duplicate pipeline name {_quote(pipeline.name)} "
                                    f"(also pipelines[{first_index[pipeline.name]}])")
        first_index[pipeline.name] = index
        pipelines.append(pipeline)
    return tuple(pipelines)


PIPELINE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""Pipeline names: they name files in the state dir and label metrics."""
WARM_FIELD = "warm"
"""The field that marks a JSON prediction made during ``warmup_steps`` (``"warm": false``)."""


def _parse_pipeline(t: _Table) -> PipelineConfig:
    name = t.string("name")
    if not PIPELINE_NAME.fullmatch(name):
        raise t.invalid("name", f"may hold only letters, digits, '_', '.' and '-', got {_quote(name)}")
    data_format = t.string("data_format", "json", choices=("json", "csv", "raw"))
    backend = t.string("backend", "numba", choices=("numba", "onnxruntime"))
    onnx_model = t.path("onnx_model", None)
    if backend == "onnxruntime" and onnx_model is None:
        raise t.invalid("onnx_model", 'is required with backend = "onnxruntime" (the exported step model)')
    if backend != "onnxruntime" and onnx_model is not None:
        raise t.invalid("onnx_model", f'is only used with backend = "onnxruntime", got backend = {_quote(backend)}')
    key_field, key_level = t.string("key_field", None), t.integer("key_level", None, minimum=0)
    _check_key_source(t, data_format, key_field, key_level)
    subscribe = _subscribe(t, key_field, key_level)
    x_field, seq_field, ts_field = t.string("x_field", "x"), t.string("seq_field", "seq"), t.string("ts_field", "ts")
    _check_distinct(t, {"x_field": x_field, "seq_field": seq_field, "ts_field": ts_field,
                        **({"key_field": key_field} if key_field is not None else {})})
    y_field = t.string("y_field", "y")
    # The prediction carries y, seq, ts and the stream key under "key": four distinct names.
    _check_distinct(t, {"seq_field": seq_field, "ts_field": ts_field, "y_field": y_field})
    for option, value in (("y_field", y_field), ("seq_field", seq_field), ("ts_field", ts_field)):
        if value == "key":
            raise t.invalid(option, '"key" is where a prediction carries its stream key: choose another name')
    fields_ = _only_with(t, "fields", data_format, "json")
    csv_columns = _only_with(t, "csv_columns", data_format, "csv")
    if fields_ is not None:
        _check_not_in(t, "fields", fields_, {"seq_field": seq_field, "ts_field": ts_field, "key_field": key_field})
    if data_format == "csv" and key_field is not None and key_field not in (csv_columns or ()):
        raise t.invalid("key_field", f"{_quote(key_field)} must be one of csv_columns to be read from a CSV line")
    dead_letter = _topic_template(t, "dead_letter", ("pipeline",), default=None)
    publish = _topic_template(t, "publish", ("key", "pipeline"))
    output_format = t.string("output_format", "json", choices=("json", "raw"))
    warmup_steps, warmup_policy = _warmup(t, output_format, {"y_field": y_field, "seq_field": seq_field,
                                                             "ts_field": ts_field})
    return PipelineConfig(
        name=name,
        model=t.path("model"),
        subscribe=subscribe,
        publish=publish,
        qos=t.integer("qos", 1, choices=(0, 1, 2)),
        publish_qos=t.integer("publish_qos", None, choices=(0, 1, 2)),
        retain=t.boolean("retain", False),
        data_format=data_format,
        output_format=output_format,
        x_field=x_field,
        seq_field=seq_field,
        ts_field=ts_field,
        y_field=y_field,
        fields=fields_,
        csv_columns=csv_columns,
        key_field=key_field,
        key_level=key_level,
        seq_gap=t.string("seq_gap", "ignore", choices=("ignore", "reset")),
        idle_reset=t.number("idle_reset", 0.0, minimum=0.0),
        warmup_steps=warmup_steps,
        warmup_policy=warmup_policy,
        # Time, order and gaps (runtime/timing.py; the bounds are its own, so one message adds boundedly many steps).
        reorder_window=t.integer("reorder_window", 0, minimum=0, maximum=MAX_REORDER_WINDOW),
        reorder_timeout_ms=t.number("reorder_timeout_ms", 200.0, above=0.0),
        gap_policy=t.string("gap_policy", "ignore", choices=GAP_POLICIES),
        max_fill=t.integer("max_fill", 0, minimum=0, maximum=MAX_FILL),
        input_rate=t.number("input_rate", None, above=0.0),
        publish_filled=t.boolean("publish_filled", False),
        max_streams=t.integer("max_streams", 100_000, minimum=1),
        max_payload_bytes=t.integer("max_payload_bytes", 65536, minimum=1),
        dead_letter=dead_letter,
        backend=backend,
        onnx_model=onnx_model,
        homeassistant=_parse_pipeline_homeassistant(t.table("homeassistant", _known(PipelineHomeAssistant)),
                                                    output_format),
    )


def _warmup(t: _Table, output_format: str, output_fields: dict) -> tuple[int, str]:
    """``warmup_steps`` and ``warmup_policy``: "mark" writes ``"warm": false`` into a JSON prediction,
    which a raw float32 prediction has no room for."""
    steps = t.integer("warmup_steps", 0, minimum=0)
    policy = t.string("warmup_policy", "mark", choices=("mark", "withhold"))
    if steps and policy == "mark":
        if output_format == "raw":
            raise t.invalid("warmup_policy", '"mark" adds a "warm" field to JSON predictions; a raw prediction has '
                                             'none: use warmup_policy = "withhold" or output_format = "json"')
        for option, value in output_fields.items():
            if value == WARM_FIELD:
                raise t.invalid(option, f'"{WARM_FIELD}" is where a prediction is marked during warmup_steps: '
                                        "choose another name")
    return steps, policy


def _parse_state(top: _Table, given: bool) -> StateConfig:
    t = top.table("state", _known(StateConfig))
    return StateConfig(
        dir=t.path("dir") if given else top.base_dir / "state",
        snapshot_interval=t.number("snapshot_interval", 30.0, above=0.0),
        durability=t.string("durability", "snapshot", choices=("snapshot", "journal")),
        journal_fsync=t.boolean("journal_fsync", True),
        compile_cache=t.path("compile_cache", None),
    )


def _parse_signing(t: _Table) -> SigningConfig:
    if "trusted_keys" not in t.data:
        return SigningConfig()
    if t.data["trusted_keys"] == []:
        raise t.invalid("trusted_keys", "is empty: list the public keys to trust, or leave [signing] out (no check)")
    keys = []
    for text in t.strings("trusted_keys", allow_single=True):
        path = t.base_dir / Path(text)
        if not path.is_file():
            raise t.invalid("trusted_keys", f"key file not found: {path}")
        keys.append(path)
    return SigningConfig(tuple(keys))


DISCOVERY_ID = re.compile(r"[A-Za-z0-9_-]+")
"""What Home Assistant allows in a discovery topic's node and object ids."""


def _parse_homeassistant(top: _Table, pipelines) -> HomeAssistantConfig:
    t = top.table("homeassistant", _known(HomeAssistantConfig))
    prefix = t.string("discovery_prefix", "homeassistant")
    if not all(DISCOVERY_ID.fullmatch(level) for level in prefix.split("/")):
        raise t.invalid("discovery_prefix", f"must be topic levels of letters, digits, '_' and '-', got {_quote(prefix)}")
    expire_after = t.integer("expire_after", 300, minimum=0)
    status_topic = _topic_template(t, "status_topic", (), "", values={}) if "status_topic" in t.data else ""
    for pipeline in pipelines:
        if expire_after and pipeline.retain and pipeline.homeassistant.enabled:
            raise t.invalid("expire_after", f"pipeline {_quote(pipeline.name)} publishes retained predictions: Home "
                                            "Assistant would show a retained, stale value as fresh after a restart; "
                                            "set retain = false there, or expire_after = 0")
    return HomeAssistantConfig(prefix, expire_after, status_topic)


def _parse_pipeline_homeassistant(t: _Table, output_format: str) -> PipelineHomeAssistant:
    enabled = t.boolean("enabled", output_format == "json")  # raw predictions are not for Home Assistant
    if enabled and output_format != "json":
        raise t.invalid("enabled", "Home Assistant reads JSON predictions: output_format must be \"json\"")
    labels = t.strings("labels") if "labels" in t.data else ()
    if len(set(labels)) != len(labels):
        raise t.invalid("labels", f"must be distinct, got {list(labels)}")
    sensors = []
    items = t.data.get("sensors", [])
    if not isinstance(items, list):
        raise t.invalid("sensors", f"must be an array of tables, got {_describe(items)}")
    for index, item in enumerate(items):
        s = _Table(item, t.key(f"sensors[{index}]"), _known(HomeAssistantSensor), t.base_dir)
        sensors.append(HomeAssistantSensor(output=s.integer("output", minimum=0), name=s.string("name"),
                                           unit=s.string("unit", None), device_class=s.string("device_class", None),
                                           state_class=s.string("state_class", "measurement",
                                                                choices=("measurement", "total", "total_increasing"))))
    outputs = [sensor.output for sensor in sensors]
    if len(set(outputs)) != len(outputs):
        raise t.invalid("sensors", f"two sensors read the same output: {outputs}")
    if labels and sensors:
        raise t.invalid("sensors", "a classifier (labels) shows its top class and confidence: give labels or "
                                   "sensors, not both")
    return PipelineHomeAssistant(enabled, labels, tuple(sensors))


def _parse_updates(top: _Table, broker: BrokerConfig, state: StateConfig, signing: SigningConfig,
                   pipelines) -> UpdatesConfig:
    t = top.table("updates", _known(UpdatesConfig))
    if not signing.trusted_keys:
        raise t.invalid("topic", "model updates must be signed: list the keys to trust in [signing] trusted_keys")
    for pipeline in pipelines:
        if pipeline.backend == "onnxruntime":
            raise t.invalid("topic", f"pipeline {_quote(pipeline.name)} runs an ONNX step model (backend = "
                                     '"onnxruntime"): updates replace .ern files only, for now')
    values = {"client_id": broker.client_id}
    topic = _topic_template(t, "topic", ("client_id",), "edgernn/{client_id}/update", values)
    events = _topic_template(t, "events_topic", ("client_id",), "edgernn/{client_id}/update/events", values)
    shadow_topic = _topic_template(t, "shadow_topic", ("key", "pipeline"), "edgernn/shadow/{pipeline}/{key}")
    for pipeline in pipelines:
        if events == f"{topic}/{pipeline.name}":
            raise t.invalid("events_topic", f"{_quote(events)} is where pipeline {_quote(pipeline.name)}'s updates "
                                            "arrive: choose another topic")
    allow_paths = tuple(t.base_dir / Path(text) for text in t.strings("allow_paths")) if "allow_paths" in t.data else ()
    return UpdatesConfig(
        topic=topic, events_topic=events, dir=t.path("dir", None) or state.dir / "models",
        states=t.string("states", "keep", choices=("keep", "reset")),
        shadow_messages=t.integer("shadow_messages", 0, minimum=0),
        max_divergence=t.number("max_divergence", math.inf, minimum=0.0) if "max_divergence" in t.data else math.inf,
        shadow_topic=shadow_topic,
        probation_messages=t.integer("probation_messages", 1000, minimum=0),
        max_bytes=t.integer("max_bytes", 64 << 20, minimum=1024),
        chunk_timeout=t.number("chunk_timeout", 60.0, above=0.0),
        allow_paths=allow_paths,
    )


BUCKET_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _parse_cluster(top: _Table, pipelines, state: StateConfig, broker: BrokerConfig) -> ClusterConfig:
    from .nats_config import MAX_PARTITIONS, pipeline_mappings  # pure text, no NATS client

    t = top.table("cluster", _known(ClusterConfig))
    partitions = t.integer("partitions", minimum=1, maximum=MAX_PARTITIONS)
    try:
        pipeline_mappings(pipelines, partitions)  # every stream key must be a topic level NATS can partition by
    except ValueError as error:
        raise _Invalid("pipelines", str(error)) from None
    longest = len(broker.client_id) + len(f"-part-{partitions - 1}") + len(OUTPUT_CLIENT_ID_SUFFIX)
    if longest > MAX_CLIENT_ID_LENGTH:
        raise _Invalid("broker.client_id", f"is too long for [cluster]: a partition's outputs connect as "
                                           f"'<client_id>-part-<p>{OUTPUT_CLIENT_ID_SUFFIX}', at most "
                                           f"{MAX_CLIENT_ID_LENGTH} characters, here {longest}")
    if state.durability != "snapshot":
        raise _Invalid("state.durability", 'must be "snapshot" with [cluster]: a partition\'s states live in '
                                           "the cluster's checkpoints, and its messages are acked only once one holds them")
    own = t.data.get("own", "auto")
    if own == "auto":
        own = None
    elif (not isinstance(own, list) or not own
          or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < partitions for p in own)):
        raise t.invalid("own", f'must be "auto" or an array of partitions from 0 to {partitions - 1}, got {_describe(own)}')
    else:
        own = tuple(sorted(set(own)))
    max_partitions = t.integer("max_partitions", None, minimum=1)
    if own is not None and max_partitions is not None:
        raise t.invalid("max_partitions", 'is for own = "auto" (a worker given its partitions serves all of them)')
    # A partition's MQTT session outlives its worker, and its unacked messages go to the next one: the session
    # must persist and speak NATS's MQTT (3.1.1), predictions must go out while the inputs close at a handover.
    for option, value, needed in (("persistent_session", broker.persistent_session, True),
                                  ("separate_output_connection", broker.separate_output_connection, True),
                                  ("protocol", broker.protocol, "3.1.1"),
                                  ("startup_error_behavior", broker.startup_error_behavior, "retry")):
        if value != needed:
            shown = [_quote(v) if isinstance(v, str) else _toml_literal(v) for v in (needed, value)]
            raise _Invalid(f"broker.{option}", f"must be {shown[0]} with [cluster], got {shown[1]}")
    lease_ttl = t.number("lease_ttl", 15.0, above=0.0)
    renew_interval = t.number("renew_interval", 3.0, above=0.0)
    if renew_interval * 2 >= lease_ttl:
        raise t.invalid("renew_interval", f"must be less than half of lease_ttl ({lease_ttl:g}), got {renew_interval:g}")
    ack_wait = t.number("ack_wait", 10.0, above=0.0)
    if lease_ttl - renew_interval <= ack_wait:
        # After a kill -9 the successor must connect only once NATS is due to send the dead worker's unacked
        # messages again: then they come before newer ones.
        raise t.invalid("lease_ttl", f"must exceed ack_wait + renew_interval ({ack_wait:g} + {renew_interval:g} s), "
                                     f"got {lease_ttl:g}")
    checkpoint_interval = t.number("checkpoint_interval", 1.0, above=0.0)
    if checkpoint_interval * 2 > ack_wait:
        raise t.invalid("checkpoint_interval", f"must be at most half of ack_wait ({ack_wait:g} s): messages wait for "
                                               f"a checkpoint before they are acked, got {checkpoint_interval:g}")
    bucket = t.string("bucket", "edgernn")
    if not BUCKET_NAME.fullmatch(bucket):
        raise t.invalid("bucket", f"may hold only letters, digits, '_' and '-', got {_quote(bucket)}")
    nats = t.strings("nats", allow_single=True)
    return ClusterConfig(
        nats=nats,
        partitions=partitions,
        own=own,
        max_partitions=max_partitions,
        worker=t.string("worker", socket.gethostname()),
        lease_ttl=lease_ttl,
        renew_interval=renew_interval,
        checkpoint_interval=checkpoint_interval,
        ack_wait=ack_wait,
        replicas=t.integer("replicas", 3, minimum=1, maximum=5),
        bucket=bucket,
    )


def _parse_daemon(t: _Table) -> DaemonConfig:
    return DaemonConfig(
        max_batch=t.integer("max_batch", 512, minimum=1),
        # At most 65535: MQTT packet ids are 16 bits, and every queued message may be answered by an output
        # in flight at once.
        max_undelivered_messages=t.integer("max_undelivered_messages", 10000, minimum=1, maximum=65535),
        shutdown_timeout=t.number("shutdown_timeout", 10.0, above=0.0),
    )


def _parse_metrics(t: _Table, client_id: str) -> MetricsConfig:
    listen = t.string("listen", None)
    if listen is not None:
        try:
            parse_listen_address(listen)
        except ValueError as exc:
            raise t.invalid("listen", str(exc)) from None
    stats_topic = None
    if "stats_topic" in t.data:
        stats_topic = _topic_template(t, "stats_topic", ("client_id",), values={"client_id": client_id})
    return MetricsConfig(listen=listen, stats_topic=stats_topic,
                         stats_interval=t.number("stats_interval", 10.0, above=0.0))


def _parse_log(t: _Table) -> LogConfig:
    return LogConfig(
        level=t.string("level", "info", choices=("debug", "info", "warning", "error")),
        format=t.string("format", "json", choices=("json", "text")),
        bad_input_interval=t.number("bad_input_interval", 10.0, minimum=0.0),
    )


# ---- checks spanning several keys ---------------------------------------------------------------------
def _secret(t: _Table, name: str, secret: bool) -> str | None:
    """``name`` given inline (``${ENV}`` already substituted) or read from the file ``<name>_file``."""
    value = t.string(name, None, secret=secret, allow_empty=True)
    path = t.path(f"{name}_file", None)
    if path is None:
        return value
    if value is not None:
        raise t.invalid(f"{name}_file", f"give either {name} or {name}_file, not both")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise t.invalid(f"{name}_file", f"{path} is not valid UTF-8") from None
    except OSError as exc:
        raise t.invalid(f"{name}_file", f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    return text.rstrip("\r\n")


def _subscribe(t: _Table, key_field, key_level) -> tuple[str, ...]:
    """The subscription filters; the stream key must be found in each (a '+' or key_level) or key_field."""
    from ..protocol import TopicFilter, key_level as key_level_of

    filters = t.strings("subscribe", allow_single=True)
    if len(set(filters)) != len(filters):
        raise t.invalid("subscribe", "lists the same filter twice")
    for pattern in filters:
        try:
            topic_filter = TopicFilter(pattern)
        except ValueError as exc:
            raise t.invalid("subscribe", str(exc)) from None
        if key_field is None:
            try:
                key_level_of(topic_filter, key_level)
            except ValueError as exc:
                raise t.invalid("subscribe" if key_level is None else "key_level", str(exc)) from None
    return filters


def _check_key_source(t: _Table, data_format: str, key_field, key_level) -> None:
    if key_field is not None and key_level is not None:
        raise t.invalid("key_field", "give either key_field or key_level, not both")
    if key_field is not None and data_format == "raw":
        raise t.invalid("key_field", 'cannot be read from a raw payload (data_format = "raw"); use key_level')


def _only_with(t: _Table, name: str, data_format: str, required_format: str) -> tuple[str, ...] | None:
    """A list option that only one data_format reads: None when absent, refused with the others."""
    if name not in t.data:
        return None
    if data_format != required_format:
        raise t.invalid(name, f'is only used with data_format = "{required_format}", got {_quote(data_format)}')
    values = t.strings(name)
    if len(set(values)) != len(values):
        raise t.invalid(name, "lists the same name twice")
    return values


def _check_distinct(t: _Table, named: dict) -> None:
    seen = {}
    for option, value in named.items():
        if value in seen:
            raise t.invalid(option, f"{_quote(value)} is already {seen[value]}")
        seen[value] = option


def _check_not_in(t: _Table, name: str, values, others: dict) -> None:
    for option, value in others.items():
        if value is not None and value in values:
            raise t.invalid(name, f"{_quote(value)} is already {option}")


def _topic_template(t: _Table, name: str, allowed: tuple[str, ...], default=_REQUIRED,
                    values=None) -> str | None:
    """A publish topic with ``{placeholder}`` fields checked by `edgernn.protocol.TopicTemplate`.

    With ``values`` the placeholders are filled in here and the topic is returned, else the template.
    """
    from ..protocol import TopicTemplate

    text = t.string(name, default)
    if text is None:
        return None
    try:
        template = TopicTemplate(text, allowed=allowed)
        return text if values is None else template.format(**values)
    except ValueError as exc:
        raise t.invalid(name, str(exc)) from None


# ---- reading values -----------------------------------------------------------------------------------
_TOP_LEVEL_TABLES = frozenset({"broker", "pipelines", "state", "daemon", "metrics", "log", "cluster", "signing",
                               "homeassistant", "updates"})


def _known(cls, *extra: str) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls)) | frozenset(extra)


class _Invalid(Exception):
    """A problem at a key path; `parse_config` turns it into a `ConfigError` naming the file."""

    def __init__(self, key: str | None, problem: str):
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


class _Table:
    """One TOML table: typed getters whose errors name the key path; unknown keys refused up front."""

    def __init__(self, data, path: str, known: frozenset, base_dir: Path):
        if not isinstance(data, dict):
            raise _Invalid(path, f"must be a table, got {_describe(data)}")
        self.data, self.prefix, self.base_dir = data, path, base_dir
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _Invalid(self.key(key), f"unknown option{hint}")

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def invalid(self, name: str, problem: str) -> _Invalid:
        return _Invalid(self.key(name), problem)

    def table(self, name: str, known: frozenset) -> _Table:
        return _Table(self.data.get(name, {}), self.key(name), known, self.base_dir)

    def _get(self, name: str, default, types: tuple, expected: str, secret: bool = False):
        if name not in self.data:
            if default is _REQUIRED:
                raise self.invalid(name, "is required")
            return default, False
        value = self.data[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise self.invalid(name, f"must be {expected}, got {_describe(value, secret)}")
        return value, True

    def string(self, name, default=_REQUIRED, choices=None, secret=False, allow_empty=False):
        value, given = self._get(name, default, (str,), "a string", secret)
        if not given:
            return value
        if choices is not None and value not in choices:
            raise self.invalid(name, f"must be {_one_of(choices)}, got {_quote(value)}")
        if not value and not allow_empty:
            raise self.invalid(name, "cannot be empty")
        return value

    def integer(self, name, default=_REQUIRED, minimum=None, maximum=None, choices=None) -> int | None:
        value, given = self._get(name, default, (int,), "an integer")
        if given:
            if choices is not None and value not in choices:
                raise self.invalid(name, f"must be {_one_of(choices)}, got {value}")
            _check_range(self, name, value, minimum, maximum)
        return value

    def number(self, name, default=_REQUIRED, minimum=None, above=None) -> float:
        value, given = self._get(name, default, (int, float), "a number")
        if given:
            value = float(value)
            if not math.isfinite(value):
                raise self.invalid(name, f"must be a finite number, got {value}")
            if above is not None and value <= above:
                raise self.invalid(name, f"must be > {above:g}, got {value:g}")
            _check_range(self, name, value, minimum, None)
        return value

    def boolean(self, name, default=_REQUIRED) -> bool:
        return self._get(name, default, (bool,), "true or false")[0]

    def path(self, name, default=_REQUIRED) -> Path | None:
        """A path; a relative one is taken from the config file's directory."""
        value = self.string(name, default)
        return value if value is None else self.base_dir / Path(value)

    def existing_file(self, name) -> Path | None:
        path = self.path(name, None)
        if path is not None and not path.exists():
            raise self.invalid(name, f"file not found: {path}")
        return path

    def strings(self, name, allow_single=False) -> tuple[str, ...]:
        value = self.data.get(name)
        if allow_single and isinstance(value, str):
            value = [value]
        expected = "a string or an array of strings" if allow_single else "an array of strings"
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            if name not in self.data:
                raise self.invalid(name, "is required")
            raise self.invalid(name, f"must be {expected}, got {_describe(value)}")
        if not value or not all(value):
            raise self.invalid(name, "cannot be empty nor hold an empty string")
        return tuple(value)


def _check_range(t: _Table, name: str, value, minimum, maximum) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise t.invalid(name, f"must be from {minimum:g} to {maximum:g}, got {value:g}")
    if minimum is not None and value < minimum:
        raise t.invalid(name, f"must be >= {minimum:g}, got {value:g}")


# ---- environment variables ---------------------------------------------------------------------------
_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _substitute_env(value: Any, path: str) -> Any:
    """Every string in ``value`` (tables and arrays walked) with ``${NAME}`` replaced by ``$NAME``'s value."""
    if isinstance(value, dict):
        return {key: _substitute_env(item, f"{path}.{key}" if path else key) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute_env(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, closed = match.group(1), match.group(2)
        if not closed:
            raise _Invalid(path, "'${' without a closing '}' (write $${ for a literal ${)")
        if not _ENV_NAME.fullmatch(name):
            raise _Invalid(path, "'${' must be followed by an environment variable name and '}' "
                                 "(write $${ for a literal ${)")
        if name not in os.environ:
            raise _Invalid(path, f"environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REFERENCE.sub(replace, value)


# ---- messages and plain data ---------------------------------------------------------------------------
_TOML_TYPES = ((bool, "boolean"), (str, "string"), (int, "integer"), (float, "float"), (dict, "table"),
               (list, "array"), (datetime.datetime, "datetime"), (datetime.date, "date"),
               (datetime.time, "time"))


def _describe(value, secret: bool = False) -> str:
    """``integer 3``, ``string "x"``: the TOML type and, unless secret, the value."""
    kind = next((name for cls, name in _TOML_TYPES if isinstance(value, cls)), type(value).__name__)
    if secret or isinstance(value, (dict, list)):
        return f"a {kind}" if kind[0] not in "aeiou" else f"an {kind}"
    return f"{kind} {_quote(value) if isinstance(value, str) else _toml_literal(value)}"


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_of(choices) -> str:
    shown = [_quote(c) if isinstance(c, str) else str(c) for c in choices]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
