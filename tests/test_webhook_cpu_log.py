"""The daemon's bound loggers (configure_logging's wrapper class) write what structlog's own
filtering loggers write with the same processors: one call per line instead of four must not
change a line, a level's filtering, a bound or interpolated value, or a dropped event."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from daemon.log import configure_logging


class _Thing:
    def __repr__(self) -> str:
        return "<a thing>"


def _calls(log: Any) -> None:
    """Every way the daemon logs, and a few it does not."""
    log.info("conversion_received", source="s", email="jane@example.com", ip="203.0.113.7",
             phone=None, first_name="", deliveries=2, previous_status=None)  # fmt: skip
    log.debug("hidden_at_info", n=1)
    log.warning("w", error="e")
    log.warn("old_alias", n=2)
    log.msg("msg_alias", n=3)
    log.error("e", http_status=503)
    log.critical("c")
    log.fatal("f")
    log.info("interpolated %s and %d", "text", 7, extra="x")
    log.info("mapping %(a)s", {"a": "b"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", source="s")
    log.info("objects", obj=_Thing(), big=2**70)
    bound = log.bind(node="n1", source="bound")
    bound.info("with_context", source="given")  # a key given wins over a bound one
    bound.new(other=1).warning("new_context")
    structlog.contextvars.bind_contextvars(request_id="r1")
    log.info("with_contextvars", n=4)
    structlog.contextvars.clear_contextvars()


def _lines(level: str, mask_pii: bool, ours: bool, cache: bool) -> list[list[tuple[str, Any]]]:
    out = io.StringIO()
    configure_logging("json", level, mask_pii, stream=out, cache=cache)
    if not ours:  # structlog's own filtering logger, the same processors
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper()))
        )
    _calls(structlog.get_logger("t"))
    structlog.reset_defaults()
    lines = []
    for line in out.getvalue().splitlines():
        pairs = json.loads(line, object_pairs_hook=list)
        lines.append([(k, v) for k, v in pairs if k != "timestamp"])
    return lines


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("mask_pii", [True, False])
@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical"])
def test_lines_are_structlogs_own(level: str, mask_pii: bool, cache: bool) -> None:
    ours = _lines(level, mask_pii, True, cache)
    theirs = _lines(level, mask_pii, False, cache)
    assert ours == theirs
    events = [dict(line)["event"] for line in ours]
    if level == "info":
        assert "hidden_at_info" not in events
        assert "interpolated text and 7" in events
        assert "mapping b" in events
        assert ("old_alias", "warning") in [(dict(x)["event"], dict(x)["level"]) for x in ours]
        assert len(ours) == 14  # all but the debug line
    if level == "critical":
        assert events == ["c", "f"]


def test_capture_logs_still_sees_every_event() -> None:
    """Tests capture a configured daemon's lines with capture_logs (its processor drops the
    event after keeping it): nothing is written, everything is captured."""
    out = io.StringIO()
    configure_logging("json", "info", True, stream=out, cache=False)
    log = structlog.get_logger("t")
    with capture_logs() as captured:
        log.info("one", n=1)
        log.bind(a=1).warning("two")
        log.debug("below")
    assert out.getvalue() == ""
    assert captured == [
        {"n": 1, "event": "one", "log_level": "info"},
        {"a": 1, "event": "two", "log_level": "warning"},
    ]


def test_a_processor_returning_a_dict_or_a_tuple_reaches_the_logger() -> None:
    got: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    class Logger:
        def info(self, *args: Any, **kw: Any) -> None:
            got.append((args, kw))

    configure_logging("json", "info", True, stream=io.StringIO())
    structlog.configure(processors=[lambda _, __, ev: ev], logger_factory=lambda *_: Logger())
    structlog.get_logger().info("d", n=1)
    structlog.configure(processors=[lambda _, __, ev: (("x",), {"k": 1})])
    structlog.get_logger().info("t")
    assert got == [((), {"n": 1, "event": "d"}), (("x",), {"k": 1})]
    structlog.configure(processors=[lambda _, __, ev: 42])
    with pytest.raises(ValueError, match="appropriate value"):
        structlog.get_logger().info("bad")
