"""Console pages of the store: deliveries (filters, keyset pages), one delivery with every
attempt and Retry, a conversion's arrivals and the deliveries each fired, and Health."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from daemon.api import API
from daemon.api_views import attempt_view, checked_cursor, rules_status_view
from daemon.app import Services, loop_details
from daemon.dispatchproc import DispatcherLink
from daemon.errors import ConflictError, InputError, StoreError
from daemon.log import get_logger
from daemon.store.base import DeliveryFilter, DeliveryRow, DeliveryState
from daemon.store.common import decode_cursor, encode_cursor
from daemon.supervise import describe
from daemon.ui.base import Ctx, PageNotFound, page, params, query, redirect
from daemon.ui.ops import action_types, masked_fields
from daemon.ui.views import PostbackIndex, parse_time, postback_id

log = get_logger("postbackd.ui")

PAGE_SIZE = 50
DEFAULT_WINDOW = timedelta(days=1)  # see delivery_filter
MAX_IDS = 2_000  # postback ids sent to the store in one filter at most (see delivery_filter)
SCAN_BATCH = 200
SCAN_LIMIT = 2_000  # rows read for one page of an action's deliveries
WALK_BUDGET = 0.05  # seconds of windows read for one page of a narrow all-time list
MAX_SPAN = timedelta(days=4)  # the widest window (a window is read whole once started)
HORIZON_SLACK = timedelta(days=30)  # deliveries outlive retention while still pending
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_RETRYABLE = (DeliveryState.DEAD, DeliveryState.CANCELLED)
_FILTERS = ("offer", "affiliate", "postback", "action", "state", "since", "until")


def add_routes(console: web.Application) -> None:
    """On the console's own app, mounted at /ui (daemon.ui): the paths are under it."""
    console.router.add_get("/deliveries", page(deliveries))
    console.router.add_get("/deliveries/{id}", page(delivery))
    console.router.add_post("/deliveries/{id}/retry", page(retry, admin=True))
    console.router.add_get("/conversions", page(conversions, admin=True))
    console.router.add_get("/health", page(health, admin=True))


# --- deliveries ----------------------------------------------------------------------------


def postback_index(ctx: Ctx) -> PostbackIndex:
    """Postback ids by action and by affiliate, built once per rule set (a pass over 100,000
    postbacks costs a few hundred ms; a filter then costs nothing)."""
    rules = ctx.services.reloader.runtime.rules
    return ctx.ui.per_rules("index", rules, lambda: PostbackIndex.of(rules))


def delivery_filter(ctx: Ctx, q: dict[str, str]) -> tuple[DeliveryFilter, str | None, str | None]:
    """The store filter of the page's query, within what the viewer may see, the cursor the
    page starts from (the `until` bound is a starting cursor: newest first), and the action
    that rows must have when the filter could not say it with postback ids."""
    rules = ctx.services.reloader.runtime.rules
    ids: frozenset[int] | None = ctx.request.config_dict[API].visible_ids(rules, ctx.viewer)

    def narrow(keep: frozenset[int]) -> None:
        nonlocal ids
        ids = keep if ids is None else ids & keep

    if "postback" in q:
        pid = postback_id(q["postback"].strip())
        if pid is None:
            raise InputError("postback must be a postback id", "postback")
        narrow(frozenset({pid}))
    if "offer" in q:
        narrow(frozenset(lp.id for lp in rules.offers.get(q["offer"].strip(), ())))
    if "affiliate" in q:
        narrow(postback_index(ctx).by_affiliate.get(q["affiliate"].strip(), frozenset()))
    by_row = None
    if "action" in q:
        if q["action"] not in action_types():
            raise InputError("unknown action type", "action")
        keep = postback_index(ctx).by_action.get(q["action"], frozenset())
        if ids is None and len(keep) > MAX_IDS:
            by_row = q["action"]  # too many ids to send: read pages and keep that action's rows
        else:
            narrow(keep)
    state = None
    if "state" in q:
        try:
            state = DeliveryState(q["state"])
        except ValueError as err:
            raise InputError("unknown delivery state", "state") from err
    since = parse_time(q["since"], "since") if "since" in q else None
    if since is None and ids is not None and "since" not in ctx.request.query:
        # A narrow list (some postbacks) walks the store's newest-first index until it finds a
        # page; bounded to a recent window unless the viewer asks for more (an empty From).
        since = ctx.now - DEFAULT_WINDOW
        q["since"] = since.strftime("%Y-%m-%dT%H:%M")
    cursor = checked_cursor(q.get("cursor"))
    if cursor is None and "until" in q:
        cursor = encode_cursor(parse_time(q["until"], "until"), "0")  # created before `until`
    return DeliveryFilter(state=state, postback_ids=ids, since=since), cursor, by_row


