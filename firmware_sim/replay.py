"""A recorded CSV file replayed as one device: real data through the same device as the simulated fleet.

The file: a header row naming the columns; every column is a channel except two optional ones, ``ts``
(the sample's time, seconds) and ``label`` (its true label, kept as ground truth). Blank lines and lines
starting with '#' are skipped. The file is read as it is replayed (one row ahead), so a long recording
costs no memory. A row that does not parse, or whose ``ts`` goes backwards, is skipped and logged.

Timing: at the file's own timestamps (scaled by ``speed``), or at a fixed ``rate_hz`` (which a file
without a ``ts`` column needs). The device's published ``ts`` is its own clock at the sample's time.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

TS_COLUMN = "ts"
LABEL_COLUMN = "label"


class CsvSource:
    """One device's samples from a CSV file: ``next() -> (values, label)``, ``peek_time()`` for timing."""

    profile = "replay"

    def __init__(self, path, rate_hz: float | None = None):
        if rate_hz is not None and not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"rate must be a positive number of Hz, got {rate_hz}")
        self.path = Path(path)
        self.rate_hz = rate_hz
        self.skipped = 0
        self._file = open(self.path, newline="", encoding="utf-8")  # noqa: SIM115 -- read as the replay goes
        try:
            self._reader = csv.reader(self._file)
            self._line = 0
            header = self._header()
            names = [name.strip() for name in header]
            if len(set(names)) != len(names):
                raise ValueError(f"{self.path}: the header names a column twice: {', '.join(header)}")
            self._ts = names.index(TS_COLUMN) if TS_COLUMN in names else None
            self._label = names.index(LABEL_COLUMN) if LABEL_COLUMN in names else None
            self._channels = [i for i, name in enumerate(names) if i not in (self._ts, self._label)]
            self.channels = tuple(names[i] for i in self._channels)
            if not self.channels:
                raise ValueError(f"{self.path}: no channel columns (only {', '.join(names)})")
            if self._ts is None and rate_hz is None:
                raise ValueError(f"{self.path}: no '{TS_COLUMN}' column, so a replay rate is needed (--rate)")
            self._width = len(names)
            self._last_ts = -math.inf
            self._ahead = self._read()
            if self._ahead is None:
                raise ValueError(f"{self.path}: no samples after the header")
        except BaseException:
            self._file.close()
            raise

    @property
    def labels(self) -> tuple[str, ...]:
        return ()  # not known before the file has been read

    def peek_time(self) -> float | None:
        """The file timestamp of the row `next` returns next (None at the end, or without a ts column)."""
        return None if self._ahead is None else self._ahead[2]

    def next(self) -> tuple[list[float], str | None]:
        row = self._ahead
        if row is None:
            raise StopIteration
        self._ahead = self._read()
        return row[0], row[1]

    def close(self) -> None:
        self._file.close()

    def _header(self) -> list[str]:
        for fields in self._reader:
            self._line = self._reader.line_num
            if fields and any(field.strip() for field in fields) and not fields[0].lstrip().startswith("#"):
                return fields
        raise ValueError(f"{self.path}: empty file (a header row of channel names comes first)")

    def _read(self):
        """The next good row as (values, label, ts), or None at the end of the file."""
        for fields in self._reader:
            line = self._reader.line_num
            if not fields or not any(field.strip() for field in fields) or fields[0].lstrip().startswith("#"):
                continue
            try:
                if len(fields) != self._width:
                    raise ValueError(f"{len(fields)} fields, the header has {self._width}")
                values = [float(fields[i]) for i in self._channels]
                label = fields[self._label].strip() if self._label is not None else None
                ts = None
                if self._ts is not None:
                    ts = float(fields[self._ts])
                    if not math.isfinite(ts) or ts < self._last_ts:
                        raise ValueError(f"ts {fields[self._ts]!r} is not finite or goes backwards")
                    self._last_ts = ts
            except ValueError as error:
                self.skipped += 1
                log.warning("%s:%d: row skipped: %s", self.path, line, error)
                continue
            return values, label, ts
        self._file.close()
        return None


def replay_fleet(path, *, rate_hz: float | None = None, speed: float = 1.0, profile: str = "replay", **options):
    """A `Fleet` of one device replaying ``path`` (``options`` go to `Fleet`: host, port, faults, topic...).

    ``speed`` scales the file's timestamps (2.0 replays twice as fast); it does not apply with ``rate_hz``.
    """
    from .fleet import Fleet

    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a positive number, got {speed}")
    source = CsvSource(path, rate_hz)
    source.speed = speed
    try:
        return Fleet(profile, sources=[source], **options)  # the fleet closes the file when its run ends
    except BaseException:
        source.close()
        raise
