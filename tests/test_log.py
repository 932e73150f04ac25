"""Logging: JSON lines off a terminal, PII masked while mask_pii is on."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from daemon import fastjson
from daemon.log import _JsonLine, _mask_pii, configure_logging, get_logger, mask
from daemon.models import UtcText


def test_library_warnings_become_one_masked_json_line() -> None:
    """asyncpg logs its pool's reconnect failures through the standard logging module, with a
    traceback: they must come out as one JSON line each, a DSN's password masked."""
    out = io.StringIO()
    configure_logging("json", "info", True, stream=out)
    try:
        raise ConnectionError("cannot reach postgresql://app:Sup3rSecret@db.internal/pb\nDETAIL")
    except ConnectionError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor", exc_info=True
        )
    logging.getLogger("asyncpg.pool").debug("below the level: dropped")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [
        {
            "event": "library_log",
            "level": "warning",
            "logger": "asyncpg.pool",
            "message": "Failed to restore the pool connection floor",
            "error": "ConnectionError: cannot reach postgresql://***@db.internal/pb",
            "timestamp": lines[0]["timestamp"],
        }
    ]
    assert "Sup3rSecret" not in out.getvalue()
    assert "Traceback" not in out.getvalue()


def test_json_lines_with_pii_masked() -> None:
    out = io.StringIO()
    configure_logging("auto", "info", True, stream=out)  # a StringIO is not a terminal
    structlog.get_logger().info(
        "conversion_received",
        conversion_id="c1",
        email="jane.doe@example.com",
        phone="+1 (555) 123-4567",
        first_name="Jane",
        last_name="Doe",
        ip="203.0.113.7",
        offer="9",
    )
    line = json.loads(out.getvalue())
    assert line["event"] == "conversion_received"
    assert line["level"] == "info"
    assert line["conversion_id"] == "c1"
    assert line["offer"] == "9"
    assert line["email"] == "j***@e***.com"
    assert line["phone"] == "***67"
    assert line["first_name"] == "J***"
    assert line["last_name"] == "D***"
    assert line["ip"] == "203.0.x.x"
    assert "jane" not in out.getvalue().lower()
    assert "555" not in out.getvalue()


def test_unmasked_when_mask_pii_is_off_and_level_filters() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", False, stream=out)
    log = structlog.get_logger()
    log.info("not_shown", email="a@b.c")
    log.warning("shown", email="a@b.c")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["event"], x["email"]) for x in lines] == [("shown", "a@b.c")]


def test_console_format() -> None:
    out = io.StringIO()
    configure_logging("console", "info", True, stream=out)
    structlog.get_logger().info("rules_loaded", postbacks=3)
    text = out.getvalue()
    assert "rules_loaded" in text
    assert "postbacks=3" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("key", "value", "masked"),
    [
        ("email", "x@y.org", "x***@y***.org"),
        ("email", "weird", "***"),
        ("phone", "12", "***"),
        ("ip", "2001:db8::1", "2001:***"),
        ("dob", "1990-01-01", "1***"),
        ("address", "", ""),
        ("external_id", None, None),
    ],
)
def test_mask_forms(key: str, value: str | None, masked: str | None) -> None:
    assert mask(key, value) == masked


class _Writes(io.StringIO):
    """A stream that keeps each write() call apart, as an unbuffered stdout passes each one to
    the pipe or socket that other processes write to as well."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.mark.parametrize("cache", [False, True])
def test_each_line_is_one_write_with_its_newline(cache: bool) -> None:
    """Processes sharing stdout (workers, the dispatch process) cannot glue two lines together:
    a line and its newline go out in one write, flushed at once."""
    out = _Writes()
    configure_logging("json", "info", True, stream=out, cache=cache)
    log = structlog.get_logger("t")
    log.info("first", n=1)
    log.warning("second", email="a@example.com")
    assert len(out.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls)
    assert [json.loads(call)["event"] for call in out.calls] == ["first", "second"]
    assert out.flushes >= 2


def test_module_logger_keeps_its_methods_only_in_a_caching_process() -> None:
    """daemon.log.get_logger: the daemon (cache=True) keeps each method on the module's logger,
    so a line skips structlog's lazy proxy; elsewhere every use goes through the proxy, and a
    later configure (another stream, capture_logs) is seen by the next line."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", True, stream=first)
    log = get_logger("t")
    log.info("one", email="a@example.com")
    assert "info" not in vars(log)
    configure_logging("json", "info", True, stream=second)
    log.info("two")
    assert [json.loads(line)["event"] for line in first.getvalue().splitlines()] == ["one"]
    assert [json.loads(line)["event"] for line in second.getvalue().splitlines()] == ["two"]
    with structlog.testing.capture_logs() as captured:
        log.warning("three")
    assert captured == [{"event": "three", "log_level": "warning"}]

    cached = io.StringIO()
    configure_logging("json", "info", True, stream=cached, cache=True)
    log = get_logger("t")
    log.info("four", email="a@example.com")
    kept = vars(log)["info"]
    log.info("five", n=2)
    assert log.info is kept  # read from the object: no proxy, no bind
    lines = [json.loads(line) for line in cached.getvalue().splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("four", "info"),
        ("five", "info"),
    ]
    assert lines[0]["email"] != "a@example.com"  # masked as through the proxy
    assert lines[1]["n"] == 2
    assert "warning" not in vars(log)  # only what was used
    structlog.reset_defaults()


