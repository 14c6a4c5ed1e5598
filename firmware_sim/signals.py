"""Signal generators with ground truth: what a simulated sensor measures, sample by sample.

Each `Signal` is one device's source: `next()` returns the next sample (one float per channel) and the
true label of that instant, so a model's live predictions can be scored. Everything comes from one
`random.Random(seed)`: the same profile, rate and seed give the same samples on every machine. Plain
Python floats and `math`, not NumPy, because a fleet calls `next()` tens of thousands of times a second,
one sample at a time, and NumPy's per-call overhead is larger than the arithmetic here.

Profiles:
- ``imu``: a body-worn 3-axis accelerometer (g) and gyroscope (rad/s) at 50 Hz; activities still, walk,
  run and fall (free fall, impact, then lying still), each lasting a few seconds.
- ``vibration``: the radial acceleration (g) of a rotating machine's bearing housing at 200 Hz; a bearing
  fault develops now and then (an impulse train at the outer-race defect frequency that grows), until
  maintenance puts it right.
- ``temperature``: a room temperature (°C) at 1 Hz that drifts slowly, with sudden anomalies (spikes, a
  door left open).
"""

from __future__ import annotations

import math
import random

import numpy as np

TWO_PI = 2.0 * math.pi


class Signal:
    """One device's deterministic signal source; subclasses say what it measures."""

    profile = ""
    channels: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    DEFAULT_RATE_HZ = 1.0

    def __init__(self, rate_hz: float | None = None, seed: int = 0):
        rate = self.DEFAULT_RATE_HZ if rate_hz is None else float(rate_hz)
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"{self.profile}: the sample rate must be a positive number of Hz, got {rate_hz}")
        self.rate_hz = rate
        self.dt = 1.0 / rate
        self.random = random.Random(seed)
        self.t = 0.0  # seconds since the start, on the sample grid

    def next(self) -> tuple[list[float], str]:
        """The next sample (``len(channels)`` floats) and the true label at its instant."""
        values, label = self._sample()
        self.t += self.dt
        return values, label

    def _sample(self) -> tuple[list[float], str]:
        raise NotImplementedError


