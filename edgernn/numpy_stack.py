"""The layer stack in NumPy: what `edgernn.model` runs where numba cannot be imported (`edgernn.jit`).

The kernels of `edgernn.stack` -- the same names, arguments and status codes, every check made before any
state is written -- as NumPy array code over all the streams of a call (the ``*_layer_numpy`` functions
beside each cell's Numba kernel in `edgernn.cells`). Sums run in a fixed order
(`edgernn.cells.dense.matmul_numpy`) and activations are elementwise, so ``run`` equals T ``step`` calls and
``step_batch`` equals per-stream ``step`` bit for bit, as with the Numba kernels; the two agree within
float32 rounding (tests/test_numpy_fallback.py holds them to 1e-5).

Like Numba's dispatcher, a kernel refuses with TypeError an argument that is not a writeable C-contiguous
array of its dtype and rank, so `edgernn.model` converts or explains exactly as it does for Numba. The
``work`` scratch is not used: each call allocates its own temporaries, so calls on different states from
different threads share nothing (NumPy releases the GIL inside its loops).
"""

import numpy as np

from .cells.dense import dense_layer_numpy
from .cells.gru import gru_layer_numpy
from .cells.leaky import leaky_layer_numpy
from .cells.lstm import lstm_layer_numpy
from .cells.mgu import mgu_layer_numpy
from .cells.rnn import rnn_layer_numpy
from .plan import (
    F_COUPLED, F_REVERSE, F_SECOND, GRU, GRU_RESET_FIRST, H_DENSE, H_INPUT, H_MEAN, H_NORMALIZE, H_OUTPUT,
    H_STATE, H_STD, H_UNITS, HEADER, LEAKY, LSTM, MGU, ROW, U_ACT_F, U_ACT_H, U_BR, U_BW, U_EXTRA, U_FLAGS,
    U_HIDDEN, U_INPUT, U_KIND, U_OUT, U_PARAMS, U_PROJ, U_RT, U_STATE, U_WT,
)
from .stack import (
    BAD_INPUT_SHAPE, BAD_OUTPUT_SHAPE, BAD_SAMPLE_COUNT, BAD_SLOT, BAD_STATE_SHAPE, DUPLICATE_SLOT, GATE_BLOCKS,
    NOT_FINITE, OK,
)

_F32_1D, _F32_2D, _I64_1D, _U8_1D = (np.float32, 1), (np.float32, 2), (np.int64, 1), (np.uint8, 1)
_STEP = (_F32_1D, _F32_1D, _F32_1D, _I64_1D, _F32_1D, _F32_1D)
_SEQUENCE = (_F32_2D, _F32_1D, _F32_1D, _I64_1D, _F32_1D, _F32_2D)
_BATCH = (_F32_2D, _I64_1D, _F32_2D, _F32_1D, _I64_1D, _F32_2D, _U8_1D, _F32_2D)
"""The argument types of each kernel: `edgernn.model`'s Numba signatures."""


def _match(args, kinds) -> None:
    """TypeError, as from Numba's dispatcher, unless every argument has its kernel's dtype, rank and layout."""
    for position, (array, (dtype, ndim)) in enumerate(zip(args, kinds)):
        if not (isinstance(array, np.ndarray) and array.dtype == dtype and array.ndim == ndim
                and array.flags.c_contiguous and array.flags.writeable):
            raise TypeError(f"argument {position}: expected a writeable C-contiguous {np.dtype(dtype)} array of "
                            f"{ndim} dimension(s), got {type(array).__name__} {getattr(array, 'dtype', '')} "
                            f"of shape {getattr(array, 'shape', ())}")


