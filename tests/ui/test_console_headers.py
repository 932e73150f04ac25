"""The console's headers (daemon.ui.base.SECURITY_HEADERS, and Cache-Control) are on every answer
under /ui (its pages, its static files, its 404 page, the router's 405s and 404s there, aiohttp's
500) and on no answer outside it: they are set by the response signal of the console's own app,
mounted at /ui, so the daemon's app has no response signal for a webhook to run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from daemon.ui import store_pages
from daemon.ui.base import SECURITY_HEADERS, Ctx
from tests.harness import Daemon, FakeClock, Sink, start_daemon
from tests.ui.kit import ADMIN, ENV, rules, settings, sign_in

CONSOLE_ONLY = (*SECURITY_HEADERS, "Cache-Control")


@pytest.fixture
async def daemon(
    tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemon]:
    async def broken(ctx: Ctx) -> web.Response:
        raise RuntimeError("a bug in a page")

    monkeypatch.setattr(store_pages, "health", broken)  # /ui/health answers aiohttp's 500
    bad = await Sink().start()
    d = await start_daemon(
        tmp_path, rules(sink, bad), environ=ENV, settings=settings(), clock=FakeClock()
    )
    yield d
    await d.client.close()
    await bad.close()


async def test_every_console_answer_has_the_headers_and_nothing_else_does(daemon: Daemon) -> None:
    client = daemon.client
    await sign_in(client, ADMIN)
    console = [
        ("GET", "/ui", 303),
        ("GET", "/ui/", 303),
        ("GET", "/ui/offers", 200),
        ("HEAD", "/ui/offers", 200),
        ("GET", "/ui/static/console.css", 200),
        ("GET", "/ui/static/nosuch.css", 404),  # the static handler's
        ("GET", "/ui/no/such/page", 404),  # the console's own 404 page
        ("PUT", "/ui/offers", 405),  # the router's
        ("POST", "/ui", 405),
        ("GET", "/ui/health", 500),  # aiohttp's answer to an exception
    ]
    for method, path, status in console:
        resp = await client.request(method, path, allow_redirects=False)
        await resp.read()
        assert resp.status == status, (method, path)
        for name, text in SECURITY_HEADERS.items():
            assert resp.headers.get(name) == text, (method, path, name)
        assert resp.headers.get("Cache-Control") in ("no-store", "no-cache"), (method, path)

    outside = [
        ("GET", "/webhooks/generic?conversion_id=h1&offer=7&affiliate=42&status=approved", 200),
        ("POST", "/webhooks/generic?conversion_id=h2&offer=7&affiliate=42&status=approved", 200),
        ("GET", "/webhooks/nosuch", 404),
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/api/v1/postbacks", 200),
        ("GET", "/uix", 404),
        ("GET", "/no/such", 404),
    ]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for method, path, status in outside:
        resp = await client.request(method, path, headers=headers, allow_redirects=False)
        await resp.read()
        assert resp.status == status, (method, path)
        assert not [name for name in CONSOLE_ONLY if name in resp.headers], (method, path)


async def test_the_daemons_app_has_no_response_signal(daemon: Daemon) -> None:
    """What a webhook's answer would run: the signals of the apps its route belongs to."""
    app = daemon.client.app
    assert app is not None
    assert not app.on_response_prepare
