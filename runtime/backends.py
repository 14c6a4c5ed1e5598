"""What advances a pipeline's streams: the Numba kernels (default) or onnxruntime with the exported step model.

Both present the same interface to the scheduler, ``step_batch(states, slots, X) -> Y`` on rows of the
pipeline's state table (`edgernn.StreamTable`), so state tables, snapshots and the journal do not care
which one runs. The onnxruntime backend is for large batches of streams and for GPUs: it picks the CUDA
execution provider when onnxruntime-gpu and a GPU are present, else the CPU one, and logs which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

import edgernn
from edgernn.errors import FormatError
from edgernn.jit import KERNELS

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


PARALLEL_MIN_ROWS = 2048
"""Micro-batches from this many rows use Numba's thread pool. Smaller ones run on the worker thread:
measured in the daemon on 2 cores, waking the pool while paho's thread also wants the CPU took ~8 ms
for 64-416 rows against 0.06-0.3 ms on one thread."""


class NumbaBackend:
    """The default: `Model.step_batch`, the compiled kernels."""

    name = "numba"

    def __init__(self, model):
        self.model = model
        self.device = "cpu"
        # "kernels: numba", or "kernels: numpy (numba is not importable (...))" where numba is missing
        log.info("kernels: %s", KERNELS, extra={"event": "backend", "kernels": KERNELS.split()[0]})

    def step_batch(self, states: np.ndarray, slots: np.ndarray, X: np.ndarray) -> np.ndarray:
        return self.model.step_batch(states, slots, X, parallel=len(slots) >= PARALLEL_MIN_ROWS)


class OnnxRuntimeBackend:
    """onnxruntime running the step model written by ``edgernn convert model.ern -o step.onnx``.

    The file's ``edgernn.state_layout`` metadata says where each state input lives in the flat state row;
    its ``edgernn.spec`` must equal the .ern file's spec, so the two files cannot drift apart unnoticed.
    """

    name = "onnxruntime"

    def __init__(self, model, onnx_path: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("backend = \"onnxruntime\" needs onnxruntime: pip install 'edgernn[ort]' "
                              "(or 'edgernn[gpu]' for CUDA)") from None
        self.model = model
        available = ort.get_available_providers()
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise FormatError(onnx_path, f"onnxruntime cannot load it: {' '.join(str(exc).split())}") from None
        self.provider = self.session.get_providers()[0]
        self.device = "gpu" if self.provider == "CUDAExecutionProvider" else "cpu"
        metadata = self.session.get_modelmeta().custom_metadata_map
        self._layout = _state_layout(onnx_path, metadata, model)
        log.info("onnxruntime backend on %s (%s) for %s", self.device, self.provider, onnx_path,
                 extra={"event": "backend", "provider": self.provider})

    def step_batch(self, states: np.ndarray, slots: np.ndarray, X: np.ndarray) -> np.ndarray:
        rows = states[slots]
        feeds = {"x": np.ascontiguousarray(X, np.float32)}
        for name, _, offset, size in self._layout:
            feeds[name] = np.ascontiguousarray(rows[:, offset:offset + size])
        outputs = self.session.run(None, feeds)
        named = dict(zip((o.name for o in self.session.get_outputs()), outputs))
        for _, output, offset, size in self._layout:
            rows[:, offset:offset + size] = named[output]
        states[slots] = rows
        return named["y"]


def _state_layout(path, metadata: dict, model) -> list[tuple[str, str, int, int]]:
    """[(input, output, offset, size)] from the step model's metadata, checked against the .ern model."""
    if "edgernn.spec" not in metadata or "edgernn.state_layout" not in metadata:
        raise FormatError(path, "not an edgernn step model (no edgernn.spec / edgernn.state_layout metadata); "
                                "write one with: edgernn convert MODEL.ern -o STEP.onnx")
    spec = edgernn.ModelSpec.from_json(metadata["edgernn.spec"])
    if spec != model.spec:
        raise FormatError(path, "its edgernn.spec differs from the pipeline's model file: export it again "
                                "from that file")
    layout = [(t["name"], t["output"], int(t["offset"]), int(t["size"]))
              for t in json.loads(metadata["edgernn.state_layout"])]
    if sum(size for *_, size in layout) != model.state_size:
        raise FormatError(path, "its state layout does not cover the model's state")
    return layout


def load_backend(pipeline, model_bytes: bytes | None = None):
    """The model and backend a pipeline's config asks for (files are checked here, with clear errors).
    ``model_bytes``: the model file's content, read and checked already (a signature)."""
    model = edgernn.load(pipeline.model, model_bytes)
    if not model.streamable:
        raise edgernn.StreamingError(f"{pipeline.model}: pipeline {pipeline.name!r} needs a model that steps one "
                                     "sample at a time (it has a reverse or bidirectional layer)")
    if pipeline.backend == "numba":
        return model, NumbaBackend(model)
    return model, OnnxRuntimeBackend(model, pipeline.onnx_model)  # the config requires onnx_model here
