"""The simulator's signal generators: deterministic per seed, the shapes and labels they promise, and
each label showing the physics it stands for (so a model trained on them learns something real)."""

import math

import numpy as np
import pytest

from edgernn.firmware_sim.signals import PROFILES, ImuSignal, generate, make_signal


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_same_seed_same_samples_other_seed_other_samples(profile):
    a, labels_a = generate(profile, 3000, seed=5)
    b, labels_b = generate(profile, 3000, seed=5)
    c, _ = generate(profile, 3000, seed=6)
    assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_generate_is_what_a_device_publishes_sample_for_sample(profile):
    signal = make_signal(profile, seed=3)
    X, y = generate(profile, 500, seed=3)
    for n in range(500):
        values, label = signal.next()
        assert len(values) == len(signal.channels) == X.shape[1]
        assert np.array_equal(np.float32(values), X[n]) and signal.labels[y[n]] == label
    assert X.dtype == np.float32 and np.isfinite(X).all()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_label_occurs_in_a_long_run(profile):
    rate = PROFILES[profile].DEFAULT_RATE_HZ
    seconds = {"imu": 600, "vibration": 600, "temperature": 3600}[profile]
    _, y = generate(profile, int(rate * seconds), seed=1)
    assert set(np.unique(y)) == set(range(len(PROFILES[profile].labels)))


def test_imu_activities_differ_as_bodies_do():
    X, y = generate("imu", 50 * 1200, seed=2)
    magnitude = np.linalg.norm(X[:, :3], axis=1)
    index = {name: i for i, name in enumerate(ImuSignal.labels)}
    still, walk, run = (magnitude[y == index[name]] for name in ("still", "walk", "run"))
    assert abs(still.mean() - 1.0) < 0.05 and still.std() < 0.06  # gravity and noise only
    assert still.std() < walk.std() < run.std()                  # more vigour, more variation
    assert magnitude[y == index["fall"]].min() < 0.3            # free fall reads almost nothing


def test_vibration_fault_raises_the_high_frequency_energy():
    X, y = generate("vibration", 200 * 600, seed=4)
    residual = np.abs(np.diff(X[:, 0]))
    assert residual[y[1:] == 1].mean() > 1.2 * residual[y[1:] == 0].mean()


def test_temperature_anomalies_stand_out_from_the_drift():
    X, y = generate("temperature", 3600 * 2, seed=8)
    steps = np.abs(np.diff(X[:, 0]))
    assert steps[y[1:] == 0].mean() < 0.1  # sensor noise and a slow swing


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf])
def test_a_bad_rate_is_refused(rate):
    with pytest.raises(ValueError, match="sample rate"):
        make_signal("imu", rate)


def test_an_unknown_profile_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown profile 'sonar'.*imu"):
        make_signal("sonar")
