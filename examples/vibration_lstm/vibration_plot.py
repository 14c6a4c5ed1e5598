"""The vibration example's picture: the whole stream, two close-ups of signal and forecast, the anomaly score."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: the figure only goes to a file
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgernn.firmware_sim.signals import VibrationSignal  # noqa: E402

RATE = VibrationSignal.DEFAULT_RATE_HZ
CLOSE_UP_S = 0.3
SIGNAL, FORECAST, SCORE, FAULT = "#3b4a5a", "#f07f1e", "#2a6fb0", "#d62728"
STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.titleweight": "bold", "axes.titlelocation": "left",
         "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.25, "axes.xmargin": 0}


def _stretches(fault: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], fault.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _shade(ax, faults, defects) -> None:
    for start, stop in defects:  # the defect is growing, below the label's severity
        ax.axvspan(start / RATE, stop / RATE, color=FAULT, alpha=0.05, lw=0, zorder=0)
    for start, stop in faults:
        ax.axvspan(start / RATE, stop / RATE, color=FAULT, alpha=0.10, lw=0, zorder=0)


def _close_ups(length: int, stretches) -> tuple[int, int]:
    """Where the two close-ups start: halfway into the healthy time before the first fault (or after it),
    and two thirds into the first fault, where it is well developed."""
    start, stop = stretches[0]
    healthy = start // 2 if start > 4 * RATE else min(length - int(CLOSE_UP_S * RATE) - 1, stop + int(4 * RATE))
    return healthy, start + 2 * (stop - start) // 3


def draw(path: Path, xs, forecasts, scores, fault, defect, *, threshold: float, delays, auc: float,
         smoothing_s: float) -> None:
    """Write the PNG. Per sample t: xs[t], forecasts[t] (of xs[t + 1]), scores[t], fault[t] (the label),
    defect[t] (a defect exists, labelled or not yet); ``delays``: seconds from each fault label to its alarm."""
    stretches, defects = _stretches(fault), _stretches(defect)
    t = np.arange(len(xs)) / RATE
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(10, 7.4), dpi=100, layout="constrained")
        grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 1.15])
        stream_ax, score_ax = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[2, :])
        close_axes = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
        fig.suptitle("An LSTM that only ever saw a healthy machine flags a failing bearing by its forecast error",
                     fontsize=11.5, fontweight="bold", x=0.01, ha="left")

        # 1. The whole stream as its envelope (min and max per 0.1 s): 200 samples/s are a solid band otherwise.
        per_bin = int(RATE // 10)
        n = len(xs) // per_bin * per_bin
        bins = xs[:n].reshape(-1, per_bin)
        stream_ax.fill_between(t[:n:per_bin], bins.min(1), bins.max(1), color=SIGNAL, lw=0)
        _shade(stream_ax, stretches, defects)
        stream_ax.set(title="Held-out machine: bearing housing acceleration, 200 Hz (min-max per 0.1 s)",
                      ylabel="acceleration (g)")

        # 2. Close-ups: the forecast follows a healthy machine and misses the fault's impulses.
        width = int(CLOSE_UP_S * RATE)
        for ax, start, name, tag in zip(close_axes, _close_ups(len(xs), stretches), ("healthy", "bearing fault"),
                                        "AB"):
            ax.plot(t[start + 1:start + 1 + width], xs[start + 1:start + 1 + width], color=SIGNAL, lw=1.0,
                    marker="o", ms=2.5)
            ax.plot(t[start + 1:start + 1 + width], forecasts[start:start + width], color=FORECAST, lw=1.6)
            ax.set(title=f"{tag}. {name}, {CLOSE_UP_S:.1f} s from t = {t[start]:.0f} s", xlabel="time (s)",
                   ylabel="acceleration (g)")
            stream_ax.axvline(t[start], color="black", lw=0.8, ls=":")
            stream_ax.annotate(tag, (t[start], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -2),
                               textcoords="offset points", fontweight="bold", va="top")
        low = min(ax.get_ylim()[0] for ax in close_axes)
        high = max(ax.get_ylim()[1] for ax in close_axes)
        for ax in close_axes:
            ax.set_ylim(low, high)

        # 3. The score against the threshold, and when the alarm first went up for each fault.
        score_ax.semilogy(t, np.maximum(scores, 1e-6), color=SCORE, lw=1.0)
        score_ax.axhline(threshold, color=FAULT, ls="--", lw=1.0)
        _shade(score_ax, stretches, defects)
        for (start, _), delay in zip(stretches, delays):
            if np.isfinite(delay):
                raised = start / RATE + delay
                score_ax.plot(raised, threshold, marker="v", color="black", ms=6, zorder=3)
                score_ax.annotate(f"{delay:+.1f} s".replace("-", "\u2212"), (raised, threshold), xytext=(-5, 10),
                                  textcoords="offset points", ha="right", fontsize=8,
                                  bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
        score_ax.set(title=f"Anomaly score: squared forecast error, smoothed over {smoothing_s:g} s  \u00b7  "
                           f"ROC AUC {auc:.4f}", xlabel="time (s)", ylabel="score (g\u00b2)",
                     ylim=(max(1e-4, scores[int(RATE):].min() / 2), None))

        handles = [plt.Rectangle((0, 0), 1, 1, color=SIGNAL),
                   plt.Rectangle((0, 0), 1, 1, color=FAULT, alpha=0.07),
                   plt.Rectangle((0, 0), 1, 1, color=FAULT, alpha=0.15),
                   plt.Line2D([], [], color=SIGNAL, marker="o", ms=2.5, lw=1.0),
                   plt.Line2D([], [], color=FORECAST, lw=1.6),
                   plt.Line2D([], [], color=SCORE, lw=1.0),
                   plt.Line2D([], [], color=FAULT, ls="--", lw=1.0),
                   plt.Line2D([], [], color="black", marker="v", ms=6, lw=0)]
        labels = ["vibration", "defect growing", "fault (label)", "measured", "forecast (edgernn)",
                  "anomaly score", "threshold", "alarm, s from the label"]
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), handlelength=1.5,
                   columnspacing=1.0, handletextpad=0.5, fontsize=8.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
