"""Two versions of edgernn's kernels timed side by side: this checkout against a git revision.

This machine's speed drifts (whole minutes 1.5-2x slower), so two benchmark runs minutes apart cannot
show a 5-10% change. Here both versions run *at the same time*, one process pinned to each core, for
several rounds, swapping cores each round; the reported figure is the median ratio (this checkout /
the base) per measurement, so drift hits both sides alike.

    .venv/bin/python benchmarks/compare_kernels.py --base HEAD~3          # 6 rounds
    .venv/bin/python benchmarks/compare_kernels.py --base main --rounds 10

Measures, single-threaded: ``model.step`` of a 4- and a 64-unit LSTM and a 64-unit GRU (µs per step, best
of 20 loops of 5,000 steps), and ``step_batch`` of 2,000 LSTM-64 streams (ms per tick, best of 40).
Needs two cores and `git worktree`; each side compiles into its own fresh Numba cache first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside each side's process: that side's edgernn comes first on sys.path.
CHILD = r"""
import json, sys, time
import numpy as np
from edgernn.model import Model
from edgernn.spec import DenseLayer, ModelSpec, RecurrentLayer

def model(cell, hidden):
    spec = ModelSpec(8, (RecurrentLayer(cell, 8, hidden),), (DenseLayer(hidden, 4),))
    rng = np.random.default_rng(0)
    return Model(spec, {k: rng.standard_normal(v).astype(np.float32) * 0.3 for k, v in spec.tensor_shapes().items()})

def best(call, loops, inner):
    result = 1e9
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        result = min(result, (time.perf_counter() - start) / inner)
    return result

out = {}
for cell, hidden in (("lstm", 4), ("lstm", 64), ("gru", 64)):
    m = model(cell, hidden)
    x, state, y = np.ones(8, np.float32), m.new_state(), np.empty(4, np.float32)
    best(lambda: m.step(x, state, out=y), 1, 2000)
    out[f"{cell}{hidden} step us"] = best(lambda: m.step(x, state, out=y), 20, 5000) * 1e6
m = model("lstm", 64)
n = 2000
states, slots = m.new_state(batch=n), np.arange(n)
X, Y = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32), np.empty((n, 4), np.float32)
best(lambda: m.step_batch(states, slots, X, out=Y), 1, 3)
out["lstm64 tick 2k ms"] = best(lambda: m.step_batch(states, slots, X, out=Y), 40, 1) * 1e3
print(json.dumps(out))
"""


def side(root: Path, cache: Path, core: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(cache), NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", CHILD], env=env, cwd=root,
                            stdout=subprocess.PIPE, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgernn-compare-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
        try:
            roots = {"this": REPO, "base": base}
            caches = {name: Path(tmp) / f"cache-{name}" for name in roots}
            for name, root in roots.items():  # compile first, one side at a time
                print(f"compiling {name} ...", file=sys.stderr)
                side(root, caches[name], 0).communicate()
            ratios: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                cores = (0, 1) if round_ % 2 == 0 else (1, 0)
                procs = {name: side(root, caches[name], core) for (name, root), core in zip(roots.items(), cores)}
                results = {name: json.loads(proc.communicate()[0]) for name, proc in procs.items()}
                print(f"round {round_ + 1}: " + "; ".join(
                    f"{key} {results['this'][key]:.3g} vs {results['base'][key]:.3g}" for key in results["this"]))
                for key in results["this"]:
                    ratios.setdefault(key, []).append(results["this"][key] / results["base"][key])
            print(f"this checkout / {args.base}, median of {args.rounds} rounds (below 1: faster):")
            for key, values in ratios.items():
                print(f"  {key:22s} {statistics.median(values):.3f}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
