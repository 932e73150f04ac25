"""One destination's backlog does not starve the others (in-process daemon, real SQLite store,
loopback sinks, injected clock): when destination A's breaker closes, its held backlog of
thousands is due at once and oldest; the claims take no more of A than its share (per-host
concurrency and as many in line), so destination B's newer deliveries are claimed and sent while
A's backlog drains, oldest first, at A's concurrency, without tripping A's breaker."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web
from structlog.testing import capture_logs

from daemon.breaker import BreakerState
from daemon.hosts import Shares
from daemon.store.base import DeliveryState
from tests.harness import LOOPBACK, Daemon, FakeClock, Received, Sink, start_daemon, wait_for

BACKLOG = 2000
PER_HOST = 8
TOGETHER = 20


class GatedSink(Sink):
    """Answers 503 while `down`; otherwise holds each request until `gate` is set, then 200.
    Remembers the conversion ids in the order the requests came, and the most requests it
    had open at once."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.order: list[str] = []
        self.open = 0
        self.most_open = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.method, request.path_qs, {}, b""))
        if self.down:
            return web.Response(status=503, text="down")
        self.order.append(request.query["tx"])
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.gate.wait()
        finally:
            self.open -= 1
        return web.Response(text="OK")


def rules(a: Sink, b: Sink) -> dict[str, str]:
    """Two admin postbacks (no author: the per-affiliate share does not apply), one per sink."""
    return {
        "o.yaml": f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: 7
    action: {{type: ping_url, url: "{a.url}/a?tx={{conversion_id}}"}}
  - id: 2
    trigger: conversion_done
    affiliate: 8
    action: {{type: ping_url, url: "{b.url}/b?tx={{conversion_id}}"}}
"""
    }


async def post_many(daemon: Daemon, clock: FakeClock, prefix: str, n: int, affiliate: int) -> None:
    """n conversions, TOGETHER at a time: the injected clock moves on 1 ms between groups (the
    delivery ids of one instant sort at random)."""
    for start in range(0, n, TOGETHER):
        await asyncio.gather(
            *(
                daemon.post(
                    conversion_id=f"{prefix}{i:05d}",
                    offer=1,
                    affiliate=affiliate,
                    status="approved",
                )
                for i in range(start, min(n, start + TOGETHER))
            )
        )
        clock.advance(0.001)


async def settle(daemon: Daemon) -> None:
    dispatcher = daemon.services.dispatcher
    while await dispatcher.dispatch_once():
        await dispatcher.drain()
    await dispatcher.drain()


async def unfinished(daemon: Daemon) -> bool:
    """True once no delivery waits or is in flight (each state's list is under one page)."""
    states = (DeliveryState.QUEUED, DeliveryState.RETRYING, DeliveryState.IN_FLIGHT)
    return not any([await daemon.deliveries(state=s) for s in states])


async def test_a_released_backlog_leaves_room_for_other_destinations(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = GatedSink(), Sink()
    await a.start()
    await b.start()
    daemon = await start_daemon(
        tmp_path,
        rules(a, b),
        clock=clock,
        dispatch=False,
        settings={
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 60, "per_host_concurrency": PER_HOST}
        },
    )
    dispatcher = daemon.services.dispatcher
    destinations = dispatcher.destinations
    share = destinations.claim_share
    runner: asyncio.Task[None] | None = None
    try:
        # A's outage: its breaker opens, then its backlog of thousands is held.
        a.down = True
        await post_many(daemon, clock, "o", 5, 7)
        await settle(daemon)
        assert destinations.state(a.url) is BreakerState.OPEN
        await post_many(daemon, clock, "a", BACKLOG, 7)
        await settle(daemon)
        # A is back: the probe after the pause (A's oldest held delivery) closes the breaker.
        a.down = False
        clock.advance(destinations.policy.first_pause + 1)
        assert await dispatcher.dispatch_once() == 1
        await dispatcher.drain()
        assert destinations.state(a.url) is BreakerState.CLOSED
        assert a.order[0] < f"a{TOGETHER:05d}"  # A's oldest held delivery
        # B's deliveries come after A's backlog: newer than all of it.
        clock.advance(1)
        await post_many(daemon, clock, "b", 40, 8)
        a.gate.clear()  # A's requests hang: its attempts end only when the test says so
        with capture_logs() as logs:
            runner = asyncio.create_task(dispatcher.run())
            # B's deliveries are all sent while A's backlog is still there, untouched but for
            # A's share: A's hanging attempts do not take the node's slots.
            await wait_for(lambda: len(b.received) == 40)
            [closed] = [e for e in logs if e["event"] == "breaker_closed"]
            assert closed["backlog"] == BACKLOG - 1  # all of it was held, the probe aside
            assert len(a.order) <= 1 + PER_HOST
            # B's attempts may still be finishing (their records being written); once they
            # have, what is left in flight is A's, within its share.
            assert dispatcher._per_destination.count(a.url) <= share + dispatcher.config.batch
            await wait_for(lambda: dispatcher.in_flight <= share + dispatcher.config.batch)
            a.gate.set()
            await wait_for(lambda: sum(tx[0] == "a" for tx in a.order) == BACKLOG, deadline=60)
            # the last ones sent are recorded before their leases can end (the clock's jump)
            await wait_for(lambda: dispatcher.in_flight == 0)
            clock.advance(3600)  # the outage's failed attempts retry on their own schedule
            dispatcher.wake()
            await wait_for(lambda: unfinished(daemon), deadline=30)
        # A's backlog drained oldest first (up to the claims in line at once), at A's
        # concurrency, and A's breaker never opened again on the backlog's own volume.
        drained = [tx for tx in a.order if tx[0] == "a"]
        assert sorted(drained) == [f"a{i:05d}" for i in range(BACKLOG)]
        window = share + dispatcher.config.batch + TOGETHER
        assert all(abs(int(tx[1:]) - n) <= window for n, tx in enumerate(drained))
        assert a.most_open <= PER_HOST
        assert destinations.state(a.url) is BreakerState.CLOSED
        assert [e for e in logs if e["event"] == "breaker_opened"] == []
        assert len(b.received) == 40
    finally:
        a.gate.set()
        if runner is not None:
            await dispatcher.stop(5)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await daemon.client.close()
        await a.close()
        await b.close()


async def test_shares_count_claims_until_their_tasks_end_and_call_when_room_frees() -> None:
    calls: list[int] = []
    shares = Shares(2, lambda: calls.append(1))
    gate = asyncio.Event()
    tasks = [asyncio.create_task(gate.wait()) for _ in range(3)]
    for task in tasks:
        task.add_done_callback(shares.take("http://a.example"))
    asyncio.create_task(gate.wait()).add_done_callback(shares.take(None))  # no key: not counted
    assert shares.saturated() == ["http://a.example"]
    assert shares.count("http://a.example") == 3
    gate.set()
    await asyncio.gather(*tasks)  # (gather's own callbacks come after the shares')
    assert shares.saturated() == []
    assert shares.count("http://a.example") == 0
    assert calls == [1]  # once, when it dropped below its share (3 -> 2 -> 1)


async def test_shares_without_a_bound_never_skip() -> None:
    shares = Shares(None, lambda: None)
    task = asyncio.create_task(asyncio.Event().wait())
    task.add_done_callback(shares.take("7"))
    assert shares.saturated() == []
    task.cancel()


async def test_a_share_taken_ends_once_whatever_calls_it() -> None:
    calls: list[int] = []
    shares = Shares(1, lambda: calls.append(1))
    end = shares.take("http://a.example")
    assert shares.saturated() == ["http://a.example"]
    end()
    end("a task")  # the task's done callback after the explicit end: nothing more
    assert shares.count("http://a.example") == 0
    assert calls == [1]
    assert shares.take(None)() is None  # no key: nothing counted
