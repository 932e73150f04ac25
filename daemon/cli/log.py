"""`postbackd deliveries list` and `conversions list` (issue 18): the log sliced by offer,
affiliate, postback, action, trigger, state and time range, as a table that fits the terminal,
JSON (a delivery is the API's object, plus its arrival's offer, affiliate and trigger) or CSV;
personal data masked unless --show-pii."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from daemon.cli.pii import mask, personal_values, show_pii_option
from daemon.cli.store import parse_since, when, with_store
from daemon.cli.table import label, render, to_csv
from daemon.models import TRIGGER_OF_STATUS, Status, Trigger
from daemon.store.base import (
    DeliveryState,
    LogFilter,
    LoggedConversion,
    LoggedDelivery,
    Store,
)
from daemon.views import delivery_json

FORMATS = click.Choice(["table", "json", "csv"])
STATUS_OF_TRIGGER = {t.value: s.value for s, t in TRIGGER_OF_STATUS.items()}


def _slice_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = (
        click.option("--offer", metavar="ID"),
        click.option("--affiliate", metavar="ID"),
        click.option("--postback", type=int, metavar="N"),
        click.option("--action", metavar="TYPE", help="ping_url, email, ..."),
        click.option("--trigger", type=click.Choice([t.value for t in Trigger])),
        click.option("--state", type=click.Choice([s.value for s in DeliveryState])),
        click.option("--since", metavar="T", help="At or after T (ISO 8601, or 2h, 1d ago)."),
        click.option("--until", metavar="T", help="Before T (ISO 8601, or 2h, 1d ago)."),
        click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True),
        click.option("--format", "fmt", type=FORMATS, default="table", show_default=True),
        show_pii_option,
    )
    for option in reversed(options):
        command = option(command)
    return command


def _filter(opts: dict[str, Any], trigger: str | None) -> LogFilter:
    now = datetime.now(UTC)
    since = parse_since(opts["since"], now) if opts["since"] else None
    until = parse_since(opts["until"], now) if opts["until"] else None
    if since and until and until <= since:
        raise click.BadParameter("must be after --since", param_hint="--until")
    return LogFilter(
        offer=_text(opts["offer"], "--offer"),
        affiliate=_text(opts["affiliate"], "--affiliate"),
        postback_id=opts["postback"],
        action=_text(opts["action"], "--action"),
        trigger=trigger,
        state=DeliveryState(opts["state"]) if opts["state"] else None,
        status=Status(opts["status"]) if opts.get("status") else None,
        conversion_id=_text(opts.get("conversion"), "--conversion"),
        since=since,
        until=until,
    )


def _text(value: str | None, hint: str) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise click.BadParameter("must be 1 to 1024 printable characters", param_hint=hint)
    return text


DELIVERY_COLUMNS = (
    "ID", "Created At", "Offer", "Affiliate", "Trigger", "Postback", "Action", "Conversion",
    "State",
)  # fmt: skip
DELIVERY_KEYS = (
    "delivery_id", "created_at", "offer", "affiliate", "trigger", "postback_id", "action",
    "source", "conversion_id", "arrival_seq", "state", "attempts", "next_attempt_at",
    "last_reason", "idempotency_key", "destination",
)  # fmt: skip


def logged_json(item: LoggedDelivery) -> dict[str, Any]:
    """The API's delivery object, plus the offer, affiliate and trigger of its arrival."""
    return {
        **delivery_json(item.delivery),
        "offer": item.offer,
        "affiliate": item.affiliate,
        "trigger": item.trigger,
    }


def state_text(item: dict[str, Any]) -> str:
    """`Dead (1 attempt, http_404)`: the state, the attempts made and the last reason."""
    attempts = int(item["attempts"])
    parts = [f"{attempts} attempt{'' if attempts == 1 else 's'}"] if attempts else []
    if item["last_reason"]:
        parts.append(str(item["last_reason"]))
    return label(str(item["state"])) + (f" ({', '.join(parts)})" if parts else "")


