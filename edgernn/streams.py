"""The many-stream state table: one recurrent state per stream key, in one preallocated float32 array.

The daemon keeps a state per sensor stream and advances a micro-batch of them per kernel call
(`Model.step_batch` on rows of ``states``). Keys map to rows ("slots"); the array grows by doubling up
to ``max_streams`` rows and never beyond: past that the least-recently-used stream is evicted and its
row reused, so memory stays bounded however many distinct keys arrive. A stream that is new, reset, or
returns after eviction starts from exactly ``model.new_state()``.

Beside the states, a table may declare *columns*: small per-stream values (the daemon's last ``seq``,
the time a stream was last seen) held in one 1-D array per column, indexed by slot like ``states``.
They live and die with the slot: a new, reset, dropped or evicted stream's columns are back at their
defaults, and they travel in snapshots.

Snapshots (`StreamTable.snapshot` / `restore`) are safetensors files. Version 3 (written now):
tensors ``states`` (n, state_size) and ``column.<name>`` (n,) for each declared column, rows in
least- to most-recently-used order; metadata ``format`` = ``"edgernn-snapshot"``, ``format_version``,
``keys`` (JSON list), ``model`` (`format.model_fingerprint`, so a snapshot is refused for a different
model), ``state_shapes`` (JSON, `ModelSpec.state_shapes`: a retrained model of the same shapes may take
the states over, when the caller accepts it), ``extra`` (JSON object of the caller's strings, e.g. the
journal generation that follows the snapshot) and ``checksum`` (over the keys, ``extra``, the shapes, the
model fingerprint and every tensor). Version 2 (still read) is the same with a checksum that left out the
fingerprint, so a damaged fingerprint read as "another model". Version 1 (still read) had
``states`` only and no ``extra``: its streams restore with default columns.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np
import safetensors.numpy

from ._files import atomic_write_bytes
from .errors import FormatError
from .format import check_kind, model_fingerprint, read_tensor_file, select_reader, tensor_checksum, verify_checksum
from .plan import aligned_zeros

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "edgernn-snapshot"
SNAPSHOT_VERSION = "3"
COLUMN_PREFIX = "column."
"""Snapshot tensor name of column ``c``: ``column.c``."""

_COLUMN_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_COLUMN_KINDS = "biuf"  # bool, signed, unsigned, float: what safetensors stores
_FREE = object()  # marks a slot no stream holds in ``_key_at``


class StreamTable:
    """Stream key -> row of ``states`` (and of each column), with LRU eviction beyond ``max_streams``.

    ``columns`` declares per-stream values: name -> (dtype, default), e.g.
    ``{"seq": ("int64", -1), "last_seen": ("float64", 0.0)}``; ``table.columns[name]`` is a 1-D array of
    length ``capacity`` indexed by slot (use the slots `slots_for` / `peek_slots` return).
    ``on_evict(key)`` is called for each stream evicted to make room (not for `drop`, `clear` or `restore`).

    ``states`` and the column arrays are replaced (not resized in place) when the table grows or is
    restored: read ``table.states`` / ``table.columns[name]`` at each use, after `slots_for`, rather
    than keeping a reference (``table.columns["seq"][table.slots_for(keys)] = ...`` writes to the old
    array when that call grows the table). Not thread-safe: one scheduler thread owns a table.
    """

    def __init__(self, model, max_streams: int = 100_000, initial_capacity: int = 64,
                 columns: dict[str, tuple] | None = None,
                 on_evict: Callable[[object], None] | None = None):
        for name, value in (("max_streams", max_streams), ("initial_capacity", initial_capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict: must be callable, got {on_evict!r}")
        self.model = model
        self.max_streams = max_streams
        self.evictions = 0
        self.on_evict = on_evict
        self._rest = np.array(model.new_state(), dtype=np.float32)
        self._defaults = _column_defaults(columns or {})
        capacity = min(initial_capacity, max_streams)
        self.states = aligned_zeros((capacity, self._rest.size))
        self.states[:] = self._rest
        self.columns = {name: np.full(capacity, default) for name, default in self._defaults.items()}
        self._slots: OrderedDict = OrderedDict()  # key -> slot, least recently used first
        self._key_at: list = [_FREE] * capacity  # slot -> key
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out the lowest slot first
        self._fingerprint = None

    # ---- mapping keys to slots --------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.states.shape[0]

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key) -> bool:
        return key in self._slots

    def keys(self) -> list:
        """Live stream keys, least recently used first."""
        return list(self._slots)

    def slots_for(self, keys) -> np.ndarray:
        """The slot of each key (int64), creating missing streams at ``new_state()``; marks them used."""
        keys = list(keys)
        distinct = len(set(keys))
        if distinct > self.max_streams:
            raise ValueError(f"{distinct} distinct keys in one call, more than max_streams ({self.max_streams})")
        slots = np.empty(len(keys), dtype=np.int64)
        for index, key in enumerate(keys):
            slot = self._slots.get(key)
            if slot is None:
                slot, evicted = self._allocate()
                self._slots[key] = slot
                self._key_at[slot] = key
                if evicted is not _FREE and self.on_evict is not None:
                    self.on_evict(evicted)  # the table is consistent here, should the callback raise
            else:
                self._slots.move_to_end(key)
            slots[index] = slot
        return slots

    def peek_slots(self, keys) -> np.ndarray:
        """The slot of each key (int64), -1 for a key with no stream; creates nothing, marks nothing used."""
        get = self._slots.get
        return np.fromiter((get(key, -1) for key in keys), dtype=np.int64)

    def step(self, keys, X) -> np.ndarray:
        """Advance each key's stream by its row of ``X`` (n, input_size); returns Y (n, output_size)."""
        keys = list(keys)
        if len(set(keys)) != len(keys):
            repeated = [key for key, count in Counter(keys).items() if count > 1]
            raise ValueError(f"keys in one step must be distinct; repeated: {repeated[:5]!r}")
        if len(keys) != len(X):
            raise ValueError(f"{len(keys)} keys but {len(X)} samples")
        slots = self.slots_for(keys)
        return self.model.step_batch(self.states, slots, X)

    def state_of(self, key) -> np.ndarray:
        """A copy of the stream's state (does not count as a use)."""
        return self.states[self._slot(key)].copy()

    def reset(self, key) -> None:
        """Put the stream back to ``new_state()`` and its columns to their defaults."""
        self._clear_slot(self._slot(key))

    def drop(self, key) -> None:
        """Forget the stream and free its slot."""
        slot = self._slot(key)
        del self._slots[key]
        self._key_at[slot] = _FREE
        self._clear_slot(slot)
        self._free.append(slot)

    def clear(self) -> None:
        """Forget every stream (capacity is kept)."""
        self.states[:] = self._rest
        for name, default in self._defaults.items():
            self.columns[name][:] = default
        self._slots = OrderedDict()
        self._key_at = [_FREE] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))

    def replace_model(self, model, keep_states: bool) -> None:
        """Serve ``model`` from now on (a reload). Keys, LRU order and columns are kept.

        ``keep_states``: every stream continues from its state (the models' state layouts must match);
        otherwise every stream restarts from the new model's ``new_state()``.
        """
        rest = np.array(model.new_state(), dtype=np.float32)
        if keep_states and rest.size != self._rest.size:
            raise ValueError(f"cannot keep states of size {self._rest.size} for a model whose state size is {rest.size}")
        if rest.size != self._rest.size:
            self.states = aligned_zeros((self.capacity, rest.size))
        self.model, self._rest, self._fingerprint = model, rest, None
        if keep_states:
            self.states[self._free] = rest  # free rows wait at the rest state
        else:
            self.states[:] = rest

    def stale(self, column: str, older_than) -> list:
        """Keys of the live streams whose ``column`` value is < ``older_than``, in slot order.

        Compares the whole column at once: e.g. ``stale("last_seen", now - idle_seconds)`` for idle reset.
        """
        if column not in self.columns:
            raise KeyError(f"no column {column!r} (declared: {sorted(self.columns)})")
        candidates = np.flatnonzero(self.columns[column] < older_than)
        key_at = self._key_at
        return [key_at[slot] for slot in candidates.tolist() if key_at[slot] is not _FREE]

    def _slot(self, key) -> int:
        try:
            return self._slots[key]
        except KeyError:
            raise KeyError(f"no stream {key!r}") from None

    def _clear_slot(self, slot: int) -> None:
        self.states[slot] = self._rest
        for name, default in self._defaults.items():
            self.columns[name][slot] = default

    def _allocate(self) -> tuple[int, object]:
        """A free slot at ``new_state()`` and default columns: a free row, else grow, else evict the
        least recently used. Returns (slot, evicted key or ``_FREE``)."""
        if not self._free and self.capacity < self.max_streams:
            self._grow()
        evicted = _FREE
        if self._free:
            slot = self._free.pop()
        else:
            evicted, slot = self._slots.popitem(last=False)
            self.evictions += 1
            log.debug("evicted stream %r (table full at %d streams)", evicted, self.max_streams)
        self._clear_slot(slot)
        return slot, evicted

    def _grow(self) -> None:
        old = self.capacity
        new = min(2 * old, self.max_streams)
        states = aligned_zeros((new, self._rest.size))
        states[:old] = self.states
        states[old:] = self._rest
        self.states = states
        for name, default in self._defaults.items():
            column = np.full(new, default)
            column[:old] = self.columns[name]
            self.columns[name] = column
        self._key_at.extend([_FREE] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))

    # ---- snapshots --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def snapshot(self, path, metadata: dict[str, str] | None = None) -> None:
        """Write every live stream and its columns to ``path`` atomically (layout: module docstring).

        ``metadata`` (strings) is stored with the snapshot, covered by its checksum, and returned by
        `restore`.
        """
        keys = list(self._slots)
        bad = [key for key in keys if not isinstance(key, str)]
        if bad:
            raise TypeError(f"snapshots need string stream keys, got {bad[0]!r}")
        extra = dict(metadata or {})
        bad = [item for item in extra.items() if not all(isinstance(part, str) for part in item)]
        if bad:
            raise TypeError(f"snapshot metadata must map strings to strings, got {bad[0]!r}")
        keys_json = json.dumps(keys, ensure_ascii=False)
        extra_json = json.dumps(extra, ensure_ascii=False, sort_keys=True)
        slots = np.fromiter(self._slots.values(), dtype=np.int64, count=len(keys))
        tensors = {"states": np.ascontiguousarray(self.states[slots])}
        for name, column in self.columns.items():
            tensors[COLUMN_PREFIX + name] = np.ascontiguousarray(column[slots])
        metadata = {
            "format": SNAPSHOT_FORMAT,
            "format_version": SNAPSHOT_VERSION,
            "keys": keys_json,
            "model": self.fingerprint(),
            "state_shapes": _shapes_json(self.model),
            "extra": extra_json,
            "checksum": tensor_checksum(tensors, _checksum_prefix_v3(keys_json, extra_json, _shapes_json(self.model),
                                                                     self.fingerprint())),
        }
        atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))

    def restore(self, path, accept_model_change: bool = False) -> dict[str, str]:
        """Replace every stream in the table with those of a snapshot of the same model.

        With ``accept_model_change``, a snapshot of another model whose state shapes equal this model's
        (a retrained model of the same architecture) is restored too, with a warning, as a reload keeps
        states; a version 1 snapshot (no shapes recorded) is still refused.

        Returns the ``metadata`` the snapshot was written with (``{}`` for version 1). The file is checked
        completely before the table is touched: on `FormatError` it is unchanged. A snapshot with more
        streams than ``max_streams`` keeps the most recently used ones. A column the file holds but this
        table does not declare is ignored; a declared column the file lacks starts at its default.
        """
        metadata, tensors = read_tensor_file(path)
        check_kind(path, metadata, SNAPSHOT_FORMAT)
        reader = select_reader(path, metadata, _SNAPSHOT_READERS)
        keys, states, columns, extra = reader(self, path, metadata, tensors, accept_model_change)
        if len(keys) > self.max_streams:
            dropped = len(keys) - self.max_streams
            log.warning("%s: %d streams, max_streams is %d: dropping the %d least recently used",
                        path, len(keys), self.max_streams, dropped)
            self.evictions += dropped
            keys, states = keys[dropped:], states[dropped:]
            columns = {name: values[dropped:] for name, values in columns.items()}
        n = len(keys)
        capacity = min(self.max_streams, max(self.capacity, n))
        table = aligned_zeros((capacity, self._rest.size))
        table[:n] = states
        table[n:] = self._rest
        new_columns = {}
        for name, default in self._defaults.items():
            new_columns[name] = np.full(capacity, default)
            if name in columns:
                new_columns[name][:n] = columns[name]
        self.states = table
        self.columns = new_columns
        self._slots = OrderedDict(zip(keys, range(n)))
        self._key_at = list(keys) + [_FREE] * (capacity - n)
        self._free = list(range(capacity - 1, n - 1, -1))
        return extra

    @classmethod
    def from_snapshot(cls, model, path, **kwargs) -> "StreamTable":
        """A new table for ``model`` holding the streams of a snapshot."""
        table = cls(model, **kwargs)
        table.restore(path)
        return table


