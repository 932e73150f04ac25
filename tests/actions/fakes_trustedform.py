"""A fake TrustedForm certificate API on 127.0.0.1: `POST /{cert_id}` checks Basic auth (any
user, the API key as password), `api-version: 4.0` and the v4 body, retains the certificate
(answering `previously_retained` on a repeat) and records every request. A script of replies
overrides its answers one request at a time."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from tests.actions.kit import FakeServer


def v4_answer(outcome: str, reason: str | None = None, **extra: Any) -> str:
    return json.dumps({"outcome": outcome, "reason": reason, **extra})


@dataclass
class FakeTrustedForm(FakeServer):
    api_key: str
    retained: set[str] = field(default_factory=set)
    content_type: ClassVar[str | None] = "application/json"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{cert_id}", self._handle)

    @property
    def base(self) -> str:
        """What the action's trustedform_base override points at."""
        return f"{self.url}/"

    def json(self, index: int = -1) -> Any:
        return json.loads(self.received[index].body)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        got = await self.record(request)
        scripted = await self.scripted(request)
        return scripted if scripted is not None else self._answer(request, got.body)

    def late_reply(self) -> web.StreamResponse:
        return web.Response(status=200, text=v4_answer("success"))

    def _answer(self, request: web.Request, body: bytes) -> web.Response:
        if not self._authorized(request.headers.get("Authorization", "")):
            return _json(401, v4_answer("error", "invalid credentials"))
        if request.headers.get("api-version") != "4.0":
            return _json(400, v4_answer("error", "unsupported api-version"))
        try:
            data = json.loads(body)
        except ValueError:
            return _json(400, v4_answer("error", "malformed JSON"))
        if "retain" in data and not data.get("match_lead"):
            return _json(400, v4_answer("error", "match_lead is required with retain"))
        cert_id = request.match_info["cert_id"]
        results = {
            "expires_at": "2027-01-01T00:00:00Z",
            "previously_retained": cert_id in self.retained,
        }
        self.retained.add(cert_id)
        match = data["match_lead"]
        answer = {
            "outcome": "success",
            "reason": None,
            "match_lead": {
                **match,
                "result": {"success": True, "email_match": "email" in match, "phone_match": False},
            },
            "retain": {**data["retain"], "results": results},
        }
        return _json(200, json.dumps(answer))

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme != "Basic":
            return False
        try:
            _, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return False
        return password == self.api_key


def _json(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="application/json")
