"""Bearing-fault detection with an LSTM forecaster: the forecast error is the anomaly score.

A model that has only ever seen a healthy machine predicts its next vibration sample well; when a bearing
starts to fail, the impulses it adds are something the model never learnt, and its forecast error jumps.
No fault data is needed to train it. The path, end to end:
  1. simulate the `vibration` profile (a bearing housing's acceleration at 200 Hz, shaft at ~24.5 Hz) on
     several machines, and keep the 1 s windows where no defect exists yet,
  2. train an nn.LSTM + nn.Linear next-sample forecaster on them in PyTorch,
  3. convert it with `from_torch` (which checks it against PyTorch), save the .ern file and load it back,
  4. pick the alarm threshold on a healthy stretch of another machine (a high percentile of its score),
  5. stream held-out machines through `model.step`, one sample per call as the daemon does, scoring each
     sample, and report ROC AUC, detection delay, false alarms, step latency and parity with PyTorch,
  6. draw the first one's stream, forecast and score with the faults shaded (--plot, a PNG).

Run it:  python examples/vibration_lstm/vibration_lstm.py           (under a minute)
         python examples/vibration_lstm/vibration_lstm.py --quick   (the test suite's version)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgernn
from edgernn.converters import from_torch
from edgernn.firmware_sim.signals import VibrationSignal, generate

HERE = Path(__file__).resolve().parent
RATE = VibrationSignal.DEFAULT_RATE_HZ  # 200 samples per second
WINDOW = int(RATE)       # training windows of 1 s
WARMUP = 20              # the first samples of a window are not scored: the LSTM is still finding the phase
SMOOTHING_S = 0.25       # the score's time constant
THRESHOLD_PERCENTILE = 99.9
THRESHOLD_MARGIN = 1.25  # headroom above that percentile
SETTLE_S = 1.0           # after a repair, the score still remembers the fault for a moment


class Forecaster(nn.Module):
    """x_t -> the forecast of x_{t+1}, at every step."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


class AnomalyScore:
    """The squared error of the last forecast, smoothed exponentially: O(1) per sample, as a daemon needs.

    A stream's first WARMUP forecasts are not scored: the model was not trained to make them either.
    """

    def __init__(self, time_constant_s: float = SMOOTHING_S):
        self.alpha = 1.0 / (time_constant_s * RATE)
        self.value = 0.0
        self.forecast = None
        self.samples = 0

    def update(self, x: float, forecast_of_next: float) -> float:
        self.samples += 1
        if self.samples > WARMUP + 1:  # self.forecast was made after WARMUP samples or more
            self.value += self.alpha * ((x - self.forecast) ** 2 - self.value)
        self.forecast = forecast_of_next
        return self.value


def simulate(seconds: float, seed: int):
    """One machine: xs (n, 1) float32, fault (n,) its label, defect (n,) whether a defect exists at all.

    The label says fault from a quarter of full severity on; the defect starts growing 2.5-7.5 s earlier.
    `generate` gives the labels; replaying the same seeded signal reads its severity, the ground truth.
    """
    xs, labels = generate("vibration", int(seconds * RATE), seed=seed)
    signal, defect = VibrationSignal(seed=seed), np.empty(len(xs), bool)
    for n in range(len(xs)):
        signal.next()
        defect[n] = signal.severity > 0
    return xs, labels == VibrationSignal.labels.index("fault"), defect


def stretches(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, stop) index ranges where ``mask`` is true."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def clearly_healthy(defect: np.ndarray) -> np.ndarray:
    """No defect, and not just after a repair."""
    healthy = ~defect
    for _, stop in stretches(defect):
        healthy[stop:stop + int(SETTLE_S * RATE)] = False
    return healthy


