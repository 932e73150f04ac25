"""finish_attempts (several attempts' results in one write), on both backends: each item is
written as finish_attempt would write it, and keeps its own outcome: a lost claim, an impossible
state or a row the database refuses fails that item alone."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.errors import StoreError
from daemon.store.base import DeliveryState, Finish, Store
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore
from tests.store.conftest import Backend
from tests.store.support import LEASE, arrive, at, attempt, conversion


async def claims(store: Store, n: int, prefix: str = "c") -> list[Finish]:
    """n claims of new deliveries, each with a succeeded attempt to record."""
    for i in range(n):
        await arrive(store, conversion(f"{prefix}{i}"), postbacks=(101,))
    found = await store.claim_due("n1", at(1), n, LEASE)
    assert len(found) == n
    return [Finish(c, attempt(at(2)), DeliveryState.SUCCEEDED, None) for c in found]


async def refuse_attempt_one(store: Store, delivery_id: str) -> None:
    """An attempt row numbered 1 already there: the next attempt's row of this delivery is
    refused (its primary key), a failure of the database's own."""
    row = (delivery_id, 1, 250, "succeeded", "v1", "n0")
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        try:
            conn.execute(
                "INSERT INTO attempt (delivery_id, n, started_at, duration_ms, outcome,"
                " rules_version, node) VALUES (?, ?, 0, ?, ?, ?, ?)",
                row,
            )
            conn.commit()
        finally:
            conn.close()
        return
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(store._dsn)
    try:
        await conn.execute(
            "INSERT INTO attempt (delivery_id, n, started_at, duration_ms, outcome,"
            " rules_version, node) VALUES ($1, $2, now(), $3, $4, $5, $6)",
            *row,
        )
    finally:
        await conn.close()


async def test_each_item_is_written_as_finish_attempt_writes_it(store: Store) -> None:
    items = await claims(store, 3)
    items[1] = Finish(
        items[1].claim,
        attempt(at(3), "retry", "http_503"),
        DeliveryState.RETRYING,
        at(60),
    )

    assert await store.finish_attempts(items) == [True, True, True]

    for item in items:
        detail = await store.get_delivery(item.claim.delivery_id)
        assert detail is not None
        row = detail.delivery
        assert (row.state, row.attempts, row.next_attempt_at) == (
            item.state,
            1,
            item.next_attempt_at,
        )
        assert row.last_reason == item.attempt.reason
        assert row.updated_at == item.attempt.started_at + timedelta(milliseconds=250)
        assert detail.attempts == [item.attempt]
    assert await store.claim_due("n1", at(59), 10, LEASE) == []
    [again] = await store.claim_due("n1", at(60), 10, LEASE)
    assert (again.delivery_id, again.attempts) == (items[1].claim.delivery_id, 1)


async def test_attempts_are_numbered_on_from_the_delivery(store: Store) -> None:
    [item] = await claims(store, 1)
    first = Finish(item.claim, attempt(at(2), "retry", "timeout"), DeliveryState.RETRYING, at(10))
    assert await store.finish_attempts([first]) == [True]
    [claim] = await store.claim_due("n1", at(10), 1, LEASE)
    [other] = await claims(store, 1, prefix="d")
    second = Finish(claim, attempt(at(11)), DeliveryState.SUCCEEDED, None)

    assert await store.finish_attempts([second, other]) == [True, True]

    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    assert detail.delivery.attempts == 2
    assert [a.reason for a in detail.attempts] == ["timeout", None]


async def test_a_lost_claim_is_false_for_that_item_alone(store: Store) -> None:
    items = await claims(store, 3)
    assert await store.release(items[1].claim, at(1)) is True  # its token is gone

    assert await store.finish_attempts(items) == [True, False, True]

    states = []
    for item in items:
        detail = await store.get_delivery(item.claim.delivery_id)
        assert detail is not None
        states.append((detail.delivery.state, len(detail.attempts)))
    assert states == [
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.QUEUED, 0),
        (DeliveryState.SUCCEEDED, 1),
    ]


async def test_an_old_token_beside_the_new_one_of_the_same_delivery(store: Store) -> None:
    """A lease that ended and was claimed again: the old claim's result is refused, the new
    one's written, even in one write."""
    [old] = await claims(store, 1)
    [new] = await store.claim_due("n1", at(1) + LEASE + timedelta(seconds=1), 1, LEASE)
    assert new.delivery_id == old.claim.delivery_id
    again = Finish(new, attempt(at(40), "retry", "http_500"), DeliveryState.RETRYING, at(100))

    assert await store.finish_attempts([old, again]) == [False, True]

    detail = await store.get_delivery(new.delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.delivery.attempts) == (DeliveryState.RETRYING, 1)
    assert [a.reason for a in detail.attempts] == ["http_500"]


async def test_an_impossible_state_fails_that_item_alone(store: Store) -> None:
    items = await claims(store, 3)
    items[0] = Finish(items[0].claim, items[0].attempt, DeliveryState.RETRYING, None)

    results = await store.finish_attempts(items)

    assert isinstance(results[0], ValueError)
    assert "next_attempt_at" in str(results[0])
    assert results[1:] == [True, True]
    detail = await store.get_delivery(items[0].claim.delivery_id)
    assert detail is not None
    assert (detail.delivery.state, detail.attempts) == (DeliveryState.IN_FLIGHT, [])


async def test_a_row_the_database_refuses_fails_that_item_alone(store: Store) -> None:
    items = await claims(store, 4)
    await refuse_attempt_one(store, items[2].claim.delivery_id)

    results = await store.finish_attempts(items)

    assert [r is True for r in results] == [True, True, False, True]
    error = results[2]
    assert error.__class__.__name__ == "StoreError"
    assert str(error).startswith(("sqlite: IntegrityError", "postgresql: UniqueViolation"))
    refused = await store.get_delivery(items[2].claim.delivery_id)
    assert refused is not None  # nothing of it written: still claimed, its lease decides
    assert (refused.delivery.state, refused.delivery.attempts) == (DeliveryState.IN_FLIGHT, 0)
    for i in (0, 1, 3):
        detail = await store.get_delivery(items[i].claim.delivery_id)
        assert detail is not None
        assert (detail.delivery.state, detail.attempts) == (
            DeliveryState.SUCCEEDED,
            [items[i].attempt],
        )


async def test_a_write_that_fails_as_a_whole_raises(backend: Backend) -> None:
    store = await backend.open()
    items = await claims(store, 2)
    await store.close()
    try:
        with pytest.raises(StoreError, match="not open"):
            await store.finish_attempts(items)
    finally:
        await store.open()
    assert await store.finish_attempts(items) == [True, True]  # nothing was written


async def test_nothing_to_write(store: Store) -> None:
    assert await store.finish_attempts([]) == []


@pytest.mark.parametrize("n", [1, 200])
async def test_many_items_in_one_write(store: Store, n: int) -> None:
    items = await claims(store, n)
    assert await store.finish_attempts(items) == [True] * n
    depth = await store.queue_depth()
    assert depth[DeliveryState.SUCCEEDED] == n
