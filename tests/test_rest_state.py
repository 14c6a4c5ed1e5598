"""edgernn.rest_state and the rest state in the model file: settling, calibration, storage, inspect, the CLI."""

import json

import numpy as np
import pytest
import safetensors.numpy

import edgernn
from edgernn import rest_state
from edgernn.cli import main
from edgernn.errors import FormatError, InputError, SpecError, StreamingError
from edgernn.format import FORMAT_VERSION, model_fingerprint, tensor_checksum
from edgernn.model import Model
from edgernn.spec import REST_STATE, ModelSpec
from helpers import random_inputs, random_model, random_spec, random_weights

SETTLED = 1e-5
"""step(idle, s) may move a settled state by at most this (float32; settle stops at 1e-6 per step)."""


@pytest.fixture(scope="module")
def model():
    """An LSTM with input normalisation: its idle input (the training mean) is not zeros, and it settles."""
    return random_model("lstm", hidden=16, head=(3,), normalize=True, seed=3)


def run_cli(capsys, *args):
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def write_old_style(path, model):
    """A model file as an edgernn without rest states and sample rates wrote it: the spec JSON built
    without the new fields, the metadata by hand."""
    data = model.spec.to_dict()
    for name in ("sample_rate", "rest_state", "rest_state_note"):
        data.pop(name, None)
    tensors = {name: value for name, value in model.weights.items() if name != REST_STATE}
    metadata = {"format": "edgernn", "format_version": "1", "dtype": "float32",
                "spec": json.dumps(data, sort_keys=True, separators=(",", ":")),
                "checksum": tensor_checksum(tensors)}
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))


# ---- settle: the state under a constant idle input ----------------------------------------------------


def test_settle_finds_a_fixed_point_of_step_that_is_not_zeros(model):
    settled = rest_state.settle(model)
    assert settled.converged and 1 < settled.steps < rest_state.MAX_STEPS
    assert settled.note == f"converged after {settled.steps} steps"
    idle = model.weights["input.mean"]
    assert np.any(idle != 0)  # the training mean, not zeros
    again = settled.state.copy()
    model.step(idle, again)
    assert np.max(np.abs(again - settled.state)) <= SETTLED
    assert np.max(np.abs(settled.state)) > 0.05  # a real offset from zeros, not rounding


def test_settle_without_normalisation_idles_at_zeros():
    plain = random_model("gru", hidden=8, head=(2,), seed=5)
    settled = rest_state.settle(plain)
    assert settled.converged
    again = settled.state.copy()
    plain.step(np.zeros(plain.input_size, np.float32), again)
    assert np.max(np.abs(again - settled.state)) <= SETTLED
    assert np.max(np.abs(settled.state)) > 0.05  # the biases move it off zeros


def test_settle_says_when_it_did_not_converge(model):
    settled = rest_state.settle(model, max_steps=3)
    assert not settled.converged and settled.steps == 3
    assert settled.note.startswith("did not converge in 3 steps (last change ")


def test_settle_refuses_a_model_that_cannot_step():
    bidirectional = random_model("gru", hidden=8, head=(2,), direction="bidirectional")
    with pytest.raises(StreamingError, match="layer 0 is bidirectional.*calibration sequence"):
        rest_state.settle(bidirectional)


def test_settle_refuses_a_state_that_diverges():
    spec = random_spec("rnn", input_size=2, hidden=8, head=(1,), activations=("relu",))
    weights = random_weights(spec, seed=0)
    weights["layers.0.R"] = np.eye(8, dtype=np.float32) * 3  # grows threefold a step
    weights["layers.0.Wb"][:] = 1.0
    with pytest.raises(InputError, match="diverged"):
        rest_state.settle(Model(spec, weights))


def test_settle_checks_its_arguments(model):
    with pytest.raises(InputError, match=r"idle: expected shape \(8,\)"):
        rest_state.settle(model, idle=np.zeros(3))
    with pytest.raises(InputError, match="max_steps"):
        rest_state.settle(model, max_steps=0)


# ---- calibration sequences and .npy files ---------------------------------------------------------------


def test_from_sequence_is_the_final_state_of_run_from_zeros(model):
    xs = random_inputs(model, steps=50)
    expected = np.zeros(model.state_size, np.float32)
    model.run(xs, expected)
    assert np.array_equal(rest_state.from_sequence(model, xs), expected)


def test_read_npy_runs_a_calibration_sequence_or_takes_a_state(model, tmp_path):
    xs = random_inputs(model, steps=40)
    np.save(tmp_path / "calib.npy", xs)
    state, origin, note = rest_state.read_npy(tmp_path / "calib.npy", model)
    assert origin == "calibration" and note == "calib.npy, 40 samples"
    assert np.array_equal(state, rest_state.from_sequence(model, xs))
    given = np.linspace(-1, 1, model.state_size)  # float64: stored as float32
    np.save(tmp_path / "state.npy", given)
    state, origin, note = rest_state.read_npy(tmp_path / "state.npy", model)
    assert (origin, note, state.dtype) == ("given", "state.npy", np.float32)
    assert np.array_equal(state, given.astype(np.float32))