def healthy_windows(seeds, seconds: float) -> torch.Tensor:
    """(N, WINDOW + 1, 1): half-overlapping windows of several machines, healthy throughout."""
    windows = []
    for seed in seeds:
        xs, _, defect = simulate(seconds, seed)
        windows += [xs[s:s + WINDOW + 1] for s in range(0, len(xs) - WINDOW, WINDOW // 2)
                    if not defect[s:s + WINDOW + 1].any()]
    return torch.from_numpy(np.stack(windows))


def train(net: Forecaster, windows: torch.Tensor, steps: int) -> float:
    """Adam on random batches of 64 windows, one-cycle learning rate; returns the last batch's RMSE."""
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-2, total_steps=steps)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (64,))]
        loss = nn.functional.mse_loss(net(batch[:, :-1])[:, WARMUP:], batch[:, WARMUP + 1:])
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    return loss.item() ** 0.5


def calibrate(model: edgernn.Model, seconds: float, seed: int) -> float:
    """The alarm threshold: a high percentile of the score on another machine's healthy time, plus headroom."""
    xs, _, defect = simulate(seconds, seed)
    scorer = AnomalyScore()
    forecasts = model.run(xs, model.new_state())  # the same as model.step sample after sample, in one call
    scores = np.array([scorer.update(float(x), float(f)) for x, f in zip(xs[:, 0], forecasts[:, 0])])
    healthy = clearly_healthy(defect)
    healthy[:int(RATE)] = False  # the first second: the state and the score are still settling
    return float(np.percentile(scores[healthy], THRESHOLD_PERCENTILE) * THRESHOLD_MARGIN)


def stream(model: edgernn.Model, xs: np.ndarray):
    """One model.step per sample, as the daemon does: (forecasts, scores, step latencies in µs)."""
    state, scorer = model.new_state(), AnomalyScore()
    model.step(xs[0], model.new_state())  # the kernel's first call, outside the timing
    forecasts, scores, latencies = np.empty_like(xs), np.empty(len(xs)), np.empty(len(xs))
    for t, x in enumerate(xs):
        started = time.perf_counter_ns()
        model.step(x, state, out=forecasts[t])
        latencies[t] = (time.perf_counter_ns() - started) / 1e3
        scores[t] = scorer.update(float(x[0]), float(forecasts[t, 0]))
    return forecasts, scores, latencies


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a random fault sample scores above a random healthy one (Mann-Whitney U)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_delays(alarm: np.ndarray, fault: np.ndarray, defect: np.ndarray) -> list[tuple[float, float]]:
    """Per fault: seconds from the label's start and from the defect's start to the first alarm after the
    defect started (nan: never raised while it lasted)."""
    delays = []
    for grows, stop in stretches(defect):
        labelled = np.flatnonzero(fault[grows:stop])
        if len(labelled):
            raised = np.flatnonzero(alarm[grows:stop])
            seconds = raised[0] / RATE if len(raised) else float("nan")
            delays.append((seconds - labelled[0] / RATE, seconds))
    return delays


