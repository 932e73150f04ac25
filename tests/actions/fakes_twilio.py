"""A fake Twilio Messages API on 127.0.0.1: `POST /2010-04-01/Accounts/{sid}/Messages.json`
checks Basic auth (the account SID and auth token, or an API key SID and secret), the form
fields, and answers 201 with the message resource or Twilio's JSON error
(`{"code", "message", "more_info", "status"}`). Every request is recorded; a script of replies
overrides the answers one request at a time."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web

from tests.actions.kit import FakeServer

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def twilio_error(status: int, code: int, message: str = "error") -> str:
    return json.dumps(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
    )


@dataclass
class FakeTwilio(FakeServer):
    account_sid: str
    credentials: dict[str, str]  # Basic auth user -> password that it accepts

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._handle)

    def form(self, index: int = -1) -> list[tuple[str, str]]:
        return parse_qsl(self.received[index].body.decode(), keep_blank_values=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        got = await self.record(request)
        scripted = await self.scripted(request)
        return scripted if scripted is not None else self._answer(request, got.body)

    def late_reply(self) -> web.StreamResponse:
        return web.Response(status=201, text="{}")

    def _answer(self, request: web.Request, body: bytes) -> web.Response:
        if request.match_info["sid"] != self.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        if not self._authorized(request.headers.get("Authorization", "")):
            return _error(401, 20003, "Authenticate")
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if "To" not in form:
            return _error(400, 21604, "A 'To' phone number is required.")
        if not _E164.match(form["To"]):
            return _error(400, 21211, f"The 'To' number {form['To']} is not a valid phone number.")
        if ("From" in form) == ("MessagingServiceSid" in form):
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        if not form.get("Body"):
            return _error(400, 21602, "Message body is required.")
        resource = {
            "sid": "SM" + "0" * 31 + str(len(self.received) % 10),
            "account_sid": self.account_sid,
            "status": "accepted" if "MessagingServiceSid" in form else "queued",
            "to": form["To"],
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": form["Body"],
        }
        return web.json_response(resource, status=201)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme != "Basic":
            return False
        try:
            user, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return False
        return self.credentials.get(user) == password


def _error(status: int, code: int, message: str) -> web.Response:
    return web.Response(
        status=status, text=twilio_error(status, code, message), content_type="application/json"
    )
