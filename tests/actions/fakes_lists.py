"""A fake list service on 127.0.0.1 for the list actions (E-Delivery, Opt-Intel, DNPL): an
in-memory store of lists keyed by list id that speaks the shape it is configured with (routes,
JSON / form / query fields, where the key goes, what it answers), records every request and
plays scripted failures first; and the provider answers every list action must classify alike."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from tests.actions.kit import FakeServer, Handler
from tests.harness import Received

Answer = tuple[int, Any]  # (status, JSON body; a str is sent as text)
# A scripted reply (see kit.FakeServer): an answer, "hang", "drop" or a handler of its own.
Scripted = Answer | Literal["hang", "drop"] | Handler


@dataclass
class Shape:
    """How the fake speaks: mirror of a list action's settings."""

    # aiohttp route pattern -> (operation, identifier kind the route takes or None for any);
    # a `{list_id}` in the pattern names the list, else the body's `list_id_field` does.
    routes: dict[str, tuple[Literal["add", "remove"], str | None]]
    content: Literal["json", "form", "query"] = "json"
    list_id_field: str = "list_id"
    auth: tuple[Literal["header", "query", "body"], str, str] | None = None
    identifiers: dict[str, str] = field(
        default_factory=lambda: {"email": "email", "phone": "phone"}
    )
    ok: Answer = (200, {"status": "success"})
    exists: Answer = (409, {"status": "error", "message": "contact already exists"})
    missing: Answer = (404, {"status": "error", "message": "contact not found"})


@dataclass
class Got(Received):
    """One request as the fake received it, with the fields it carried."""

    fields: dict[str, str]


@dataclass
class FakeListService(FakeServer):
    shape: Shape
    lists: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # id -> (kind, value)

    def routes(self, router: web.UrlDispatcher) -> None:
        for pattern in self.shape.routes:
            router.add_route("*", pattern, functools.partial(self._handle, pattern))

    def members(self, list_id: str) -> set[tuple[str, str]]:
        return self.lists.get(list_id, set())

    async def _handle(self, pattern: str, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fields = self._fields(request, body)
        self.received.append(
            Got(request.method, request.path_qs, dict(request.headers), body, fields)
        )
        scripted = await self.scripted(request)
        if scripted is not None:
            return scripted
        return self.reply(*self._answer(pattern, request, fields))

    def reply(
        self, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        """A str answer is sent as text, anything else as JSON."""
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        return web.Response(
            status=status, text=json.dumps(body), headers=headers, content_type="application/json"
        )

    def late_reply(self) -> web.StreamResponse:
        return web.Response(status=503)

    def _fields(self, request: web.Request, body: bytes) -> dict[str, str]:
        if self.shape.content == "query":
            return dict(request.query)
        if self.shape.content == "form":
            return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return {}
        return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}

    def _answer(self, pattern: str, request: web.Request, fields: dict[str, str]) -> Answer:
        if not self._authorized(request, fields):
            return 401, {"status": "error", "message": "invalid API key"}
        operation, route_kind = self.shape.routes[pattern]
        list_id = request.match_info.get("list_id") or str(fields.get(self.shape.list_id_field, ""))
        if list_id not in self.lists:
            return 404, {"status": "error", "message": "unknown list"}
        entries = {
            (kind, str(fields[name]))
            for name, kind in self.shape.identifiers.items()
            if fields.get(name) and route_kind in (None, kind)
        }
        unexpected = [
            name
            for name, kind in self.shape.identifiers.items()
            if fields.get(name) and route_kind not in (None, kind)
        ]
        if not entries or unexpected:
            return 400, {"status": "error", "message": "bad contact fields"}
        members = self.lists[list_id]
        if operation == "add":
            if entries <= members:
                return self.shape.exists
            members |= entries
            return self.shape.ok
        if not entries & members:
            return self.shape.missing
        members -= entries
        return self.shape.ok

    def _authorized(self, request: web.Request, fields: Mapping[str, str]) -> bool:
        if self.shape.auth is None:
            return True
        where, name, value = self.shape.auth
        if where == "header":
            return request.headers.get(name) == value
        if where == "query":
            return request.query.get(name) == value
        return fields.get(name) == value


@asynccontextmanager
async def serving(shape: Shape, *list_ids: str) -> AsyncIterator[FakeListService]:
    fake = FakeListService(shape, lists={i: set() for i in list_ids})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


# Headers every request carries whatever the action (set by aiohttp and the shared client).
TRANSPORT_HEADERS = frozenset({"Host", "Accept", "Accept-Encoding", "User-Agent"})


def action_headers(got: Got) -> dict[str, str]:
    """The headers of a received request minus the transport's own."""
    return {k: v for k, v in got.headers.items() if k not in TRANSPORT_HEADERS}


async def _retry_after_429(request: web.Request) -> web.StreamResponse:
    return web.Response(status=429, text="slow down", headers={"Retry-After": "120"})


# Provider answers every list action must classify the same way (its own shape's ok/exists
# answers are tested next to it): (id, scripted reply, outcome, reason).
ANSWERS: list[tuple[str, Scripted, str, str]] = [
    ("200", (200, {"status": "success"}), "succeeded", ""),
    ("201", (201, {"status": "created"}), "succeeded", ""),
    ("204", (204, ""), "succeeded", ""),
    ("400", (400, {"status": "error", "message": "bad email"}), "dead", "http_400"),
    ("401", (401, {"status": "error"}), "dead", "http_401"),
    ("403", (403, {"status": "error"}), "dead", "http_403"),
    ("404", (404, {"status": "error"}), "dead", "http_404"),
    ("422", (422, {"status": "error"}), "dead", "http_422"),
    ("408", (408, ""), "retry", "http_408"),
    ("429", _retry_after_429, "retry", "http_429"),
    ("500", (500, "oops"), "retry", "http_500"),
    ("502", (502, "bad gateway"), "retry", "http_502"),
    ("503", (503, {"status": "maintenance"}), "retry", "http_503"),
    ("302", (302, ""), "dead", "http_302"),
    # Sent but never answered: adding is idempotent, so these are retried, never outcome_unknown.
    ("hang", "hang", "retry", "timeout"),
    ("drop", "drop", "retry", "disconnected"),
]
