"""Packs a spec and its weights into the two flat arrays the kernels read: ``weights`` and ``meta``.

Few arguments make a fast Numba call (PERF_NOTES.md, item 4), so every weight of every layer lives in
one float32 buffer, and ``meta`` (int64) says where each tensor starts and what each layer is.

``meta`` layout: a header of HEADER ints (the ``H_*`` indexes below), then one ROW of ints per *unit* --
one direction of one recurrent layer, so a bidirectional layer has two consecutive rows, forward first --
and one ROW per dense layer. A unit row (``U_*`` indexes) holds its kind and sizes, where its h (and c)
sit in a state row, and offsets into ``weights`` of its tensors, its activation parameters
``[alpha_f, beta_f, alpha_g, beta_g, alpha_h, beta_h, clip]`` (clip 0: none), and of its optional
peepholes, projection or leak rates (-1: none). A dense row is ``[activation, K, N, 0, WT, b, params]``.
Weight matrices are stored transposed -- WT (I, G*H), RT (Hp, G*H) -- so kernels run unit-stride over
the gate outputs; an MGU keeps each gate's block separately (see `edgernn.cells.mgu`). Absent biases
are stored as zeros, so the kernels have one code path.
"""

from dataclasses import dataclass

import numpy as np

from .cells.activations import ACTIVATION_CODES
from .spec import ModelSpec

# Header fields.
(H_UNITS, H_DENSE, H_INPUT, H_OUTPUT, H_STATE, H_NORMALIZE, H_MEAN, H_STD,
 H_MAX_GATES, H_MAX_HIDDEN, H_MAX_DENSE, H_MAX_WIDTH) = range(12)
HEADER = 16
ROW = 16

# Unit row fields.
(U_KIND, U_INPUT, U_HIDDEN, U_STATE, U_WT, U_RT, U_BW, U_BR, U_OUT, U_ACT_F, U_ACT_G, U_ACT_H, U_PARAMS,
 U_EXTRA, U_PROJ, U_FLAGS) = range(16)
"""U_OUT: width of the unit's h (proj_size or H); U_EXTRA: peepholes (lstm) or leak rates (leaky)."""
F_COUPLED, F_REVERSE, F_SECOND = 1, 2, 4
"""U_FLAGS bits: coupled input-forget gate; runs backwards in time; second direction of its layer."""

# Recurrent unit kinds.
RNN, LEAKY, MGU, GRU, GRU_RESET_FIRST, LSTM = range(6)
_KINDS = {"rnn": RNN, "leaky": LEAKY, "mgu": MGU, "lstm": LSTM}


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
    if layer.cell == "gru":
        return GRU if layer.linear_before_reset else GRU_RESET_FIRST
    return _KINDS[layer.cell]


@dataclass(frozen=True)
class Plan:
    weights: np.ndarray
    meta: np.ndarray


def _transposed_blocks(matrix, blocks: int) -> np.ndarray:
    """(blocks*H, K) -> each (H, K) block transposed to (K, H), stored one after another."""
    return np.concatenate([block.T.ravel() for block in np.split(matrix, blocks)])


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

    units = [(index, layer, direction, prefix) for index, layer in enumerate(spec.layers)
             for direction, prefix in enumerate(layer.prefixes(index))]
    meta = np.zeros(HEADER + ROW * (len(units) + len(spec.head)), dtype=np.int64)
    meta[H_UNITS], meta[H_DENSE] = len(units), len(spec.head)
    meta[H_INPUT], meta[H_OUTPUT], meta[H_STATE] = spec.input_size, spec.output_size, spec.state_size
    if spec.normalize:
        meta[H_NORMALIZE] = 1
        meta[H_MEAN] = put(weights["input.mean"])
        meta[H_STD] = put(weights["input.std"])
    state_offset = 0
    for number, (index, layer, direction, prefix) in enumerate(units):
        rows, H = layer.gates * layer.hidden_size, layer.hidden_size
        zeros = np.zeros(rows, np.float32)
        W, R = weights[prefix + "W"], weights[prefix + "R"]
        blocks = layer.gates if layer.cell == "mgu" else 1
        acts = layer.activations_for(direction) + layer.activations_for(direction)[:1] * 2
        params = [value for a in acts[:3] for value in (a.alpha, a.beta)] + [layer.clip or 0.0]
        extra = prefix + ("P" if layer.peepholes else "leak")
        flags = ((F_COUPLED if layer.coupled_input_forget else 0) | (F_SECOND if direction else 0)
                 | (F_REVERSE if direction or layer.direction == "reverse" else 0))
        row = HEADER + ROW * number
        meta[row:row + ROW] = (
            layer_kind(layer), layer.input_size, H, state_offset,
            put(_transposed_blocks(W, blocks)), put(_transposed_blocks(R, blocks)),
            put(weights.get(prefix + "Wb", zeros)), put(weights.get(prefix + "Rb", zeros)),
            layer.unit_output_size, *(ACTIVATION_CODES[a.name] for a in acts[:3]), put(np.array(params)),
            put(weights[extra]) if extra in weights else -1,
            put(weights[prefix + "proj"].T) if layer.proj_size else -1, flags,
        )
        state_offset += layer.state_size // layer.directions
    for index, dense in enumerate(spec.head):
        row = HEADER + ROW * (len(units) + index)
        act = dense.activation
        meta[row:row + 7] = (
            ACTIVATION_CODES[act.name], dense.in_features, dense.out_features, 0, put(weights[f"head.{index}.W"].T),
            put(weights.get(f"head.{index}.b", np.zeros(dense.out_features, np.float32))),
            put(np.array([act.alpha, act.beta])),
        )
    meta[H_MAX_GATES] = max(layer.gates * layer.hidden_size for layer in spec.layers)
    meta[H_MAX_HIDDEN] = max(layer.hidden_size for layer in spec.layers)
    meta[H_MAX_DENSE] = max((dense.out_features for dense in spec.head), default=1)
    meta[H_MAX_WIDTH] = max([spec.input_size] + [layer.output_size for layer in spec.layers])
    flat = aligned_zeros(cursor)
    if chunks:
        np.concatenate(chunks, out=flat)
    return Plan(weights=flat, meta=meta)
