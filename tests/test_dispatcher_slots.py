"""The dispatcher's slots (in-process, real sink and store): an attempt's time counts from its
destination slot, the wait for a slot is bounded, per-affiliate fair use, and a result that
cannot be recorded is logged and left to the lease."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Collection
from datetime import datetime, timedelta
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from daemon.app import create_app
from daemon.breaker import BreakerState
from daemon.errors import StoreError
from daemon.hosts import Lane
from daemon.settings import Settings
from daemon.store.base import AttemptRow, Claim, DeliveryState
from daemon.store.sqlite import SQLiteStore
from tests.harness import LOOPBACK, Daemon, FakeClock, Sink, start_daemon, wait_for, write_rules


def rules(sink: Sink, authors: dict[int, str]) -> dict[str, str]:
    body = "offer: 1\npostbacks:\n"
    for pid, affiliate in authors.items():
        body += f"""
  - id: {pid}
    trigger: conversion_done
    affiliate: {affiliate}
    author: {{id: {pid}, name: User {pid}, affiliate: {affiliate}}}
    action: {{type: ping_url, url: "{sink.url}/p{pid}?tx={{conversion_id}}"}}
"""
    return {"o.yaml": body}


async def take_slots(lane: Lane, n: int) -> tuple[asyncio.Event, list[asyncio.Task[bool]]]:
    """n sends that hold their slots of `lane` until the event is set."""
    gate = asyncio.Event()
    until = asyncio.get_running_loop().time() + 3600
    taken = [asyncio.create_task(lane.run(gate.wait, until)) for _ in range(n)]
    await wait_for(lambda: lane.sending == n)
    return gate, taken


async def only(daemon: Daemon) -> tuple[DeliveryState, int, str | None]:
    [row] = await daemon.deliveries()
    return row.state, row.attempts, row.last_reason


async def gated_two_affiliates(tmp_path: Path, answers: int) -> tuple[asyncio.Event, Sink, Daemon]:
    """A daemon with postback 1 for affiliate 7 and postback 2 for affiliate 8, two in flight
    per affiliate, and its own sink whose first `answers` answers to /p1 (affiliate 7's) hang
    until the gate is set; the caller closes the sink."""
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/p1":  # affiliate 7's postbacks hang at the sink
            await gate.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slow] * answers
    daemon = await start_daemon(
        tmp_path,
        rules(sink, {1: "7", 2: "8"}),
        dispatch=False,
        settings={"delivery": {"per_affiliate_in_flight": 2}},
    )
    return gate, sink, daemon


async def test_the_time_in_line_for_a_slot_is_not_the_attempts_time(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, rules(sink, {1: "7"}), dispatch=False)
    dispatcher = daemon.services.dispatcher
    dispatcher.config = dataclasses.replace(dispatcher.config, attempt_timeout=0.3)
    lane = dispatcher.destinations.lane(sink.url)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        # every slot of the destination is taken (per_host_concurrency 8)
        gate, taken = await take_slots(lane, 8)
        assert await dispatcher.dispatch_once() == 1
        await asyncio.sleep(1.0)  # the scenario: in line for three attempt bounds
        gate.set()
        await asyncio.gather(*taken)
        await dispatcher.drain()
        assert await only(daemon) == (DeliveryState.SUCCEEDED, 1, None)
        assert len(sink.received) == 1
        assert dispatcher.destinations.state(sink.url) is BreakerState.CLOSED
    finally:
        await daemon.client.close()


async def test_a_claim_too_long_in_line_is_handed_back_unsent(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, rules(sink, {1: "7"}), dispatch=False)
    dispatcher = daemon.services.dispatcher
    # slot_wait = 0.9 * 1.5 - 0.6 * 1.5 = 0.45 s; the lease is still never outlived
    dispatcher.config = dataclasses.replace(dispatcher.config, lease=1.5)
    lane = dispatcher.destinations.lane(sink.url)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        gate, taken = await take_slots(lane, 8)
        assert await dispatcher.dispatch_once() == 1
        await dispatcher.drain()  # ends by itself: the wait is bounded
        assert await only(daemon) == (DeliveryState.QUEUED, 0, None)
        assert sink.received == []
        gate.set()
        await asyncio.gather(*taken)
        assert lane.sending == 0
        assert await dispatcher.dispatch_once() == 1
        await dispatcher.drain()
        assert await only(daemon) == (DeliveryState.SUCCEEDED, 1, None)
    finally:
        await daemon.client.close()


async def test_one_affiliates_flood_does_not_take_the_others_slots(tmp_path: Path) -> None:
    gate, sink, daemon = await gated_two_affiliates(tmp_path, answers=6)
    dispatcher = daemon.services.dispatcher
    try:
        for i in range(3):  # postback 1 is affiliate 7's, postback 2 affiliate 8's
            await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=7, status="approved")
            await daemon.post(conversion_id=f"d{i}", offer=1, affiliate=8, status="approved")
        assert await dispatcher.dispatch_once() == 6

        def paths() -> list[str]:
            return sorted(r.path_qs.split("?")[0] for r in sink.received)

        # two of affiliate 7's (its bound) hang at the sink; affiliate 8's three go through
        await wait_for(lambda: paths().count("/p2") == 3 and paths().count("/p1") >= 1)
        assert paths().count("/p1") <= 2
        gate.set()
        await dispatcher.drain()
        rows = await daemon.deliveries()
        assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}
        assert paths().count("/p1") == 3
    finally:
        await daemon.client.close()
        await sink.close()


class FailingFinish(SQLiteStore):
    """A real SQLite store whose finish_attempt fails (the disk is full) while `failing`."""

    failing = True

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        if self.failing:
            raise StoreError("sqlite: database or disk is full")
        return await super().finish_attempt(claim, attempt, state, next_attempt_at)


async def test_a_result_that_cannot_be_recorded_is_logged_and_left_to_the_lease(
    tmp_path: Path, sink: Sink
) -> None:
    clock = FakeClock()
    store = FailingFinish(tmp_path / "p.db")
    write_rules(tmp_path / "rules.d", rules(sink, {1: "7"}))
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, store=store, clock=clock, dispatch=False, watch=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    daemon = Daemon(client, tmp_path / "rules.d", settings)
    dispatcher = daemon.services.dispatcher
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        with capture_logs() as logs:
            assert await dispatcher.dispatch_once() == 1
            await dispatcher.drain()
        [line] = [e for e in logs if e["event"] == "delivery_attempt"]
        assert (line["outcome"], line["recorded"]) == ("succeeded", False)
        assert line["store_error"] == "StoreError: sqlite: database or disk is full"
        assert not [e for e in logs if e["event"] == "attempt_task_failed"]
        assert await only(daemon) == (DeliveryState.IN_FLIGHT, 0, None)
        assert await dispatcher.dispatch_once() == 0  # its lease holds it
        store.failing = False
        clock.advance(dispatcher.config.lease + 1)
        assert await dispatcher.dispatch_once() == 1  # the lease ended: sent again (same key)
        await dispatcher.drain()
        assert await only(daemon) == (DeliveryState.SUCCEEDED, 1, None)
        keys = {r.headers.get("Idempotency-Key") for r in sink.received}
        assert len(sink.received) == 2
        assert len(keys) == 1
    finally:
        await daemon.client.close()


async def test_an_affiliates_backlog_does_not_fill_the_node(tmp_path: Path) -> None:
    gate, sink, daemon = await gated_two_affiliates(tmp_path, answers=20)
    dispatcher = daemon.services.dispatcher
    dispatcher.config = dataclasses.replace(dispatcher.config, max_in_flight=6, batch=4)
    try:
        for i in range(10):  # affiliate 7's backlog, older than anything of affiliate 8
            await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=7, status="approved")
        for i in range(2):
            await daemon.post(conversion_id=f"d{i}", offer=1, affiliate=8, status="approved")
        assert await dispatcher.dispatch_once() == 4  # the 4 oldest: affiliate 7's
        assert await dispatcher.dispatch_once() == 2  # affiliate 7 has its share: 8's come
        await wait_for(lambda: sum(r.path_qs.startswith("/p2") for r in sink.received) == 2)
        gate.set()
        await dispatcher.drain()
        while await dispatcher.dispatch_once():
            await dispatcher.drain()
        rows = await daemon.deliveries()
        assert len(rows) == 12
        assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}
    finally:
        await daemon.client.close()
        await sink.close()


async def test_an_attempt_tasks_exception_is_collected_and_logged(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, rules(sink, {1: "7"}), dispatch=False)
    dispatcher = daemon.services.dispatcher
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        reloader = daemon.services.reloader
        # a runtime without the postback's action: a bug the attempt cannot survive
        reloader._runtime = dataclasses.replace(reloader.runtime, actions={})
        with capture_logs() as logs:
            assert await dispatcher.dispatch_once() == 1
            await dispatcher.drain()
            await wait_for(lambda: any(e["event"] == "attempt_task_failed" for e in logs))
        [line] = [e for e in logs if e["event"] == "attempt_task_failed"]
        assert line["error"] == "KeyError: 1"
        assert dispatcher.in_flight == 0
        assert await only(daemon) == (DeliveryState.IN_FLIGHT, 0, None)  # left to its lease
    finally:
        await daemon.client.close()


class GatedFinish(SQLiteStore):
    """A real SQLite store whose finish_attempt waits for `gate` (a slow commit)."""

    gate: asyncio.Event

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        await self.gate.wait()
        return await super().finish_attempt(claim, attempt, state, next_attempt_at)


async def test_a_claim_leaves_its_destinations_share_once_sent_not_once_recorded(
    tmp_path: Path, sink: Sink
) -> None:
    """The share bounds claims in line for a slot or sending; one whose result is still being
    written takes no slot, so the destination's next deliveries may be claimed meanwhile."""
    store = GatedFinish(tmp_path / "p.db")
    store.gate = asyncio.Event()
    write_rules(tmp_path / "rules.d", rules(sink, {1: "7"}))
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5, "per_host_concurrency": 1},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, store=store, dispatch=False, watch=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    daemon = Daemon(client, tmp_path / "rules.d", settings)
    dispatcher = daemon.services.dispatcher
    shares = dispatcher._per_destination
    try:
        for i in range(3):
            await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=7, status="approved")
        dispatcher.config = dataclasses.replace(dispatcher.config, batch=2)
        assert await dispatcher.dispatch_once() == 2  # the share (2 x 1) is taken
        assert shares.saturated() == [sink.url]
        assert await dispatcher.dispatch_once() == 0
        await wait_for(lambda: len(sink.received) == 2)  # both sent, neither recorded
        await wait_for(lambda: shares.count(sink.url) == 0)
        assert dispatcher.in_flight == 2
        assert await dispatcher.dispatch_once() == 1  # the third is claimed meanwhile
        store.gate.set()
        await dispatcher.drain()
        rows = await daemon.deliveries()
        assert [r.state for r in rows] == [DeliveryState.SUCCEEDED] * 3
        assert shares.count(sink.url) == 0
    finally:
        store.gate.set()
        await daemon.client.close()


