"""What a caller may send to the affiliate service, checked before anything is read or written
(issue 15): known keys only, JSON scalars of the right type, bounded sizes and depth, no control
characters or lone surrogates. Every refusal is an InputError naming the field."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from daemon.errors import ForbiddenError, InputError
from daemon.rules import ANY_AFFILIATE

CREATE_KEYS = ("offer", "trigger", "goal", "when", "status", "retry", "action", "affiliate")
UPDATE_KEYS = ("trigger", "goal", "when", "status", "retry", "action")
SERVER_KEYS = ("id", "author", "created_at", "updated_at", "source", "file", "line")
STATUSES = ("active", "disabled")
MAX_DEPTH = 32
MAX_STRING = 4096
MAX_ITEMS = 200
MAX_IDS = 100
_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


def check_tree(value: Any, where: str, depth: int = 0) -> None:
    """JSON values within bounds; InputError naming the dotted path of the first problem."""
    if depth > MAX_DEPTH:
        raise InputError(f"nested deeper than {MAX_DEPTH} levels", where or None)
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise InputError(f"more than {MAX_ITEMS} keys", where or None)
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError("keys must be strings", where or None)
            check_text(key, where)
            check_tree(item, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise InputError(f"more than {MAX_ITEMS} items", where or None)
        for i, item in enumerate(value):
            check_tree(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InputError("not a finite number", where or None)


def check_text(value: str, where: str) -> str:
    if len(value) > MAX_STRING:
        raise InputError(f"longer than {MAX_STRING} characters", where or None)
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cs"):
            raise InputError("control characters and lone surrogates are not allowed", where)
    return value


def known_keys(fields: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(fields, Mapping):
        raise InputError("the body must be a JSON object")
    for key in fields:
        if key in SERVER_KEYS:
            raise InputError(f"{key} is set by the server, not by the request", str(key))
        if key not in allowed:
            known = ", ".join(allowed)
            raise InputError(f"unknown key {str(key)[:64]!r} (known: {known})", str(key)[:64])
    check_tree(fields, "")
    return fields


def id_text(value: Any, field: str) -> str:
    """An offer/goal/affiliate id: a number or a string of 1 to 128 printable characters."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError("must be an id: a number or a string", field)
    text = str(value).strip()
    if not _ID.match(text):
        raise InputError("must be an id of 1 to 128 printable characters", field)
    return text


def postback_id(value: Any, field: str = "id") -> int:
    """A postback id as a path or body gives it; InputError when it cannot be one."""
    if isinstance(value, bool):
        raise InputError("must be a postback id", field)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value):
        return int(value)
    if isinstance(value, int) and 0 < value < 10**18:
        return value
    raise InputError("must be a postback id", field)


def status(value: Any) -> str:
    if value not in STATUSES:
        raise InputError("must be active or disabled", "status")
    return str(value)


def own_affiliate(value: Any, mine: str) -> None:
    """An affiliate acts only for itself: `affiliate` may be left out or be its own id."""
    if value == ANY_AFFILIATE:
        raise ForbiddenError("'*' (every affiliate) is not available to affiliate postbacks")
    if id_text(value, "affiliate") != mine:
        raise ForbiddenError(
            f"an affiliate token acts only for its own affiliate ({mine})", "affiliate"
        )


def action_of(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise InputError("must be a mapping with a type", "action")
    return dict(value)


def secret_value(name: Any, value: Any) -> tuple[str, str]:
    from daemon.secrets import valid_secret_name

    if not isinstance(name, str) or len(name) > 64 or not valid_secret_name(name):
        raise InputError("a secret name is 1 to 64 of letters, digits, _ . -", "name")
    if not isinstance(value, str) or not value:
        raise InputError("must be a non-empty string", "value")
    return name, check_text(value, "value")
