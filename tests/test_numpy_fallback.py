"""edgernn without numba (edgernn/jit.py, edgernn/numpy_stack.py): the NumPy kernels, one warning, the same results.

Each test runs a child Python in which numba really cannot be imported -- a package named ``numba`` first on
PYTHONPATH whose import raises ImportError, as on 32-bit Raspberry Pi OS where there is no numba wheel -- or
is turned off with EDGERNN_DISABLE_NUMBA=1, and holds what the child computes to the numba kernels of this
process and to the float64 NumPy reference (1e-5).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgernn
from edgernn.errors import InputError
from edgernn.jit import DISABLE_VARIABLE, KERNELS
from edgernn.reference import reference_run
from helpers import FAMILIES, random_spec, random_weights

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TOLERANCE = 1e-5
HIDDEN = "numba is hidden by tests/test_numpy_fallback.py"
CORE_TESTS = ["tests/test_cells.py", "tests/test_model.py", "tests/test_format.py", "tests/test_streams.py",
              "tests/test_plan.py"]
"""Run whole without numba: ~20 s on the CI machine kind (the NumPy kernels are ~40x slower per step)."""

# Every family streaming, and the whole-sequence kernel (run_layers) for a few bidirectional ones.
CASES = {family: dict(options) for family, options in FAMILIES.items()}
CASES.update({f"{family}-bidirectional": dict(FAMILIES[family], direction="bidirectional")
              for family in ("gru-no-lbr", "lstm-all", "mgu", "leaky")})
STEPS, STREAMS = 40, 6


@pytest.fixture(scope="module")
def hidden_numba(tmp_path_factory) -> Path:
    """A folder for the front of PYTHONPATH in which ``import numba`` raises ImportError."""
    folder = tmp_path_factory.mktemp("hidden_numba")
    (folder / "numba").mkdir()
    (folder / "numba" / "__init__.py").write_text(f"raise ImportError({HIDDEN!r})\n")
    return folder


def child_env(hidden: Path | None = None, disable: bool = False) -> dict:
    env = {name: value for name, value in os.environ.items() if name != DISABLE_VARIABLE}
    if hidden is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    if disable:
        env[DISABLE_VARIABLE] = "1"
    return env


def exercise(model, xs: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """What a model computes through each entry point: xs (T, streams, I), starts (streams, state_size).
    Runs here and in the child (which imports this module), so both sides do exactly the same calls."""
    got = {}
    state = starts[0].copy()
    got["run"], got["run_state"] = model.run(xs[:, 0], state), state
    if not model.streamable:
        states = starts.copy()
        got["run_batch"], got["run_batch_states"] = model.run(xs, states), states
        return got
    state, out = starts[1].copy(), np.empty(model.output_size, np.float32)
    got["step"] = np.stack([model.step(x, state) if t % 2 else model.step(x, state, out=out).copy()
                            for t, x in enumerate(xs[:, 1])])
    got["step_state"] = state
    table, rng = np.concatenate([starts, model.new_state(batch=3)]), np.random.default_rng(0)
    batches = []
    for t in range(3):
        slots = rng.permutation(len(table))[:len(starts)]
        batches.append(model.step_batch(table, slots, xs[t], parallel=t == 2))
    got["batch"], got["batch_table"] = np.stack(batches), table
    return got


def refusals(model) -> list[str]:
    """The messages of a few refused calls, which must not depend on the kernels."""
    state, messages = model.new_state(), []
    bad_x = np.zeros(model.input_size, np.float32)
    bad_x[-1] = np.nan
    calls = [lambda: model.step(bad_x, state), lambda: model.step(np.zeros(model.input_size + 1), state),
             lambda: model.step_batch(model.new_state(batch=4), [1, 1], np.zeros((2, model.input_size))),
             lambda: model.step(np.zeros(model.input_size, np.float32), state, out=np.empty(1, np.float64))]
    for call in calls:
        try:
            call()
        except (InputError, edgernn.StreamingError) as exc:
            messages.append(str(exc))
    return messages


CHILD = r"""
import json, logging, sys, warnings
from pathlib import Path
import numpy as np

folder, out, tests = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
records, backend = [], []
keep = lambda into: type("Keep", (logging.Handler,), {"emit": lambda self, record: into.append(record)})()
logging.getLogger().addHandler(keep(records))  # every logger's warnings, from before edgernn is imported
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import edgernn
    from edgernn import jit
    from edgernn.runtime.backends import NumbaBackend
    sys.path.insert(0, tests)
    from test_numpy_fallback import exercise, refusals

    inputs, results, messages = np.load(folder / "inputs.npz"), {}, {}
    for path in sorted(folder.glob("*.ern")):
        model = edgernn.load(path)
        for key, value in exercise(model, inputs[path.stem + "/xs"], inputs[path.stem + "/starts"]).items():
            results[f"{path.stem}/{key}"] = value
        messages[path.stem] = refusals(model)
        edgernn.save(model, out / path.name)  # the format round trip, without numba
        again = edgernn.load(out / path.name)
        assert all(again.weights[name].tobytes() == model.weights[name].tobytes() for name in model.weights)
        xs = inputs[path.stem + "/xs"][:, 0]
        assert again.run(xs, again.new_state()).tobytes() == model.run(xs, model.new_state()).tobytes()
    logger = logging.getLogger("edgernn.runtime.backends")
    logger.setLevel(logging.INFO)
    logger.addHandler(keep(backend))
    NumbaBackend(model)
