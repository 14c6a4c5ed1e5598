"""Structured logs on stdout for journald, and a per-key rate limit for logs that input can trigger.

`setup_logging` configures the ``edgernn`` logger tree only (not the root logger, so an embedding
application keeps its own logging): ``json`` writes one JSON object per line, ``text`` a plain line with
``key=value`` fields. journald stamps time and unit itself; the JSON ``ts`` is there for files and pipes.

Fields passed as ``extra={...}`` appear in the output as given. Never pass secrets: callers log the
redacted config, never the raw one.

`RateLimitedLog` keeps a flood of bad payloads from flooding the journal: at most one line per key
(e.g. ``(pipeline, reason)``) per interval, and the next line says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable, TextIO

ROOT_LOGGER = "edgernn"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
FORMATS = ("json", "text")

# Every attribute a plain LogRecord has: anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_CORE_FIELDS = ("ts", "level", "logger", "msg", "exc", "stack")


def extra_fields(record: logging.LogRecord) -> dict:
    """The fields a log call added with ``extra=``, in the order given."""
    return {key: value for key, value in record.__dict__.items() if key not in _RECORD_FIELDS}


def _jsonable(value):
    """``value`` with everything json cannot write (objects, NaN, inf) turned into strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601 UTC), level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # A field named like a core field keeps its value under "<name>_" rather than replacing it.
            entry[f"{key}_" if key in _CORE_FIELDS else key] = _jsonable(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...``, then the traceback on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{record.levelname} {record.name}: {record.getMessage()}"]
        parts.extend(f"{key}={_text_value(value)}" for key, value in extra_fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value) -> str:
    """A field value for the text format: bare when unambiguous, else JSON-quoted."""
    if isinstance(value, str):
        needs_quotes = not value or any(c.isspace() or c in '"=' for c in value)
        return json.dumps(value, ensure_ascii=False) if needs_quotes else value
    return json.dumps(_jsonable(value), ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send the ``edgernn`` logger tree to ``stream`` (default: sys.stdout at call time) at ``level``.

    Idempotent: a second call replaces the handler the first one installed. Records still propagate
    to the root logger (pytest's capture handler in tests); ``edgernn serve`` turns that off, since the
    CLI's root handler would print every line a second time on stderr.
    """
    level_number = LEVELS.get(str(level).lower())
    if level_number is None:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "_edgernn_setup", False):
            logger.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._edgernn_setup = True
    logger.addHandler(handler)
    logger.setLevel(level_number)


class RateLimitedLog:
    """Log at most once per ``interval`` seconds per key; the next line carries the suppressed count.

    Keys should come from a small set (pipeline, reason), not from input such as stream keys. Counts
    suppressed after the last line are reported only when that key logs again: the metrics carry the
    exact totals. Thread-safe.
    """

    _PRUNE_AT = 4096  # entries: beyond this, keys quiet for a whole interval are forgotten

    def __init__(self, logger: logging.Logger, interval: float, clock: Callable[[], float] = time.monotonic):
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.logger = logger
        self.interval = float(interval)
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict = {}        # key -> time of the last line logged
        self._suppressed: dict = {}  # key -> lines suppressed since

    def warning(self, key, msg: str, *args, **extra) -> bool:
        """Log ``msg % args`` at WARNING with ``extra`` fields unless ``key`` logged within the interval.

        Returns whether a line was written.
        """
        return self.log(logging.WARNING, key, msg, *args, **extra)

    def log(self, level: int, key, msg: str, *args, **extra) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            suppressed = self._suppressed.pop(key, 0)
            self._last[key] = now
            if len(self._last) > self._PRUNE_AT:
                self._prune(now)
        if suppressed:
            if not args:
                msg = msg.replace("%", "%%")  # about to add an argument: a literal % must stay literal
            msg += " (%d similar suppressed)"
            args += (suppressed,)
            extra["suppressed"] = suppressed
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def _prune(self, now: float) -> None:
        for key, last in list(self._last.items()):
            if now - last >= self.interval and key not in self._suppressed:
                del self._last[key]