def _old_chain(mask_pii: bool) -> list[Any]:
    """The JSON processors as they were, one per step (the reference for _JsonLine)."""
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if mask_pii:
        chain.append(_mask_pii)
    chain.append(structlog.processors.format_exc_info)
    chain.append(structlog.processors.JSONRenderer(fastjson.dumps_with))
    return chain


def _line(processors: list[Any], method: str, event: dict[str, Any]) -> str:
    out: Any = dict(event)
    for proc in processors:
        out = proc(None, method, out)
    assert isinstance(out, str)
    return out


def _without_time(line: str) -> tuple[list[tuple[str, Any]], str]:
    pairs = json.loads(line, object_pairs_hook=list)
    stamps = [v for k, v in pairs if k == "timestamp"]
    assert len(stamps) == 1
    return [(k, v) for k, v in pairs if k != "timestamp"], stamps[0]


ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


@pytest.mark.parametrize("mask_pii", [True, False])
@pytest.mark.parametrize("method", ["info", "warning", "warn", "error", "exception", "debug"])
def test_json_line_is_the_processor_chain_in_one(mask_pii: bool, method: str) -> None:
    """_JsonLine writes what the chain of structlog processors wrote: the same keys in the same
    order with the same values (PII masked or not, the level's name mapped, an exception
    rendered, bound context variables merged), the timestamp in the same form."""
    try:
        raise ValueError("boom")
    except ValueError as err:
        failure = err
    events: list[dict[str, Any]] = [
        {"event": "conversion_received", "source": "s", "email": "jane@example.com",
         "phone": "+1 555 123 4567", "ip": "203.0.113.7", "previous_status": None,
         "first_name": "", "deliveries": 2},
        {"event": "x", "exc_info": failure, "error": "e"},
        {"event": "x", "exc_info": (ValueError, failure, failure.__traceback__)},
        {"event": "x", "obj": object(), "when": datetime(2026, 1, 2, tzinfo=UTC)},
        {"event": "x", "big": 2**70, "ip": "2001:db8::1"},
    ]  # fmt: skip
    fused = [_JsonLine(mask_pii)]
    for event in events:
        new_pairs, new_stamp = _without_time(_line(fused, method, event))
        old_pairs, old_stamp = _without_time(_line(_old_chain(mask_pii), method, event))
        assert new_pairs == old_pairs
        assert ISO_Z.fullmatch(new_stamp)
        assert ISO_Z.fullmatch(old_stamp)
    structlog.contextvars.bind_contextvars(request_id="r1", source="bound")
    try:
        event = {"event": "x", "source": "given"}  # a key given wins over a bound one
        new_pairs, _ = _without_time(_line(fused, method, event))
        old_pairs, _ = _without_time(_line(_old_chain(mask_pii), method, event))
        assert new_pairs == old_pairs
        assert ("request_id", "r1") in new_pairs
        assert ("source", "given") in new_pairs
    finally:
        structlog.contextvars.clear_contextvars()


@pytest.mark.parametrize(
    "ns",
    [
        0,
        1_780_000_000_000_000_000,  # a whole second: no fraction, as isoformat()
        1_780_000_000_000_001_000,  # one microsecond
        1_780_000_000_999_999_999,  # rounded down, as datetime.now()
        1_780_000_001_000_000_500,  # the next second, under a microsecond past it
        253_402_300_799_999_999_000,  # the last microsecond of year 9999
    ],
)
def test_stamp_is_isoformat_of_the_utc_time(ns: int) -> None:
    stamp = UtcText(lambda: ns)
    expected = datetime(1970, 1, 1) + timedelta(microseconds=ns // 1000)
    assert stamp() == expected.isoformat() + "Z"
    assert stamp() == expected.isoformat() + "Z"  # the second's text, kept, is the same


def test_stamp_follows_the_clock_across_seconds() -> None:
    """The text kept for a second is never given to another second."""
    clock = iter([5_000_000_000, 5_999_999_000, 6_000_000_000, 5_500_000_000, 86_400_000_001_000])
    stamp = UtcText(lambda: next(clock))
    assert [stamp() for _ in range(5)] == [
        "1970-01-01T00:00:05Z",
        "1970-01-01T00:00:05.999999Z",
        "1970-01-01T00:00:06Z",
        "1970-01-01T00:00:05.500000Z",  # a clock stepped back
        "1970-01-02T00:00:00.000001Z",
    ]


def test_json_lines_stamp_now() -> None:
    """The daemon's lines carry the time they were written (UTC)."""
    out = io.StringIO()
    configure_logging("json", "info", True, stream=out)
    before = datetime.now(UTC).replace(tzinfo=None)
    structlog.get_logger().info("x")
    after = datetime.now(UTC).replace(tzinfo=None)
    stamp = json.loads(out.getvalue())["timestamp"]
    assert ISO_Z.fullmatch(stamp)
    assert before <= datetime.fromisoformat(stamp.removesuffix("Z")) <= after
