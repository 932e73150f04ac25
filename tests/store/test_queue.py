"""Contract: cancel, requeue, listing with cursors and filters, queue depth, prune."""

from __future__ import annotations

from datetime import timedelta

import pytest

from daemon.errors import InputError
from daemon.store.base import LIVE_STATES, DeliveryFilter, DeliveryState, Store

from .support import LEASE, T0, arrive, at, conversion, finish

# QUEUED last: a queued delivery would be claimed when the next one is brought to its state.
STATES = [
    DeliveryState.IN_FLIGHT,
    DeliveryState.RETRYING,
    DeliveryState.SUCCEEDED,
    DeliveryState.DEAD,
    DeliveryState.CANCELLED,
    DeliveryState.QUEUED,
]


async def _in_state(
    store: Store, state: DeliveryState, pid: int, when: float, cid: str | None = None
) -> str:
    """A delivery of postback `pid` (its own conversion) brought to `state`; create queued
    ones last (a claim takes the oldest due delivery)."""
    [delivery_id] = await arrive(
        store, conversion(cid or f"{state.value}-{pid}"), at(when), postbacks=(pid,)
    )
    if state is DeliveryState.QUEUED:
        return delivery_id
    [claim] = await store.claim_due("n1", at(when), 1, timedelta(days=1))
    assert claim.delivery_id == delivery_id
    if state is not DeliveryState.IN_FLIGHT:
        next_at = at(when + 3600) if state is DeliveryState.RETRYING else None
        assert await finish(store, claim, state, at(when), next_at)
    return delivery_id


async def _state(store: Store, delivery_id: str) -> DeliveryState:
    detail = await store.get_delivery(delivery_id)
    assert detail is not None
    return detail.delivery.state


async def test_queue_depth_counts_every_state(store: Store) -> None:
    assert await store.queue_depth() == dict.fromkeys(DeliveryState, 0)
    for i, state in enumerate([DeliveryState.DEAD, *STATES]):
        await _in_state(store, state, 100 + i, i)

    depth = await store.queue_depth()

    assert depth == {state: 1 for state in DeliveryState} | {DeliveryState.DEAD: 2}


async def test_queue_depth_live_only_counts_the_states_before_a_final_one(store: Store) -> None:
    assert await store.queue_depth(live_only=True) == dict.fromkeys(LIVE_STATES, 0)
    for i, state in enumerate([DeliveryState.RETRYING, *STATES]):
        await _in_state(store, state, 100 + i, i)

    live = await store.queue_depth(live_only=True)

    assert live == {
        DeliveryState.QUEUED: 1,
        DeliveryState.IN_FLIGHT: 1,
        DeliveryState.RETRYING: 2,
    }
    everything = await store.queue_depth()
    assert {state: everything[state] for state in LIVE_STATES} == live


async def test_cancel_postbacks_cancels_only_waiting_deliveries(store: Store) -> None:
    ids = {state: await _in_state(store, state, 101, i) for i, state in enumerate(STATES)}
    other = await _in_state(store, DeliveryState.QUEUED, 102, 10)

    assert await store.cancel_postbacks([101, 999], at(20)) == 2

    after = {state: await _state(store, d) for state, d in ids.items()}
    assert after == {
        DeliveryState.QUEUED: DeliveryState.CANCELLED,
        DeliveryState.RETRYING: DeliveryState.CANCELLED,
        DeliveryState.IN_FLIGHT: DeliveryState.IN_FLIGHT,
        DeliveryState.SUCCEEDED: DeliveryState.SUCCEEDED,
        DeliveryState.DEAD: DeliveryState.DEAD,
        DeliveryState.CANCELLED: DeliveryState.CANCELLED,
    }
    assert await _state(store, other) is DeliveryState.QUEUED
    claimable = await store.claim_due("n1", at(10_000), 10, LEASE)
    assert [c.delivery_id for c in claimable] == [other]
    assert await store.cancel_postbacks([], at(21)) == 0


async def test_requeue_brings_dead_and_cancelled_back_due_now(store: Store) -> None:
    ids = {state: await _in_state(store, state, 101, i) for i, state in enumerate(STATES)}

    assert await store.requeue([*ids.values(), "f" * 32], at(50)) == 2

    for state in (DeliveryState.DEAD, DeliveryState.CANCELLED):
        detail = await store.get_delivery(ids[state])
        assert detail is not None
        assert (detail.delivery.state, detail.delivery.next_attempt_at) == (
            DeliveryState.QUEUED,
            at(50),
        )
        assert detail.delivery.updated_at == at(50)
    assert await _state(store, ids[DeliveryState.SUCCEEDED]) is DeliveryState.SUCCEEDED
    assert await _state(store, ids[DeliveryState.RETRYING]) is DeliveryState.RETRYING
    claimed = {c.delivery_id for c in await store.claim_due("n2", at(50), 10, LEASE)}
    assert claimed == {
        ids[s] for s in (DeliveryState.DEAD, DeliveryState.CANCELLED, DeliveryState.QUEUED)
    }


