"""Two nodes on one PostgreSQL database and a dead destination (in-process, one injected
clock): they do not share their breakers, but the held backlog is hidden from both, so the dead
destination gets `threshold` attempts from each node and then one probe per pause, never the
backlog twice; a node that dies holding deliveries strands them only until the safety time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import create_app
from daemon.breaker import BreakerState
from daemon.settings import Settings
from daemon.store.base import DeliveryState
from tests.harness import LOOPBACK, Daemon, FakeClock, Received, Sink, write_rules
from tests.store.conftest import pg_schema
from tests.test_breaker_inprocess import rules

pytestmark = pytest.mark.postgres

BREAKER = {"threshold": 2, "first_pause": "5s", "growth": 2.0, "max_pause": "20s"}


class SwitchSink(Sink):
    """Answers 503 while `down`, else 200."""

    down = True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.method, request.path_qs, {}, b""))
        return web.Response(status=503 if self.down else 200)


async def node(root: Path, name: str, dsn: str, sink: Sink, clock: FakeClock) -> Daemon:
    write_rules(root / "rules.d", rules(sink.url))
    (root / "webhooks").mkdir(exist_ok=True)
    settings = Settings.model_validate(
        {
            "store": dsn,
            "rules_dir": str(root / "rules.d"),
            "webhooks_dir": str(root / "webhooks"),
            "outbound": {
                "allow_cidrs": LOOPBACK,
                "timeout": 5,
                "per_host_concurrency": 2,
                "breaker": BREAKER,
            },
            "config_dir": root,
        }
    )
    app = create_app(settings, environ={}, clock=clock, dispatch=False, watch=False, node=name)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return Daemon(client, root / "rules.d", settings)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Daemon, SwitchSink, FakeClock]]:
    async with pg_schema() as dsn:
        sink = SwitchSink()
        await sink.start()
        clock = FakeClock()
        a = await node(tmp_path / "a", "a", dsn, sink, clock)
        b = await node(tmp_path / "b", "b", dsn, sink, clock)
        try:
            yield a, b, sink, clock
        finally:
            await b.client.close()
            await a.client.close()
            await sink.close()


async def cycle(daemon: Daemon) -> None:
    dispatcher = daemon.services.dispatcher
    while await dispatcher.dispatch_once():
        await dispatcher.drain()
    await dispatcher.drain()


async def post(daemon: Daemon, prefix: str, n: int) -> None:
    for i in range(n):
        await daemon.post(conversion_id=f"{prefix}{i}", offer=1, affiliate=7, status="approved")


async def test_two_nodes_do_not_hammer_a_dead_destination_twice_over(
    nodes: tuple[Daemon, Daemon, SwitchSink, FakeClock],
) -> None:
    a, b, sink, clock = nodes
    await post(a, "a", 20)
    await cycle(a)  # 2 attempts at 2 in flight: open; the other 18 held
    assert len(sink.received) == 2
    await cycle(b)  # the backlog is held: B has nothing to claim
    assert len(sink.received) == 2
    await post(b, "b", 10)  # new conversions reach B: its own breaker opens after 2 failures
    await cycle(b)
    assert len(sink.received) == 4
    await cycle(a)
    assert len(sink.received) == 4
    for d in (a, b):
        assert d.services.dispatcher.destinations.state(sink.url) is BreakerState.OPEN
    clock.advance(5.1)  # both pauses end: one probe each
    await cycle(a)
    await cycle(b)
    assert len(sink.received) == 6
    sink.down = False
    clock.advance(10.1)  # the second pauses (10 s) end: the probes succeed, the backlog drains
    await cycle(a)
    await cycle(b)
    await cycle(a)
    clock.advance(300)  # the first failures' own retries
    await cycle(a)
    await cycle(b)
    rows = await a.deliveries()
    assert len(rows) == 30
    assert {r.state for r in rows} == {DeliveryState.SUCCEEDED}
    assert len(sink.received) <= 6 + 30  # every delivery sent once more at most after the return


async def test_deliveries_held_by_a_node_that_died_are_due_again_at_the_safety_time(
    nodes: tuple[Daemon, Daemon, SwitchSink, FakeClock],
) -> None:
    a, b, sink, clock = nodes
    await post(a, "a", 10)
    await cycle(a)  # A opens and holds 8 deliveries
    held = [r for r in await a.deliveries() if r.attempts == 0]
    assert len(held) == 8
    await a.client.close()  # A is gone (its claims were all handed back held)
    sink.down = False
    clock.advance(39)  # the safety time is 2 x max_pause = 40 s
    await cycle(b)  # only the two that failed at A are due (their retry), not the held ones
    sent = {r.path_qs.rsplit("=", 1)[1] for r in sink.received}
    assert len(sent) == 2
    assert not sent & {r.conversion_id for r in held}
    clock.advance(2)
    await cycle(b)
    rows = {r.delivery_id: r for r in await b.deliveries()}
    assert {rows[r.delivery_id].state for r in held} == {DeliveryState.SUCCEEDED}
