"""The `edgernn` command line. Each subcommand imports what it needs only when it runs.

    edgernn convert SRC -o OUT       PyTorch (state dict, pickled module, TorchScript, package.module:factory),
                                     ONNX or .ern in; an .ern file (--dtype float32|float16|int8) or an ONNX
                                     step model (--to onnx, or OUT ending in .onnx) out; --sample-rate HZ,
                                     --rest-state idle|zeros|FILE.npy, --labels A,B and --model-version V
                                     are stored in the file
    edgernn inspect FILE [--json]    layers, sizes, dtype, checksum, FLOPs per step, streamable or not,
                                     rest state and sample rate
    edgernn verify FILE --reference SRC
                                     the model and its source on the same sequences: max abs / rel error
                                     per output; exit 0 within --tolerance, 1 otherwise
    edgernn stream FILE [--csv IN]   CSV samples in, one prediction per line out (bad lines skipped)
    edgernn compile                  fill Numba's cache now (e.g. at install), not at the first start
    edgernn warmup --config FILE     compile every kernel the configured models need into the config's
                                     compile cache, check that a second process loads them, print the
                                     cold and warm time from process start to first prediction (--json FILE)
    edgernn serve --config FILE      the MQTT daemon: one prediction per message, state kept per stream
                                     (--check: load the config and models, print the config, exit)
    edgernn simulate --devices N --rate HZ --profile imu --broker HOST:PORT --duration S
                                     a fleet of simulated sensor devices publishing over MQTT (--faults,
                                     --replay FILE.csv); a summary at the end or on Ctrl-C (--json)
    edgernn demo [--duration S]      a broker, the daemon and a simulated fleet on this machine, with a
                                     live view of the predictions; a summary at the end or on Ctrl-C
    edgernn doctor --config FILE     checks a device's set-up (models, kernels, cache, state dir, broker,
                                     clocks) and says what to fix
    edgernn top --config FILE        a live view of a running daemon (its metrics endpoint or stats topic)
    edgernn keygen / sign            Ed25519 keys; a model file's signature (MODEL.sig)
    edgernn update MODEL --config FILE --pipeline P
                                     send a signed model to a running daemon over MQTT; says what became of it

Errors are one line on stderr (``edgernn: error: ...``) and exit status 1; usage errors exit 2.
``--debug`` shows tracebacks and debug logs. Stage lines go to stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import EdgeRNNError

PYTORCH_SOURCES = ("a PyTorch state dict (.pt/.pth), a TorchScript file, a pickled module (with --trust-pickle), "
                   "or package.module:factory (with --weights)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="edgernn: %(levelname)s: %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            if not args.debug:  # torch's deprecation and performance notices are not the user's business
                warnings.simplefilter("ignore")
            return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 -- the CLI's contract: one line, no traceback, unless --debug
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, EdgeRNNError | OSError | ValueError):
            message = f"{type(exc).__name__}: {message} (--debug shows where)"
        print(f"edgernn: error: {message}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgernn", description="Streaming inference for recurrent networks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    torch_options = argparse.ArgumentParser(add_help=False)
    group = torch_options.add_argument_group("PyTorch sources")
    group.add_argument("--weights", metavar="FILE", help="state dict loaded into a package.module:factory's module")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow loading pickled Python objects: runs code from the file, only for files you trust")
    group.add_argument("--nonlinearity", choices=("tanh", "relu"),
                       help="an RNN's nonlinearity, which a state dict cannot tell (default tanh)")
    group.add_argument("--head-activations", metavar="ACT,...",
                       help="activation of each dense layer of a state dict, comma-separated (default identity)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = commands.add_parser(
        "convert", parents=[common, torch_options], help="convert a PyTorch or ONNX model to an edgernn file",
        description=f"Convert SRC -- an ONNX model (.onnx), an edgernn file (.ern) or {PYTORCH_SOURCES} -- to an "
                    f"edgernn file or an ONNX step model. Modules are verified against the source as they are "
                    f"converted.")
    convert.add_argument("source", metavar="SRC", help="the model to convert (see above)")
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    convert.add_argument("--dtype", choices=("float32", "float16", "int8"), default="float32",
                         help="how an .ern file stores the weights (default float32)")
    convert.add_argument("--to", choices=("ern", "onnx"),
                         help="output format (default: onnx when OUT ends in .onnx, else ern)")
    convert.add_argument("--no-verify", action="store_true", help="do not run a module source to check the result")
    convert.add_argument("--sample-rate", type=_positive_float, metavar="HZ",
                         help="samples per second the model was trained at, stored in the file (default: not set)")
    convert.add_argument("--labels", type=_labels_option, metavar="A,B,...",
                         help="a classifier's class names, one per output, stored in the file (Home Assistant "
                              "shows the top class by name)")
    convert.add_argument("--model-version", metavar="VERSION",
                         help="the model's version, dotted numbers (3, 1.4.2), stored in the file: a signed update "
                              "over MQTT must carry a newer one")
    convert.add_argument("--rest-state", type=_rest_state_option, metavar="idle|zeros|FILE.npy",
                         help="the state every stream starts from: idle (where the state settles under a constant "
                              "idle input: the training mean, or zeros), FILE.npy (the final state after a (T, "
                              "input_size) calibration sequence, or a (state_size,) state as is) or zeros "
                              "(default: the source's trained initial state, e.g. h0/c0, else zeros)")
    convert.set_defaults(run=_convert, parser=convert)

    inspect = commands.add_parser("inspect", parents=[common], help="describe an edgernn file")
    inspect.add_argument("file", metavar="FILE", help="an .ern file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser(
        "verify", parents=[common, torch_options], help="compare an edgernn file with the model it came from",
        description="Run FILE and its reference on the same sequences (seeded random ones and --input files), "
                    "whole sequences and one sample at a time; print the max abs and rel error per output. "
                    "An output passes when its max abs error <= tolerance * max(1, max |reference|). "
                    "Exit status 0 when every output passes, 1 otherwise.")
    verify.add_argument("file", metavar="FILE", help="the .ern file to check")
    verify.add_argument("--reference", required=True, metavar="SRC",
                        help=f"an ONNX model (run by onnxruntime) or {PYTORCH_SOURCES} (run by PyTorch)")
    verify.add_argument("--input", action="append", default=[], metavar="FILE",
                        help=".npy ((T, I) or (N, T, I)) or .csv (one sample a line) sequences; repeatable")
    verify.add_argument("--steps", type=_positive_int, default=200, help="steps per random sequence (default 200)")
    verify.add_argument("--sequences", type=_non_negative_int, default=4, help="random sequences (default 4)")
    verify.add_argument("--tolerance", type=float, default=1e-5, help="allowed error (default 1e-5)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random sequences (default 0)")
    verify.set_defaults(run=_verify, parser=verify)

    stream = commands.add_parser("stream", parents=[common],
                                 help="step a model over CSV samples, one output line per input line")
    stream.add_argument("file")
    stream.add_argument("--csv", default="-", help="input CSV file, one sample per line (default stdin)")
    stream.set_defaults(run=_stream)

    serve = commands.add_parser(
        "serve", parents=[common], help="run the MQTT daemon",
        description="Subscribe to sensor topics, advance each stream's state one sample per message and publish "
                    "a prediction per message. Logs go to stdout (JSON lines by default). SIGTERM drains and "
                    "snapshots; SIGHUP reloads the models.")
    serve.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config")
    serve.add_argument("--check", action="store_true",
                       help="load the config and every model, print the config (secrets hidden) and exit")
    serve.set_defaults(run=_serve)

    simulate = commands.add_parser(
        "simulate", parents=[common], help="run a fleet of simulated sensor devices",
        description="Simulated sensor devices that publish over MQTT like real firmware: each its own client id "
                    "and last will (devices/<id>/status), a seq and ts per sample, a store-and-forward buffer while "
                    "offline. All from one thread. Runs for --duration seconds or until Ctrl-C, then prints a "
                    "summary. Exits 1 when no device could connect or messages were left undelivered.")
    simulate.add_argument("--devices", type=_positive_int, metavar="N", help="devices (default 10)")
    simulate.add_argument("--rate", type=_positive_float, metavar="HZ",
                          help="samples per second per device (default: the profile's own -- imu 50, vibration "
                               "200, temperature 1; a replayed file's timestamps)")
    simulate.add_argument("--profile", default="imu",
                          help="imu, vibration or temperature (default imu); also the {profile} of the topic")
    simulate.add_argument("--broker", type=_broker_address, default=("127.0.0.1", 1883), metavar="HOST:PORT",
                          help="the MQTT broker (default 127.0.0.1:1883)")
    simulate.add_argument("--duration", type=_positive_float, metavar="S",
                          help="seconds to run (default: until Ctrl-C, or a replayed file's end)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of signals, faults and jitter (default 0)")
    simulate.add_argument("--faults", type=_faults, default=None, metavar="SPEC",
                          help="e.g. drop=0.01,duplicate=0.01,reorder=0.01,nan=0.005,stuck=0.001,malformed=0.005,"
                               "storm_every=20 (also storm_fraction, storm_downtime, stuck_run)")
    simulate.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the samples (default 1)")
    simulate.add_argument("--topic", default="sensors/{device}/{profile}", metavar="TEMPLATE",
                          help="publish topic, {device} and {profile} filled in (default sensors/{device}/{profile})")
    simulate.add_argument("--replay", metavar="FILE.csv",
                          help="replay a CSV file as one device: a header row of channel names, optional ts and "
                               "label columns; at the file's timestamps, or at --rate")
    simulate.add_argument("--id-prefix", default="dev", metavar="PREFIX", help="device ids PREFIX0000... (default dev)")
    simulate.add_argument("--buffer", type=_positive_int, default=1000, metavar="N",
                          help="readings each device keeps while offline (default 1000; the oldest go first)")
    simulate.add_argument("--connect-timeout", type=_positive_float, default=5.0, metavar="S",
                          help="seconds one connection attempt may take; a broker that drops attempts backs "
                               "off the whole fleet (default 5)")
    simulate.add_argument("--drain-timeout", type=_positive_float, default=10.0, metavar="S",
                          help="seconds to deliver what is buffered after the run or Ctrl-C (default 10)")
    simulate.add_argument("--labels", action="store_true",
                          help="put each sample's true label in its payload (\"label\"), for scoring predictions")
    simulate.add_argument("--json", action="store_true", help="print the summary as JSON")
    simulate.set_defaults(run=_simulate, parser=simulate)

    demo = commands.add_parser(
        "demo", parents=[common], help="the whole pipeline on this machine, watched live",
        description="Start a broker (a local Mosquitto, else an embedded amqtt; or --broker), `edgernn serve` with "
                    "the bundled IMU activity classifier (or --model) and a simulated fleet of wearables, and show "
                    "per device the true activity, the predicted one, messages/s and a running accuracy.")
    demo.add_argument("--duration", type=_positive_float, default=60.0, metavar="S",
                      help="seconds the fleet runs (default 60); Ctrl-C stops sooner")
    demo.add_argument("--devices", type=_positive_int, default=8, metavar="N", help="simulated devices (default 8)")
    demo.add_argument("--rate", type=_positive_float, default=50.0, metavar="HZ", help="samples/s per device (default 50)")
    demo.add_argument("--seed", type=int, default=1,
                      help="seed of the simulated fleet (default 1: devices the bundled model was not trained on)")
    demo.add_argument("--broker", type=_broker_address, metavar="HOST:PORT", help="use this broker instead of starting one")
    demo.add_argument("--broker-kind", choices=("auto", "mosquitto", "amqtt"), default="auto",
                      help="which local broker to start (default auto: Mosquitto when installed, else amqtt)")
    demo.add_argument("--model", metavar="FILE", help="an .ern classifier of the imu profile (default: the bundled one)")
    demo.add_argument("--headless", action="store_true", help="plain progress lines instead of the live view")
    demo.add_argument("--json", metavar="FILE", help="also write the summary to FILE as JSON")
    demo.add_argument("--screenshot", metavar="FILE.svg", help="save the view's last frame as an SVG picture")
    demo.set_defaults(run=_demo)

    compile_ = commands.add_parser("compile", parents=[common],
                                   help="compile the kernels into Numba's cache (one time, any model)")
    compile_.set_defaults(run=_compile)

    warmup = commands.add_parser(
        "warmup", parents=[common], help="fill the daemon's compile cache for its configured models, and check it",
        description="In a fresh process with the config's compile cache, load every configured model and step it "
                    "once (as `edgernn serve` does before it serves); if that compiled anything, a second "
                    "process must load everything from the cache. Prints each process's time from its start to "
                    "the first prediction; exit 1 if the cache does not work.")
    warmup.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config")
    warmup.add_argument("--json", metavar="FILE", help="also write the times and compile counts to FILE as JSON")
    warmup.set_defaults(run=_warmup)

    keygen = commands.add_parser(
        "keygen", parents=[common], help="make an Ed25519 key pair for signing model files",
        description="Writes NAME.key (the private key, PEM PKCS#8, readable by its owner only; never over an "
                    "existing file) and NAME.pub (the public key, PEM) into DIR; prints the key id. The daemon "
                    "trusts the .pub files listed in [signing] trusted_keys.")
    keygen.add_argument("--out", default=".", metavar="DIR", help="where to write them (default %(default)s)")
    keygen.add_argument("--name", default="edgernn", help="the files' name (default %(default)s)")
    keygen.set_defaults(run=_keygen)

    sign = commands.add_parser(
        "sign", parents=[common], help="sign a model file, or check a signature (--check)",
        description="Writes FILE.sig, an Ed25519 signature of FILE's content by the private key KEY. With "
                    "--check, verifies FILE against FILE.sig and the public key(s) given instead (exit 1 if not).")
    sign.add_argument("file", metavar="FILE", help="the model file (.ern, or an ONNX step model)")
    sign.add_argument("--key", required=True, action="append", metavar="KEY",
                      help="the private key (signing), or a trusted public key (--check; repeatable)")
    sign.add_argument("--check", action="store_true", help="verify instead of sign")
    sign.set_defaults(run=_sign)

    doctor = commands.add_parser(
        "doctor", parents=[common], help="check this device's set-up and say what to fix",
        description="Checks, for the daemon's config: the config and its models, numba (or the NumPy fallback), "
                    "the compile cache (writable, warm), the state directory (writable, filesystem, free space), "
                    "the broker (reachable with the configured TLS and credentials, as a client of its own), the "
                    "devices' clocks against this one (the ts of samples seen on the pipelines' topics) and this "
                    "machine's NTP synchronisation. Exit 1 if anything fails.")
    doctor.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config")
    doctor.add_argument("--listen", type=float, default=3.0, metavar="SECONDS",
                        help="how long to watch the pipelines' topics for device timestamps; 0 skips it "
                             "(default %(default)s)")
    doctor.add_argument("--json", action="store_true", help="the findings as JSON lines")
    doctor.set_defaults(run=_doctor)

    top = commands.add_parser(
        "top", parents=[common], help="a live view of a running daemon",
        description="Streams, messages/s in and out, rejects by reason, queue, step and end-to-end latency and the "
                    "models served, read from the daemon's metrics endpoint ([metrics] listen, or --url) or else "
                    "its retained stats topic ([metrics] stats_topic). docs/live-view.md shows a screen.")
    top.add_argument("--config", metavar="FILE", help="the daemon's TOML config (where to read it from)")
    top.add_argument("--url", metavar="URL", help="the metrics endpoint, e.g. http://pi.local:9108/metrics")
    top.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                     help="seconds between two reads (default %(default)s)")
    top.add_argument("--once", action="store_true", help="print one frame (two reads apart) and exit")
    top.set_defaults(run=_top, parser=top)

    update = commands.add_parser(
        "update", parents=[common], help="send a signed model to a running daemon over MQTT",
        description="Publishes MODEL (signed: MODEL.sig, from `edgernn sign`) as an update of one pipeline of the "
                    "daemon whose config is given, on its [updates] topic, and waits for what became of it "
                    "(installed, in shadow, or refused and why). Exit 0 unless refused.")
    update.add_argument("model", metavar="MODEL", help="the signed .ern file")
    update.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config")
    update.add_argument("--pipeline", required=True, help="the pipeline to update")
    update.add_argument("--local", action="store_true",
                        help="send only the file's path: the daemon reads it (it must be under [updates] allow_paths)")
    update.add_argument("--chunk-size", type=int, default=256 << 10, metavar="BYTES",
                        help="bytes per MQTT message (default %(default)s)")
    update.add_argument("--wait", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the daemon's answer (default %(default)s)")
    update.set_defaults(run=_update)

    cluster = commands.add_parser("cluster", help="scale-out over a NATS cluster (docs/scale-out.md)")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    nats_config = cluster_commands.add_parser(
        "config", parents=[common], help="write the nats-server config of each node",
        description="The nats-server config of each node: JetStream, an MQTT listener with replicated sessions, "
                    "routes to the other nodes, and the subject mappings that put each device topic of the "
                    "daemon's pipelines into one of N partitions (workers subscribe to part/<p>/<filter>).")
    nats_config.add_argument("--config", required=True, metavar="FILE", help="the daemon's TOML config (its pipelines)")
    nats_config.add_argument("--partitions", required=True, type=_positive_int, metavar="N",
                             help="how many partitions the device topics are spread over")
    nats_config.add_argument("--node", action="append", required=True, dest="nodes", metavar="NAME=HOST[:PORTS]",
                             help="a cluster node, NAME=HOST[:CLIENT[:CLUSTER[:MQTT[:HTTP]]]] (ports default to "
                                  "4222, 6222, 1883, 8222); once per node")
    nats_config.add_argument("--store-dir", default="/var/lib/nats-server/{node}", metavar="DIR",
                             help="JetStream's directory; {node} is the node's name (default %(default)s)")
    nats_config.add_argument("--ack-wait", default="10s", metavar="DURATION",
                             help="how long an unacked QoS 1 message waits before it is sent again (default %(default)s)")
    nats_config.add_argument("--max-ack-pending", type=_positive_int, default=8192, metavar="N",
                             help="unacked QoS 1 messages per session; above a partition's msg/s x the workers' "
                                  "checkpoint_interval (default %(default)s)")
    nats_config.add_argument("--out", metavar="DIR", help="write NAME.conf per node into DIR (default: print them)")
    nats_config.set_defaults(run=_cluster_config)
    status = cluster_commands.add_parser(
        "status", parents=[common], help="who serves which partition, and each partition's lag",
        description="Reads the [cluster] of the daemon's config: for each partition the worker holding its lease "
                    "(since when, last renewal, checkpoints), and its lag: messages NATS holds for it that are not "
                    "acked yet (waiting, or delivered and awaiting the next checkpoint).")
    status.add_argument("--config", required=True, metavar="FILE", help="a worker's TOML config (its [cluster])")
    status.add_argument("--json", action="store_true", help="one JSON object per partition instead of a table")
    status.set_defaults(run=_cluster_status)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    import math

    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _labels_option(text: str) -> tuple[str, ...]:
    return tuple(label.strip() for label in text.split(","))


def _rest_state_option(text: str) -> str:
    if text in ("idle", "zeros") or text.lower().endswith(".npy"):
        return text
    raise argparse.ArgumentTypeError(f"must be idle, zeros or a .npy file, got {text!r}")


def _broker_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (port 1883) or ``[IPv6]:PORT`` -> (host, port)."""
    host, port = text, "1883"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"must be HOST:PORT or [IPv6]:PORT, got {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (port 1-65535), got {text!r}")
    return host, int(port)


