"""The console over plain HTTP (no browser): sign-in, the pages render for both roles, and the
attack paths: forged cookies, CSRF missing or wrong, another tenant's ids, hostile forms."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Daemon, Sink, start_daemon
from tests.ui.kit import ADMIN, AFF42, ENV, rules, settings, sign_in


@pytest.fixture
async def daemon(tmp_path: Path, sink: Sink) -> AsyncIterator[Daemon]:
    bad = await Sink().start()
    d = await start_daemon(tmp_path, rules(sink, bad), environ=ENV, settings=settings())
    yield d
    await d.client.close()
    await bad.close()


async def test_every_page_renders_for_an_admin(daemon: Daemon) -> None:
    await sign_in(daemon.client, ADMIN)
    await daemon.post(conversion_id="c1", offer=7, affiliate=42, status="approved", payout=9)
    for path in (
        "/ui/offers",
        "/ui/offers/7",
        "/ui/postbacks/101",
        "/ui/deliveries",
        "/ui/conversions?source=generic&id=c1",
        "/ui/health",
        "/ui/postbacks/101/send-test",
    ):
        resp = await daemon.client.get(path)
        assert resp.status == 200, (path, await resp.text())


async def test_every_page_renders_for_an_affiliate(daemon: Daemon) -> None:
    await sign_in(daemon.client, AFF42)
    for path in ("/ui/offers", "/ui/offers/7", "/ui/postbacks/101", "/ui/deliveries"):
        resp = await daemon.client.get(path)
        assert resp.status == 200, (path, await resp.text())
