"""Console pages of the rules: offers, an offer's postback table, one postback (settings masked,
recent deliveries, success rate), explain against a pasted or stored conversion, send-test."""

from __future__ import annotations

import bisect
import json
from datetime import timedelta
from typing import Any

from aiohttp import web

from daemon.actions import BUILDERS
from daemon.api import API
from daemon.catalogue import load_catalogue
from daemon.errors import InputError, RulesError
from daemon.explain import evaluate
from daemon.loader import LoadedPostback, RuleSet
from daemon.log import mask
from daemon.models import PII_FIELDS, Conversion, Status, Trigger, conversion_from_mapping
from daemon.sendtest import sample_conversion, send_once
from daemon.store.base import DeliveryFilter
from daemon.ui.action_form import json_input
from daemon.ui.base import Ctx, PageNotFound, field_message, page, params, query
from daemon.ui.views import (
    PAGE_SIZE,
    TABLE_COLUMNS,
    OfferSummary,
    PostbackFilter,
    is_store,
    label,
    offer_summaries,
    page_of,
    postback_id,
    pretty,
    success_rate,
    table_row,
)
from daemon.visibility import visible_to

NOTICES = {
    "created": "Postback created.",
    "updated": "Postback saved.",
    "active": "Postback enabled.",
    "disabled": "Postback disabled.",
    "deleted": "Postback deleted.",
    "duplicated": "Postbacks copied to this offer.",
}
RECENT_WINDOW = timedelta(days=1)  # bounds the newest-first walk of the store's index
RECENT = 100  # deliveries read for a postback's page and its success rate
SHOWN = 20


def add_routes(console: web.Application) -> None:
    """On the console's own app, mounted at /ui (daemon.ui): the paths are under it."""
    console.router.add_get("/offers", page(offers))
    console.router.add_get("/offers/{offer}", page(offer_postbacks))
    console.router.add_get("/postbacks/{id}", page(postback))
    console.router.add_post("/postbacks/{id}/explain", page(explain, admin=True))
    console.router.add_get("/postbacks/{id}/send-test", page(send_test_form, admin=True))
    console.router.add_post("/postbacks/{id}/send-test", page(send_test, admin=True))


def action_types() -> tuple[str, ...]:
    return tuple(sorted(BUILDERS))


# --- offers ----------------------------------------------------------------------------------


def _all_summaries(ctx: Ctx, rules: RuleSet) -> tuple[list[OfferSummary], list[tuple[int, str]]]:
    """Every offer's counts, computed once per rule set (100,000 postbacks: one pass)."""
    return ctx.ui.per_rules("offers", rules, lambda: _with_keys(offer_summaries(rules.offers)))


def _with_keys(
    summaries: list[OfferSummary],
) -> tuple[list[OfferSummary], list[tuple[int, str]]]:
    """The summaries and their sort keys, for finding where a page starts (bisect)."""
    return summaries, [(len(s.offer), s.offer) for s in summaries]


def visible_postbacks(ctx: Ctx) -> dict[int, LoadedPostback] | None:
    """The postbacks this viewer may see (None: all of them, an admin)."""
    rules = ctx.services.reloader.runtime.rules
    ids = ctx.request.config_dict[API].visible_ids(rules, ctx.viewer)
    if ids is None:
        return None
    return {pid: rules.postbacks[pid] for pid in ids if pid in rules.postbacks}


async def offers(ctx: Ctx) -> web.Response:
    q = query(ctx.request, ("after",))
    rules = ctx.services.reloader.runtime.rules
    mine = visible_postbacks(ctx)
    if mine is None:
        summaries, keys = _all_summaries(ctx, rules)
    else:
        grouped: dict[str, list[LoadedPostback]] = {}
        for lp in sorted(mine.values(), key=lambda lp: lp.id):
            grouped.setdefault(lp.offer, []).append(lp)
        summaries, keys = _with_keys(offer_summaries(grouped))
    start = bisect.bisect_right(keys, (len(q["after"]), q["after"])) if "after" in q else 0
    shown = summaries[start : start + PAGE_SIZE]
    more = start + PAGE_SIZE < len(summaries)
    names = await _offer_names(ctx)
    return ctx.render(
        "offers.html",
        offers=shown,
        names=names,
        next_after=shown[-1].offer if more and shown else None,
        total=len(summaries),
        add_offers=await _addable_offers(ctx),
    )


