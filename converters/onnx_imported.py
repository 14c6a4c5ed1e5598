"""`ImportedGraph`: an imported graph's edgernn `Model`, and its outputs computed with it."""

from __future__ import annotations

import numpy as np

from edgernn.errors import InputError

from .onnx_values import INPUT_AXES


class ImportedGraph:
    """The edgernn `Model` of a graph, and ``run(feeds)`` computing the graph's outputs with it."""

    def __init__(self, model, label, source, time, batch, sizes, outputs, initial_rows):
        self.model, self.label, self.input_name = model, label, source
        self._time, self._batch, self._sizes = time, batch, sizes
        self._outputs = outputs
        self.initial_rows = initial_rows
        """(B, state_size) constant starting rows the graph holds, or None for the model's rest state."""

    def run(self, feeds: dict) -> list[np.ndarray]:
        """``feeds[input name]`` (time and batch axes as the graph has them) -> every graph output, in order.
        Each batch element runs through `Model.run` with its own state row."""
        if self.input_name not in feeds:
            raise InputError(f"{self.label}: feed {self.input_name!r} missing (got {', '.join(map(repr, feeds))})")
        x = np.asarray(feeds[self.input_name])
        if x.ndim != 3:
            raise InputError(f"{self.input_name}: expected 3 dimensions, got shape {x.shape}")
        for axis, label in enumerate(INPUT_AXES + ("F",)):
            want = self._sizes.get(label)
            if want is not None and x.shape[axis] != want:
                raise InputError(f"{self.input_name}: axis {axis} must be {want} in this graph, got shape {x.shape}")
        xs = np.ascontiguousarray(np.moveaxis(x, (INPUT_AXES.index(self._time), INPUT_AXES.index(self._batch)),
                                              (0, 1)), np.float32)
        T, B = xs.shape[:2]
        if self.initial_rows is not None and len(self.initial_rows) != B:
            raise InputError(f"{self.input_name}: the graph's constant initial state is for batch "
                             f"{len(self.initial_rows)}, got batch {B}")
        rows = self.model.new_state(batch=B)
        if self.initial_rows is not None:
            rows[:] = self.initial_rows
        ys = np.empty((T, B, self.model.output_size), np.float32)
        for b in range(B):
            ys[:, b] = self.model.run(xs[:, b], rows[b])
        return [self._flow_output(ys, axes, last) if kind == "flow" else self._state_output(rows, axes, parts)
                for kind, axes, last, parts in self._outputs]

    def _flow_output(self, ys, axes, last):
        names = [self._time, self._batch, "F"]
        if any(label == "D" for label, _ in axes):
            ys, names = ys.reshape(ys.shape[0], ys.shape[1], 2, -1), [self._time, self._batch, "D", "F"]
        if last:
            ys, names = ys[-1], names[1:]
        return _arrange(ys, names, axes)

    def _state_output(self, rows, axes, parts):
        offsets = _state_offsets(self.model.spec)
        pieces = [rows[:, offsets[part][0]:offsets[part][1]] for part in parts]
        return _arrange(np.stack(pieces, axis=1), [self._batch, "S", "F"], axes)


def _arrange(array, names, axes):
    """``array`` with axes ``names`` -> the layout ``axes`` asks for (units inserted, an S of 1 dropped)."""
    if "S" in names and not any(label == "S" for label, _ in axes):
        array, names = array[:, 0], [n for n in names if n != "S"]
    order = [names.index(label) for label, _ in axes if label != "1"]
    array = array.transpose(order)
    shape, it = [], iter(array.shape)
    for label, _ in axes:
        shape.append(1 if label == "1" else next(it))
    return np.ascontiguousarray(array.reshape(shape), np.float32)


def _state_offsets(spec) -> dict:
    """(layer, direction, "h"|"c") -> (start, end) in a state row (see `edgernn.spec`)."""
    offsets, at = {}, 0
    for index, layer in enumerate(spec.layers):
        for d in range(layer.directions):
            offsets[(index, d, "h")] = (at, at + layer.unit_output_size)
            at += layer.unit_output_size
            if layer.cell == "lstm":
                offsets[(index, d, "c")] = (at, at + layer.hidden_size)
                at += layer.hidden_size
    return offsets