def _column_defaults(columns: dict) -> dict[str, np.generic]:
    """Check column declarations; name -> default as a NumPy scalar of the column's dtype."""
    defaults = {}
    for name, declaration in columns.items():
        if not isinstance(name, str) or not _COLUMN_NAME.fullmatch(name):
            raise ValueError(f"column name {name!r}: must match [a-z_][a-z0-9_]*")
        try:
            dtype, default = declaration
            dtype = np.dtype(dtype)
        except (TypeError, ValueError):
            raise ValueError(f"column {name!r}: expected (dtype, default), got {declaration!r}") from None
        if dtype.kind not in _COLUMN_KINDS:
            raise ValueError(f"column {name!r}: dtype must be bool, integer or float, got {dtype.name}")
        value = np.asarray(default)
        if value.ndim != 0 or value.dtype.kind not in _COLUMN_KINDS:
            raise ValueError(f"column {name!r}: default must be a number, got {default!r}")
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                cast = dtype.type(value.item())
        except (OverflowError, ValueError):
            cast = None
        same = cast is not None and (cast.item() == value.item() or
                                     (dtype.kind == "f" and math.isnan(cast) and math.isnan(value.item())))
        if not same:
            raise ValueError(f"column {name!r}: default {default!r} does not fit in {dtype.name}")
        defaults[name] = cast
    return defaults


