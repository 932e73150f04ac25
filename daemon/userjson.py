"""JSON typed by a user (a command-line option, a file, a console form): plain JSON only, and
bounded before anything recurses over it, so that no input can end in a RecursionError or an
integer conversion error far from where it was read."""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 64  # containers nested in a value given on the command line or in a file


def json_value(text: str) -> Any:
    """JSON from a user (an option, a file, a form): json.JSONDecodeError for anything that is
    not plain JSON (NaN and Infinity included), ValueError for containers nested deeper than
    MAX_JSON_DEPTH (checked before anything recurses over the value) and for integers past
    Python's digit limit. Callers catch ValueError (JSONDecodeError is one)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError as err:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from err
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)  # callers may take it as text