class GatedClaims(SQLiteStore):
    """A real SQLite store whose first claim waits for `gate` (a claim that takes a while)."""

    gate: asyncio.Event
    claims = 0

    async def claim_due(
        self,
        node: str,
        now: datetime,
        limit: int,
        lease: timedelta,
        skip_affiliates: Collection[str] = (),
        skip_destinations: Collection[str] = (),
    ) -> list[Claim]:
        self.claims += 1
        if self.claims == 1:
            await self.gate.wait()
        return await super().claim_due(node, now, limit, lease, skip_affiliates, skip_destinations)


async def test_a_wake_up_during_a_claim_is_not_lost(tmp_path: Path, sink: Sink) -> None:
    """A conversion arrives (its wake-up) while a claim that finds nothing is under way: the
    dispatcher claims again at once, not after its poll interval (an hour here)."""
    store = GatedClaims(tmp_path / "p.db")
    store.gate = asyncio.Event()
    write_rules(tmp_path / "rules.d", rules(sink, {1: "7"}))
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, store=store, dispatch=False, watch=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    daemon = Daemon(client, tmp_path / "rules.d", settings)
    dispatcher = daemon.services.dispatcher
    dispatcher.config = dataclasses.replace(dispatcher.config, poll_interval=3600)
    runner = asyncio.create_task(dispatcher.run())
    try:
        await wait_for(lambda: store.claims == 1)  # the first claim is under way, nothing due
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        dispatcher.wake()  # as ingest does for a new delivery
        store.gate.set()  # the first claim ends, empty
        await wait_for(lambda: len(sink.received) == 1)
        await dispatcher.drain()
        assert await only(daemon) == (DeliveryState.SUCCEEDED, 1, None)
    finally:
        store.gate.set()
        await dispatcher.stop(5)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await daemon.client.close()
