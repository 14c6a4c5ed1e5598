"""Step latency of edgernn against PyTorch eager, onnxruntime, a GEMM and the FLOP floor, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/step_latency.py              # full run (about 70 s on 2 cores)
    .venv/bin/python benchmarks/step_latency.py --quick      # smoke run: few repeats
    .venv/bin/python benchmarks/step_latency.py --markdown   # only the tables, for the README
    .venv/bin/python benchmarks/step_latency.py --json out.json   # also write the raw numbers
    .venv/bin/python benchmarks/step_latency.py --passive    # OMP_WAIT_POLICY=PASSIVE, OpenBLAS threads sleep

What it measures (float32, input 8, random weights, one recurrent layer, no head):

1. One stream, µs per step (median over repeats of the mean of a loop of calls; the backends' repeats
   interleaved so drift hits all alike), for RNN (tanh), GRU and LSTM at hidden 32/64/128, one thread:
   - edgernn ``model.step(x, state)`` -- the checked call a user makes, after a warm-up call that compiles;
   - PyTorch eager ``nn.LSTM``/``nn.GRU``/``nn.RNN`` at seq_len 1 passing the state back each step, and
     the cell modules ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell`` (``torch.no_grad``, 1 thread, the input
     tensor made once -- the most favourable case for torch);
   - onnxruntime running a one-step ONNX model (the LSTM/GRU/RNN operator, seq_length 1, opset 17, state as
     inputs and outputs), ``session.run`` fed a dict of numpy arrays with the previous step's state;
   - the physical floor: FLOPs per step (LSTM 2*4*H*(I+H), GRU 2*3*H*(I+H), RNN 2*H*(I+H)) divided by one
     core's float32 rate, measured in this run with a large single-threaded matmul (numpy's OpenBLAS and
     torch; the faster one counts), and edgernn's fraction of that floor.
   Before timing, every backend is checked to compute the same outputs for a few steps.
2. Many streams, LSTM H=64: time per tick (every stream advances one sample) for 1,000 and 10,000 streams,
   and for 1,000 scattered slots of a 10,000-row table, with all the machine's cores: edgernn
   ``model.step_batch(states, slots, X)``; one float32 GEMM of the same size ([x; h] (N, I+H) @ (I+H, 4H),
   numpy); torch eager ``nn.LSTMCell`` on the batch; onnxruntime on the batch with IOBinding. The
   baselines step a contiguous batch of the same size in every case (a scattered one would need a gather
   and scatter on top). Backends take turns, repeat by repeat, with a pause after each turn.
3. Numba compile time: a fresh ``python`` child that imports edgernn, loads the model (``edgernn.load`` of
   a saved file when ``edgernn.format`` exists, else ``Model(spec, weights)``) and makes its first ``step``,
   then its first ``step_batch`` of 4 and of 1,024 streams (small and large batches may use different
   kernels), first with an empty ``NUMBA_CACHE_DIR`` and then again with that warm cache (best of 3). The
   child's wall time from python start to the first step's result (python start + import + load + first
   step, measured from the parent) is the "warm start" figure.
4. The headline ratios against their targets.

Thread pools: by default OpenBLAS, libgomp (Numba's omp layer, torch) and onnxruntime spin-wait after each
call (see PERF_NOTES item 6). Default measurements keep those defaults; ``--passive`` sets
``OMP_WAIT_POLICY=PASSIVE`` and ``OPENBLAS_THREAD_TIMEOUT=4`` before anything is imported and turns off
onnxruntime's spinning, so run both to see the difference. The script sleeps briefly between backends so
one pool's spinning does not land in the next one's timing.

This machine's speed drifts (whole minutes ~1.5-2x slower, invisible as steal time), so absolute numbers
move between runs; the interleaving keeps ratios steadier. The run reports how much CPU other processes
used in each section and warns when it is more than a tenth of a core.
"""

from __future__ import annotations

import os
import sys

# Thread-pool environment must be set before numpy (OpenBLAS), numba or torch (libgomp) are imported.
PASSIVE = "--passive" in sys.argv[1:]
if PASSIVE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edgernn.spec import ModelSpec, RecurrentLayer  # noqa: E402

INPUT = 8
HIDDENS = (32, 64, 128)
CELLS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
TORCH_NAMES = {"rnn": ("RNN", "RNNCell"), "gru": ("GRU", "GRUCell"), "lstm": ("LSTM", "LSTMCell")}
ONNX_OPS = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
# Canonical (PyTorch) gate blocks -> ONNX order: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h.
ONNX_GATE_ORDER = {"rnn": [0], "gru": [1, 0, 2], "lstm": [0, 3, 1, 2]}
BATCH_H = 64
TABLE_ROWS = 10_000
PARITY_TOL = 1e-4
SETTLE_S = 0.15  # pause between backends so the previous pool's spin-wait (OpenBLAS: ~0.1 s) has ended

