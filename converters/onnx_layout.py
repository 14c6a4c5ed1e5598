"""The layout glue between a graph's model-building ops, on `Flow` and `State` values.

Exporters put Transpose, Squeeze, Unsqueeze, Reshape, Flatten, Slice, Gather and Concat between the
operators edgernn models; these only relabel the axes a `Flow` carries (see `edgernn.converters.onnx_values`):
``X0``/``X1`` the input's time and batch axes (``X0*X1`` the two merged, as Keras's Dense and TimeDistributed
do around a 2-D MatMul), ``F`` features, ``D`` the two directions of a bidirectional node before the
exporter folds them into the features, ``1`` unit axes. `LayoutReader` follows them, and refuses (naming
the node) what would take a part of the data edgernn does not compute: a slice of the features, a time
step other than the last, a merge of the features with another axis.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from .onnx_values import BIG, INPUT_AXES, Flow, NodeReader, State, components

log = logging.getLogger("edgernn.converters.onnx_import")


class LayoutReader(NodeReader):
    """Layout ops on a `Flow` or `State` ``x``; each returns the relabelled value. Uses the importer's
    ``sizes`` (input axis name -> size the graph fixes), ``time`` (the input axis that is time) and
    ``layers`` (the recurrent layers read so far)."""

    sizes: dict
    time = None
    layers: list

    def _with(self, x, axes, **changes):
        return replace(x, axes=tuple(axes), **changes)

    def _transpose(self, x, values):
        perm = self.attr("perm", list(range(len(x.axes)))[::-1])
        return self._with(x, [x.axes[p] for p in perm])

    def _squeeze(self, x, values):
        axes = self.axes_arg(values, 1, len(x.axes))
        if axes is None:
            self.fail("squeezes without axes (which depends on the run-time batch size)")
        for a in axes:
            if x.axes[a][1] != 1:
                self.fail(f"squeezes axis {a} ({x.axes[a][0]}), which is not of size 1")
        return self._with(x, [ax for i, ax in enumerate(x.axes) if i not in axes])

    def _unsqueeze(self, x, values):
        rank = len(x.axes) + len(self.axes_arg(values, 1, 0))
        positions = sorted(self.axes_arg(values, 1, rank))
        axes = list(x.axes)
        for a in positions:
            axes.insert(a, ("1", 1))
        return self._with(x, axes)

    def _flatten(self, x, values):
        axis = self.attr("axis", 1)
        axis = axis + len(x.axes) if axis < 0 else axis
        return self._with(x, [self._merge(x.axes[:axis], x.axes, "Flatten"),
                              self._merge(x.axes[axis:], x.axes, "Flatten")])

    def _concat(self, x, values):
        if all(isinstance(v, Flow) for v in values):
            return self._join_halves(values)
        if not all(isinstance(v, State) for v in values):
            self.unsupported("joining the data with something else")
        axis = self.attr("axis")
        axis = axis + len(x.axes) if axis < 0 else axis
        rest = [[ax for i, ax in enumerate(v.axes) if i != axis] for v in values]
        if any(r != rest[0] for r in rest) or any(v.axes[axis][0] not in ("S", "1") for v in values):
            self.unsupported("of states along an axis other than their stacking axis")
        parts = tuple(p for v in values for p in v.parts)
        axes = list(x.axes)
        axes[axis] = ("S", len(parts))
        return State(parts, tuple(axes), max(v.version for v in values))

    def _join_halves(self, values):
        """[forward half, reverse half] of one bidirectional output, on the features -> the whole output
        (the layout edgernn computes: forward's features, then reverse's)."""
        axis = self.attr("axis")
        x = values[0]
        axis = axis + len(x.axes) if axis < 0 else axis
        halves = [v.half for v in values]
        if halves != [0, 1] or not 0 <= axis < len(x.axes) or x.axes[axis][0] != "F" or \
                any(replace(v, half=None) != replace(x, half=None) for v in values):
            self.unsupported("joining computed values other than the forward and reverse halves of one "
                             "bidirectional layer's output, in that order, on the features")
        axes = list(x.axes)
        axes[axis] = ("F", 2 * x.axes[axis][1])
        return replace(x, axes=tuple(axes), half=None)

    def _gather(self, x, values):
        index = values[1]
        if not isinstance(index, np.ndarray) or index.size != 1:
            self.unsupported("with an index that is not one constant")
        axis = self.attr("axis", 0)
        axis = axis + len(x.axes) if axis < 0 else axis
        i, keep = int(index.ravel()[0]), index.ndim > 0
        return self._take(x, axis, i, i + 1 if i != -1 else BIG, keep)

    def _slice(self, x, values):
        starts, ends = self.ints(values[1], "starts"), self.ints(values[2], "ends")
        axes = self.axes_arg(values, 3, len(x.axes)) or list(range(len(starts)))
        steps = self.ints(values[4], "steps") if len(values) > 4 and values[4] is not None else [1] * len(starts)
        for axis, start, end, step in zip(axes, starts, ends, steps):
            if step != 1:
                self.fail(f"steps by {step} along axis {axis} ({x.axes[axis][0]}): only step 1 is supported")
            x = self._take(x, axis, start, end, True)
        return x

    def _take(self, x, axis, start, end, keep):
        """Elements [start, end) of ``axis``; ``keep`` False drops the axis (one element, as Gather does)."""
        label, size = x.axes[axis]
        if isinstance(end, str):
            end = BIG if end == size else None
        if not isinstance(start, int) or not isinstance(end, int):
            self.fail(f"takes a part of axis {axis} ({label}) computed at run time")
        if isinstance(x, State) and label == "S":
            s, e = slice(start, end).indices(len(x.parts))[:2]
            axes = list(x.axes)
            axes[axis] = ("S", max(0, e - s))
            return State(x.parts[s:e], tuple(axes) if keep else tuple(axes[:axis] + axes[axis + 1:]), x.version)
        known = self.sizes.get(size, size) if isinstance(size, str) else size
        if isinstance(x, Flow) and label == "D" and x.half is None:
            s, e = slice(start, end).indices(2)[:2]
            if e - s == 1:  # one direction of a bidirectional output
                axes = list(x.axes)
                axes[axis] = ("1", 1)
                return replace(x, axes=tuple(axes) if keep else tuple(axes[:axis] + axes[axis + 1:]), half=s)
        if isinstance(known, int):
            s, e = slice(start, end).indices(known)[:2]
            whole, last = e - s >= known, e - s == 1 and e == known
        else:
            whole, last = start == 0 and end >= BIG, start == -1 and end >= BIG
        if whole and (keep or known == 1):
            return self._with(x, x.axes if keep else x.axes[:axis] + x.axes[axis + 1:])
        if isinstance(x, Flow) and x.half == 1 and label == self.time and not last:
            self.fail(f"takes elements [{start}:{end}] of the reverse direction's output along time: its final "
                      f"state, as a Keras Bidirectional layer without return_sequences reads it. edgernn's "
                      f"bidirectional layers output [forward | reverse] per step, and no step holds the forward "
                      f"direction's last output beside the reverse direction's final state")
        if not (last and isinstance(x, Flow) and label == self.time):
            self.fail(f"takes elements [{start}:{end}] of axis {axis} ({label}); edgernn reads whole sequences, "
                      f"all features, or the last time step")
        axes = list(x.axes)
        axes[axis] = ("1", 1)
        return replace(x, axes=tuple(axes) if keep else tuple(axes[:axis] + axes[axis + 1:]), last=True)

    def _reshape(self, x, values):
        target = self.ints(values[1], "shape")
        allowzero = self.attr("allowzero", 0)
        axes = list(x.axes)
        entries = []
        for i, e in enumerate(target):
            if e == 0 and not allowzero:
                if i >= len(axes):
                    self.fail(f"copies axis {i} of a {len(axes)}-axis value")
                e = axes[i][1]
            elif isinstance(e, str) and e not in INPUT_AXES and not components(e):
                self.fail("reshapes to a shape computed at run time")
            entries.append(e)
        named = {e for e in entries if isinstance(e, str)}
        for i in reversed(range(len(axes))):  # split merged axes back where the target names their parts
            parts = components(axes[i][0])
            if parts and axes[i][0] not in named and any(p in named for p in parts):
                axes[i:i + 1] = [(p, p) for p in parts]
        if entries.count(-1) > 1:
            self.fail("has more than one -1 in its shape")
        k = entries.index(-1) if -1 in entries else None
        left, right = (entries, []) if k is None else (entries[:k], entries[k + 1:])
        out_left, i = self._match(axes, left)
        out_right, j = self._match(axes[i:][::-1], right[::-1], backwards=True)
        out_right = [group[::-1] for group in out_right[::-1]]
        middle = axes[i:len(axes) - j]
        if k is None and any(size != 1 for _, size in middle):
            self.fail(f"reshapes {x.axes} to {target}")
        groups = out_left + ([middle] if k is not None else []) + out_right
        return self._with(x, [self._merge(group, x.axes, target) for group in groups])

    def _match(self, axes, entries, backwards=False):
        """Input axes grouped onto ``entries`` from the front -> (groups, axes consumed). ``backwards``:
        both lists are reversed (matching from the back)."""
        groups, i = [], 0
        for e in entries:
            if e == 1:
                if i < len(axes) and axes[i][1] == 1:
                    groups.append([axes[i]])
                    i += 1
                else:
                    groups.append([])
                continue
            while i < len(axes) and axes[i][1] == 1 and axes[i][0] != e:
                i += 1
            if i >= len(axes):
                self.fail(f"reshapes to {entries}, which does not fit the value's axes")
            label, size = axes[i]
            parts = components(e)
            if parts and label != e:  # time and batch merged into one axis
                parts = parts[::-1] if backwards else parts
                if [ax[0] for ax in axes[i:i + len(parts)]] != parts:
                    self.fail(f"reshapes to {entries}, which does not fit the value's axes {axes}")
                groups.append(axes[i:i + len(parts)])
                i += len(parts)
                continue
            if isinstance(e, str) or isinstance(size, str):
                want = self.sizes.get(e, e) if isinstance(e, str) else e
                have = self.sizes.get(size, size) if isinstance(size, str) else size
                if isinstance(e, int) and isinstance(have, str):
                    self.sizes[size] = e  # the exporter baked this size in: the graph only runs with it
                    log.info("%s: node %r reshapes with input axis %s fixed at %d: the graph only runs with "
                             "that size (import_graph(...).run checks it); the edgernn model takes any",
                             self.label, self.node.name, size, e)
                elif e != size and not (isinstance(want, int) and want == have):
                    self.fail(f"reshapes axis {label} to {e}")
                groups.append([axes[i]])
                i += 1
                continue
            group, product = [], 1
            while product < e and i < len(axes) and isinstance(axes[i][1], int):
                group.append(axes[i])
                product *= axes[i][1]
                i += 1
            if product != e:
                self.fail(f"reshapes to {entries}, which splits an axis")
            groups.append(group)
        return groups, i

    def _merge(self, group, before, target):
        real = [ax for ax in group if ax[1] != 1]
        if not real:
            return ("1", 1)
        if len(real) == 1:
            return real[0]
        if [label for label, _ in real] == ["D", "F"]:
            return ("F", 2 * real[1][1])  # bidirectional: forward's features, then reverse's
        parts = [p for label, _ in real for p in (components(label) or [label])]
        if all(p in INPUT_AXES for p in parts) and len(set(parts)) == len(parts):
            return ("*".join(parts),) * 2  # time and batch as one axis, for a 2-D MatMul
        self.fail(f"reshapes {before} to {target}, merging axes {[label for label, _ in real]}")

    def _state_as_flow(self, x: State):
        """A head reading ``h_n[-1]`` of a forward top layer reads the output's last step."""
        top = len(self.layers) - 1
        if x.parts != ((top, 0, "h"),) or self.layers[top].direction != "forward" or \
                any(label == "S" for label, _ in x.axes):
            self.fail(f"computes on recurrent state {x.parts} (only a forward top layer's final h, which equals "
                      f"its last output step, can feed the head)")
        return Flow(self.source, x.axes, x.version, last=True)