def _faults(text: str):
    from .firmware_sim.faults import Faults

    try:
        return Faults.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stage(message: str) -> None:
    """Progress for a person watching: stderr, only when it is a terminal (never in pipes and tests)."""
    if sys.stderr.isatty():
        print(f"edgernn: {message}", file=sys.stderr, flush=True)


def _is_onnx(source: str) -> bool:
    return source.lower().endswith(".onnx")


def _torch_options(args) -> dict:
    activations = [name.strip() for name in args.head_activations.split(",")] if args.head_activations else None
    return dict(weights=args.weights, trust_pickle=args.trust_pickle, nonlinearity=args.nonlinearity,
                head_activations=activations)


def _refuse_torch_options(args, source: str, kind: str = "an ONNX model") -> None:
    given = [flag for flag, value in (("--weights", args.weights), ("--trust-pickle", args.trust_pickle),
                                      ("--nonlinearity", args.nonlinearity),
                                      ("--head-activations", args.head_activations)) if value]
    if given:
        args.parser.error(f"{', '.join(given)} apply to PyTorch sources; {source} is {kind}")


def _from_onnx():
    """The ONNX importer, looked up when needed (it brings onnx, and it may be missing from a build)."""
    from . import converters

    function = getattr(converters, "from_onnx", None)
    if function is None:
        try:
            from .converters.onnx_import import from_onnx as function
        except ImportError as exc:
            raise EdgeRNNError(f"ONNX import is not available in this edgernn ({exc})") from None
    return function


