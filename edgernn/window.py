"""Sliding windows: how a model with reverse or bidirectional layers serves a stream one sample at a time.

Such a model cannot advance a state by one sample (its reverse pass reads the future first), so each new
sample re-runs the model over the last ``size`` samples from the rest state and reports the output at the
window's newest position. Cost per sample: ``size`` steps; latency: none beyond the window itself.

    window = SlidingWindow(model, size=50)
    y = window.push(x)      # None until ``min_fill`` samples have arrived
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


class SlidingWindow:
    """The last ``size`` samples of one stream, and the model's output at the newest of them."""

    def __init__(self, model, size: int, min_fill: int | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InputError(f"size: must be a positive integer, got {size!r}")
        self.model, self.size = model, size
        self.min_fill = size if min_fill is None else min_fill
        if not 1 <= self.min_fill <= size:
            raise InputError(f"min_fill: must lie in [1, {size}], got {min_fill!r}")
        self._samples = np.zeros((2 * size, model.input_size), np.float32)  # doubled: every window is a slice
        self._count = 0

    @property
    def filled(self) -> int:
        return min(self._count, self.size)

    def push(self, x) -> np.ndarray | None:
        """Add one sample; the output for it, or None while fewer than ``min_fill`` samples have arrived."""
        x = np.asarray(x, np.float32)
        if x.shape != (self.model.input_size,) or not np.isfinite(x).all():
            raise InputError(f"x: expected {self.model.input_size} finite floats, got {x!r}")
        at = self._count % self.size
        self._samples[at] = self._samples[at + self.size] = x
        self._count += 1
        if self._count < self.min_fill:
            return None
        end = at + self.size + 1 if self._count >= self.size else self._count
        window = self._samples[end - self.filled:end]
        return self.model.run(window, self.model.new_state())[-1]

    def clear(self) -> None:
        self._count = 0