async def test_requeue_matching_uses_the_filter(store: Store) -> None:
    old_dead = await _in_state(store, DeliveryState.DEAD, 101, 0)
    new_dead = await _in_state(store, DeliveryState.DEAD, 101, 100, cid="later")
    other_dead = await _in_state(store, DeliveryState.DEAD, 102, 100)
    await _in_state(store, DeliveryState.SUCCEEDED, 101, 100)
    flt = DeliveryFilter(state=DeliveryState.DEAD, postback_ids=[101], since=at(50))

    assert await store.requeue_matching(flt, at(200)) == 1

    assert await _state(store, new_dead) is DeliveryState.QUEUED
    assert await _state(store, old_dead) is DeliveryState.DEAD
    assert await _state(store, other_dead) is DeliveryState.DEAD
    assert await store.requeue_matching(DeliveryFilter(conversion_id="dead-102"), at(201)) == 1
    assert await _state(store, other_dead) is DeliveryState.QUEUED


async def test_listing_pages_newest_first_with_a_cursor(store: Store) -> None:
    created = []
    for i in range(4):
        created += await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101, 102))
    expected = sorted(created, key=lambda d: (int(d[:12], 16), d), reverse=True)

    pages, cursor = [], None
    while True:
        page, cursor = await store.list_deliveries(DeliveryFilter(), 3, cursor)
        pages.append([row.delivery_id for row in page])
        if cursor is None:
            break

    assert [len(p) for p in pages] == [3, 3, 2]
    assert [d for p in pages for d in p] == expected
    first, _ = await store.list_deliveries(DeliveryFilter(), 3, None)
    assert [row.created_at for row in first] == [at(3), at(3), at(2)]
    exact, cursor = await store.list_deliveries(DeliveryFilter(), 8, None)
    assert (len(exact), cursor) == (8, None)


async def test_listing_filters(store: Store) -> None:
    dead = await _in_state(store, DeliveryState.DEAD, 102, 10)
    done = await _in_state(store, DeliveryState.SUCCEEDED, 103, 20)
    queued = await _in_state(store, DeliveryState.QUEUED, 101, 0)

    async def ids(flt: DeliveryFilter) -> list[str]:
        rows, _ = await store.list_deliveries(flt, 50, None)
        return [row.delivery_id for row in rows]

    assert await ids(DeliveryFilter()) == [done, dead, queued]
    assert await ids(DeliveryFilter(state=DeliveryState.DEAD)) == [dead]
    assert await ids(DeliveryFilter(postback_ids={101, 103})) == [done, queued]
    assert await ids(DeliveryFilter(postback_ids=[])) == []  # sees no postback: sees nothing
    assert await ids(DeliveryFilter(conversion_id="queued-101")) == [queued]
    assert await ids(DeliveryFilter(since=at(10))) == [done, dead]
    assert await ids(DeliveryFilter(state=DeliveryState.SUCCEEDED, postback_ids=[101])) == []
    rows, _ = await store.list_deliveries(DeliveryFilter(state=DeliveryState.DEAD), 50, None)
    assert (rows[0].attempts, rows[0].last_reason, rows[0].next_attempt_at) == (1, None, None)


async def test_a_malformed_cursor_is_an_input_error(store: Store) -> None:
    for cursor in ["garbage", "12_", "_abc", "1' OR 1=1", "9" * 30 + "_ab", "9" * 19 + "_ab"]:
        with pytest.raises(InputError) as caught:
            await store.list_deliveries(DeliveryFilter(), 10, cursor)
        assert caught.value.field == "cursor"


