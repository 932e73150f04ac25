"""Contract: deliveries held by an open circuit breaker (hold / unhold), on both backends."""

from __future__ import annotations

from daemon.store.base import DeliveryState, Store

from .conftest import Backend
from .support import LEASE, T0, arrive, at, claim_one, conversion, finish

SAFETY = at(3600)


async def test_a_held_claim_is_not_an_attempt_and_waits_for_the_safety_time(store: Store) -> None:
    [delivery_id] = await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, at(1))

    assert await store.hold(claim, SAFETY, at(1)) is True

    detail = await store.get_delivery(delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.attempts, detail.attempts) == (
        DeliveryState.QUEUED,
        0,
        [],
    )
    assert detail.delivery.next_attempt_at == SAFETY
    assert await store.claim_due("n1", at(3599), 10, LEASE) == []
    again = await claim_one(store, SAFETY)  # the holder died: due at the safety time
    assert (again.delivery_id, again.attempts) == (delivery_id, 0)


async def test_hold_is_fenced_by_the_claim_token(backend: Backend) -> None:
    node_a, node_b = await backend.open(), await backend.open()
    await arrive(node_a, conversion(), postbacks=(101,))
    old = await claim_one(node_a, T0, node="a")
    new = await claim_one(node_b, at(31), node="b")  # a's lease ended

    assert await node_a.hold(old, SAFETY, at(32)) is False
    assert await node_b.hold(new, SAFETY, at(32)) is True
    assert await node_b.hold(new, SAFETY, at(33)) is False  # no longer claimed


async def test_unhold_makes_the_backlog_due_at_once_oldest_first(store: Store) -> None:
    ids = [(await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,)))[0] for i in range(4)]
    other = (await arrive(store, conversion("x"), at(2.5), postbacks=(102,)))[0]
    claims = await store.claim_due("n1", at(10), 10, LEASE)
    held = [c for c in claims if c.postback_id == 101]
    for claim in reversed(held):  # held in any order
        assert await store.hold(claim, SAFETY, at(10))
    [other_claim] = [c for c in claims if c.postback_id == 102]
    assert await finish(store, other_claim, DeliveryState.RETRYING, at(11), at(500))

    assert await store.claim_due("n1", at(20), 10, LEASE) == []
    assert await store.unhold("host101.example", at(20)) == 4
    assert await store.unhold("host101.example", at(21)) == 0  # nothing is held any more
    assert await store.unhold("host102.example", at(21)) == 0  # never held: its retry stays

    drained = await store.claim_due("n1", at(21), 10, LEASE)
    assert [c.delivery_id for c in drained] == ids  # due again when first due: oldest first
    assert all(c.attempts == 0 for c in drained)
    detail = await store.get_delivery(other)
    assert detail is not None
    assert detail.delivery.next_attempt_at == at(500)


async def test_a_second_hold_keeps_the_first_due_time(store: Store) -> None:
    first = (await arrive(store, conversion("a"), at(0), postbacks=(101,)))[0]
    second = (await arrive(store, conversion("b"), at(5), postbacks=(101,)))[0]
    claim = await claim_one(store, at(1))
    assert claim.delivery_id == first
    assert await store.hold(claim, at(100), at(1))
    later = await claim_one(store, at(6))
    assert later.delivery_id == second
    assert await store.hold(later, at(3600), at(6))
    again = await claim_one(store, at(100))  # the safety time passed while still open
    assert again.delivery_id == first
    assert await store.hold(again, at(3600), at(100))  # held again: keeps at(0)

    assert await store.unhold("host101.example", at(200)) == 2
    drained = await store.claim_due("n1", at(200), 10, LEASE)
    assert [c.delivery_id for c in drained] == [first, second]


async def test_a_delivery_that_left_its_hold_is_not_unheld(store: Store) -> None:
    [delivery_id] = await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, at(1))
    assert await store.hold(claim, at(60), at(1))
    taken = await claim_one(store, at(60), node="n2")  # the holder died; another node tries
    assert await finish(store, taken, DeliveryState.RETRYING, at(61), at(900))

    assert await store.unhold("host101.example", at(70)) == 0

    detail = await store.get_delivery(delivery_id)
    assert detail is not None
    assert (detail.delivery.attempts, detail.delivery.next_attempt_at) == (1, at(900))


async def test_a_held_retrying_delivery_keeps_its_attempts_and_state(store: Store) -> None:
    [delivery_id] = await arrive(store, conversion(), postbacks=(101,))
    claim = await claim_one(store, at(1))
    assert await finish(store, claim, DeliveryState.RETRYING, at(2), at(10))
    again = await claim_one(store, at(10))
    assert await store.hold(again, SAFETY, at(10))

    detail = await store.get_delivery(delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.attempts) == (DeliveryState.RETRYING, 1)
    assert await store.unhold("host101.example", at(30)) == 1
    back = await claim_one(store, at(30))
    assert (back.delivery_id, back.attempts) == (delivery_id, 1)


async def test_unhold_with_a_limit_makes_the_oldest_held_due_and_keeps_the_rest(
    store: Store,
) -> None:
    ids = [(await arrive(store, conversion(f"c{i}"), at(i), postbacks=(101,)))[0] for i in range(3)]
    for claim in reversed(await store.claim_due("n1", at(10), 10, LEASE)):
        assert await store.hold(claim, SAFETY, at(10))

    assert await store.unhold("host101.example", at(20), limit=1) == 1  # the pause ended

    [probe] = await store.claim_due("n1", at(20), 10, LEASE)
    assert probe.delivery_id == ids[0]
    assert await store.unhold("host101.example", at(21)) == 2  # the probe succeeded
    rest = await store.claim_due("n1", at(21), 10, LEASE)
    assert [c.delivery_id for c in rest] == ids[1:]
