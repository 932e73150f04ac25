"""Contract: resend, replay and backfill reads and writes (issue 18, migration 0004), on both
backends."""

from __future__ import annotations

import pytest

from daemon.errors import InputError
from daemon.models import Transition
from daemon.store.base import DeliveryState, NewDelivery, PlannedDelivery, Store

from .support import LEASE, T0, arrive, at, claim_one, conversion, finish


def _new(arrival_pk: int, seq: int, cid: str, pid: int) -> NewDelivery:
    return NewDelivery(
        arrival_pk, seq, "generic", cid, PlannedDelivery(pid, "ping_url", "h.example")
    )


async def test_arrivals_between_reads_a_time_range_in_keyset_pages(store: Store) -> None:
    for i in range(5):
        await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,))
    await arrive(store, conversion("c1"), at(10), postbacks=())  # duplicate: cannot fire
    await arrive(store, conversion("c1", status="approved"), at(11), postbacks=())
    first = await store.arrivals_between(at(1), at(20), None, 2)
    assert [(a.conversion_id, a.seq) for a in first] == [("c1", 1), ("c2", 1)]
    assert first[0].postback_ids == frozenset({101})
    assert first[0].transition is Transition.NEW
    assert first[0].data["conversion_id"] == "c1"
    assert first[0].values["offer"] == "501"
    last = first[-1]
    rest = await store.arrivals_between(
        at(1), at(20), (last.received_at, last.conversion_pk, last.seq), 10
    )
    assert [(a.conversion_id, a.seq, a.transition) for a in rest] == [
        ("c3", 1, Transition.NEW),
        ("c4", 1, Transition.NEW),
        ("c1", 3, Transition.STATUS_CHANGED),
    ]
    assert rest[-1].postback_ids == frozenset()
    assert await store.arrivals_between(at(30), at(40), None, 10) == []
    latest = await store.latest_arrival("generic", "c1")
    assert latest is not None
    assert (latest.seq, latest.transition) == (3, Transition.STATUS_CHANGED)
    assert await store.latest_arrival("generic", "nope") is None


async def test_add_deliveries_skips_an_arrival_and_postback_that_has_one(store: Store) -> None:
    await arrive(store, conversion("c1"), T0, postbacks=(101,))
    [arrival] = await store.arrivals_between(T0, at(1), None, 10)
    items = [
        _new(arrival.conversion_pk, 1, "c1", 101),  # has one already
        _new(arrival.conversion_pk, 1, "c1", 300),
        _new(arrival.conversion_pk, 1, "c1", 300),  # the same twice in one call
    ]
    added = await store.add_deliveries(items, at(5))
    assert len(added) == 1
    detail = await store.get_delivery(added[0])
    assert detail is not None
    d = detail.delivery
    assert (d.postback_id, d.state, d.arrival_seq, d.idempotency_key) == (
        300, DeliveryState.QUEUED, 1, "generic:c1:1:300",
    )  # fmt: skip
    assert await store.add_deliveries(items, at(6)) == []  # a second backfill makes none
    claims = await store.claim_due("n1", at(6), 10, LEASE)
    assert {c.postback_id for c in claims} == {101, 300}
    backfilled = next(c for c in claims if c.postback_id == 300)
    assert backfilled.data["conversion_id"] == "c1"  # renders from the stored arrival


async def test_resend_makes_a_new_delivery_with_its_own_key_recorded_as_a_resend(
    store: Store,
) -> None:
    [first] = await arrive(store, conversion("c1"), T0, postbacks=(101,))
    with pytest.raises(InputError) as refused:
        await store.resend(first, at(1))  # still queued
    assert refused.value.field == "state"
    await finish(store, await claim_one(store, at(1)), DeliveryState.SUCCEEDED, at(2))
    row = await store.resend(first, at(3))
    assert row is not None
    assert row.delivery_id != first
    assert (row.postback_id, row.state, row.arrival_seq) == (101, DeliveryState.QUEUED, 2)
    assert row.idempotency_key == "generic:c1:2:101"
    assert await store.resend_of(row.delivery_id) == first
    assert await store.resend_of(first) is None
    stored = await store.get_delivery(row.delivery_id)
    assert stored is not None
    assert stored.delivery.idempotency_key == row.idempotency_key
    claim = await claim_one(store, at(3))
    assert (claim.delivery_id, claim.data["conversion_id"]) == (row.delivery_id, "c1")
    # The copy is not an arrival of the conversion, is not backfilled, and the next webhook
    # gets the number after it.
    conv = await store.get_conversion("generic", "c1")
    assert conv is not None
    assert [a["seq"] for a in conv.arrivals] == [1]
    assert [a.seq for a in await store.arrivals_between(T0, at(100), None, 10)] == [1]
    await arrive(store, conversion("c1", status="approved"), at(4), postbacks=(101,))
    conv = await store.get_conversion("generic", "c1")
    assert conv is not None
    assert [a["seq"] for a in conv.arrivals] == [1, 3]
    assert await store.resend("no-such-delivery", at(5)) is None