@pytest.mark.parametrize("content, error, message", [
    (np.zeros((5, 3)), InputError, r"shape \(5, 3\) is neither a calibration sequence \(T, 8\) nor a state \(32,\)"),
    (np.zeros(7), InputError, r"shape \(7,\)"),
    (np.zeros((0, 8)), InputError, r"shape \(0, 8\)"),
    (np.array([np.nan] * 32), InputError, "non-finite"),
    (np.array(["a"] * 32), InputError, "real numbers"),
])
def test_read_npy_refuses_arrays_that_fit_neither_use(model, tmp_path, content, error, message):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(error, match=message) as caught:
        rest_state.read_npy(path, model)
    assert str(path) in str(caught.value)


def test_read_npy_refuses_missing_and_foreign_files(model, tmp_path):
    with pytest.raises(FormatError, match="no such file") as caught:
        rest_state.read_npy(tmp_path / "missing.npy", model)
    assert "missing.npy" in str(caught.value)
    (tmp_path / "text.npy").write_text("1,2,3\n")
    with pytest.raises(FormatError, match="text.npy: not a .npy array file"):
        rest_state.read_npy(tmp_path / "text.npy", model)
    np.savez(tmp_path / "two.npz", a=np.zeros(32))
    with pytest.raises(FormatError, match="npz archive"):
        rest_state.read_npy(tmp_path / "two.npz", model)


# ---- in the model and in the file -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_the_rest_state_round_trips_exactly_and_is_what_new_state_and_reset_return(model, tmp_path, dtype):
    settled = rest_state.settle(model)
    stored = rest_state.with_rest_state(model, settled.state, "idle", settled.note)
    edgernn.save(stored, tmp_path / "m.ern", dtype=dtype)
    loaded = edgernn.load(tmp_path / "m.ern")
    assert (loaded.spec.rest_state, loaded.spec.rest_state_note) == ("idle", settled.note)
    assert np.array_equal(loaded.new_state(), settled.state)  # float32 whatever the file's dtype
    states = loaded.new_state(batch=3)
    assert all(np.array_equal(row, settled.state) for row in states)
    states[:] = 7.0
    loaded.reset(states, [0, 2])
    assert np.array_equal(states[0], settled.state) and np.array_equal(states[2], settled.state)
    assert np.all(states[1] == 7.0)
    fresh = loaded.new_state()
    fresh[:] = 1.0  # a copy, not the model's own array
    assert np.array_equal(loaded.new_state(), settled.state)


def test_the_checksum_covers_the_rest_state(model, tmp_path):
    path = tmp_path / "m.ern"
    edgernn.save(rest_state.with_rest_state(model, np.full(model.state_size, 0.25), "given", "x.npy"), path)
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + header_size])[REST_STATE]["data_offsets"][0]
    data[8 + header_size + start + 1] ^= 0x01  # one bit of the first float
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch"):
        edgernn.load(path)


def test_the_rest_state_is_part_of_the_fingerprint(model):
    with_state = rest_state.with_rest_state(model, np.full(model.state_size, 0.25), "given", "x.npy")
    other_state = rest_state.with_rest_state(model, np.full(model.state_size, 0.5), "given", "x.npy")
    fingerprints = {model_fingerprint(m) for m in (model, with_state, other_state)}
    assert len(fingerprints) == 3


def test_an_old_file_without_a_rest_state_loads_with_zeros(model, tmp_path):
    path = tmp_path / "old.ern"
    write_old_style(path, model)
    loaded = edgernn.load(path)
    assert loaded.spec.rest_state == "zeros" and loaded.sample_period is None
    assert np.array_equal(loaded.new_state(), np.zeros(model.state_size, np.float32))
    assert model_fingerprint(loaded) == model_fingerprint(model)  # snapshots and journals stay valid
    edgernn.save(loaded, tmp_path / "again.ern")  # written again: the same spec JSON as before
    metadata = safetensors.safe_open(str(tmp_path / "again.ern"), "np").metadata()
    assert metadata["spec"] == safetensors.safe_open(str(path), "np").metadata()["spec"]
    assert metadata["format_version"] == FORMAT_VERSION


def test_zeros_drops_a_stored_rest_state(model):
    stored = rest_state.with_rest_state(model, np.ones(model.state_size), "given", "x.npy")
    dropped = rest_state.with_rest_state(stored, None, "zeros", "ignored")
    assert REST_STATE not in dropped.weights and dropped.spec == model.spec
    assert np.array_equal(dropped.new_state(), np.zeros(model.state_size, np.float32))


