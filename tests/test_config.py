"""The daemon's config file (runtime/config.py): the minimal config, defaults, errors, secrets, paths."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from pathlib import Path

import pytest

from edgernn.errors import EdgeRNNError
from edgernn.runtime.config import (BrokerConfig, ClusterConfig, ConfigError, SigningConfig, DaemonConfig, LogConfig, MetricsConfig,
                                    HomeAssistantConfig, HomeAssistantSensor, PipelineHomeAssistant, UpdatesConfig,
                                    PipelineConfig, StateConfig, load_config, parse_config,
                                    parse_listen_address, redacted)

EXAMPLES = Path(__file__).resolve().parent.parent / "runtime" / "examples"

MINIMAL = """\
[broker]
host = "127.0.0.1"
port = 1883
client_id = "edgernn-pi"

[[pipelines]]
name = "imu"
model = "model.ern"
subscribe = "sensors/+/imu"        # the level matched by '+' is the stream key
publish = "predictions/{key}/imu"
qos = 1

[state]
dir = "/var/lib/edgernn"
"""

PIPELINE = """\
[[pipelines]]
name = "imu"
model = "model.ern"
subscribe = "sensors/+/imu"
publish = "predictions/{key}/imu"
"""

SECRET = "s3cr3t-Pa55"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in tmp_path, so error messages start with the bare file name as the user typed it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(text: str, name: str = "daemon.toml"):
    Path(name).write_text(text)
    return load_config(name)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


# ---- the minimal config and the examples ----------------------------------------------------------------
def test_minimal_config_loads_as_is(here):
    config = load(MINIMAL)
    assert config.broker.host == "127.0.0.1" and config.broker.port == 1883
    assert config.broker.client_id == "edgernn-pi"
    assert config.broker.status_topic == "edgernn/edgernn-pi/status"
    (pipeline,) = config.pipelines
    assert pipeline.name == "imu"
    assert pipeline.model == here / "model.ern"
    assert pipeline.subscribe == ("sensors/+/imu",)
    assert pipeline.publish == "predictions/{key}/imu"
    assert pipeline.qos == 1 and pipeline.effective_publish_qos == 1
    assert config.state.dir == Path("/var/lib/edgernn")
    assert config.source == Path("daemon.toml")


def test_minimal_example_file_is_the_documented_minimal_config():
    assert (EXAMPLES / "minimal.toml").read_text() == MINIMAL
    assert load_config(EXAMPLES / "minimal.toml").pipelines[0].model == EXAMPLES / "model.ern"


EXPECTED_DEFAULTS = {
    BrokerConfig: dict(host="127.0.0.1", port=1883, username=None, password=None, keepalive=60,
                       connection_timeout=30.0, persistent_session=True, min_reconnect_interval=1.0,
                       max_reconnect_interval=30.0, protocol="3.1.1", tls_ca=None, tls_cert=None, tls_key=None,
                       insecure_skip_verify=False, startup_error_behavior="retry",
                       separate_output_connection=True, fallback_servers=()),
    PipelineConfig: dict(qos=1, publish_qos=None, retain=False, data_format="json", output_format="json",
                         x_field="x", seq_field="seq", ts_field="ts", y_field="y", fields=None, csv_columns=None,
                         key_field=None, key_level=None, seq_gap="ignore", idle_reset=0.0, warmup_steps=0,
                         warmup_policy="mark", reorder_window=0, reorder_timeout_ms=200.0, gap_policy="ignore",
                         max_fill=0, input_rate=None, publish_filled=False, max_streams=100_000,
                         max_payload_bytes=65536, dead_letter=None, backend="numba", onnx_model=None),
    StateConfig: dict(snapshot_interval=30.0, durability="snapshot", journal_fsync=True, compile_cache=None),
    DaemonConfig: dict(max_batch=512, max_undelivered_messages=10000, shutdown_timeout=10.0),
    MetricsConfig: dict(listen=None, stats_topic=None, stats_interval=10.0),
    LogConfig: dict(level="info", format="json", bad_input_interval=10.0),
}


def assert_defaults(config, client_id: str):
    parsed = {BrokerConfig: config.broker, PipelineConfig: config.pipelines[0], StateConfig: config.state,
              DaemonConfig: config.daemon, MetricsConfig: config.metrics, LogConfig: config.log}
    for cls, expected in EXPECTED_DEFAULTS.items():
        got = dataclasses.asdict(parsed[cls])
        assert {name: got[name] for name in expected} == expected, cls.__name__
    assert config.broker.client_id == client_id
    assert config.broker.status_topic == f"edgernn/{client_id}/status"


def test_every_default(here):
    config = load(PIPELINE)
    client_id = f"edgernn-{socket.gethostname()}"
    assert_defaults(config, client_id)
    assert config.state.dir == here / "state"
    # the dataclasses' own defaults are the same values
    assert config.daemon == DaemonConfig() and config.metrics == MetricsConfig() and config.log == LogConfig()
    assert config.broker == BrokerConfig(status_topic=f"edgernn/{client_id}/status")
    assert BrokerConfig().client_id == client_id and BrokerConfig().status_topic == "edgernn/{client_id}/status"


def test_full_example_states_every_default():
    config = load_config(EXAMPLES / "full.toml")
    assert_defaults(config, f"edgernn-{socket.gethostname()}")
    assert config.state.dir == EXAMPLES / "state"


def test_full_example_shows_every_option():
    text = (EXAMPLES / "full.toml").read_text()
    shown = set(re.findall(r"^#? ?(\w+) = ", text, flags=re.MULTILINE))
    options = {f.name for cls in (*EXPECTED_DEFAULTS, ClusterConfig, SigningConfig, HomeAssistantConfig,
                                  HomeAssistantSensor, PipelineHomeAssistant, UpdatesConfig)
               for f in dataclasses.fields(cls)}
    assert options | {"username_file", "password_file"} <= shown


def test_parse_config_takes_a_dict():
    config = parse_config({"pipelines": [{"name": "a", "model": "m.ern", "subscribe": ["s/+"], "publish": "p"}]})
    assert config.pipelines[0].model == Path("m.ern") and config.state.dir == Path("state")
    with pytest.raises(ConfigError, match=r"^<config>: pipelines: at least one"):
        parse_config({})


def test_config_is_frozen(here):
    config = load(PIPELINE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.broker.port = 1  # type: ignore[misc]


# ---- values that are accepted ---------------------------------------------------------------------------
def test_options_are_read(here):
    Path("ca.pem").write_text("ca")
    Path("client.pem").write_text("cert")
    Path("client.key").write_text("key")
    config = load("""\
