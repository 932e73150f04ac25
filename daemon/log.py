"""Logging: structlog to stdout, JSON lines off a terminal, console on one; PII masked.

One line per unit of work. Event names say what happened; keys come from the vocabulary below,
so that queries in journald or a log pipeline can rely on them.

Events: conversion_received, delivery_attempt, rules_loaded, rules_reloaded, rules_reload_failed,
destination_down, destination_up, condition_error, daemon_started, daemon_stopping,
daemon_stopped, store_failing, store_recovered (an operation of the store starts failing, works
again: once each), store_after_commit_failed (what the store calls after an arrival's
transaction, to hand deliveries leased at insert to the dispatcher, raised: a bug, logged),
store_writes_slow (SQLite: a batch of writes lent to the event loop held it over 50 ms; the
next batches run in the writer thread for next_in_s; once per run of slow batches),
store_migrated (the schema migrations a store applied as it opened, in migrations),
ingest_paced, ingest_unpaced (arrivals wait for delivery on a saturated loop: when an episode
starts, and 10 s after it ended or at stop, with the count that waited; daemon.pacing),
retention_pruned, notify_failed, source_unauthenticated (a source without credentials
reachable from beyond loopback, at start); affiliate postbacks (issue 15):
affiliate_postback_created, affiliate_postback_deleted, affiliate_postback_disabled (by the
policy), affiliate_secret_set, affiliate_changes_applied, affiliate_sync_failed,
affiliate_sync_recovered, affiliate_sync_error, affiliate_listener_lost,
affiliate_listener_failed; library_log (a warning or error that a library such as asyncpg
or aiohttp wrote through the standard logging module, as one masked line); the web console
(issue 16): ui_signed_in, ui_sign_in_refused,
ui_signed_out, ui_csrf_refused, delivery_requeued; supervision (issue 12): loop_failing,
loop_stalled, loop_recovered, loop_ended, task_failed, watchdog_withheld, watchdog_resumed.

Keys: source, conversion_id, transition, previous_status, status, offer, affiliate, deliveries,
postback_id, delivery_id, action, destination, attempt, outcome, reason, duration_ms, next_in_s,
rules_version, files, postbacks, errors, error, listen, store, remote, http_status, node, count,
secret (a secret's name, never its value), version (of the affiliate postbacks in the store),
role (admin or affiliate, of a console session), path (a console page), migrations (names).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from daemon import fastjson
from daemon.logout import LineLogger, TurnFlushed
from daemon.models import PII_FIELDS, UtcText

_EMAIL = re.compile(r"^([^@]?)[^@]*@(.?)[^.]*(\..*)?$")


def mask(key: str, value: Any) -> Any:
    """A recognisable but non-identifying form of one PII value."""
    if value is None or value == "":
        return value
    text = str(value)
    if key == "email":
        m = _EMAIL.match(text)
        return f"{m.group(1)}***@{m.group(2)}***{m.group(3) or ''}" if m else "***"
    if key == "phone":
        digits = re.sub(r"\D", "", text)
        return f"***{digits[-2:]}" if len(digits) > 4 else "***"
    if key == "ip":
        if "." in text:
            return ".".join([*text.split(".")[:2], "x", "x"])
        return text.split(":")[0] + ":***"
    return f"{text[:1]}***"


_PII_NAMES = tuple(sorted(PII_FIELDS))  # (a walk of the names costs less than a set's)


def _mask_pii(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    get = event.get
    for key in _PII_NAMES:
        value = get(key)
        if value is not None and value != "":  # mask() returns those as they are
            event[key] = mask(key, value)
    return event


class _JsonLine:
    """One event as its JSON line: merge_contextvars, add_log_level, TimeStamper(fmt="iso",
    utc=True), _mask_pii (when `mask_pii`), format_exc_info and JSONRenderer(fastjson.dumps_with)
    in one processor, with the same keys in the same order (a processor call each, per line,
    and the timestamp's isoformat() were most of a line's cost). The context variables are
    merged only once structlog has made one (bind_contextvars), as merge_contextvars would find
    none before."""

    def __init__(self, mask_pii: bool) -> None:
        self._mask_pii = mask_pii
        self._stamp = UtcText()  # TimeStamper(fmt="iso", utc=True)'s text, at a third
        # JSONRenderer(fastjson.dumps_with) calls dumps_with(event, **these): its `default`.
        self._dumps_kw = structlog.processors.JSONRenderer(fastjson.dumps_with)._dumps_kw
        # structlog's own record of the context variables it made (None: merge every time).
        self._bound = getattr(structlog.contextvars, "_CONTEXT_VARS", None)

    def __call__(self, logger: Any, method_name: str, event: MutableMapping[str, Any]) -> Any:
        if self._bound is None or self._bound:
            structlog.contextvars.merge_contextvars(logger, method_name, event)
        # add_log_level: the method's name, mapped as structlog's map_method_name maps it
        event["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event["timestamp"] = self._stamp()
        if self._mask_pii:
            _mask_pii(logger, method_name, event)
        if "exc_info" in event:  # format_exc_info does nothing without it
            structlog.processors.format_exc_info(logger, method_name, event)
        return fastjson.dumps_with(event, **self._dumps_kw)  # what the JSONRenderer returned


# structlog's map_method_name (add_log_level): the names it changes; any other is kept.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


class ModuleLogger:
    """A module's logger: structlog.get_logger(name), and once the process caches its loggers
    (configure_logging(cache=True): `postbackd run`) each method used is kept on this object.
    A line then costs one attribute read, where structlog's lazy proxy misses the attribute
    (an AttributeError made and dropped), runs its __getattr__ and its bind every time. Until
    then, and in every process that does not cache (tests, CLI commands), each use goes through
    the proxy, so a later structlog.configure (capture_logs) is seen."""

    def __init__(self, name: str) -> None:
        self._proxy = structlog.get_logger(name)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._proxy, name)
        if structlog.get_config()["cache_logger_on_first_use"]:
            self.__dict__[name] = attr  # the next read finds it without __getattr__
        return attr


def get_logger(name: str) -> Any:
    """The logger of module `name` (a ModuleLogger, typed as structlog's loggers are)."""
    return ModuleLogger(name)


def _direct_method(name: str, through: Callable[..., Any]) -> Callable[..., Any]:
    """The bound logger's method `name` (a level that is logged): what structlog's filtering
    method does through _maybe_interpolate, _proxy_to_logger and _process_event, in one call
    (the event dict built and run through the processors the same way, DropEvent a line not
    written). An event with positional arguments to interpolate goes `through` structlog's."""

    def meth(self: Any, event: Any, *args: Any, **kw: Any) -> Any:
        if args:
            return through(self, event, *args, **kw)
        context = self._context
        if context:
            event_dict: Any = context.copy()
            event_dict.update(kw)
        else:
            event_dict = kw  # (a dict of this call's own)
        if event is not None:
            event_dict["event"] = event
        logger = self._logger
        try:
            for proc in self._processors:
                event_dict = proc(logger, name, event_dict)
        except structlog.DropEvent:
            return None
        if isinstance(event_dict, str | bytes | bytearray):
            return getattr(logger, name)(event_dict)
        if isinstance(event_dict, tuple):
            return getattr(logger, name)(*event_dict[0], **event_dict[1])
        if isinstance(event_dict, dict):
            return getattr(logger, name)(**event_dict)
        raise ValueError(
            "Last processor didn't return an appropriate value.  Valid return values are a "
            "dict, a tuple of (args, kwargs), bytes, or a str."
        )

    meth.__name__ = name
    return meth


def _wrapper_class(level: int) -> type[Any]:
    """structlog.make_filtering_bound_logger(level), its logged levels' methods direct (one
    call per line instead of four: the lines, and what the processors see, are the same)."""
    base = structlog.make_filtering_bound_logger(level)
    methods: dict[str, Any] = {}
    for name, aliases in _LEVEL_ALIASES.items():
        if structlog.processors.NAME_TO_LEVEL[name] >= level:
            methods[name] = _direct_method(name, getattr(base, name))
            for alias in aliases:
                methods[alias] = methods[name]
    return type(base.__name__, (base,), methods)


# The level methods of structlog's filtering loggers, and their aliases (msg is info, ...).
_LEVEL_ALIASES = {
    "debug": (),
    "info": ("msg",),
    "warning": ("warn",),
    "error": (),
    "critical": ("fatal",),
}


# scheme://user:password@host -> scheme://***@host: a store URL or a destination may carry them.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def mask_userinfo(text: str) -> str:
    """`text` with every URL's userinfo replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def masked_first_line(text: str) -> str:
    """`text`'s first line (later ones, such as PostgreSQL's DETAIL, may quote row values), a
    URL's userinfo masked."""
    lines = text.strip().splitlines()
    return mask_userinfo(lines[0] if lines else "")


