"""Structured logging (runtime/logs.py): JSON and text lines, idempotent set-up, per-key rate limit."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone

import pytest

from edgernn.runtime.logs import RateLimitedLog, setup_logging


@pytest.fixture(autouse=True)
def restore_edgernn_logger():
    """setup_logging changes the process-wide edgernn logger: put it back for the other tests."""
    logger = logging.getLogger("edgernn")
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
    logger.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in lines(stream)]


# ---- JSON format ---------------------------------------------------------------------------------------
def test_json_line_has_core_fields_and_extras():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("edgernn.runtime.mqtt").warning("lost %s", "broker", extra={"host": "pi", "attempt": 3})
    (entry,) = json_lines(out)
    assert list(entry)[:4] == ["ts", "level", "logger", "msg"]
    assert entry["level"] == "warning" and entry["logger"] == "edgernn.runtime.mqtt"
    assert entry["msg"] == "lost broker" and entry["host"] == "pi" and entry["attempt"] == 3
    assert entry["ts"].endswith("Z")
    when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
    assert when.tzinfo == timezone.utc
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60


def test_json_turns_what_json_cannot_write_into_strings():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("edgernn.test").info("odd", extra={"path": object(), "value": float("nan"),
                                                         "nested": {"k": (1, float("inf"))}, "ok": [1.5, None, True]})
    (entry,) = json_lines(out)
    assert entry["path"].startswith("<object object") and entry["value"] == "nan"
    assert entry["nested"] == {"k": [1, "inf"]} and entry["ok"] == [1.5, None, True]


def test_json_exception_is_text_in_exc():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    try:
        raise ValueError("bad payload")
    except ValueError:
        logging.getLogger("edgernn.test").exception("step failed")
    (entry,) = json_lines(out)
    assert entry["level"] == "error" and entry["msg"] == "step failed"
    assert "Traceback" in entry["exc"] and "ValueError: bad payload" in entry["exc"]


def test_json_extra_named_like_a_core_field_does_not_replace_it():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("edgernn.test").info("hello", extra={"level": "custom", "ts": 1})
    (entry,) = json_lines(out)
    assert entry["level"] == "info" and entry["level_"] == "custom" and entry["ts_"] == 1


# ---- text format --------------------------------------------------------------------------------------
def test_text_line_is_level_logger_message_and_fields():
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    logging.getLogger("edgernn.runtime").warning("rejected", extra={"pipeline": "imu", "reason": "not json", "n": 2})
    assert lines(out) == ['WARNING edgernn.runtime: rejected pipeline=imu reason="not json" n=2']


def test_text_exception_follows_on_the_next_lines():
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("edgernn.test").exception("boom")
    first, *rest = lines(out)
    assert first == "ERROR edgernn.test: boom"
    assert rest[0].startswith("Traceback") and "ZeroDivisionError" in rest[-1]


# ---- set-up ---------------------------------------------------------------------------------------------
def test_setup_is_idempotent_and_leaves_the_root_logger_alone():
    root_handlers = list(logging.getLogger().handlers)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "json", stream=first)
    setup_logging("info", "json", stream=second)
    logging.getLogger("edgernn.test").info("once")
    assert lines(first) == [] and len(lines(second)) == 1
    own = [h for h in logging.getLogger("edgernn").handlers if getattr(h, "_edgernn_setup", False)]
    assert len(own) == 1
    assert logging.getLogger().handlers == root_handlers


def test_level_filters_and_is_case_insensitive():
    out = io.StringIO()
    setup_logging("WARNING", "json", stream=out)
    log = logging.getLogger("edgernn.test")
    log.info("hidden")
    log.debug("hidden")
    log.error("shown")
    assert [entry["msg"] for entry in json_lines(out)] == ["shown"]


@pytest.mark.parametrize("level, fmt", [("verbose", "json"), ("info", "xml")])
def test_unknown_level_or_format_is_refused(level, fmt):
    with pytest.raises(ValueError):
        setup_logging(level, fmt, stream=io.StringIO())


# ---- rate limit ---------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    clock = FakeClock()
    return RateLimitedLog(logging.getLogger("edgernn.test.bad"), interval=10.0, clock=clock), clock, out


def test_rate_limit_logs_once_per_interval_then_reports_the_suppressed(limited):
    rate, clock, out = limited
    key = ("imu", "not_json")
    assert rate.warning(key, "bad payload on %s", "imu", pipeline="imu", reason="not_json")
    for _ in range(3):
        clock.now += 1
        assert not rate.warning(key, "bad payload on %s", "imu", pipeline="imu", reason="not_json")
    clock.now += 10
    assert rate.warning(key, "bad payload on %s", "imu", pipeline="imu", reason="not_json")
    first, second = json_lines(out)
    assert first["msg"] == "bad payload on imu" and "suppressed" not in first
    assert first["pipeline"] == "imu" and first["reason"] == "not_json" and first["level"] == "warning"
    assert second["msg"] == "bad payload on imu (3 similar suppressed)" and second["suppressed"] == 3
    clock.now += 10
    rate.warning(key, "bad payload on %s", "imu")
    assert "suppressed" not in json_lines(out)[2]  # the count starts again after it is reported


def test_rate_limit_is_per_key(limited):
    rate, clock, out = limited
    assert rate.warning(("imu", "not_json"), "a")
    assert rate.warning(("imu", "oversize"), "b")
    assert rate.warning(("temp", "not_json"), "c")
    assert not rate.warning(("imu", "not_json"), "a")
    assert [entry["msg"] for entry in json_lines(out)] == ["a", "b", "c"]


def test_a_literal_percent_survives_the_suppressed_suffix(limited):
    rate, clock, out = limited
    rate.warning("k", "100% bad")
    rate.warning("k", "100% bad")
    clock.now += 10
    rate.warning("k", "100% bad")
    assert json_lines(out)[1]["msg"] == "100% bad (1 similar suppressed)"


def test_a_flood_writes_one_line_per_interval(limited):
    rate, clock, out = limited
    for _ in range(10_000):
        clock.now += 0.01  # 100 s of bad payloads at 100 per second
        rate.warning(("imu", "non_finite"), "bad")
    entries = json_lines(out)
    assert len(entries) == 10
    reported = sum(entry.get("suppressed", 0) for entry in entries)
    pending = rate._suppressed.get(("imu", "non_finite"), 0)  # reported by the key's next line
    assert len(entries) + reported + pending == 10_000


def test_rate_limit_does_not_count_when_the_level_is_off(limited):
    rate, clock, out = limited
    setup_logging("error", "json", stream=out)
    assert not rate.warning("k", "quiet")
    setup_logging("info", "json", stream=out)
    assert rate.warning("k", "loud")
    assert json_lines(out)[0]["msg"] == "loud" and "suppressed" not in json_lines(out)[0]
