"""A fake Slack on 127.0.0.1: `POST /api/chat.postMessage` checks the bot token and the JSON
body and answers like the Web API (HTTP 200, `ok` true or false); `POST /services/{hook}`
answers like an incoming webhook (200 `ok`, or an HTTP error with a plain-text tag). Every
request is recorded; a script of replies overrides the answers one request at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.actions.kit import FakeServer


@dataclass
class FakeSlack(FakeServer):
    token: str
    hook: str = "T0001/B0001/hooksecret0001"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/{method}", self._api)
        router.add_post("/services/{hook:.*}", self._webhook)

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/"

    @property
    def hooks_base(self) -> str:
        return f"{self.url}/services/"

    @property
    def webhook_url(self) -> str:
        return self.hooks_base + self.hook

    def json(self, index: int = -1) -> Any:
        return json.loads(self.received[index].body)

    async def _record(self, request: web.Request) -> web.StreamResponse | None:
        await self.record(request)
        return await self.scripted(request)

    def late_reply(self) -> web.StreamResponse:
        return web.Response(text="ok")

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
