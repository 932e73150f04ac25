"""Contract: deliveries leased at insert (daemon.store.base.LeaseAhead), on both stores. A claim
made at insert is the claim a claim would read back (jsonb orders an object's keys its own way:
PostgreSQL's are made from what the server stored); the lease fences and ends as a claim's; a
refused lease writes the deliveries queued; the room taken is always given back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from daemon.errors import StoreError
from daemon.models import Conversion, Status, Transition
from daemon.store.base import ArrivalPlan, DeliveryState, LeaseAhead, PlannedDelivery, Store
from daemon.store.postgres import PostgresStore

from .conftest import Backend
from .support import LEASE, T0, at, attempt, conversion

# Keys out of jsonb's order (by length, then bytes) and values it would rewrite, nested.
DATA: dict[str, Any] = {"zz": 1, "a": "x", "mmm": [2, 1], "b": {"yy": True, "c": None}, "p": 1.5}
VALUES = {"tx": "c1", "a": "b", "payout": "12.50"}


def plan(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
    deliveries = [
        PlannedDelivery(101, "ping_url", "host101.example"),
        PlannedDelivery(102, "ping_url", "host102.example", affiliate_owner="42"),
    ]
    return ArrivalPlan(dict(DATA), dict(VALUES), deliveries if transition is Transition.NEW else [])


class Ledger:
    """A dispatcher's side of leases: the room it keeps, what it was told."""

    def __init__(self, agree: bool = True) -> None:
        self.agree = agree
        self.kept = 0
        self.settled: list[bool] = []

    def admit(self, planned: Sequence[PlannedDelivery]) -> bool:
        if self.agree:
            self.kept += len(planned)
        return self.agree

    def settle(self, lease: LeaseAhead, committed: bool) -> None:
        self.kept -= lease.reserved
        self.settled.append(committed)

    def offer(self, node: str = "n1") -> LeaseAhead:
        return LeaseAhead(node, LEASE, self.admit, self.settle)