async def test_prune_keeps_conversions_with_pending_deliveries(store: Store) -> None:
    finished = await _in_state(store, DeliveryState.SUCCEEDED, 101, 0)
    waiting = await _in_state(store, DeliveryState.RETRYING, 102, 0)
    in_flight = await _in_state(store, DeliveryState.IN_FLIGHT, 103, 0)
    recent = await _in_state(store, DeliveryState.DEAD, 105, 500)
    queued = await _in_state(store, DeliveryState.QUEUED, 104, 0)
    await arrive(store, conversion("no-deliveries"), at(0), postbacks=())

    assert await store.prune(at(100)) == 2

    assert await store.get_delivery(finished) is None
    assert await store.get_conversion("generic", "succeeded-101") is None
    assert await store.get_conversion("generic", "no-deliveries") is None
    for kept in (waiting, in_flight, queued, recent):
        assert await store.get_delivery(kept) is not None
    assert await store.get_conversion("generic", "retrying-102") is not None
    assert await store.prune(at(100)) == 0
    assert sum((await store.queue_depth()).values()) == 4


async def test_pruned_conversion_arrives_again_as_new(store: Store) -> None:
    await _in_state(store, DeliveryState.SUCCEEDED, 101, 0)
    assert await store.prune(at(100)) == 1

    ids = await arrive(store, conversion("succeeded-101"), at(200), postbacks=(101,))

    stored = await store.get_conversion("generic", "succeeded-101")
    assert stored is not None
    assert [a["seq"] for a in stored.arrivals] == [1]
    assert len(ids) == 1
    assert stored.created_at > T0


async def test_delivery_lag_is_the_age_of_the_oldest_due_unclaimed_delivery(store: Store) -> None:
    assert await store.delivery_lag(at(0)) == 0.0  # nothing at all
    [first] = await arrive(store, conversion("lag-1"), at(10), postbacks=(101,))
    assert await store.delivery_lag(at(5)) == 0.0  # not due yet
    assert await store.delivery_lag(at(17.5)) == 7.5

    [claim] = await store.claim_due("n1", at(20), 1, LEASE)  # in flight: not waiting
    assert claim.delivery_id == first
    assert await store.delivery_lag(at(21)) == 0.0
    # A lease that ended makes it due again, for anyone, from the lease's end.
    assert await store.delivery_lag(at(20 + LEASE.total_seconds() + 4)) == 4.0

    assert await finish(store, claim, DeliveryState.RETRYING, at(22), at(3600))
    await arrive(store, conversion("lag-2"), at(100), postbacks=(102,))
    assert await store.delivery_lag(at(130)) == 30.0  # the retry is not due yet
    assert await store.delivery_lag(at(3610)) == 3510.0  # the queued one is older than it

    for claim in await store.claim_due("n1", at(3610), 10, LEASE):
        assert await finish(store, claim, DeliveryState.SUCCEEDED, at(3611))
    assert await store.delivery_lag(at(99_999)) == 0.0  # final deliveries never wait


async def test_a_listing_by_postbacks_pages_newest_first_across_them(store: Store) -> None:
    # Each store reads a page of each postback's own newest deliveries and merges them (the
    # postbacks' index; SQLiteStore up to MERGED_POSTBACKS): the pages hold every delivery of
    # those postbacks once, newest first, the id breaking ties of one instant, a state filter
    # and a time range applied, and the cursor goes on where a page ended.
    made: dict[str, tuple[int, int]] = {}
    for n in range(24):  # postbacks 201 to 203, two deliveries at each instant
        [delivery_id] = await arrive(
            store, conversion(f"pages-{n}"), at(n // 2), postbacks=(201 + n % 3,)
        )
        made[delivery_id] = (n // 2, 201 + n % 3)
    claimed = {c.delivery_id for c in await store.claim_due("n1", at(100), 5, timedelta(days=1))}

    async def pages(flt: DeliveryFilter) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = await store.list_deliveries(flt, 4, cursor)
            seen += [row.delivery_id for row in page]
            if cursor is None:
                return seen

    def wanted(postbacks: set[int], queued_only: bool = False, since: int = 0) -> list[str]:
        found = [
            d
            for d, (when, pid) in made.items()
            if pid in postbacks and when >= since and not (queued_only and d in claimed)
        ]
        return sorted(found, key=lambda d: (made[d][0], d), reverse=True)

    assert await pages(DeliveryFilter(postback_ids=[202, 203])) == wanted({202, 203})
    assert await pages(DeliveryFilter(postback_ids=[201, 202, 203, 999])) == wanted({201, 202, 203})
    queued = DeliveryFilter(postback_ids=[201, 203], state=DeliveryState.QUEUED)
    assert claimed & set(wanted({201, 203}))  # the state filter leaves some out
    assert await pages(queued) == wanted({201, 203}, queued_only=True)
    recent = DeliveryFilter(postback_ids=[201, 202], since=at(7))
    assert await pages(recent) == wanted({201, 202}, since=7)
