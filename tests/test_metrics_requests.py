"""postbackd_http_requests_total counts every request the app answers, under its route's pattern
(never the raw URL; `unmatched` for none) and the code it was answered with, however the app is
served: aiohttp's TestServer (the tests' harness), a plain AppRunner, and daemon.ingest's
GuardedRunner (`postbackd run`). The count is made by the app's request handler
(daemon.metrics.count_requests), not by a middleware: these would fail if a way of serving the
app stopped counting, or if a code or a label changed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon.app import SERVICES, create_app
from daemon.ingest import GuardedRunner
from daemon.metrics import Metrics
from daemon.settings import Settings
from tests.harness import LOOPBACK, wait_for
from tests.test_metrics import parse, value

WEBHOOK = "/webhooks/{source}"
REQUESTS = "postbackd_http_requests_total"


def make_app(tmp_path: Path) -> tuple[web.Application, asyncio.Event]:
    """The daemon's app, with three routes of the test's own: one raising an HTTPException,
    one raising something else, one that never answers (set when it started)."""
    for folder in ("rules.d", "webhooks"):
        (tmp_path / folder).mkdir()
    settings = Settings.model_validate(
        {
            "store": f"sqlite:///{tmp_path / 'postbackd.db'}",
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, dispatch=False, watch=False)
    hanging = asyncio.Event()

    async def gone(request: web.Request) -> web.StreamResponse:
        raise web.HTTPGone()

    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("boom")

    async def hang(request: web.Request) -> web.StreamResponse:
        hanging.set()
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    app.router.add_get("/t/gone", gone)
    app.router.add_get("/t/boom", boom)
    app.router.add_get("/t/hang/{n}", hang)
    return app, hanging


Serve = Callable[[web.Application], contextlib.AbstractAsyncContextManager[str]]


@contextlib.asynccontextmanager
async def on_test_server(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app, host="127.0.0.1")  # handler_cancellation on, as for every test
    await server.start_server()
    try:
        yield str(server.make_url(""))
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def runner_of(runner: web.AppRunner) -> AsyncIterator[str]:
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def app_runner(app: web.Application) -> contextlib.AbstractAsyncContextManager[str]:
    # Cancelled on a client's disconnect, as TestServer's handlers are (499 without a stop).
    return runner_of(web.AppRunner(app, access_log=None, handler_cancellation=True))


def guarded_runner(app: web.Application) -> contextlib.AbstractAsyncContextManager[str]:
    return runner_of(GuardedRunner(app, access_log=None, handler_cancellation=True))


@pytest.mark.parametrize("serve", [on_test_server, app_runner, guarded_runner])
async def test_every_answer_is_counted_by_route_and_code(tmp_path: Path, serve: Serve) -> None:
    app, hanging = make_app(tmp_path)
    async with serve(app) as base, aiohttp.ClientSession(base) as client:
        metrics: Metrics = app[SERVICES].metrics
        answers = [
            ("GET", "/webhooks/generic?conversion_id=c1&offer=7&affiliate=9&status=approved"),
            ("POST", "/webhooks/generic?conversion_id=c2&offer=7&affiliate=9&status=approved"),
            ("GET", "/webhooks/nosuch?conversion_id=x"),  # the handler's own 404
            ("GET", "/no/such/route/x9"),  # the router's 404
            ("PUT", "/healthz"),  # the router's 405
            ("GET", "/t/gone"),  # an HTTPException raised by the handler
            ("GET", "/t/boom"),  # any other exception: aiohttp's 500
            ("GET", "/healthz"),
        ]
        codes = []
        for method, path in answers:
            async with client.request(method, path) as resp:
                await resp.read()
                codes.append(resp.status)
        assert codes == [200, 200, 404, 404, 405, 410, 500, 200]
        # The client goes away before an answer: the handler is cancelled, counted as 499.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                fetch = asyncio.create_task(client.get("/t/hang/77"))
                await hanging.wait()
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        samples = await wait_for(
            lambda: (
                (s := parse(metrics.render().decode()))
                and value(s, REQUESTS, route="/t/hang/{n}", code="499")
                and s
            )
        )

    counted = {
        (dict(labels)["route"], dict(labels)["code"]): count
        for (name, labels), count in samples.items()
        if name == REQUESTS
    }
    assert counted == {
        (WEBHOOK, "200"): 2,
        (WEBHOOK, "404"): 1,
        ("unmatched", "404"): 1,
        ("unmatched", "405"): 1,
        ("/t/gone", "410"): 1,
        ("/t/boom", "500"): 1,
        ("/healthz", "200"): 1,
        ("/t/hang/{n}", "499"): 1,
    }
