"""The sample rate in the spec: validation, the JSON and file round trips, inspect, convert --sample-rate."""

import json
import math

import numpy as np
import pytest

import edgernn
from edgernn.cli import main
from edgernn.errors import SpecError
from edgernn.model import Model
from edgernn.spec import ModelSpec
from helpers import random_model, random_spec


def run_cli(capsys, *args):
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def with_rate(spec: ModelSpec, rate) -> ModelSpec:
    return ModelSpec.from_dict({**spec.to_dict(), "sample_rate": rate})


def test_the_sample_rate_round_trips_through_json():
    spec = with_rate(random_spec("gru", hidden=8), 50)
    assert spec.sample_rate == 50.0 and isinstance(spec.sample_rate, float)
    assert spec.sample_period == pytest.approx(0.02)
    assert json.loads(spec.to_json())["sample_rate"] == 50.0
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_an_unset_sample_rate_leaves_the_json_as_it_was():
    """Specs without the new fields are the JSON older edgernn wrote: the same model fingerprint."""
    spec = random_spec("gru", hidden=8)
    assert spec.sample_rate is None and spec.sample_period is None
    assert set(json.loads(spec.to_json())) == {"input_size", "layers", "head", "normalize", "name", "version"}
    assert ModelSpec.from_json(json.dumps({**json.loads(spec.to_json()), "sample_rate": None})) == spec


@pytest.mark.parametrize("bad", [0, -50, 0.0, math.inf, math.nan, "50", True])
def test_a_bad_sample_rate_is_refused_by_name(bad):
    with pytest.raises(SpecError, match="sample_rate"):
        with_rate(random_spec("gru", hidden=8), bad)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_model_file_keeps_the_sample_rate(tmp_path, dtype):
    model = random_model("lstm", hidden=8, head=(2,))
    model = Model(with_rate(model.spec, 200), model.weights)
    assert model.sample_period == pytest.approx(0.005)
    edgernn.save(model, tmp_path / "m.ern", dtype=dtype)
    loaded = edgernn.load(tmp_path / "m.ern")
    assert loaded.spec.sample_rate == 200.0 and loaded.sample_period == pytest.approx(0.005)
    assert np.array_equal(loaded.new_state(), np.zeros(model.state_size, np.float32))


def test_convert_sample_rate_and_inspect(tmp_path, capsys):
    edgernn.save(random_model("gru", hidden=8, head=(2,)), tmp_path / "m.ern")
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "m.ern")
    assert status == 0 and "sample rate: not set\n" in out
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "r.ern", "--sample-rate", "50")
    assert status == 0, err
    assert out.splitlines()[1:] == ["sample rate: 50 Hz (period 20 ms)"]
    assert edgernn.load(tmp_path / "r.ern").sample_period == pytest.approx(0.02)
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "r.ern")
    assert "sample rate: 50 Hz (period 20 ms)\n" in out
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "r.ern", "--json")
    info = json.loads(out)
    assert info["sample_rate"] == 50.0 and info["sample_period"] == pytest.approx(0.02)
    # a slow sensor: the period in seconds
    run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "slow.ern", "--sample-rate", "0.5")
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "slow.ern")
    assert "sample rate: 0.5 Hz (period 2 s)" in out


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "fast"])
def test_convert_refuses_a_bad_sample_rate_naming_the_option(tmp_path, capsys, bad):
    edgernn.save(random_model("gru", hidden=8, head=(2,)), tmp_path / "m.ern")
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "r.ern", f"--sample-rate={bad}")
    assert status == 2 and "--sample-rate" in err
    assert not (tmp_path / "r.ern").exists()


def test_from_torch_sets_the_sample_rate():
    torch = pytest.importorskip("torch")
    from edgernn.converters import from_torch

    gru = torch.nn.GRU(3, 5)
    assert from_torch(gru, sample_rate=100).spec.sample_rate == 100.0
    assert from_torch(gru).spec.sample_rate is None
    with pytest.raises(SpecError, match="sample_rate: must be > 0"):
        from_torch(gru, sample_rate=-1)


def test_convert_labels_and_model_version_and_inspect(tmp_path, capsys):
    edgernn.save(random_model("gru", hidden=8, head=(2,)), tmp_path / "m.ern")
    status, out, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "r.ern", "--labels",
                               "idle, busy", "--model-version", "1.4")
    assert status == 0, err
    assert out.splitlines()[1:] == ["labels: idle, busy", "model version: 1.4"]
    spec = edgernn.load(tmp_path / "r.ern").spec
    assert spec.labels == ("idle", "busy") and spec.model_version == "1.4"
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "r.ern")
    assert "version:     1.4\n" in out and "labels:      idle, busy\n" in out
    status, out, _ = run_cli(capsys, "inspect", tmp_path / "r.ern", "--json")
    info = json.loads(out)
    assert info["model_version"] == "1.4" and info["labels"] == ["idle", "busy"]
    status, _, err = run_cli(capsys, "convert", tmp_path / "m.ern", "-o", tmp_path / "x.ern", "--labels", "a,b,c")
    assert status == 1 and "labels: one per output" in err
