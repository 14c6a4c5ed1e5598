"""Packs a spec and its weights into the two flat arrays the kernels read: ``weights`` and ``meta``.

Few arguments make a fast Numba call (PERF_NOTES.md, item 4), so every weight of every layer lives in
one float32 buffer, and ``meta`` (int64) says where each tensor starts and what each layer is.

``meta`` layout: a header of HEADER ints (the ``H_*`` indexes below), then one ROW of 8 ints per
recurrent layer ``[kind, I, H, state_offset, WT, RT, bW, bR]`` and one per dense layer
``[activation, K, N, 0, WT, b, 0, 0]`` (offsets into ``weights``). Weight matrices are stored
transposed -- WT (I, G*H), RT (H, G*H) -- so kernels run unit-stride over the gate outputs. Absent
biases are stored as zeros, so the kernels have one code path.
"""

from dataclasses import dataclass

import numpy as np

from .cells.dense import ACTIVATION_CODES
from .spec import ModelSpec

# Header fields.
(H_LAYERS, H_DENSE, H_INPUT, H_OUTPUT, H_STATE, H_NORMALIZE, H_MEAN, H_STD,
 H_MAX_GATES, H_MAX_HIDDEN, H_MAX_DENSE) = range(11)
HEADER = 16
ROW = 8

# Recurrent layer kinds.
RNN_TANH, RNN_RELU, GRU, GRU_RESET_FIRST, LSTM = range(5)


ALIGNMENT = 64
"""Bytes: arrays the kernels stream through start on a cache line (and an AVX-512 vector)."""


def aligned_zeros(shape, dtype=np.float32) -> np.ndarray:
    """``np.zeros`` starting on a 64-byte boundary. NumPy guarantees only 16: a tick's speed then
    varies from process to process with where its buffers happen to land."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.zeros(count * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def layer_kind(layer) -> int:
    if layer.cell == "lstm":
        return LSTM
    if layer.cell == "gru":
        return GRU if layer.linear_before_reset else GRU_RESET_FIRST
    return RNN_RELU if layer.activation == "relu" else RNN_TANH


@dataclass(frozen=True)
class Plan:
    weights: np.ndarray
    meta: np.ndarray


def pack(spec: ModelSpec, weights: dict[str, np.ndarray]) -> Plan:
    """The kernels' view of a model. ``weights`` must already match ``spec.tensor_shapes()``."""
    chunks: list[np.ndarray] = []
    cursor = 0

    def put(array) -> int:
        nonlocal cursor
        start = cursor
        flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
        chunks.append(flat)
        cursor += flat.size
        return start

    meta = np.zeros(HEADER + ROW * (len(spec.layers) + len(spec.head)), dtype=np.int64)
    meta[H_LAYERS], meta[H_DENSE] = len(spec.layers), len(spec.head)
    meta[H_INPUT], meta[H_OUTPUT], meta[H_STATE] = spec.input_size, spec.output_size, spec.state_size
    if spec.normalize:
        meta[H_NORMALIZE] = 1
        meta[H_MEAN] = put(weights["input.mean"])
        meta[H_STD] = put(weights["input.std"])
    state_offset = 0
    for index, layer in enumerate(spec.layers):
        rows = layer.gates * layer.hidden_size
        zeros = np.zeros(rows, np.float32)
        row = HEADER + ROW * index
        meta[row:row + ROW] = (
            layer_kind(layer), layer.input_size, layer.hidden_size, state_offset,
            put(weights[f"layers.{index}.W"].T), put(weights[f"layers.{index}.R"].T),
            put(weights.get(f"layers.{index}.Wb", zeros)), put(weights.get(f"layers.{index}.Rb", zeros)),
        )
        state_offset += layer.state_size
    for index, dense in enumerate(spec.head):
        row = HEADER + ROW * (len(spec.layers) + index)
        meta[row:row + ROW] = (
            ACTIVATION_CODES[dense.activation], dense.in_features, dense.out_features, 0,
            put(weights[f"head.{index}.W"].T),
            put(weights.get(f"head.{index}.b", np.zeros(dense.out_features, np.float32))), 0, 0,
        )
    meta[H_MAX_GATES] = max(layer.gates * layer.hidden_size for layer in spec.layers)
    meta[H_MAX_HIDDEN] = max(layer.hidden_size for layer in spec.layers)
    meta[H_MAX_DENSE] = max((dense.out_features for dense in spec.head), default=1)
    flat = aligned_zeros(cursor)
    if chunks:
        np.concatenate(chunks, out=flat)
    return Plan(weights=flat, meta=meta)