# ---- convert ----------------------------------------------------------------------------------------


def _convert(args) -> None:
    to = args.to or ("onnx" if _is_onnx(args.output) else "ern")
    if to == "onnx" and args.dtype != "float32":
        args.parser.error(f"--dtype {args.dtype} applies to .ern files; an ONNX step model holds float32")
    _stage(f"loading {args.source}")
    if _is_onnx(args.source):
        _refuse_torch_options(args, args.source, "an ONNX model")
        model = _from_onnx()(args.source)
    elif args.source.lower().endswith(".ern"):  # re-store (another dtype) or export an edgernn file
        _refuse_torch_options(args, args.source, "an edgernn file")
        from .format import load

        model = load(args.source)
    else:
        from .converters.torch import from_torch

        if not args.no_verify:
            _stage("converting, and running the source to verify the conversion")
        model = from_torch(args.source, verify=not args.no_verify, **_torch_options(args))
    model, notes = _annotate(args, model)
    _stage(f"writing {args.output}")
    from .summary import one_line

    if to == "onnx":
        from .converters import to_onnx

        to_onnx(model, args.output)
        size = Path(args.output).stat().st_size
        print(f"wrote {args.output}: ONNX step model of {one_line(model.spec)}; "
              f"{model.spec.parameter_count():,} parameters, {size:,} bytes")
        return
    from .format import read_tensor_file, save

    save(model, args.output, dtype=args.dtype)
    metadata, _ = read_tensor_file(args.output)
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output}: {one_line(model.spec)}; {model.spec.parameter_count():,} parameters, "
          f"{args.dtype}, {size:,} bytes, {metadata['checksum'][:19]}")
    for line in notes:
        print(line)