async def _walk_back(
    ctx: Ctx, flt: DeliveryFilter, cursor: str | None
) -> tuple[list[DeliveryRow], str | None, datetime | None]:
    """A page of a narrow list over all time (or from a From older than MAX_SPAN, then the
    floor), read in windows going back (1 day, then 2, up to MAX_SPAN) so that each read
    walks only its window of the store's index. Stops when the page is full, at the retention
    horizon (or the From), or after WALK_BUDGET seconds: then the page may be short, and
    Older goes on from the last window (returned as the time searched back to)."""
    now = ctx.now
    horizon = now - timedelta(seconds=ctx.services.settings.retention) - HORIZON_SLACK
    if flt.since is not None:  # a From far back is a floor of the walk, not one long read
        horizon = max(horizon, flt.since)
    # A cursor in the far future (an `until` of year 8000) starts from tomorrow: no walk
    # through millennia of empty windows.
    tomorrow = now + timedelta(days=1)
    upper = min(decode_cursor(cursor)[0], tomorrow) if cursor else tomorrow
    rows: list[DeliveryRow] = []
    span = timedelta(days=1)
    started = time.monotonic()
    while True:
        lower = max(upper - span, horizon)
        window = replace(flt, since=lower)
        page, more = await ctx.services.store.list_deliveries(window, PAGE_SIZE - len(rows), cursor)
        rows += page
        if more is not None or len(rows) >= PAGE_SIZE:  # the page is full
            last = rows[-1]
            return rows, encode_cursor(last.created_at, last.delivery_id), None
        if lower <= horizon:
            return rows, None, None
        upper, cursor, span = lower, encode_cursor(lower, "0"), min(span * 2, MAX_SPAN)
        if time.monotonic() - started > WALK_BUDGET:
            return rows, cursor, lower


async def _page_of_action(
    ctx: Ctx, flt: DeliveryFilter, cursor: str | None, action: str
) -> tuple[list[DeliveryRow], str | None]:
    """Up to a page of `action`'s deliveries, reading at most SCAN_LIMIT rows: a rare action
    gives a short page whose Older link goes on from the last row read."""
    rows: list[DeliveryRow] = []
    read = 0
    while read < SCAN_LIMIT:
        batch, after = await ctx.services.store.list_deliveries(flt, SCAN_BATCH, cursor)
        for row in batch:
            read += 1
            cursor = encode_cursor(row.created_at, row.delivery_id)
            if row.action == action:
                rows.append(row)
                if len(rows) == PAGE_SIZE:
                    return rows, cursor
        if after is None:
            return rows, None
    return rows, cursor


async def deliveries(ctx: Ctx) -> web.Response:
    q = query(ctx.request, (*_FILTERS, "cursor"))
    flt, cursor, action = delivery_filter(ctx, q)
    rows: list[DeliveryRow] = []
    next_cursor = None
    searched_to = None
    if action is not None:
        rows, next_cursor = await _page_of_action(ctx, flt, cursor, action)
    elif flt.postback_ids is not None and (flt.since is None or flt.since < ctx.now - MAX_SPAN):
        if flt.postback_ids:
            rows, next_cursor, searched_to = await _walk_back(ctx, flt, cursor)
    elif flt.postback_ids is None or flt.postback_ids:
        rows, next_cursor = await ctx.services.store.list_deliveries(flt, PAGE_SIZE, cursor)
    filters = {k: q.get(k, "") for k in _FILTERS}
    # An empty From means "all time" (not the default window): links keep it empty.
    all_time = "&since=" if ctx.request.query.get("since") == "" else ""
    return ctx.render(
        "deliveries.html",
        rows=rows,
        filters=filters,
        states=[s.value for s in DeliveryState],
        actions=action_types(),
        next_link=f"?{params({**filters, 'cursor': next_cursor})}{all_time}"
        if next_cursor
        else None,
        windowed=flt.postback_ids is not None and "since" not in ctx.request.query,
        searched_to=searched_to,
        first_link=f"?{params(filters)}{all_time}" if cursor else None,
    )


