"""Durable stream state for one pipeline: a snapshot, and with ``durability = "journal"`` a journal.

A snapshot alone survives a clean stop (SIGTERM); the journal makes the state survive ``kill -9`` or
a power cut exactly: every micro-batch of inputs is appended (and fsynced) *before* its states are
stepped, and a small "done" record follows once its predictions are published and its inputs acked.
On start the daemon restores the snapshot and steps the journal's batches again, in order; batches
with no "done" record may never have reached the broker, so it publishes those once more.

Files in the state dir, for pipeline ``P``:

- ``P.snapshot``: a `StreamTable` snapshot (atomic). Its metadata ``journal_generation`` = G names the
  journal that follows it; ``next_batch_no`` carries the batch numbering on.
- ``P.journal.G``: append-only records (below): a header, then batch and done records.
- ``P.lock``: held (``flock``) while a `StateStore` is open, so two daemons never share the files.
- ``P.running``: written when a store starts serving (`StateStore.recover`), removed by a clean
  ``close()`` (after the final snapshot). Found at the next start, it means the last run ended without
  its final snapshot (``kill -9``, a power cut, a stop that timed out): with snapshots only, the states
  go back to the snapshot and the samples acked since then are missing from them. That start logs
  ``unclean_stop`` with the snapshot's age; each stream's next sample then shows the loss as a seq gap
  (``edgernn_samples_missed_total``, `runtime.pipeline`). With the journal nothing is missing.

Rotation (`StateStore.snapshot`): write the snapshot naming G+1, create journal G+1, delete journal
G. A crash anywhere in between leaves snapshot G with journal G, or snapshot G+1 with journal G+1 or
none yet; any journal the snapshot does not name is stale and deleted on start.

Records: type byte, payload length (uint32 LE), payload, CRC32 (``zlib.crc32``) of all before it.

- ``H`` header: JSON ``{"format": "edgernn-journal", "version", "pipeline", "generation",
  "input_size", "model"}`` (the model's fingerprint): a journal of another model is ignored.
- ``B`` batch: batch_no (uint64), n (uint32), n times (key: uint16 length + UTF-8, seq: int64, -1 =
  none, ts: float64, NaN = none, delivery: uint64, 0 = none), then X as n * input_size float32, all
  little-endian. One ``os.write`` per batch. ``delivery`` identifies the MQTT message a row came from
  (`runtime.mqtt.delivery_id`), so that after a crash the broker's redelivery of it is recognised as a copy.
- ``D`` done: batch_no (uint64).

Reading stops at the first truncated or corrupt record: what came before it is kept, and the
problem (file and byte offset) is reported, never raised. Everything discarded at a start -- a corrupt
snapshot moved aside, a journal's damaged tail cut off, a foreign or empty journal, a temporary file of an
interrupted write -- is logged as a warning with ``event = "state_discarded"`` and the ``file``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors

from edgernn._files import atomic_write_bytes
from edgernn.errors import FormatError
from edgernn.streams import COLUMN_PREFIX

from .config import PIPELINE_NAME

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None

log = logging.getLogger(__name__)

DURABILITIES = ("snapshot", "journal")
JOURNAL_FORMAT = "edgernn-journal"
JOURNAL_VERSION = 1
HEADER, BATCH, DONE = b"H", b"B", b"D"

_FRAME = struct.Struct("<cI")  # record type, payload length
_CRC = struct.Struct("<I")
_BATCH_HEAD = struct.Struct("<QI")  # batch_no, n
_DONE = struct.Struct("<Q")
_KEY_LENGTH = struct.Struct("<H")
_SEQ_TS = struct.Struct("<qdQ")  # seq, ts, delivery
_MIN_ROW_BYTES = _KEY_LENGTH.size + _SEQ_TS.size
_OPEN_BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_datasync = getattr(os, "fdatasync", os.fsync)


@dataclass
class JournalBatch:
    """One micro-batch as journalled: ``keys`` (n), ``seqs`` (n,) int64 (-1: none), ``X`` (n, I) float32,
    ``ts`` (n,) float64 (NaN: none; the payloads' timestamps, so re-published predictions carry them),
    ``deliveries`` (n,) uint64 (0: none; see `runtime.mqtt.delivery_id`)."""
    batch_no: int
    keys: list[str]
    seqs: np.ndarray
    X: np.ndarray
    ts: np.ndarray
    deliveries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


@dataclass
class Recovery:
    """What `StateStore.recover` found. ``replayed``: the batches to step again, in order; ``undone``: the
    batch numbers among them with no done record (publish their predictions again)."""
    restored_streams: int
    replayed: list[JournalBatch] = field(default_factory=list)
    undone: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    next_batch_no: int = 0
    unclean: bool = False  # the last run ended without a clean close (see ``P.running``)
    snapshot_age: float | None = None  # seconds since the restored snapshot was written; None: none restored


# ---- records ----------------------------------------------------------------------------------------
def encode_record(kind: bytes, payload: bytes) -> bytes:
    head = _FRAME.pack(kind, len(payload))
    return b"".join((head, payload, _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))))


def encode_batch(batch_no: int, keys: list[str], seqs: np.ndarray, X: np.ndarray, ts: np.ndarray,
                 deliveries: np.ndarray) -> bytes:
    """The framed batch record, built once so that it is written with one ``os.write``."""
    parts = [_BATCH_HEAD.pack(batch_no, len(keys))]
    for key, seq, stamp, delivery in zip(keys, seqs.tolist(), ts.tolist(), deliveries.tolist()):
        if not isinstance(key, str):
            raise TypeError(f"the journal needs string stream keys, got {key!r}")
        raw = key.encode()
        if len(raw) > 0xFFFF:
            raise ValueError(f"stream key of {len(raw)} bytes: the journal holds keys up to 65535 bytes")
        parts.append(_KEY_LENGTH.pack(len(raw)) + raw + _SEQ_TS.pack(seq, stamp, delivery))
    parts.append(np.ascontiguousarray(X, dtype="<f4").tobytes())
    return encode_record(BATCH, b"".join(parts))


def _decode_batch(payload: memoryview, input_size: int) -> JournalBatch:
    """Raises ValueError (or struct.error) on a payload that does not add up."""
    batch_no, n = _BATCH_HEAD.unpack_from(payload, 0)
    if n * _MIN_ROW_BYTES > len(payload):
        raise ValueError(f"{n} rows cannot fit in {len(payload)} bytes")
    position, keys, seqs, stamps, deliveries = _BATCH_HEAD.size, [], [], [], []
    for _ in range(n):
        (length,) = _KEY_LENGTH.unpack_from(payload, position)
        position += _KEY_LENGTH.size
        if position + length > len(payload):
            raise ValueError("a key runs past the record")
        keys.append(bytes(payload[position:position + length]).decode())
        position += length
        seq, stamp, delivery = _SEQ_TS.unpack_from(payload, position)
        position += _SEQ_TS.size
        seqs.append(seq)
        stamps.append(stamp)
        deliveries.append(delivery)
    if len(payload) - position != 4 * n * input_size:
        raise ValueError(f"{len(payload) - position} bytes of samples, expected {4 * n * input_size}")
    X = np.frombuffer(payload, "<f4", n * input_size, position).reshape(n, input_size).astype(np.float32)
    return JournalBatch(batch_no, keys, np.array(seqs, dtype=np.int64), X, np.array(stamps, dtype=np.float64),
                        np.array(deliveries, dtype=np.uint64))


def _next_record(data: bytes, offset: int):
    """(type, payload, end) of the record at ``offset``, or (None, problem)."""
    remaining = len(data) - offset
    if remaining < _FRAME.size:
        return None, f"truncated record ({remaining} bytes, shorter than a record header)"
    kind, length = _FRAME.unpack_from(data, offset)
    if kind not in (HEADER, BATCH, DONE):
        return None, f"corrupt record (unknown type {kind!r})"
    end = offset + _FRAME.size + length + _CRC.size
    if end > len(data):
        return None, f"truncated record ({remaining} of {end - offset} bytes; or its length is corrupt)"
    (stored,) = _CRC.unpack_from(data, end - _CRC.size)
    view = memoryview(data)
    if zlib.crc32(view[offset:end - _CRC.size]) != stored:
        return None, "corrupt record (CRC mismatch)"
    return (kind, view[offset + _FRAME.size:end - _CRC.size], end), None


@dataclass
class JournalContents:
    """The valid prefix of a journal file, as `read_journal` found it."""
    batches: list[JournalBatch] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    usable: bool = False  # the header is there and matches
    good_end: int = 0  # end of the last whole, valid record: appending may continue there


def read_journal(path: Path, expected: dict) -> JournalContents:
    """The valid prefix of a journal whose header must equal ``expected`` (see the module docstring)."""
    data = Path(path).read_bytes()
    journal = JournalContents()
    if not data:
        journal.problems.append(f"{path}: empty journal (no header record): ignored")
        return journal
    offset = 0
    while offset < len(data):
        record, problem = _next_record(data, offset)
        if record is not None:
            kind, payload, end = record
            problem = _read_record(journal, kind, payload, expected, path)
        if problem:
            count = len(journal.batches)
            kept = f"replaying the {count} batch{'es' if count != 1 else ''} before it" if journal.usable \
                else "nothing replayed"
            journal.problems.append(f"{path}: {problem} at byte offset {offset}: {kept}")
            break
        if not journal.usable:  # a valid record that is not a matching header
            break
        offset = journal.good_end = end
    return journal


def _read_record(journal: JournalContents, kind: bytes, payload: memoryview, expected: dict, path) -> str | None:
    """Add one CRC-checked record to ``journal``; a problem string ends the replay."""
    if not journal.usable:
        if kind != HEADER:
            return "no header record"
        mismatch = _header_mismatch(payload, expected)
        if mismatch:
            journal.problems.append(f"{path}: {mismatch}: ignored, nothing replayed")
            return None
        journal.usable = True
    elif kind == BATCH:
        try:
            batch = _decode_batch(payload, expected["input_size"])
        except (ValueError, struct.error) as exc:
            return f"malformed batch record ({exc})"
        last = journal.batches[-1].batch_no if journal.batches else -1
        if batch.batch_no <= last:
            return f"batch {batch.batch_no} after batch {last} (numbers must increase)"
        journal.batches.append(batch)
    elif kind == DONE:
        if len(payload) != _DONE.size:
            return f"malformed done record ({len(payload)} bytes)"
        journal.done.add(_DONE.unpack(payload)[0])
    else:
        return "a second header record"
    return None


def _header_mismatch(payload: memoryview, expected: dict) -> str | None:
    try:
        header = json.loads(bytes(payload))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        return "not an edgernn journal (its header says otherwise)"
    if header.get("version") != JOURNAL_VERSION:
        return f"journal version {header.get('version')!r}, this edgernn reads {JOURNAL_VERSION}"
    if header.get("model") != expected["model"] or header.get("input_size") != expected["input_size"]:
        return (f"journal of a different model (fingerprint {header.get('model')}, input_size "
                f"{header.get('input_size')}; this model is {expected['model']}, input_size {expected['input_size']})")
    for name in ("pipeline", "generation"):
        if header.get(name) != expected[name]:
            return f"journal of {name} {header.get(name)!r}, expected {expected[name]!r}"
    return None


# ---- the store --------------------------------------------------------------------------------------
class StateStore:
    """Snapshot and journal of one pipeline's `StreamTable` in ``directory``.

    Use: ``recover(table)`` once at start (then step ``replayed`` and publish ``undone``), then per
    micro-batch ``append_batch`` before stepping and ``mark_done`` after acking, and ``snapshot``
    between batches. Not thread-safe: the scheduler thread owns it.
    """

    def __init__(self, directory: Path, pipeline: str, durability: str = "snapshot", fsync: bool = True,
                 missing_columns: dict | None = None):
        """``missing_columns``: column name -> the value a restored stream gets when the snapshot predates
        that column (without it, the column's default, as for a new stream)."""
        if not isinstance(pipeline, str) or not PIPELINE_NAME.fullmatch(pipeline):
            raise ValueError(f"pipeline name {pipeline!r}: may hold only letters, digits, '_', '.' and '-' "
                             "(it names files)")
        if durability not in DURABILITIES:
            raise ValueError(f"durability: must be one of {', '.join(DURABILITIES)}, got {durability!r}")
        self.directory = Path(directory)
        self.pipeline = pipeline
        self.durability = durability
        self.fsync = fsync
        self.missing_columns = dict(missing_columns or {})
        self.snapshot_path = self.directory / f"{pipeline}.snapshot"
        self.running_path = self.directory / f"{pipeline}.running"
        name = re.escape(pipeline)  # exact patterns: "imu" never touches the files of "imu.journal"
        self._journal_name = re.compile(rf"{name}\.journal\.([0-9]+)")
        self._temp_name = re.compile(rf"\.{name}\.(snapshot|journal\.[0-9]+)\.[a-z0-9_]+\.tmp")
        self.generation = 0
        self._header: dict | None = None  # set by recover
        self._next_batch_no = 0
        self._pending: set[int] = set()  # journalled batches not yet marked done
        self._journal_fd: int | None = None
        self._journal_end = 0
        self._closed = False
        _prepare_directory(self.directory)
        self._lock_fd = _lock(self.directory / f"{pipeline}.lock", pipeline)

    @property
    def journal_path(self) -> Path:
        """The journal of the current generation."""
        return self.journal_path_of(self.generation)

    def journal_path_of(self, generation: int) -> Path:
        return self.directory / f"{self.pipeline}.journal.{generation}"

    # ---- start --------------------------------------------------------------------------------------
    def recover(self, table) -> Recovery:
        """Restore the snapshot into the empty ``table`` and read the journal that follows it.

        Steps nothing: the caller steps ``Recovery.replayed``. Every problem (a corrupt or foreign
        snapshot, moved aside; a damaged or foreign journal) is logged and listed in ``problems``. A
        ``P.running`` left by the last run is reported (``unclean_stop``), and this run writes its own.
        """
        self._check_open()
        if self._header is not None:
            raise RuntimeError("recover: already called on this StateStore")
        if len(table):
            raise ValueError("recover: the table must be empty (the snapshot and journal replace its streams)")
        problems: list[tuple[Path, str]] = []  # (file, what was wrong and what was done)
        unclean = self.running_path.exists()
        self._remove_temp_files()
        snapshot_written = self.snapshot_path.stat().st_mtime if self.snapshot_path.exists() else None
        base_known = self._restore_snapshot(table, problems)
        snapshot_age = max(0.0, time.time() - snapshot_written) if base_known and snapshot_written else None
        self._header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "pipeline": self.pipeline,
                        "generation": self.generation, "input_size": int(table.model.input_size),
                        "model": table.fingerprint()}
        journal = JournalContents()
        path = self.journal_path
        if base_known and path.exists():
            journal = read_journal(path, self._header)
            problems.extend((path, problem) for problem in journal.problems)
        for file, problem in problems:
            log.warning("%s", problem, extra={"event": "state_discarded", "pipeline": self.pipeline,
                                               "file": str(file)})
        if base_known:
            self._delete_stale_journals(self.generation, f"the snapshot names generation {self.generation}")
        else:
            self._delete_stale_journals(None, "it followed the unusable snapshot")
        if self.durability == "journal":
            self._open_journal_after(journal, path)
        batch_nos = [batch.batch_no for batch in journal.batches]
        undone = set(batch_nos) - journal.done
        self._pending = set(undone) if self.durability == "journal" else set()
        self._next_batch_no = max([self._next_batch_no] + [no + 1 for no in batch_nos])
        log.info("pipeline %s: restored %d streams (generation %d); %d journal batches to replay, %d never "
                 "marked done", self.pipeline, len(table), self.generation, len(batch_nos), len(undone))
        if unclean:
            self._report_unclean_stop(snapshot_age, len(batch_nos))
        atomic_write_bytes(self.running_path, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
        return Recovery(len(table), journal.batches, undone, [problem for _, problem in problems],
                        self._next_batch_no, unclean, snapshot_age)

    def _report_unclean_stop(self, snapshot_age: float | None, replayed: int) -> None:
        """The last run ended without its final snapshot: say what that costs (``P.running``)."""
        since = "no snapshot" if snapshot_age is None else f"the snapshot of {snapshot_age:.1f} s ago"
        if self.durability == "journal":
            consequence = f"states restored from {since} and {replayed} journalled batches replayed: nothing lost"
        elif snapshot_age is None:
            consequence = "no snapshot to restore: every stream starts from the rest state, its samples are missing"
        else:
            consequence = (f"states restored from {since}; messages acked since then are missing from them "
                           "(counted per stream at its next message, edgernn_samples_missed_total)")
        log.warning("pipeline %s: unclean stop (the last run ended without its final snapshot): %s",
                    self.pipeline, consequence,
                    extra={"event": "unclean_stop", "pipeline": self.pipeline, "durability": self.durability,
                           "snapshot_age_s": None if snapshot_age is None else round(snapshot_age, 3)})

    def _restore_snapshot(self, table, problems: list[tuple[Path, str]]) -> bool:
        """Whether the state we start from is one a journal can follow (False: a snapshot was unusable)."""
        if not self.snapshot_path.exists():
            self.generation = 0
            return True
        try:
            extra = table.restore(self.snapshot_path, accept_model_change=True)  # as SIGHUP keeps states
            self._fill_missing_columns(table)
            self.generation = _number_in(self.snapshot_path, extra, "journal_generation")
            self._next_batch_no = _number_in(self.snapshot_path, extra, "next_batch_no")
            return True
        except FormatError as exc:
            table.clear()
            aside = _move_aside(self.snapshot_path, "corrupt")
            problems.append((self.snapshot_path, f"{exc}: moved aside to {aside.name}; starting with no streams"))
            self.generation = self._next_batch_no = 0
            return False

    def _fill_missing_columns(self, table) -> None:
        """Give the restored streams the `missing_columns` values of the columns the snapshot lacks."""
        if not self.missing_columns:
            return
        with safetensors.safe_open(self.snapshot_path, framework="numpy") as snapshot:
            present = set(snapshot.keys())
        slots = table.peek_slots(table.keys())
        for name, value in self.missing_columns.items():
            if COLUMN_PREFIX + name not in present:
                table.columns[name][slots] = value

    def _open_journal_after(self, journal: JournalContents, path: Path) -> None:
        """Continue the replayed journal (cut after its last valid record), or start a fresh one."""
        if not journal.usable:
            if path.exists() and path.stat().st_size:
                aside = _move_aside(path, "ignored")
                log.warning("%s: not continued; kept as %s, a new journal starts", path, aside.name,
                            extra={"event": "state_discarded", "pipeline": self.pipeline, "file": str(path)})
            self._start_journal()
            return
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND | _OPEN_BINARY)
        self._journal_end = journal.good_end
        if journal.good_end < os.fstat(self._journal_fd).st_size:
            aside = _copy_aside(path, "corrupt")
            log.warning("%s: cutting the journal after byte %d (the whole file is kept as %s)",
                        path, journal.good_end, aside.name,
                        extra={"event": "state_discarded", "pipeline": self.pipeline, "file": str(path)})
            os.ftruncate(self._journal_fd, journal.good_end)
            if self.fsync:
                os.fsync(self._journal_fd)

    # ---- per batch ----------------------------------------------------------------------------------
    def append_batch(self, batch_no: int, keys: list[str], seqs: np.ndarray, X: np.ndarray,
                     ts: np.ndarray | None = None, deliveries: np.ndarray | None = None) -> None:
        """Journal a micro-batch before it is stepped (fsynced when ``fsync``); no-op without a journal.

        ``seqs`` (n,) int64 (-1: none), ``X`` (n, input_size), ``ts`` (n,) float64 (NaN: none; default all
        none), ``deliveries`` (n,) uint64 (`runtime.mqtt.delivery_id`; 0: none, the default).
        """
        if self.durability != "journal":
            return
        self._check_recovered()
        if batch_no < self._next_batch_no:
            raise ValueError(f"batch_no {batch_no}: batch numbers must increase (next is {self._next_batch_no})")
        keys = list(keys)
        seqs = np.asarray(seqs, dtype=np.int64)
        X = np.asarray(X, dtype=np.float32)
        ts = np.full(len(keys), np.nan) if ts is None else np.asarray(ts, dtype=np.float64)
        deliveries = (np.zeros(len(keys), np.uint64) if deliveries is None
                      else np.asarray(deliveries, dtype=np.uint64))
        shape = (len(keys), self._header["input_size"])
        if seqs.shape != shape[:1] or ts.shape != shape[:1] or deliveries.shape != shape[:1] or X.shape != shape:
            raise ValueError(f"{len(keys)} keys need seqs, ts and deliveries of shape {shape[:1]} and X of shape "
                             f"{shape}, got {seqs.shape}, {ts.shape}, {deliveries.shape} and {X.shape}")
        self._write(encode_batch(batch_no, keys, seqs, X, ts, deliveries), sync=self.fsync)
        self._next_batch_no = batch_no + 1
        self._pending.add(batch_no)

    def mark_done(self, batch_no: int) -> None:
        """Record that a batch's predictions are published and its inputs acked (not fsynced: losing it
        costs only a second publication). A write error is logged, not raised."""
        if self.durability != "journal":
            return
        self._check_recovered()
        try:
            self._write(encode_record(DONE, _DONE.pack(batch_no)), sync=False)
        except OSError as exc:
            log.warning("%s: cannot record batch %d as done: %s", self.journal_path, batch_no, exc)
            return
        self._pending.discard(batch_no)

    def _write(self, record: bytes, sync: bool) -> None:
        """Append ``record`` whole or not at all: a failed write is cut off again."""
        if self._journal_fd is None:  # a rotation failed to start the new journal: try again
            self._start_journal()
        start, view = self._journal_end, memoryview(record)
        try:
            while view:
                view = view[os.write(self._journal_fd, view):]
            if sync:
                _datasync(self._journal_fd)
        except OSError:
            try:
                os.ftruncate(self._journal_fd, start)
            except OSError:
                pass
            raise
        self._journal_end = start + len(record)

    # ---- snapshots ----------------------------------------------------------------------------------
    def snapshot(self, table) -> None:
        """Write the table atomically, then start the next journal generation; call between batches."""
        self._check_recovered()
        if self._pending:
            log.warning("pipeline %s: snapshot with %d journalled batches not marked done: after a crash "
                        "they are not published again", self.pipeline, len(self._pending))
        generation = self.generation + 1
        table.snapshot(self.snapshot_path, {"journal_generation": str(generation),
                                            "next_batch_no": str(self._next_batch_no),
                                            "pipeline": self.pipeline})
        self._close_journal()
        self.generation = generation
        # The model may have been reloaded since the last journal: the next one belongs to this one.
        self._header.update(generation=generation, input_size=int(table.model.input_size),
                            model=table.fingerprint())
        self._pending.clear()
        if self.durability == "journal":
            self._start_journal()  # should this fail, the next append_batch tries again
        if self.durability == "journal":
            self._delete_stale_journals(generation, f"generation {generation} is current")
        else:
            self._delete_stale_journals(None, "the new snapshot holds its batches")

    def _start_journal(self) -> None:
        """Create the current generation's journal holding only its header, and open it for appending."""
        path = self.journal_path
        header = encode_record(HEADER, json.dumps(self._header, sort_keys=True).encode())
        atomic_write_bytes(path, header)
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND | _OPEN_BINARY)
        self._journal_end = len(header)

    # ---- files --------------------------------------------------------------------------------------
    def _delete_stale_journals(self, keep: int | None, why: str) -> None:
        for path in self.directory.iterdir():
            match = self._journal_name.fullmatch(path.name)
            if match and int(match[1]) != keep:
                log.info("deleting stale journal %s (%s)", path, why)
                path.unlink(missing_ok=True)

    def _remove_temp_files(self) -> None:
        """Temporary files a crash left behind in `atomic_write_bytes`: discarded, not a problem (the file
        they were to replace is still whole)."""
        for path in sorted(self.directory.iterdir()):
            if self._temp_name.fullmatch(path.name):
                log.warning("%s: left by an interrupted write (%d bytes): removed", path, path.stat().st_size,
                            extra={"event": "state_discarded", "pipeline": self.pipeline, "file": str(path)})
                path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"pipeline {self.pipeline}: the StateStore is closed")

    def _check_recovered(self) -> None:
        self._check_open()
        if self._header is None:
            raise RuntimeError("call StateStore.recover(table) first")

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def close(self, clean: bool = True) -> None:
        """Close the journal and release the lock (writes nothing: snapshot first for a clean stop).

        ``clean``: the final snapshot was written, so ``P.running`` goes; False keeps it, and the next start
        reports an unclean stop."""
        if self._closed:
            return
        self._closed = True
        self._close_journal()
        if clean and self._header is not None:  # only a store that started serving wrote the marker
            self.running_path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _number_in(path: Path, extra: dict, name: str) -> int:
    """A count a snapshot's metadata holds (``journal_generation``, ``next_batch_no``); 0 if absent."""
    value = extra.get(name, "0")
    if not (value.isascii() and value.isdigit()):
        raise FormatError(path, f"{name} {value!r} in the metadata is not a whole number")
    return int(value)


def _prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"state dir {directory}: cannot create it ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"state dir {directory}: cannot write in it ({exc.strerror or exc})") from None


def _lock(path: Path, pipeline: str) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_BINARY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OSError(f"state dir {path.parent}: pipeline {pipeline!r} is in use by another process "
                      f"(it holds {path.name})") from None
    return fd


def _aside_name(path: Path, why: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate, n = path.with_name(f"{path.name}.{why}-{stamp}"), 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{why}-{stamp}-{n}"), n + 1
    return candidate


def _move_aside(path: Path, why: str) -> Path:
    aside = _aside_name(path, why)
    os.replace(path, aside)
    return aside


def _copy_aside(path: Path, why: str) -> Path:
    aside = _aside_name(path, why)
    atomic_write_bytes(aside, path.read_bytes())
    return aside
