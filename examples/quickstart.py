"""Quick start: train a small PyTorch GRU, convert it, and stream it one sample at a time.

This is what `make demo` runs until the full MQTT demo exists. It shows the whole core path:
  1. train an nn.GRU + nn.Linear next-sample forecaster on a noisy two-tone signal (a few seconds),
  2. `from_torch` converts it (and checks that it computes what PyTorch computes),
  3. `edgernn.save` writes the compact file (float32 and int8), `edgernn.load` reads it back,
  4. `model.step` advances the stream one sample at a time, as the daemon will per MQTT message.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgernn
from edgernn.converters import from_torch


class Forecaster(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out)


def signal(steps, seed=0):
    t = np.arange(steps, dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (np.sin(0.07 * t) + 0.5 * np.sin(0.23 * t) + 0.05 * rng.standard_normal(steps)).astype(np.float32)


def train(seconds: float) -> Forecaster:
    torch.manual_seed(0)
    net = Forecaster()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    series = torch.from_numpy(signal(4000))
    windows = torch.stack([series[i:i + 101] for i in range(0, 3800, 25)]).unsqueeze(-1)
    deadline, epoch = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        loss = nn.functional.mse_loss(net(windows[:, :-1]), windows[:, 1:])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        epoch += 1
    print(f"trained {epoch} epochs in {seconds:.0f} s, training MSE {loss.item():.4f}")
    return net.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    net = train(args.train_seconds)
    model = from_torch(net)  # refuses if the converted model does not match PyTorch
    print(f"converted: {model}")

    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("float32", "int8"):
            path = Path(folder) / f"forecaster-{dtype}.ern"
            edgernn.save(model, path, dtype=dtype)
            print(f"saved {path.name}: {path.stat().st_size:,} bytes")
        model = edgernn.load(Path(folder) / "forecaster-float32.ern")

    xs = signal(args.steps + 1, seed=1)
    state = model.new_state()
    predictions = np.empty(args.steps, np.float32)
    start = time.perf_counter()
    for t in range(args.steps):  # one sample per call, as the daemon does per message
        predictions[t] = model.step(xs[t:t + 1], state)[0]
    per_step_us = (time.perf_counter() - start) / args.steps * 1e6

    with torch.no_grad():
        reference = net(torch.from_numpy(xs[:-1]).view(1, -1, 1)).numpy().ravel()
    print(f"streamed {args.steps} samples: {per_step_us:.1f} µs per step (Python loop included)")
    print(f"max |edgernn - PyTorch| = {np.abs(predictions - reference).max():.2e}")
    print(f"forecast RMSE {np.sqrt(np.mean((predictions - xs[1:]) ** 2)):.4f} "
          f"(persistence baseline {np.sqrt(np.mean((xs[:-1] - xs[1:]) ** 2)):.4f})")
    for t in range(args.steps - 5, args.steps):
        print(f"  t={t}: x={xs[t]: .3f}  predicted next={predictions[t]: .3f}  actual next={xs[t + 1]: .3f}")


if __name__ == "__main__":
    main()