class _LibraryLogs(logging.Handler):
    """The standard logging module's records (asyncpg, aiohttp, asyncio) as structlog lines:
    one JSON line each, never a bare traceback on stdout. The message and the exception are
    cut to one line each and a URL's userinfo is masked (a DSN may carry a password)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": _one_line(record)}
            if record.exc_info and record.exc_info[1] is not None:
                err = record.exc_info[1]
                fields["error"] = f"{type(err).__name__}: {_mask_line(str(err))}"
            logger = structlog.get_logger("postbackd.library")
            if record.levelno >= logging.ERROR:
                logger.error("library_log", **fields)
            elif record.levelno >= logging.WARNING:
                logger.warning("library_log", **fields)
            else:
                logger.info("library_log", **fields)
        except Exception:  # a logging failure must never take the caller down
            self.handleError(record)


def _one_line(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # a library's bad format arguments
        text = str(record.msg)
    return _mask_line(text)


def _mask_line(text: str) -> str:
    return masked_first_line(text)[:500]


def route_library_logs(level: int = logging.WARNING) -> None:
    """Send the standard logging module's records at `level` and above through structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _LibraryLogs):
            root.removeHandler(handler)
    root.addHandler(_LibraryLogs(level))
    root.setLevel(level)


def _line_logger(stream: TurnFlushed) -> Callable[..., LineLogger]:
    """structlog's logger factory for a TurnFlushed stream: one LineLogger for every module."""
    logger = LineLogger(stream)
    return lambda *_: logger


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    mask_pii: bool = True,
    stream: TextIO | None = None,
    *,
    cache: bool = False,
) -> None:
    """Set up structlog once for the process (the CLI calls this; tests use capture_logs).

    `cache` (the daemon: `postbackd run`): each module's logger is built on its first use and
    kept, instead of once per line (a bound logger and a PrintLogger per call otherwise). Only
    for a process that never reconfigures logging afterwards."""
    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any]
    if use_json:
        processors = [_JsonLine(mask_pii)]
    else:
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ]
        if mask_pii:
            processors.append(_mask_pii)
        processors.append(structlog.processors.format_exc_info)
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    # the daemon's stream (TurnFlushed) takes a line in one call; any other, WriteLogger's
    factory = (
        _line_logger(out) if isinstance(out, TurnFlushed) else structlog.WriteLoggerFactory(out)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=_wrapper_class(logging.getLevelName(level.upper())),
        # One write() per line (the line and its newline together): processes that share
        # stdout (`workers`, the dispatch process) never glue each other's lines, as print()'s
        # two writes did under PYTHONUNBUFFERED=1 (the systemd unit).
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    route_library_logs()
