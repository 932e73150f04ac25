"""Contract: the sliced delivery and conversion logs of `deliveries list` and
`conversions list` (issue 18), on both backends."""

from __future__ import annotations

import pytest

from daemon.errors import InputError
from daemon.models import Status
from daemon.store.base import Claim, DeliveryState, LogFilter, Store

from .support import LEASE, T0, arrive, at, conversion, finish


async def _fill(store: Store) -> None:
    await arrive(store, conversion("c1"), T0, postbacks=(101, 102))
    await arrive(store, conversion("c2", affiliate="77"), at(1), postbacks=(101,))
    await arrive(store, conversion("c3", offer="900"), at(2), postbacks=(102,))
    await arrive(store, conversion("c1", status="approved"), at(3), postbacks=(103,))


async def test_delivery_log_carries_and_filters_offer_affiliate_and_trigger(store: Store) -> None:
    await _fill(store)
    rows, cursor = await store.delivery_log(LogFilter(), 100, None)
    assert cursor is None
    assert (rows[0].delivery.conversion_id, rows[0].delivery.postback_id) == ("c1", 103)
    assert (rows[0].offer, rows[0].affiliate, rows[0].trigger) == ("501", "42", "conversion_done")
    assert len(rows) == 5

    async def ids(**kw: object) -> list[tuple[str, int]]:
        found, _ = await store.delivery_log(LogFilter(**kw), 100, None)  # type: ignore[arg-type]
        return sorted((r.delivery.conversion_id, r.delivery.postback_id) for r in found)

    assert await ids(offer="900") == [("c3", 102)]
    assert await ids(affiliate="77") == [("c2", 101)]
    assert await ids(trigger="conversion_done") == [("c1", 103)]
    assert await ids(postback_id=102) == [("c1", 102), ("c3", 102)]
    assert await ids(action="ping_url", offer="501", affiliate="42") == [
        ("c1", 101), ("c1", 102), ("c1", 103),
    ]  # fmt: skip
    assert await ids(since=at(1), until=at(3)) == [("c2", 101), ("c3", 102)]
    assert await ids(action="email") == []
    await finish(store, await claim_one_of(store), DeliveryState.SUCCEEDED, at(5))
    assert len(await ids(state=DeliveryState.SUCCEEDED)) == 1
    first, cursor = await store.delivery_log(LogFilter(), 2, None)
    assert cursor is not None
    second, _ = await store.delivery_log(LogFilter(), 10, cursor)
    seen = [r.delivery.delivery_id for r in first + second]
    assert len(seen) == len(set(seen)) == 5
    with pytest.raises(InputError):
        await store.delivery_log(LogFilter(), 2, "not-a-cursor")


async def claim_one_of(store: Store) -> Claim:
    claims = await store.claim_due("n1", at(4), 1, LEASE)
    assert claims
    return claims[0]


async def test_conversion_log_filters_by_fields_and_by_deliveries(store: Store) -> None:
    await _fill(store)
    rows, cursor = await store.conversion_log(LogFilter(), 100, None)
    assert cursor is None
    assert [r.conversion_id for r in rows] == ["c1", "c3", "c2"]  # last updated first
    assert rows[0].status is Status.APPROVED
    assert rows[0].deliveries == 3
    assert rows[0].fields["offer"] == "501"

    async def ids(**kw: object) -> list[str]:
        found, _ = await store.conversion_log(LogFilter(**kw), 100, None)  # type: ignore[arg-type]
        return sorted(r.conversion_id for r in found)

    assert await ids(offer="900") == ["c3"]
    assert await ids(affiliate="77") == ["c2"]
    assert await ids(status=Status.PENDING) == ["c2", "c3"]
    assert await ids(trigger="approved") == ["c1"]
    assert await ids(postback_id=103) == ["c1"]
    assert await ids(postback_id=102, offer="900") == ["c3"]
    assert await ids(state=DeliveryState.QUEUED, action="ping_url") == ["c1", "c2", "c3"]
    assert await ids(since=at(2)) == ["c1", "c3"]
    page, cursor = await store.conversion_log(LogFilter(), 2, None)
    assert cursor is not None
    rest, end = await store.conversion_log(LogFilter(), 2, cursor)
    assert [r.conversion_id for r in page + rest] == ["c1", "c3", "c2"]
    assert end is None
    for bad in ("1_abc", "1700000000000000_1²", "1700000000000000_١"):
        with pytest.raises(InputError):  # not a bare ValueError from int(): a 4xx, never a 5xx
            await store.conversion_log(LogFilter(), 2, bad)
