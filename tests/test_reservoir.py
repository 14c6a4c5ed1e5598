"""Echo-state networks (edgernn/reservoir.py): a fixed reservoir, a readout fitted in closed form."""

import numpy as np
import pytest

import edgernn
from edgernn.errors import InputError
from edgernn.reference import reference_run
from edgernn.reservoir import echo_state_network, fit_readout


def test_the_reservoir_has_the_requested_spectral_radius_and_leak():
    model = echo_state_network(2, 60, spectral_radius=0.8, leak=0.25, seed=3)
    radius = np.abs(np.linalg.eigvals(model.weights["layers.0.R"].astype(np.float64))).max()
    assert radius == pytest.approx(0.8, rel=1e-4)
    assert (model.weights["layers.0.leak"] == np.float32(0.25)).all()
    again = echo_state_network(2, 60, spectral_radius=0.8, leak=0.25, seed=3)
    assert all((again.weights[k] == model.weights[k]).all() for k in model.weights)  # deterministic


def test_a_fitted_readout_predicts_a_delayed_input():
    """A memory task the readout alone cannot solve: y_t = x_{t-3}. NRMSE below 0.1 on unseen data."""
    rng = np.random.default_rng(0)
    xs = rng.uniform(-0.5, 0.5, (3000, 1)).astype(np.float32)
    ys = np.roll(xs, 3, axis=0)
    reservoir = echo_state_network(1, 100, spectral_radius=0.9, leak=0.9, seed=1)
    model = fit_readout(reservoir, xs[:2000], ys[:2000], ridge=1e-7, washout=50)
    state = model.new_state()
    model.run(xs[:2000], state)
    predicted = np.stack([model.step(x, state) for x in xs[2000:]])  # streams on from where training ended
    nrmse = np.sqrt(np.mean((predicted - ys[2000:]) ** 2)) / ys[2000:].std()
    assert nrmse < 0.1, nrmse
    assert "layers.0.R" in model.weights and model.spec.head[0].in_features == 100


def test_an_echo_state_network_is_an_ordinary_model_file(tmp_path):
    reservoir = echo_state_network(3, 20, leak=np.linspace(0.1, 1.0, 20), seed=2)
    rng = np.random.default_rng(1)
    sequences = [rng.standard_normal((80, 3)).astype(np.float32) for _ in range(3)]
    model = fit_readout(reservoir, sequences, [s[:, :2] for s in sequences], washout=10)
    edgernn.save(model, tmp_path / "esn.ern")
    loaded = edgernn.load(tmp_path / "esn.ern")
    ys = loaded.run(sequences[0], loaded.new_state())
    want, _ = reference_run(model.spec, model.weights, sequences[0])
    np.testing.assert_allclose(ys, want, rtol=0, atol=1e-5)


def test_fit_readout_refuses_mismatched_targets_and_other_models():
    reservoir = echo_state_network(1, 10)
    with pytest.raises(InputError, match="targets: 5 target rows for 10 states"):
        fit_readout(reservoir, np.zeros((10, 1), np.float32), np.zeros((5, 1)))
    fitted = fit_readout(reservoir, np.zeros((10, 1), np.float32), np.zeros((10, 1)))
    with pytest.raises(InputError, match="echo_state_network"):
        fit_readout(fitted, np.zeros((10, 1), np.float32), np.zeros((10, 1)))
