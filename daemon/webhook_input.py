"""Reading a webhook's parameters, strictly and within limits (SPEC 6).

Parameters come from the query string and an `application/x-www-form-urlencoded` or
`application/json` object body (at most 64 KiB, read within the read timeout), percent-decoded
as strict UTF-8: every name and value is checked, a parameter given twice must agree, JSON nests
at most 8 levels. Every refusal is an InputError carrying its HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from daemon.errors import InputError
from daemon.models import MAX_VALUE_LENGTH, check_value

MAX_BODY = 64 * 1024
MAX_PARAMS = 200
MAX_NAME = 128
MAX_JSON_DEPTH = 8
READ_TIMEOUT = 10.0
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


class PayloadTooLarge(InputError):
    status = 413


class UnsupportedMediaType(InputError):
    status = 415


class RequestTimeout(InputError):
    status = 408


@dataclass(frozen=True)
class Limits:
    read_timeout: float = READ_TIMEOUT  # for the body; GuardedRunner bounds the head
    max_body: int = MAX_BODY


def _safe(name: str) -> str:
    """A parameter name fit for an error body or a log line (escaped, cut)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name[:64])


def _add(params: dict[str, str], name: str, value: str) -> None:
    if not name:
        raise InputError("a parameter has an empty name")
    if len(name) > MAX_NAME:
        raise InputError(f"parameter name longer than {MAX_NAME} characters", _safe(name))
    try:
        check_value("", name)
    except InputError as err:
        raise InputError(
            f"parameter name {err.message.removeprefix('value ')}", _safe(name)
        ) from err
    try:
        check_value("", value)
    except InputError as err:  # the name escaped only for an error, not for every parameter
        raise InputError(err.message, _safe(name)) from err
    if name in params:
        if params[name] != value:
            raise InputError("parameter given twice with different values", _safe(name))
        return
    if len(params) >= MAX_PARAMS:
        raise InputError(f"more than {MAX_PARAMS} parameters")
    params[name] = value


def _unquote(text: str, name: str | None) -> str:
    """`text` percent- and plus-decoded; an error names the parameter `name` (None: the name
    itself is being decoded)."""
    if "%" not in text and "+" not in text:
        return text  # what unquote_plus returns for it, without the call
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError as err:
        field = None if name is None else _safe(name)  # made only for the error
        raise InputError("not valid UTF-8 (or a lone surrogate)", field) from err


# A query every part of which is `name=value` in printable ASCII without `%`, `+`, `&` or a
# second `=`, the name of 1 to MAX_NAME characters and the value of at most MAX_VALUE_LENGTH:
# each part decodes to itself and passes every check of _add (what trackers send). Matched
# as a whole, such a text needs no work per parameter but the dict's (parse_urlencoded).
_NAME = rf"[!-$'-*,-<>-~ ]{{1,{MAX_NAME}}}+"  # printable ASCII but % & + =
_VALUE = rf"[!-$'-*,-<>-~ ]{{0,{MAX_VALUE_LENGTH}}}+"
_PLAIN_QUERY = re.compile(rf"{_NAME}={_VALUE}(?:&{_NAME}={_VALUE})*+")


def parse_urlencoded(text: str, params: dict[str, str]) -> None:
    """`a=1&b=2` into `params`, strictly: invalid UTF-8 after percent-decoding is an error."""
    if not params and _PLAIN_QUERY.fullmatch(text) is not None:
        # names and values alternate between the separators (each part has one `=`)
        found = text.replace("&", "=").split("=")
        pairs = iter(found)
        params.update(zip(pairs, pairs, strict=True))
        if 2 * len(params) == len(found) and len(params) <= MAX_PARAMS:
            return
        params.clear()  # a name given twice, or too many: the walk below decides
    # A text without `%` or `+` decodes to itself, part by part (_unquote's own shortcut,
    # decided once for the whole text).
    plain = "%" not in text and "+" not in text
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            if not plain:
                name = _unquote(name, None)
                value = _unquote(value, name)
            # _add's common case decided here, without its calls: a new parameter with a
            # short printable name and value passes every check of _add and check_value
            # (isprintable() is false for every control character and lone surrogate); any
            # other goes through _add, which refuses it as before.
            if (
                name
                and len(name) <= MAX_NAME
                and len(value) <= MAX_VALUE_LENGTH
                and name.isprintable()
                and value.isprintable()
                and name not in params
                and len(params) < MAX_PARAMS
            ):
                params[name] = value
            else:
                _add(params, name, value)