def unit_step(unit, inp, tile, weights, meta):
    """Advance S streams one step through one unit (one direction of one layer), in place.

    inp (S, I); tile (S, state_size), one state row per stream. Returns the unit's new h, an (S, Hp) view
    into the tile.
    """
    row = meta[HEADER + ROW * unit:HEADER + ROW * (unit + 1)].tolist()
    kind, I, H, offset, HP = row[U_KIND], row[U_INPUT], row[U_HIDDEN], row[U_STATE], row[U_OUT]
    coupled = (row[U_FLAGS] & F_COUPLED) != 0
    GH = int(GATE_BLOCKS[kind] - coupled) * H  # rows of all gate blocks
    WT, RT = weights[row[U_WT]:row[U_WT] + I * GH], weights[row[U_RT]:row[U_RT] + HP * GH]
    bW, bR = weights[row[U_BW]:row[U_BW] + GH], weights[row[U_BR]:row[U_BR] + GH]
    acts = row[U_ACT_F:U_ACT_H + 1]
    params = weights[row[U_PARAMS]:row[U_PARAMS] + 7]
    extra, proj = row[U_EXTRA], row[U_PROJ]
    h = tile[:, offset:offset + HP]
    if kind == LSTM:
        P = weights[extra:extra + GH - H] if extra >= 0 else None  # i, f, o: 3H, or 2H when coupled
        projT = weights[proj:proj + H * HP].reshape(H, HP) if proj >= 0 else None
        lstm_layer_numpy(inp, h, tile[:, offset + HP:offset + HP + H], WT.reshape(I, GH), RT.reshape(HP, GH),
                         bW, bR, P, projT, coupled, acts, params)
    elif kind == GRU or kind == GRU_RESET_FIRST:
        gru_layer_numpy(inp, h, WT.reshape(I, GH), RT.reshape(H, GH), bW, bR, kind == GRU, acts, params)
    elif kind == MGU:  # two transposed blocks, f then n
        mgu_layer_numpy(inp, h, WT.reshape(2, I, H), RT.reshape(2, H, H), bW, bR, acts, params)
    elif kind == LEAKY:
        leaky_layer_numpy(inp, h, WT.reshape(I, H), RT.reshape(H, H), bW, bR, weights[extra:extra + H], acts,
                          params)
    else:
        rnn_layer_numpy(inp, h, WT.reshape(I, H), RT.reshape(H, H), bW, bR, acts, params)
    return h


def head(inp, weights, meta):
    """The dense layers on inp (S, width) -> (S, O); without any, inp itself."""
    n_units = meta[H_UNITS]
    for d in range(meta[H_DENSE]):
        act, K, N, _, wt, b, params = meta[HEADER + ROW * (n_units + d):HEADER + ROW * (n_units + d) + 7].tolist()
        inp = dense_layer_numpy(inp, weights[wt:wt + K * N].reshape(K, N), weights[b:b + N], act,
                                weights[params], weights[params + 1])
    return inp