def _annotate(args, model):
    """Apply --sample-rate and --rest-state -> (the model, lines to print after the summary)."""
    import dataclasses

    from .model import Model
    from .summary import rest_state_text, sample_rate_text

    notes = []
    if args.sample_rate is not None:
        model = Model(dataclasses.replace(model.spec, sample_rate=args.sample_rate), model.weights)
        notes.append(f"sample rate: {sample_rate_text(model.spec)}")
    for field in ("labels", "model_version"):
        value = getattr(args, field)
        if value is not None:
            model = Model(dataclasses.replace(model.spec, **{field: value}), model.weights)  # SpecError names it
            notes.append(f"{field.replace('_', ' ')}: {', '.join(value) if field == 'labels' else value}")
    replaced = model.spec.rest_state == "trained" and args.rest_state is not None
    if args.rest_state is not None:
        model = _with_rest_state_option(model, args.rest_state)
    if args.rest_state is not None or model.spec.rest_state != "zeros":
        notes.append(f"rest state: {rest_state_text(model.spec)}"
                     + ("; replaces the source's trained initial state" if replaced else ""))
    return model, notes


def _with_rest_state_option(model, option: str):
    """``--rest-state idle|zeros|FILE.npy`` -> the model with that rest state; errors name the option."""
    from . import rest_state

    _stage(f"computing the rest state ({option})")
    try:
        if option == "zeros":
            return rest_state.with_rest_state(model, None, "zeros")
        if option == "idle":
            settled = rest_state.settle(model)
            return rest_state.with_rest_state(model, settled.state, "idle", settled.note)
        state, origin, note = rest_state.read_npy(option, model)
        return rest_state.with_rest_state(model, state, origin, note)
    except EdgeRNNError as exc:
        raise EdgeRNNError(f"--rest-state {option}: {exc}") from None


