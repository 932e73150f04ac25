"""Test helpers for the store: fixed times, conversions, and a planner that records its calls."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from daemon.models import Conversion, Status, Transition, macro_values, rule_data
from daemon.store.base import (
    ArrivalPlan,
    AttemptRow,
    Claim,
    DeliveryState,
    PlannedDelivery,
    Store,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def conversion(
    cid: str = "c1",
    status: str = "pending",
    extra: dict[str, str] | None = None,
    **fields: str,
) -> Conversion:
    params = {"conversion_id": cid, "offer": "501", "affiliate": "42", "status": status, **fields}
    return Conversion.parse(params, extra)


@dataclass
class Planner:
    """Plans one delivery per postback id; remembers every (transition, previous) it saw."""

    conversion: Conversion
    source: str = "generic"
    postbacks: Sequence[int] = (101, 102)
    fail: BaseException | None = None
    calls: list[tuple[Transition, Status | None]] = field(default_factory=list)
    seen: list[Conversion] = field(default_factory=list)

    def __call__(
        self, transition: Transition, previous: Status | None, effective: Conversion
    ) -> ArrivalPlan:
        self.calls.append((transition, previous))
        self.seen.append(effective)
        if self.fail is not None:
            raise self.fail
        data = rule_data(
            effective,
            source=self.source,
            transition=transition,
            previous_status=previous,
            received_at=T0,
        )
        deliveries = [
            PlannedDelivery(pid, "ping_url", f"host{pid}.example", affiliate_owner="42")
            for pid in self.postbacks
        ]
        return ArrivalPlan(data, macro_values(data, effective), deliveries)


async def arrive(
    store: Store,
    conv: Conversion,
    when: datetime = T0,
    *,
    source: str = "generic",
    postbacks: Sequence[int] = (101, 102),
) -> list[str]:
    """Record an arrival; the ids of the deliveries it wrote."""
    result = await store.record_arrival(source, conv, when, Planner(conv, source, postbacks))
    return result.delivery_ids


def attempt(
    when: datetime, outcome: str = "succeeded", reason: str | None = None, node: str = "n1"
) -> AttemptRow:
    return AttemptRow(
        started_at=when,
        duration_ms=250,
        outcome=outcome,
        reason=reason,
        rules_version="v1",
        node=node,
        request={"method": "GET", "url": "https://host101.example/pb?x=1", "headers": {}},
        response_status=200 if outcome == "succeeded" else 503,
        response_excerpt="OK",
    )


async def claim_one(store: Store, when: datetime, node: str = "n1") -> Claim:
    claims = await store.claim_due(node, when, 1, LEASE)
    assert len(claims) == 1, claims
    return claims[0]


async def finish(
    store: Store,
    claim: Claim,
    state: DeliveryState,
    when: datetime,
    next_at: datetime | None = None,
) -> bool:
    outcome = {"succeeded": "succeeded", "retrying": "retry"}.get(state.value, state.value)
    return await store.finish_attempt(claim, attempt(when, outcome), state, next_at)


class Gate:
    """A GroupCommitWriter's commit hook: holds the writer after its first COMMIT until `opened`
    is set, so that the jobs submitted meanwhile make one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, size: int) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.opened.wait(timeout=30)
