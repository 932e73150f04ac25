"""What the HTTP API shows: JSON views of deliveries, attempts and the rules status (postbacks
are daemon.listing's rows, as `rules list` prints them), and strict query parsing (400, never
a 5xx)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from daemon.errors import InputError
from daemon.reload import Reloader
from daemon.store.base import AttemptRow, DeliveryRow
from daemon.store.common import decode_cursor
from daemon.views import delivery_json, iso

MAX_VALUE = 1024


# --- query parameters -----------------------------------------------------------------------


def parse_query(request: web.Request, allowed: Sequence[str]) -> dict[str, str]:
    """The query as one value per name; InputError for unknown names, repeats that disagree,
    over-long values and control characters. An empty value counts as not given."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise InputError(f"unknown parameter {name[:64]!r} (known: {known})", name[:64])
        if len(value) > MAX_VALUE:
            raise InputError(f"value longer than {MAX_VALUE} characters", name)
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
            raise InputError("control characters are not allowed", name)
        if name in params and params[name] != value:
            raise InputError("parameter given twice with different values", name)
        params[name] = value
    return {k: v for k, v in params.items() if v != ""}


def positive_int(text: str, field: str, maximum: int) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= maximum:
        raise InputError(f"{field} must be an integer from 1 to {maximum}", field)
    return int(text)


def checked_cursor(text: str | None) -> str | None:
    """The cursor as given, once it is known to decode (the store's own check misses overflow)."""
    if text is not None:
        try:
            decode_cursor(text)
        except (OverflowError, ValueError, OSError) as err:
            raise InputError("malformed cursor", "cursor") from err
    return text


# --- views ----------------------------------------------------------------------------------


def delivery_view(row: DeliveryRow) -> dict[str, Any]:
    return delivery_json(row)  # the one delivery object of the API and the CLI (daemon/views.py)


def attempt_view(row: AttemptRow) -> dict[str, Any]:
    """An attempt as recorded; its request was masked before it was stored."""
    return {
        "started_at": iso(row.started_at),
        "duration_ms": row.duration_ms,
        "outcome": row.outcome,
        "reason": row.reason,
        "rules_version": row.rules_version,
        "node": row.node,
        "request": dict(row.request) if row.request is not None else None,
        "response_status": row.response_status,
        "response_excerpt": row.response_excerpt,
    }


def rules_status_view(reloader: Reloader) -> dict[str, Any]:
    status = reloader.status
    rules = reloader.runtime.rules
    return {
        "version": str(rules.version),
        "loaded_at": iso(status.loaded_at),
        "last_attempt_at": iso(status.last_attempt_at),
        "last_reload_ok": status.ok,
        "last_error": list(status.last_error),
        "files": list(rules.files),
        "postbacks": len(rules.postbacks),
        "reloads_ok": status.reloads_ok,
        "reloads_failed": status.reloads_failed,
    }