TARGETS = {
    "lstm64_vs_torch_lstm": 30.0,   # edgernn at least this many times faster
    "lstm64_vs_onnxruntime": 5.0,
    "tick10k_vs_gemm": 2.0,          # edgernn tick at most this many GEMM times
    "warm_start_s": 2.0,             # python start to first step, warm cache
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settle() -> None:
    time.sleep(SETTLE_S)


# ---- machine ---------------------------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
        return "not installed"


def machine_info() -> dict:
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags.split()]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "simd": simd,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "loadavg_start": _loadavg(),
        "passive": PASSIVE,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "(default)"),
    }


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """CPU time other processes used while a section ran (from /proc/stat minus this process and its
    children): on a 2-core machine any other busy process skews every number, the batched ones most."""

    def __init__(self):
        self.sections: dict[str, dict] = {}

    @staticmethod
    def _snapshot():
        times = os.times()
        mine = times.user + times.system + times.children_user + times.children_system
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return time.perf_counter(), None, mine, None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        steal = fields[7] / tick if len(fields) > 7 else 0.0
        return time.perf_counter(), busy, mine, steal

    def section(self, name: str):
        watch = self

        class _Section:
            def __enter__(self):
                self.start = watch._snapshot()

            def __exit__(self, *exc):
                end = watch._snapshot()
                wall = end[0] - self.start[0]
                if end[1] is None or wall <= 0:
                    return
                watch.sections[name] = {
                    "wall_s": wall,
                    "other_cores": max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / wall,
                    "steal_cores": (end[3] - self.start[3]) / wall,
                }

        return _Section()

    def summary(self) -> str:
        return "; ".join(f"{name} {v['other_cores']:.2f} (steal {v['steal_cores']:.2f})"
                         for name, v in self.sections.items())

    def warning(self, threshold: float = 0.1) -> str:
        busy = [name for name, v in self.sections.items() if v["other_cores"] + v["steal_cores"] > threshold]
        if not busy:
            return ""
        return (f"WARNING: other processes used CPU during: {', '.join(busy)}. Those numbers are unreliable, "
                "the multi-threaded ones most; rerun on an idle machine.")


class OpenBLASThreads:
    """Set numpy's OpenBLAS thread count at run time (what threadpoolctl does), through ctypes."""

    NAMES = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")

    def __init__(self):
        self._set = None
        try:
            import threadpoolctl  # noqa: F401 - preferred when present

            self._controller = threadpoolctl.ThreadpoolController()
            self._set = lambda n: self._controller.limit(limits=n, user_api="blas")
            return
        except ImportError:
            pass
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        for path in sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}):
            lib = ctypes.CDLL(path)
            for name in self.NAMES:
                if hasattr(lib, name):
                    self._set = getattr(lib, name)
                    return

    @property
    def available(self) -> bool:
        return self._set is not None

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(int(n))


# ---- timing ----------------------------------------------------------------------------------------

def calibrate(run, repeat_s: float) -> int:
    """How many calls ``run(n)`` needs for one repeat to last about ``repeat_s``."""
    run(1)  # a first call after set-up can be slow (page faults, a thread pool waking): keep it out of n
    n = 1
    while True:
        start = time.perf_counter()
        run(n)
        elapsed = time.perf_counter() - start
        if elapsed >= repeat_s / 4 or n >= 1 << 22:
            break
        n *= 4 if elapsed < repeat_s / 40 else 2
    return max(1, int(n * repeat_s / max(elapsed, 1e-9)))


def measure_many(runs: dict, repeats: int, repeat_s: float, pause_s: float = 0.0) -> dict[str, dict]:
    """Per-call time (µs) of each ``run(n)`` in ``runs``: median, min and max over ``repeats``.

    The backends' repeats are interleaved (A B C A B C ...), so a slow patch of the machine (another
    process, a frequency change) lands on all of them alike and the ratios between them stay steady.
    ``pause_s``: sleep after each backend's turn (lets a multi-threaded backend's pool stop spinning); each
    turn then starts with one untimed call, so the timing is of sustained ticks, not of waking threads.
    """
    calls = {}
    for name, run in runs.items():
        calls[name] = calibrate(run, repeat_s)
        time.sleep(pause_s)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            n = calls[name]
            if pause_s:
                run(1)  # after a pause the pool's threads (and an idle vCPU) need waking: not part of a tick
            start = time.perf_counter_ns()
            run(n)
            samples[name].append((time.perf_counter_ns() - start) / n / 1e3)
            time.sleep(pause_s)
    return {
        name: {"median_us": statistics.median(values), "min_us": min(values), "max_us": max(values),
               "calls_per_repeat": calls[name], "repeats": repeats}
        for name, values in samples.items()
    }