[broker]
host = "broker.local"
port = 8883
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client.key"
protocol = "5"
min_reconnect_interval = 2
max_reconnect_interval = 2
status_topic = "site/{client_id}/up"
client_id = "pi-7"

[[pipelines]]
name = "csv.line-1"
model = "/models/m.ern"
subscribe = ["a/+/b", "c/+"]
publish = "out/{pipeline}/{key}"
publish_qos = 0
data_format = "csv"
csv_columns = ["seq", "dev", "ax"]
key_field = "dev"
backend = "onnxruntime"
onnx_model = "step.onnx"
dead_letter = "rejected/{pipeline}"

[[pipelines]]
name = "second"
model = "m.ern"
subscribe = "a/+/b"                  # the same filter as the first pipeline: allowed
publish = "out2/{key}"
key_level = 0

[state]
dir = "st"
snapshot_interval = 5
durability = "journal"

[metrics]
listen = ":9100"
stats_topic = "stats/{client_id}"
""")
    broker, first, second = config.broker, config.pipelines[0], config.pipelines[1]
    assert broker.tls_ca == here / "ca.pem" and broker.tls_key == here / "client.key"
    assert broker.min_reconnect_interval == 2.0 and isinstance(broker.min_reconnect_interval, float)
    assert broker.status_topic == "site/pi-7/up"
    assert first.subscribe == ("a/+/b", "c/+") and first.effective_publish_qos == 0
    assert first.model == Path("/models/m.ern") and first.onnx_model == here / "step.onnx"
    assert first.dead_letter == "rejected/{pipeline}" and first.publish == "out/{pipeline}/{key}"
    assert second.key_level == 0
    assert config.state.dir == here / "st" and config.state.snapshot_interval == 5.0
    assert config.metrics.stats_topic == "stats/pi-7"


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pw").write_text(SECRET + "\n")
    (tmp_path / "etc" / "daemon.toml").write_text('[broker]\npassword_file = "pw"\n' + PIPELINE
                                                  + '[state]\ndir = "../var"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/daemon.toml")
    assert config.pipelines[0].model == tmp_path / "etc" / "model.ern"
    assert config.state.dir == tmp_path / "etc" / ".." / "var"
    assert config.broker.password == SECRET


def test_key_sources(here):
    def pipeline(**options):
        body = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
        return load(f'[[pipelines]]\nname = "p"\nmodel = "m"\npublish = "o"\n{body}').pipelines[0]

    assert pipeline(subscribe="a/+/#", key_level=0).key_level == 0        # a level before '#'
    assert pipeline(subscribe="a/#", key_field="device").key_field == "device"
    assert pipeline(subscribe="a/b", key_level=1).key_level == 1          # a literal level, chosen
    assert pipeline(subscribe="a/b", key_field="device").key_field == "device"
    assert pipeline(subscribe="a/+", data_format="json", fields=["ax", "ay"]).fields == ("ax", "ay")


def test_listen_address_forms():
    assert parse_listen_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen_address(":9100") == ("0.0.0.0", 9100)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    for bad in ("9100", "host:", "host:x", "host:65536", "::1:9100", "[::1]9100"):
        with pytest.raises(ValueError):
            parse_listen_address(bad)


# ---- errors ---------------------------------------------------------------------------------------------
ERRORS = [
    # (config text, the whole message)
    (PIPELINE.replace('publish = "predictions/{key}/imu"', 'publish = "p/{key}"\nqos = 3'),
     "pipelines[0].qos: must be 0, 1 or 2, got 3"),
    ('[broker]\nhots = "x"\n' + PIPELINE, "broker.hots: unknown option (did you mean 'host'?)"),
    ('[brokers]\nhost = "x"\n' + PIPELINE, "brokers: unknown option (did you mean 'broker'?)"),
    ('[broker]\nport = "1883"\n' + PIPELINE, 'broker.port: must be an integer, got string "1883"'),
    ("[broker]\nport = true\n" + PIPELINE, "broker.port: must be an integer, got boolean true"),
    ("[broker]\nport = 0\n" + PIPELINE, "broker.port: must be from 1 to 65535, got 0"),
    ("[broker]\nport = 65536\n" + PIPELINE, "broker.port: must be from 1 to 65535, got 65536"),
    ("[broker]\nkeepalive = -1\n" + PIPELINE, "broker.keepalive: must be from 0 to 65535, got -1"),
    ("[broker]\nkeepalive = 1.5\n" + PIPELINE, "broker.keepalive: must be an integer, got float 1.5"),
    ("[broker]\nconnection_timeout = 0\n" + PIPELINE, "broker.connection_timeout: must be > 0, got 0"),
    ('[broker]\nconnection_timeout = "30s"\n' + PIPELINE,
     'broker.connection_timeout: must be a number, got string "30s"'),
    ("[broker]\npersistent_session = 1\n" + PIPELINE,
     "broker.persistent_session: must be true or false, got integer 1"),
    ("[broker]\nmin_reconnect_interval = 5\nmax_reconnect_interval = 2\n" + PIPELINE,
     "broker.min_reconnect_interval: must be <= max_reconnect_interval (2), got 5"),
    ('[broker]\nprotocol = "3.1"\n' + PIPELINE, 'broker.protocol: must be "3.1.1" or "5", got "3.1"'),
    ("[broker]\nprotocol = 5\n" + PIPELINE, "broker.protocol: must be a string, got integer 5"),
    ('[broker]\nstartup_error_behavior = "crash"\n' + PIPELINE,
     'broker.startup_error_behavior: must be "error" or "retry", got "crash"'),
    ('[broker]\nclient_id = ""\n' + PIPELINE, "broker.client_id: cannot be empty"),
    (f'[broker]\nclient_id = "{"c" * 125}"\n' + PIPELINE,
     "broker.client_id: must be at most 124 characters, got 125 (the outputs' connection adds '-out')"),
    (f'[broker]\nclient_id = "{"c" * 129}"\nseparate_output_connection = false\n' + PIPELINE,
     "broker.client_id: must be at most 128 characters, got 129"),
    ('[broker]\nstatus_topic = "s/{host}"\n' + PIPELINE,
     "broker.status_topic: publish topic 's/{host}': unknown placeholder {host} (allowed: {client_id})"),
    ('[broker]\nclient_id = "a+b"\n' + PIPELINE,
     "broker.status_topic: {client_id} = 'a+b': must be non-empty, without '+', '#' or NUL"),
    ('[broker]\ntls_cert = "c.pem"\n' + PIPELINE, "broker.tls_cert: file not found: {dir}/c.pem"),
    ('[broker]\ntls_ca = "/nonexistent/ca.pem"\n' + PIPELINE, "broker.tls_ca: file not found: /nonexistent/ca.pem"),
    ("[broker]\n", "pipelines: at least one [[pipelines]] table is required"),
    ("pipelines = []\n", "pipelines: at least one [[pipelines]] table is required"),
    ('[pipelines]\nname = "a"\n', "pipelines: must be an array of tables: write [[pipelines]], not [pipelines]"),
    ("pipelines = [1]\n", "pipelines[0]: must be a table, got integer 1"),
    ("broker = 1\n" + PIPELINE, "broker: must be a table, got integer 1"),
    (PIPELINE + PIPELINE, 'pipelines[1].name: duplicate pipeline name "imu" (also pipelines[0])'),
    (PIPELINE.replace('name = "imu"', 'name = "i m u"'),
     "pipelines[0].name: may hold only letters, digits, '_', '.' and '-', got \"i m u\""),
    (PIPELINE.replace('name = "imu"\n', ""), "pipelines[0].name: is required"),
    (PIPELINE.replace('model = "model.ern"\n', ""), "pipelines[0].model: is required"),
    (PIPELINE.replace('subscribe = "sensors/+/imu"\n', ""), "pipelines[0].subscribe: is required"),
    (PIPELINE.replace('publish = "predictions/{key}/imu"\n', ""), "pipelines[0].publish: is required"),
    (PIPELINE.replace('"sensors/+/imu"', "[]"), "pipelines[0].subscribe: cannot be empty nor hold an empty string"),
    (PIPELINE.replace('"sensors/+/imu"', "5"),
     "pipelines[0].subscribe: must be a string or an array of strings, got integer 5"),
    (PIPELINE.replace('"sensors/+/imu"', '"a/#/+"'),
     "pipelines[0].subscribe: subscription 'a/#/+': '#' must be the last level"),
    (PIPELINE.replace('"sensors/+/imu"', '"a/b+/+"'), "pipelines[0].subscribe: subscription 'a/b+/+': '+' must be a whole level, not 'b+'"),
    (PIPELINE.replace('"sensors/+/imu"', '["a/+", "a/+"]'), "pipelines[0].subscribe: lists the same filter twice"),
    (PIPELINE.replace('"sensors/+/imu"', '"sensors/#"'),
     "pipelines[0].subscribe: subscription 'sensors/#' has no '+' level: set key_level or key_field"),
    (PIPELINE + "key_level = 3\n",
     "pipelines[0].key_level: key_level 3: subscription 'sensors/+/imu' has 3 level(s) in it (0-based)"),
    (PIPELINE.replace('"sensors/+/imu"', '"a/#"') + "key_level = 1\n",
     "pipelines[0].key_level: key_level 1: subscription 'a/#' has 1 level(s) before its '#' (0-based)"),
    (PIPELINE + "key_level = -1\n", "pipelines[0].key_level: must be >= 0, got -1"),
    (PIPELINE + 'key_level = 1\nkey_field = "dev"\n', "pipelines[0].key_field: give either key_field or key_level, not both"),
    (PIPELINE + 'data_format = "raw"\nkey_field = "dev"\n',
     'pipelines[0].key_field: cannot be read from a raw payload (data_format = "raw"); use key_level'),
    (PIPELINE.replace("{key}/imu", "{device}"),
     "pipelines[0].publish: publish topic 'predictions/{device}': unknown placeholder {device} "
     "(allowed: {key}, {pipeline})"),
    (PIPELINE.replace("{key}/imu", "{key}/+"),
     "pipelines[0].publish: publish topic 'predictions/{key}/+': contains the wildcard '+'"),
    (PIPELINE.replace("{key}/imu", "{key"),
     "pipelines[0].publish: publish topic 'predictions/{key': unbalanced '{' or '}'"),
    (PIPELINE + 'dead_letter = "bad/{key}"\n',
     "pipelines[0].dead_letter: publish topic 'bad/{key}': unknown placeholder {key} (allowed: {pipeline})"),
    (PIPELINE + 'data_format = "xml"\n', 'pipelines[0].data_format: must be "json", "csv" or "raw", got "xml"'),
    (PIPELINE + 'output_format = "csv"\n', 'pipelines[0].output_format: must be "json" or "raw", got "csv"'),
    (PIPELINE + 'data_format = "csv"\nfields = ["a"]\n',
     'pipelines[0].fields: is only used with data_format = "json", got "csv"'),
    (PIPELINE + 'csv_columns = ["a"]\n', 'pipelines[0].csv_columns: is only used with data_format = "csv", got "json"'),
    (PIPELINE + 'fields = "a"\n', 'pipelines[0].fields: must be an array of strings, got string "a"'),
    (PIPELINE + 'fields = ["a", "a"]\n', "pipelines[0].fields: lists the same name twice"),
    (PIPELINE + 'fields = ["a", "seq"]\n', 'pipelines[0].fields: "seq" is already seq_field'),
    (PIPELINE + 'data_format = "csv"\nkey_field = "dev"\n',
     'pipelines[0].key_field: "dev" must be one of csv_columns to be read from a CSV line'),
    (PIPELINE + 'ts_field = "x"\n', 'pipelines[0].ts_field: "x" is already x_field'),
    (PIPELINE + 'x_field = ""\n', "pipelines[0].x_field: cannot be empty"),
    (PIPELINE + 'backend = "onnxruntime"\n',
     'pipelines[0].onnx_model: is required with backend = "onnxruntime" (the exported step model)'),
    (PIPELINE + 'onnx_model = "m.onnx"\n',
     'pipelines[0].onnx_model: is only used with backend = "onnxruntime", got backend = "numba"'),
    (PIPELINE + 'backend = "torch"\n', 'pipelines[0].backend: must be "numba" or "onnxruntime", got "torch"'),
    (PIPELINE + 'seq_gap = "skip"\n', 'pipelines[0].seq_gap: must be "ignore" or "reset", got "skip"'),
    (PIPELINE + "idle_reset = -1\n", "pipelines[0].idle_reset: must be >= 0, got -1"),
    (PIPELINE + "warmup_steps = -1\n", "pipelines[0].warmup_steps: must be >= 0, got -1"),
    (PIPELINE + 'warmup_policy = "drop"\n', 'pipelines[0].warmup_policy: must be "mark" or "withhold", got "drop"'),
    (PIPELINE + 'output_format = "raw"\nwarmup_steps = 5\n',
     'pipelines[0].warmup_policy: "mark" adds a "warm" field to JSON predictions; a raw prediction has none: '
     'use warmup_policy = "withhold" or output_format = "json"'),
    (PIPELINE + 'warmup_steps = 5\ny_field = "warm"\n',
     'pipelines[0].y_field: "warm" is where a prediction is marked during warmup_steps: choose another name'),
    (PIPELINE + "idle_reset = nan\n", "pipelines[0].idle_reset: must be a finite number, got nan"),
    (PIPELINE + "reorder_window = -1\n", "pipelines[0].reorder_window: must be from 0 to 100000, got -1"),
    (PIPELINE + "reorder_timeout_ms = 0\n", "pipelines[0].reorder_timeout_ms: must be > 0, got 0"),
    (PIPELINE + 'gap_policy = "fill"\n',
     'pipelines[0].gap_policy: must be "ignore", "hold", "interpolate" or "reset", got "fill"'),
    (PIPELINE + "max_fill = 100001\n", "pipelines[0].max_fill: must be from 0 to 100000, got 100001"),
    (PIPELINE + "input_rate = 0\n", "pipelines[0].input_rate: must be > 0, got 0"),
    (PIPELINE + "publish_filled = 1\n", "pipelines[0].publish_filled: must be true or false, got integer 1"),
    (PIPELINE + "max_streams = 0\n", "pipelines[0].max_streams: must be >= 1, got 0"),
    (PIPELINE + "max_payload_bytes = 0\n", "pipelines[0].max_payload_bytes: must be >= 1, got 0"),
    (PIPELINE + "publish_qos = 3\n", "pipelines[0].publish_qos: must be 0, 1 or 2, got 3"),
    (PIPELINE + "retain = 'yes'\n", 'pipelines[0].retain: must be true or false, got string "yes"'),
    (PIPELINE + "modle = 'm'\n", "pipelines[0].modle: unknown option (did you mean 'model'?)"),
    (PIPELINE + "[state]\nsnapshot_interval = 5.0\n", "state.dir: is required"),
    (PIPELINE + '[state]\ndir = "s"\nsnapshot_interval = 0\n', "state.snapshot_interval: must be > 0, got 0"),
    (PIPELINE + '[state]\ndir = "s"\ndurability = "wal"\n',
     'state.durability: must be "snapshot" or "journal", got "wal"'),
    (PIPELINE + "[daemon]\nmax_batch = 0\n", "daemon.max_batch: must be >= 1, got 0"),
    (PIPELINE + "[daemon]\nmax_undelivered_messages = 0\n", "daemon.max_undelivered_messages: must be from 1 to 65535, got 0"),
    (PIPELINE + "[daemon]\nshutdown_timeout = -1.5\n", "daemon.shutdown_timeout: must be > 0, got -1.5"),
    (PIPELINE + "[daemon]\nmax_undelivered = 5\n",
     "daemon.max_undelivered: unknown option (did you mean 'max_undelivered_messages'?)"),
    (PIPELINE + '[metrics]\nlisten = "localhost"\n',
     'metrics.listen: must be "host:port" (e.g. "127.0.0.1:9100" or ":9100"), got "localhost"'),
    (PIPELINE + '[metrics]\nlisten = "0.0.0.0:99999"\n',
     'metrics.listen: the port must be a number from 0 to 65535, got "0.0.0.0:99999"'),
    (PIPELINE + '[metrics]\nstats_topic = "s/{key}"\n',
     "metrics.stats_topic: publish topic 's/{key}': unknown placeholder {key} (allowed: {client_id})"),
    (PIPELINE + "[metrics]\nstats_interval = 0\n", "metrics.stats_interval: must be > 0, got 0"),
    (PIPELINE + '[log]\nlevel = "trace"\n', 'log.level: must be "debug", "info", "warning" or "error", got "trace"'),
    (PIPELINE + '[log]\nformat = "xml"\n', 'log.format: must be "json" or "text", got "xml"'),
    (PIPELINE + "[log]\nbad_input_interval = -1\n", "log.bad_input_interval: must be >= 0, got -1"),
]


@pytest.mark.parametrize("text, message", ERRORS, ids=[message.split(":")[0] for _, message in ERRORS])
def test_error_messages(here, text, message):
    assert error(text) == "daemon.toml: " + message.replace("{dir}", str(here))


def test_client_certificate_and_key_go_together(here):
    Path("client.pem").write_text("cert")
    assert error('[broker]\ntls_cert = "client.pem"\n' + PIPELINE) == (
        "daemon.toml: broker.tls_cert: needs tls_key too (a client certificate and its key go together)")
    assert error('[broker]\ntls_key = "client.pem"\n' + PIPELINE) == (
        "daemon.toml: broker.tls_key: needs tls_cert too (a client certificate and its key go together)")


def test_config_error_is_a_value_error_and_an_edgernn_error(here):
    with pytest.raises(ConfigError) as info:
        load("[broker]\nport = 0\n" + PIPELINE)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EdgeRNNError)
    assert (info.value.source, info.value.key) == ("daemon.toml", "broker.port")


def test_toml_syntax_error_names_the_line(here):
    message = error('[broker]\nhost = "a"\nport 1883\n')
    assert message.startswith("daemon.toml: ") and "line 3" in message


def test_unreadable_files(here):
    with pytest.raises(ConfigError, match=r"^missing\.toml: cannot read the config file: No such file"):
        load_config("missing.toml")
    Path("adir").mkdir()
    with pytest.raises(ConfigError, match=r"^adir: cannot read the config file"):
        load_config("adir")
    Path("latin1.toml").write_bytes('host = "caf\xe9"'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^latin1\.toml: not valid UTF-8"):
        load_config("latin1.toml")


def test_topics_are_checked_by_the_protocol_module_the_daemon_uses(here):
    """The config refuses exactly what `edgernn.protocol` (and so the daemon) would refuse at start."""
    from edgernn.protocol import TopicFilter, TopicTemplate, key_level

    config = load(PIPELINE.replace('"sensors/+/imu"', '["sensors/+/imu", "plant/+/#"]'))
    for pattern in config.pipelines[0].subscribe:
        key_level(TopicFilter(pattern), config.pipelines[0].key_level)
    TopicTemplate(config.pipelines[0].publish)
    with pytest.raises(ValueError) as protocol_error:
        TopicFilter("a/#/b")
    assert error(PIPELINE.replace('"sensors/+/imu"', '"a/#/b"')) == (
        f"daemon.toml: pipelines[0].subscribe: {protocol_error.value}")


# ---- environment variables -------------------------------------------------------------------------------
def test_environment_variables_are_substituted(here, monkeypatch):
    monkeypatch.setenv("EDGERNN_TEST_HOST", "broker.example")
    monkeypatch.setenv("EDGERNN_TEST_SITE", "plant-4")
    monkeypatch.setenv("EDGERNN_TEST_PASSWORD", SECRET)
    config = load(f"""\