class _Object(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs, so that a repeated key is seen, not overwritten."""


class _Number(str):
    """A JSON number as the text it was written in (`1e999` must not become `inf`)."""


def _text(value: Any) -> str:
    """A JSON value as compact JSON text; numbers exactly as they were written."""
    if isinstance(value, _Object):
        return "{" + ",".join(f"{_text(k)}:{_text(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, _Number):
        return str.__str__(value)
    return json.dumps(value, ensure_ascii=False)


def _reject_constant(text: str) -> Any:
    raise InputError(f"{text} is not a number")


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            return True
        children = (v for _, v in item) if isinstance(item, _Object) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, list))
    return False


def _flatten(params: dict[str, str], value: Any, prefix: str) -> None:
    """Objects become dotted names (`a.b`), arrays their JSON text, scalars their text."""
    if isinstance(value, _Object):
        for key, item in value:
            _flatten(params, item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        _add(params, prefix, _text(value))
    elif value is None:
        _add(params, prefix, "")
    elif isinstance(value, bool):
        _add(params, prefix, "true" if value else "false")
    else:
        _add(params, prefix, str.__str__(value))


def parse_json(body: bytes, params: dict[str, str]) -> None:
    """A JSON object body into `params` (numbers keep their text: `1e999` stays `1e999`)."""
    try:
        value = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_Object,
            parse_constant=_reject_constant,
            parse_float=_Number,
            parse_int=_Number,
        )
    except UnicodeDecodeError as err:
        raise InputError("body is not valid UTF-8") from err
    except json.JSONDecodeError as err:
        raise InputError(
            f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except RecursionError as err:
        raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from err
    if not isinstance(value, _Object):
        raise InputError("a JSON body must be an object")
    if _too_deep(value):
        raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    _flatten(params, value, "")


def _check_content(request: web.BaseRequest, limits: Limits) -> bool:
    """Whether a body is to be read; 413 or 415 before a byte of it is."""
    if request.content_length == 0:
        return False
    if request.content_length is not None and request.content_length > limits.max_body:
        raise PayloadTooLarge(f"body over {limits.max_body // 1024} KiB")
    if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType("compressed bodies are not accepted")
    if request.content_type not in (JSON, FORM):
        raise UnsupportedMediaType(
            f"content type {request.content_type[:100]!r} is not accepted; send {JSON} or {FORM}"
        )
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("only UTF-8 bodies are accepted")
    return True


async def read_body(request: web.BaseRequest, limits: Limits) -> bytes:
    """The raw body of a POST (GET bodies are ignored), bounded in size and time."""
    if request.method != "POST" or not _check_content(request, limits):
        return b""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.read_timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limits.max_body:
                    raise PayloadTooLarge(f"body over {limits.max_body // 1024} KiB")
                chunks.append(chunk)
    except TimeoutError as err:
        raise RequestTimeout(f"body not received within {limits.read_timeout:g} s") from err
    except RequestPayloadError as err:
        raise InputError("malformed request body") from err
    return b"".join(chunks)


def body_params(request: web.BaseRequest, body: bytes, params: dict[str, str]) -> None:
    if not body:
        return
    if request.content_type == JSON:
        parse_json(body, params)
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError("body is not valid UTF-8") from err
    parse_urlencoded(text, params)