def held_out(model: edgernn.Model, net: Forecaster, seconds: float, seed: int, threshold: float) -> dict:
    """Stream one held-out machine through the model: per-sample arrays for the report and the plot, its
    ROC AUC and its detection delays."""
    xs, fault, defect = simulate(seconds, seed)
    forecasts, scores, latencies = stream(model, xs)
    with torch.no_grad():
        reference = net(torch.from_numpy(xs)[None]).numpy()[0]
    scored = np.arange(len(xs)) >= RATE  # the first second is the model's and the score's warm-up
    error = np.zeros(len(xs))
    error[1:] = (xs[1:, 0] - forecasts[:-1, 0]) ** 2  # error[t]: how far off the forecast of sample t was
    return {"xs": xs[:, 0], "forecasts": forecasts[:, 0], "scores": scores, "fault": fault, "defect": defect,
            "scored": scored, "healthy": clearly_healthy(defect) & scored, "error": error, "latencies": latencies,
            "parity": np.abs(forecasts - reference)[:, 0], "auc": roc_auc(scores[scored], fault[scored]),
            "delays": detection_delays(scores > threshold, fault, defect)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run (what the tests use)")
    parser.add_argument("--plot", type=Path, default=HERE / "vibration.png", help="where to write the PNG")
    args = parser.parse_args()
    machines, train_s, steps, test_machines, test_s = (3, 120, 150, 1, 90) if args.quick else (8, 300, 1500, 4, 300)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a 32-unit LSTM gains little from threads, and loses a lot on a busy machine
    started = time.monotonic()
    windows = healthy_windows(range(machines), train_s)
    print(f"1. data: {len(windows)} healthy 1 s windows from {machines} simulated machines at {RATE:.0f} Hz")
    net = Forecaster()
    rmse = train(net, windows, steps)
    net.eval()
    print(f"2. trained {steps} steps in {time.monotonic() - started:.0f} s, training RMSE {rmse:.4f} g "
          "(the sensor's noise alone is 0.05 g)")

    model = from_torch(net)  # refuses if the converted model does not compute what PyTorch computes
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vibration_lstm.ern"
        edgernn.save(model, path)
        model = edgernn.load(path)
        print(f"3. converted and saved {path.name} ({path.stat().st_size:,} bytes): {model}")

    threshold = calibrate(model, train_s, seed=10_000)
    print(f"4. threshold {threshold:.4f} g² ({THRESHOLD_PERCENTILE}th percentile of a healthy machine's score "
          f"x {THRESHOLD_MARGIN})")

    runs = [held_out(model, net, test_s, 20_000 + n, threshold) for n in range(test_machines)]
    every = {key: np.concatenate([run[key] for run in runs]) for key in runs[0] if key not in ("auc", "delays")}
    healthy, fault, scored = every["healthy"], every["fault"], every["scored"]
    print(f"5. streamed {test_machines} held-out machine(s) x {test_s} s ({len(fault)} samples) through "
          f"model.step: {np.median(every['latencies']):.1f} µs per step (median), "
          f"{np.percentile(every['latencies'], 99):.1f} µs (p99)")
    print(f"   max |edgernn - PyTorch| = {every['parity'].max():.2e} over the streams")
    print(f"   forecast RMSE: healthy {np.sqrt(every['error'][healthy].mean()):.4f} g, "
          f"fault {np.sqrt(every['error'][fault].mean()):.4f} g")
    aucs = [run["auc"] for run in runs]
    print(f"   ROC AUC {roc_auc(every['scores'][scored], fault[scored]):.4f} (the score against the fault label, "
          f"every sample after the first second; per machine {min(aucs):.4f} to {max(aucs):.4f})")
    label_delays, defect_delays = np.array([delay for run in runs for delay in run["delays"]]).reshape(-1, 2).T
    print(f"   detection: {np.isfinite(label_delays).sum()} of {len(label_delays)} faults raised an alarm; after the "
          f"fault label, median {np.nanmedian(label_delays):+.2f} s ({np.nanmin(label_delays):+.2f} to "
          f"{np.nanmax(label_delays):+.2f}; negative: before it); after the defect started growing, median "
          f"{np.nanmedian(defect_delays):.2f} s ({np.nanmin(defect_delays):.2f} to {np.nanmax(defect_delays):.2f})")
    false_alarms = every["scores"][healthy] > threshold
    episodes = sum(len(stretches((run["scores"] > threshold) & run["healthy"])) for run in runs)
    print(f"   false alarms: {false_alarms.mean():.3%} of {healthy.sum() / RATE:.0f} s with no defect, "
          f"{episodes} alarm episode(s)")

    from vibration_plot import draw  # matplotlib, only where it is needed
    first = runs[0]
    draw(args.plot, first["xs"], first["forecasts"], first["scores"], first["fault"], first["defect"],
         threshold=threshold, delays=[d for d, _ in first["delays"]], auc=first["auc"], smoothing_s=SMOOTHING_S)
    print(f"6. plot of the first held-out machine: {args.plot} ({args.plot.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
