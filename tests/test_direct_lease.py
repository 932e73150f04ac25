"""A webhook's deliveries go to this node's dispatcher at once: written claimed in the
arrival's transaction (Dispatcher.lease, Store.record_arrival's lease) and started when it has
committed, without a claim of their own; within the same bounds as claims."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.store.base import Claim, DeliveryState
from tests.harness import Daemon, Sink, lifecycle_rules, start_daemon, wait_for


def spy_claims(daemon: Daemon) -> list[Claim]:
    """Every claim claim_due returns from now on (observed, not replaced)."""
    store = daemon.services.store
    original = store.claim_due
    got: list[Claim] = []

    async def claim_due(*args: Any, **kwargs: Any) -> list[Claim]:
        claims = await original(*args, **kwargs)
        got.extend(claims)
        return claims

    store.claim_due = claim_due  # type: ignore[method-assign]
    return got


def hanging(release: asyncio.Event) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def reply(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="OK")

    return reply


async def test_a_webhooks_delivery_is_sent_without_a_claim(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        claimed = spy_claims(daemon)
        answer = await daemon.post(conversion_id="L1", offer=7, affiliate=42, status="approved")
        assert answer["deliveries"] == 1
        await wait_for(lambda: sink.received)
        [row] = await daemon.deliveries()
        await wait_for(lambda: daemon.services.dispatcher.in_flight == 0)
        [row] = await daemon.deliveries()
        assert row.state is DeliveryState.SUCCEEDED
        assert claimed == []  # it never went through claim_due
        assert len(sink.received) == 1
        detail = await daemon.services.store.get_delivery(row.delivery_id)
        assert detail is not None
        [attempt] = detail.attempts
        assert attempt.outcome == "succeeded"
    finally:
        await daemon.client.close()


async def test_the_delivery_is_in_flight_when_the_webhook_is_answered(
    tmp_path: Path, sink: Sink
) -> None:
    release = asyncio.Event()
    sink.script.append(hanging(release))
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)})
    try:
        claimed = spy_claims(daemon)
        await daemon.post(conversion_id="L2", offer=7, affiliate=42, status="approved")
        # Started by the commit itself: no wake-up, no claim's round trip first.
        assert daemon.services.dispatcher.in_flight == 1
        [row] = await daemon.deliveries()
        assert row.state is DeliveryState.IN_FLIGHT
        await wait_for(lambda: sink.received)
        release.set()
        await wait_for(lambda: daemon.services.dispatcher.in_flight == 0)
        [row] = await daemon.deliveries()
        assert row.state is DeliveryState.SUCCEEDED
        assert claimed == []
    finally:
        release.set()
        await daemon.client.close()


async def test_a_node_that_does_not_dispatch_takes_nothing(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)}, dispatch=False)
    try:
        assert daemon.services.dispatcher.lease() is None
        await daemon.post(conversion_id="L3", offer=7, affiliate=42, status="approved")
        [row] = await daemon.deliveries()
        assert row.state is DeliveryState.QUEUED
        assert daemon.services.dispatcher.in_flight == 0
        assert sink.received == []
    finally:
        await daemon.client.close()


async def test_a_destination_past_what_a_claim_could_bring_is_not_leased_more(
    tmp_path: Path, sink: Sink
) -> None:
    """per_host_concurrency 1 (a claim share of 2) and claims of 1: a claim could bring a
    destination to 3 in progress (its share passed by a batch), so a hanging destination is
    leased 3 deliveries and the 4th is written queued; it is sent, through a claim, once
    there is room."""
    release = asyncio.Event()
    sink.script.extend([hanging(release)] * 3)
    daemon = await start_daemon(
        tmp_path,
        {"offer-7.yaml": lifecycle_rules(sink)},
        settings={"outbound": {"allow_cidrs": ["127.0.0.1/32"], "per_host_concurrency": 1}},
    )
    try:
        dispatcher = daemon.services.dispatcher
        dispatcher.config = replace(dispatcher.config, batch=1)
        claimed = spy_claims(daemon)
        for n in range(4):
            await daemon.post(conversion_id=f"S{n}", offer=7, affiliate=42, status="approved")
        assert dispatcher.in_flight == 3
        states = sorted(r.state.value for r in await daemon.deliveries())
        assert states == ["in_flight", "in_flight", "in_flight", "queued"]
        release.set()
        await wait_for(lambda: len(sink.received) == 4)
        await wait_for(lambda: dispatcher.in_flight == 0)
        rows = await daemon.deliveries()
        assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}
        # the queued one came through a claim, the leased ones did not
        assert [c.conversion_id for c in claimed] == ["S3"]
    finally:
        release.set()
        await daemon.client.close()


async def test_leased_claims_after_stop_are_handed_back_due(tmp_path: Path, sink: Sink) -> None:
    """Nothing starts after stop(): claims that come back from an arrival committed meanwhile
    are released at once (due now), not left to wait for their lease."""
    daemon = await start_daemon(tmp_path, {"offer-7.yaml": lifecycle_rules(sink)}, dispatch=False)
    try:
        dispatcher = daemon.services.dispatcher
        dispatcher._running = True  # as run() does; this node's loop was not started
        offer = dispatcher.lease()
        assert offer is not None
        store = daemon.services.store
        runtime = daemon.services.reloader.runtime
        from datetime import UTC, datetime

        from daemon.ingest import make_planner
        from daemon.models import Conversion

        conv = Conversion.parse(
            {"conversion_id": "G1", "offer": "7", "affiliate": "42", "status": "approved"}, None
        )
        now = datetime.now(UTC)
        result = await store.record_arrival(
            "generic", conv, now, make_planner(runtime, "generic", conv, now), offer
        )
        assert len(result.claims) == 1
        await dispatcher.stop(grace=1.0)
        assert dispatcher.lease() is None
        dispatcher.settle_lease(offer, result.claims)
        await dispatcher.drain()
        [row] = await daemon.deliveries()
        assert row.state is DeliveryState.QUEUED
        assert sink.received == []
        again = await store.claim_due("other", datetime.now(UTC), 10, offer.until - now)
        assert [c.delivery_id for c in again] == [row.delivery_id]
    finally:
        await daemon.client.close()


async def test_offers_count_against_max_in_flight_until_settled(tmp_path: Path, sink: Sink) -> None:
    daemon = await start_daemon(
        tmp_path,
        {"offer-7.yaml": lifecycle_rules(sink)},
        dispatch=False,
    )
    try:
        dispatcher = daemon.services.dispatcher
        dispatcher.config = replace(dispatcher.config, max_in_flight=3, batch=2)
        dispatcher._running = True  # as run() does; this node's loop was not started
        # each offer counts as one in flight until settled, and takes at most a batch
        offers = [dispatcher.lease() for _ in range(3)]
        assert [o.limit if o else None for o in offers] == [2, 2, 1]
        assert dispatcher.lease() is None  # 3 offered, none settled: no room
        assert offers[1] is not None
        dispatcher.settle_lease(offers[1], ())  # its arrival failed: the room comes back
        again = dispatcher.lease()
        assert again is not None
        assert again.limit == 1
        assert dispatcher.lease() is None
    finally:
        await daemon.client.close()
