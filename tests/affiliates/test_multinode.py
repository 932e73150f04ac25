"""Two nodes on one PostgreSQL (issue 15): a postback created through node A is fired by a
conversion posted to node B, without a rules reload; B hears of it through NOTIFY, through the
version check when notifications are lost, and again after its listening connection drops."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.actions.base import Resources
from daemon.affiliates.sync import AffiliateSync
from daemon.affiliates.wiring import attach_affiliates
from daemon.reload import Reloader
from daemon.store.affiliate_types import PostbackChange, Who
from daemon.store.postgres import PostgresStore
from tests.affiliates.kit import AFF_A, SETTINGS, Api, ping, rules
from tests.harness import FakeClock, Sink, start_daemon, wait_for, write_rules
from tests.store.conftest import PG_DSN, pg_schema

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with pg_schema() as made:
        yield made


async def test_created_on_a_fires_on_b(tmp_path: Path, sink: Sink, dsn: str) -> None:
    a = await start_daemon(
        tmp_path / "a", rules(sink), settings=SETTINGS, store_url=dsn, dispatch=False
    )
    b = await start_daemon(tmp_path / "b", rules(sink), settings=SETTINGS, store_url=dsn)
    try:
        made = await Api(a).create(AFF_A, ping(sink))
        created = time.monotonic()

        async def fired_on_b() -> bool:
            answer = await b.post(
                conversion_id=f"c{time.monotonic_ns()}", offer=7, affiliate=42, status="approved"
            )
            return bool(answer["deliveries"])

        await wait_for(fired_on_b, deadline=30, interval=0.05)  # polled; the bench times it
        seen_after = time.monotonic() - created
        await wait_for(
            lambda: any(r.path_qs.startswith("/aff?") for r in sink.received), deadline=30
        )
        rows = await b.deliveries(postback_ids=[made["id"]])
        assert rows
        print(f"created on A, fired on B after {seen_after:.3f}s")  # the bench measures it
    finally:
        await a.client.close()
        await b.client.close()


async def _node(
    tmp_path: Path, sink: Sink, dsn: str, *, interval: float, listen: bool = True
) -> tuple[PostgresStore, Reloader, AffiliateSync]:
    """A store layer on its own (no app): its store, reloader, sync."""
    store = PostgresStore(dsn, max_size=4)
    await store.open()
    rules_dir = tmp_path / "rules.d"
    write_rules(rules_dir, rules(sink))
    resources = Resources(http=None, secret=lambda name: "", clock=FakeClock())
    reloader = Reloader(rules_dir, resources)
    _, sync = attach_affiliates(
        store, reloader, resources, time.time, interval=interval, listen=listen
    )
    await reloader.load_initial()
    await sync.initial()
    return store, reloader, sync


async def _create(dsn: str, offer: str = "7") -> int:
    writer = PostgresStore(dsn, max_size=2)
    await writer.open()
    try:
        body = {
            "trigger": "conversion_done",
            "action": {"type": "ping_url", "url": "https://t.test/"},
        }
        row = await writer.create_affiliate_postback(
            "42",
            PostbackChange(offer, "active", body),
            Who("w", "w", "42"),
            datetime.now(UTC),
            None,
        )
        return row.id
    finally:
        await writer.close()


async def test_notify_alone_brings_a_change(tmp_path: Path, sink: Sink, dsn: str) -> None:
    store, reloader, sync = await _node(tmp_path, sink, dsn, interval=3600.0)
    task = asyncio.create_task(sync.run())
    try:
        await asyncio.wait_for(sync.listening.wait(), 10)
        pid = await _create(dsn)
        await wait_for(lambda: pid in reloader.runtime.rules.postbacks, deadline=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_the_version_check_brings_a_change_without_notify(
    tmp_path: Path, sink: Sink, dsn: str
) -> None:
    store, reloader, sync = await _node(tmp_path, sink, dsn, interval=0.2, listen=False)
    task = asyncio.create_task(sync.run())
    try:
        pid = await _create(dsn)
        await wait_for(lambda: pid in reloader.runtime.rules.postbacks, deadline=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_the_listener_reconnects(tmp_path: Path, sink: Sink, dsn: str) -> None:
    name = f"h4-{uuid.uuid4().hex[:12]}"
    listening_dsn = f"{dsn}&application_name={name}"
    store, reloader, sync = await _node(tmp_path, sink, listening_dsn, interval=3600.0)
    task = asyncio.create_task(sync.run())
    admin = await asyncpg.connect(PG_DSN)
    try:
        await asyncio.wait_for(sync.listening.wait(), 10)
        sync.listening.clear()
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            name,
        )
        assert killed == 1
        await asyncio.wait_for(sync.listening.wait(), 10)
        pid = await _create(dsn)
        await wait_for(lambda: pid in reloader.runtime.rules.postbacks, deadline=10)
    finally:
        await admin.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
