"""`edgernn warmup`: compile every kernel the configured models need into the compile cache, and prove it.

A child process with the configured cache (`runtime.compile_cache`) loads every pipeline's model and
backend and steps a scratch stream once, as the daemon's `Pipeline.warm_up` does before it serves: the
time from that process's start to this point is its time to the first prediction. It then runs the batched
(thread-pool) kernel the daemon uses for large micro-batches, and reports Numba's compile statistics:
kernels compiled (cache misses) and loaded (cache hits), and where each is cached. When the first child
compiled anything, a second child does the same and must compile nothing: otherwise the cache does not
work (not writable, or another directory), and warmup fails saying so. A first child that compiled
nothing has shown that already, so a warm start (the systemd unit's ExecStartPre) costs one process.

The child is ``python -m edgernn.runtime.warmup CONFIG``: it prints ``ready`` when every pipeline has
stepped once and its statistics as JSON last; the parent times the lines as they arrive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgernn.errors import EdgeRNNError

from .compile_cache import CACHE_VARIABLE, compile_cache_dir

READY = "ready"
CHILD_TIMEOUT = 1800.0
"""Seconds one child may take: a cold compile of every kernel is minutes on a Raspberry Pi."""


class WarmupError(EdgeRNNError):
    """A warmup child failed, or the second one compiled kernels instead of loading them from the cache."""


@dataclass(frozen=True)
class ChildRun:
    """One child process: seconds from its start to the first prediction and to its exit, and its stats."""

    first_prediction: float
    total: float
    cpu_to_first_prediction: float  # the child's own CPU seconds: less at the mercy of a busy machine
    compiled: int
    loaded: int
    cache_paths: tuple[str, ...]

    @property
    def warm(self) -> bool:
        return self.compiled == 0


@dataclass
class WarmupResult:
    cache_dir: Path
    origin: str
    runs: list[ChildRun] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"cache_dir": str(self.cache_dir), "origin": self.origin,
                "runs": [dict(vars(run), cache_paths=list(run.cache_paths), warm=run.warm) for run in self.runs]}


def warm_up(config) -> WarmupResult:
    """Run the child once, and again when it compiled anything; raise `WarmupError` if the second compiled."""
    cache_dir, origin = compile_cache_dir(config.state)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WarmupError(f"compile cache {cache_dir} ({origin}): cannot create it: {exc.strerror or exc}") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise WarmupError(f"compile cache {cache_dir} ({origin}): not writable by this user")
    result = WarmupResult(cache_dir, origin)
    env = dict(os.environ, **{CACHE_VARIABLE: str(cache_dir)})
    result.runs.append(_run_child(config.source, env))
    if not result.runs[0].warm:
        second = _run_child(config.source, env)
        result.runs.append(second)
        if not second.warm:
            raise WarmupError(f"a second process compiled {second.compiled} kernel(s) again instead of loading them "
                              f"from the compile cache {cache_dir} ({origin}): the cache does not work here")
    outside = sorted({path for run in result.runs for path in run.cache_paths
                      if not _inside(path, cache_dir)})
    if outside:
        raise WarmupError(f"kernels were cached in {', '.join(outside)}, not in the compile cache {cache_dir} "
                          f"({origin}): was numba imported before {CACHE_VARIABLE} was set?")
    return result


def _inside(path: str, directory: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(directory))


def _run_child(config_path: Path, env: dict) -> ChildRun:
    with tempfile.TemporaryFile(mode="w+") as errors:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", __name__, str(config_path)], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, text=True)
        first_prediction, lines = None, []
        try:
            for line in process.stdout:
                if line.strip() == READY and first_prediction is None:
                    first_prediction = time.perf_counter() - started
                lines.append(line)
            process.wait(timeout=CHILD_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        total = time.perf_counter() - started
        errors.seek(0)
        stderr = errors.read().strip()
    if process.returncode != 0 or first_prediction is None:
        last = stderr.splitlines()[-1] if stderr else f"exit status {process.returncode}"
        raise WarmupError(f"the warmup process failed: {last.removeprefix('edgernn: error: ')}")
    stats = json.loads(lines[-1])
    return ChildRun(first_prediction, total, stats["cpu_to_first_prediction"], stats["compiled"], stats["loaded"],
                    tuple(stats["cache_paths"]))


# ---- the child --------------------------------------------------------------------------------------
def _child(config_path: str) -> dict:
    """Step every pipeline once (print READY), then the batched kernel; return Numba's compile stats."""
    import numpy as np

    from .backends import NumbaBackend, load_backend
    from .config import load_config

    from .daemon import check_signatures

    config = load_config(config_path)
    checked = [check_signatures(config, p) for p in config.pipelines]  # ExecStartPre: nothing unsigned is loaded
    loaded = [load_backend(pipeline, data) for pipeline, data in zip(config.pipelines, checked)]
    for model, backend in loaded:  # what Pipeline.warm_up does before the daemon serves
        backend.step_batch(model.new_state(batch=1), np.zeros(1, np.int64), np.zeros((1, model.input_size), np.float32))
    cpu_to_first_prediction = time.process_time()  # every thread's CPU time since this process started
    print(READY, flush=True)
    for model, backend in loaded:  # the thread-pool kernel, for micro-batches of PARALLEL_MIN_ROWS and more
        if isinstance(backend, NumbaBackend):
            rows = 2
            model.step_batch(model.new_state(batch=rows), np.arange(rows), np.zeros((rows, model.input_size),
                                                                                     np.float32), parallel=True)
    return dict(_compile_stats(), cpu_to_first_prediction=cpu_to_first_prediction)


def _compile_stats() -> dict:
    """Kernels compiled in this process (Numba cache misses) and loaded from the cache (hits), over every
    Numba dispatcher defined in an edgernn module."""
    from edgernn.jit import NUMBA_AVAILABLE

    compiled = loaded = 0
    paths = set()
    if NUMBA_AVAILABLE:
        from numba.core.registry import CPUDispatcher

        for name, module in list(sys.modules.items()):
            if not (name == "edgernn" or name.startswith("edgernn.")) or module is None:
                continue
            for value in list(vars(module).values()):
                if isinstance(value, CPUDispatcher) and value.__module__ == name:
                    stats = value.stats
                    misses, hits = sum(stats.cache_misses.values()), sum(stats.cache_hits.values())
                    compiled, loaded = compiled + misses, loaded + hits
                    if (misses or hits) and stats.cache_path:
                        paths.add(stats.cache_path)
    return {"compiled": compiled, "loaded": loaded, "cache_paths": sorted(paths)}


if __name__ == "__main__":
    try:
        print(json.dumps(_child(sys.argv[1])), flush=True)
    except Exception as exc:  # noqa: BLE001 -- one line for the parent, as the CLI writes errors
        print(f"edgernn: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        sys.exit(1)
