"""The circuit breaker in the daemon (in-process, injected clock): a destination that answers
503 for two minutes, then 200, while conversions keep arriving; held deliveries, fair use."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from structlog.testing import capture_logs

from daemon.breaker import BreakerState
from daemon.store.base import DeliveryState
from tests.harness import Daemon, FakeClock, Received, Sink, start_daemon

OUTAGE = 120.0


class ClockSink(Sink):
    """Answers 503 until the injected clock reaches `until`, then 200; remembers when (on the
    injected clock) each request came."""

    def __init__(self, clock: FakeClock, until: float) -> None:
        super().__init__()
        self.clock = clock
        self.until = until
        self.times: list[float] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.method, request.path_qs, {}, b""))
        self.times.append(self.clock.now())
        if self.clock.now() < self.until:
            return web.Response(status=503, text="down for maintenance")
        return web.Response(text="OK")


def rules(url: str) -> dict[str, str]:
    return {
        "o.yaml": f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{url}/pb?tx={{conversion_id}}"}}
"""
    }


@contextlib.asynccontextmanager
async def clock_daemon(
    tmp_path: Path, down_for: float
) -> AsyncIterator[tuple[FakeClock, ClockSink, Daemon]]:
    """An injected clock, a ClockSink that answers 503 for `down_for` seconds of it, and a
    daemon (not dispatching by itself) sending there; both closed on the way out."""
    clock = FakeClock()
    sink = ClockSink(clock, clock.now() + down_for)
    await sink.start()
    daemon = await start_daemon(tmp_path, rules(sink.url), clock=clock, dispatch=False)
    try:
        yield clock, sink, daemon
    finally:
        await daemon.client.close()
        await sink.close()


async def post_many(daemon: Daemon, prefix: str, n: int) -> None:
    await asyncio.gather(
        *(
            daemon.post(conversion_id=f"{prefix}{i}", offer=1, affiliate=7, status="approved")
            for i in range(n)
        )
    )


async def run_until_idle(daemon: Daemon) -> None:
    dispatcher = daemon.services.dispatcher
    while await dispatcher.dispatch_once():
        await dispatcher.drain()
    await dispatcher.drain()
    await dispatcher.dispatch_once()  # a closed breaker's backlog is made due before a claim
    await dispatcher.drain()


async def test_503_for_two_minutes_one_probe_per_pause_growing_only_with_failed_probes(
    tmp_path: Path,
) -> None:
    async with clock_daemon(tmp_path, down_for=OUTAGE) as (clock, sink, daemon):
        start = clock.now()
        dest = sink.url
        destinations = daemon.services.dispatcher.destinations
        opened_at: float | None = None
        posted_while_open: list[str] = []
        with capture_logs() as logs:
            await post_many(daemon, "a", 30)  # concurrent load before the outage shows
            step = 0
            while clock.now() < start + OUTAGE + 30:
                if step % 10 == 0 and clock.now() < start + OUTAGE:  # conversions keep coming
                    prefix = f"s{step}-"
                    await post_many(daemon, prefix, 5)
                    if opened_at is not None:
                        posted_while_open += [f"{prefix}{i}" for i in range(5)]
                await run_until_idle(daemon)
                if opened_at is None and destinations.state(dest) is not BreakerState.CLOSED:
                    opened_at = clock.now()
                clock.advance(0.5)
                step += 1
            await run_until_idle(daemon)

        assert opened_at is not None
        assert destinations.state(dest) is BreakerState.CLOSED
        events = {name: [e for e in logs if e["event"] == name] for name in _NAMES}
        assert [e["pause_s"] for e in events["breaker_opened"]] == [5.0]
        # The pause grew only with failed probes (each REOPENED follows one probe), x2 up to
        # the 60 s cap: 10, 20, 40, 60, ...
        pauses = [e["pause_s"] for e in events["breaker_reopened"]]
        assert pauses == [min(60.0, 5.0 * 2 ** (n + 1)) for n in range(len(pauses))]
        assert len(events["breaker_probe"]) == len(pauses) + 1
        # While open, the sink saw one request per pause (the probe) and nothing else.
        closed_at = start + OUTAGE  # the first request at or after it is the good probe
        while_open = [t for t in sink.times if opened_at < t < closed_at]
        assert len(while_open) == len(pauses)  # the probes that failed
        gaps = [b - a for a, b in zip([opened_at, *while_open], while_open, strict=False)]
        assert all(gap >= 5.0 for gap in gaps), gaps
        assert len(events["breaker_closed"]) == 1
        assert events["breaker_closed"][0]["backlog"] > 0
        # Every conversion delivered; a held delivery's wait was not an attempt: those posted
        # while the breaker was open were attempted once (a probe's own failures aside).
        rows = await daemon.deliveries()
        assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}
        by_cid = {r.conversion_id: r for r in rows}
        once = [cid for cid in posted_while_open if by_cid[cid].attempts == 1]
        assert len(posted_while_open) - len(once) <= len(events["breaker_probe"])
        assert len(posted_while_open) >= 20