def _checksum_prefix_v2(keys_json: str, extra_json: str, shapes_json: str) -> bytes:
    return b"\0".join((keys_json.encode(), extra_json.encode(), shapes_json.encode()))


def _checksum_prefix_v3(keys_json: str, extra_json: str, shapes_json: str, model_fingerprint: str) -> bytes:
    return _checksum_prefix_v2(keys_json, extra_json, shapes_json) + b"\0" + model_fingerprint.encode()


def _shapes_json(model) -> str:
    return json.dumps([list(shape) for shape in model.spec.state_shapes])


def _check_keys(path, metadata: dict, table: StreamTable, accept_model_change: bool = False) -> list[str]:
    """The checks versions 1 and 2 share, once the checksum holds: model and keys."""
    if metadata["model"] != table.fingerprint():
        same_shapes = metadata.get("state_shapes") == _shapes_json(table.model)
        if not (accept_model_change and same_shapes):
            raise FormatError(path, "snapshot of a different model (its fingerprint "
                                    f"{metadata['model']} is not this model's {table.fingerprint()}"
                                    f"{', and its state shapes differ' if not same_shapes else ''})")
        log.warning("%s: snapshot of another model with the same state shapes: its states are kept", path)
    try:
        keys = json.loads(metadata["keys"])
    except ValueError:
        raise FormatError(path, "'keys' metadata is not JSON") from None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise FormatError(path, "'keys' metadata is not a list of strings")
    if len(set(keys)) != len(keys):
        raise FormatError(path, "'keys' metadata repeats a key")
    return keys


