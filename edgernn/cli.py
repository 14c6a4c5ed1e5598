"""The `edgernn` command line. Each subcommand imports what it needs only when it runs.

    edgernn convert SRC -o OUT.ern [--dtype float32|float16|int8]   PyTorch checkpoint -> compact file
    edgernn inspect FILE                                            layers, sizes, dtype, checksum
    edgernn stream FILE [--csv IN]      CSV samples in, one prediction per line out (bad lines skipped)
    edgernn compile                     fill Numba's cache now (e.g. at install), not at the first start

Errors are one line on stderr and exit status 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import EdgeRNNError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (EdgeRNNError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"edgernn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgernn", description="Streaming inference for recurrent networks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert a PyTorch checkpoint to an edgernn file")
    convert.add_argument("source", help="a PyTorch state dict (.pt/.pth), or a pickled module with --trust-pickle")
    convert.add_argument("-o", "--output", required=True, help="the .ern file to write")
    convert.add_argument("--dtype", choices=("float32", "float16", "int8"), default="float32")
    convert.add_argument("--nonlinearity", choices=("tanh", "relu"),
                         help="an RNN's nonlinearity, which a state dict cannot tell (default tanh)")
    convert.add_argument("--head-activations", metavar="ACT,...",
                         help="activation of each dense layer, comma-separated (default identity)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow loading a pickled module: runs code from the file, only for files you trust")
    convert.set_defaults(run=_convert)

    inspect = commands.add_parser("inspect", help="describe an edgernn file")
    inspect.add_argument("file")
    inspect.set_defaults(run=_inspect)

    stream = commands.add_parser("stream", help="step a model over CSV samples, one output line per input line")
    stream.add_argument("file")
    stream.add_argument("--csv", default="-", help="input CSV file, one sample per line (default stdin)")
    stream.set_defaults(run=_stream)

    compile_ = commands.add_parser("compile", help="compile the kernels into Numba's cache (one time, any model)")
    compile_.set_defaults(run=_compile)
    return parser


def _convert(args) -> None:
    from . import format as model_format
    from .converters import from_torch

    activations = args.head_activations.split(",") if args.head_activations else None
    model = from_torch(args.source, nonlinearity=args.nonlinearity, head_activations=activations,
                       trust_pickle=args.trust_pickle)
    model_format.save(model, args.output, dtype=args.dtype)
    print(f"wrote {args.output}: {model!r}, {args.dtype}")


def _inspect(args) -> None:
    from .format import describe

    for key, value in describe(args.file).items():
        print(f"{key + ':':<14}{value}")


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


def _compile(args) -> None:
    """The kernels are generic over models, so compiling them once with a tiny model serves every model."""
    import time

    import numpy as np

    from .model import PARALLEL_MIN_STREAMS, Model
    from .spec import ModelSpec, RecurrentLayer

    start = time.perf_counter()
    spec = ModelSpec(1, (RecurrentLayer("lstm", 1, 1),))
    model = Model(spec, {name: np.zeros(shape, np.float32) for name, shape in spec.tensor_shapes().items()})
    model.run(np.zeros((1, 1), np.float32), model.new_state())
    for streams in (1, PARALLEL_MIN_STREAMS):
        model.step_batch(model.new_state(batch=streams), np.arange(streams), np.zeros((streams, 1), np.float32))
    print(f"kernels compiled and cached in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