def ordered(value: Any) -> Any:
    """A value with every dict as its list of items, so that comparing it compares key order."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


async def test_a_claim_made_at_insert_is_the_claim_a_claim_reads_back(store: Store) -> None:
    ledger = Ledger()
    lease = ledger.offer()
    result = await store.record_arrival("generic", conversion("c1"), T0, plan, lease)
    assert ledger.settled == [True]
    assert ledger.kept == 0  # the room is the dispatcher's again once the claims are its own
    assert [c.delivery_id for c in lease.claims] == result.delivery_ids
    assert {c.attempts for c in lease.claims} == {0}
    # in flight, leased to n1: nothing is due until the lease ends
    assert await store.claim_due("n2", at(LEASE.total_seconds() - 1), 10, LEASE) == []
    later = at(LEASE.total_seconds() + 1)
    claimed = sorted(await store.claim_due("n2", later, 10, LEASE))
    made = sorted(lease.claims)
    assert [c._replace(token="") for c in claimed] == [c._replace(token="") for c in made]
    assert [ordered(c.data) for c in claimed] == [ordered(c.data) for c in made]
    assert [ordered(c.values) for c in claimed] == [ordered(c.values) for c in made]
    # the insert's lease is fenced by the claim that took over, as an ended claim's is
    assert not await store.finish_attempt(made[0], attempt(later), DeliveryState.SUCCEEDED, None)
    assert await store.finish_attempt(claimed[0], attempt(later), DeliveryState.SUCCEEDED, None)


def plan_on_change(
    transition: Transition, previous: Status | None, conv: Conversion
) -> ArrivalPlan:
    """Nothing for a new conversion; two deliveries when its status changes."""
    planned = plan(Transition.NEW, previous, conv)
    fires = transition is Transition.STATUS_CHANGED
    return ArrivalPlan(planned.data, planned.values, planned.deliveries if fires else [])


async def test_a_status_change_is_leased_as_a_new_conversion_is(store: Store) -> None:
    """A stored conversion's next arrival (PostgreSQL: the locking path, not the new
    conversions' batched statement) leases its deliveries too, its claims made from the arrival
    as stored, key order included; its duplicate leases nothing and gives the room back."""
    await store.record_arrival("generic", conversion("c1"), T0, plan_on_change, None)
    ledger = Ledger()
    lease = ledger.offer()
    approved = conversion("c1", status="approved")
    result = await store.record_arrival("generic", approved, at(1), plan_on_change, lease)
    assert result.transition is Transition.STATUS_CHANGED
    assert (ledger.settled, ledger.kept) == ([True], 0)
    assert [c.delivery_id for c in lease.claims] == result.delivery_ids
    assert {(c.arrival_seq, c.attempts) for c in lease.claims} == {(2, 0)}
    assert await store.claim_due("n2", at(LEASE.total_seconds()), 10, LEASE) == []
    later = at(LEASE.total_seconds() + 2)
    claimed = sorted(await store.claim_due("n2", later, 10, LEASE))
    made = sorted(lease.claims)
    assert [c._replace(token="") for c in claimed] == [c._replace(token="") for c in made]
    assert [ordered(c.data) for c in claimed] == [ordered(c.data) for c in made]
    assert [ordered(c.values) for c in claimed] == [ordered(c.values) for c in made]
    again = Ledger()
    repeat = again.offer()
    got = await store.record_arrival("generic", approved, at(3), plan_on_change, repeat)
    assert got.transition is Transition.DUPLICATE
    assert (repeat.claims, again.kept) == ([], 0)


async def test_a_status_change_of_a_conversion_stored_by_another_node_is_leased(
    backend: Backend,
) -> None:
    """The approval reaches a node that does not know the conversion (another stored it
    pending). PostgreSQL's statement for a new conversion takes the offer for the new
    conversion's deliveries (none here: a new conversion fires nothing), finds it stored, and
    the locking path asks the offer again for the status change's: they are leased, and the
    room is the dispatcher's again once their claims are its own."""
    first, second = await backend.open(), await backend.open()
    await first.record_arrival("generic", conversion("c1"), T0, plan_on_change, None)
    ledger = Ledger()
    lease = ledger.offer("n2")
    approved = conversion("c1", status="approved")
    result = await second.record_arrival("generic", approved, at(1), plan_on_change, lease)
    assert result.transition is Transition.STATUS_CHANGED
    assert [c.delivery_id for c in lease.claims] == result.delivery_ids
    assert len(lease.claims) == 2
    assert ledger.kept == 0
    assert ledger.settled[-1] is True
    assert await second.claim_due("n2", at(2), 10, LEASE) == []  # leased, not queued


