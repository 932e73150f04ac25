"""Console pages that change store postbacks, over daemon.affiliates' service (the same calls
as the API): Add (trigger, then action, then the action's fields), Configure (the action type
shown, not editable), status, Delete (type the id), Duplicate from another offer."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from daemon.affiliates.service import AffiliateService
from daemon.errors import InputError
from daemon.models import Trigger
from daemon.ui.action_form import field_specs, prefill, settings_from_form
from daemon.ui.base import Ctx, PageNotFound, field_message, page, query, redirect
from daemon.ui.ops import visible_postback
from daemon.ui.views import is_store, table_row

_TRIGGERS = tuple(t.value for t in Trigger)


def add_routes(console: web.Application) -> None:
    """On the console's own app, mounted at /ui (daemon.ui): the paths are under it."""
    console.router.add_get("/offers/go", page(go_to_offer))
    console.router.add_get("/offers/{offer}/add", page(add_form))
    console.router.add_post("/offers/{offer}/add", page(add))
    console.router.add_get("/offers/{offer}/duplicate", page(duplicate_form))
    console.router.add_post("/offers/{offer}/duplicate", page(duplicate))
    console.router.add_get("/postbacks/{id}/edit", page(edit_form))
    console.router.add_post("/postbacks/{id}/edit", page(edit))
    console.router.add_post("/postbacks/{id}/status", page(set_status))
    console.router.add_get("/postbacks/{id}/delete", page(delete_form))
    console.router.add_post("/postbacks/{id}/delete", page(delete))


def service(ctx: Ctx) -> AffiliateService:
    found = ctx.services.affiliates
    if found is None:
        raise PageNotFound()
    return found


def _offer(ctx: Ctx) -> str:
    offer = ctx.request.match_info["offer"].strip()
    if not offer or len(offer) > 128:
        raise PageNotFound()
    return offer


async def go_to_offer(ctx: Ctx) -> web.Response:
    offer = query(ctx.request, ("offer",)).get("offer", "").strip()
    if not offer:
        return redirect("/ui/offers")
    return redirect(f"/ui/offers/{quote(offer, safe='')}")


# --- add and configure -------------------------------------------------------------------


def _trigger_part(values: dict[str, str]) -> dict[str, Any]:
    trigger = values.get("trigger", "")
    if trigger not in _TRIGGERS:
        raise InputError("choose a trigger", "trigger")
    fields: dict[str, Any] = {"trigger": trigger}
    goal = values.get("goal", "").strip()
    fields["goal"] = goal or None
    return fields


async def add_form(
    ctx: Ctx, values: dict[str, str] | None = None, error: str | None = None, status: int = 200
) -> web.Response:
    offer = _offer(ctx)
    limits = await service(ctx).limits(ctx.viewer)
    values = values if values is not None else query(ctx.request, ("trigger", "goal", "action"))
    action = values.get("action", "")
    specs = field_specs(action) if action in limits.get("actions", ()) else None
    return ctx.render(
        "postback_form.html",
        status,
        mode="add",
        offer=offer,
        values=values,
        triggers=_TRIGGERS,
        actions=limits.get("actions", ()),
        specs=specs,
        action=action if specs is not None else "",
        error=error,
        limits=limits,
    )


async def add(ctx: Ctx) -> web.Response:
    offer = _offer(ctx)
    assert ctx.form is not None
    values = {k: v[-1] for k, v in ctx.form.values.items() if k != "csrf"}
    try:
        fields = {"offer": offer, **_trigger_part(values)}
        fields["action"] = settings_from_form(values.get("action", ""), values)
        if fields["goal"] is None:
            del fields["goal"]
        created = await service(ctx).create(ctx.viewer, fields)
    except InputError as err:
        if err.status == 404:
            raise
        return await add_form(
            ctx, values, field_message(err), 400 if err.status < 409 else err.status
        )
    return redirect(f"/ui/postbacks/{created['id']}?notice=created")


