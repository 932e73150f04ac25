"""Shared test harness: a recording sink on loopback, the daemon in-process, a stub resolver,
a fake clock, and polling with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import textwrap
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import SERVICES, Services, create_app
from daemon.settings import Settings

LOOPBACK = ["127.0.0.1/32", "::1/128"]


async def wait_for(
    predicate: Callable[[], Any], deadline: float = 10.0, interval: float = 0.01
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; fail at the deadline."""
    until = time.monotonic() + deadline
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > until:
            raise AssertionError(f"condition not met within {deadline}s")
        await asyncio.sleep(interval)


@dataclass
class Received:
    method: str
    path_qs: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


Reply = tuple[int, str, dict[str, str]] | Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Sink:
    """An HTTP server on 127.0.0.1 that records every request and answers from a script
    (default 200 "OK")."""

    received: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    server: TestServer | None = None

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if self.script:
            reply = self.script.pop(0)
            if callable(reply):
                return await reply(request)
            status, text, headers = reply
            return web.Response(status=status, text=text, headers=headers)
        return web.Response(text="OK")


class StubResolver:
    """Maps names to fixed addresses (`default` for any other name, else it fails like DNS
    would); records every name asked. Never touches DNS."""

    def __init__(
        self, names: Mapping[str, list[str]] | None = None, *, default: list[str] | None = None
    ) -> None:
        self.names = dict(names or {})
        self.default = default
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        found = self.names.get(host, self.default)
        if found is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return found


def connect_tripwire(monkeypatch: Any) -> list[tuple[str, int]]:
    """Records every TCP connect attempted on the running loop, and refuses (unsent) any that
    is not to a loopback address: the proof that a guard stopped a request is that nothing
    was attempted, never a packet sent elsewhere."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, int]] = []
    real = loop.sock_connect

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        seen.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "tripwire: not loopback")
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    return seen


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def lifecycle_rules(sink: Sink) -> str:
    """Offer 7 with one postback per trigger (the end-to-end tests' rule file)."""
    return f"""
offer: 7
postbacks:
  - id: 11
    trigger: conversion_pending
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pending?tx={{conversion_id}}"}}
  - id: 12
    trigger: conversion_done
    affiliate: 42
    action:
      type: ping_url
      url: "{sink.url}/done?cid={{click_id}}&payout={{payout}}&tx={{conversion_id}}"
  - id: 13
    trigger: conversion_reject
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/reject?tx={{conversion_id}}"}}
"""


def write_rules(rules_dir: Path, files: Mapping[str, str]) -> None:
    rules_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = rules_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@dataclass
class Daemon:
    client: TestClient
    rules_dir: Path
    settings: Settings

    @property
    def services(self) -> Services:
        return self.client.app[SERVICES]  # type: ignore[index]

    async def post(self, source: str = "generic", **params: Any) -> dict[str, Any]:
        resp = await self.client.get(
            f"/webhooks/{source}", params={k: str(v) for k, v in params.items()}
        )
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def deliveries(self, **flt: Any) -> list[Any]:
        from daemon.store.base import DeliveryFilter

        rows, _ = await self.services.store.list_deliveries(DeliveryFilter(**flt), 1000, None)
        return rows


async def start_daemon(
    tmp_path: Path,
    rules: Mapping[str, str],
    *,
    clock: Any = None,
    dispatch: bool = True,
    watch: bool = False,
    environ: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
    store_url: str | None = None,
    resolver: Any = None,
    overrides: Mapping[str, str] | None = None,
) -> Daemon:
    """The daemon in-process on a free loopback port, with a SQLite store under tmp_path and the
    outbound guard opened to loopback only. Close with `await daemon.client.close()`."""
    rules_dir = tmp_path / "rules.d"
    write_rules(rules_dir, rules)
    (tmp_path / "webhooks").mkdir(exist_ok=True)
    conf: dict[str, Any] = {
        "store": store_url or f"sqlite:///{tmp_path / 'postbackd.db'}",
        "rules_dir": str(rules_dir),
        "webhooks_dir": str(tmp_path / "webhooks"),
        "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5},
        "config_dir": tmp_path,
    }
    conf.update(settings or {})
    cfg = Settings.model_validate(conf)
    app = create_app(
        cfg,
        environ=dict(environ or {}),
        clock=clock,
        dispatch=dispatch,
        watch=watch,
        resolver=resolver,
        overrides=overrides,
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return Daemon(client, rules_dir, cfg)