class ImuSignal(Signal):
    """Activities as a Markov chain of segments; the body's periodic motion keeps its phase across samples.

    Standing, gravity is on z; after a fall the wearer lies on their side (gravity on x) until they get up
    and walk or run again.
    """

    profile = "imu"
    channels = ("ax", "ay", "az", "gx", "gy", "gz")
    labels = ("still", "walk", "run", "fall")
    DEFAULT_RATE_HZ = 50.0
    DURATIONS = {"still": (2.0, 6.0), "walk": (3.0, 8.0), "run": (2.0, 6.0), "fall": (1.0, 1.0)}
    NEXT = {"still": (("walk", 0.5), ("run", 0.3), ("fall", 0.2)),
            "walk": (("still", 0.45), ("run", 0.35), ("fall", 0.2)),
            "run": (("walk", 0.5), ("still", 0.3), ("fall", 0.2)),
            "fall": (("still", 1.0),)}

    def __init__(self, rate_hz: float | None = None, seed: int = 0):
        super().__init__(rate_hz, seed)
        self.lying = False
        self.phase = 0.0
        self._begin(self.random.choice(("still", "walk", "run")))

    def _begin(self, activity: str) -> None:
        low, high = self.DURATIONS[activity]
        self.activity = activity
        self.left = self.random.uniform(low, high)
        self.elapsed = 0.0
        self.step_hz = {"walk": self.random.uniform(1.6, 2.2), "run": self.random.uniform(2.6, 3.2)}.get(activity, 0.0)
        self.gain = self.random.uniform(0.8, 1.2)  # people move with more or less vigour
        self.impact = [self.random.gauss(0, 1) for _ in range(3)]
        if activity in ("walk", "run"):
            self.lying = False

    def _advance_segment(self) -> None:
        self.elapsed += self.dt
        self.left -= self.dt
        if self.left <= 0:
            if self.activity == "fall":
                self.lying = True
            names, weights = zip(*self.NEXT[self.activity])
            self._begin(self.random.choices(names, weights)[0])

    def _sample(self) -> tuple[list[float], str]:
        rnd, activity = self.random, self.activity
        gravity = [1.0, 0.0, 0.0] if self.lying else [0.0, 0.0, 1.0]
        accel, gyro = list(gravity), [0.0, 0.0, 0.0]
        if activity in ("walk", "run"):
            self.phase = (self.phase + TWO_PI * self.step_hz * self.dt) % TWO_PI
            p, g = self.phase, self.gain
            if activity == "walk":
                accel[2] += g * (0.25 * math.sin(p) + 0.08 * math.sin(2 * p))
                accel[0] += g * 0.15 * math.sin(p + 0.6)
                accel[1] += g * 0.08 * math.sin(0.5 * p)
                gyro = [g * 0.35 * math.sin(p), g * 0.12 * math.sin(0.5 * p), g * 0.1 * math.cos(p)]
            else:
                bounce = abs(math.sin(0.5 * p)) ** 3  # sharp foot strikes, one per step
                accel[2] += g * (1.6 * bounce - 0.45)
                accel[0] += g * 0.4 * math.sin(p + 0.4)
                accel[1] += g * 0.2 * math.sin(0.5 * p)
                gyro = [g * 1.0 * math.sin(p), g * 0.35 * math.sin(0.5 * p), g * 0.3 * math.cos(p)]
        elif activity == "fall":
            s = self.elapsed
            if s < 0.35:  # free fall: the accelerometer reads almost nothing
                accel = [0.1 * a for a in gravity]
                gyro = [2.5 * s / 0.35 * i for i in self.impact]
            elif s < 0.5:  # impact
                accel = [gravity[i] + 2.5 * self.impact[i] for i in range(3)]
                gyro = [3.0 * i for i in self.impact]
            else:  # settling on the floor, the body's orientation changed
                ring = math.exp(-(s - 0.5) * 8.0) * math.sin(TWO_PI * 6.0 * s)
                accel = [(1.0 if i == 0 else 0.0) + 0.5 * ring * self.impact[i] for i in range(3)]
                gyro = [ring * i for i in self.impact]
        accel = [a + rnd.gauss(0.0, 0.02) for a in accel]
        gyro = [w + rnd.gauss(0.0, 0.02) for w in gyro]
        self._advance_segment()
        return accel + gyro, activity


class VibrationSignal(Signal):
    """A machine turning at ~1480 rpm; a bearing fault grows as impulses at the outer-race defect frequency.

    Each impulse excites the housing's resonance, which rings down within a few samples. The label is
    ``fault`` once the fault's severity is large enough to matter, ``healthy`` otherwise.
    """

    profile = "vibration"
    channels = ("accel",)
    labels = ("healthy", "fault")
    DEFAULT_RATE_HZ = 200.0
    BPFO_RATIO = 3.58      # outer-race defect frequency / shaft frequency, a typical deep-groove ball bearing
    RESONANCE_HZ = 70.0
    FAULT_THRESHOLD = 0.25

    def __init__(self, rate_hz: float | None = None, seed: int = 0):
        super().__init__(rate_hz, seed)
        self.shaft_hz = self.random.uniform(23.5, 25.5)
        self.shaft_phase = self.random.uniform(0.0, TWO_PI)
        self.defect_phase = 0.0
        self.ring = 0.0     # the resonance's amplitude, decaying between impulses
        self.severity = 0.0
        self._healthy_for = self.random.uniform(20.0, 60.0)
        self._growth = 0.0  # severity per second while a fault develops
        self._faulty_for = 0.0

    def _schedule(self) -> None:
        if self._healthy_for > 0:
            self._healthy_for -= self.dt
            if self._healthy_for <= 0:
                self._growth = 1.0 / self.random.uniform(10.0, 30.0)  # full severity in 10-30 s
                self._faulty_for = self.random.uniform(30.0, 60.0)
            return
        self.severity = min(1.0, self.severity + self._growth * self.dt)
        self._faulty_for -= self.dt
        if self._faulty_for <= 0:  # maintenance: a new bearing
            self.severity = 0.0
            self._healthy_for = self.random.uniform(20.0, 60.0)

    def _sample(self) -> tuple[list[float], str]:
        rnd = self.random
        self._schedule()
        self.shaft_phase = (self.shaft_phase + TWO_PI * self.shaft_hz * self.dt) % TWO_PI
        p = self.shaft_phase
        value = 0.5 * math.sin(p) + 0.15 * math.sin(2 * p + 0.3)  # imbalance, misalignment
        self.defect_phase += self.BPFO_RATIO * self.shaft_hz * self.dt
        if self.defect_phase >= 1.0:  # a rolling element passes the defect
            self.defect_phase -= 1.0
            self.ring += self.severity * rnd.uniform(0.8, 1.2)
        self.ring *= math.exp(-self.dt * 150.0)
        value += self.ring * math.sin(TWO_PI * self.RESONANCE_HZ * self.t)
        value += rnd.gauss(0.0, 0.05)
        return [value], "fault" if self.severity >= self.FAULT_THRESHOLD else "healthy"