async def edit_form(
    ctx: Ctx, values: dict[str, str] | None = None, error: str | None = None, status: int = 200
) -> web.Response:
    lp = visible_postback(ctx)
    if not is_store(lp):
        raise InputError(f"postback {lp.id} is kept in {lp.file}:{lp.line}: change it in git")
    view = await service(ctx).get(ctx.viewer, lp.id)
    specs = field_specs(view["action"])
    if values is None:
        values = {
            "trigger": view["trigger"],
            "goal": view["trigger_settings"].get("goal") or "",
            **prefill(specs, view["action_settings"]),
        }
    return ctx.render(
        "postback_form.html",
        status,
        mode="edit",
        offer=view["offer"],
        row=table_row(lp, None),
        values=values,
        triggers=_TRIGGERS,
        actions=(view["action"],),
        specs=specs,
        action=view["action"],
        error=error,
        limits={},
    )


async def edit(ctx: Ctx) -> web.Response:
    lp = visible_postback(ctx)
    assert ctx.form is not None
    values = {k: v[-1] for k, v in ctx.form.values.items() if k != "csrf"}
    try:
        view = await service(ctx).get(ctx.viewer, lp.id)
        changes = _trigger_part(values)
        changes["action"] = settings_from_form(view["action"], values)
        await service(ctx).update(ctx.viewer, lp.id, changes)
    except InputError as err:
        if err.status == 404:
            raise
        return await edit_form(
            ctx, values, field_message(err), 400 if err.status < 409 else err.status
        )
    return redirect(f"/ui/postbacks/{lp.id}?notice=updated")


# --- status and delete ---------------------------------------------------------------------


async def set_status(ctx: Ctx) -> web.Response:
    lp = visible_postback(ctx)
    assert ctx.form is not None
    status = ctx.form.one("status")
    if status not in ("active", "disabled"):
        raise InputError("status must be active or disabled", "status")
    await service(ctx).set_status(ctx.viewer, lp.id, status)
    return redirect(f"/ui/postbacks/{lp.id}?notice={status}")


async def delete_form(ctx: Ctx, error: str | None = None, status: int = 200) -> web.Response:
    lp = visible_postback(ctx)
    if not is_store(lp):
        raise InputError(f"postback {lp.id} is kept in {lp.file}:{lp.line}: change it in git")
    return ctx.render("delete.html", status, row=table_row(lp, None), error=error)


async def delete(ctx: Ctx) -> web.Response:
    lp = visible_postback(ctx)
    assert ctx.form is not None
    typed = ctx.form.one("confirm").strip()
    try:
        await service(ctx).delete(ctx.viewer, lp.id, typed)
    except InputError as err:
        if err.status == 404:
            raise
        return await delete_form(ctx, field_message(err), err.status)
    return redirect(f"/ui/offers/{quote(lp.offer, safe='')}?notice=deleted")


# --- duplicate -----------------------------------------------------------------------------


async def duplicate_form(ctx: Ctx, error: str | None = None, status: int = 200) -> web.Response:
    offer = _offer(ctx)
    svc = service(ctx)
    chosen = query(ctx.request, ("from",)).get("from", "").strip()
    if ctx.form is not None:
        chosen = ctx.form.one("from").strip()
    seen = await svc.list(ctx.viewer)
    offers = sorted({v["offer"] for v in seen if v["offer"] != offer}, key=lambda o: (len(o), o))
    rows = [v for v in seen if v["offer"] == chosen] if chosen else []
    return ctx.render(
        "duplicate.html",
        status,
        offer=offer,
        offers=offers,
        chosen=chosen,
        rows=rows,
        error=error,
    )


async def duplicate(ctx: Ctx) -> web.Response:
    offer = _offer(ctx)
    assert ctx.form is not None
    source = ctx.form.one("from").strip()
    ids = ctx.form.all("postback")
    if not ids:
        return await duplicate_form(ctx, "Tick at least one postback to copy.", 400)
    try:
        await service(ctx).duplicate(ctx.viewer, source, offer, ids)
    except InputError as err:
        if err.status == 404:
            raise
        return await duplicate_form(ctx, field_message(err), err.status)
    return redirect(f"/ui/offers/{quote(offer, safe='')}?notice=duplicated")
