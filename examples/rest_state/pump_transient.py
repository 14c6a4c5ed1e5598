"""How much a stored rest state removes of the start-up transient: a pump's pressure, forecast one step ahead.

A stream in the daemon starts (and restarts after a reset) at ``model.new_state()``. Without a rest
state that is zeros, a state the model never sees while the pump runs at about 3 bar, and its first
predictions are off until the state catches up. This script:

  1. trains a small PyTorch GRU to forecast the next pressure sample, streaming (the state carried
     from one chunk of samples to the next, the way the daemon runs it),
  2. converts it with `from_torch` and builds rest states the ways `edgernn convert --rest-state` does:
     ``idle`` (settled under a constant idle input: zeros, since this model has no input normalisation,
     i.e. a pump that is off), the same settled at the operating point (``--rest-state`` with a
     calibration file of a constant 3 bar), and ``calib.npy`` (the final state after a recorded stretch of
     normal operation),
  3. starts many streams at random points of an unseen signal from each of them, and prints the error of
     the first predictions against the steady-state error (the same samples predicted by a stream that has
     run for a long time).
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

from edgernn.converters import from_torch
from edgernn.rest_state import from_sequence, settle, with_rest_state

OPERATING_POINT = 3.0  # bar
CHUNK = 50
SPANS = ((1, 1), (2, 5), (6, 20), (21, 50))  # 1-based prediction numbers after the start


def pressure(steps: int, seed: int) -> np.ndarray:
    """A centrifugal pump's outlet pressure (bar), one sample per second: the operating point, a slow
    demand cycle, the pump's pulsation, valve steps and sensor noise. (steps,) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    valve = np.repeat(rng.choice([-0.2, 0.0, 0.15], size=steps // 200 + 1), 200)[:steps]
    p = (OPERATING_POINT + 0.25 * np.sin(2 * np.pi * t / 300) + 0.08 * np.sin(2 * np.pi * t / 7)
         + valve + 0.01 * rng.standard_normal(steps))
    return p.astype(np.float32)


class Forecaster(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out)


def train(epochs: int) -> Forecaster:
    """Streaming training (truncated backpropagation through time): 40 long streams cut into chunks of
    CHUNK samples, the state carried from chunk to chunk, as the model will run. Each epoch starts the
    streams from zeros and leaves their first chunk out of the loss."""
    torch.manual_seed(0)
    net = Forecaster()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    streams = torch.from_numpy(pressure(20_000, seed=1)).reshape(40, 500, 1)
    for _ in range(epochs):
        state = None
        for begin in range(0, 500 - CHUNK, CHUNK):
            x, target = streams[:, begin:begin + CHUNK], streams[:, begin + 1:begin + CHUNK + 1]
            out, state = net.gru(x, state)
            state = state.detach()
            if begin:
                loss = nn.functional.mse_loss(net.head(out), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    print(f"trained {epochs} epochs, training RMSE {loss.item() ** 0.5:.4f} bar")
    return net.eval()


def start_errors(model, state, signal, starts, horizon) -> np.ndarray:
    """|forecast - next sample| of the first ``horizon`` predictions of a stream started at each of
    ``starts`` from ``state``: (len(starts), horizon)."""
    errors = np.empty((len(starts), horizon))
    for row, start in enumerate(starts):
        xs = signal[start:start + horizon, None]
        ys = model.run(xs, state.copy())[:, 0]
        errors[row] = np.abs(ys - signal[start + 1:start + horizon + 1])
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--starts", type=int, default=500, help="stream starts to average over")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and starts (the test runs this)")
    args = parser.parse_args()
    epochs, n_starts = (15, 100) if args.quick else (args.epochs, args.starts)
    began = time.monotonic()
    net = train(epochs)
    model = from_torch(net)
    horizon = SPANS[-1][1]
    rest_states = {
        "zeros (no rest state)": np.zeros(model.state_size, np.float32),
        "--rest-state idle (input 0)": settle(model).state,
        "idle at 3 bar (constant calib)": settle(model, idle=[OPERATING_POINT]).state,
        "--rest-state calib.npy": from_sequence(model, pressure(600, seed=2)[:, None]),
    }
    starting = {name: with_rest_state(model, state, "zeros" if name.startswith("zeros") else "calibration")
                for name, state in rest_states.items()}

    test = pressure(30_000, seed=3)
    rng = np.random.default_rng(4)
    starts = rng.integers(1_000, len(test) - horizon - 1, n_starts)
    steady_ys = model.run(test[:-1, None], model.new_state())[:, 0]  # one stream that has run all along
    steady = np.abs(steady_ys - test[1:])
    steady_at = np.stack([steady[s:s + horizon] for s in starts])

    header = "start state                        " + "".join(f"{f'pred {a}' if a == b else f'pred {a}-{b}':>11}"
                                                           for a, b in SPANS)
    print(f"\nmean |error| (bar) of the first predictions of {n_starts} streams started at random points")
    print(header)
    print("-" * len(header))
    for name, start_model in starting.items():
        errors = start_errors(start_model, start_model.new_state(), test, starts, horizon)
        print(f"{name:<35}" + "".join(f"{errors[:, a - 1:b].mean():11.4f}" for a, b in SPANS))
    print(f"{'steady state (same samples)':<35}" + "".join(f"{steady_at[:, a - 1:b].mean():11.4f}" for a, b in SPANS))
    print(f"\ndone in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
