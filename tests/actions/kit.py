"""What the action tests share: a Job made the way the dispatcher makes one, the resources an
action is built with (the guard open to loopback only, secrets from a dict, a stub resolver),
the rules a user would write and the `file:line: postback N: message` lines `postbackd validate`
prints for them, the base of every fake provider on 127.0.0.1, and the checks that an attempt
left no secret behind."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self

import pytest
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
from daemon.models import Conversion, Transition, arrival_view
from daemon.outbound import Guard, OutboundHttp, Resolver
from daemon.secrets import SecretResolver, env_var_name
from daemon.store.base import AttemptRow, DeliveryState
from tests.harness import (
    LOOPBACK,
    FakeClock,
    Received,
    StubResolver,
    start_daemon,
    wait_for,
)

NOW = FakeClock().now()  # what every FakeClock() says until a test moves it
RAND = "00000000-0000-4000-8000-000000000000"
# The conversion make_job starts from; a test's fields override it.
CONVERSION = {"conversion_id": "T-1", "offer": "1", "affiliate": "42", "status": "approved"}
KEY = "generic:T-1:1:7"  # the idempotency key of that conversion's postback 7
# The line of the first setting under `action:` in the file rule_file writes.
FIRST_SETTING_LINE = 7


# --- a job ---------------------------------------------------------------------------------


def make_job(
    fields: Mapping[str, str] | None = None,
    *,
    extra: Mapping[str, str] | None = None,
    postback_id: int = 7,
    now: float = NOW,
    raw: Mapping[str, str] | None = None,
    key: str | None = None,
) -> Job:
    """One attempt's Job as the dispatcher builds it: CONVERSION updated with `fields`
    (canonical names; extra parameters as extra.NAME keys, or in `extra`) goes through
    Conversion.parse, rule_data (received at `now` by the generic source) and attempt_values.
    `raw` values are laid over the macro values unchecked, for text no webhook lets in
    (control characters, over-long values); `key` stands for another arrival's key."""
    params = {**CONVERSION, **(fields or {})}
    canonical = {k: v for k, v in params.items() if not k.startswith("extra.")}
    extras = {k.removeprefix("extra."): v for k, v in params.items() if k.startswith("extra.")}
    conversion = Conversion.parse(canonical, {**extras, **(extra or {})})
    data, values = arrival_view(
        conversion,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime.fromtimestamp(now, UTC),
    )
    key = key or f"generic:{conversion.conversion_id}:1:{postback_id}"
    job = Job.for_attempt(postback_id, "d-1", key, values, data, now=now, rand=RAND)
    job.values = {**job.values, **(raw or {})}
    return job


# --- resources -----------------------------------------------------------------------------


def loopback_http(
    resolver: Resolver | None = None, allow: list[str] | None = None, timeout: float = 5.0
) -> OutboundHttp:
    """The shared client, its guard open to loopback (or `allow`) only; start and close it."""
    return OutboundHttp(
        guard=Guard(LOOPBACK if allow is None else allow),
        resolver=resolver or StubResolver(),
        timeout=timeout,
    )


def secret_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """The environment that makes each `${secret:NAME}` resolve to its value."""
    return {env_var_name(name): value for name, value in secrets.items()}


def make_resources(
    http: Any,
    secrets: Mapping[str, str] | None = None,
    *,
    clock: FakeClock | None = None,
    timeout: float = 5.0,
    overrides: Mapping[str, str] | None = None,
) -> Resources:
    """What an action is built with: `http`, `secrets` (name -> value) as the daemon would
    resolve them from its environment, a FakeClock."""
    environ = secret_env(secrets or {})
    return Resources(
        http=http,
        secret=SecretResolver(credentials_dir=None, secrets_dir=None, environ=environ),
        clock=clock or FakeClock(),
        timeout=timeout,
        overrides=overrides or {},
    )


@asynccontextmanager
async def action_resources(
    secrets: Mapping[str, str] | None = None,
    *,
    resolver: Resolver | None = None,
    allow: list[str] | None = None,
    clock: FakeClock | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 -- the actions' per-request deadline
) -> AsyncIterator[Resources]:
    """make_resources() with a client of their own (a stub resolver, another guard)."""
    async with loopback_http(resolver, allow, timeout) as http:
        yield make_resources(http, secrets, clock=clock, timeout=timeout)


# --- rules as a user writes them -----------------------------------------------------------


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


def load_issues(rules: Path, files: Mapping[str, str]) -> list[str]:
    """Write `files` (name -> text) into the folder `rules` and load it: the lines
    `postbackd validate` prints (`file:line: postback N: message`), [] when it loads."""
    rules.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (rules / name).write_text(text)
    try:
        load_rules(rules, git=False)
    except RulesError as err:
        return [str(issue) for issue in err.issues]
    return []