# ---- inspect ----------------------------------------------------------------------------------------


def _inspect(args) -> None:
    from .summary import render, summarize

    summary, spec = summarize(args.file)
    print(json.dumps(summary, indent=2) if args.json else render(summary, spec))


# ---- verify -----------------------------------------------------------------------------------------


def _verify(args) -> int:
    import math

    from .format import load
    from .verify import compare, onnx_reference, pytorch_reference, random_sequences, read_inputs

    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        args.parser.error(f"--tolerance must be a non-negative number, got {args.tolerance}")
    if args.sequences == 0 and not args.input:
        args.parser.error("nothing to compare: --sequences 0 and no --input")
    model = load(args.file)
    _stage(f"loading the reference {args.reference}")
    if _is_onnx(args.reference):
        _refuse_torch_options(args, args.reference)
        reference = onnx_reference(args.reference, model.input_size)
    else:
        reference = pytorch_reference(args.reference, seed=args.seed, **_torch_options(args))
    steps = args.steps
    if reference.steps and reference.steps != steps:
        print(f"note: the reference takes exactly {reference.steps} steps; random sequences have that length")
        steps = reference.steps
    sequences = random_sequences(args.sequences, steps, model.input_size, args.seed)
    for path in args.input:
        sequences += read_inputs(path, model.input_size)
    if reference.steps:
        for label, xs in sequences:
            if len(xs) != reference.steps:
                raise EdgeRNNError(f"{label}: {len(xs)} steps, but the reference takes exactly {reference.steps}")

    def progress(index, count, label):
        _stage(f"sequence {index + 1}/{count}: {label}")

    result = compare(model, reference, sequences, args.tolerance, progress)
    _report(args, reference, sequences, result, model)
    return 0 if result.passed else 1


