"""Logging: JSON lines off a terminal, PII masked while mask_pii is on."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from daemon.log import configure_logging, mask


@pytest.fixture(autouse=True)
def _reset() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


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
