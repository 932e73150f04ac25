"""Contract: record_arrival on both backends (transitions, deliveries, atomicity, races)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from daemon.models import Status, Transition
from daemon.store.base import DeliveryState, Store

from .conftest import Backend
from .support import T0, Planner, arrive, at, conversion


async def test_new_conversion_writes_conversion_arrival_and_deliveries(store: Store) -> None:
    conv = conversion(click_id="abc", payout="5.50", extra={"foo": "bar"})
    plan = Planner(conv)

    result = await store.record_arrival("generic", conv, T0, plan)

    assert plan.calls == [(Transition.NEW, None)]
    assert (result.transition, result.previous_status, result.arrival_seq) == (
        Transition.NEW,
        None,
        1,
    )
    assert len(result.delivery_ids) == 2
    stored = await store.get_conversion("generic", "c1")
    assert stored is not None
    assert stored.status is Status.PENDING
    assert stored.fields == {
        "conversion_id": "c1",
        "offer": "501",
        "affiliate": "42",
        "status": "pending",
        "click_id": "abc",
        "payout": "5.50",
        "extra": {"foo": "bar"},
    }
    assert (stored.created_at, stored.updated_at) == (T0, T0)
    assert [(a["seq"], a["transition"], a["status"]) for a in stored.arrivals] == [
        (1, Transition.NEW, Status.PENDING)
    ]
    keys = []
    for delivery_id in result.delivery_ids:
        detail = await store.get_delivery(delivery_id)
        assert detail is not None
        row = detail.delivery
        assert (row.state, row.attempts, row.next_attempt_at) == (DeliveryState.QUEUED, 0, T0)
        assert (row.source, row.conversion_id, row.arrival_seq) == ("generic", "c1", 1)
        assert row.action == "ping_url"
        assert row.destination == f"host{row.postback_id}.example"
        assert row.affiliate_owner == "42"
        assert detail.attempts == []
        keys.append(row.idempotency_key)
    assert sorted(keys) == ["generic:c1:1:101", "generic:c1:1:102"]


async def test_duplicate_writes_no_delivery_and_only_touches_the_conversion(store: Store) -> None:
    await arrive(store, conversion(click_id="abc"))
    again = conversion(click_id="changed")
    plan = Planner(again)  # would plan two deliveries: the store must not write them

    result = await store.record_arrival("generic", again, at(60), plan)

    assert plan.calls == [(Transition.DUPLICATE, Status.PENDING)]
    assert result.transition is Transition.DUPLICATE
    assert (result.previous_status, result.arrival_seq, result.delivery_ids) == (
        Status.PENDING,
        2,
        [],
    )
    stored = await store.get_conversion("generic", "c1")
    assert stored is not None
    assert stored.fields["click_id"] == "abc"  # a duplicate merges nothing
    assert (stored.created_at, stored.updated_at) == (T0, at(60))
    assert [a["transition"] for a in stored.arrivals] == [Transition.NEW, Transition.DUPLICATE]
    depth = await store.queue_depth()
    assert depth[DeliveryState.QUEUED] == 2


async def test_status_change_fires_and_merges_fields(store: Store) -> None:
    first = conversion(click_id="abc", sub1="x", extra={"k": "1"}, event_time="1000")
    await arrive(store, first)
    change = conversion(status="approved", payout="7", sub1="y", extra={"j": "2"})
    plan = Planner(change, postbacks=(201,))

    result = await store.record_arrival("generic", change, at(60), plan)

    assert plan.calls == [(Transition.STATUS_CHANGED, Status.PENDING)]
    # The rules see the conversion as it now stands: stored fields merged with those sent.
    seen = plan.seen[0]
    assert (seen.status, seen.payout, seen.fields["click_id"], seen.fields["sub1"]) == (
        Status.APPROVED,
        Decimal("7"),
        "abc",
        "y",
    )
    assert seen.extra == {"k": "1", "j": "2"}
    assert (result.transition, result.previous_status, result.arrival_seq) == (
        Transition.STATUS_CHANGED,
        Status.PENDING,
        2,
    )
    detail = await store.get_delivery(result.delivery_ids[0])
    assert detail is not None
    assert detail.delivery.idempotency_key == "generic:c1:2:201"
    stored = await store.get_conversion("generic", "c1")
    assert stored is not None
    assert stored.status is Status.APPROVED
    assert stored.fields == {
        "conversion_id": "c1",
        "offer": "501",
        "affiliate": "42",
        "status": "approved",
        "click_id": "abc",
        "sub1": "y",
        "payout": "7",
        "event_time": "1000",
        "extra": {"k": "1", "j": "2"},
    }
    # The change carried no event time: the one that set the previous status still counts.
    assert stored.status_event_time == datetime.fromtimestamp(1000, UTC)
    assert stored.updated_at == at(60)


async def test_older_event_is_stale_recorded_and_changes_nothing(store: Store) -> None:
    await arrive(store, conversion(event_time="2000"))
    await arrive(store, conversion(status="approved", event_time="3000"), at(10))
    late = conversion(status="rejected", event_time="2500", sub1="late")
    plan = Planner(late)

    result = await store.record_arrival("generic", late, at(20), plan)

    assert plan.calls == [(Transition.STALE, Status.APPROVED)]
    assert (result.transition, result.arrival_seq, result.delivery_ids) == (
        Transition.STALE,
        3,
        [],
    )
    stored = await store.get_conversion("generic", "c1")
    assert stored is not None
    assert (stored.status, stored.updated_at) == (Status.APPROVED, at(10))
    assert stored.status_event_time == datetime.fromtimestamp(3000, UTC)
    assert "sub1" not in stored.fields
    assert [a["transition"] for a in stored.arrivals] == [
        Transition.NEW,
        Transition.STATUS_CHANGED,
        Transition.STALE,
    ]
    assert stored.arrivals[2]["event_time"] == datetime.fromtimestamp(2500, UTC)
    assert (await store.queue_depth())[DeliveryState.QUEUED] == 4


async def test_arrivals_are_numbered_per_conversion_and_source(store: Store) -> None:
    statuses = ["pending", "approved", "approved", "rejected"]
    seqs = [
        (await store.record_arrival("generic", c, at(i), Planner(c))).arrival_seq
        for i, c in enumerate(conversion(status=s) for s in statuses)
    ]
    other = conversion("c2")
    first = conversion()
    elsewhere = await store.record_arrival("everflow", first, T0, Planner(first, "everflow"))
    second = await store.record_arrival("generic", other, T0, Planner(other))

    assert seqs == [1, 2, 3, 4]
    assert (elsewhere.transition, elsewhere.arrival_seq) == (Transition.NEW, 1)
    assert (second.transition, second.arrival_seq) == (Transition.NEW, 1)


async def test_a_planner_that_raises_writes_nothing(store: Store) -> None:
    conv = conversion()
    with pytest.raises(RuntimeError, match="rules exploded"):
        await store.record_arrival(
            "generic", conv, T0, Planner(conv, fail=RuntimeError("rules exploded"))
        )
    assert await store.get_conversion("generic", "c1") is None

    await arrive(store, conv)
    change = conversion(status="approved", sub1="new")
    with pytest.raises(RuntimeError):
        await store.record_arrival(
            "generic", change, at(5), Planner(change, fail=RuntimeError("x"))
        )
    stored = await store.get_conversion("generic", "c1")
    assert stored is not None
    assert (stored.status, len(stored.arrivals), stored.updated_at) == (Status.PENDING, 1, T0)
    assert "sub1" not in stored.fields
    assert sum((await store.queue_depth()).values()) == 2


async def test_one_failing_arrival_does_not_fail_concurrent_ones(store: Store) -> None:
    good = [conversion(f"ok{i}") for i in range(10)]
    bad = conversion("bad")
    calls = [store.record_arrival("generic", c, T0, Planner(c)) for c in good]
    calls.insert(5, store.record_arrival("generic", bad, T0, Planner(bad, fail=ValueError("no"))))

    results = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(results[5], ValueError)
    assert [r.transition for r in results if not isinstance(r, BaseException)] == [
        Transition.NEW
    ] * 10
    assert await store.get_conversion("generic", "bad") is None
    assert (await store.queue_depth())[DeliveryState.QUEUED] == 20


async def _same_new_conversion(stores: list[Store], n: int) -> None:
    conv = conversion("race")
    calls = [
        stores[i % len(stores)].record_arrival("generic", conv, at(i), Planner(conv))
        for i in range(n)
    ]
    results = await asyncio.gather(*calls)

    transitions = [r.transition for r in results]
    assert transitions.count(Transition.NEW) == 1
    assert transitions.count(Transition.DUPLICATE) == n - 1
    assert sorted(r.arrival_seq for r in results) == list(range(1, n + 1))
    new = next(r for r in results if r.transition is Transition.NEW)
    assert new.arrival_seq == 1
    assert [len(r.delivery_ids) for r in results].count(0) == n - 1
    stored = await stores[0].get_conversion("generic", "race")
    assert stored is not None
    assert len(stored.arrivals) == n
    assert (await stores[0].queue_depth())[DeliveryState.QUEUED] == 2


async def test_concurrent_arrivals_of_one_new_conversion_store_it_once(store: Store) -> None:
    await _same_new_conversion([store], 20)


async def test_two_nodes_racing_on_one_new_conversion_store_it_once(backend: Backend) -> None:
    stores = [await backend.open(), await backend.open()]
    await _same_new_conversion(stores, 20)


async def test_times_come_back_as_utc(store: Store) -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5)))
    ids = await arrive(store, conversion(event_time="2026-03-01T09:00:00+02:00"), local)

    stored = await store.get_conversion("generic", "c1")
    detail = await store.get_delivery(ids[0])
    assert stored is not None
    assert detail is not None
    assert stored.created_at == T0
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.status_event_time == datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    assert detail.delivery.created_at.tzinfo is not None
    assert detail.delivery.created_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="naive"):
        await arrive(store, conversion("c2"), datetime(2026, 3, 1, 12, 0))


async def test_unknown_rows_are_none(store: Store) -> None:
    assert await store.get_conversion("generic", "nope") is None
    assert await store.get_delivery("0" * 32) is None
    await store.ping()