[broker]
host = "${{EDGERNN_TEST_HOST}}"
password = "${{EDGERNN_TEST_PASSWORD}}"
client_id = "edgernn-${{EDGERNN_TEST_SITE}}-$${{literal}}"

[[pipelines]]
name = "imu"
model = "${{EDGERNN_TEST_SITE}}/model.ern"
subscribe = ["${{EDGERNN_TEST_SITE}}/+/imu", "other/+"]
publish = "out/${{EDGERNN_TEST_SITE}}/{{key}}"
""")
    assert config.broker.host == "broker.example"
    assert config.broker.password == SECRET
    assert config.broker.client_id == "edgernn-plant-4-${literal}"
    assert config.pipelines[0].model == here / "plant-4" / "model.ern"
    assert config.pipelines[0].subscribe == ("plant-4/+/imu", "other/+")
    assert config.pipelines[0].publish == "out/plant-4/{key}"


def test_unset_environment_variable_names_the_variable_and_the_key(here, monkeypatch):
    monkeypatch.delenv("EDGERNN_TEST_UNSET", raising=False)
    message = error(PIPELINE.replace('"sensors/+/imu"', '["a/+", "${EDGERNN_TEST_UNSET}/+"]'))
    assert message == "daemon.toml: pipelines[0].subscribe[1]: environment variable EDGERNN_TEST_UNSET is not set"
    assert error('[broker]\nhost = "${BAD NAME}"\n' + PIPELINE) == (
        "daemon.toml: broker.host: '${' must be followed by an environment variable name and '}' "
        "(write $${ for a literal ${)")
    assert error('[broker]\nhost = "${OPEN"\n' + PIPELINE) == (
        "daemon.toml: broker.host: '${' without a closing '}' (write $${ for a literal ${)")


# ---- secrets ---------------------------------------------------------------------------------------------
def test_password_and_username_files(here):
    Path("password").write_text(SECRET + "\n")
    Path("username").write_text("edge-user\r\n")
    config = load('[broker]\nusername_file = "username"\npassword_file = "password"\n' + PIPELINE)
    assert config.broker.username == "edge-user"
    assert config.broker.password == SECRET


def test_secret_file_errors(here):
    Path("password").write_text(SECRET)
    assert error('[broker]\npassword = "x"\npassword_file = "password"\n' + PIPELINE) == (
        "daemon.toml: broker.password_file: give either password or password_file, not both")
    assert error('[broker]\nusername = "u"\nusername_file = "password"\n' + PIPELINE) == (
        "daemon.toml: broker.username_file: give either username or username_file, not both")
    assert error('[broker]\npassword_file = "nope"\n' + PIPELINE) == (
        f"daemon.toml: broker.password_file: cannot read {here / 'nope'}: No such file or directory")
    Path("binary").write_bytes(b"\xff\xfe" + SECRET.encode())
    assert error('[broker]\npassword_file = "binary"\n' + PIPELINE) == (
        f"daemon.toml: broker.password_file: {here / 'binary'} is not valid UTF-8")


def test_secrets_never_appear_in_repr_errors_or_the_redacted_dict(here, monkeypatch):
    monkeypatch.setenv("EDGERNN_TEST_PASSWORD", SECRET)
    config = load('[broker]\nusername = "u"\npassword = "${EDGERNN_TEST_PASSWORD}"\n' + PIPELINE)
    assert config.broker.password == SECRET
    for text in (repr(config), str(config), repr(config.broker)):
        assert SECRET not in text
    plain = redacted(config)
    assert plain["broker"]["password"] == "***" and plain["broker"]["username"] == "u"
    assert SECRET not in json.dumps(plain)  # and it is plain, JSON-ready data
    assert plain["pipelines"][0]["model"] == str(here / "model.ern")
    assert plain["pipelines"][0]["subscribe"] == ["sensors/+/imu"]
    # a config with an error elsewhere does not show the password either
    message = error(f'[broker]\npassword = "{SECRET}"\nport = 0\n' + PIPELINE)
    assert SECRET not in message
    assert error("[broker]\npassword = 12345678\n" + PIPELINE) == (
        "daemon.toml: broker.password: must be a string, got an integer")


def test_redacted_without_password(here):
    assert redacted(load(PIPELINE))["broker"]["password"] is None


@pytest.mark.parametrize("lines, message", [
    ('y_field = "seq"\n', 'pipelines[0].y_field: "seq" is already seq_field'),
    ('y_field = "key"\n', 'pipelines[0].y_field: "key" is where a prediction carries its stream key'),
    ('key_field = "x"\n', 'pipelines[0].key_field: "x" is already x_field'),
])
def test_field_names_that_would_collide_in_a_payload_are_refused(tmp_path, lines, message):
    path = tmp_path / "daemon.toml"
    path.write_text(MINIMAL.replace('qos = 1\n', 'qos = 1\n' + lines))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
