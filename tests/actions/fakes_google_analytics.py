"""A fake GA4 Measurement Protocol endpoint on 127.0.0.1: `/mp/collect` records and answers 204
whatever it gets (as Google does), `/debug/mp/collect` answers `validationMessages` for what
breaks GA4's documented limits. A script of replies overrides either, one request at a time."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from tests.actions.kit import FakeServer

RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_EVENTS = {"first_visit", "session_start", "user_engagement", "error", "first_open"}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")


def message(path: str, code: str, description: str) -> dict[str, str]:
    return {"fieldPath": path, "description": description, "validationCode": code}


def validate(body: Any, now: float) -> list[dict[str, str]]:
    """A subset of what GA's validation server checks, enough to tell a good event from a bad."""
    if not isinstance(body, dict):
        return [message("", "VALUE_INVALID", "the body is not a JSON object")]
    out: list[dict[str, str]] = []
    if not body.get("client_id"):
        out.append(message("client_id", "VALUE_REQUIRED", "client_id is required"))
    micros = body.get("timestamp_micros")
    if micros is not None and micros < (now - 72 * 3600) * 1_000_000:
        out.append(message("timestamp_micros", "VALUE_INVALID", "more than 72 hours ago"))
    for i, event in enumerate(body.get("events") or []):
        name = event.get("name", "")
        if name in RESERVED_EVENTS or name.startswith(RESERVED_PREFIXES):
            out.append(message(f"events[{i}].name", "NAME_RESERVED", f"{name} is reserved"))
        elif not NAME.fullmatch(name):
            out.append(message(f"events[{i}].name", "NAME_INVALID", f"{name} is not valid"))
        params = event.get("params", {})
        if len(params) > 25:
            out.append(message(f"events[{i}].params", "EXCEEDED_MAX_ENTITIES", "over 25"))
        for key, value in params.items():
            if not NAME.fullmatch(key) or key.startswith(RESERVED_PREFIXES):
                out.append(message(f"events[{i}].params", "NAME_INVALID", f"{key} is not valid"))
            if isinstance(value, str) and len(value) > 100:
                path = f"events[{i}].params.{key}"
                out.append(message(path, "VALUE_INVALID", "longer than 100 characters"))
    return out


@dataclass
class FakeGA(FakeServer):
    now: Callable[[], float] = time.time

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/mp/collect", self._collect)
        router.add_post("/debug/mp/collect", self._debug)

    def body(self, index: int = -1) -> Any:
        return json.loads(self.received[index].body)

    def query(self, index: int = -1) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.received[index].path_qs).query)

    async def _record(self, request: web.Request) -> web.StreamResponse | None:
        await self.record(request)
        return await self.scripted(request)

    async def _collect(self, request: web.Request) -> web.StreamResponse:
        scripted = await self._record(request)
        return scripted if scripted is not None else web.Response(status=204)

    async def _debug(self, request: web.Request) -> web.StreamResponse:
        scripted = await self._record(request)
        if scripted is not None:
            return scripted
        try:
            body = json.loads(self.received[-1].body)
        except ValueError:
            body = None
        return web.json_response({"validationMessages": validate(body, self.now())})