def measure(run, repeats: int, repeat_s: float) -> dict:
    """`measure_many` of one backend."""
    return measure_many({"run": run}, repeats, repeat_s)["run"]


# ---- models ----------------------------------------------------------------------------------------

def random_spec_weights(cell: str, hidden: int, seed: int = 0):
    spec = ModelSpec(input_size=INPUT, layers=(RecurrentLayer(cell, INPUT, hidden),), head=())
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) * 0.2 for n, s in spec.tensor_shapes().items()}
    return spec, weights


def edgernn_model(spec, weights):
    """The edgernn Model, or None while edgernn/model.py does not exist yet."""
    try:
        from edgernn.model import Model
    except ImportError as exc:
        log(f"  edgernn.model not importable ({exc}); edgernn columns skipped")
        return None
    return Model(spec, weights)


def torch_modules(cell: str, weights: dict):
    """(sequence module, cell module) holding ``weights``."""
    import torch

    hidden = weights["layers.0.R"].shape[1]
    seq_name, cell_name = TORCH_NAMES[cell]
    seq = getattr(torch.nn, seq_name)(INPUT, hidden)
    one = getattr(torch.nn, cell_name)(INPUT, hidden)
    with torch.no_grad():
        for suffix_seq, suffix_cell, key in (("weight_ih_l0", "weight_ih", "W"), ("weight_hh_l0", "weight_hh", "R"),
                                             ("bias_ih_l0", "bias_ih", "Wb"), ("bias_hh_l0", "bias_hh", "Rb")):
            value = torch.from_numpy(weights[f"layers.0.{key}"])
            getattr(seq, suffix_seq).copy_(value)
            getattr(one, suffix_cell).copy_(value)
    return seq.eval(), one.eval()


def onnx_step_model(cell: str, weights: dict, path: Path) -> None:
    """Write a one-step ONNX model: X (1, B, I), h0 (1, B, H)[, c0] -> Y_h[, Y_c]; B is symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = weights["layers.0.R"].shape[1]
    order = ONNX_GATE_ORDER[cell]

    def permute(a):
        blocks = np.split(a, len(order), axis=0)
        return np.concatenate([blocks[g] for g in order], axis=0)

    W = permute(weights["layers.0.W"])[None]
    R = permute(weights["layers.0.R"])[None]
    B = np.concatenate([permute(weights["layers.0.Wb"]), permute(weights["layers.0.Rb"])])[None]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((W, "W"), (R, "R"), (B, "B"))]
    lstm = cell == "lstm"
    inputs = ["X", "W", "R", "B", "", "h0"] + (["c0"] if lstm else [])
    outputs = ["", "Y_h"] + (["Y_c"] if lstm else [])
    attrs = {"hidden_size": hidden}
    if cell == "gru":
        attrs["linear_before_reset"] = 1
    node = helper.make_node(ONNX_OPS[cell], inputs, outputs, **attrs)

    def value(name, width):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "batch", width])

    graph = helper.make_graph(
        [node], f"{cell}_step",
        [value("X", INPUT), value("h0", hidden)] + ([value("c0", hidden)] if lstm else []),
        [value("Y_h", hidden)] + ([value("Y_c", hidden)] if lstm else []),
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if PASSIVE:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- one stream ------------------------------------------------------------------------------------

def parity_one_stream(cell, model, seq, one, session, steps: int = 5) -> dict:
    """Max abs difference of each backend's h after ``steps`` steps from zero state, against torch nn.X."""
    import torch

    hidden = seq.hidden_size
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((steps, INPUT)).astype(np.float32)
    lstm = cell == "lstm"
    with torch.no_grad():
        ref, _ = seq(torch.from_numpy(xs[:, None, :]))
        ref = ref[:, 0, :].numpy()
        hc = (torch.zeros(1, hidden), torch.zeros(1, hidden)) if lstm else torch.zeros(1, hidden)
        cell_out = []
        for x in xs:
            hc = one(torch.from_numpy(x[None]), hc)
            cell_out.append((hc[0] if lstm else hc)[0].numpy().copy())
    feeds = {"h0": np.zeros((1, 1, hidden), np.float32)}
    if lstm:
        feeds["c0"] = np.zeros((1, 1, hidden), np.float32)
    ort_out = []
    for x in xs:
        feeds["X"] = x[None, None]
        result = session.run(None, feeds)
        feeds["h0"] = result[0]
        if lstm:
            feeds["c0"] = result[1]
        ort_out.append(result[0][0, 0])
    diffs = {
        "torch_cell": float(np.abs(np.array(cell_out) - ref).max()),
        "onnxruntime": float(np.abs(np.array(ort_out) - ref).max()),
    }
    if model is not None:
        state = model.new_state()
        ys = np.array([model.step(x, state) for x in xs])
        diffs["edgernn"] = float(np.abs(ys - ref).max())
    return diffs


