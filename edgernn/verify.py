"""``edgernn verify``: run an edgernn model and the model it came from on the same sequences, and measure.

The reference is the source itself, run by its own runtime -- an ONNX graph by onnxruntime, a PyTorch
module (or TorchScript, or factory) by PyTorch -- so a conversion, storage (float16, int8) or kernel
error shows up as a difference. Each sequence runs three ways: the reference over the whole sequence,
`Model.run`, and `Model.step` one sample at a time (what a streaming daemon does; skipped for models
with reverse or bidirectional layers, which cannot stream).

An output passes when its max abs error is within ``tolerance * max(1, max |reference|)``: absolute for
outputs of magnitude up to 1, relative beyond. The max rel error reported is the max abs error divided
by the output's largest |reference| value (not element-wise, which explodes where the reference
crosses zero).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError, InputError

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """``run(xs (T, I))`` -> (T, O) float64, or (1, O) for a source that returns only the last step."""

    run: Callable[[np.ndarray], np.ndarray]
    description: str
    steps: int | None = None
    """Set when the reference graph takes exactly this many steps."""


@dataclass
class Result:
    outputs: int
    abs_err: np.ndarray       # (O,) max abs error of Model.run, over every sequence and step
    scale: np.ndarray         # (O,) max |reference|
    stream_err: np.ndarray | None  # (O,) the same for Model.step one sample at a time; None when skipped
    tolerance: float
    sequences: int
    steps: int

    @property
    def limit(self) -> np.ndarray:
        return self.tolerance * np.maximum(1.0, self.scale)

    def rel(self, err: np.ndarray) -> np.ndarray:
        return err / np.maximum(self.scale, np.finfo(np.float64).tiny)

    @property
    def failures(self) -> list[int]:
        worst = self.abs_err if self.stream_err is None else np.maximum(self.abs_err, self.stream_err)
        return [o for o in range(self.outputs) if not worst[o] <= self.limit[o]]  # NaN fails too

    @property
    def passed(self) -> bool:
        return not self.failures


# ---- inputs ------------------------------------------------------------------------------------------


def random_sequences(count: int, steps: int, input_size: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """``count`` standard-normal float32 sequences (steps, input_size), from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [(f"random[{i}]", rng.standard_normal((steps, input_size), dtype=np.float32)) for i in range(count)]


def read_inputs(path, input_size: int) -> list[tuple[str, np.ndarray]]:
    """Sequences from a ``.npy`` ((T, I) or (N, T, I); (T,) when I is 1) or ``.csv`` (one sample a line,
    an optional header line) file, or a clear error naming the file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".csv":
            data = _read_csv(path)
        else:
            raise InputError(f"{path}: --input takes .npy or .csv files")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read it as {path.suffix[1:]} ({exc})") from None
    if data.dtype.kind not in "fiu":
        raise InputError(f"{path}: holds {data.dtype}, not numbers")
    shape = data.shape
    if data.ndim == 1 and input_size == 1:
        data = data[:, None]
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[2] != input_size or data.shape[1] == 0:
        raise InputError(f"{path}: shape {shape}; the model takes (T, {input_size}) or (N, T, {input_size})")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: holds non-finite values")
    name = path.name
    return [(name if len(data) == 1 else f"{name}[{i}]", np.ascontiguousarray(seq, np.float32))
            for i, seq in enumerate(data)]


def _read_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        [float(field) for field in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)


# ---- references ---------------------------------------------------------------------------------------


def pytorch_reference(source, **options) -> Reference:
    """A PyTorch source (as `edgernn convert` takes it) run by PyTorch."""
    from .converters.torch import torch_reference

    run, description = torch_reference(source, **options)
    return Reference(run, f"{description}, run by PyTorch")


def onnx_reference(path, input_size: int) -> Reference:
    """An ONNX graph run by onnxruntime: a sequence graph ((T, 1, I) or (1, T, I) in, its first output
    out), or an edgernn step model (`edgernn.converters.onnx_export`), stepped sample by sample."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 -- protobuf reports garbage with several exception types
        raise ConversionError(f"{path}: not an ONNX model onnx can read ({type(exc).__name__})") from None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's own exception types
        raise ConversionError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    inputs = session.get_inputs()
    if not inputs:
        raise ConversionError(f"{path}: the graph has no inputs")
    shape = inputs[0].shape
    if isinstance(shape[-1], int) and shape[-1] != input_size:
        raise ConversionError(f"{path}: input {inputs[0].name!r} takes {shape[-1]} features per sample, the model "
                              f"{input_size}")
    if "edgernn.step_format" in metadata or len(shape) == 2:
        return _step_reference(path, session, metadata)
    if len(shape) != 3:
        raise ConversionError(f"{path}: input {inputs[0].name!r} has shape {shape}; expected (T, batch, I) or "
                              f"(batch, T, I)")
    batch_first = _batch_first(proto, inputs[0].name, shape)
    steps = shape[1 if batch_first else 0]
    layout = "(1, T, I)" if batch_first else "(T, 1, I)"

    def run(xs):
        feeds = {inputs[0].name: xs[None] if batch_first else xs[:, None]}
        for extra in inputs[1:]:  # optional recurrent inputs left open: zeros, or the full length
            dims = [d if isinstance(d, int) else 1 for d in extra.shape]
            kind = np.int32 if "int32" in extra.type else np.int64 if "int64" in extra.type else np.float32
            feeds[extra.name] = np.full(dims, len(xs) if kind is not np.float32 else 0, kind)
        out = _ort_run(session, feeds, path)[0]
        return _sequence_output(np.asarray(out, np.float64), len(xs), batch_first, path)

    return Reference(run, f"{path} run by onnxruntime, input {layout}",
                     steps if isinstance(steps, int) and steps > 0 else None)


