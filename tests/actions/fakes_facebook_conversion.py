"""A fake Graph API on 127.0.0.1 that answers `POST /{version}/{pixel}/events` as Meta does:
it checks the token (and appsecret_proof), the form fields and each event, and records every
request. A script of replies overrides its own answers, one request at a time."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from tests.actions.kit import FakeServer


def graph_error(code: int, message: str, subcode: int | None = None) -> str:
    error: dict[str, Any] = {
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGh123",
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return json.dumps({"error": error})


@dataclass
class FakeGraph(FakeServer):
    token: str
    app_secret: str | None = None
    require_proof: bool = False  # the app's "Require App Secret" switch
    now: Callable[[], float] = time.time

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{version}/{pixel}/events", self._handle)

    def form(self, index: int = -1) -> dict[str, str]:
        return dict(parse_qsl(self.received[index].text, keep_blank_values=True))

    def events(self, index: int = -1) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.form(index)["data"])
        return data

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        got = await self.record(request)
        scripted = await self.scripted(request)
        if scripted is not None:
            return scripted
        return await self._answer(dict(parse_qsl(got.text, keep_blank_values=True)))

    async def _answer(self, form: dict[str, str]) -> web.Response:
        def fail(code: int, message: str, subcode: int | None = None) -> web.Response:
            text = graph_error(code, message, subcode)
            return web.Response(status=400, text=text, content_type="application/json")

        token = form.get("access_token", "")
        if token != self.token:
            return fail(190, "Invalid OAuth access token - Cannot parse access token")
        given = form.get("appsecret_proof")
        if self.app_secret is not None and (given is not None or self.require_proof):
            proof = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
            if given != proof:
                return fail(100, "Invalid appsecret_proof provided in the API argument")
        try:
            events = json.loads(form["data"])
        except (KeyError, ValueError):
            return fail(100, "Invalid parameter", 2804050)
        for event in events:
            missing = {"event_name", "event_time", "action_source", "user_data"} - set(event)
            if missing:
                return fail(100, f"Invalid parameter: missing {sorted(missing)}", 2804019)
            if event["event_time"] < self.now() - 7 * 86400:
                return fail(100, "Invalid parameter: event_time too old", 2804003)
        answer = {"events_received": len(events), "messages": [], "fbtrace_id": "AbCdEfGh123"}
        return web.json_response(answer)
