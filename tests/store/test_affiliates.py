"""Contract: affiliate postbacks (issue 15): ids, quota, conditional writes, tombstones, audit,
secrets, changes since a version, cancelled deliveries."""

from __future__ import annotations

import asyncio

import pytest

from daemon.store.affiliate_types import (
    FIRST_STORE_ID,
    PostbackChange,
    QuotaExceeded,
    Who,
)
from daemon.store.base import DeliveryFilter, DeliveryState, Store

from .conftest import Backend
from .support import arrive, at, conversion

WHO = Who("tok-a", "Affiliate A user", "42")
BODY = {"trigger": "conversion_done", "action": {"type": "ping_url", "url": "https://t.test/"}}


def change(offer: str = "1", status: str = "active", **body: object) -> PostbackChange:
    return PostbackChange(offer, status, {**BODY, **body})


async def test_ids_start_high_and_are_never_reused(store: Store) -> None:
    first = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    assert first.id >= FIRST_STORE_ID
    assert await store.delete_affiliate_postback(first.id, first.change_seq, WHO, at(1))
    second = await store.create_affiliate_postback("42", change(), WHO, at(2), None)
    assert second.id > first.id


async def test_ids_survive_reopen(backend: Backend) -> None:
    store = await backend.open()
    made = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    assert await store.delete_affiliate_postback(made.id, made.change_seq, WHO, at(0))
    other = await backend.open()
    again = await other.create_affiliate_postback("7", change(), WHO, at(0), None)
    assert again.id > made.id


async def test_quota_counts_live_postbacks_of_that_affiliate(store: Store) -> None:
    a = await store.create_affiliate_postback("42", change(), WHO, at(0), 2)
    await store.create_affiliate_postback("42", change(status="disabled"), WHO, at(0), 2)
    with pytest.raises(QuotaExceeded) as caught:
        await store.create_affiliate_postback("42", change(), WHO, at(0), 2)
    assert caught.value.count == 2
    await store.create_affiliate_postback("77", change(), WHO, at(0), 2)  # not 42's quota
    assert await store.delete_affiliate_postback(a.id, a.change_seq, WHO, at(0))
    await store.create_affiliate_postback("42", change(), WHO, at(0), 2)  # room again
    changes = await store.affiliate_changes(0)
    assert sorted(p.affiliate for p in changes.postbacks if p.status != "deleted") == [
        "42",
        "42",
        "77",
    ]


async def test_update_is_conditional_on_the_version_read(store: Store) -> None:
    made = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    moved = await store.update_affiliate_postback(
        made.id, made.change_seq, change(goal="lead"), WHO, "update", at(1)
    )
    assert moved is not None
    assert moved.body["goal"] == "lead"
    assert moved.change_seq > made.change_seq
    stale = await store.update_affiliate_postback(
        made.id, made.change_seq, change(goal="sale"), WHO, "update", at(2)
    )
    assert stale is None
    assert not await store.delete_affiliate_postback(made.id, made.change_seq, WHO, at(0))
    missing = await store.update_affiliate_postback(
        FIRST_STORE_ID + 10**6, 1, change(), WHO, "update", at(0)
    )
    assert missing is None
    history = await store.affiliate_history(made.id)
    assert [h.change for h in history] == ["create", "update"]
    assert history[1].before is not None
    assert "goal" not in history[1].before["body"]
    assert history[1].after is not None
    assert history[1].after["body"]["goal"] == "lead"
    assert history[0].who == {"id": "tok-a", "name": "Affiliate A user", "affiliate": "42"}


async def test_changes_since_a_version(store: Store) -> None:
    start = (await store.affiliate_changes(0)).version
    made = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    after_create = await store.affiliate_changes(start)
    assert [p.id for p in after_create.postbacks] == [made.id]
    assert (await store.affiliate_changes(after_create.version)).postbacks == []
    assert await store.delete_affiliate_postback(made.id, made.change_seq, WHO, at(0))
    after_delete = await store.affiliate_changes(after_create.version)
    assert [(p.id, p.status) for p in after_delete.postbacks] == [(made.id, "deleted")]
    assert [h.change for h in await store.affiliate_history(made.id)] == ["create", "delete"]


async def test_delete_and_disable_cancel_queued_deliveries(store: Store) -> None:
    a = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    b = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    await arrive(store, conversion("c1"), at(0), postbacks=(a.id, b.id, 5))
    assert await store.delete_affiliate_postback(a.id, a.change_seq, WHO, at(1))
    off = await store.update_affiliate_postback(
        b.id, b.change_seq, change(status="disabled"), WHO, "status", at(1)
    )
    assert off is not None
    rows, _ = await store.list_deliveries(DeliveryFilter(), 10, None)
    states = {r.postback_id: r.state for r in rows}
    assert states == {
        a.id: DeliveryState.CANCELLED,
        b.id: DeliveryState.CANCELLED,
        5: DeliveryState.QUEUED,
    }


async def test_secrets_are_per_affiliate_and_deletions_propagate(store: Store) -> None:
    start = (await store.affiliate_changes(0)).version
    assert await store.set_affiliate_secret("42", "key", "s3cr3t", at(0))
    assert await store.set_affiliate_secret("42", "key", "rotated", at(0))
    assert await store.set_affiliate_secret("77", "other", "x", at(0))
    assert await store.affiliate_secret_names("42") == ["key"]
    assert await store.affiliate_secret_names("77") == ["other"]
    changes = await store.affiliate_changes(start)
    assert {(s.affiliate, s.name, s.value) for s in changes.secrets} == {
        ("42", "key", "rotated"),
        ("77", "other", "x"),
    }
    assert await store.set_affiliate_secret("42", "key", None, at(0))
    assert not await store.set_affiliate_secret("42", "key", None, at(0))
    assert await store.affiliate_secret_names("42") == []
    later = await store.affiliate_changes(changes.version)
    assert [(s.name, s.value) for s in later.secrets] == [("key", None)]


async def test_history_pages(store: Store) -> None:
    made = await store.create_affiliate_postback("42", change(), WHO, at(0), None)
    row = made
    for i in range(4):
        updated = await store.update_affiliate_postback(
            row.id, row.change_seq, change(goal=f"g{i}"), WHO, "update", at(i + 1)
        )
        assert updated is not None
        row = updated
    every = await store.affiliate_history(made.id)
    assert len(every) == 5
    assert [h.seq for h in every] == sorted({h.seq for h in every})
    first = await store.affiliate_history(made.id, 0, 2)
    assert first == every[:2]
    assert await store.affiliate_history(made.id, first[-1].seq, 2) == every[2:4]
    assert await store.affiliate_history(made.id, every[-1].seq) == []


async def test_the_quota_holds_under_concurrent_creates(store: Store) -> None:
    """Red team (issue 15): 20 creates at once against a quota of 3, on every backend (on
    PostgreSQL each on its own pooled connection): exactly 3 are made."""

    async def one() -> bool:
        try:
            await store.create_affiliate_postback("77", change(), WHO, at(0), 3)
        except QuotaExceeded:
            return False
        return True

    made = await asyncio.gather(*(one() for _ in range(20)))
    assert sum(made) == 3
    live = [p for p in (await store.affiliate_changes(0)).postbacks if p.affiliate == "77"]
    assert len(live) == 3
