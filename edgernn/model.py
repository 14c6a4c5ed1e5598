"""`Model`: a spec plus its weights, stepping streams one sample at a time through the Numba kernels
(`edgernn.stack`; where numba cannot be imported, their NumPy equivalents in `edgernn.numpy_stack`).

    state = model.new_state()          # (state_size,) float32, the rest state
    y = model.step(x, state)           # x (I,) -> y (O,); state advanced in place
    ys = model.run(xs, state)          # xs (T, I) -> ys (T, O); equal to T calls of step
    Y = model.step_batch(states, slots, X)   # rows states[slots] advanced by X (n, I) -> Y (n, O)

Every input is checked (shape, dtype, finite) and a rejected call raises `InputError` before any state
changes. The checks cost almost nothing on the fast path: the kernels are compiled for exactly one
signature (float32, C-contiguous) with further compilation disabled, so the dispatcher itself refuses
any other dtype or layout with a TypeError, which only then sends the call down a slower path that
converts what can be converted safely and explains what cannot (PERF_NOTES.md, item 5).
"""

from __future__ import annotations

import threading

import numpy as np

from . import stack
from .errors import InputError, SpecError, StreamingError
from .jit import NUMBA_AVAILABLE, thread_count
from .plan import ALIGNMENT, aligned_zeros, pack
from .spec import REST_STATE, ModelSpec, check_weights

_F32_1D = "float32[::1]"
_F32_2D = "float32[:, ::1]"
_I64_1D = "int64[::1]"
_U8_1D = "uint8[::1]"
_BATCH = f"int64({_F32_2D}, {_I64_1D}, {_F32_2D}, {_F32_1D}, {_I64_1D}, {_F32_2D}, {_U8_1D}, {_F32_2D})"
_SIGNATURES = {
    "step_one": f"int64({_F32_1D}, {_F32_1D}, {_F32_1D}, {_I64_1D}, {_F32_1D}, {_F32_1D})",
    "run_sequence": f"int64({_F32_2D}, {_F32_1D}, {_F32_1D}, {_I64_1D}, {_F32_1D}, {_F32_2D})",
    "run_layers": f"int64({_F32_2D}, {_F32_1D}, {_F32_1D}, {_I64_1D}, {_F32_1D}, {_F32_2D})",
    "step_rows": _BATCH,
    "step_rows_parallel": _BATCH,
}
PARALLEL_MIN_STREAMS = 64
"""Batches smaller than this run on the calling thread: waking the thread pool costs more than it saves."""


if NUMBA_AVAILABLE:
    _kernels = stack
else:  # numba is not importable (edgernn.jit has warned): the same kernels in NumPy, slower
    from . import numpy_stack as _kernels


def _kernel(name: str):
    """The named kernel, compiled (or loaded from Numba's cache) for its one signature on first use."""
    dispatcher = getattr(_kernels, name)
    if not hasattr(dispatcher, "signatures"):  # NUMBA_DISABLE_JIT=1 (coverage runs): plain Python
        return dispatcher
    if not dispatcher.signatures:
        dispatcher.compile(_SIGNATURES[name])
        dispatcher.disable_compile()
    return dispatcher


