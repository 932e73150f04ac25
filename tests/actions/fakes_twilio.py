"""A fake Twilio Messages API on 127.0.0.1: `POST /2010-04-01/Accounts/{sid}/Messages.json`
checks Basic auth (the account SID and auth token, or an API key SID and secret), the form
fields, and answers 201 with the message resource or Twilio's JSON error
(`{"code", "message", "more_info", "status"}`). Every request is recorded; a script of replies
overrides the answers one request at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import Received

# (status, body, headers), or "hang" (answer only when the fake closes).
Reply = tuple[int, str, dict[str, str]] | str
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
class FakeTwilio:
    account_sid: str
    credentials: dict[str, str]  # Basic auth user -> password that it accepts
    received: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    server: TestServer | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FakeTwilio:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self._release.set()
        if self.server is not None:
            await self.server.close()

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def form(self, index: int = -1) -> list[tuple[str, str]]:
        return parse_qsl(self.received[index].body.decode(), keep_blank_values=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if self.script:
            reply = self.script.pop(0)
            if reply == "hang":
                await self._release.wait()
                return web.Response(status=201, text="{}")
            assert not isinstance(reply, str)
            status, text, headers = reply
            return web.Response(status=status, text=text, headers=headers)
        return self._answer(request, body)

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
