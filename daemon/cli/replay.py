"""`postbackd deliveries resend`, `conversions replay` and `backfill` (issue 18): deliberate new
deliveries written to the store; the running daemon's dispatcher picks them up by polling, as it
does for `deliveries retry`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime

import click

from daemon.backfill import Tally, key_of, pause_for, plan_arrival, planned_of
from daemon.cli.common import config_option, load_or_exit, rules_dir_from, rules_option
from daemon.cli.store import parse_since, warn_inactive, when, with_store
from daemon.loader import RuleSet
from daemon.store.base import DeliveryRow, NewDelivery, Store, StoredArrival

PAGE = 500  # arrivals read per store query
BATCH = 200  # deliveries written per store transaction, at most
NICE = 10  # a backfill's CPU priority, below the daemon's


@click.command("resend")
@click.argument("delivery_id", metavar="ID")
@config_option
def resend_cmd(delivery_id: str, config: str | None) -> None:
    """Send a succeeded delivery again, deliberately: a new delivery with its own idempotency
    key (the partner sees a new request), recorded as a resend of ID. To send a dead or
    cancelled delivery again with the same key, use `deliveries retry`."""
    now = datetime.now(UTC)
    row: DeliveryRow | None = with_store(config, lambda store: store.resend(delivery_id, now))
    if row is None:
        raise click.ClickException(f"unknown delivery {delivery_id}")
    warn_inactive(config, row.postback_id)
    click.echo(
        f"delivery {row.delivery_id} queued: a resend of {delivery_id} (postback "
        f"{row.postback_id}, idempotency key {row.idempotency_key}); the daemon sends it "
        "within seconds"
    )


@click.command("replay")
@click.argument("source")
@click.argument("conversion_id")
@click.option("--dry-run", is_flag=True, help="List what would be queued; write nothing.")
@rules_option
@config_option
def replay_cmd(
    source: str, conversion_id: str, dry_run: bool, rules: str | None, config: str | None
) -> None:
    """Run a conversion's latest arrival through the current rules and queue the deliveries it
    does not have yet (a postback added or fixed since it arrived). A postback that already
    has a delivery for that arrival is never sent again by replay (see `deliveries resend`)."""
    rule_set = load_or_exit(rules_dir_from(rules, config))
    tally = Tally()

    async def job(store: Store) -> tuple[StoredArrival | None, list[NewDelivery], list[str]]:
        arrival = await store.latest_arrival(source, conversion_id)
        if arrival is None:
            return None, [], []
        items = plan_arrival(rule_set, arrival, planned_of(rule_set), None, tally)
        added = [] if dry_run or not items else await store.add_deliveries(items, _now())
        return arrival, items, added

    arrival, items, added = with_store(config, job)
    if arrival is None:
        raise click.ClickException(
            f"no arrival of conversion {conversion_id} from source {source} that could fire "
            "postbacks"
        )
    head = (
        f"conversion {source}:{conversion_id}, arrival {arrival.seq} "
        f"({arrival.transition.value}, received {when(arrival.received_at)})"
    )
    _report(head, items, added, tally, dry_run)


@click.command("backfill")
@click.option("--postback", "postback_id", type=int, required=True, metavar="N")
@click.option("--since", required=True, metavar="T", help="Arrivals received at or after T.")
@click.option("--until", metavar="T", help="...and before T (default: now).")
@click.option("--dry-run", is_flag=True, help="List the deliveries it would queue; write nothing.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1, max=100_000),
    default=50.0,
    show_default=True,
    help="Deliveries queued per second at most, so live traffic keeps its latency.",
)
@rules_option
@config_option
def backfill_cmd(
    postback_id: int,
    since: str,
    until: str | None,
    dry_run: bool,
    rate: float,
    rules: str | None,
    config: str | None,
) -> None:
    """Queue postback N for the stored conversions of a time range, as if it had existed when
    they arrived: every arrival received in [--since, --until) that N fires for under the
    current rules, and that has no delivery of N yet (whatever its state: a success is never
    sent twice, and a second backfill queues nothing). --dry-run lists exactly those
    deliveries by idempotency key."""
    now = _now()
    start = parse_since(since, now)
    end = parse_since(until, now) if until else now
    if end <= start:
        raise click.BadParameter("must be after --since", param_hint="--until")
    rule_set = load_or_exit(rules_dir_from(rules, config))
    _check_postback(rule_set, postback_id)
    if not dry_run:
        _lower_priority()
    tally = Tally()

    async def job(store: Store) -> tuple[list[NewDelivery], list[str]]:
        planned = planned_of(rule_set)
        items: list[NewDelivery] = []
        added: list[str] = []
        after: tuple[datetime, int, int] | None = None
        while True:
            page = await store.arrivals_between(start, end, after, PAGE)
            if not page:
                return items, added
            last = page[-1]
            after = (last.received_at, last.conversion_pk, last.seq)
            found = [
                item
                for arrival in page
                for item in plan_arrival(rule_set, arrival, planned, {postback_id}, tally)
            ]
            items.extend(found)
            if dry_run:
                continue
            size = max(1, min(BATCH, int(rate / 10)))  # ten small writes a second: no bursts
            for n in range(0, len(found), size):
                batch = found[n : n + size]
                added.extend(await store.add_deliveries(batch, _now()))
                await asyncio.sleep(pause_for(len(batch), rate))

    items, added = with_store(config, job)
    head = f"backfill of postback {postback_id} over {when(start)} .. {when(end)}"
    _report(head, items, added, tally, dry_run)


def _check_postback(rule_set: RuleSet, postback_id: int) -> None:
    lp = rule_set.postbacks.get(postback_id)
    if lp is None:
        raise click.ClickException(f"no postback with id {postback_id} in the rules")
    if not lp.postback.active:
        raise click.ClickException(
            f"postback {postback_id} is disabled: enable it first (the daemon would cancel "
            "what a backfill queues)"
        )


def _report(
    head: str, items: list[NewDelivery], added: list[str], tally: Tally, dry_run: bool
) -> None:
    click.echo(head)
    for item in items:
        click.echo(f"  {'would queue' if dry_run else 'queue'} {key_of(item)}")
    skipped = f"{tally.had} already had one"
    if tally.unreadable:
        skipped += f", {tally.unreadable} arrival(s) no longer readable"
    if dry_run:
        click.echo(
            f"dry run: {len(items)} deliveries would be queued ({tally.read} arrivals read, "
            f"{skipped}); nothing written"
        )
        return
    raced = len(items) - len(added)
    click.echo(
        f"{len(added)} deliveries queued ({tally.read} arrivals read, {skipped}"
        + (f", {raced} queued meanwhile by someone else" if raced else "")
        + "); the daemon sends them within seconds"
    )


def _lower_priority() -> None:
    """A backfill is background work: it yields the CPU to the daemon (nice 10), so live
    ingest keeps its latency on a machine it shares with it."""
    with contextlib.suppress(OSError):
        os.nice(NICE)


def _now() -> datetime:
    return datetime.now(UTC)
