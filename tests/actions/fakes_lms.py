"""A fake Phonexa LMS instance on 127.0.0.1: `POST /lead/` (JSON or form) checks apiId,
apiPassword and productId, requires the product's fields, refuses a second lead with the same
email as "Duplicate Application", sells in test mode only when testSold is set, and answers HTTP
200 with the status-coded JSON as LMS does. A script of replies overrides its answers one
request at a time ("hang" answers only when released, "drop" closes the connection)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from aiohttp import web

from tests.actions.kit import FakeServer


def lms(status: int, **extra: Any) -> str:
    return json.dumps({"status": status, **extra})


@dataclass
class FakeLms(FakeServer):
    api_id: str
    api_password: str
    product_id: int = 218
    required: tuple[str, ...] = ("email", "cellPhone")
    emails: set[str] = field(default_factory=set)
    content_type: ClassVar[str | None] = "application/json"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/lead/", self._handle)

    def lead(self, index: int = -1) -> dict[str, Any]:
        got = self.received[index]
        if got.headers.get("Content-Type", "").startswith("application/json"):
            data: dict[str, Any] = json.loads(got.body)
            return data
        return dict(parse_qsl(got.text, keep_blank_values=True))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        scripted = await self.scripted(request)
        return scripted if scripted is not None else _json(self._answer(self.lead()))

    def late_reply(self) -> web.StreamResponse:
        return _json(lms(1, lead_id="LATE"))

    def _answer(self, lead: dict[str, Any]) -> str:
        if lead.get("apiId") != self.api_id or lead.get("apiPassword") != self.api_password:
            failed = "Authorization Failed. ApiId and ApiPassword you entered don't match."
            return lms(4, errors=[{failed: ""}])
        if str(lead.get("productId")) != str(self.product_id):
            return lms(4, errors=[{"productId": "invalid"}])
        missing = [name for name in self.required if not lead.get(name)]
        if missing:
            return lms(4, errors=[{name: "required"} for name in missing])
        if lead["email"] in self.emails:
            return lms(4, errors=[{"Duplicate Application": "Duplicate Application"}])
        self.emails.add(lead["email"])
        if str(lead.get("testMode")) == "1" and str(lead.get("testSold")) != "1":
            return lms(2, lead_id="W_T2", status_text="reject")
        return lms(1, lead_id="W_O0QO", status_text="sold", price="1.0000")


def _json(text: str) -> web.Response:
    return web.Response(status=200, text=text, content_type="application/json")
