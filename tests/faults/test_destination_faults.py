"""Destination faults against the real `postbackd run` with conversions flowing, all in one
process and one fault window (one start-up shared): one destination accepts and never answers,
one resets mid-answer, one answers 503, and one stays healthy; then all three recover. Every
conversion fires one postback to each. The breaker pauses the failing ones (first pause 1 s
in these settings); the test holds the outcome, not the pause: delivered after it recovers.

DNS failing is in-process: the daemon's resolver is a stub there (a subprocess would ask the
system's DNS, and tests send no packet beyond loopback). The name fails from the start: a name
that resolved once keeps working for aiohttp's DNS cache (10 s) and its kept-alive
connections, which is how the daemon rides out a short DNS outage."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.app import create_app
from daemon.settings import Settings
from tests.faults.support import (
    OUTBOUND_TIMEOUT,
    REPORT_WITHIN,
    FaultSink,
    Node,
    ReadyWatch,
    Traffic,
    all_delivered,
    assert_no_unexplained_duplicates,
    assert_resumed,
    client_session,
    flowing,
    note,
    rules_yaml,
)
from tests.harness import LOOPBACK, StubResolver, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAULT = 6.0  # short enough that no delivery fails twice (its retry is due 8-12 s later)
ROUTES = ("hang", "reset", "flaky", "fine")
MODES = {"hang": "hang", "reset": "reset", "flaky": "503"}


async def test_a_hanging_a_resetting_and_a_503_destination_recover_by_themselves(
    tmp_path: Path, fault_sink: FaultSink
) -> None:
    node = Node(tmp_path / "n0", "sqlite:///../var/postbackd.db", fault_sink, ROUTES)
    node.start()
    async with client_session() as session:
        watch = ReadyWatch(session, node)
        traffic = Traffic(session, [node])
        try:
            await flowing(session, node, watch, traffic, fault_sink, hits=40)
            t0 = time.monotonic()
            fault_sink.modes.update(MODES)
            await wait_for(lambda: watch.first_with(t0, "destinations_down"), deadline=10)
            reported = watch.first_with(t0, "destinations_down")
            assert reported is not None
            assert note("destination_faults report", reported) <= REPORT_WITHIN
            before = len(fault_sink.delivered("fine"))
            await wait_for(lambda: len(fault_sink.delivered("fine")) > before + 10, deadline=5)
            await asyncio.sleep(max(0.0, t0 + FAULT - time.monotonic()))  # the fault's length
            fault_sink.modes.clear()
            t1 = time.monotonic()
            for route in MODES:
                await assert_resumed(fault_sink, "destination_faults resume", t1, route)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic, postbacks=(1, 2, 3, 4), deadline=30)
        # The node itself was ready throughout: a destination's outage is not its own.
        assert watch.statuses(t0, time.monotonic()) == {200}
        await wait_for(lambda: watch.seen[-1][2]["destinations_down"] == 0, deadline=10)
        await watch.stop()
    assert node.stop() == 0
    node.assert_clean_log()
    assert_no_unexplained_duplicates(fault_sink)
    reasons = {e.get("reason") for e in node.events("delivery_attempt") if e["outcome"] == "retry"}
    assert {"timeout", "http_503"} <= reasons
    assert reasons & {"disconnected", "connect_failed"}
    assert node.events("breaker_opened")


class Served:
    """The app in-process on a loopback port, as an Endpoint for Traffic and ReadyWatch."""

    def __init__(self, url: str) -> None:
        self.url = url


async def test_dns_failing_then_answering_again(
    tmp_path: Path, fault_sink: FaultSink, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp import web

    rules = tmp_path / "rules.d"
    rules.mkdir()
    (tmp_path / "webhooks").mkdir()
    (rules / "offer-1.yaml").write_text(rules_yaml(fault_sink, ["dns"], host="sink.test"))
    settings = Settings.model_validate(
        {
            "store": f"sqlite:///{tmp_path / 'postbackd.db'}",
            "rules_dir": str(rules),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {
                "allow_cidrs": LOOPBACK,
                "timeout": OUTBOUND_TIMEOUT,
                "breaker": {"first_pause": 1.0, "max_pause": 4.0},
            },
            "config_dir": tmp_path,
        }
    )
    resolver = StubResolver()  # sink.test does not resolve
    app = create_app(settings, environ={}, resolver=resolver, watch=False)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    daemon = Served(f"http://127.0.0.1:{port}")
    try:
        with capture_logs() as logs:
            async with client_session() as session:
                await _dns_outage(session, daemon, resolver, fault_sink)
    finally:
        await runner.cleanup()
    assert_no_unexplained_duplicates(fault_sink)
    assert set(resolver.calls) == {"sink.test"}
    events = {e["event"] for e in logs}
    assert not events & {"task_failed", "attempt_task_failed", "loop_failing", "loop_stalled"}
    assert "breaker_opened" in events
    assert "Task exception was never retrieved" not in caplog.text


async def _dns_outage(
    session: aiohttp.ClientSession, daemon: Served, resolver: StubResolver, sink: FaultSink
) -> None:
    watch = ReadyWatch(session, daemon)
    traffic = Traffic(session, [daemon])
    try:
        t0 = time.monotonic()
        watch.start()
        traffic.start(workers=2)
        await wait_for(lambda: watch.first_with(t0, "destinations_down"), deadline=10)
        reported = watch.first_with(t0, "destinations_down")
        assert reported is not None
        assert note("destination_faults report", reported) <= REPORT_WITHIN
        await asyncio.sleep(max(0.0, t0 + FAULT - time.monotonic()))  # the fault's length
        resolver.names["sink.test"] = ["127.0.0.1"]
        t1 = time.monotonic()
        await assert_resumed(sink, "destination_faults resume", t1, "dns")
    finally:
        await traffic.stop()
    await all_delivered(sink, traffic, deadline=30)
    assert watch.statuses(t0, time.monotonic()) == {200}
    await watch.stop()
