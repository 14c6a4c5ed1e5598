"""The many-stream state table: one recurrent state per stream key, in one preallocated float32 array.

The daemon keeps a state per sensor stream and advances a micro-batch of them per kernel call
(`Model.step_batch` on rows of ``states``). Keys map to rows ("slots"); the array grows by doubling up
to ``max_streams`` rows and never beyond: past that the least-recently-used stream is evicted and its
row reused, so memory stays bounded however many distinct keys arrive. A stream that is new, reset, or
returns after eviction starts from exactly ``model.new_state()``.

Snapshots (`StreamTable.snapshot` / `restore`) are safetensors files: tensor ``states`` (n, state_size)
in least- to most-recently-used order, and metadata ``format`` = ``"edgernn-snapshot"``,
``format_version``, ``keys`` (JSON list), ``model`` (`format.model_fingerprint`, so a snapshot is refused
for a different model) and ``checksum`` (over the keys and the states).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, OrderedDict

import numpy as np
import safetensors.numpy

from ._files import atomic_write_bytes
from .errors import FormatError
from .format import check_kind, model_fingerprint, read_tensor_file, select_reader, tensor_checksum, verify_checksum
from .plan import aligned_zeros

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "edgernn-snapshot"
SNAPSHOT_VERSION = "1"


class StreamTable:
    """Stream key -> row of ``states``, with LRU eviction beyond ``max_streams``.

    ``states`` is replaced (not resized in place) when the table grows: read ``table.states`` at each
    use rather than keeping a reference. Not thread-safe: one scheduler thread owns a table.
    """

    def __init__(self, model, max_streams: int = 100_000, initial_capacity: int = 64):
        for name, value in (("max_streams", max_streams), ("initial_capacity", initial_capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        self.model = model
        self.max_streams = max_streams
        self.evictions = 0
        self._rest = np.array(model.new_state(), dtype=np.float32)
        capacity = min(initial_capacity, max_streams)
        self.states = aligned_zeros((capacity, self._rest.size))
        self.states[:] = self._rest
        self._slots: OrderedDict = OrderedDict()  # key -> slot, least recently used first
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
                slot = self._allocate()
                self._slots[key] = slot
            else:
                self._slots.move_to_end(key)
            slots[index] = slot
        return slots

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
        """Put the stream back to ``new_state()``."""
        self.states[self._slot(key)] = self._rest

    def drop(self, key) -> None:
        """Forget the stream and free its slot."""
        slot = self._slot(key)
        del self._slots[key]
        self.states[slot] = self._rest
        self._free.append(slot)

    def _slot(self, key) -> int:
        try:
            return self._slots[key]
        except KeyError:
            raise KeyError(f"no stream {key!r}") from None

    def _allocate(self) -> int:
        """A free slot at ``new_state()``: a free row, else grow, else evict the least recently used."""
        if not self._free and self.capacity < self.max_streams:
            self._grow()
        if self._free:
            slot = self._free.pop()
        else:
            evicted, slot = self._slots.popitem(last=False)
            self.evictions += 1
            log.debug("evicted stream %r (table full at %d streams)", evicted, self.max_streams)
        self.states[slot] = self._rest
        return slot

    def _grow(self) -> None:
        old = self.capacity
        new = min(2 * old, self.max_streams)
        states = aligned_zeros((new, self._rest.size))
        states[:old] = self.states
        states[old:] = self._rest
        self.states = states
        self._free.extend(range(new - 1, old - 1, -1))

    # ---- snapshots --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def snapshot(self, path) -> None:
        """Write every live stream to ``path`` atomically (see the module docstring for the layout)."""
        keys = list(self._slots)
        bad = [key for key in keys if not isinstance(key, str)]
        if bad:
            raise TypeError(f"snapshots need string stream keys, got {bad[0]!r}")
        keys_json = json.dumps(keys, ensure_ascii=False)
        slots = np.fromiter(self._slots.values(), dtype=np.int64, count=len(keys))
        tensors = {"states": np.ascontiguousarray(self.states[slots])}
        metadata = {
            "format": SNAPSHOT_FORMAT,
            "format_version": SNAPSHOT_VERSION,
            "keys": keys_json,
            "model": self.fingerprint(),
            "checksum": tensor_checksum(tensors, keys_json.encode()),
        }
        atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))

    def restore(self, path) -> None:
        """Replace every stream in the table with those of a snapshot of the same model.

        The file is checked completely before the table is touched: on `FormatError` it is unchanged.
        A snapshot with more streams than ``max_streams`` keeps the most recently used ones.
        """
        metadata, tensors = read_tensor_file(path)
        check_kind(path, metadata, SNAPSHOT_FORMAT)
        reader = select_reader(path, metadata, _SNAPSHOT_READERS)
        keys, states = reader(self, path, metadata, tensors)
        if len(keys) > self.max_streams:
            dropped = len(keys) - self.max_streams
            log.warning("%s: %d streams, max_streams is %d: dropping the %d least recently used",
                        path, len(keys), self.max_streams, dropped)
            self.evictions += dropped
            keys, states = keys[dropped:], states[dropped:]
        capacity = min(self.max_streams, max(self.capacity, len(keys)))
        table = aligned_zeros((capacity, self._rest.size))
        table[:len(keys)] = states
        table[len(keys):] = self._rest
        self.states = table
        self._slots = OrderedDict(zip(keys, range(len(keys))))
        self._free = list(range(capacity - 1, len(keys) - 1, -1))

    @classmethod
    def from_snapshot(cls, model, path, **kwargs) -> "StreamTable":
        """A new table for ``model`` holding the streams of a snapshot."""
        table = cls(model, **kwargs)
        table.restore(path)
        return table


def _read_snapshot_v1(table: StreamTable, path, metadata: dict, tensors: dict):
    for key in ("keys", "model"):
        if key not in metadata:
            raise FormatError(path, f"no {key!r} in the metadata")
    verify_checksum(path, metadata, tensors, metadata["keys"].encode())
    if metadata["model"] != table.fingerprint():
        raise FormatError(path, "snapshot of a different model (its fingerprint "
                                f"{metadata['model']} is not this model's {table.fingerprint()})")
    try:
        keys = json.loads(metadata["keys"])
    except ValueError:
        raise FormatError(path, "'keys' metadata is not JSON") from None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise FormatError(path, "'keys' metadata is not a list of strings")
    if len(set(keys)) != len(keys):
        raise FormatError(path, "'keys' metadata repeats a key")
    if set(tensors) != {"states"}:
        raise FormatError(path, f"expected one tensor 'states', found {sorted(tensors)}")
    states = tensors["states"]
    expected = (len(keys), table._rest.size)
    if states.dtype != np.float32 or states.shape != expected:
        raise FormatError(path, f"'states' is {states.dtype.name}{list(states.shape)}, "
                                f"expected float32{list(expected)}")
    return keys, states


_SNAPSHOT_READERS = {"1": _read_snapshot_v1}
