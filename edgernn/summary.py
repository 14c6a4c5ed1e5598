"""What ``edgernn inspect`` reports about a model file: plain data (``--json``) and its text rendering.

Everything is derived from the file's spec and metadata (`edgernn.format`); nothing is compiled, so
inspecting a model costs no Numba start-up.
"""

from __future__ import annotations

from pathlib import Path

from .format import read_model_file, read_tensor_file
from .spec import REST_STATE_ORIGINS, ModelSpec, RecurrentLayer


def summarize(path) -> tuple[dict, ModelSpec]:
    """The file's model as JSON-ready data (sizes, layers, head, storage, checksum, cost per step), and its spec."""
    metadata, _ = read_tensor_file(path)
    spec, _ = read_model_file(path)  # checks the format, version and checksum
    return {
        "file": str(path),
        "format_version": metadata.get("format_version"),
        "spec_version": spec.version,
        "name": spec.name,
        "dtype": metadata.get("dtype"),
        "checksum": metadata.get("checksum"),
        "file_size": Path(path).stat().st_size,
        **spec_summary(spec),
    }, spec


def spec_summary(spec: ModelSpec) -> dict:
    """The sizes, layers and head of a spec, with every layer's effective activations spelled out."""
    return {
        "input_size": spec.input_size,
        "normalize": spec.normalize,
        "output_size": spec.output_size,
        "state_size": spec.state_size,
        "parameters": spec.parameter_count(),
        "flops_per_step": spec.flops_per_step(),
        "streamable": spec.streamable,
        "sample_rate": spec.sample_rate,
        "sample_period": spec.sample_period,
        "rest_state": spec.rest_state,
        "rest_state_note": spec.rest_state_note,
        "model_version": spec.model_version,
        "labels": list(spec.labels),
        "layers": [_layer(layer) for layer in spec.layers],
        "head": [{"in_features": d.in_features, "out_features": d.out_features, "bias": d.bias,
                  "activation": str(d.activation)} for d in spec.head],
    }


def _layer(layer: RecurrentLayer) -> dict:
    item = {
        "cell": layer.cell, "input_size": layer.input_size, "hidden_size": layer.hidden_size,
        "output_size": layer.output_size, "state_size": layer.state_size, "direction": layer.direction,
        "bias": layer.bias,
        "activations": [[str(a) for a in layer.activations_for(d)] for d in range(layer.directions)],
        "variants": variants(layer),
    }
    if layer.clip is not None:
        item["clip"] = layer.clip
    if layer.proj_size:
        item["proj_size"] = layer.proj_size
    return item


def variants(layer: RecurrentLayer) -> list[str]:
    """The non-default features of a layer, as short words."""
    words = []
    if layer.cell == "gru" and not layer.linear_before_reset:
        words.append("reset-first")
    if layer.peepholes:
        words.append("peepholes")
    if layer.coupled_input_forget:
        words.append("coupled-input-forget")
    if layer.proj_size:
        words.append(f"proj {layer.proj_size}")
    if layer.clip is not None:
        words.append(f"clip {layer.clip:g}")
    if not layer.bias:
        words.append("no bias")
    return words


def sample_rate_text(spec: ModelSpec) -> str:
    """``50 Hz (period 20 ms)``, or ``not set``."""
    if spec.sample_rate is None:
        return "not set"
    period = spec.sample_period
    period_text = f"{period * 1000:.4g} ms" if period < 1 else f"{period:.4g} s"
    return f"{spec.sample_rate:.6g} Hz (period {period_text})"


def rest_state_text(spec: ModelSpec) -> str:
    """Where a stream's starting state comes from: ``idle (converged after 412 steps)``, ``zeros``, ..."""
    text = REST_STATE_ORIGINS[spec.rest_state]
    return f"{text} ({spec.rest_state_note})" if spec.rest_state_note else text


def layer_text(layer: RecurrentLayer) -> str:
    """``lstm 8->64 bidirectional, proj 32 (out 64) [sigmoid,tanh,tanh]`` -- one line per layer."""
    text = f"{layer.cell} {layer.input_size}->{layer.hidden_size}"
    if layer.direction != "forward":
        text += f" {layer.direction}"
    extra = variants(layer)
    if extra:
        text += ", " + ", ".join(extra)
    if layer.output_size != layer.hidden_size:
        text += f" (out {layer.output_size})"
    sets = [",".join(map(str, layer.activations_for(d))) for d in range(layer.directions)]
    if len(set(sets)) == 1:
        sets = sets[:1]
    return text + " [" + " | ".join(sets) + "]"


def one_line(spec: ModelSpec) -> str:
    """``3 -> lstm(64, bidirectional) x2 -> dense(2, softmax)``: a model in a few words."""
    parts = [str(spec.input_size)]
    for layer in spec.layers:
        extra = [layer.direction] if layer.direction != "forward" else []
        extra += [v for v in variants(layer) if v != "no bias"]
        parts.append(f"{layer.cell}({', '.join([str(layer.hidden_size), *extra])})")
    parts += [f"dense({d.out_features}{'' if d.activation.name == 'identity' else ', ' + str(d.activation)})"
              for d in spec.head]
    return " -> ".join(parts)


def render(summary: dict, spec: ModelSpec) -> str:
    """The text `edgernn inspect` prints: one ``key: value`` line each, layers one per line."""
    layers = [f"[{i}] {layer_text(layer)}" for i, layer in enumerate(spec.layers)]
    head = [f"[{j}] dense {d.in_features}->{d.out_features} {d.activation}{'' if d.bias else ', no bias'}"
            for j, d in enumerate(spec.head)]
    blocking = [f"layer {i} is {layer.direction}" for i, layer in enumerate(spec.layers)
                if layer.direction != "forward"]
    rows = [
        ("file", summary["file"]),
        ("name", summary["name"] or "-"),
        ("format", f"edgernn v{summary['format_version']}, spec v{summary['spec_version']}"),
        ("input", f"{spec.input_size}{' (normalised)' if spec.normalize else ''}"),
        ("recurrent", layers),
        ("head", head or ["-"]),
        ("output", str(spec.output_size)),
        ("state", f"{spec.state_size} floats per stream"),
        ("rest state", rest_state_text(spec)),
        ("sample rate", sample_rate_text(spec)),
        ("version", spec.model_version or "not set"),
        ("labels", ", ".join(spec.labels) if spec.labels else "not set"),
        ("parameters", f"{summary['parameters']:,}"),
        ("dtype", summary["dtype"]),
        ("file size", f"{summary['file_size']:,} bytes"),
        ("checksum", summary["checksum"]),
        ("flops/step", f"{summary['flops_per_step']:,}"),
        ("streamable", "yes: one sample at a time (Model.step)" if spec.streamable else
         f"no: {', '.join(blocking)}; whole sequences only (Model.run)"),
    ]
    lines = []
    for key, value in rows:
        values = value if isinstance(value, list) else [value]
        lines.append(f"{key + ':':<13}{values[0]}")
        lines += [f"{'':<13}{more}" for more in values[1:]]
    return "\n".join(lines)