def validate(tmp_path: Path, action: str) -> list[str]:
    """load_issues for pb.yaml holding one postback (7, offer 1) doing `action`."""
    return load_issues(tmp_path / "rules.d", {"pb.yaml": rule_file(action)})


# --- a fake provider -----------------------------------------------------------------------

# A scripted reply: (status, body) or (status, body, headers); "hang" (answers late_reply()
# only when the fake closes); "drop" (closes the connection after reading the request); or a
# handler of its own.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Reply = tuple[int, Any] | tuple[int, Any, Mapping[str, str]] | str | Handler


@dataclass(kw_only=True)
class FakeServer:
    """A provider's fake on 127.0.0.1 (a free port). A subclass adds its routes; each handler
    records the request, then answers the next scripted reply if there is one, else as the
    provider would."""

    received: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    server: TestServer | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    content_type: ClassVar[str | None] = None  # of scripted bodies, unless their headers say

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application()
        self.routes(app.router)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self.release.set()  # a hanging reply ends now; nobody is listening any more
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def record(self, request: web.Request, into: list[Received] | None = None) -> Received:
        body = await request.read()
        got = Received(request.method, request.path_qs, dict(request.headers), body)
        (self.received if into is None else into).append(got)
        return got

    async def scripted(
        self, request: web.Request, script: list[Reply] | None = None
    ) -> web.StreamResponse | None:
        """The next reply of `script` (the fake's own by default); None when it is empty."""
        script = self.script if script is None else script
        if not script:
            return None
        reply = script.pop(0)
        if reply == "hang":
            await self.release.wait()
            return self.late_reply()
        if reply == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never reaches the client
        if callable(reply):
            return await reply(request)
        assert isinstance(reply, tuple)
        return self.reply(*reply)

    def reply(
        self, status: int, body: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        headers = dict(headers or {})
        if self.content_type is not None and "Content-Type" not in headers:
            return web.Response(
                status=status, text=body, headers=headers, content_type=self.content_type
            )
        return web.Response(status=status, text=body, headers=headers)

    def late_reply(self) -> web.StreamResponse:
        """What a "hang" reply answers once the fake closes (nobody reads it)."""
        return web.Response(text="{}")


# --- what an attempt left behind -----------------------------------------------------------


def leaks(secret: str, *texts: Any) -> list[str]:
    """The texts (str() of each) that contain `secret`."""
    return [str(t) for t in texts if secret in str(t)]


ANY_DELAY = object()  # expect_outcome: whatever retry_after the error carries


async def expect_outcome(
    action: Any,
    job: Job,
    error: type[DeliveryError] | None,
    reason: str | None = None,
    retry_after: float | object | None = ANY_DELAY,
) -> None:
    """Send `job` once: it succeeds when `error` is None, else it raises exactly `error` (not
    a subclass) with `reason` and, when it is a RetryableError, `retry_after` if given."""
    if error is None:
        await action.send(job)
        return
    with pytest.raises(DeliveryError) as caught:
        await action.send(job)
    assert type(caught.value) is error
    assert caught.value.reason == reason
    if retry_after is not ANY_DELAY and isinstance(caught.value, RetryableError):
        assert caught.value.retry_after == retry_after


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
    rules: str | Mapping[str, str],
    secrets: Mapping[str, str],
    done: Callable[[], Any],
    *,
    daemon_options: Mapping[str, Any] | None = None,
    **conversion: Any,
) -> EndToEnd:
    """Start the daemon (start_daemon with `daemon_options`) with `rules`: file name -> text,
    or the action block of one postback that rule_file makes (offer 1, postback 7). Post an
    approved conversion of offer 1 by affiliate 42, as `conversion` changes it; wait until
    `done()` holds and the attempt is logged; return what the one delivery left behind."""
    files = {"pb.yaml": rule_file(rules)} if isinstance(rules, str) else rules
    daemon = await start_daemon(
        tmp_path, files, environ=secret_env(secrets), **(daemon_options or {})
    )
    try:
        with capture_logs() as logs:
            params = {"offer": 1, "affiliate": 42, "status": "approved", **conversion}
            answer = await daemon.post(**params)
            await wait_for(done)
            await wait_for(lambda: [e for e in logs if e["event"] == "delivery_attempt"])
        (row,) = await daemon.deliveries()
        detail = await daemon.services.store.get_delivery(row.delivery_id)
        assert detail is not None
        return EndToEnd(answer, detail.attempts, logs, detail.delivery.state)
    finally:
        await daemon.client.close()
