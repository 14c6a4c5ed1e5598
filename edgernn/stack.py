"""The compiled layer stack: Numba kernels that advance streams through every layer of a packed model.

Public wrappers live in `edgernn.model`; these kernels do only arithmetic and cheap checks, and report a
status code instead of raising (a raise inside a kernel is slow and loses the message):

    OK, BAD_INPUT_SHAPE, BAD_STATE_SHAPE, NOT_FINITE, BAD_SLOT, DUPLICATE_SLOT, BAD_SAMPLE_COUNT,
    BAD_OUTPUT_SHAPE

Every kernel checks everything before it writes any state, so a rejected call leaves all state as it was.
All of them move streams in tiles: ``advance`` runs a tile through every layer (`edgernn.cells`). For
one stream the tile is the caller's state row itself; for many, ``_advance_rows`` gathers TILE state
rows into contiguous per-layer blocks of a work buffer and scatters them back after, and the tiles are
spread over threads with ``prange``.
"""

import math

import numpy as np

from .cells.activations import INLINE_OPTIONS, KERNEL_OPTIONS
from .cells.dense import dense_layer
from .cells.gru import gru_layer
from .cells.leaky import leaky_layer
from .cells.lstm import lstm_layer
from .cells.mgu import mgu_layer
from .cells.rnn import rnn_layer
from .jit import get_thread_id, njit, prange
from .plan import (
    F_COUPLED, F_REVERSE, F_SECOND, GRU, GRU_RESET_FIRST, H_DENSE, H_INPUT, H_MAX_DENSE, H_MAX_GATES,
    H_MAX_HIDDEN, H_MAX_WIDTH, H_MEAN, H_NORMALIZE, H_OUTPUT, H_STATE, H_STD, H_UNITS, HEADER, LEAKY, LSTM,
    MGU, ROW, U_ACT_F, U_ACT_H, U_BR, U_BW, U_EXTRA, U_FLAGS, U_HIDDEN, U_INPUT, U_KIND, U_OUT, U_PARAMS,
    U_PROJ, U_RT, U_STATE, U_WT,
)

(OK, BAD_INPUT_SHAPE, BAD_STATE_SHAPE, NOT_FINITE, BAD_SLOT, DUPLICATE_SLOT, BAD_SAMPLE_COUNT,
 BAD_OUTPUT_SHAPE) = range(8)
TILE = 8
"""Streams per tile in the batched kernels: each weight row is reused TILE times while in L1."""
GATE_BLOCKS = np.array([1, 1, 2, 3, 3, 4])
"""Gate blocks G of each unit kind (RNN, LEAKY, MGU, GRU, GRU_RESET_FIRST, LSTM)."""


@njit(**INLINE_OPTIONS)
def work_size(meta, streams):
    """Floats of scratch a tile of ``streams`` needs: xin | tile | gates | two dense buffers | output."""
    per_stream = (meta[H_INPUT] + meta[H_STATE] + 2 * meta[H_MAX_GATES] + meta[H_MAX_HIDDEN]
                  + 2 * meta[H_MAX_DENSE] + meta[H_OUTPUT])
    return streams * per_stream