def advance(xin, tile, weights, meta):
    """S streams one step through every unit, then the head (streamable models only): xin (S, I)
    normalised inputs; tile (S, state_size) advanced in place; returns (S, O)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a state that overflows is inf, silently, as in Numba
        inp = xin
        for unit in range(meta[H_UNITS]):
            inp = unit_step(unit, inp, tile, weights, meta)
        return head(inp, weights, meta)


def _normalised(X, weights, meta):
    """(X - mean) / std, or X without normalisation."""
    if not meta[H_NORMALIZE]:
        return X
    n_in, mean, std = meta[H_INPUT], meta[H_MEAN], meta[H_STD]
    return (X - weights[mean:mean + n_in]) / weights[std:std + n_in]


def step_one(x, state, weights, meta, work, y):
    """One stream, one sample: x (I,) -> y (O,), state (state_size,) advanced in place."""
    _match((x, state, weights, meta, work, y), _STEP)
    if x.shape[0] != meta[H_INPUT]:
        return BAD_INPUT_SHAPE
    if y.shape[0] != meta[H_OUTPUT]:
        return BAD_OUTPUT_SHAPE
    if state.shape[0] != meta[H_STATE]:
        return BAD_STATE_SHAPE
    if not np.isfinite(x).all():
        return NOT_FINITE
    y[:] = advance(_normalised(x[None], weights, meta), state[None], weights, meta)[0]
    return OK


def _check_sequence(xs, state, meta, ys):
    if xs.shape[1] != meta[H_INPUT] or ys.shape[0] != xs.shape[0] or ys.shape[1] != meta[H_OUTPUT]:
        return BAD_INPUT_SHAPE
    if state.shape[0] != meta[H_STATE]:
        return BAD_STATE_SHAPE
    if not np.isfinite(xs).all():
        return NOT_FINITE
    return OK


def run_sequence(xs, state, weights, meta, work, ys):
    """One stream, T samples: xs (T, I) -> ys (T, O), state (state_size,) advanced T steps."""
    _match((xs, state, weights, meta, work, ys), _SEQUENCE)
    status = _check_sequence(xs, state, meta, ys)
    if status != OK:
        return status
    xin, tile = _normalised(xs, weights, meta), state[None]
    for t in range(xs.shape[0]):
        ys[t] = advance(xin[t:t + 1], tile, weights, meta)[0]
    return OK


def run_layers(xs, state, weights, meta, work, ys):
    """One stream, T samples, layer after layer over the whole sequence (reverse and bidirectional units),
    as `edgernn.stack.run_layers`: each unit's final state is left in ``state``."""
    _match((xs, state, weights, meta, work, ys), _SEQUENCE)
    status = _check_sequence(xs, state, meta, ys)
    if status != OK:
        return status
    T, n_units = xs.shape[0], meta[H_UNITS]
    seq, tile, directions = _normalised(xs, weights, meta), state[None], []
    with np.errstate(over="ignore", invalid="ignore"):  # as in `advance`
        for unit in range(n_units):
            base = HEADER + ROW * unit
            hs = np.empty((T, meta[base + U_OUT]), np.float32)
            for t in (range(T - 1, -1, -1) if meta[base + U_FLAGS] & F_REVERSE else range(T)):
                hs[t] = unit_step(unit, seq[t:t + 1], tile, weights, meta)[0]
            directions.append(hs)
            if unit + 1 == n_units or not meta[base + ROW + U_FLAGS] & F_SECOND:  # the layer is complete
                seq, directions = np.concatenate(directions, axis=1), []
        ys[:] = head(seq, weights, meta)
    return OK


def _check_batch(states, slots, X, meta, marks, Y):
    """Shapes, slots in range and distinct, finite X; in `edgernn.stack._check_batch`'s order."""
    if X.shape[1] != meta[H_INPUT] or Y.shape[1] != meta[H_OUTPUT]:
        return BAD_INPUT_SHAPE
    if slots.shape[0] != X.shape[0] or Y.shape[0] != X.shape[0]:
        return BAD_SAMPLE_COUNT
    if states.shape[1] != meta[H_STATE] or marks.shape[0] < states.shape[0]:
        return BAD_STATE_SHAPE
    if slots.size and (slots.min() < 0 or slots.max() >= states.shape[0]):
        return BAD_SLOT
    if np.unique(slots).size != slots.size:
        return DUPLICATE_SLOT
    if not np.isfinite(X).all():
        return NOT_FINITE
    return OK


def step_rows(states, slots, X, weights, meta, work, marks, Y):
    """Many streams, one sample each: rows ``states[slots]`` advanced by X (n, I) into Y (n, O)."""
    _match((states, slots, X, weights, meta, work, marks, Y), _BATCH)
    status = _check_batch(states, slots, X, meta, marks, Y)
    if status != OK:
        return status
    if slots.size:
        tile = states[slots]  # a gathered copy, scattered back after
        Y[:] = advance(_normalised(X, weights, meta), tile, weights, meta)
        states[slots] = tile
    return OK


step_rows_parallel = step_rows
"""NumPy runs each operation on the calling thread: there is no thread pool to spread tiles over."""
