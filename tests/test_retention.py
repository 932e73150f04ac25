"""Retention pruning (SPEC 13) with an injected clock on a real SQLite store: what is older than
`retention` goes, what is recent or still pending stays, and a failing prune never stops it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreError
from daemon.retention import Retention
from daemon.store.base import DeliveryState, Store
from daemon.store.sqlite import SQLiteStore
from daemon.supervise import Backoff, Supervisor
from tests.harness import FakeClock, start_daemon, wait_for
from tests.store.support import T0, arrive, claim_one, conversion, finish

DAY = 86400.0
RETENTION = 30 * DAY


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "retention.db")
    await s.open()
    yield s
    await s.close()


async def delivered(store: Store, cid: str, when: datetime) -> None:
    """A conversion whose one delivery succeeded at `when`."""
    await arrive(store, conversion(cid), when, postbacks=(101,))
    claim = await claim_one(store, when)
    assert claim.conversion_id == cid
    assert await finish(store, claim, DeliveryState.SUCCEEDED, when)


async def test_old_conversions_go_recent_and_pending_ones_stay(store: SQLiteStore) -> None:
    old = T0
    await delivered(store, "old-done", old)
    await delivered(store, "recent", old + timedelta(days=29))
    await arrive(store, conversion("old-pending"), old, postbacks=(102,))  # never claimed
    await arrive(store, conversion("old-quiet"), old, postbacks=())
    clock = FakeClock(old.timestamp() + RETENTION + DAY)  # 31 days after `old`
    retention = Retention(store, RETENTION, clock.now)

    with capture_logs() as logs:
        assert await retention.prune_once() == 2

    for gone in ("old-done", "old-quiet"):
        assert await store.get_conversion("generic", gone) is None
    for kept in ("old-pending", "recent"):
        assert await store.get_conversion("generic", kept) is not None
    depth = await store.queue_depth()
    assert (depth[DeliveryState.QUEUED], depth[DeliveryState.SUCCEEDED]) == (1, 1)
    assert logs == [
        {
            "event": "retention_pruned",
            "log_level": "info",
            "count": 2,
            "before": (old + timedelta(days=1)).isoformat(),
        }
    ]

    clock.advance(28 * DAY)  # "recent" is now exactly `retention` old: it stays
    assert await retention.prune_once() == 0
    clock.advance(1.0)
    assert await retention.prune_once() == 1
    assert await store.get_conversion("generic", "recent") is None
    assert await store.get_conversion("generic", "old-pending") is not None


class FlakyStore:
    """A real store whose prune fails the first times it is called, then works."""

    def __init__(self, store: Store, failures: list[BaseException]) -> None:
        self._store = store
        self._failures = failures
        self.calls = 0

    async def prune(self, before: datetime) -> int:
        self.calls += 1
        if self._failures:
            raise self._failures.pop(0)
        return await self._store.prune(before)


async def test_a_failing_prune_is_logged_once_and_tried_again(store: SQLiteStore) -> None:
    await delivered(store, "old", T0)
    flaky = FlakyStore(store, [StoreError("sqlite: database is locked"), RuntimeError("bug")])
    clock = FakeClock(T0.timestamp() + 2 * RETENTION)
    retention = Retention(flaky, RETENTION, clock.now)  # type: ignore[arg-type]
    supervisor = Supervisor(rng=random.Random(1))
    fast = Backoff(first=0.01, cap=0.02)

    with capture_logs() as logs:
        health = supervisor.every(
            "retention", retention.prune_once, 3600.0, interval=60.0, backoff=fast
        )
        await wait_for(lambda: health.last_progress is not None)
        assert health.state == "up"  # neither failure stopped the loop
        await supervisor.stop()

    events = [(e["event"], e.get("error"), e.get("count")) for e in logs]
    assert events == [
        ("loop_failing", "StoreError: sqlite: database is locked", None),
        ("retention_pruned", None, 1),
        ("loop_recovered", None, None),
    ]
    assert logs[2]["failures"] == 2
    assert flaky.calls == 3
    assert await store.get_conversion("generic", "old") is None


async def test_the_daemon_prunes_on_its_own_when_it_starts(tmp_path: Path) -> None:
    clock = FakeClock()
    first = await start_daemon(tmp_path, {"o.yaml": "offer: 1\n"}, clock=clock)
    try:
        await first.post(conversion_id="aged", offer=1, affiliate=2, status="approved")
    finally:
        await first.client.close()
    clock.advance(8 * DAY + 1)
    second = await start_daemon(
        tmp_path, {"o.yaml": "offer: 1\n"}, clock=clock, settings={"retention": "8d"}
    )
    try:

        async def gone() -> bool:
            return await second.services.store.get_conversion("generic", "aged") is None

        await wait_for(gone)
    finally:
        await second.client.close()