@pytest.mark.postgres
async def test_postgres_a_status_change_that_does_not_commit_gives_the_room_back(
    pg_dsn: str,
) -> None:
    """The locking path's transaction fails after the offer took its deliveries (a NUL in the
    data, which jsonb cannot hold): the offer is told nothing was written, the room is given
    back, and nothing of the arrival is stored."""
    store = PostgresStore(pg_dsn, max_size=4)
    await store.open()

    def hostile(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
        planned = plan_on_change(transition, previous, conv)
        return ArrivalPlan({**planned.data, "sub1": "a\x00b"}, planned.values, planned.deliveries)

    try:
        await store.record_arrival("generic", conversion("c1"), T0, plan_on_change, None)
        ledger = Ledger()
        lease = ledger.offer()
        with pytest.raises(StoreError):
            await store.record_arrival(
                "generic", conversion("c1", status="approved"), at(1), hostile, lease
            )
        assert (ledger.settled, ledger.kept, lease.reserved) == ([False], 0, 2)
        assert await store.claim_due("n2", at(LEASE.total_seconds() + 2), 10, LEASE) == []
        # the same change, sent again, is written and leased
        retry = Ledger().offer()
        approved = conversion("c1", status="approved")
        got = await store.record_arrival("generic", approved, at(2), plan_on_change, retry)
        assert got.transition is Transition.STATUS_CHANGED
        assert len(retry.claims) == 2
    finally:
        await store.close()


async def test_a_delivery_leased_at_insert_finishes_and_is_taken_back_as_a_claim(
    store: Store,
) -> None:
    ledger = Ledger()
    lease = ledger.offer()
    await store.record_arrival("generic", conversion("c1"), T0, plan, lease)
    first, second = lease.claims
    assert await store.finish_attempt(first, attempt(at(1)), DeliveryState.SUCCEEDED, None)
    assert not await store.finish_attempt(first, attempt(at(2)), DeliveryState.SUCCEEDED, None)
    # the node restarts: its leases are due again at once, with the same idempotency key
    assert await store.recover("n1", at(3)) == 1
    [again] = await store.claim_due("n1", at(3), 10, LEASE)
    assert (again.delivery_id, again.idempotency_key) == (
        second.delivery_id,
        second.idempotency_key,
    )


async def test_a_refused_lease_writes_the_deliveries_queued(store: Store) -> None:
    ledger = Ledger(agree=False)
    lease = ledger.offer()
    await store.record_arrival("generic", conversion("c1"), T0, plan, lease)
    assert (lease.claims, lease.reserved, ledger.kept) == ([], 0, 0)
    assert len(await store.claim_due("n2", T0, 10, LEASE)) == 2


async def test_an_arrival_of_a_stored_conversion_leases_nothing_and_gives_the_room_back(
    backend: Backend,
) -> None:
    """A second node (nothing remembered) sees the conversion as new until its write finds it
    stored: the room it took for the new conversion's deliveries is given back, the locking
    path asks the offer again (a duplicate: nothing to take), nothing is leased, and the
    duplicate writes no delivery."""
    first, second = await backend.open(), await backend.open()
    await first.record_arrival("generic", conversion("c1"), T0, plan, Ledger().offer())
    ledger = Ledger()
    lease = ledger.offer("n2")
    result = await second.record_arrival("generic", conversion("c1"), at(1), plan, lease)
    assert result.transition is Transition.DUPLICATE
    assert (lease.claims, ledger.kept) == ([], 0)
    # SQLite decides inside its transaction (no delivery: nothing asked); PostgreSQL took the
    # room for a new conversion and is told that its arrival was not written as one, then the
    # locking path, its offer reopened, settles again once its transaction committed
    assert ledger.settled == ([False, True] if backend.name == "postgres" else [True])
    assert await second.claim_due("n2", at(1), 10, timedelta(seconds=30)) == []


@pytest.mark.postgres
async def test_postgres_gives_the_room_back_when_its_round_is_refused(pg_dsn: str) -> None:
    """A round of new arrivals whose statement the server refuses (a NUL in the data, which
    jsonb cannot hold) writes nothing: the refused arrival's lease is told so, the others of the
    round are written again one by one and leased, and all the room kept is given back."""
    store = PostgresStore(pg_dsn, max_size=4)
    await store.open()
    ledger = Ledger()

    def hostile(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
        planned = plan(transition, previous, conv)
        return ArrivalPlan({**planned.data, "sub1": "a\x00b"}, planned.values, planned.deliveries)

    try:
        leases = [ledger.offer() for _ in range(3)]
        got = await asyncio.gather(
            store.record_arrival("generic", conversion("ok1"), T0, plan, leases[0]),
            store.record_arrival("generic", conversion("bad"), T0, hostile, leases[1]),
            store.record_arrival("generic", conversion("ok2"), T0, plan, leases[2]),
            return_exceptions=True,
        )
        assert isinstance(got[1], StoreError)
        assert sorted(ledger.settled) == [False, True, True]
        assert ledger.kept == 0
        assert (len(leases[0].claims), leases[1].claims, len(leases[2].claims)) == (2, [], 2)
        assert store._new_arrivals.apart >= 1  # the round was refused, then sent apart
    finally:
        await store.close()
