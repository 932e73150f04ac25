"""Which deliveries a stored arrival would get from the current rules (issue 18): backfill of a
new or changed postback over a time range, and replay of one conversion's latest arrival.

Pure decisions over what the store returns (no I/O): the arrival's conversion is rebuilt from
the values it was stored with, run through the same matching as ingest, and a postback that
already has a delivery for that arrival (in any state) is never planned again; the store's
one-delivery-per-(arrival, postback) rule guarantees the same when two runs race.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from daemon.actions import build_action
from daemon.actions.base import Resources
from daemon.errors import InputError
from daemon.loader import LoadedPostback, RuleSet
from daemon.matching import match
from daemon.models import CANONICAL_FIELDS, Conversion
from daemon.store.base import NewDelivery, PlannedDelivery, StoredArrival


class _Clock:
    def now(self) -> float:
        return time.time()


def _no_secret(name: str) -> str:
    raise KeyError(name)  # only destinations are read; nothing is rendered


def planned_of(rules: RuleSet) -> Callable[[LoadedPostback], PlannedDelivery]:
    """PlannedDelivery of a postback (its action's type and destination), built once each."""
    resources = Resources(http=None, secret=_no_secret, clock=_Clock())
    cache: dict[int, PlannedDelivery] = {}

    def planned(lp: LoadedPostback) -> PlannedDelivery:
        if lp.id not in cache:
            action = build_action(lp.postback.action, resources)
            cache[lp.id] = PlannedDelivery(
                lp.id, lp.postback.action.type, action.destination, lp.postback.owner_affiliate
            )
        return cache[lp.id]

    return planned


def conversion_of(arrival: StoredArrival) -> Conversion | None:
    """The conversion as the arrival carried it, from the values stored with it (None when
    they no longer parse, e.g. stored by an older version with other rules)."""
    values = arrival.values
    params = {name: values[name] for name in CANONICAL_FIELDS if values.get(name)}
    extra = {k.removeprefix("extra."): v for k, v in values.items() if k.startswith("extra.")}
    try:
        return Conversion.parse(params, extra)
    except InputError:
        return None


@dataclass
class Tally:
    read: int = 0  # arrivals looked at
    had: int = 0  # (arrival, postback) pairs that fire but have a delivery already
    unreadable: int = 0


def plan_arrival(
    rules: RuleSet,
    arrival: StoredArrival,
    planned: Callable[[LoadedPostback], PlannedDelivery],
    only: Collection[int] | None,
    tally: Tally,
) -> list[NewDelivery]:
    """The deliveries the current rules give this arrival that it does not have yet (only the
    postbacks of `only`, when given)."""
    tally.read += 1
    conversion = conversion_of(arrival)
    if conversion is None:
        tally.unreadable += 1
        return []
    out = []
    for lp in match(rules, conversion, arrival.data):
        if only is not None and lp.id not in only:
            continue
        if lp.id in arrival.postback_ids:
            tally.had += 1
            continue
        out.append(
            NewDelivery(
                arrival.conversion_pk,
                arrival.seq,
                arrival.source,
                arrival.conversion_id,
                planned(lp),
            )
        )
    return out


def key_of(item: NewDelivery) -> str:
    """The idempotency key the delivery gets (what --dry-run lists)."""
    return f"{item.source}:{item.conversion_id}:{item.seq}:{item.planned.postback_id}"


def pause_for(added: int, rate: float) -> float:
    """Seconds to wait after queueing `added` deliveries to stay at `rate` per second."""
    return added / rate if rate > 0 else 0.0


def describe(values: Mapping[str, str]) -> str:
    return f"offer {values.get('offer', '-')}, affiliate {values.get('affiliate', '-')}"
