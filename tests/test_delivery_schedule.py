"""Retries on schedule with an injected clock, Retry-After, dead letters, cancellation on
reload, per-host concurrency and the pause of a failing destination."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from structlog.testing import capture_logs

from daemon.store.base import DeliveryState
from tests.harness import Daemon, FakeClock, Sink, start_daemon, wait_for


def rule(sink: Sink, pid: int = 1, extra: str = "", path: str = "pb") -> str:
    return f"""
      - id: {pid}
        trigger: conversion_done
        affiliate: "*"{extra}
        action: {{type: ping_url, url: "{sink.url}/{path}?tx={{conversion_id}}"}}
    """


def offer(*postbacks: str) -> dict[str, str]:
    return {"o.yaml": "offer: 1\npostbacks:\n" + "".join(postbacks)}


async def cycle(daemon: Daemon) -> int:
    """One dispatcher pass: claim what is due now, run it to the end."""
    started = await daemon.services.dispatcher.dispatch_once()
    await daemon.services.dispatcher.drain()
    return started


async def one_delivery(daemon: Daemon) -> tuple[object, list[object]]:
    (row,) = await daemon.deliveries()
    detail = await daemon.services.store.get_delivery(row.delivery_id)
    assert detail is not None
    return detail.delivery, detail.attempts


async def test_503_503_200_is_retried_on_the_default_schedule(tmp_path: Path, sink: Sink) -> None:
    clock = FakeClock()
    sink.script = [(503, "busy", {}), (503, "busy", {})]
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        assert await cycle(daemon) == 1
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.RETRYING
        assert [a.reason for a in attempts] == ["http_503"]
        clock.advance(7.9)  # first delay: 10 s, minus at most 20 % jitter
        assert await cycle(daemon) == 0
        clock.advance(4.2)  # 12.1 s: past 10 s plus at most 20 %
        assert await cycle(daemon) == 1
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.RETRYING
        clock.advance(47.9)  # second delay: 1 min, minus at most 20 %
        assert await cycle(daemon) == 0
        clock.advance(24.2)
        assert await cycle(daemon) == 1
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.SUCCEEDED
        assert [(a.outcome, a.reason, a.response_status) for a in attempts] == [
            ("retry", "http_503", 503),
            ("retry", "http_503", 503),
            ("succeeded", None, 200),
        ]
        assert len(sink.received) == 3
        assert {r.headers["Idempotency-Key"] for r in sink.received} == {"generic:c1:1:1"}
    finally:
        await daemon.client.close()


async def test_429_retry_after_is_honoured_and_capped(tmp_path: Path, sink: Sink) -> None:
    clock = FakeClock()
    sink.script = [(429, "slow down", {"Retry-After": "120"}), (429, "", {"Retry-After": "99999"})]
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        await cycle(daemon)
        clock.advance(119)
        assert await cycle(daemon) == 0  # 10 s would be due: Retry-After says 120
        clock.advance(1.5)
        assert await cycle(daemon) == 1
        clock.advance(3599)
        assert await cycle(daemon) == 0  # capped at one hour, not 99999 s
        clock.advance(2)
        assert await cycle(daemon) == 1
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.SUCCEEDED
        assert [a.reason for a in attempts] == ["http_429", "http_429", None]
    finally:
        await daemon.client.close()


async def test_404_goes_straight_to_dead(tmp_path: Path, sink: Sink) -> None:
    clock = FakeClock()
    sink.script = [(404, "no such endpoint", {})]
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        await cycle(daemon)
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.DEAD
        assert [(a.outcome, a.reason, a.response_excerpt) for a in attempts] == [
            ("dead", "http_404", "no such endpoint")
        ]
        clock.advance(86400)
        assert await cycle(daemon) == 0
        assert len(sink.received) == 1
    finally:
        await daemon.client.close()


async def test_schedule_ends_dead_after_max_attempts_override(tmp_path: Path, sink: Sink) -> None:
    clock = FakeClock()
    sink.script = [(500, "", {})] * 3
    daemon = await start_daemon(
        tmp_path,
        offer(rule(sink, extra="\n        retry: {max_attempts: 2}")),
        clock=clock,
        dispatch=False,
    )
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        await cycle(daemon)
        clock.advance(20)
        await cycle(daemon)
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.DEAD
        assert [a.outcome for a in attempts] == ["retry", "dead"]
    finally:
        await daemon.client.close()


async def test_default_schedule_has_eight_attempts_then_dead(tmp_path: Path, sink: Sink) -> None:
    clock = FakeClock()
    sink.script = [(502, "", {})] * 8
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        for delay in (0, 12.1, 72.1, 360.1, 2160.1, 8640.1, 25920.1, 51840.1):
            clock.advance(delay)
            assert await cycle(daemon) == 1
        delivery, attempts = await one_delivery(daemon)
        assert delivery.state is DeliveryState.DEAD
        assert len(attempts) == 8
        clock.advance(10 * 86400)
        assert await cycle(daemon) == 0
    finally:
        await daemon.client.close()


async def test_reload_that_disables_a_postback_cancels_its_waiting_deliveries(
    tmp_path: Path, sink: Sink
) -> None:
    clock = FakeClock()
    sink.script = [(503, "", {})]
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        await cycle(daemon)
        (daemon.rules_dir / "o.yaml").write_text(
            "offer: 1\npostbacks:\n" + rule(sink, extra="\n        status: disabled")
        )
        assert await daemon.services.reloader.reload("test")
        delivery, _ = await one_delivery(daemon)
        assert delivery.state is DeliveryState.CANCELLED
        clock.advance(3600)
        assert await cycle(daemon) == 0
        assert len(sink.received) == 1
        # ...and they can be queued again by an operator once the postback is back
        (daemon.rules_dir / "o.yaml").write_text("offer: 1\npostbacks:\n" + rule(sink))
        assert await daemon.services.reloader.reload("test")
        assert (
            await daemon.services.store.requeue(
                [delivery.delivery_id], daemon.services.dispatcher._dt(clock.now())
            )
            == 1
        )
        assert await cycle(daemon) == 1
        delivery, _ = await one_delivery(daemon)
        assert delivery.state is DeliveryState.SUCCEEDED
    finally:
        await daemon.client.close()


async def test_a_bad_reload_keeps_the_running_set(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, offer(rule(sink)), dispatch=False)
    try:
        before = daemon.services.reloader.runtime
        (daemon.rules_dir / "o.yaml").write_text("offer: 1\npostbacks: [\n")
        with capture_logs() as logs:
            assert not await daemon.services.reloader.reload("test")
        assert daemon.services.reloader.runtime is before
        failed = [e for e in logs if e["event"] == "rules_reload_failed"]
        assert failed[0]["errors"] == [
            "o.yaml:3: while parsing a flow node; did not find expected node content"
        ]
        ready = await daemon.client.get("/readyz")
        body = await ready.json()
        assert body["last_reload_ok"] is False
        assert "last_reload_errors" not in body  # file names and error text: admins only
        assert daemon.services.reloader.status.last_error == failed[0]["errors"]
        answer = await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        assert answer["deliveries"] == 1  # still matched by the running set
    finally:
        await daemon.client.close()


async def test_per_host_concurrency_is_bounded(tmp_path: Path) -> None:
    active, peak, release = 0, 0, asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slow] * 6
    daemon = await start_daemon(
        tmp_path,
        offer(rule(sink)),
        dispatch=False,
        settings={"outbound": {"allow_cidrs": ["127.0.0.1/32"], "per_host_concurrency": 2}},
    )
    try:
        for i in range(6):
            await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=1, status="approved")
        assert await daemon.services.dispatcher.dispatch_once() == 6
        await wait_for(lambda: active == 2)
        release.set()
        await daemon.services.dispatcher.drain()
        assert peak == 2
        assert len(sink.received) == 6
    finally:
        await daemon.client.close()
        await sink.close()


async def test_a_failing_destination_is_paused_then_resumed_logged_once_each(
    tmp_path: Path, sink: Sink
) -> None:
    clock = FakeClock()
    sink.script = [(503, "", {})] * 5
    daemon = await start_daemon(tmp_path, offer(rule(sink)), clock=clock, dispatch=False)
    try:
        with capture_logs() as logs:
            for i in range(5):
                await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=1, status="approved")
                await cycle(daemon)
            down = [e for e in logs if e["event"] == "destination_down"]
            assert len(down) == 1
            assert down[0]["destination"] == sink.url
            # paused: a new conversion waits, nothing is sent, nothing is dropped
            await daemon.post(conversion_id="c5", offer=1, affiliate=1, status="approved")
            assert await cycle(daemon) == 1
            assert len(sink.received) == 5
            states = {r.state for r in await daemon.deliveries()}
            assert states == {DeliveryState.RETRYING, DeliveryState.QUEUED}
            clock.advance(31)  # the pause (30 s) is over and the retries are due
            while await cycle(daemon):
                pass
            assert {r.state for r in await daemon.deliveries()} == {DeliveryState.SUCCEEDED}
            assert len([e for e in logs if e["event"] == "destination_up"]) == 1
            assert len([e for e in logs if e["event"] == "destination_down"]) == 1
    finally:
        await daemon.client.close()


async def test_a_postback_unknown_here_waits_for_the_rules_then_is_cancelled(
    tmp_path: Path, sink: Sink
) -> None:
    clock = FakeClock()
    daemon = await start_daemon(
        tmp_path, offer(rule(sink), rule(sink, pid=2, path="other")), clock=clock, dispatch=False
    )
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=1, status="approved")
        # This node's running set lacks postback 2 without a reload having cancelled its
        # deliveries: another node runs newer (or older) rules. The delivery waits...
        (daemon.rules_dir / "o.yaml").write_text("offer: 1\npostbacks:\n" + rule(sink))
        runtime = daemon.services.reloader._load()
        daemon.services.reloader._runtime = runtime
        await cycle(daemon)
        rows = {r.postback_id: r for r in await daemon.deliveries()}
        assert rows[1].state is DeliveryState.SUCCEEDED
        assert rows[2].state is DeliveryState.QUEUED
        assert rows[2].attempts == 0
        clock.advance(29)
        assert await cycle(daemon) == 0  # put back for 30 s
        clock.advance(2)
        assert await cycle(daemon) == 1  # still unknown, still young: put back again
        # ...and once it is older than the grace, it is cancelled as removed, never sent.
        clock.advance(600)
        assert await cycle(daemon) == 1
        rows = {r.postback_id: r for r in await daemon.deliveries()}
        assert rows[2].state is DeliveryState.CANCELLED
        assert rows[2].last_reason == "postback_removed"
        assert [r.path_qs for r in sink.received] == ["/pb?tx=c1"]
    finally:
        await daemon.client.close()


async def test_a_claim_waiting_too_long_for_a_slot_is_handed_back_unsent(tmp_path: Path) -> None:
    """The lease runs from the claim: an attempt still waiting for its destination's slot when
    half the lease is gone gives the claim back instead of starting late."""
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [hold]
    daemon = await start_daemon(
        tmp_path,
        offer(rule(sink)),
        dispatch=False,
        settings={
            "delivery": {"lease": "4s"},
            "outbound": {
                "allow_cidrs": ["127.0.0.1/32"],
                "timeout": "3s",
                "per_host_concurrency": 1,
            },
        },
    )
    try:
        await daemon.post(conversion_id="first", offer=1, affiliate=1, status="approved")
        await daemon.post(conversion_id="second", offer=1, affiliate=1, status="approved")
        assert await daemon.services.dispatcher.dispatch_once() == 2
        await wait_for(lambda: len(sink.received) == 1)
        second = await wait_for(
            lambda: daemon.deliveries(conversion_id="second", state=DeliveryState.QUEUED)
        )
        assert second[0].attempts == 0
        release.set()
        await daemon.services.dispatcher.drain()
        assert len(sink.received) == 1
    finally:
        await daemon.client.close()
        await sink.close()