async def _offer_names(ctx: Ctx) -> dict[str, str]:
    """Offer names from rules.d/catalogue.yaml (none without one), read once per rule set."""
    rules_path = ctx.services.settings.rules_path

    def read() -> dict[str, str]:
        try:
            catalogue = load_catalogue(rules_path)
        except RulesError:
            return {}  # validate reports it; the console shows ids only
        if catalogue is None:
            return {}
        return {offer: entry.name for offer, entry in catalogue.offers.items() if entry.name}

    return ctx.ui.per_rules("names", ctx.services.reloader.runtime.rules, read)


async def _addable_offers(ctx: Ctx) -> list[dict[str, Any]]:
    """The offers an affiliate may attach postbacks to (none for admins, or without the
    affiliate service)."""
    if ctx.viewer.is_admin or ctx.services.affiliates is None:
        return []
    return list(await ctx.services.affiliates.offers(ctx.viewer))


# --- an offer's postbacks --------------------------------------------------------------------


def parse_postback_filter(q: dict[str, str]) -> PostbackFilter:
    status = q.get("status")
    if status is not None and status not in ("active", "disabled"):
        raise InputError("status must be active or disabled", "status")
    trigger = q.get("trigger")
    if trigger is not None and trigger not in {t.value for t in Trigger}:
        raise InputError("unknown trigger", "trigger")
    action = q.get("action")
    if action is not None and action not in action_types():
        raise InputError("unknown action type", "action")
    return PostbackFilter(status, trigger, q.get("affiliate", "").strip() or None, action)


def _after(q: dict[str, str]) -> int | None:
    text = q.get("after")
    if text is None:
        return None
    after = postback_id(text)
    if after is None:
        raise InputError("after must be a postback id", "after")
    return after


async def offer_postbacks(ctx: Ctx) -> web.Response:
    offer = ctx.request.match_info["offer"]
    q = query(ctx.request, ("status", "trigger", "affiliate", "action", "after"))
    flt = parse_postback_filter(q)
    rules = ctx.services.reloader.runtime.rules
    candidates = rules.offers.get(offer, ())
    if not ctx.viewer.is_admin:
        candidates = tuple(lp for lp in candidates if visible_to(lp.postback, ctx.viewer))
    shown, next_after = page_of(candidates, flt, _after(q), PAGE_SIZE)
    repo = ctx.ui.repository_url
    kept = {k: v for k, v in q.items() if k != "after"}
    return ctx.render(
        "postbacks.html",
        offer=offer,
        notice=_notice(ctx),
        can_manage=ctx.services.affiliates is not None and not ctx.viewer.is_admin,
        next_query=params({**kept, "after": next_after}),
        columns=TABLE_COLUMNS,
        rows=[table_row(lp, repo) for lp in shown],
        filters={k: q.get(k, "") for k in ("status", "trigger", "affiliate", "action")},
        triggers=[t.value for t in Trigger],
        actions=action_types(),
        next_after=next_after,
        goals_enabled=any(lp.goals_enabled for lp in rules.offers.get(offer, ())),
    )


# --- one postback ------------------------------------------------------------------------------


def _notice(ctx: Ctx) -> str | None:
    return NOTICES.get(ctx.request.query.get("notice", ""))


def visible_postback(ctx: Ctx) -> LoadedPostback:
    """The postback of the URL, if this viewer may see it; the 404 page otherwise (the same
    for a missing id, a malformed one and another affiliate's or an admin's)."""
    text = ctx.request.match_info["id"]
    pid = postback_id(text)
    lp = ctx.services.reloader.runtime.rules.postbacks.get(pid) if pid is not None else None
    if lp is None or not visible_to(lp.postback, ctx.viewer):
        raise PageNotFound()
    return lp


async def postback(ctx: Ctx, **extra: Any) -> web.Response:
    lp = visible_postback(ctx)
    now = ctx.now
    flt = DeliveryFilter(postback_ids=frozenset({lp.id}), since=now - RECENT_WINDOW)
    recent, _ = await ctx.services.store.list_deliveries(flt, RECENT, None)
    ok, finished, percent = success_rate(recent)
    row = table_row(lp, ctx.ui.repository_url)
    store = is_store(lp) and ctx.services.affiliates is not None
    if store:
        assert ctx.services.affiliates is not None
        view = await ctx.services.affiliates.get(ctx.viewer, lp.id)
        row["status"], row["status_reason"] = view["status"], view.get("status_reason")
    return ctx.render(
        "postback.html",
        row=row,
        can_manage=store,
        notice=_notice(ctx),
        settings_json=pretty(row["action_settings"]),
        when_json=json.dumps(row["trigger_settings"]["when"], ensure_ascii=False)
        if row["trigger_settings"]["when"] is not None
        else None,
        deliveries=recent[:SHOWN],
        rate={"ok": ok, "finished": finished, "percent": percent, "of": len(recent)},
        statuses=[s.value for s in Status],
        explain_form=extra.pop("explain_form", {}),
        **extra,
    )