@click.command("list")
@click.option("--conversion", metavar="ID", help="The tracker's conversion id.")
@_slice_options
@click.option("-c", "--config", metavar="FILE", help="The daemon's settings file.")
def deliveries_list(config: str | None, **opts: Any) -> None:
    """List deliveries, newest first, with the offer, affiliate and trigger of the conversion
    that made each; slice by any of the options (they combine)."""
    flt = _filter(opts, opts["trigger"])
    limit, fmt, show = opts["limit"], opts["fmt"], opts["show_pii"]
    found, more = with_store(config, lambda store: store.delivery_log(flt, limit, None))
    items = [mask(logged_json(item), show=show) for item in found]
    if fmt == "json":
        click.echo(json.dumps(items, indent=2))
        return
    if fmt == "csv":
        click.echo(to_csv(DELIVERY_KEYS, [[i.get(k) for k in DELIVERY_KEYS] for i in items]))
        return
    if not items:
        click.echo("no deliveries")
        return
    cells = [
        [
            i["delivery_id"],
            when(found[n].delivery.created_at).replace("T", " "),
            i["offer"] or "-",
            i["affiliate"] or "-",
            label(i["trigger"] or "-"),
            str(i["postback_id"]),
            label(i["action"]),
            f"{i['source']}:{i['conversion_id']}",
            state_text(i),
        ]
        for n, i in enumerate(items)
    ]
    click.echo(render(DELIVERY_COLUMNS, cells, whole=(0,)))
    if more:
        click.echo(f"(first {limit}; more with --limit or a narrower slice)")


CONVERSION_COLUMNS = (
    "Conversion", "Offer", "Affiliate", "Status", "Payout", "Deliveries", "Created At",
    "Updated At",
)  # fmt: skip
CONVERSION_KEYS = (
    "source", "conversion_id", "offer", "affiliate", "status", "payout", "deliveries",
    "created_at", "updated_at", "fields",
)  # fmt: skip


def conversion_json(row: LoggedConversion) -> dict[str, Any]:
    return {
        "source": row.source,
        "conversion_id": row.conversion_id,
        "offer": row.fields.get("offer"),
        "affiliate": row.fields.get("affiliate"),
        "status": row.status.value,
        "payout": row.fields.get("payout"),
        "deliveries": row.deliveries,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "fields": row.fields,
    }


@click.command("list")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@_slice_options
@click.option("-c", "--config", metavar="FILE", help="The daemon's settings file.")
def conversions_list(config: str | None, **opts: Any) -> None:
    """List conversions, last updated first. --postback, --action and --state select those
    with such a delivery; --trigger those whose status fires it; times are of the last update."""
    trigger = STATUS_OF_TRIGGER[opts["trigger"]] if opts["trigger"] else None
    flt = _filter(opts, trigger)
    limit, fmt, show = opts["limit"], opts["fmt"], opts["show_pii"]

    async def job(store: Store) -> tuple[list[LoggedConversion], str | None]:
        return await store.conversion_log(flt, limit, None)

    found, more = with_store(config, job)
    items = [
        mask(conversion_json(row), show=show, values=personal_values(row.fields)) for row in found
    ]
    if fmt == "json":
        click.echo(json.dumps(items, indent=2))
        return
    if fmt == "csv":
        rows = [
            [json.dumps(i[k]) if k == "fields" else i[k] for k in CONVERSION_KEYS] for i in items
        ]
        click.echo(to_csv(CONVERSION_KEYS, rows))
        return
    if not items:
        click.echo("no conversions")
        return
    cells = [
        [
            f"{i['source']}:{i['conversion_id']}",
            i["offer"] or "-",
            i["affiliate"] or "-",
            label(i["status"]),
            str(i["payout"] or "-"),
            str(i["deliveries"]),
            when(row.created_at).replace("T", " "),
            when(row.updated_at).replace("T", " "),
        ]
        for i, row in zip(items, found, strict=True)
    ]
    click.echo(render(CONVERSION_COLUMNS, cells))
    if more:
        click.echo(f"(first {limit}; more with --limit or a narrower slice)")
