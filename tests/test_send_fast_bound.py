"""An attempt's bound without a timer of the dispatcher's own (real sink, store and client): a
ping_url through the shared client ends by the attempt's deadline because its request carries
it; any other action is still cut by the dispatcher's timer."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest
from aiohttp import web

from daemon.actions import ping_url
from daemon.actions.base import Job, Resources, is_bounded
from daemon.affiliates.outbound import PolicyHttp
from daemon.affiliates.policy import Policy
from daemon.errors import OutcomeUnknownError
from daemon.guard import Guard
from daemon.outbound import OutboundHttp
from daemon.store.base import Claim, DeliveryState
from tests.harness import LOOPBACK, FakeClock, Sink, start_daemon, wait_for


def rule(sink: Sink) -> dict[str, str]:
    return {
        "o.yaml": f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/p?tx={{conversion_id}}"}}
"""
    }


async def test_a_ping_url_ends_by_the_attempt_bound_without_the_dispatchers_timer(
    tmp_path: Path, sink: Sink
) -> None:
    gate = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await gate.wait()  # answers only once the test has seen the attempt end
        return web.Response(text="late")

    sink.script = [hang]
    outbound = {"allow_cidrs": LOOPBACK, "timeout": 60}
    daemon = await start_daemon(
        tmp_path, rule(sink), dispatch=False, settings={"outbound": outbound}
    )
    dispatcher = daemon.services.dispatcher
    # The attempt's bound (0.3 s) comes long before the request's own timeout (60 s): an
    # attempt that ran to the request's timeout would fail the drain's generous deadline.
    dispatcher.config = dataclasses.replace(dispatcher.config, attempt_timeout=0.3)
    assert is_bounded(dispatcher._runtime().actions[1])
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        assert await dispatcher.dispatch_once() == 1
        async with asyncio.timeout(30):
            await dispatcher.drain()
        [row] = await daemon.deliveries()
        assert not gate.is_set()  # ended by the bound, not by an answer
        assert (row.state, row.attempts, row.last_reason) == (
            DeliveryState.RETRYING,
            1,
            "timeout",
        )
        assert len(sink.received) == 1  # it was sent, and cut
    finally:
        gate.set()
        await daemon.client.close()


class _Stuck:
    """An action that awaits something no request bounds (as SMTP's dialogue may)."""

    idempotent: ClassVar[bool] = False
    destination = "smtp://mail.example:25"

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def preview(self, job: Job) -> object:
        raise NotImplementedError

    async def send(self, job: Job) -> None:
        assert job.deadline is None  # not bounded: the dispatcher keeps the bound itself
        self.started.set()
        await asyncio.Event().wait()


async def test_an_action_not_bounded_is_cut_by_the_dispatchers_timer(
    tmp_path: Path, sink: Sink
) -> None:
    daemon = await start_daemon(tmp_path, rule(sink), dispatch=False)
    dispatcher = daemon.services.dispatcher
    runtime = dispatcher._runtime()
    lp = runtime.rules.postbacks[1]
    action = _Stuck()
    assert not is_bounded(action)
    claim = Claim(
        "d1", "t", 1, action.destination, "generic", "c1", 1, "k1", 0, datetime.now(UTC), {}, {}
    )
    try:
        deadline = asyncio.get_running_loop().time() + 0.3
        job, error, _, _ = await dispatcher._send(claim, lp, action, deadline)  # type: ignore[arg-type]
        assert action.started.is_set()
        assert isinstance(error, OutcomeUnknownError)  # not idempotent: it may have been done
        assert error.detail == "attempt timed out after the request was sent"
        assert job.deadline is None
    finally:
        await daemon.client.close()


async def test_only_the_shared_client_itself_makes_a_ping_url_bounded() -> None:
    settings = ping_url.Settings.model_validate(
        {"type": "ping_url", "url": "http://127.0.0.1:9/x?tx={conversion_id}"}
    )
    http = OutboundHttp(guard=Guard(LOOPBACK))
    clock = FakeClock()
    plain = ping_url.build(settings, Resources(http=http, secret=str, clock=clock))
    assert is_bounded(plain)
    # An affiliate's postbacks go through PolicyHttp, whose check before each hop may resolve
    # a name (not bounded by the request's timeout): the dispatcher's timer bounds those.
    wrapped = PolicyHttp(http, lambda: Policy())
    affiliate = ping_url.build(settings, Resources(http=wrapped, secret=str, clock=clock))
    assert not is_bounded(affiliate)


@pytest.mark.parametrize("bounded", [True, False])
async def test_a_bounded_job_carries_its_deadline_to_the_request(bounded: bool) -> None:
    job = Job.for_attempt(1, "d", "k", {}, {}, now=0.0, deadline=12.5 if bounded else None)
    assert job.deadline == (12.5 if bounded else None)


async def test_an_attempt_cancelled_mid_send_still_ends_its_claim_shares(
    tmp_path: Path, sink: Sink
) -> None:
    # The send never ends by itself: stop() cancels it, and only the task's end callback can
    # give the destination's and the affiliate's shares back.
    gate = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(text="late")

    sink.script = [hang]
    daemon = await start_daemon(
        tmp_path,
        rule(sink),
        dispatch=False,
        settings={"delivery": {"per_affiliate_in_flight": 2}},
    )
    dispatcher = daemon.services.dispatcher
    try:
        await daemon.post(conversion_id="c1", offer=1, affiliate=7, status="approved")
        assert await dispatcher.dispatch_once() == 1
        await wait_for(lambda: len(sink.received) == 1)
        assert dispatcher._per_destination.count(sink.url) == 1
        await dispatcher.stop(grace=0.0)
        assert dispatcher.in_flight == 0
        assert dispatcher._per_destination.count(sink.url) == 0
        assert dispatcher._per_affiliate.saturated() == []
    finally:
        gate.set()
        await daemon.client.close()