def _as_float32(value, what: str, ndim: int) -> np.ndarray:
    """``value`` as a C-contiguous float32 array of ``ndim`` dimensions, or a clear InputError."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":  # floats and integers; not bool, complex, strings or objects
        raise InputError(f"{what}: must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise InputError(f"{what}: must have {ndim} dimension(s), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


class Model:
    """A recurrent model ready to step. Build one with `edgernn.load` or a converter.

    ``weights`` must hold exactly the tensors ``spec.tensor_shapes()`` names, with those shapes.
    A Model may be shared by threads (each call holds the GIL), but each state belongs to one caller.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray]):
        if not isinstance(spec, ModelSpec):
            raise SpecError(f"spec: must be a ModelSpec, got {type(spec).__name__}")
        self.spec = spec
        self.weights = check_weights(spec, weights)
        plan = pack(spec, self.weights)
        self._packed, self._meta = plan.weights, plan.meta
        self.input_size, self.output_size, self.state_size = spec.input_size, spec.output_size, spec.state_size
        # The state every stream starts from (and a reset returns to): the file's, else zeros.
        self._rest_state = self.weights.get(REST_STATE, np.zeros(self.state_size, np.float32)).copy()
        self.sample_period = spec.sample_period
        """Seconds between samples (``1 / spec.sample_rate``), or None when the model does not say."""
        # Scratch, allocated once. Kernels hold the GIL, so one stream's scratch is never shared by two
        # running calls; the batched kernels' scratch and row marks are guarded by a lock.
        self._work = aligned_zeros(stack.work_size(self._meta, 1))
        self._tile_work = None
        self._marks = np.zeros(0, np.uint8)
        self._batch_lock = threading.Lock()
        self.streamable = spec.streamable
        self._step_one = _kernel("step_one") if self.streamable else self._refuse_streaming

    def __repr__(self):
        layers = " -> ".join(f"{layer.cell}({layer.hidden_size}{', ' + layer.direction if layer.direction != 'forward' else ''})"
                             for layer in self.spec.layers)
        head = "".join(f" -> dense({d.out_features}, {d.activation})" for d in self.spec.head)
        return f"<edgernn.Model {self.input_size} -> {layers}{head}>"

    # ---- states --------------------------------------------------------------------------------
    def new_state(self, batch: int | None = None) -> np.ndarray:
        """The rest state: (state_size,) float32, or (batch, state_size) for ``batch`` streams.

        The model file's rest state (``spec.rest_state`` says where it came from), else zeros."""
        if batch is None:
            return self._rest_state.copy()
        if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 0:
            raise InputError(f"batch: must be a non-negative integer, got {batch!r}")
        states = aligned_zeros((int(batch), self.state_size))
        states[:] = self._rest_state
        return states

    def reset(self, states: np.ndarray, slots) -> None:
        """Put rows ``states[slots]`` back to the rest state (what `new_state` returns)."""
        _check_state(states, self.state_size, 2)
        slots = _as_slots(slots, len(states))
        states[slots] = self._rest_state

    def _refuse_streaming(self, *_):
        """Stands in for the step kernel of a model that cannot advance one sample at a time."""
        index, layer = next((i, l) for i, l in enumerate(self.spec.layers) if l.direction != "forward")
        raise StreamingError(
            f"layer {index} is {layer.direction}: it needs the whole sequence (a reverse pass reads the last "
            "sample first), so this model cannot step one sample at a time; use model.run(xs, state) over a "
            "sequence or a sliding window of one")

    # ---- one stream ----------------------------------------------------------------------------
    def step(self, x, state: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Advance one stream by one sample: x (input_size,) -> y (output_size,); ``state`` in place.

        ``out``, a float32 (output_size,) array, receives y instead of a new array (no allocation).
        With a (B, state_size) state from ``new_state(batch=B)``, x is (B, input_size) and y (B, output_size).
        """
        y = np.empty(self.output_size, np.float32) if out is None else out
        try:
            status = self._step_one(x, state, self._packed, self._meta, self._work, y)
        except TypeError:  # not float32 C-contiguous 1-D arrays: convert what can be, refuse the rest
            if isinstance(state, np.ndarray) and state.ndim == 2:
                return self._step_all_rows(x, state, "x")
            _check_state(state, self.state_size, 1)
            _check_out(y, (self.output_size,))
            x = _as_float32(x, "x", 1)
            status = self._step_one(x, state, self._packed, self._meta, self._work, y)
        if status != stack.OK:
            self._raise(status, "x", x, state)
        return y

    def run(self, xs, state: np.ndarray) -> np.ndarray:
        """Advance one stream through a sequence: xs (T, input_size) -> ys (T, output_size).

        Equal to T calls of `step`. With a (B, state_size) state, xs is (T, B, input_size). A model with
        reverse or bidirectional layers runs layer after layer over the whole sequence, and leaves each
        direction's final state in ``state`` (a reverse direction's is the one after reading xs[0]).
        """
        if isinstance(state, np.ndarray) and state.ndim == 2:
            _check_state(state, self.state_size, 2)
            xs = _as_float32(xs, "xs", 3)
            if xs.shape[1:] != (len(state), self.input_size):
                raise InputError(f"xs: expected shape (T, {len(state)}, {self.input_size}) for a state of "
                                 f"{len(state)} streams, got {xs.shape}")
            if not np.isfinite(xs).all():  # refuse before the first step, as for one stream
                self._raise(stack.NOT_FINITE, "xs", xs, state)
            ys = np.empty((len(xs), len(state), self.output_size), np.float32)
            if not self.streamable:  # whole sequences, one stream after another
                for b in range(len(state)):
                    ys[:, b] = self.run(xs[:, b], state[b])
                return ys
            for t, x in enumerate(xs):
                ys[t] = self._step_all_rows(x, state, "xs")
            return ys
        _check_state(state, self.state_size, 1)
        xs = _as_float32(xs, "xs", 2)
        ys = np.empty((xs.shape[0], self.output_size), np.float32)
        kernel = _kernel("run_sequence" if self.streamable else "run_layers")
        status = kernel(xs, state, self._packed, self._meta, self._work, ys)
        if status != stack.OK:
            self._raise(status, "xs", xs, state)
        return ys

    # ---- many streams --------------------------------------------------------------------------
    def step_batch(self, states: np.ndarray, slots, X, out: np.ndarray | None = None,
                   parallel: bool | None = None) -> np.ndarray:
        """Advance rows ``states[slots]`` of a state table by one sample each: X (n, input_size) -> Y.

        ``states`` is a (capacity, state_size) float32 table (see `edgernn.StreamTable`); ``slots`` (n,)
        must be distinct. Rows not named are untouched. Large batches run on all of Numba's threads.
        ``out``, a float32 (n, output_size) array, receives Y instead of a new array: a tick loop that
        reuses one saves allocating (and page-faulting in) megabytes per tick.
        ``parallel``: run on Numba's threads (True), on the calling thread (False), or by batch size (None:
        from `PARALLEL_MIN_STREAMS` rows). A process whose other threads are busy (the daemon's MQTT
        thread) is better served on one thread: waking the pool then costs more than it saves.
        """
        return self._step_rows(states, slots, X, "X", out, parallel)

    def _step_rows(self, states, slots, X, name: str, out=None, parallel=None) -> np.ndarray:
        if not self.streamable:
            self._refuse_streaming()
        _check_state(states, self.state_size, 2)
        slots = _as_slots(slots, None)
        X = _as_float32(X, name, 2)
        Y = np.empty((X.shape[0], self.output_size), np.float32) if out is None else out
        _check_out(Y, (X.shape[0], self.output_size))
        if parallel is None:
            parallel = X.shape[0] >= PARALLEL_MIN_STREAMS
        kernel = _kernel("step_rows_parallel" if parallel else "step_rows")
        with self._batch_lock:
            if len(self._marks) < len(states):
                self._marks = np.zeros(len(states), np.uint8)
            status = kernel(states, slots, X, self._packed, self._meta, self._tiles_work(), self._marks, Y)
        if status != stack.OK:
            self._raise(status, name, X, states, slots)
        return Y

    def _step_all_rows(self, X, states, name: str):
        return self._step_rows(states, np.arange(len(states)), X, name)

    def _tiles_work(self) -> np.ndarray:
        """Scratch for the batched kernels: one row per Numba thread, allocated once."""
        if self._tile_work is None:
            size = stack.work_size(self._meta, stack.TILE)
            size += -size % (ALIGNMENT // 4)  # every thread's row starts on its own cache line
            self._tile_work = aligned_zeros((thread_count(), size))
        return self._tile_work

    # ---- errors --------------------------------------------------------------------------------
    def _raise(self, status, name, x, state, slots=None):
        if status == stack.BAD_STATE_SHAPE:
            raise InputError(f"state: expected {self.state_size} floats per stream (from model.new_state()), "
                             f"got shape {np.shape(state)}")
        if status == stack.BAD_SLOT:
            raise InputError(f"slots: every slot must lie in [0, {len(state)}), got {slots.min()}..{slots.max()}")
        if status == stack.DUPLICATE_SLOT:
            values, counts = np.unique(slots, return_counts=True)
            raise InputError(f"slots: slot {values[counts > 1][0]} appears more than once; one sample per "
                             "stream per call")
        if status == stack.BAD_OUTPUT_SHAPE:
            raise InputError(f"out: must be a writeable C-contiguous float32 array of shape {(self.output_size,)}")
        if status == stack.BAD_SAMPLE_COUNT:
            raise InputError(f"{name}: {len(x)} samples for {len(slots)} slots; give one sample per slot")
        x = np.asarray(x)
        if status == stack.NOT_FINITE:
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise InputError(f"{name}: holds a non-finite value ({x[where]}) at index "
                             f"{where[0] if len(where) == 1 else where}; the state was not changed")
        raise InputError(f"{name}: expected {self.input_size} features per sample, got shape {x.shape}")


def _as_slots(slots, capacity: int | None) -> np.ndarray:
    """``slots`` as a 1-D int64 array (integers only: a float slot is a bug, not a row to round to)."""
    array = np.asarray(slots)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or array.ndim != 1:
        raise InputError(f"slots: must be a 1-D array of integers, got {array.dtype} of shape {array.shape}")
    if capacity is not None and array.size and (array.min() < 0 or array.max() >= capacity):
        raise InputError(f"slots: every slot must lie in [0, {capacity}), got {array.min()}..{array.max()}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_out(out, shape: tuple) -> None:
    """A caller's output array must be what a kernel can write into: float32, C-contiguous, writeable."""
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
            and out.flags.c_contiguous and out.flags.writeable):
        raise InputError(f"out: must be a writeable C-contiguous float32 array of shape {shape}")


def _check_state(state, size: int, ndim: int) -> None:
    if not isinstance(state, np.ndarray) or state.dtype != np.float32:
        raise InputError("state: must be a float32 array from model.new_state(), "
                         f"got {type(state).__name__} {getattr(state, 'dtype', '')}".rstrip())
    if state.ndim != ndim or state.shape[-1] != size:
        raise InputError(f"state: expected shape {'(n, ' if ndim == 2 else '('}{size}) from model.new_state(), "
                         f"got {state.shape}")
    if not state.flags.c_contiguous or not state.flags.writeable:
        raise InputError("state: must be a writeable C-contiguous array (it is updated in place)")