def _report(args, reference, sequences, result, model) -> None:
    import numpy as np

    shown = 16
    print(f"model:      {args.file}")
    print(f"reference:  {reference.description}")
    print(f"sequences:  {result.sequences} ({result.steps:,} steps: "
          + ", ".join(f"{label} x{len(xs)}" for label, xs in sequences[:4])
          + (", ..." if len(sequences) > 4 else "") + f"; seed {args.seed})")
    print(f"{'output':<10}{'max abs err':>14}{'max rel err':>14}{'limit':>12}")
    order = list(range(result.outputs))
    if result.outputs > shown:  # the worst ones, by how close they come to their limit
        order = sorted(order, key=lambda o: -np.nan_to_num(result.abs_err[o] / result.limit[o], nan=np.inf))[:shown]
        order.sort()
    rel = result.rel(result.abs_err)
    for o in order:
        print(f"{f'y[{o}]':<10}{result.abs_err[o]:>14.3g}{rel[o]:>14.3g}{result.limit[o]:>12.3g}")
    if result.outputs > shown:
        print(f"... {result.outputs - shown} more outputs within the worst shown")
    print(f"{'overall':<10}{np.max(result.abs_err):>14.3g}{np.max(rel):>14.3g}")
    if result.stream_err is None:
        blocking = next(i for i, layer in enumerate(model.spec.layers) if layer.direction != "forward")
        print(f"streaming:  skipped: layer {blocking} is {model.spec.layers[blocking].direction}; the model runs "
              f"whole sequences only")
    else:
        stream_rel = result.rel(result.stream_err)
        print(f"streaming:  Model.step one sample at a time: max abs err {np.max(result.stream_err):.3g}, "
              f"max rel err {np.max(stream_rel):.3g}")
    if result.passed:
        print(f"PASS: every output within tolerance {args.tolerance:g}")
    else:
        names = ", ".join(f"y[{o}]" for o in result.failures[:8]) + (", ..." if len(result.failures) > 8 else "")
        print(f"FAIL: {len(result.failures)} of {result.outputs} outputs exceed tolerance {args.tolerance:g}: {names}")


# ---- stream / compile -------------------------------------------------------------------------------


