"""`postbackd deliveries show|retry` and `conversions show` (the lists: log.py): the daemon's
store from the command line. The store is shared with the running daemon (SQLite WAL, or
PostgreSQL); a retry makes a delivery due now and the daemon picks it up within its poll
interval."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from daemon.api_views import attempt_view
from daemon.cli.common import config_option, settings_from
from daemon.cli.pii import mask, mask_text, personal_values, show_pii_option
from daemon.durations import parse_duration
from daemon.errors import ConfigError, InputError, RulesError, StoreError
from daemon.listing import render_table
from daemon.loader import load_rules
from daemon.settings import Settings
from daemon.store.base import (
    DeliveryDetail,
    DeliveryFilter,
    DeliveryRow,
    DeliveryState,
    Store,
)
from daemon.store.factory import open_store, sqlite_path
from daemon.views import delivery_json

T = TypeVar("T")
FORMAT = click.Choice(["table", "json"])


def with_store(config: str | None, job: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store named by the settings, run `job` on it, close it."""
    settings = settings_from(config)
    try:
        if settings.store.startswith("sqlite:"):
            path = sqlite_path(settings.store, settings.config_dir)
            if not path.exists():  # do not create an empty store next to the real one
                raise click.ClickException(f"no store at {path} (is -c the daemon's settings?)")
        store = open_store(settings.store, config_dir=settings.config_dir)
    except ConfigError as err:
        raise click.ClickException(str(err)) from err

    async def run() -> T:
        await store.open()
        try:
            return await job(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreError as err:
        raise click.ClickException(f"store: {err}") from err
    except InputError as err:
        raise click.ClickException(
            f"{err.field}: {err.message}" if err.field else str(err)
        ) from err


def when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC unless it says), or a duration ago (`2h`, `1d`)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise click.BadParameter(
            f"{text!r} is not a time (2026-11-01T10:00:00Z) or a duration ago (2h, 1d)",
            param_hint="--since",
        ) from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.group()
def deliveries() -> None:
    """Inspect and retry deliveries in the daemon's store (-c: the daemon's settings)."""


@deliveries.command("show")
@click.argument("delivery_id", metavar="ID")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@show_pii_option
@config_option
def show_cmd(delivery_id: str, fmt: str, show_pii: bool, config: str | None) -> None:
    """One delivery with every attempt: request as sent (secrets ****), answer, outcome.
    Personal data (email, phone, IP...) shows as *** unless --show-pii."""

    async def job(store: Store) -> tuple[DeliveryDetail | None, str | None, list[str]]:
        detail = await store.get_delivery(delivery_id)
        if detail is None:
            return None, None, []
        d = detail.delivery
        conversion = await store.get_conversion(d.source, d.conversion_id)
        own = personal_values(conversion.fields) if conversion else []
        return detail, await store.resend_of(delivery_id), own

    detail, origin, own = with_store(config, job)
    if detail is None:
        raise click.ClickException(f"unknown delivery {delivery_id}")
    if fmt == "json":
        body = {**detail_json(detail), "resend_of": origin}
        click.echo(json.dumps(mask(body, show=show_pii, values=own), indent=2, default=str))
        return
    text = detail_text(detail) + (f"\n  a resend of delivery {origin}" if origin else "")
    click.echo(text if show_pii else mask_text(text, own))


def detail_json(detail: DeliveryDetail) -> dict[str, Any]:
    """The API's object of one delivery (GET /api/v1/deliveries/ID)."""
    body = delivery_json(detail.delivery)
    body["attempts"] = [attempt_view(a) for a in detail.attempts]
    return body


def detail_text(detail: DeliveryDetail) -> str:
    d = detail.delivery
    lines = [
        f"delivery {d.delivery_id}: postback {d.postback_id} ({d.action} to {d.destination})",
        f"  conversion {d.source}:{d.conversion_id}, arrival {d.arrival_seq}",
        f"  state {d.state.value} after {d.attempts} attempt(s); last reason "
        f"{d.last_reason or '-'}; next attempt {when(d.next_attempt_at)}",
        f"  created {when(d.created_at)}, updated {when(d.updated_at)}",
        f"  idempotency key {d.idempotency_key}",
    ]
    for n, a in enumerate(detail.attempts, 1):
        lines.append(
            f"attempt {n} at {when(a.started_at)} ({a.duration_ms} ms, node {a.node}, rules "
            f"{a.rules_version}): {a.outcome}" + (f" ({a.reason})" if a.reason else "")
        )
        req = a.request or {}
        if req:
            lines.append(f"  > {req.get('method')} {req.get('url')}")
            lines.extend(f"  > {k}: {v}" for k, v in (req.get("headers") or {}).items())
            if req.get("body") is not None:
                lines.append(f"  > body: {req['body']}")
        if a.response_status is not None or a.response_excerpt:
            excerpt = (a.response_excerpt or "").replace("\n", " ")[:200]
            lines.append(f"  < HTTP {a.response_status or '-'} {excerpt}".rstrip())
    if not detail.attempts:
        lines.append("no attempts yet")
    return "\n".join(lines)


