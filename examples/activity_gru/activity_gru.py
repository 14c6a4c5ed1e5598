"""Activity recognition with a GRU: train on simulated IMU data, export to ONNX, convert, verify, serve, score.

The whole path a user takes, end to end:
  1. generate labelled IMU data with the simulator's `imu` profile (still, walk, run, fall at 50 Hz),
  2. train an nn.GRU + nn.Linear + Softmax classifier in PyTorch (with a progress bar),
  3. export it to ONNX, as a training workstation would hand it over,
  4. convert the ONNX file with edgernn (`from_onnx`) and save the compact .ern file,
  5. verify: edgernn against onnxruntime on the same sequence, whole and one sample at a time,
  6. serve: a broker, the `edgernn serve` daemon and a fleet of simulated devices publishing over MQTT, and
     score the streamed predictions against the simulator's ground truth.

Run it:  python examples/activity_gru/activity_gru.py            (about 2 minutes)
         python examples/activity_gru/activity_gru.py --quick    (the test suite's version)
`--save-bundled` also writes the trained model to edgernn/data/imu_activity.ern, the model `edgernn demo`
ships with.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

import edgernn
from edgernn.converters import from_onnx
from edgernn.firmware_sim.signals import ImuSignal, generate

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent.parent / "edgernn" / "data" / "imu_activity.ern"
CLASSES = ImuSignal.labels
WARMUP = 25  # the first half second of a sequence: the GRU has not seen enough to tell yet


class ActivityGRU(nn.Module):
    """Per-step class probabilities; training uses the logits (everything before the Softmax)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.gru = nn.GRU(len(ImuSignal.channels), hidden, batch_first=True)
        self.classify = nn.Linear(hidden, len(CLASSES))
        self.softmax = nn.Softmax(dim=-1)

    def logits(self, x):
        return self.classify(self.gru(x)[0])

    def forward(self, x):
        return self.softmax(self.logits(x))


def dataset(sequences: int, steps: int, first_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` devices of ``steps`` samples each: X (N, T, 6), y (N, T) class indices."""
    pairs = [generate("imu", steps, seed=first_seed + n) for n in range(sequences)]
    return torch.from_numpy(np.stack([x for x, _ in pairs])), torch.from_numpy(np.stack([y for _, y in pairs]))


def train(net: ActivityGRU, X: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    loss_fn = nn.CrossEntropyLoss()
    with Progress() as progress:
        task = progress.add_task("training", total=epochs)
        for _ in range(epochs):
            for batch in torch.randperm(len(X)).split(64):
                logits = net.logits(X[batch])[:, WARMUP:]
                loss = loss_fn(logits.reshape(-1, len(CLASSES)), y[batch][:, WARMUP:].reshape(-1))
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimiser.step()
            schedule.step()
            progress.update(task, advance=1, description=f"training (loss {loss.item():.3f})")
    return loss.item()


def export_onnx(net: ActivityGRU, path: Path) -> None:
    example = torch.zeros(1, 50, len(ImuSignal.channels))
    warnings.filterwarnings("ignore", module="torch.onnx")  # the legacy exporter's notices, not ours to act on
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(net.eval(), (example,), path, input_names=["imu"], output_names=["probabilities"],
                      dynamic_axes={"imu": {0: "batch", 1: "time"}}, dynamo=False)


def verify(model: edgernn.Model, onnx_path: Path, xs: np.ndarray) -> float:
    """Max |edgernn - onnxruntime| over one sequence, run whole and stepped one sample at a time."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"imu": xs[None]})[0][0]
    whole = model.run(xs, model.new_state())
    state = model.new_state()
    stepped = np.stack([model.step(x, state).copy() for x in xs])
    return float(max(np.abs(whole - reference).max(), np.abs(stepped - reference).max()))


def streaming_accuracy(model: edgernn.Model, seconds: float, devices: int, first_seed: int) -> float:
    """Accuracy of one prediction per sample over long unbroken streams, as the daemon runs them."""
    steps = int(seconds * ImuSignal.DEFAULT_RATE_HZ)
    correct = 0
    for n in range(devices):
        xs, labels = generate("imu", steps, seed=first_seed + n)
        predicted = model.run(xs, model.new_state()).argmax(axis=1)
        correct += int((predicted == labels).sum())
    return correct / (steps * devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run (what the tests use)")
    parser.add_argument("--save-bundled", action="store_true", help=f"also write {BUNDLED.relative_to(HERE.parent.parent)}")
    parser.add_argument("--out", type=Path, help="keep the .onnx and .ern files in this folder")
    args = parser.parse_args()
    sequences, steps, epochs = (32, 300, 3) if args.quick else (384, 500, 30)

    torch.manual_seed(0)
    started = time.monotonic()
    X, y = dataset(sequences, steps, first_seed=0)
    print(f"1. data: {sequences} simulated devices x {steps} samples at 50 Hz, classes {', '.join(CLASSES)}")
    net = ActivityGRU()
    loss = train(net, X, y, epochs)
    print(f"2. trained {epochs} epochs in {time.monotonic() - started:.0f} s, final loss {loss:.3f}")

    scratch = tempfile.TemporaryDirectory(prefix="activity_gru-") if args.out is None else None
    folder = Path(scratch.name) if scratch else args.out
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, ern_path = folder / "activity_gru.onnx", folder / "activity_gru.ern"
    export_onnx(net, onnx_path)
    print(f"3. exported {onnx_path.name} ({onnx_path.stat().st_size:,} bytes)")

    model = from_onnx(onnx_path)
    edgernn.save(model, ern_path)
    model = edgernn.load(ern_path)
    print(f"4. converted to {ern_path.name} ({ern_path.stat().st_size:,} bytes): {model}")

    xs, _ = generate("imu", 500, seed=10_000)
    print(f"5. verify: max |edgernn - onnxruntime| = {verify(model, onnx_path, xs):.2e} over 500 steps")

    accuracy = streaming_accuracy(model, 60 if args.quick else 300, 4 if args.quick else 20, first_seed=20_000)
    print(f"   offline streaming accuracy (held-out devices, one prediction per sample): {accuracy:.1%}")
    if args.save_bundled:
        BUNDLED.parent.mkdir(exist_ok=True)
        shutil.copyfile(ern_path, BUNDLED)
        print(f"   saved the demo's model: {BUNDLED}")

    from serve_and_score import serve_and_score
    serve_and_score(ern_path, devices=4 if args.quick else 20, seconds=5 if args.quick else 30)


if __name__ == "__main__":
    main()