class TemperatureSignal(Signal):
    """A room's temperature: a slow daily swing and drift, sensor noise, and now and then an anomaly.

    Anomalies are a spike (a heat source near the sensor) or a door left open (a drop, then a slow
    recovery); the label is ``anomaly`` while one lasts. The "day" is compressed to 20 minutes so a demo
    shows the swing.
    """

    profile = "temperature"
    channels = ("temp_c",)
    labels = ("normal", "anomaly")
    DEFAULT_RATE_HZ = 1.0
    DAY_S = 1200.0

    def __init__(self, rate_hz: float | None = None, seed: int = 0):
        super().__init__(rate_hz, seed)
        self.base = self.random.uniform(19.0, 23.0)
        self.drift = 0.0
        self.day_phase = self.random.uniform(0.0, TWO_PI)
        self.offset = 0.0        # the anomaly's contribution
        self.anomaly_left = 0.0  # seconds
        self.anomaly_kind = ""
        self.next_anomaly = self.random.uniform(60.0, 300.0)

    def _sample(self) -> tuple[list[float], str]:
        rnd, dt = self.random, self.dt
        self.drift += rnd.gauss(0.0, 0.02 * math.sqrt(dt)) - 0.001 * self.drift * dt
        self.next_anomaly -= dt
        if self.next_anomaly <= 0 and self.anomaly_left <= 0:
            self.anomaly_kind = rnd.choice(("spike", "door"))
            self.anomaly_left = rnd.uniform(10.0, 40.0)
            self.anomaly_size = rnd.uniform(4.0, 10.0)
            self.next_anomaly = rnd.uniform(120.0, 400.0)
        if self.anomaly_left > 0:
            self.anomaly_left -= dt
            target = self.anomaly_size if self.anomaly_kind == "spike" else -self.anomaly_size
            self.offset += (target - self.offset) * min(1.0, 0.5 * dt)
            label = "anomaly"
        else:
            self.offset *= math.exp(-0.05 * dt)  # back to normal, slowly
            label = "anomaly" if abs(self.offset) > 1.0 else "normal"
        day = 1.5 * math.sin(TWO_PI * self.t / self.DAY_S + self.day_phase)
        return [self.base + day + self.drift + self.offset + rnd.gauss(0.0, 0.05)], label


PROFILES: dict[str, type[Signal]] = {cls.profile: cls for cls in (ImuSignal, VibrationSignal, TemperatureSignal)}


def make_signal(profile: str, rate_hz: float | None = None, seed: int = 0) -> Signal:
    """The signal source of one device; ``rate_hz`` None means the profile's own rate."""
    try:
        cls = PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}") from None
    return cls(rate_hz, seed)


def generate(profile: str, samples: int, rate_hz: float | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` consecutive samples of one device, for training and offline checks.

    Returns X, float32 of shape (samples, channels), and y, the int64 index of each sample's label in
    the profile's ``labels``. Exactly what a device with this seed publishes, sample for sample.
    """
    signal = make_signal(profile, rate_hz, seed)
    index = {label: i for i, label in enumerate(signal.labels)}
    X = np.empty((samples, len(signal.channels)), dtype=np.float32)
    y = np.empty(samples, dtype=np.int64)
    for n in range(samples):
        values, label = signal.next()
        X[n] = values
        y[n] = index[label]
    return X, y