async def visible_delivery(ctx: Ctx) -> Any:
    """The delivery of the URL if the viewer may see it; the 404 page otherwise."""
    delivery_id = ctx.request.match_info["id"]
    detail = None
    if _DELIVERY_ID.match(delivery_id):
        detail = await ctx.services.store.get_delivery(delivery_id)
    if detail is not None:
        rules = ctx.services.reloader.runtime.rules
        ids = ctx.request.config_dict[API].visible_ids(rules, ctx.viewer)
        if ids is None or detail.delivery.postback_id in ids:
            return detail
    raise PageNotFound()


async def delivery(ctx: Ctx) -> web.Response:
    detail = await visible_delivery(ctx)
    row = detail.delivery
    return ctx.render(
        "delivery.html",
        row=row,
        attempts=[attempt_view(a) for a in reversed(detail.attempts)],
        retryable=row.state in _RETRYABLE and ctx.viewer.is_admin,
        notice=ctx.request.query.get("notice") == "queued",
    )


async def retry(ctx: Ctx) -> web.Response:
    detail = await visible_delivery(ctx)
    row = detail.delivery
    if row.state not in _RETRYABLE:
        raise ConflictError(
            f"delivery {row.delivery_id} is {row.state.value}: only dead or "
            "cancelled deliveries can be retried"
        )
    now = ctx.now
    if await ctx.services.store.requeue([row.delivery_id], now) == 0:
        raise ConflictError(f"delivery {row.delivery_id} changed state meanwhile")
    ctx.services.wake_dispatcher()
    log.info("delivery_requeued", delivery_id=row.delivery_id, postback_id=row.postback_id)
    return redirect(f"/ui/deliveries/{row.delivery_id}?notice=queued")


# --- conversions ---------------------------------------------------------------------------


async def conversions(ctx: Ctx) -> web.Response:
    q = query(ctx.request, ("source", "id"))
    source, cid = q.get("source", "generic").strip(), q.get("id", "").strip()
    found = None
    fired: dict[int, list[DeliveryRow]] = {}
    if cid:
        found = await ctx.services.store.get_conversion(source, cid)
        if found is not None:
            flt = DeliveryFilter(conversion_id=cid)
            rows, _ = await ctx.services.store.list_deliveries(flt, 1000, None)
            for row in sorted(rows, key=lambda r: (r.arrival_seq, r.created_at)):
                if row.source == source:
                    fired.setdefault(row.arrival_seq, []).append(row)
    return ctx.render(
        "conversions.html",
        source=source,
        cid=cid,
        found=found,
        fields=masked_fields(found.fields) if found is not None else {},
        fired=fired,
    )


# --- health --------------------------------------------------------------------------------


async def health(ctx: Ctx) -> web.Response:
    services = ctx.services
    status = rules_status_view(services.reloader)
    store: dict[str, Any] = {"ok": True, "error": None, "depth": {}, "lag": None}
    try:
        await services.store.ping()
        depth = await services.metrics.depth.read(services.store)
        store["depth"] = {state.value: depth.get(state, 0) for state in DeliveryState}
        store["lag"] = round(await services.store.delivery_lag(ctx.now), 1)
    except StoreError as err:
        store = {"ok": False, "error": describe(err), "depth": {}, "lag": None}
    loops = _loops(services)
    if services.link is not None:
        loops += await _dispatch_process_loops(services.link)
    return ctx.render(
        "health.html",
        rules=status,
        store=store,
        loops=loops,
        node=services.node,
    )


async def _dispatch_process_loops(link: DispatcherLink) -> list[dict[str, Any]]:
    """The loops of the dispatch process (`dispatcher_process: true`), as rows of this page;
    one "unreachable" row when it does not answer (its dispatcher's state is not known)."""
    remote, problem = await link.state()
    if remote is None:
        return [
            {
                "name": "dispatch process",
                "state": "unreachable",
                "last_progress": "-",
                "failures": "-",
                "error": problem,
            }
        ]
    return [_loop_row(loop, " (dispatch process)") for loop in remote.get("loop_details") or []]


def _loops(services: Services) -> list[dict[str, Any]]:
    """Every supervised background loop: its state, failures in a row and last error."""
    return [_loop_row(loop) for loop in loop_details(services)]


def _loop_row(loop: Mapping[str, Any], suffix: str = "") -> dict[str, Any]:
    """One loop of daemon.app.loop_details as a row of the health page."""
    since = loop.get("since_progress")
    return {
        "name": f"{loop.get('name')}{suffix}",
        "state": loop.get("state"),
        "last_progress": "-" if since is None else f"{since:.1f} s ago",
        "failures": loop.get("failures"),
        "error": loop.get("error"),
    }
