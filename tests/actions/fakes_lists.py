"""A fake list service on 127.0.0.1 for the list actions (E-Delivery, Opt-Intel, DNPL): an
in-memory store of lists keyed by list id that speaks the shape it is configured with (routes,
JSON / form / query fields, where the key goes, what it answers), records every request and
plays scripted failures first. Also the kit the list tests share: resources with the guard open
to loopback, a job, and load-time validation of one action block as `postbackd validate` says."""

from __future__ import annotations

import asyncio
import functools
import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from daemon.actions.base import Job, Resources
from daemon.errors import (
    DeliveryError,
    OutcomeUnknownError,
    PermanentError,
    RetryableError,
    RulesError,
)
from daemon.loader import load_rules
from daemon.outbound import Guard, OutboundHttp
from daemon.secrets import SecretResolver, env_var_name
from daemon.store.base import AttemptRow, DeliveryState
from tests.harness import FakeClock, start_daemon, wait_for

Answer = tuple[int, Any]  # (status, JSON body; a str is sent as text)
# A scripted reply: an answer, "hang" (never answers), "drop" (closes the connection after
# reading the request) or a handler of its own.
Scripted = Answer | Literal["hang", "drop"] | Callable[[web.Request], Awaitable[web.StreamResponse]]


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
class Got:
    """One request as the fake received it."""

    method: str
    path_qs: str
    headers: Mapping[str, str]
    body: bytes
    fields: dict[str, str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class FakeListService:
    shape: Shape
    lists: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # id -> (kind, value)
    received: list[Got] = field(default_factory=list)
    script: list[Scripted] = field(default_factory=list)
    server: TestServer | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FakeListService:
        app = web.Application()
        for pattern in self.shape.routes:
            app.router.add_route("*", pattern, functools.partial(self._handle, pattern))
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self._release.set()
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def members(self, list_id: str) -> set[tuple[str, str]]:
        return self.lists.get(list_id, set())

    async def _handle(self, pattern: str, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fields = self._fields(request, body)
        got = Got(request.method, request.path_qs, dict(request.headers), body, fields)
        self.received.append(got)
        if self.script:
            return await self._scripted(self.script.pop(0), request)
        status, answer = self._answer(pattern, request, fields)
        return _reply(status, answer)

    async def _scripted(self, reply: Scripted, request: web.Request) -> web.StreamResponse:
        if reply == "hang":
            await self._release.wait()
            return web.Response(status=503)
        if reply == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)  # never reaches the client
        if callable(reply):
            return await reply(request)
        assert isinstance(reply, tuple)
        return _reply(*reply)

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


def _reply(status: int, answer: Any) -> web.Response:
    if isinstance(answer, str):
        return web.Response(status=status, text=answer)
    return web.Response(status=status, text=json.dumps(answer), content_type="application/json")


@asynccontextmanager
async def serving(shape: Shape, *list_ids: str) -> AsyncIterator[FakeListService]:
    fake = FakeListService(shape, lists={i: set() for i in list_ids})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


# --- the kit the list tests share ------------------------------------------------------------

KEY = "generic:T-1:1:7"
# The line of the first setting under `action:` in the file `validation_errors` writes.
FIRST_SETTING_LINE = 7


def secret_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """The environment that makes each `${secret:NAME}` resolve to its value."""
    return {env_var_name(name): value for name, value in secrets.items()}


@asynccontextmanager
async def resources(
    secrets: Mapping[str, str] | None = None,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> AsyncIterator[Resources]:
    """Resources with the guard open to 127.0.0.1 only (no name is ever resolved)."""
    http = OutboundHttp(guard=Guard(["127.0.0.1/32"]), timeout=timeout)
    await http.start()
    try:
        yield Resources(
            http=http,
            secret=SecretResolver(
                credentials_dir=None, secrets_dir=None, environ=secret_env(secrets or {})
            ),
            clock=FakeClock(),
            timeout=timeout,
        )
    finally:
        await http.close()


def make_job(**values: str) -> Job:
    base = {"conversion_id": "T-1", "offer": "1", "affiliate": "42", "idempotency_key": KEY}
    base.update(values)
    return Job(postback_id=7, delivery_id="d-1", idempotency_key=KEY, values=base, data=base)


def rule_file(action: str, *, offer: int = 1, postback_id: int = 7) -> str:
    """A rule file with one active conversion_done postback (any affiliate) doing `action`
    (YAML, unindented); the action's first setting is on line FIRST_SETTING_LINE."""
    body = textwrap.indent(textwrap.dedent(action).strip("\n"), " " * 6)
    return (
        f"offer: {offer}\n"
        "postbacks:\n"
        f"  - id: {postback_id}\n"
        "    trigger: conversion_done\n"
        '    affiliate: "*"\n'
        "    action:\n"
        f"{body}\n"
    )


def validation_errors(tmp_path: Path, action: str) -> list[str]:
    """The `file:line: postback N: message` lines `postbackd validate` prints for one postback
    doing `action`; [] when it loads."""
    rules = tmp_path / "rules.d"
    rules.mkdir(exist_ok=True)
    (rules / "pb.yaml").write_text(rule_file(action))
    try:
        load_rules(rules, git=False)
    except RulesError as err:
        return [str(issue) for issue in err.issues]
    return []


def leaks(secret: str, *texts: Any) -> list[str]:
    """The texts (str() of each) that contain `secret`."""
    return [str(t) for t in texts if secret in str(t)]


# Headers every request carries whatever the action (set by aiohttp and the shared client).
TRANSPORT_HEADERS = frozenset({"Host", "Accept", "Accept-Encoding", "User-Agent"})


def action_headers(got: Got) -> dict[str, str]:
    """The headers of a received request minus the transport's own."""
    return {k: v for k, v in got.headers.items() if k not in TRANSPORT_HEADERS}


async def outcome(action: Any, job: Job) -> tuple[str, str]:
    """(outcome, reason) of one attempt as the dispatcher files it."""
    try:
        await action.send(job)
    except RetryableError as err:
        return "retry", err.reason
    except OutcomeUnknownError as err:
        return "outcome_unknown", err.reason
    except PermanentError as err:
        return "dead", err.reason
    return "succeeded", ""


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


async def attempt_texts(action: Any, job: Job) -> tuple[tuple[str, str], list[str]]:
    """Send once; (outcome, every text the attempt left behind: the error's str, repr and
    causes, the attempt record, the log lines)."""
    texts: list[str] = []
    with capture_logs() as logs:
        try:
            await action.send(job)
            result = ("succeeded", "")
        except DeliveryError as err:
            result = (type(err).__name__, err.reason)
            cause: BaseException | None = err
            while cause is not None:
                texts += [str(cause), repr(cause), repr(cause.args)]
                cause = cause.__cause__ or cause.__context__
    record = job.record
    texts.append(repr(record.request.as_dict() if record.request else None))
    texts.append(repr(record.response_excerpt))
    texts += [repr(line) for line in logs]
    return result, texts


@dataclass
class EndToEnd:
    """What one conversion left behind after it went webhook -> rule -> fake."""

    answer: dict[str, Any]
    attempts: list[AttemptRow]
    logs: list[MutableMapping[str, Any]]
    state: DeliveryState


async def end_to_end(
    tmp_path: Path,
    action: str,
    secrets: Mapping[str, str],
    done: Callable[[], Any],
    **conversion: Any,
) -> EndToEnd:
    """Start the daemon with one postback doing `action` (offer 1, conversion_done), post an
    approved conversion of offer 1 with `conversion` fields, wait until `done()` holds and the
    attempt is logged."""
    daemon = await start_daemon(
        tmp_path, {"pb.yaml": rule_file(action)}, environ=secret_env(secrets)
    )
    try:
        with capture_logs() as logs:
            answer = await daemon.post(offer=1, affiliate=42, status="approved", **conversion)
            await wait_for(done)
            await wait_for(lambda: [e for e in logs if e["event"] == "delivery_attempt"])
        (row,) = await daemon.deliveries()
        detail = await daemon.services.store.get_delivery(row.delivery_id)
        assert detail is not None
        return EndToEnd(answer, detail.attempts, logs, detail.delivery.state)
    finally:
        await daemon.client.close()
