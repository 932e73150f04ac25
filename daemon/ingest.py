"""The front door: `GET|POST /webhooks/{source}` to a committed arrival (SPEC 6).

Reading is strict and bounded (daemon.webhook_input). Parameters come from the query string and an
`application/x-www-form-urlencoded` or `application/json` object body (at most 64 KiB, read
within the read timeout), percent-decoded as strict UTF-8: every name and value is checked, a
parameter given twice must agree, JSON nests at most 8 levels. Then, in this order: the client
address (403), the body (413, 415, 408), credentials (401), the rate limit (429), the mapping
(400). The 200 goes out only after the store has durably committed the arrival and its
deliveries. Bad input never gets a 5xx: only a store that cannot commit (503) does.

aiohttp's server has no timeout for reading a request head, so :class:`GuardedRunner` adds one:
a connection must deliver a complete request head within the read timeout of opening or of its
previous request, or it is closed (slow clients cannot hold the server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from daemon import fastjson
from daemon.auth import Inbound, RateLimited, Ticket
from daemon.errors import InputError, SecretError, StoreError
from daemon.log import get_logger
from daemon.matching import match
from daemon.models import Conversion, Status, Transition, arrival_view
from daemon.pacing import Pacing
from daemon.store.base import ArrivalPlan, ArrivalResult, LeaseAhead, PlannedDelivery, Store
from daemon.supervise import Supervisor
from daemon.webhook_input import (
    READ_TIMEOUT,
    Limits,
    body_params,
    parse_urlencoded,
    read_body,
)

log = get_logger("postbackd.ingest")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_planner(
    runtime: Any, source: str, conversion: Conversion, received_at: datetime
) -> Callable[[Transition, Status | None, Conversion], ArrivalPlan]:
    """The planner the store calls inside its transaction, bound to one rules snapshot."""

    def plan(transition: Transition, previous: Status | None, effective: Conversion) -> ArrivalPlan:
        data, values = arrival_view(
            effective,
            source=source,
            transition=transition,
            previous_status=previous,
            received_at=received_at,
        )
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
    headers = dict(getattr(err, "headers", {}))
    if text:
        resp = web.Response(status=err.status, text=f"ERROR {err.message}", headers=headers)
    else:
        body = {"error": err.message, "field": err.field}
        resp = web.json_response(body, status=err.status, headers=headers)
    if err.status in (408, 413):
        resp.force_close()  # the rest of that body is not worth reading
    return resp


def _check_address(request: web.Request, source: Any) -> None:
    """The client address (403): the first check, before a byte of the body is read."""
    headers = request.headers
    relayed = "Forwarded" in headers or "X-Real-IP" in headers
    from_browser = "Origin" in headers or "Sec-Fetch-Site" in headers or "Sec-Fetch-Mode" in headers
    source.gate.access.check(
        request.remote, headers.getall("X-Forwarded-For", ()), relayed, from_browser
    )


def _admit(
    request: web.Request, source: Any, body: bytes, now: Callable[[], float]
) -> tuple[Conversion, Ticket | None]:
    """Credentials, rate, mapping (the address and the body were checked before): the
    conversion, or an InputError."""
    gate = source.gate
    query: dict[str, str] = {}
    parse_urlencoded(request.rel_url.raw_query_string, query)
    # Without credentials or a rate limit, Gate.authenticate and Gate.throttle do nothing: the
    # Inbound and the clock readings they would take are skipped.
    ticket = None
    if gate.credentials is not None:
        ticket = gate.authenticate(Inbound(request.headers, query, body), now())
    if gate.rate_limit is not None:
        try:
            gate.throttle(source.name, now())
        except RateLimited:
            if ticket is not None:
                ticket.release()  # told to retry: the same message must then be accepted
            raise
    # A refusal from here on keeps the ticket: the message is refused for what it says, and
    # the same webhook-id must not come back with anything changed (issue 13).
    body_params(request, body, query)
    return source.to_conversion(query), ticket


async def ingest(
    request: web.Request,
    *,
    runtime: Any,
    store: Store,
    now: Callable[[], float],
    on_committed: Callable[[str, ArrivalResult, LeaseAhead | None], None],
    limits: Limits | None = None,
    lease_ahead: Callable[[], LeaseAhead | None] | None = None,
    pacing: Pacing | None = None,
) -> web.Response:
    """Handle one webhook end to end."""
    name = request.match_info["source"]
    source = runtime.sources.get(name)
    if source is None:
        return web.json_response({"error": "unknown source", "field": None}, status=404)
    text = source.response == "text"
    try:
        # Address (403), body (413, 415, 408), credentials (401), rate (429), mapping (400), in
        # this order; a GET has no body to read (no coroutine made for it).
        _check_address(request, source)
        body = await read_body(request, limits or Limits()) if request.method == "POST" else b""
        conversion, ticket = _admit(request, source, body, now)
    except InputError as err:
        log.info(
            "conversion_rejected",
            source=name,
            http_status=err.status,
            error=err.message,
            field=err.field,
        )
        return error_response(err, text)
    except SecretError as err:
        log.error("source_secret_unavailable", source=name, error=str(err))
        return _unavailable("credentials cannot be checked now, retry later", text)
    received_at = datetime.fromtimestamp(now(), UTC)
    planner = make_planner(runtime, name, conversion, received_at)
    paced = False
    try:
        # Delivery behind on a saturated loop: this arrival waits for its turn (daemon.pacing;
        # cancelled meanwhile, its ticket is released below as for a failed write).
        paced = pacing is not None and await pacing.admit()
        # The dispatcher's offer to take the deliveries as they are written (no claim), if any.
        lease = lease_ahead() if lease_ahead is not None else None
        result = await store.record_arrival(name, conversion, received_at, planner, lease)
    except BaseException as err:
        if ticket is not None:
            ticket.release()  # the sender's retry of this message must not look like a replay
        if paced and pacing is not None:
            pacing.settle(0)  # nothing planned: its turn goes on
        if not isinstance(err, StoreError):
            raise
        # One line per refused request, at info: the outage itself is logged once, when the
        # store starts failing and when it recovers (store_failing / store_recovered).
        log.info(
            "conversion_rejected",
            source=name,
            conversion_id=conversion.conversion_id,
            http_status=503,
            error="store unavailable",
        )
        return _unavailable("store unavailable, retry later", text)
    on_committed(name, result, lease)
    if paced and pacing is not None:
        pacing.settle(len(result.delivery_ids))
    _log_received(conversion, name, result, runtime)
    if text:
        return web.Response(text="OK")
    return web.json_response(
        {
            "status": "accepted",
            "conversion_id": conversion.conversion_id,
            "transition": result.transition._value_,  # .value without its descriptor
            "deliveries": len(result.delivery_ids),
        },
        dumps=fastjson.dumps,  # the one answer per conversion: orjson (docs/benchmarks.md)
    )


def _unavailable(message: str, text: bool) -> web.Response:
    if text:
        return web.Response(status=503, text=f"ERROR {message}")
    return web.json_response({"error": message, "field": None}, status=503)


class _VersionText:
    """`str(version)` of the running rules, made once per rule set rather than per conversion
    (RulesVersion.__str__ slices and formats). RulesVersion is frozen, and the one kept is
    referenced here, so the same object always has the same text."""

    def __init__(self) -> None:
        self._last: tuple[object, str] = (None, "")  # one attribute: read and written whole

    def __call__(self, version: object) -> str:
        known, text = self._last
        if version is not known:
            text = str(version)
            self._last = (version, text)
        return text


_version_text = _VersionText()


def _log_received(conversion: Conversion, source: str, result: ArrivalResult, runtime: Any) -> None:
    fields: Mapping[str, str] = conversion.fields
    log.info(
        "conversion_received",
        source=source,
        conversion_id=conversion.conversion_id,
        offer=conversion.offer,
        affiliate=conversion.affiliate,
        status=conversion.status._value_,  # ._value_: .value without its descriptor
        transition=result.transition._value_,
        previous_status=result.previous_status._value_ if result.previous_status else None,
        deliveries=len(result.delivery_ids),
        rules_version=_version_text(runtime.rules.version),
        email=fields.get("email"),
        phone=fields.get("phone"),
        ip=fields.get("ip"),
    )


class HeadTimeout:
    """Closes connections that run no request for `timeout` seconds: a client must deliver a
    complete request head within that time of connecting or of its previous request (a
    trickled head never completes; an idle keep-alive connection is let go)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4)
        self.closed = 0
        self._busy: dict[RequestHandler, int] = {}
        self._idle_since: dict[RequestHandler, float] = {}

    def track(self, handler: Handler) -> Handler:
        """Wrap the server's request handler so that a connection running a request is busy."""

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            conn = request.protocol
            self._busy[conn] = self._busy.get(conn, 0) + 1
            try:
                return await handler(request)
            finally:
                left = self._busy.pop(conn, 1) - 1
                if left:
                    self._busy[conn] = left
                self._idle_since[conn] = asyncio.get_running_loop().time()

        return tracked

    def sweep(self, connections: Iterable[RequestHandler], now: float) -> int:
        """Close the idle connections past their deadline; how many were closed."""
        live = set(connections)
        for conn in [c for c in self._idle_since if c not in live]:
            del self._idle_since[conn]
        closed = 0
        for conn in live - self._busy.keys():
            since = self._idle_since.setdefault(conn, now)
            if now - since >= self.timeout:
                conn.force_close()
                del self._idle_since[conn]
                closed += 1
        return closed

    async def sweep_now(self, server: web.Server) -> None:
        """One sweep of `server`'s connections (a step of the supervised loop)."""
        self.closed += self.sweep(server.connections, asyncio.get_running_loop().time())


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections must send each request head within `read_timeout`."""

    def __init__(self, app: web.Application, *, read_timeout: float = READ_TIMEOUT, **kw: Any):
        super().__init__(app, **kw)
        self.guard = HeadTimeout(read_timeout)
        self.loops = Supervisor()  # the sweep runs under daemon.supervise's rule

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None
        server.request_handler = self.guard.track(server.request_handler)
        interval = self.guard.interval
        self.loops.every(
            "head-timeout", lambda: self.guard.sweep_now(server), interval, interval=30.0
        )

    async def cleanup(self) -> None:
        await self.loops.stop()
        await super().cleanup()