@deliveries.command("retry")
@click.argument("delivery_id", metavar="[ID]", required=False)
@click.option("--state", type=click.Choice(["dead", "cancelled"]), help="With --postback.")
@click.option("--postback", type=int, metavar="N", help="Retry this postback's deliveries.")
@click.option("--since", metavar="T", help="Created at or after T (ISO 8601, or 2h, 1d ago).")
@config_option
def retry_cmd(
    delivery_id: str | None,
    state: str | None,
    postback: int | None,
    since: str | None,
    config: str | None,
) -> None:
    """Queue a dead or cancelled delivery again, due now: `retry ID`, or in bulk with
    `retry --state dead --postback N [--since T]`. The running daemon sends it within its
    poll interval, with the same idempotency key."""
    now = datetime.now(UTC)
    if delivery_id is not None:
        if state or postback is not None or since:
            raise click.UsageError("give a delivery ID or --state/--postback/--since, not both")
        _retry_one(config, delivery_id, now)
        return
    if state is None or postback is None:
        raise click.UsageError("give a delivery ID, or --state dead|cancelled with --postback N")
    flt = DeliveryFilter(
        state=DeliveryState(state),
        postback_ids=[postback],
        since=parse_since(since, now) if since else None,
    )
    warn_inactive(config, postback)
    count = with_store(config, lambda store: store.requeue_matching(flt, now))
    click.echo(f"{count} {state} deliveries of postback {postback} queued again")


def _retry_one(config: str | None, delivery_id: str, now: datetime) -> None:
    async def job(store: Store) -> tuple[int, DeliveryDetail | None]:
        count = await store.requeue([delivery_id], now)
        return count, await store.get_delivery(delivery_id)

    count, detail = with_store(config, job)
    if detail is None:
        raise click.ClickException(f"unknown delivery {delivery_id}")
    if count == 0:
        raise click.ClickException(
            f"delivery {delivery_id} is {detail.delivery.state.value}: only dead or cancelled "
            "deliveries can be retried"
        )
    warn_inactive(config, detail.delivery.postback_id)
    click.echo(f"delivery {delivery_id} queued again; the daemon sends it within seconds")


def warn_inactive(config: str | None, postback: int) -> None:
    """A retried delivery of a disabled or removed postback is cancelled again at once."""
    settings: Settings = settings_from(config)
    try:
        rules = load_rules(settings.rules_path, git=False)
    except RulesError:
        return
    lp = rules.postbacks.get(postback)
    if lp is None or not lp.postback.active:
        what = "no longer exists" if lp is None else "is disabled"
        click.echo(
            f"warning: postback {postback} {what} in {settings.rules_path}: the daemon will "
            "cancel the delivery again",
            err=True,
        )


@click.group()
def conversions() -> None:
    """Look up conversions in the daemon's store (-c: the daemon's settings)."""


@conversions.command("show")
@click.argument("source")
@click.argument("conversion_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "sample"]),
    default="text",
    help="sample: one line for `postbackd diff --conversions` or `explain`.",
)
@show_pii_option
@config_option
def show_conversion(
    source: str, conversion_id: str, fmt: str, show_pii: bool, config: str | None
) -> None:
    """A conversion: its fields, its arrivals and their deliveries. Personal data (email,
    phone, IP...) shows as *** unless --show-pii."""

    async def job(store: Store) -> tuple[Any, list[DeliveryRow]]:
        row = await store.get_conversion(source, conversion_id)
        flt = DeliveryFilter(conversion_id=conversion_id)
        found, _ = await store.list_deliveries(flt, 1000, None)
        return row, [d for d in found if d.source == source]

    row, rows = with_store(config, job)
    if row is None:
        raise click.ClickException(f"unknown conversion {conversion_id} from source {source}")
    fields = mask(row.fields, show=show_pii, values=personal_values(row.fields))
    last = row.arrivals[-1] if row.arrivals else None
    previous = _previous_status(row.arrivals)
    if fmt == "sample":
        sample = {**fields, "source": source}
        if previous:
            sample["previous_status"] = previous
        click.echo(json.dumps(sample, separators=(", ", ": ")))
        return
    if fmt == "json":
        out = {
            "source": row.source,
            "conversion_id": row.conversion_id,
            "status": row.status.value,
            "status_event_time": when(row.status_event_time) if row.status_event_time else None,
            "fields": fields,
            "created_at": when(row.created_at),
            "updated_at": when(row.updated_at),
            "arrivals": [{k: _plain(v) for k, v in a.items()} for a in row.arrivals],
            "deliveries": [delivery_json(d) for d in rows],
        }
        click.echo(json.dumps(out, indent=2, default=str))
        return
    click.echo(
        f"conversion {source}:{conversion_id}: {row.status.value}"
        + (f" (last arrival {last['transition'].value})" if last else "")
    )
    for key, value in fields.items():
        click.echo(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    arrivals = [
        [
            str(a["seq"]),
            a["transition"].value,
            a["status"].value,
            when(a["received_at"]),
            when(a["event_time"]),
        ]
        for a in row.arrivals
    ]
    click.echo(
        render_table(("Arrival", "Transition", "Status", "Received At", "Event Time"), arrivals)
    )
    if rows:
        cells = [
            [
                d.delivery_id,
                str(d.arrival_seq),
                str(d.postback_id),
                d.state.value,
                str(d.attempts),
                d.last_reason or "-",
            ]
            for d in rows
        ]
        click.echo(
            render_table(
                ("Delivery", "Arrival", "Postback", "State", "Attempts", "Last Reason"), cells
            )
        )
    else:
        click.echo("no deliveries")


def _previous_status(arrivals: list[dict[str, Any]]) -> str | None:
    """The status before the last status change (what `explain --previous-status` takes)."""
    statuses = [
        a["status"].value for a in arrivals if a["transition"].value in ("new", "status_changed")
    ]
    return statuses[-2] if len(statuses) >= 2 else None


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return when(value)
    return getattr(value, "value", value)