@njit(**INLINE_OPTIONS)
def unit_step(unit, inp, tile, S, weights, meta, work):
    """Advance a tile of S streams one step through one unit (one direction of one layer), in place.

    inp (S, I); tile holds the streams' states, each state vector (h, and c for an LSTM) stored as an
    (S, width) block at ``S * row_offset`` -- for S = 1 exactly a state row. Returns the unit's new h,
    an (S, Hp) view into the tile. Inlined into its callers: a returned array costs a reference count.
    """
    base = HEADER + ROW * unit
    kind, I, H, offset, HP = meta[base + U_KIND], meta[base + U_INPUT], meta[base + U_HIDDEN], \
        meta[base + U_STATE], meta[base + U_OUT]
    coupled = (meta[base + U_FLAGS] & F_COUPLED) != 0
    G = GATE_BLOCKS[kind] - (1 if coupled else 0)
    WT = weights[meta[base + U_WT]:meta[base + U_WT] + I * G * H]
    RT = weights[meta[base + U_RT]:meta[base + U_RT] + HP * G * H]
    bW = weights[meta[base + U_BW]:meta[base + U_BW] + G * H]
    bR = weights[meta[base + U_BR]:meta[base + U_BR] + G * H]
    acts = meta[base + U_ACT_F:base + U_ACT_H + 1]
    params = weights[meta[base + U_PARAMS]:meta[base + U_PARAMS] + 7]
    h = tile[S * offset:S * (offset + HP)]
    gates_at = S * (meta[H_INPUT] + meta[H_STATE])
    gates = work[gates_at:gates_at + S * G * H]
    scratch_at = gates_at + 2 * S * G * H
    if kind == LSTM:
        c = tile[S * (offset + HP):S * (offset + HP + H)]
        lstm_layer(inp, h, c, WT, RT, bW, bR, weights, meta[base + U_EXTRA], meta[base + U_PROJ], coupled, acts,
                   params, gates,
                   work[scratch_at:scratch_at + S * H], S, I, H, HP)
    elif kind == GRU or kind == GRU_RESET_FIRST:
        gru_layer(inp, h, WT, RT, bW, bR, kind == GRU, acts, params, gates,
                  work[gates_at + S * G * H:scratch_at], work[scratch_at:scratch_at + S * H], S, I, H)
    elif kind == MGU:
        mgu_layer(inp, h, WT, RT, bW, bR, acts, params, gates, work[scratch_at:scratch_at + S * H], S, I, H)
    elif kind == LEAKY:
        leak = weights[meta[base + U_EXTRA]:meta[base + U_EXTRA] + H]
        leaky_layer(inp, h, WT, RT, bW, bR, leak, acts, params, gates, S, I, H)
    else:
        rnn_layer(inp, h, WT, RT, bW, bR, acts, params, gates, S, I, H)
    return h


@njit(**INLINE_OPTIONS)
def head(inp, width, S, weights, meta, work, out):
    """The dense layers on inp (S, width) into out (S, O); without any, out is a copy of inp."""
    n_units, n_dense, max_dense = meta[H_UNITS], meta[H_DENSE], meta[H_MAX_DENSE]
    dense_at = S * (meta[H_INPUT] + meta[H_STATE] + 2 * meta[H_MAX_GATES] + meta[H_MAX_HIDDEN])
    if n_dense == 0:
        for j in range(S * width):  # a loop, not a slice assignment: that compiles a shape check and a raise
            out[j] = inp[j]
    for d in range(n_dense):
        base = HEADER + ROW * (n_units + d)
        act, K, N = meta[base], meta[base + 1], meta[base + 2]
        WT = weights[meta[base + 4]:meta[base + 4] + K * N]
        b = weights[meta[base + 5]:meta[base + 5] + N]
        alpha, beta = weights[meta[base + 6]], weights[meta[base + 6] + 1]
        at = dense_at + (d % 2) * S * max_dense
        dest = out if d == n_dense - 1 else work[at:at + S * N]
        dense_layer(inp, WT, b, act, alpha, beta, dest, S, K, N)
        inp = dest


@njit(**KERNEL_OPTIONS)
def advance(xin, tile, S, weights, meta, work, out):
    """Advance a tile of S streams one step through every unit, then the head (streamable models only:
    every unit runs forward). xin (S, I) normalised inputs; tile as in `unit_step`; out (S, O)."""
    inp = xin
    width = meta[H_INPUT]
    for unit in range(meta[H_UNITS]):
        inp = unit_step(unit, inp, tile, S, weights, meta, work)
        width = meta[HEADER + ROW * unit + U_OUT]
    head(inp, width, S, weights, meta, work, out)


@njit(**INLINE_OPTIONS)
def _normalise_into(xin, at, x, meta, weights):
    """xin[at:at + I] = (x - mean) / std, or a plain copy without normalisation."""
    n_in = meta[H_INPUT]
    if meta[H_NORMALIZE]:
        mean, std = meta[H_MEAN], meta[H_STD]
        for k in range(n_in):
            xin[at + k] = (x[k] - weights[mean + k]) / weights[std + k]
    else:
        for k in range(n_in):
            xin[at + k] = x[k]