np.savez(out / "results.npz", **results)
print(json.dumps({
    "kernels": jit.KERNELS, "numba_available": jit.NUMBA_AVAILABLE,
    "numba_in_sys_modules": sys.modules.get("numba") is not None, "messages": messages,
    "logged": [(r.name, r.levelname, r.getMessage()) for r in records if r.levelno >= logging.WARNING],
    "warnings": [str(w.message) for w in caught],
    "backend_log": [r.getMessage() for r in backend],
}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each case as a .ern file with its inputs, and what this process's numba kernels compute for it."""
    folder = tmp_path_factory.mktemp("fallback_models")
    inputs, expected, messages = {}, {}, {}
    for seed, (name, case) in enumerate(CASES.items()):
        spec = random_spec(**dict(case, hidden=9, input_size=5, layers=2, head=(4, 3), normalize=seed % 2 == 0,
                                  head_activations=("tanh", "softmax")))
        weights = random_weights(spec, seed, scale=0.1, gain=0.5)
        edgernn.save(edgernn.Model(spec, weights), folder / f"{name}.ern")
        model = edgernn.load(folder / f"{name}.ern")
        rng = np.random.default_rng(100 + seed)
        xs = rng.standard_normal((STEPS, STREAMS, spec.input_size)).astype(np.float32)
        starts = rng.uniform(-0.5, 0.5, (STREAMS, spec.state_size)).astype(np.float32)
        inputs[f"{name}/xs"], inputs[f"{name}/starts"] = xs, starts
        expected[name] = (spec, weights, exercise(model, xs, starts))
        messages[name] = refusals(model)
    np.savez(folder / "inputs.npz", **inputs)
    return folder, expected, messages


def run_child(folder: Path, out: Path, env: dict) -> tuple[dict, dict]:
    """The child's report, and what it computed for each case of ``folder`` (it writes into ``out``)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), str(TESTS)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    with np.load(out / "results.npz") as results:
        return report, {key: results[key] for key in results.files}


@pytest.mark.parametrize("how", ["unimportable", "disabled"])
def test_the_numpy_kernels_compute_what_numba_and_the_reference_compute(models, hidden_numba, how, tmp_path):
    folder, expected, messages = models
    env = child_env(hidden=hidden_numba) if how == "unimportable" else child_env(disable=True)
    report, got = run_child(folder, tmp_path, env)

    reason = (f"numba is not importable (ImportError: {HIDDEN})" if how == "unimportable"
              else f"numba is disabled by {DISABLE_VARIABLE}=1")
    assert not report["numba_available"] and not report["numba_in_sys_modules"]
    assert report["kernels"] == f"numpy ({reason})"
    assert report["backend_log"] == [f"kernels: numpy ({reason})"]
    # Exactly one warning, from the import through every call of every model, saying what and why.
    assert len(report["logged"]) == 1, report["logged"]
    logger, level, message = report["logged"][0]
    assert (logger, level) == ("edgernn.jit", "WARNING")
    assert message.startswith(reason + ": edgernn runs its NumPy kernels") and "slower" in message
    assert not [w for w in report["warnings"] if "numba" in w.lower()], report["warnings"]

    inputs = np.load(folder / "inputs.npz")
    for name, (spec, weights, want) in expected.items():
        assert report["messages"][name] == messages[name], f"{name}: a refusal's message differs"
        for key, value in want.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], value, rtol=0, atol=TOLERANCE, err_msg=f"{name}/{key}")
        want_ys, want_state = reference_run(spec, weights, inputs[f"{name}/xs"][:, 0], inputs[f"{name}/starts"][0])
        np.testing.assert_allclose(got[f"{name}/run"], want_ys, rtol=0, atol=TOLERANCE, err_msg=f"{name} reference")
        np.testing.assert_allclose(got[f"{name}/run_state"], want_state, rtol=0, atol=TOLERANCE)


def test_the_core_tests_pass_without_numba(hidden_numba):
    """The model, cell, format and stream-table tests, unchanged, in a process where numba cannot be imported."""
    env = child_env(hidden=hidden_numba)
    kernels = subprocess.run([sys.executable, "-c", "import edgernn.jit; print(edgernn.jit.KERNELS)"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert kernels.stdout.strip() == f"numpy (numba is not importable (ImportError: {HIDDEN}))"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output and " error" not in output


def test_the_daemon_backend_says_which_kernels_run(caplog):
    from edgernn.runtime.backends import NumbaBackend

    spec = random_spec("gru", hidden=4, input_size=3, head=())
    with caplog.at_level(logging.INFO, logger="edgernn.runtime.backends"):
        NumbaBackend(edgernn.Model(spec, random_weights(spec)))
    assert [r.getMessage() for r in caplog.records] == [f"kernels: {KERNELS}"]
    assert KERNELS == "numba" or os.environ.get(DISABLE_VARIABLE)