async def explain(ctx: Ctx) -> web.Response:
    """Does this postback fire for a conversion (pasted JSON, or a stored one), and the exact
    request it would send; nothing is sent and nothing is stored."""
    lp = visible_postback(ctx)
    assert ctx.form is not None
    form = {k: ctx.form.one(k) for k in ("conversion", "source", "conversion_id", "previous")}
    try:
        conversion, source = await _conversion_of(ctx, form)
        previous = Status(form["previous"]) if form["previous"] else None
    except ValueError as err:
        raise InputError("previous must be a conversion status", "previous") from err
    except InputError as err:
        return await postback(ctx, explain_form=form, explain_error=field_message(err))
    now = ctx.now
    result = evaluate(
        ctx.services.reloader.runtime.rules,
        conversion,
        source=source,
        previous_status=previous,
        now=now,
    )
    planned = next((p for p in result.planned if p.verdict.postback.id == lp.id), None)
    if planned is None:
        outcome = {
            "fires": False,
            "reason": f"the conversion's offer is {conversion.offer}, "
            f"this postback's is {lp.offer}",
        }
    else:
        outcome = {
            "fires": planned.verdict.fires,
            "reason": planned.verdict.reason,
            "request": planned.request.as_dict() if planned.request else None,
            "error": planned.error,
        }
    outcome["transition"] = result.transition.value
    return await postback(ctx, explain_form=form, explained=outcome)


async def _conversion_of(ctx: Ctx, form: dict[str, str]) -> tuple[Conversion, str]:
    if form["conversion"].strip():
        return _pasted_conversion(form["conversion"])
    source, cid = form["source"].strip(), form["conversion_id"].strip()
    if not source or not cid:
        raise InputError("paste a conversion, or give a stored one's source and id")
    stored = await ctx.services.store.get_conversion(source, cid)
    if stored is None:
        raise InputError(f"no stored conversion {cid} from {source}", "conversion_id")
    conversion, _ = conversion_from_mapping(stored.fields)
    return conversion, source


def _pasted_conversion(text: str) -> tuple[Conversion, str]:
    """A conversion pasted as a JSON object; InputError names its field ("conversion" for
    the JSON itself)."""
    obj = json_input(text, "conversion")
    if not isinstance(obj, dict):
        raise InputError("must be a JSON object", "conversion")
    return conversion_from_mapping(obj)


def masked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A stored conversion's fields as the console shows them: PII masked as the log does."""
    out = {k: mask(k, v) if k in PII_FIELDS else v for k, v in fields.items()}
    if isinstance(out.get("extra"), dict):
        out["extra"] = {k: mask(k, v) if k in PII_FIELDS else v for k, v in out["extra"].items()}
    return out


# --- send-test -----------------------------------------------------------------------------


async def send_test_form(ctx: Ctx) -> web.Response:
    lp = visible_postback(ctx)
    now = ctx.now
    sample = pretty(sample_conversion(lp, now))
    return ctx.render("send_test.html", row=table_row(lp, ctx.ui.repository_url), sample=sample)


async def send_test(ctx: Ctx) -> web.Response:
    """One real attempt with the confirmed sample conversion, recorded nowhere."""
    lp = visible_postback(ctx)
    assert ctx.form is not None
    text = ctx.form.one("conversion")
    row = table_row(lp, ctx.ui.repository_url)
    try:
        conversion, _ = _pasted_conversion(text)
    except InputError as err:
        message = field_message(err)
        return ctx.render("send_test.html", 400, row=row, sample=text, error=message)
    services = ctx.services
    result = await send_once(
        services.settings, lp, conversion, ctx.ui.environ, resolver=services.http.resolver
    )
    outcome = {
        "ok": result.ok,
        "request": result.request.as_dict() if result.request else None,
        "status": result.response_status,
        "excerpt": result.response_excerpt,
        "error": (result.error.reason + (f": {result.error.detail}" if result.error.detail else ""))
        if result.error
        else None,
        "duration_ms": result.duration_ms,
    }
    return ctx.render("send_test.html", row=row, sample=text, sent=outcome, label=label)