def loop_edgernn_step(model):
    """``run(n)``: n checked ``model.step`` calls on one stream."""
    step = model.step
    state = model.new_state()
    x = np.random.default_rng(2).standard_normal(INPUT).astype(np.float32)
    step(x, state)  # compile (or load from cache) before timing

    def run(n):
        for _ in range(n):
            step(x, state)

    return run


def loop_torch_seq(cell, seq):
    """``run(n)``: n calls of nn.LSTM/GRU/RNN on a length-1 sequence, the state passed back each step."""
    import torch

    hidden = seq.hidden_size
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 1, INPUT)).astype(np.float32))
    if cell == "lstm":
        def run(n):
            state = (torch.zeros(1, 1, hidden), torch.zeros(1, 1, hidden))
            with torch.no_grad():
                for _ in range(n):
                    y, state = seq(x, state)
    else:
        def run(n):
            state = torch.zeros(1, 1, hidden)
            with torch.no_grad():
                for _ in range(n):
                    y, state = seq(x, state)
    return run


def loop_torch_cell(cell, one):
    """``run(n)``: n calls of nn.LSTMCell/GRUCell/RNNCell, the state passed back each step."""
    import torch

    hidden = one.hidden_size
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, INPUT)).astype(np.float32))
    if cell == "lstm":
        def run(n):
            state = (torch.zeros(1, hidden), torch.zeros(1, hidden))
            with torch.no_grad():
                for _ in range(n):
                    state = one(x, state)
    else:
        def run(n):
            state = torch.zeros(1, hidden)
            with torch.no_grad():
                for _ in range(n):
                    state = one(x, state)
    return run


def loop_ort_step(cell, session, hidden):
    """``run(n)``: n ``session.run`` calls, the previous step's state fed back in a dict of numpy arrays."""
    x = np.random.default_rng(2).standard_normal((1, 1, INPUT)).astype(np.float32)
    run_session = session.run
    if cell == "lstm":
        names = ["Y_h", "Y_c"]

        def run(n):
            h = np.zeros((1, 1, hidden), np.float32)
            c = np.zeros((1, 1, hidden), np.float32)
            for _ in range(n):
                h, c = run_session(names, {"X": x, "h0": h, "c0": c})
    else:
        names = ["Y_h"]

        def run(n):
            h = np.zeros((1, 1, hidden), np.float32)
            for _ in range(n):
                (h,) = run_session(names, {"X": x, "h0": h})
    return run


def flops_per_step(cell: str, hidden: int, inputs: int = INPUT) -> int:
    return 2 * GATES[cell] * hidden * (inputs + hidden)


def single_stream(cfg, tmp: Path, peak_gflops: float) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    rows = []
    for cell in CELLS:
        for hidden in HIDDENS:
            log(f"one stream: {cell} H={hidden}")
            spec, weights = random_spec_weights(cell, hidden)
            model = edgernn_model(spec, weights)
            seq, one = torch_modules(cell, weights)
            onnx_path = tmp / f"{cell}{hidden}.onnx"
            onnx_step_model(cell, weights, onnx_path)
            session = ort_session(onnx_path, threads=1)
            row = {"cell": cell, "hidden": hidden, "flops": flops_per_step(cell, hidden)}
            row["floor_us"] = row["flops"] / (peak_gflops * 1e3)
            row["parity_max_abs"] = parity_one_stream(cell, model, seq, one, session)
            runs = {"torch_seq": loop_torch_seq(cell, seq), "torch_cell": loop_torch_cell(cell, one),
                    "onnxruntime": loop_ort_step(cell, session, hidden)}
            if model is not None:
                runs["edgernn"] = loop_edgernn_step(model)
            row["edgernn"] = None
            row.update(measure_many(runs, cfg.repeats, cfg.repeat_s))
            rows.append(row)
    return rows


# ---- peak ------------------------------------------------------------------------------------------