@njit(**INLINE_OPTIONS)
def _move_rows(states, rows, first, tile, meta, S, gather):
    """Copy state rows ``states[rows[first:first + S]]`` into the tile (gather) or back (scatter).

    A row is [h0 (c0) h1 (c1) ...]; the vector at row offset ``start`` (width floats) becomes the
    (S, width) block at ``S * start`` of the tile, so each unit's kernel sees plain row-major arrays.
    """
    start = 0
    for unit in range(meta[H_UNITS]):
        base = HEADER + ROW * unit
        for vector in range(2 if meta[base + U_KIND] == LSTM else 1):  # h, and c for an LSTM
            width = meta[base + U_OUT] if vector == 0 else meta[base + U_HIDDEN]
            for s in range(S):
                in_row = states[rows[first + s]][start:start + width]
                in_tile = tile[S * start + s * width:S * start + (s + 1) * width]
                if gather:
                    for j in range(width):
                        in_tile[j] = in_row[j]
                else:
                    for j in range(width):
                        in_row[j] = in_tile[j]
            start += width


@njit(**INLINE_OPTIONS)
def _advance_rows(states, rows, X, first, S, weights, meta, work, Y):
    """Advance rows ``states[rows[first + s]]`` by ``X[first + s]`` into ``Y[first + s]``, for s < S."""
    n_in, n_state, n_out = meta[H_INPUT], meta[H_STATE], meta[H_OUTPUT]
    tile = work[S * n_in:S * (n_in + n_state)]
    out = work[work.shape[0] - S * n_out:]
    for s in range(S):
        _normalise_into(work, s * n_in, X[first + s], meta, weights)
    _move_rows(states, rows, first, tile, meta, S, True)
    advance(work[:S * n_in], tile, S, weights, meta, work, out)
    _move_rows(states, rows, first, tile, meta, S, False)
    for s in range(S):
        y, out_s = Y[first + s], out[s * n_out:(s + 1) * n_out]
        for j in range(n_out):
            y[j] = out_s[j]


@njit(**INLINE_OPTIONS)
def _all_finite(X):
    for v in X.ravel():
        if not math.isfinite(v):
            return False
    return True


@njit(**KERNEL_OPTIONS)
def step_one(x, state, weights, meta, work, y):
    """One stream, one sample: x (I,) -> y (O,), state (state_size,) advanced in place.

    A tile of one stream is laid out exactly like its state row, so the layers run on ``state`` itself.
    """
    if x.shape[0] != meta[H_INPUT]:
        return BAD_INPUT_SHAPE
    if y.shape[0] != meta[H_OUTPUT]:
        return BAD_OUTPUT_SHAPE
    if state.shape[0] != meta[H_STATE]:
        return BAD_STATE_SHAPE
    if not _all_finite(x):
        return NOT_FINITE
    one = state.shape[0] // meta[H_STATE]  # a runtime 1: a literal would compile a second `advance`
    _normalise_into(work, 0, x, meta, weights)
    advance(work[:x.shape[0]], state, one, weights, meta, work, y)
    return OK


@njit(**INLINE_OPTIONS)
def _check_sequence(xs, state, meta, ys):
    """Shapes of a one-stream sequence call, and finite inputs."""
    if xs.shape[1] != meta[H_INPUT] or ys.shape[0] != xs.shape[0] or ys.shape[1] != meta[H_OUTPUT]:
        return BAD_INPUT_SHAPE
    if state.shape[0] != meta[H_STATE]:
        return BAD_STATE_SHAPE
    if not _all_finite(xs):
        return NOT_FINITE
    return OK


@njit(**KERNEL_OPTIONS)
def run_sequence(xs, state, weights, meta, work, ys):
    """One stream, T samples: xs (T, I) -> ys (T, O), state (state_size,) advanced T steps."""
    status = _check_sequence(xs, state, meta, ys)
    if status != OK:
        return status
    n_in = meta[H_INPUT]
    one = state.shape[0] // meta[H_STATE]  # see step_one
    for t in range(xs.shape[0]):
        _normalise_into(work, 0, xs[t], meta, weights)
        advance(work[:n_in], state, one, weights, meta, work, ys[t])
    return OK


