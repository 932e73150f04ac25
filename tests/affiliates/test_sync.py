"""The sync loop survives its store's failures (issue 15): logged once when it starts failing
and once when it recovers, and the change made meanwhile arrives."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from structlog.testing import capture_logs

from daemon.actions.base import Resources
from daemon.affiliates.wiring import attach_affiliates
from daemon.reload import Reloader
from daemon.store.affiliate_types import FIRST_STORE_ID, PostbackChange, Who
from daemon.store.sqlite import SQLiteStore
from tests.affiliates.kit import rules
from tests.harness import FakeClock, Sink, wait_for, write_rules


async def test_the_sync_loop_survives_a_store_that_fails(tmp_path: Path, sink: Sink) -> None:
    write_rules(tmp_path / "rules.d", rules(sink))
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    resources = Resources(http=None, secret=lambda name: "", clock=FakeClock())
    reloader = Reloader(tmp_path / "rules.d", resources)
    _, sync = attach_affiliates(store, reloader, resources, time.time, interval=0.05)
    await reloader.load_initial()
    await sync.initial()
    with capture_logs() as logs:
        task = asyncio.create_task(sync.run())
        try:
            await store.close()  # every read fails now
            await wait_for(lambda: any(e["event"] == "affiliate_sync_failed" for e in logs))
            await store.open()
            body = {
                "trigger": "conversion_done",
                "action": {"type": "ping_url", "url": "https://t.test/"},
            }
            made = await store.create_affiliate_postback(
                "42", PostbackChange("7", "active", body), Who("w", "w", "42"),
                datetime.now(UTC), None,
            )  # fmt: skip
            await wait_for(lambda: made.id in reloader.runtime.rules.postbacks)
            assert made.id >= FIRST_STORE_ID
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
    events = [e["event"] for e in logs if e["event"].startswith("affiliate_sync")]
    assert events == ["affiliate_sync_failed", "affiliate_sync_recovered"]