def matmul_gflops(blas: OpenBLASThreads, threads: int, size: int, repeats: int) -> dict:
    """Float32 matmul rate (GFLOP/s) of numpy and torch at ``threads`` threads; best of ``repeats``."""
    import torch

    rng = np.random.default_rng(3)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    out = np.empty_like(a)
    flops = 2.0 * size ** 3
    blas.set(threads)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    rates = {"numpy": flops / best / 1e9}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    torch.mm(ta, tb, out=tout)
    best = min(_timed(lambda: torch.mm(ta, tb, out=tout)) for _ in range(repeats))
    rates["torch"] = flops / best / 1e9
    torch.set_num_threads(previous)
    rates["best"] = max(rates["numpy"], rates["torch"])
    return rates


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- many streams ----------------------------------------------------------------------------------

def loop_step_batch(model, states, slots, X):
    """``run(n)``: n edgernn ticks, each advancing rows ``states[slots]`` into a reused output array
    (as the daemon's tick loop does, and as the GEMM baseline writes into a preallocated one)."""
    step_batch = model.step_batch
    Y = step_batch(states, slots, X)  # compile

    def run(n):
        for _ in range(n):
            step_batch(states, slots, X, out=Y)

    return run


def loop_gemm(n_streams, hidden):
    """``run(n)``: n float32 GEMMs [x; h] (N, I+H) @ (I+H, 4H) into a preallocated output (numpy)."""
    rng = np.random.default_rng(4)
    xh = rng.standard_normal((n_streams, INPUT + hidden)).astype(np.float32)
    w = rng.standard_normal((INPUT + hidden, 4 * hidden)).astype(np.float32)
    out = np.empty((n_streams, 4 * hidden), np.float32)

    def run(n):
        for _ in range(n):
            np.matmul(xh, w, out=out)

    return run


def loop_torch_batch(one, n_streams):
    """``run(n)``: n ticks of torch eager nn.LSTMCell over the whole batch."""
    import torch

    hidden = one.hidden_size
    X = torch.from_numpy(np.random.default_rng(4).standard_normal((n_streams, INPUT)).astype(np.float32))

    def run(n):
        state = (torch.zeros(n_streams, hidden), torch.zeros(n_streams, hidden))
        with torch.no_grad():
            for _ in range(n):
                state = one(X, state)

    return run


def loop_ort_batch(session, n_streams, hidden):
    """``run(n)``: n ticks of the ONNX LSTM op over the batch with IOBinding, two state buffers used in turn
    (no allocation per tick)."""
    X = np.random.default_rng(4).standard_normal((1, n_streams, INPUT)).astype(np.float32)
    buffers = [(np.zeros((1, n_streams, hidden), np.float32), np.zeros((1, n_streams, hidden), np.float32))
               for _ in range(2)]
    bindings = []
    for source, target in ((0, 1), (1, 0)):
        io = session.io_binding()
        io.bind_input("X", "cpu", 0, np.float32, list(X.shape), X.ctypes.data)
        for name, array in zip(("h0", "c0"), buffers[source]):
            io.bind_input(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        for name, array in zip(("Y_h", "Y_c"), buffers[target]):
            io.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        bindings.append(io)
    run_binding = session.run_with_iobinding
    first, second = bindings

    def run(n):
        for i in range(n):
            run_binding(first if i % 2 == 0 else second)

    run.bound_arrays = (X, buffers)  # the bindings hold raw pointers: keep the arrays alive with the loop
    return run


def many_streams(cfg, tmp: Path, threads: int, blas: OpenBLASThreads) -> dict:
    import torch

    torch.set_num_threads(threads)
    blas.set(threads)
    try:
        import numba

        numba.set_num_threads(threads)
    except ImportError:
        pass
    spec, weights = random_spec_weights("lstm", BATCH_H)
    model = edgernn_model(spec, weights)
    _, one = torch_modules("lstm", weights)
    onnx_path = tmp / "lstm_batch.onnx"
    onnx_step_model("lstm", weights, onnx_path)
    session = ort_session(onnx_path, threads=threads)
    rng = np.random.default_rng(5)
    cases = [("all slots", 1_000, np.arange(1_000)), ("all slots", 10_000, np.arange(10_000)),
             ("scattered of 10,000", 1_000, rng.permutation(TABLE_ROWS)[:1_000])]
    rows = []
    for label, n_streams, slots in cases:
        log(f"many streams: {n_streams} ({label})")
        row = {"case": label, "streams": n_streams}
        X = rng.standard_normal((n_streams, INPUT)).astype(np.float32)
        runs = {}
        if model is not None:
            table = model.new_state(batch=TABLE_ROWS if "scattered" in label else n_streams)
            runs["edgernn"] = loop_step_batch(model, table, slots.astype(np.int64), X)
        runs["gemm"] = loop_gemm(n_streams, BATCH_H)
        runs["torch_cell"] = loop_torch_batch(one, n_streams)
        runs["onnxruntime_iobinding"] = loop_ort_batch(session, n_streams, BATCH_H)
        # Pause after each backend's repeat so its thread pool has stopped spinning before the next one.
        row.update(measure_many(runs, cfg.batch_repeats, cfg.batch_repeat_s, pause_s=SETTLE_S))
        rows.append(row)
    layer = None
    try:
        import numba

        layer = numba.threading_layer()
    except Exception:  # noqa: BLE001 - raises until a parallel kernel has run
        pass
    return {"threads": threads, "numba_threading_layer": layer, "rows": rows}


# ---- compile time ----------------------------------------------------------------------------------

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import edgernn
t1 = time.perf_counter()
args = json.loads(sys.argv[1])
if args["mode"] == "load":
    model = edgernn.load(args["path"])
else:
    from edgernn.model import Model
    spec = edgernn.ModelSpec.from_json(open(args["spec"]).read())
    with np.load(args["path"]) as data:
        weights = {k: data[k] for k in data.files}
    model = Model(spec, weights)
t2 = time.perf_counter()
state = model.new_state()
x = np.zeros(model.input_size, np.float32)
model.step(x, state)
t3 = time.perf_counter()
states = model.new_state(batch=1024)
model.step_batch(states, np.arange(4, dtype=np.int64), np.zeros((4, model.input_size), np.float32))
t4 = time.perf_counter()
model.step_batch(states, np.arange(1024, dtype=np.int64), np.zeros((1024, model.input_size), np.float32))
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_step_s": t3 - t2,
                  "first_step_batch_4_s": t4 - t3, "first_step_batch_1024_s": t5 - t4}))
