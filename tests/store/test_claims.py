"""Contract: claiming due deliveries, leases and fencing, finishing attempts, release."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest

from daemon.store.base import Claim, DeliveryState, Store

from .conftest import Backend
from .support import LEASE, T0, arrive, at, attempt, claim_one, conversion, finish


async def test_claims_oldest_due_first_up_to_the_limit(store: Store) -> None:
    ids = [(await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,)))[0] for i in range(5)]

    first = await store.claim_due("n1", at(10), 3, LEASE)
    second = await store.claim_due("n1", at(10), 3, LEASE)
    third = await store.claim_due("n1", at(10), 3, LEASE)

    assert [c.delivery_id for c in first] == ids[:3]
    assert [c.delivery_id for c in second] == ids[3:]
    assert third == []


async def test_every_claim_has_a_token_of_its_own(store: Store) -> None:
    """The token fences a claim against its own expired lease: the deliveries of one claim,
    and the same delivery claimed again, never share one. Both stores make it in their claim
    statement."""
    ids = [(await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,)))[0] for i in range(6)]
    claims = await store.claim_due("n1", at(10), 6, LEASE)
    assert sorted(c.delivery_id for c in claims) == sorted(ids)
    tokens = {c.token for c in claims}
    assert len(tokens) == 6
    for claim in claims:
        assert await store.release(claim, at(11))
    again = await store.claim_due("n1", at(12), 6, LEASE)
    assert len(again) == 6
    assert not tokens & {c.token for c in again}
    for claim in claims:  # the old tokens no longer finish anything
        assert not await finish(store, claim, DeliveryState.SUCCEEDED, at(13))


async def test_claim_carries_the_arrival_data(store: Store) -> None:
    conv = conversion(click_id="abc", payout="2.5", extra={"foo": "bar"})
    [delivery_id] = await arrive(store, conv, postbacks=(101,))

    claim = await claim_one(store, T0, node="n1")

    assert claim.delivery_id == delivery_id
    assert (claim.postback_id, claim.source, claim.conversion_id) == (101, "generic", "c1")
    assert (claim.arrival_seq, claim.attempts, claim.created_at) == (1, 0, T0)
    assert claim.idempotency_key == "generic:c1:1:101"
    assert claim.data["payout"] == 2.5
    assert claim.data["extra"] == {"foo": "bar"}
    assert claim.data["transition"] == "new"
    assert claim.values["click_id"] == "abc"
    assert claim.values["extra.foo"] == "bar"
    assert re.fullmatch("[0-9a-f]{32}", claim.token)
    detail = await store.get_delivery(delivery_id)
    assert detail is not None
    assert detail.delivery.state is DeliveryState.IN_FLIGHT


async def test_deliveries_not_yet_due_are_not_claimed(store: Store) -> None:
    await arrive(store, conversion(), at(100), postbacks=(101,))

    assert await store.claim_due("n1", at(99), 10, LEASE) == []
    claim = await claim_one(store, at(100))
    assert await finish(store, claim, DeliveryState.RETRYING, at(101), at(200))
    assert await store.claim_due("n1", at(199), 10, LEASE) == []
    again = await claim_one(store, at(200))
    assert (again.delivery_id, again.attempts) == (claim.delivery_id, 1)


async def test_an_expired_lease_is_taken_over_and_the_old_token_is_fenced(
    backend: Backend,
) -> None:
    node_a, node_b = await backend.open(), await backend.open()
    [delivery_id] = await arrive(node_a, conversion(), postbacks=(101,))
    old = await claim_one(node_a, T0, node="a")

    assert await node_b.claim_due("b", at(29), 10, LEASE) == []  # lease still held
    new = await claim_one(node_b, at(31), node="b")

    assert new.delivery_id == delivery_id
    assert new.token != old.token
    assert await finish(node_a, old, DeliveryState.SUCCEEDED, at(32)) is False
    assert await node_a.release(old, at(32)) is False
    detail = await node_b.get_delivery(delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.attempts, detail.attempts) == (
        DeliveryState.IN_FLIGHT,
        0,
        [],
    )
    assert await finish(node_b, new, DeliveryState.SUCCEEDED, at(33)) is True
    detail = await node_b.get_delivery(delivery_id)
    assert detail is not None
    assert [a.node for a in detail.attempts] == ["n1"]
    assert detail.delivery.state is DeliveryState.SUCCEEDED


async def test_a_finished_claim_cannot_finish_twice(store: Store) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, T0)

    assert await finish(store, claim, DeliveryState.DEAD, at(1)) is True
    assert await finish(store, claim, DeliveryState.SUCCEEDED, at(2)) is False
    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    assert (detail.delivery.state, len(detail.attempts)) == (DeliveryState.DEAD, 1)


async def test_concurrent_claimers_on_several_nodes_never_share_a_delivery(
    backend: Backend,
) -> None:
    nodes = [await backend.open() for _ in range(3)]
    for i in range(60):
        await arrive(nodes[0], conversion(f"c{i}"), at(i % 7), postbacks=(1, 2, 3))

    async def claimer(store: Store, name: str) -> list[Claim]:
        mine: list[Claim] = []
        while batch := await store.claim_due(name, at(10), 7, LEASE):
            mine.extend(batch)
        return mine

    results = await asyncio.gather(
        *(claimer(nodes[i % 3], f"node{i}") for i in range(9)),
    )

    claimed = [c.delivery_id for claims in results for c in claims]
    assert len(claimed) == 180
    assert len(set(claimed)) == 180
    depth = await nodes[0].queue_depth()
    assert (depth[DeliveryState.IN_FLIGHT], depth[DeliveryState.QUEUED]) == (180, 0)


@pytest.mark.parametrize(
    ("state", "next_in"),
    [
        (DeliveryState.SUCCEEDED, None),
        (DeliveryState.DEAD, None),
        (DeliveryState.CANCELLED, None),
        (DeliveryState.RETRYING, 60),
        (DeliveryState.QUEUED, 0),
    ],
)
async def test_finish_attempt_moves_to_every_state(
    store: Store, state: DeliveryState, next_in: int | None
) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, T0)
    next_at = None if next_in is None else at(1 + next_in)
    record = attempt(at(1), outcome="retry", reason="http_503")

    assert await store.finish_attempt(claim, record, state, next_at) is True

    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    row = detail.delivery
    assert (row.state, row.attempts, row.next_attempt_at) == (state, 1, next_at)
    assert row.last_reason == "http_503"
    assert row.updated_at == at(1) + timedelta(milliseconds=250)
    assert detail.attempts == [record]
    claimable = await store.claim_due("n1", at(10_000), 10, LEASE)
    assert [c.attempts for c in claimable] == ([1] if next_in is not None else [])


async def test_attempts_are_listed_in_order(store: Store) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    reasons = ["timeout", "http_502", None]
    for i, reason in enumerate(reasons):
        claim = await claim_one(store, at(100 * i))
        state = DeliveryState.SUCCEEDED if reason is None else DeliveryState.RETRYING
        next_at = None if reason is None else at(100 * (i + 1))
        outcome = "succeeded" if reason is None else "retry"
        await store.finish_attempt(claim, attempt(at(100 * i + 1), outcome, reason), state, next_at)

    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    assert [a.reason for a in detail.attempts] == reasons
    assert [a.started_at for a in detail.attempts] == [at(1), at(101), at(201)]
    assert (detail.delivery.attempts, detail.delivery.last_reason) == (3, None)


async def test_finish_attempt_refuses_an_impossible_state(store: Store) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, T0)

    with pytest.raises(ValueError, match="in_flight"):
        await store.finish_attempt(claim, attempt(at(1)), DeliveryState.IN_FLIGHT, None)
    with pytest.raises(ValueError, match="next_attempt_at"):
        await store.finish_attempt(claim, attempt(at(1)), DeliveryState.RETRYING, None)


async def test_release_makes_a_claim_due_again_at_once(store: Store) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, T0)

    assert await store.release(claim, at(5)) is True
    assert await store.release(claim, at(5)) is False  # the token died with the release
    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.next_attempt_at) == (DeliveryState.QUEUED, at(5))
    assert detail.attempts == []

    again = await claim_one(store, at(5))
    await finish(store, again, DeliveryState.RETRYING, at(6), at(100))
    third = await claim_one(store, at(100))
    assert await store.release(third, at(101)) is True
    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.attempts) == (DeliveryState.RETRYING, 1)
    assert (await claim_one(store, at(101))).attempts == 1


async def test_release_to_a_later_time_postpones_the_delivery(store: Store) -> None:
    await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, T0)

    assert await store.release(claim, at(300)) is True

    assert await store.claim_due("n1", at(299), 10, LEASE) == []
    later = await claim_one(store, at(300))
    assert (later.delivery_id, later.attempts) == (claim.delivery_id, 0)


async def test_recover_gives_back_only_the_restarted_nodes_claims(store: Store) -> None:
    for i in range(3):
        await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,))
    mine = await store.claim_due("host:8080", at(10), 2, LEASE)
    theirs = await store.claim_due("host:8081", at(10), 1, LEASE)

    # The node at host:8080 was killed and starts again: its claims are due at once...
    assert await store.recover("host:8080", at(11)) == 2
    again = await store.claim_due("host:8080", at(11), 10, LEASE)
    assert sorted(c.delivery_id for c in again) == sorted(c.delivery_id for c in mine)
    assert all(c.token not in {m.token for m in mine} for c in again)
    # ...the old tokens are fenced, and the other node's claim is untouched.
    assert not await finish(store, mine[0], DeliveryState.SUCCEEDED, at(12))
    assert await finish(store, theirs[0], DeliveryState.SUCCEEDED, at(12))
    assert await store.recover("host:9999", at(13)) == 0