@njit(**KERNEL_OPTIONS)
def run_layers(xs, state, weights, meta, work, ys):
    """One stream, T samples, layer after layer over the whole sequence -- what reverse and bidirectional
    units need. xs (T, I) -> ys (T, O); each unit's final state is left in ``state`` (a reverse unit's
    is the one after reading xs[0]). A bidirectional layer hands on [forward h | reverse h] per step."""
    status = _check_sequence(xs, state, meta, ys)
    if status != OK:
        return status
    T, stride, width = xs.shape[0], meta[H_MAX_WIDTH], meta[H_INPUT]
    seq_in = np.zeros(T * stride, np.float32)  # (T, stride): each step's input to the current layer
    seq_out = np.zeros(T * stride, np.float32)
    for t in range(T):
        _normalise_into(seq_in, t * stride, xs[t], meta, weights)
    one = state.shape[0] // meta[H_STATE]  # see step_one
    n_units, column = meta[H_UNITS], 0
    for unit in range(n_units):
        base = HEADER + ROW * unit
        flags, HP = meta[base + U_FLAGS], meta[base + U_OUT]
        column = column if flags & F_SECOND else 0
        for step in range(T):
            t = T - 1 - step if flags & F_REVERSE else step
            h = unit_step(unit, seq_in[t * stride:t * stride + width], state, one, weights, meta, work)
            for j in range(HP):
                seq_out[t * stride + column + j] = h[j]
        column += HP
        if unit + 1 == n_units or not meta[base + ROW + U_FLAGS] & F_SECOND:  # the layer is complete
            seq_in, seq_out, width = seq_out, seq_in, column
    for t in range(T):
        head(seq_in[t * stride:t * stride + width], width, one, weights, meta, work, ys[t])
    return OK


@njit(**INLINE_OPTIONS)
def _check_batch(states, slots, X, meta, marks, Y):
    """Shapes, slots in range and distinct (``marks``: a zeroed uint8 per row, left zeroed), finite X."""
    if X.shape[1] != meta[H_INPUT] or Y.shape[1] != meta[H_OUTPUT]:
        return BAD_INPUT_SHAPE
    if slots.shape[0] != X.shape[0] or Y.shape[0] != X.shape[0]:
        return BAD_SAMPLE_COUNT
    if states.shape[1] != meta[H_STATE] or marks.shape[0] < states.shape[0]:
        return BAD_STATE_SHAPE
    for slot in slots:
        if slot < 0 or slot >= states.shape[0]:
            return BAD_SLOT
    status = OK
    for slot in slots:  # two samples for one row in a tick would race; refuse them
        if marks[slot]:
            status = DUPLICATE_SLOT
        marks[slot] = 1
    for slot in slots:
        marks[slot] = 0
    if status == OK and not _all_finite(X):
        status = NOT_FINITE
    return status


@njit(**KERNEL_OPTIONS)
def step_rows(states, slots, X, weights, meta, work, marks, Y):
    """Many streams, one sample each, on this thread: rows ``states[slots]`` advanced by X (n, I)."""
    status = _check_batch(states, slots, X, meta, marks, Y)
    if status != OK:
        return status
    n = X.shape[0]
    for start in range(0, n, TILE):
        _advance_rows(states, slots, X, start, min(TILE, n - start), weights, meta, work[0], Y)
    return OK


@njit(parallel=True, **KERNEL_OPTIONS)
def step_rows_parallel(states, slots, X, weights, meta, work, marks, Y):
    """`step_rows` with tiles spread over Numba's threads; ``work`` has one row per thread."""
    status = _check_batch(states, slots, X, meta, marks, Y)
    if status != OK:
        return status
    n = X.shape[0]
    for tile in prange((n + TILE - 1) // TILE):
        start = tile * TILE
        _advance_rows(states, slots, X, start, min(TILE, n - start), weights, meta, work[get_thread_id()], Y)
    return OK
