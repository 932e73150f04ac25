"""The front door: `GET|POST /webhooks/{source}` to a committed arrival (SPEC 6).

Reading is strict and bounded: query string, form or JSON object bodies only, every value a
string of at most 1,024 characters, a parameter given twice must agree, JSON no deeper than 8.
The 200 goes out only after the store has durably committed the arrival and its deliveries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from multidict import MultiMapping

from daemon.errors import InputError, StoreError
from daemon.matching import match
from daemon.models import (
    Conversion,
    Status,
    Transition,
    macro_values,
    rule_data,
)
from daemon.store.base import ArrivalPlan, ArrivalResult, PlannedDelivery, Store

log = structlog.get_logger("postbackd.ingest")

MAX_BODY = 64 * 1024
MAX_PARAMS = 200
MAX_JSON_DEPTH = 8
BODY_TIMEOUT = 10.0


class PayloadTooLarge(InputError):
    status = 413


class UnsupportedMediaType(InputError):
    status = 415


def _add(params: dict[str, str], name: str, value: str) -> None:
    if len(params) >= MAX_PARAMS and name not in params:
        raise InputError(f"more than {MAX_PARAMS} parameters")
    if name in params and params[name] != value:
        raise InputError("parameter given twice with different values", name)
    params[name] = value


def _from_multi(params: dict[str, str], items: MultiMapping[str]) -> None:
    for name, value in items.items():
        _add(params, name, value)


def _reject_constant(text: str) -> Any:
    raise InputError(f"{text} is not a number")


def _flatten(params: dict[str, str], value: Any, prefix: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", prefix or None)
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(params, item, f"{prefix}.{key}" if prefix else str(key), depth + 1)
    elif isinstance(value, list):
        if depth + 1 > MAX_JSON_DEPTH:
            raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", prefix)
        _check_depth(value, depth + 1)
        _add(params, prefix, json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    elif value is None:
        _add(params, prefix, "")
    elif isinstance(value, bool):
        _add(params, prefix, "true" if value else "false")
    else:
        _add(params, prefix, str(value))


def _check_depth(value: Any, depth: int) -> None:
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))


def _parse_json(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=str, parse_int=str)
    except UnicodeDecodeError as err:
        raise InputError("body is not valid UTF-8") from err
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg} at line {err.lineno}") from err
    except RecursionError as err:
        raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from err
    if not isinstance(value, dict):
        raise InputError("a JSON body must be an object")
    _check_depth(value, 1)
    params: dict[str, str] = {}
    _flatten(params, value, "", 0)
    return params


async def read_params(request: web.Request) -> dict[str, str]:
    """Every inbound parameter of the request as name -> string; InputError when malformed."""
    params: dict[str, str] = {}
    _from_multi(params, request.query)
    if request.method != "POST":
        return params
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"body over {MAX_BODY // 1024} KiB")
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("compressed bodies are not accepted")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await request.content.read(MAX_BODY + 1)
    except TimeoutError as err:
        raise InputError("body not received in time") from err
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"body over {MAX_BODY // 1024} KiB")
    if not body:
        return params
    ctype = request.content_type
    if ctype == "application/json":
        for name, value in _parse_json(body).items():
            _add(params, name, value)
    elif ctype == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        try:
            pairs = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=MAX_PARAMS,
                errors="strict",
            )
        except (UnicodeDecodeError, ValueError) as err:
            raise InputError(f"malformed form body: {err}") from err
        for name, value in pairs:
            _add(params, name, value)
    else:
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not accepted; "
            "send application/json or application/x-www-form-urlencoded"
        )
    return params


def make_planner(
    runtime: Any, source: str, conversion: Conversion, received_at: datetime
) -> Callable[[Transition, Status | None, Conversion], ArrivalPlan]:
    """The planner the store calls inside its transaction, bound to one rules snapshot."""

    def plan(transition: Transition, previous: Status | None, effective: Conversion) -> ArrivalPlan:
        data = rule_data(
            effective,
            source=source,
            transition=transition,
            previous_status=previous,
            received_at=received_at,
        )
        values = macro_values(data, effective)
        if transition not in (Transition.NEW, Transition.STATUS_CHANGED):
            return ArrivalPlan(data, values, [])
        deliveries = [
            PlannedDelivery(
                lp.id,
                lp.postback.action.type,
                runtime.actions[lp.id].destination,
                lp.postback.owner_affiliate,
            )
            for lp in match(runtime.rules, effective, data)
        ]
        return ArrivalPlan(data, values, deliveries)

    return plan


def error_response(err: InputError, text: bool = False) -> web.Response:
    if text:
        return web.Response(status=err.status, text=f"ERROR {err.message}\n")
    body: dict[str, Any] = {"error": err.message, "field": err.field}
    return web.json_response(body, status=err.status)


async def ingest(
    request: web.Request,
    *,
    runtime: Any,
    store: Store,
    now: Callable[[], float],
    on_committed: Callable[[str, ArrivalResult], None],
) -> web.Response:
    """Handle one webhook end to end."""
    name = request.match_info["source"]
    source = runtime.sources.get(name)
    if source is None:
        return web.json_response({"error": f"unknown source {name!r}", "field": None}, status=404)
    text = source.response == "text"
    try:
        params = await read_params(request)
        authenticate = getattr(source, "authenticate", None)
        if authenticate is not None:
            authenticate(request, params)
        conversion = source.to_conversion(params)
    except InputError as err:
        log.info(
            "conversion_rejected",
            source=name,
            http_status=err.status,
            error=err.message,
            field=err.field,
        )
        return error_response(err, text)
    received_at = datetime.fromtimestamp(now(), UTC)
    planner = make_planner(runtime, name, conversion, received_at)
    try:
        result = await store.record_arrival(name, conversion, received_at, planner)
    except StoreError as err:
        log.error(
            "store_error", source=name, conversion_id=conversion.conversion_id, error=str(err)
        )
        return web.json_response(
            {"error": "store unavailable, retry later", "field": None}, status=503
        )
    on_committed(name, result)
    _log_received(
        conversion,
        name,
        result.transition,
        result.previous_status,
        len(result.delivery_ids),
        runtime,
    )
    if text:
        return web.Response(text="OK\n")
    return web.json_response(
        {
            "status": "accepted",
            "conversion_id": conversion.conversion_id,
            "transition": result.transition.value,
            "deliveries": len(result.delivery_ids),
        }
    )


def _log_received(
    conversion: Conversion,
    source: str,
    transition: Transition,
    previous: Status | None,
    deliveries: int,
    runtime: Any,
) -> None:
    fields: Mapping[str, str] = conversion.fields
    log.info(
        "conversion_received",
        source=source,
        conversion_id=conversion.conversion_id,
        offer=conversion.offer,
        affiliate=conversion.affiliate,
        status=conversion.status.value,
        transition=transition.value,
        previous_status=previous.value if previous else None,
        deliveries=deliveries,
        rules_version=str(runtime.rules.version),
        email=fields.get("email"),
        phone=fields.get("phone"),
        ip=fields.get("ip"),
    )