def test_the_spec_and_the_tensor_must_agree(model):
    spec = model.spec
    idle = ModelSpec.from_dict({**spec.to_dict(), "rest_state": "idle"})
    assert idle.tensor_shapes()[REST_STATE] == (spec.state_size,)
    assert idle.parameter_count() == spec.parameter_count()  # a state, not a parameter
    with pytest.raises(SpecError, match="missing tensor.*rest_state"):
        Model(idle, model.weights)
    with pytest.raises(SpecError, match="unexpected tensor.*rest_state"):
        Model(spec, {**model.weights, REST_STATE: np.zeros(spec.state_size)})
    with pytest.raises(SpecError, match=r"rest_state'\]: expected shape \(32,\)"):
        Model(idle, {**model.weights, REST_STATE: np.zeros(5)})
    with pytest.raises(SpecError, match="rest_state.*non-finite"):
        Model(idle, {**model.weights, REST_STATE: np.full(spec.state_size, np.inf)})
    with pytest.raises(SpecError, match="rest_state: must be one of zeros, trained, idle"):
        ModelSpec.from_dict({**spec.to_dict(), "rest_state": "warm"})
    with pytest.raises(SpecError, match="rest_state_note: a zeros rest state takes no note"):
        ModelSpec.from_dict({**spec.to_dict(), "rest_state_note": "hello"})


# ---- inspect and the command line --------------------------------------------------------------------------


def test_inspect_says_where_the_rest_state_came_from(model, tmp_path, capsys):
    edgernn.save(model, tmp_path / "zeros.ern")
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "zeros.ern")
    assert status == 0 and "rest state:  zeros\n" in out
    given = rest_state.with_rest_state(model, np.ones(model.state_size), "given", "s.npy")
    edgernn.save(given, tmp_path / "given.ern")
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "given.ern", "--json")
    info = json.loads(out)
    assert (info["rest_state"], info["rest_state_note"]) == ("given", "s.npy")
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "given.ern")
    assert "rest state:  state file (s.npy)" in out


def test_convert_rest_state_idle(model, tmp_path, capsys):
    edgernn.save(model, tmp_path / "m.ern")
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "idle.ern",
                               "--rest-state", "idle")
    assert status == 0, err
    settled = rest_state.settle(model)
    assert f"rest state: idle (converged after {settled.steps} steps)" in out
    loaded = edgernn.load(tmp_path / "idle.ern")
    assert np.array_equal(loaded.new_state(), settled.state)
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "idle.ern")
    assert f"rest state:  idle (converged after {settled.steps} steps)" in out
    # back to zeros
    status, out, err = run_cli(capsys, "convert", tmp_path / "idle.ern", "-o", tmp_path / "z.ern",
                               "--rest-state", "zeros")
    assert status == 0 and "rest state: zeros" in out
    assert edgernn.load(tmp_path / "z.ern").spec == model.spec


def test_convert_rest_state_from_a_calibration_file(model, tmp_path, capsys):
    edgernn.save(model, tmp_path / "m.ern")
    xs = random_inputs(model, steps=30)
    np.save(tmp_path / "calib.npy", xs)
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "c.ern",
                               "--rest-state", tmp_path / "calib.npy")
    assert status == 0, err
    assert "rest state: calibration file (calib.npy, 30 samples)" in out
    expected = np.zeros(model.state_size, np.float32)
    model.run(xs, expected)
    assert np.array_equal(edgernn.load(tmp_path / "c.ern").new_state(), expected)


def test_convert_rest_state_errors_name_the_option_and_the_file(model, tmp_path, capsys):
    edgernn.save(model, tmp_path / "m.ern")
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3), np.float32))
    for source, problem in ((tmp_path / "wrong.npy", "neither a calibration sequence"),
                            (tmp_path / "missing.npy", "no such file")):
        status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "o.ern",
                                   "--rest-state", source)
        assert status == 1 and out == ""
        assert err.startswith(f"edgernn: error: --rest-state {source}: {source}") and problem in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.ern").exists()
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "o.ern", "--rest-state", "warm")
    assert status == 2 and "--rest-state" in err and "must be idle, zeros or a .npy file" in err


def test_verify_compares_an_idle_model_from_the_sources_own_start(model, tmp_path, capsys):
    """A rest state edgernn computed is not the source's start: verify runs both from zeros."""
    edgernn.save(model, tmp_path / "m.ern")
    run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "idle.ern", "--rest-state", "idle")
    pytest.importorskip("onnx")  # the ONNX step model, run by onnxruntime, is the reference
    pytest.importorskip("onnxruntime")
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "step.onnx")
    assert status == 0, err
    status, out, err = run_cli(capsys, "verify", tmp_path / "idle.ern", "--reference", tmp_path / "step.onnx",
                               "--sequences", "1", "--steps", "20")
    assert status == 0 and "PASS" in out, out + err
