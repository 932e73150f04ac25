"""The write side of `/api/v1/postbacks` and the affiliate's own resources (issue 15): create,
configure, enable/disable, delete, duplicate, history, usable offers, limits, secrets.

Every handler goes through :class:`daemon.affiliates.service.AffiliateService` with the caller's
viewer (the affiliate and the author come from the token, never from the request). Bodies are
JSON objects of at most 64 KiB, nested at most 32 deep, without duplicate keys; anything else is
a 4xx (the error style of docs/api.md: ``{"error", "field"}``) and nothing is written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from daemon.affiliates.inputs import MAX_DEPTH, known_keys
from daemon.affiliates.service import HISTORY_PAGE, AffiliateService
from daemon.api_views import parse_query, positive_int
from daemon.app import Services
from daemon.errors import InputError
from daemon.visibility import Viewer
from daemon.webhook_input import PayloadTooLarge, UnsupportedMediaType

MAX_BODY = 64 * 1024
MAX_DIGITS = 30
READ_TIMEOUT = 10.0

ApiHandler = Callable[[web.Request, Services, Viewer], Awaitable[web.StreamResponse]]
Endpoint = Callable[[ApiHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]


def add_affiliate_routes(app: web.Application, endpoint: Endpoint) -> None:
    """Register the routes; `endpoint` wraps a handler with the API's authentication and error
    answers (daemon.api)."""
    r = app.router
    r.add_post("/api/v1/postbacks", endpoint(_create))
    r.add_post("/api/v1/postbacks/duplicate", endpoint(_duplicate))
    r.add_patch("/api/v1/postbacks/{id}", endpoint(_update))
    r.add_delete("/api/v1/postbacks/{id}", endpoint(_delete))
    r.add_post("/api/v1/postbacks/{id}/status", endpoint(_status))
    r.add_get("/api/v1/postbacks/{id}/history", endpoint(_history))
    r.add_get("/api/v1/affiliate/offers", endpoint(_offers))
    r.add_get("/api/v1/affiliate/limits", endpoint(_limits))
    r.add_get("/api/v1/affiliate/secrets", endpoint(_secret_names))
    r.add_put("/api/v1/affiliate/secrets/{name}", endpoint(_set_secret))
    r.add_delete("/api/v1/affiliate/secrets/{name}", endpoint(_delete_secret))


# --- bodies ---------------------------------------------------------------------------------


def _depth(text: str) -> int:
    """The deepest nesting of a JSON text, measured before parsing (json.loads would recurse
    into a hostile nesting until RecursionError)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InputError("key given twice", key[:64])
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise InputError(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    """An integer of the body: at most MAX_DIGITS digits (int() refuses past 4,300 with a
    ValueError that was a 500, red team; no id or setting needs more than 19)."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise InputError(f"a number of more than {MAX_DIGITS} digits")
    return int(text)


async def read_body(request: web.Request) -> Mapping[str, Any]:
    """The request's JSON object; InputError (400/413/415) for anything else."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"the body is larger than {MAX_BODY // 1024} KiB")
    data = await _read_capped(request)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError("the body is not UTF-8") from err
    if _depth(text) > MAX_DEPTH:
        raise InputError(f"the body is nested deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_constant, parse_int=_integer
        )
    except ValueError as err:
        if isinstance(err, json.JSONDecodeError):
            raise InputError(f"the body is not JSON: {err.msg} at {err.pos}") from err
        raise
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    return body


async def _read_capped(request: web.Request) -> bytes:
    """The whole body, read within READ_TIMEOUT and never more than one chunk past MAX_BODY
    (StreamReader.read(n) may return less than n before the end: read until the end)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            while chunk := await request.content.read(MAX_BODY + 1 - size):
                size += len(chunk)
                if size > MAX_BODY:
                    raise PayloadTooLarge(f"the body is larger than {MAX_BODY // 1024} KiB")
                chunks.append(chunk)
    except TimeoutError as err:
        raise InputError(f"the body did not arrive within {READ_TIMEOUT:g} s") from err
    return b"".join(chunks)


def _service(services: Services) -> AffiliateService:
    assert services.affiliates is not None, "the affiliate service starts with the app"
    return services.affiliates


# --- postbacks ------------------------------------------------------------------------------


async def _create(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = await read_body(request)
    view = await _service(services).create(viewer, body)
    return web.json_response(view, status=201)


async def _update(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = await read_body(request)
    return web.json_response(
        await _service(services).update(viewer, request.match_info["id"], body)
    )


async def _status(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = known_keys(await read_body(request), ("status",))
    if "status" not in body:
        raise InputError("missing required key 'status'", "status")
    view = await _service(services).set_status(viewer, request.match_info["id"], body["status"])
    return web.json_response(view)


async def _delete(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = known_keys(await read_body(request), ("confirm",))
    pid = request.match_info["id"]
    await _service(services).delete(viewer, pid, body.get("confirm"))
    return web.json_response({"status": "deleted", "id": int(pid)})


async def _duplicate(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = known_keys(await read_body(request), ("from_offer", "to_offer", "ids"))
    for key in ("from_offer", "to_offer", "ids"):
        if key not in body:
            raise InputError(f"missing required key {key!r}", key)
    views = await _service(services).duplicate(
        viewer, body["from_offer"], body["to_offer"], body["ids"]
    )
    return web.json_response({"postbacks": views}, status=201)


async def _history(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    query = parse_query(request, ("after", "limit"))
    after = positive_int(query["after"], "after", 2**63 - 1) if "after" in query else 0
    limit = positive_int(query["limit"], "limit", HISTORY_PAGE) if "limit" in query else None
    page = await _service(services).history(
        viewer, request.match_info["id"], after, limit or HISTORY_PAGE
    )
    return web.json_response(page)


# --- the affiliate's own --------------------------------------------------------------------


async def _offers(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    return web.json_response({"offers": await _service(services).offers(viewer)})


async def _limits(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    return web.json_response(await _service(services).limits(viewer))


async def _secret_names(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    return web.json_response({"names": await _service(services).list_secret_names(viewer)})


async def _set_secret(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    body = known_keys(await read_body(request), ("value",))
    name = request.match_info["name"]
    value: Any = body.get("value")  # the service checks it is a non-empty string
    await _service(services).set_secret(viewer, name, value)
    return web.json_response({"status": "set", "name": name})


async def _delete_secret(request: web.Request, services: Services, viewer: Viewer) -> web.Response:
    parse_query(request, ())
    name = request.match_info["name"]
    await _service(services).delete_secret(viewer, name)
    return web.json_response({"status": "deleted", "name": name})