"""


def save_child_model(tmp: Path) -> dict:
    """Save the LSTM H=64 model for the child: an edgernn file when edgernn.format exists, else npz."""
    spec, weights = random_spec_weights("lstm", BATCH_H)
    if importlib.util.find_spec("edgernn.format") is not None:
        import edgernn

        path = tmp / "lstm64.ern"
        edgernn.save(edgernn_model(spec, weights), str(path))
        return {"mode": "load", "path": str(path)}
    path, spec_path = tmp / "lstm64.npz", tmp / "lstm64.json"
    np.savez(path, **weights)
    spec_path.write_text(spec.to_json())
    return {"mode": "construct", "path": str(path), "spec": str(spec_path)}


def run_child(args: dict, cache_dir: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"compile-time child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    # What a user waits for: python start to the first step's result (the batch calls come after it).
    result["start_to_first_step_s"] = wall - result["first_step_batch_4_s"] - result["first_step_batch_1024_s"]
    result["load_plus_first_step_s"] = result["load_s"] + result["first_step_s"]
    return result


def compile_times(cfg, tmp: Path) -> dict | None:
    if importlib.util.find_spec("edgernn.model") is None:
        log("compile time: edgernn.model missing, skipped")
        return None
    args = save_child_model(tmp)
    cache = tmp / "numba_cache"
    cache.mkdir()
    log("compile time: child with empty cache")
    cold = run_child(args, cache)
    warm_runs = []
    for i in range(cfg.warm_children):
        log(f"compile time: child with warm cache ({i + 1}/{cfg.warm_children})")
        warm_runs.append(run_child(args, cache))
    warm = min(warm_runs, key=lambda r: r["start_to_first_step_s"])
    cached_files = sum(1 for p in cache.rglob("*") if p.is_file())
    return {"mode": args["mode"], "cold": cold, "warm": warm, "warm_runs": warm_runs,
            "cache_files": cached_files}


# ---- report ----------------------------------------------------------------------------------------

def _us(result) -> str:
    if result is None:
        return "n/a"
    value = result["median_us"]
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ms(result) -> str:
    return "n/a" if result is None else f"{result['median_us'] / 1e3:.3g}"


def _ratio(a, b) -> float | None:
    if a is None or b is None:
        return None
    return a["median_us"] / b["median_us"]


def _x(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}x"


def table_one_stream(rows, peak) -> str:
    lines = [
        f"One stream, µs per step (median), input {INPUT}, float32, 1 thread; floor = FLOPs / "
        f"{peak:.0f} GFLOP/s (one core, measured)",
        "",
        "| cell | H | edgernn `step` | torch nn.RNN/GRU/LSTM | torch *Cell | onnxruntime `run` "
        "| FLOP floor | edgernn % of floor | vs torch seq | vs torch cell | vs onnxruntime |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e = row["edgernn"]
        floor_frac = None if e is None else row["floor_us"] / e["median_us"]
        lines.append(
            f"| {row['cell']} | {row['hidden']} | {_us(e)} | {_us(row['torch_seq'])} | "
            f"{_us(row['torch_cell'])} | {_us(row['onnxruntime'])} | {row['floor_us']:.3g} | "
            f"{'n/a' if floor_frac is None else f'{100 * floor_frac:.0f}%'} | "
            f"{_x(_ratio(row['torch_seq'], e))} | {_x(_ratio(row['torch_cell'], e))} | "
            f"{_x(_ratio(row['onnxruntime'], e))} |"
        )
    return "\n".join(lines)


def table_many_streams(batch) -> str:
    lines = [
        f"Many streams, LSTM H={BATCH_H}, ms per tick (every listed stream advances one sample), "
        f"{batch['threads']} threads (numba layer: {batch['numba_threading_layer'] or 'n/a'})",
        "",
        "| streams | slots | edgernn `step_batch` | GEMM (N,I+H)@(I+H,4H) | torch LSTMCell "
        "| onnxruntime IOBinding | M stream-steps/s (edgernn) | edgernn / GEMM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in batch["rows"]:
        e = row.get("edgernn")
        rate = "n/a" if e is None else f"{row['streams'] / e['median_us']:.3g}"
        lines.append(
            f"| {row['streams']:,} | {row['case']} | {_ms(e)} | {_ms(row['gemm'])} | {_ms(row['torch_cell'])} | "
            f"{_ms(row['onnxruntime_iobinding'])} | {rate} | {_x(_ratio(e, row['gemm']))} |"
        )
    return "\n".join(lines)


def table_compile(compiled) -> str:
    if compiled is None:
        return "Compile time: n/a (edgernn.model missing)"
    how = "edgernn.load(file)" if compiled["mode"] == "load" else "Model(spec, weights)"
    lines = [
        f"Numba compile time, LSTM H={BATCH_H}, fresh child process ({how}), seconds",
        "",
        "| NUMBA_CACHE_DIR | python start to first step (wall) | import edgernn | load | first step | load + first step "
        "| then first step_batch, 4 streams | then 1,024 streams |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (("empty", "cold"), ("warm", "warm")):
        r = compiled[key]
        lines.append(
            f"| {label} | {r['start_to_first_step_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['first_step_s']:.2f} | "
            f"{r['load_plus_first_step_s']:.2f} | {r['first_step_batch_4_s']:.2f} | "
            f"{r['first_step_batch_1024_s']:.2f} |"
        )
    return "\n".join(lines)


def headline(rows, batch, compiled, peak) -> dict:
    lstm64 = next(r for r in rows if r["cell"] == "lstm" and r["hidden"] == 64)
    e = lstm64["edgernn"]
    tick = next((r for r in batch["rows"] if r["streams"] == 10_000), None)
    return {
        "lstm64_vs_torch_lstm": _ratio(lstm64["torch_seq"], e),
        "lstm64_vs_torch_lstmcell": _ratio(lstm64["torch_cell"], e),
        "lstm64_vs_onnxruntime": _ratio(lstm64["onnxruntime"], e),
        "tick10k_vs_gemm": None if tick is None else _ratio(tick.get("edgernn"), tick["gemm"]),
        "lstm64_fraction_of_floor": None if e is None else lstm64["floor_us"] / e["median_us"],
        "warm_start_s": None if compiled is None else compiled["warm"]["start_to_first_step_s"],
        "peak_gflops_1core": peak,
    }


def format_headline(ratios) -> str:
    def verdict(key, better_high):
        value, target = ratios[key], TARGETS[key]
        if value is None:
            return "n/a"
        ok = value >= target if better_high else value <= target
        return "met" if ok else "MISSED"

    frac = ratios["lstm64_fraction_of_floor"]
    warm = ratios["warm_start_s"]
    return "\n".join([
        "Ratios",
        "",
        f"- edgernn LSTM H=64 step vs torch nn.LSTM: {_x(ratios['lstm64_vs_torch_lstm'])} faster "
        f"(target >= {TARGETS['lstm64_vs_torch_lstm']:g}x: {verdict('lstm64_vs_torch_lstm', True)}); "
        f"vs nn.LSTMCell: {_x(ratios['lstm64_vs_torch_lstmcell'])}",
        f"- edgernn LSTM H=64 step vs onnxruntime: {_x(ratios['lstm64_vs_onnxruntime'])} faster "
        f"(target >= {TARGETS['lstm64_vs_onnxruntime']:g}x: {verdict('lstm64_vs_onnxruntime', True)})",
        f"- edgernn 10,000-stream tick / GEMM of the same size: {_x(ratios['tick10k_vs_gemm'])} "
        f"(target <= {TARGETS['tick10k_vs_gemm']:g}x: {verdict('tick10k_vs_gemm', False)})",
        f"- edgernn LSTM H=64 step reaches {'n/a' if frac is None else f'{100 * frac:.0f}%'} of the FLOP floor "
        f"({ratios['peak_gflops_1core']:.0f} GFLOP/s on one core)",
        f"- warm-cache start (python + import + load + first step): "
        f"{'n/a' if warm is None else f'{warm:.2f} s'} (target < {TARGETS['warm_start_s']:g} s: "
        f"{verdict('warm_start_s', False)})",
    ])


def format_parity(rows) -> str:
    worst = {}
    for row in rows:
        for backend, diff in row["parity_max_abs"].items():
            worst[backend] = max(worst.get(backend, 0.0), diff)
    bad = [f"{r['cell']} H={r['hidden']} {b}={d:.2g}" for r in rows for b, d in r["parity_max_abs"].items()
           if d > PARITY_TOL]
    text = "Parity (max abs diff of h over 5 steps vs torch nn.X): " + ", ".join(
        f"{b} {d:.2g}" for b, d in worst.items())
    if bad:
        text += "\nPARITY MISMATCH above {:g}: {}".format(PARITY_TOL, "; ".join(bad))
    return text


def format_machine(info, peaks) -> str:
    return (
        f"Machine: {info['cpu']} ({', '.join(info['simd'])}), {info['cores']} cores, {info['platform']}\n"
        f"python {info['python']}, numpy {info['numpy']}, numba {info['numba']}, torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}, onnx {info['onnx']}; {info['date']}\n"
        f"Load average (1 min) at start {info['loadavg_start']}, at end {info['loadavg_end']}\n"
        f"Thread waits: OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']}, "
        f"OPENBLAS_THREAD_TIMEOUT={info['OPENBLAS_THREAD_TIMEOUT']}"
        f"{' (--passive)' if info['passive'] else ' (defaults)'}\n"
        f"float32 matmul GFLOP/s: 1 thread numpy {peaks['one']['numpy']:.0f}, torch {peaks['one']['torch']:.0f}; "
        f"{peaks['threads']} threads numpy {peaks['all']['numpy']:.0f}, torch {peaks['all']['torch']:.0f}"
    )


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    parser.add_argument("--markdown", action="store_true", help="print only the tables (for the README)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument("--passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=4, no onnxruntime spinning")
    args = parser.parse_args(argv)
    args.repeats = 7 if args.quick else 41
    args.repeat_s = 0.004 if args.quick else 0.01
    args.batch_repeats = 4 if args.quick else 11
    args.batch_repeat_s = 0.01 if args.quick else 0.04
    args.warm_children = 1 if args.quick else 3
    args.peak_size = 1024 if args.quick else 2048
    return args


def main(argv=None) -> int:
    cfg = parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    threads = info["cores"]
    blas = OpenBLASThreads()
    if not blas.available:
        log("warning: cannot set OpenBLAS threads at run time; numpy GEMMs use its default")
    load = OtherLoad()
    log("peak: float32 matmul")
    with load.section("peak"):
        peaks = {"one": matmul_gflops(blas, 1, cfg.peak_size, 5), "threads": threads,
                 "all": matmul_gflops(blas, threads, cfg.peak_size, 5)}
    peak = peaks["one"]["best"]
    with tempfile.TemporaryDirectory(prefix="edgernn-bench-") as name:
        tmp = Path(name)
        blas.set(1)
        with load.section("one stream"):
            rows = single_stream(cfg, tmp, peak)
        settle()
        with load.section("many streams"):
            batch = many_streams(cfg, tmp, threads, blas)
        with load.section("compile"):
            compiled = compile_times(cfg, tmp)
    info["loadavg_end"] = _loadavg()
    info["other_load"] = load.sections
    ratios = headline(rows, batch, compiled, peak)
    tables = [table_one_stream(rows, peak), table_many_streams(batch), table_compile(compiled)]
    if cfg.markdown:
        print("\n\n".join(tables))
        if load.warning():
            log(load.warning())
    else:
        print(format_machine(info, peaks))
        print()
        print("\n\n".join(tables))
        print()
        print(format_parity(rows))
        print()
        print(format_headline(ratios))
        print(f"Cores busy with other processes, per section: {load.summary()}")
        warning = load.warning()
        if warning:
            print("\n" + warning)
        print(f"\n(benchmark took {time.perf_counter() - started:.0f} s{', --quick' if cfg.quick else ''})")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"machine": info, "peaks": peaks, "one_stream": rows,
                                              "many_streams": batch, "compile": compiled,
                                              "ratios": ratios, "targets": TARGETS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