def _check_states(path, tensors: dict, table: StreamTable, n: int) -> np.ndarray:
    states = tensors["states"]
    expected = (n, table._rest.size)
    if states.dtype != np.float32 or states.shape != expected:
        raise FormatError(path, f"'states' is {states.dtype.name}{list(states.shape)}, "
                                f"expected float32{list(expected)}")
    return states


def _require(path, metadata: dict, names) -> None:
    for key in names:
        if key not in metadata:
            raise FormatError(path, f"no {key!r} in the metadata")


def _read_snapshot_v1(table: StreamTable, path, metadata: dict, tensors: dict, accept_model_change: bool = False):
    _require(path, metadata, ("keys", "model"))
    verify_checksum(path, metadata, tensors, metadata["keys"].encode())
    keys = _check_keys(path, metadata, table)
    if set(tensors) != {"states"}:
        raise FormatError(path, f"expected one tensor 'states', found {sorted(tensors)}")
    return keys, _check_states(path, tensors, table, len(keys)), {}, {}


def _read_snapshot_v3(table: StreamTable, path, metadata: dict, tensors: dict, accept_model_change: bool = False):
    return _read_snapshot_v2(table, path, metadata, tensors, accept_model_change, _checksum_prefix_v3)


def _read_snapshot_v2(table: StreamTable, path, metadata: dict, tensors: dict, accept_model_change: bool = False,
                      checksum_prefix=None):
    _require(path, metadata, ("keys", "model", "extra", "state_shapes"))
    if checksum_prefix is None:
        prefix = _checksum_prefix_v2(metadata["keys"], metadata["extra"], metadata["state_shapes"])
    else:
        prefix = checksum_prefix(metadata["keys"], metadata["extra"], metadata["state_shapes"], metadata["model"])
    verify_checksum(path, metadata, tensors, prefix)
    keys = _check_keys(path, metadata, table, accept_model_change)
    try:
        extra = json.loads(metadata["extra"])
    except ValueError:
        raise FormatError(path, "'extra' metadata is not JSON") from None
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise FormatError(path, "'extra' metadata is not an object of strings")
    unexpected = sorted(name for name in tensors if name != "states" and not name.startswith(COLUMN_PREFIX))
    if "states" not in tensors or unexpected:
        raise FormatError(path, f"expected 'states' and 'column.*' tensors, found {sorted(tensors)}")
    states = _check_states(path, tensors, table, len(keys))
    columns = {}
    for tensor_name, values in tensors.items():
        if tensor_name == "states":
            continue
        name = tensor_name[len(COLUMN_PREFIX):]
        if name not in table._defaults:
            log.debug("%s: ignoring column %r, which this table does not declare", path, name)
            continue
        dtype = table._defaults[name].dtype
        if values.dtype != dtype or values.shape != (len(keys),):
            raise FormatError(path, f"column {name!r} is {values.dtype.name}{list(values.shape)}, "
                                    f"expected {dtype.name}{[len(keys)]}")
        columns[name] = values
    return keys, states, columns, extra


_SNAPSHOT_READERS = {"1": _read_snapshot_v1, "2": _read_snapshot_v2, "3": _read_snapshot_v3}
