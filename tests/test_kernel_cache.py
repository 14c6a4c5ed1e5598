"""Numba's on-disk cache works across processes (PERF_NOTES.md, item 7).

A kernel that Numba cannot key stably (a closure capturing jitted functions, say) is compiled again in
every process: ~1.3 s per kernel at each start. Here a fresh interpreter builds a model and drives every
entry point (step, run, serial and parallel step_batch) twice over; the second interpreter must load every
kernel from the cache and compile none. Both inherit NUMBA_CACHE_DIR from conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
import numpy as np
from numba.core.registry import CPUDispatcher
import edgernn.cells.dense, edgernn.cells.gru, edgernn.cells.lstm, edgernn.cells.rnn
from edgernn import stack
from edgernn.model import PARALLEL_MIN_STREAMS, Model
from helpers import random_spec, random_weights

spec = random_spec("lstm", input_size=5, hidden=16, layers=2, head=(3,), normalize=True)
model = Model(spec, random_weights(spec, 0, scale=0.1, gain=0.5))
rng = np.random.default_rng(0)
state = model.new_state()
model.step(rng.standard_normal(5).astype(np.float32), state)
model.run(rng.standard_normal((10, 5)).astype(np.float32), state)
n = PARALLEL_MIN_STREAMS + 8
states = model.new_state(batch=2 * n)
model.step_batch(states, np.arange(3), rng.standard_normal((3, 5)).astype(np.float32))      # step_rows
model.step_batch(states, np.arange(n) * 2, rng.standard_normal((n, 5)).astype(np.float32))  # parallel
elapsed = time.perf_counter() - started

stats = {}
for module in (stack, edgernn.cells.dense, edgernn.cells.gru, edgernn.cells.lstm, edgernn.cells.rnn):
    for name, value in vars(module).items():
        if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
            s = value.stats
            stats[f"{module.__name__}.{name}"] = {
                "hits": sum(s.cache_hits.values()), "misses": sum(s.cache_misses.values()),
                "signatures": len(value.signatures), "cache_path": s.cache_path}
print(json.dumps({"elapsed": elapsed, "stats": stats}))
"""

KERNELS = ("step_one", "run_sequence", "step_rows", "step_rows_parallel")


def run_fresh_process() -> tuple[dict, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def test_a_second_process_loads_every_kernel_from_the_cache():
    assert os.environ.get("NUMBA_CACHE_DIR"), "conftest.py sets NUMBA_CACHE_DIR"
    first, first_wall = run_fresh_process()  # fills the cache if this source tree has not been compiled yet
    second, second_wall = run_fresh_process()
    print(f"\nfirst process: {first_wall:.2f} s wall ({first['elapsed']:.2f} s from import to the last call); "
          f"second: {second_wall:.2f} s wall ({second['elapsed']:.2f} s)")
    stats = second["stats"]
    for name in KERNELS:
        entry = stats[f"edgernn.stack.{name}"]
        assert entry["signatures"] == 1, f"{name}: {entry}"
        assert entry["hits"] >= 1 and entry["misses"] == 0, f"{name} was compiled, not loaded: {entry}"
        assert entry["cache_path"].startswith(os.environ["NUMBA_CACHE_DIR"]), entry
    compiled = {name: entry for name, entry in stats.items() if entry["misses"]}
    assert not compiled, f"compiled in the second process instead of loaded from the cache: {compiled}"
