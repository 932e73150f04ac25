"""A fake Slack on 127.0.0.1: `POST /api/chat.postMessage` checks the bot token and the JSON
body and answers like the Web API (HTTP 200, `ok` true or false); `POST /services/{hook}`
answers like an incoming webhook (200 `ok`, or an HTTP error with a plain-text tag). Every
request is recorded; a script of replies overrides the answers one request at a time."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import Received

# (status, body, headers), or "hang" (answer only when the fake closes).
Reply = tuple[int, str, dict[str, str]] | str


@dataclass
class FakeSlack:
    token: str
    hook: str = "T0001/B0001/hooksecret0001"
    received: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    server: TestServer | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_post("/services/{hook:.*}", self._webhook)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self._release.set()
        if self.server is not None:
            await self.server.close()

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def api_base(self) -> str:
        return f"{self.origin}/api/"

    @property
    def hooks_base(self) -> str:
        return f"{self.origin}/services/"

    @property
    def webhook_url(self) -> str:
        return self.hooks_base + self.hook

    def json(self, index: int = -1) -> Any:
        return json.loads(self.received[index].body)

    async def _record(self, request: web.Request) -> web.StreamResponse | None:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if not self.script:
            return None
        reply = self.script.pop(0)
        if reply == "hang":
            await self._release.wait()
            return web.Response(text="ok")
        assert not isinstance(reply, str)
        status, text, headers = reply
        return web.Response(status=status, text=text, headers=headers)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        scripted = await self._record(request)
        if scripted is not None:
            return scripted
        if request.match_info["method"] != "chat.postMessage":
            return _api_error("unknown_method")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _api_error("invalid_auth")
        if not request.headers.get("Content-Type", "").startswith("application/json"):
            return _api_error("invalid_post_type")
        data = json.loads(self.received[-1].body)
        if not data.get("channel"):
            return _api_error("channel_not_found")
        if not data.get("text") and not data.get("blocks"):
            return _api_error("no_text")
        answer = {"ok": True, "channel": data["channel"], "ts": "1790000000.000100"}
        return web.json_response(answer)

    async def _webhook(self, request: web.Request) -> web.StreamResponse:
        scripted = await self._record(request)
        if scripted is not None:
            return scripted
        if request.match_info["hook"] != self.hook:
            return web.Response(status=404, text="no_service")
        try:
            data = json.loads(self.received[-1].body)
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        if not data.get("text") and not data.get("blocks"):
            return web.Response(status=400, text="no_text")
        return web.Response(text="ok")


def _api_error(error: str) -> web.Response:
    return web.json_response({"ok": False, "error": error})