def _stream(args) -> int:
    import numpy as np

    from .format import load

    model = load(args.file)
    state = model.new_state()
    source = sys.stdin if args.csv == "-" else open(args.csv, encoding="utf-8")
    rejected = 0
    with source:
        for number, line in enumerate(source, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                x = np.array([float(field) for field in line.split(",")], np.float32)
                y = model.step(x, state)
            except (ValueError, EdgeRNNError) as exc:  # a bad line is skipped; the state is untouched
                rejected += 1
                print(f"edgernn stream: line {number} skipped: {exc}", file=sys.stderr)
                continue
            print(",".join(f"{value:.6g}" for value in y), flush=True)
    return 1 if rejected else 0


def _serve(args) -> int:
    from edgernn.runtime.config import load_config, redacted

    config = load_config(args.config)
    cache_origin = _use_compile_cache(config)  # before the daemon's modules import numba, which reads it once
    from edgernn.runtime.daemon import Daemon, check
    from edgernn.runtime.logs import setup_logging

    if args.check:
        print(json.dumps(redacted(config), indent=2, default=str))
        for line in check(config):
            print(f"edgernn: {line}", file=sys.stderr)  # stdout stays the config, as JSON
        print(f"edgernn: {_compile_cache_line(cache_origin)}", file=sys.stderr)
        return 0
    setup_logging("debug" if args.debug else config.log.level, config.log.format)
    logging.getLogger("edgernn").propagate = False  # one line per event: not again through main's stderr handler
    logging.getLogger("edgernn.runtime").info("config loaded from %s", args.config,
                                              extra={"event": "config", "config": redacted(config)})
    if config.cluster is not None:
        from edgernn.runtime.cluster import ClusterWorker

        return ClusterWorker(config).run()
    return Daemon(config).run()


def _simulate(args) -> int:
    """Run the fleet in its thread; this one waits, so Ctrl-C (or SIGTERM) stops it cleanly with a summary."""
    import signal
    import time

    from .firmware_sim.fleet import Fleet
    from .firmware_sim.replay import replay_fleet

    host, port = args.broker
    options = dict(host=host, port=port, seed=args.seed, faults=args.faults, qos=args.qos, topic=args.topic,
                   buffer=args.buffer, id_prefix=args.id_prefix, labels=args.labels,
                   connect_timeout=args.connect_timeout, drain_timeout=args.drain_timeout)
    if args.replay:
        if args.devices not in (None, 1):
            args.parser.error("--replay runs one device: leave out --devices")
        fleet = replay_fleet(args.replay, rate_hz=args.rate, profile=args.profile, **options)
    else:
        fleet = Fleet(args.profile, args.devices or 10, args.rate, **options)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    interrupted = False
    started = time.monotonic()
    try:
        fleet.start(args.duration)
        _stage(f"{len(fleet.devices)} devices publishing to {host}:{port}; Ctrl-C stops")
        while not fleet.wait(0.2):
            pass
    except KeyboardInterrupt:
        interrupted = True
        _stage("stopping: publishing what is buffered")
    finally:
        signal.signal(signal.SIGTERM, previous)
    stats = fleet.stop()
    stats["interrupted"] = interrupted
    stats["wall_s"] = round(time.monotonic() - started, 3)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(_simulation_summary(stats, host, port))
    failure = _simulation_failure(stats, host, port)
    if failure:
        print(f"edgernn: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _simulation_failure(stats: dict, host: str, port: int) -> str | None:
    """Why the run delivered nothing, or not everything (None when it delivered all it sampled)."""
    if not stats["connects"]:
        reason = f" ({stats['last_connect_error']})" if stats["last_connect_error"] else ""
        return f"no device could connect to {host}:{port}{reason}"
    undelivered = stats["buffered"] + stats["in_flight"]
    if undelivered:
        return (f"{undelivered:,} messages not delivered to {host}:{port} after draining (still buffered "
                f"{stats['buffered']:,}, unacknowledged {stats['in_flight']:,})")
    return None


def _demo(args) -> int:
    from .demo import run
    return run(args)


def _simulation_summary(stats: dict, host: str, port: int) -> str:
    rate = f"{stats['rate_hz']:g} Hz" if stats["rate_hz"] else "the file's timestamps"
    faults = ", ".join(f"{name} {count}" for name, count in stats["faults"].items() if count) or "none"
    lag = stats["lag"]
    lines = [
        f"simulated {stats['devices']} {stats['profile']} devices at {rate} for {stats['elapsed_s']:g} s "
        f"(QoS {stats['qos']}, broker {host}:{port}){' -- interrupted' if stats['interrupted'] else ''}",
        f"samples:   {stats['samples']:,} of {stats['expected_samples']:,} due"
        + (f" ({stats['achieved_rate_hz']:g} Hz per device)" if stats["achieved_rate_hz"] else ""),
        f"published: {stats['published']:,} (acknowledged {stats['acked']:,}); still buffered {stats['buffered']:,}, "
        f"lost to full buffers {stats['dropped_by_buffer']:,}",
        f"faults:    {faults}",
        f"network:   {stats['connects']} connects, {stats['disconnects']} connections lost, {stats['storms']} storms"
        + (f" ({stats['storm_victims_offline']} devices drawn were offline already)"
           if stats["storm_victims_offline"] else ""),
        f"lag:       max {lag['max_ms']:g} ms, p99 <= {lag['p99_ms_at_most']} ms, {lag['late_samples']:,} samples "
        f"late by more than a period",
    ]
    return "\n".join(lines)


def _compile(args) -> None:
    """The kernels are generic over models, so compiling them once with a tiny model serves every model."""
    import time

    import numpy as np

    from .jit import KERNELS, NUMBA_AVAILABLE
    from .model import PARALLEL_MIN_STREAMS, Model
    from .spec import ModelSpec, RecurrentLayer

    if not NUMBA_AVAILABLE:
        print(f"nothing to compile: the kernels are {KERNELS}")
        return
    start = time.perf_counter()
    spec = ModelSpec(1, (RecurrentLayer("lstm", 1, 1),))
    model = Model(spec, {name: np.zeros(shape, np.float32) for name, shape in spec.tensor_shapes().items()})
    model.run(np.zeros((1, 1), np.float32), model.new_state())
    for streams in (1, PARALLEL_MIN_STREAMS):
        model.step_batch(model.new_state(batch=streams), np.arange(streams), np.zeros((streams, 1), np.float32))
    spec = ModelSpec(1, (RecurrentLayer("rnn", 1, 1, direction="bidirectional"),))  # whole-sequence kernel
    model = Model(spec, {name: np.zeros(shape, np.float32) for name, shape in spec.tensor_shapes().items()})
    model.run(np.zeros((1, 1), np.float32), model.new_state())
    print(f"kernels compiled and cached in {time.perf_counter() - start:.1f} s")


def _use_compile_cache(config) -> str:
    """Set NUMBA_CACHE_DIR from the config (runtime/compile_cache.py says which wins) before numba loads;
    returns where the directory came from, in words."""
    from edgernn.runtime.compile_cache import use_compile_cache

    return use_compile_cache(config.state)[1]


def _compile_cache_line(origin: str) -> str:
    """Where this process's Numba really caches kernels (read back from numba), and why there."""
    from edgernn.runtime.compile_cache import numba_cache_in_use

    in_use = numba_cache_in_use()
    if in_use is None:
        return "compile cache: not used (the NumPy kernels run: nothing to compile)"
    return f"compile cache: {in_use} ({origin})"


def _cluster_config(args) -> int:
    from pathlib import Path

    from edgernn.runtime.config import load_config
    from edgernn.runtime.nats_config import Node, pipeline_mappings, server_config

    nodes = [Node.parse(text) for text in args.nodes]
    mappings = pipeline_mappings(load_config(args.config).pipelines, args.partitions)
    for node in nodes:
        text = server_config(node, nodes, mappings, args.store_dir.replace("{node}", node.name), ack_wait=args.ack_wait,
                             max_ack_pending=args.max_ack_pending)
        if args.out:
            path = Path(args.out) / f"{node.name}.conf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        else:
            print(text)
    return 0


def _keygen(args) -> int:
    from pathlib import Path

    from .signing import generate_keys

    directory = Path(args.out)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{args.name}.key", directory / f"{args.name}.pub"
    if private.exists():
        print(f"edgernn keygen: {private} exists: not overwritten", file=sys.stderr)
        return 1
    key_id = generate_keys(private, public)
    print(f"wrote {private} (private: keep it off the devices) and {public}; key id {key_id}")
    return 0


def _sign(args) -> int:
    from .signing import load_public_key, sign_file, verify_file

    if args.check:
        key_id = verify_file(args.file, [load_public_key(path) for path in args.key])
        print(f"{args.file}: signature valid, by key {key_id}")
        return 0
    if len(args.key) != 1:
        args.parser.error("signing takes one --key (the private key)")
    print(f"wrote {sign_file(args.file, args.key[0])}")
    return 0


def _top(args) -> int:
    from edgernn.runtime.top import run_top, source_for

    if args.url is None and args.config is None:
        args.parser.error("give --config FILE (the daemon's) or --url URL (its metrics endpoint)")
    config = None
    if args.config is not None:
        from edgernn.runtime.config import load_config

        config = load_config(args.config)
    return run_top(args.url or source_for(config), interval=args.interval, once=args.once, config=config)


def _update(args) -> int:
    from edgernn.runtime.config import load_config
    from edgernn.runtime.updates import send_update

    event, failure = send_update(load_config(args.config), args.pipeline, args.model, local=args.local,
                                 chunk_size=args.chunk_size, wait=args.wait)
    if event is None:
        print(f"edgernn: error: the update got no answer: {failure}", file=sys.stderr)
        return 1
    print(json.dumps(event))
    return 0 if event["event"] in ("installed", "shadow_started", "promoted") else 1


def _doctor(args) -> int:
    from edgernn.runtime.config import ConfigError, load_config

    try:
        origin = _use_compile_cache(load_config(args.config))  # the daemon's cache, before numba loads
    except ConfigError:
        origin = None  # run_checks reports it
    from edgernn.runtime.doctor import FAIL, report, run_checks

    findings = run_checks(args.config, listen=args.listen, cache_origin=origin)
    if args.json:
        for finding in findings:
            print(json.dumps(finding.as_dict()))
    else:
        print(report(findings))
    return 1 if any(f.status == FAIL for f in findings) else 0


def _cluster_status(args) -> int:
    from edgernn.runtime.config import load_config

    config = load_config(args.config)
    if config.cluster is None:
        print(f"edgernn: {args.config}: has no [cluster] section", file=sys.stderr)
        return 2
    from edgernn.runtime.cluster import cluster_status

    rows = cluster_status(config)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'partition':>9}  {'worker':<20} {'renewed':>8} {'lag':>7} {'streams':>8} {'checkpoints':>11} {'ms':>6}")
    for row in rows:
        renewed = "-" if row["worker"] is None else f"{row['renewed_ago']:g} s"
        print(f"{row['partition']:>9}  {row['worker'] or '(free)':<20} {renewed:>8} {_dash(row['lag']):>7} "
              f"{_dash(row.get('streams')):>8} {_dash(row.get('checkpoints')):>11} {_dash(row.get('checkpoint_ms')):>6}")
    return 0


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _warmup(args) -> int:
    from edgernn.runtime.config import load_config

    config = load_config(args.config)
    from edgernn.jit import KERNELS, NUMBA_AVAILABLE  # the children get the compile cache in their environment
    from edgernn.runtime.warmup import warm_up

    if not NUMBA_AVAILABLE:
        print(f"nothing to compile: the kernels are {KERNELS}")
        return 0
    result = warm_up(config)
    print(f"compile cache: {result.cache_dir} ({result.origin})")
    for label, run in zip(("first", "second"), result.runs):
        what = (f"loaded {run.loaded} kernel(s) from the cache, compiled none" if run.warm
                else f"compiled {run.compiled} kernel(s)")
        print(f"{label} process ({'warm' if run.warm else 'cold'}): {run.first_prediction:.2f} s from process start "
              f"to the first prediction ({run.cpu_to_first_prediction:.2f} s CPU), {run.total:.2f} s in all ({what})")
    if result.runs[0].loaded == result.runs[0].compiled == 0:
        print("no Numba kernels needed: every pipeline runs on onnxruntime")
    elif result.runs[0].warm:
        print("the cache was warm already: nothing compiled")
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