def _batch_first(proto, name: str, shape) -> bool:
    """Whether the graph input is (batch, T, I): from a fixed batch of 1, a dimension named batch, or by
    following the input through Transpose/Identity/Cast to an LSTM/GRU/RNN node and its ``layout``."""
    first, second = shape[0], shape[1]
    if first == 1 and second != 1:
        return True
    if second == 1 and first != 1:
        return False
    if isinstance(first, str) and "batch" in first.lower():
        return True
    if isinstance(second, str) and "batch" in second.lower():
        return False
    current, swapped = name, False
    for _ in range(len(proto.graph.node)):
        consumers = [node for node in proto.graph.node  # Shape nodes only size the initial state
                     if current in node.input and node.op_type not in ("Shape", "Size")]
        if len(consumers) != 1:
            break
        node = consumers[0]
        attrs = {a.name: a for a in node.attribute}
        if node.op_type in ("LSTM", "GRU", "RNN"):
            layout = attrs["layout"].i if "layout" in attrs else 0
            return (layout == 1) != swapped
        if node.op_type == "Transpose" and "perm" in attrs and list(attrs["perm"].ints)[:2] == [1, 0]:
            swapped = not swapped
        elif node.op_type not in ("Identity", "Cast"):
            break
        current = node.output[0]
    log.info("input %r: layout unknown, assuming (T, batch, I) as ONNX's recurrent operators do", name)
    return False


def _sequence_output(out: np.ndarray, steps: int, batch_first: bool, path) -> np.ndarray:
    """The first output as (T, O) (or (1, O) for a last-step output): drops the batch of 1, and joins an
    ONNX recurrent operator's Y directions: (T, D, 1, H) or, with layout 1, (1, T, D, H)."""
    if out.ndim == 4 and out.shape[0] == steps and out.shape[2] == 1:
        return out.transpose(0, 2, 1, 3).reshape(steps, -1)
    if out.ndim == 4 and out.shape[:2] == (1, steps):
        return out[0].reshape(steps, -1)
    if out.ndim == 3 and out.shape[:2] in ((steps, 1), (1, steps)):
        return out.reshape(steps, -1)
    if out.ndim == 2 and out.shape[0] in (steps, 1):
        return out
    if out.ndim == 1:
        return out[None]
    raise ConversionError(f"{path}: first output has shape {out.shape} for {steps} steps; expected (T, 1, O), "
                          f"(1, T, O), (T, O) or a last-step (1, O)")


def _step_reference(path, session, metadata: dict) -> Reference:
    """An edgernn step model: x (1, I) and each state in, y and each next state out; zero start state."""
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    layout = json.loads(metadata.get("edgernn.state_layout", "[]"))
    feedback = {entry["name"]: entry["output"] for entry in layout} or dict(
        zip((i.name for i in inputs[1:]), outputs[1:]))
    sizes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in inputs[1:]}

    def run(xs):
        state = {name: np.zeros(dims, np.float32) for name, dims in sizes.items()}
        ys = []
        for x in xs:
            result = dict(zip(outputs, _ort_run(session, {inputs[0].name: x[None], **state}, path)))
            ys.append(np.asarray(result[outputs[0]], np.float64).reshape(-1))
            state = {name: result[feedback[name]] for name in state}
        return np.stack(ys)

    return Reference(run, f"{path} (an edgernn step model) stepped by onnxruntime")


def _ort_run(session, feeds: dict, path):
    try:
        return session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's own exception types
        shapes = {name: value.shape for name, value in feeds.items()}
        raise ConversionError(f"{path}: onnxruntime failed on inputs {shapes} ({_first_line(exc)})") from None


# ---- comparison ---------------------------------------------------------------------------------------


def compare(model, reference: Reference, sequences, tolerance: float, progress=None) -> Result:
    """Run every sequence through ``reference``, `Model.run` and (streamable models) `Model.step`."""
    from .rest_state import source_start

    outputs = model.output_size
    abs_err, scale = np.zeros(outputs), np.zeros(outputs)
    stream_err = np.zeros(outputs) if model.spec.streamable else None
    steps = 0
    start = source_start(model)  # a rest state edgernn computed (idle, calibration) is not the source's start
    for index, (label, xs) in enumerate(sequences):
        if progress:
            progress(index, len(sequences), label)
        ref = np.asarray(reference.run(xs), np.float64)
        ran = model.run(xs, start.copy()).astype(np.float64)
        if ref.shape not in ((len(xs), outputs), (1, outputs)):
            raise ConversionError(f"{reference.description}: gave shape {ref.shape} for {label} "
                                  f"({len(xs)} steps); the model gives ({len(xs)}, {outputs})")
        last = -len(ref)  # every step, or only the last when the reference returns one
        abs_err = np.maximum(abs_err, _max_abs(ran[last:] - ref))  # NaN propagates
        scale = np.fmax(scale, np.max(np.abs(ref), axis=0))
        if stream_err is not None:
            state = start.copy()
            stepped = np.stack([model.step(x, state) for x in xs]).astype(np.float64)
            stream_err = np.maximum(stream_err, _max_abs(stepped[last:] - ref))
        steps += len(xs)
    return Result(outputs, abs_err, scale, stream_err, tolerance, len(sequences), steps)


def _max_abs(diff: np.ndarray) -> np.ndarray:
    """Per-output max |diff|; NaN where a NaN appeared, so that it fails rather than vanishes."""
    return np.max(np.abs(diff), axis=0)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