_NAMES = ("breaker_opened", "breaker_reopened", "breaker_probe", "breaker_closed")


async def test_metrics_show_the_breaker_held_deliveries_and_time_since_success(
    tmp_path: Path,
) -> None:
    async with clock_daemon(tmp_path, down_for=60) as (clock, sink, daemon):
        await post_many(daemon, "a", 5)
        await run_until_idle(daemon)  # 5 x 503: open
        await post_many(daemon, "b", 3)
        await run_until_idle(daemon)  # held
        clock.advance(2)
        resp = await daemon.client.get("/metrics")
        text = await resp.text()
        label = f'{{destination="{sink.url}"}}'
        assert f"postbackd_destination_breaker_state{label} 2.0" in text
        assert f"postbackd_destination_held_deliveries{label} 3.0" in text
        assert f"postbackd_destination_seconds_since_success{label} 2.0" in text
        rows = await daemon.deliveries()
        held = [r for r in rows if r.conversion_id.startswith("b")]
        assert {(r.state, r.attempts) for r in held} == {(DeliveryState.QUEUED, 0)}


async def test_a_wholly_held_backlog_is_probed_when_the_pause_ends(tmp_path: Path) -> None:
    async with clock_daemon(tmp_path, down_for=7) as (clock, sink, daemon):
        destinations = daemon.services.dispatcher.destinations
        with capture_logs() as logs:
            await post_many(daemon, "a", 20)
            await run_until_idle(daemon)  # 5 fail (threshold), 15 held; nothing new arrives
            assert destinations.state(sink.url) is BreakerState.OPEN
            sent = len(sink.received)
            clock.advance(4.9)
            await run_until_idle(daemon)
            assert len(sink.received) == sent  # still in its pause
            clock.advance(0.2)  # the pause (5 s) has ended: one held delivery is the probe
            await run_until_idle(daemon)
            assert len(sink.received) == sent + 1  # it failed (503 until +7 s): 10 s more
            clock.advance(10)
            await run_until_idle(daemon)
        assert destinations.state(sink.url) is BreakerState.CLOSED
        assert [e["pause_s"] for e in logs if e["event"] == "breaker_reopened"] == [10.0]
        [closed] = [e for e in logs if e["event"] == "breaker_closed"]
        assert closed["backlog"] >= 14  # the 15 held less the first probe, and retries held
        clock.advance(120)  # the failed attempts' own retries (their schedule, not the pause)
        await run_until_idle(daemon)
        rows = await daemon.deliveries()
        assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}


async def test_destinations_down_lists_open_and_probing_breakers(tmp_path: Path) -> None:
    async with clock_daemon(tmp_path, down_for=60) as (_, sink, daemon):
        destinations = daemon.services.dispatcher.destinations
        assert destinations.down() == []
        await post_many(daemon, "a", 5)
        await run_until_idle(daemon)
        assert destinations.down() == [sink.url]
