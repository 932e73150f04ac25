"""record_arrival with a Lease: deliveries written already claimed by the node that ingests them
(Store.record_arrival). Contract (both stores): whatever a lease takes is a claim like
claim_due's (in flight, fenced by its token, finished with it, due again when its lease ends);
what it does not take is queued for claim_due. SQLite takes them; PostgreSQL takes none yet."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from daemon.store.base import DeliveryState, Lease, Store
from daemon.store.sqlite import SQLiteStore

from .conftest import Backend
from .support import LEASE, T0, Planner, at, claim_one, conversion, finish


def lease(limit: int = 10, **skips: list[str]) -> Lease:
    return Lease(node="n1", until=T0 + LEASE, limit=limit, **skips)


async def test_leased_claims_are_claims_and_the_rest_are_queued(store: Store) -> None:
    conv = conversion(click_id="abc", payout="2.5", extra={"foo": "bar"})
    result = await store.record_arrival("generic", conv, T0, Planner(conv), lease(limit=1))

    assert len(result.delivery_ids) == 2
    assert len(result.claims) <= 1
    taken = {c.delivery_id for c in result.claims}
    # The others are queued: claim_due finds exactly them.
    others = await store.claim_due("n2", T0, 10, LEASE)
    assert {c.delivery_id for c in others} == set(result.delivery_ids) - taken
    # A taken one is in flight, claimed by the lease's node: no one else claims it before
    # its lease ends, and it is finished with its token.
    for claim in result.claims:
        detail = await store.get_delivery(claim.delivery_id)
        assert detail is not None
        assert detail.delivery.state is DeliveryState.IN_FLIGHT
        assert await finish(store, claim, DeliveryState.SUCCEEDED, at(1))
        assert not await finish(store, claim, DeliveryState.SUCCEEDED, at(2))  # token spent


async def sqlite(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "leased.db")
    await store.open()
    return store


async def test_sqlite_takes_up_to_the_limit_as_claim_due_would_give_them(tmp_path: Path) -> None:
    store = await sqlite(tmp_path)
    try:
        conv = conversion(click_id="abc", payout="2.5", extra={"foo": "bar"})
        plan = Planner(conv, postbacks=(101, 102, 103))
        result = await store.record_arrival("generic", conv, T0, plan, lease(limit=2))
        assert [c.delivery_id for c in result.claims] == result.delivery_ids[:2]
        first = result.claims[0]
        assert (first.postback_id, first.source, first.conversion_id) == (101, "generic", "c1")
        assert (first.arrival_seq, first.attempts, first.created_at) == (1, 0, T0)
        assert first.idempotency_key == "generic:c1:1:101"
        assert first.destination == "host101.example"
        assert first.token != result.claims[1].token
        # each claim has a copy of its own (an attempt may not change another's data)
        assert first.data == result.claims[1].data
        assert first.data is not result.claims[1].data

        # The third is queued; the two leased ones are not claimable before their lease ends.
        [queued] = await store.claim_due("n2", at(1), 10, LEASE)
        assert queued.delivery_id == result.delivery_ids[2]
        assert await store.claim_due("n2", at(29), 10, LEASE) == []

        # When the lease ends (the node died), claim_due takes them over with the same data
        # and values the leased claims carried, and the old token is fenced.
        late = await store.claim_due("n2", at(30.5), 10, LEASE)
        assert sorted(c.delivery_id for c in late) == sorted(result.delivery_ids[:2])
        by_id = {c.delivery_id: c for c in late}
        for claim in result.claims:
            again = by_id[claim.delivery_id]
            assert (again.data, again.values) == (claim.data, claim.values)
            assert again.created_at == claim.created_at
            assert again.idempotency_key == claim.idempotency_key
        assert not await finish(store, first, DeliveryState.SUCCEEDED, at(32))
        assert await finish(store, by_id[first.delivery_id], DeliveryState.SUCCEEDED, at(32))
    finally:
        await store.close()


async def test_sqlite_lease_skips_destinations_and_affiliates_at_their_share(
    tmp_path: Path,
) -> None:
    store = await sqlite(tmp_path)
    try:
        conv = conversion()
        skipped = await store.record_arrival(
            "generic",
            conv,
            T0,
            Planner(conv, postbacks=(101, 102)),
            lease(skip_destinations=["host101.example"]),
        )
        assert [c.postback_id for c in skipped.claims] == [102]

        other = conversion("c2")
        by_affiliate = await store.record_arrival(
            "generic", other, T0, Planner(other), lease(skip_affiliates=["42"])
        )
        assert by_affiliate.claims == ()  # every planned delivery is the affiliate 42's

        queued = await store.claim_due("n2", T0, 10, LEASE)
        assert sorted(c.delivery_id for c in queued) == sorted(
            [skipped.delivery_ids[0], *by_affiliate.delivery_ids]
        )
    finally:
        await store.close()


async def test_sqlite_no_lease_or_an_empty_one_takes_nothing(tmp_path: Path) -> None:
    store = await sqlite(tmp_path)
    try:
        for n, offer in enumerate([None, lease(limit=0)]):
            conv = conversion(f"c{n}")
            result = await store.record_arrival("generic", conv, T0, Planner(conv), offer)
            assert result.claims == ()
            assert len(result.delivery_ids) == 2
        assert len(await store.claim_due("n1", T0, 10, LEASE)) == 4
        # an arrival that fires nothing (a duplicate) takes nothing either
        again = conversion("c0")
        dup = await store.record_arrival("generic", again, at(1), Planner(again), lease())
        assert (dup.delivery_ids, dup.claims) == ([], ())
    finally:
        await store.close()


async def test_sqlite_lease_of_an_arrival_that_fails_leaves_nothing(tmp_path: Path) -> None:
    """A planner that raises fails the arrival: no row, no claim (the lease is only an offer)."""
    store = await sqlite(tmp_path)
    try:
        conv = conversion()
        plan = Planner(conv, fail=ValueError("boom"))
        try:
            await store.record_arrival("generic", conv, T0, plan, lease())
        except ValueError:
            pass
        else:
            raise AssertionError("the planner's error did not reach the caller")
        assert await store.claim_due("n1", at(3600), 10, LEASE) == []
        ok = await store.record_arrival("generic", conv, T0, Planner(conv), lease())
        assert len(ok.claims) == 2
    finally:
        await store.close()


async def test_postgres_takes_none_yet(backend: Backend) -> None:
    if backend.name != "postgres":
        return
    store = await backend.open()
    conv = conversion()
    result = await store.record_arrival("generic", conv, T0, Planner(conv), lease())
    assert result.claims == ()
    assert len(await claim_one_each(store)) == 2


async def claim_one_each(store: Store) -> list[str]:
    got = await store.claim_due("n1", T0 + timedelta(seconds=1), 10, LEASE)
    return [c.delivery_id for c in got]


async def test_claim_one_helper_still_sees_leased_rows_as_claimed(tmp_path: Path) -> None:
    store = await sqlite(tmp_path)
    try:
        conv = conversion()
        result = await store.record_arrival(
            "generic", conv, T0, Planner(conv, postbacks=(101,)), lease()
        )
        assert len(result.claims) == 1
        assert await store.claim_due("n1", T0, 10, LEASE) == []
        claim = await claim_one(store, at(31), node="n1")  # a restarted n1 after the lease
        assert claim.delivery_id == result.delivery_ids[0]
    finally:
        await store.close()
