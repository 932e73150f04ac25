"""OutboundHttp against real aiohttp servers on 127.0.0.1, and the shared status classifier.

A stub resolver maps test names to addresses; a tripwire on the loop's sock_connect records
every connect attempt and refuses, unsent, any to a non-loopback address.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from daemon.errors import (
    DeliveryError,
    GuardRefusedError,
    OutcomeUnknownError,
    PermanentError,
    RetryableError,
)
from daemon.guard import Guard
from daemon.httpstatus import HttpResponse, classify_status, parse_retry_after
from daemon.outbound import BODY_CAP, OutboundHttp, SystemResolver
from tests.harness import StubResolver, wait_for

LOOPBACK = ["127.0.0.1/32", "::1/128"]
NOW = 1_700_000_000.0
Q_SECRET = "qsSeCrEt7f3a9"
H_SECRET = "hdrSeCrEtb2c4"
P_SECRET = "pathSeCrEt91d0"


pytestmark = pytest.mark.usefixtures("connects")


@dataclass
class Fake:
    """A loopback HTTP server that records what it got and answers by path."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": dict(request.headers),
                "body": body,
                "peer": request.transport.get_extra_info("peername") if request.transport else None,
            }
        )
        parts = request.path.strip("/").split("/")
        return await getattr(self, f"do_{parts[0]}")(request, parts[1:])

    async def do_ok(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        return web.Response(text="hello", headers={"X-Test": "1"})

    async def do_r(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        n = int(rest[0])
        if n == 0:
            return web.Response(text="done")
        return web.Response(status=302, headers={"Location": f"/r/{n - 1}"})

    async def do_go(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        code = int(request.query.get("code", "302"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def do_hang(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        self.received.set()
        await self.release.wait()
        return web.Response(text="late")

    async def do_big(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        return web.Response(body=bytes(range(256)) * 800)  # 200 KiB

    async def do_endless(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while not self.release.is_set():
            await response.write(b"x" * 16384)
        return response

    async def do_cookie(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        response = web.Response(text="set")
        response.set_cookie("sid", "cookieSeCrEt")
        return response

    async def do_status(self, request: web.Request, rest: list[str]) -> web.StreamResponse:
        return web.Response(status=int(rest[0]), headers={"Retry-After": "120"})


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    server = Fake()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    yield server
    server.release.set()
    await runner.cleanup()


class RawServer:
    """A loopback TCP server that counts connections and hangs up after the request head."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()


@pytest.fixture
def resolver() -> StubResolver:
    return StubResolver(
        {
            "svc.test": ["127.0.0.1"],
            "other.test": ["127.0.0.1"],
            "evil.test": ["10.0.0.1"],
            "empty.test": [],
        }
    )


@pytest.fixture
async def http(resolver: StubResolver) -> AsyncIterator[OutboundHttp]:
    client = OutboundHttp(guard=Guard(LOOPBACK), resolver=resolver, timeout=5.0)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: a new connect hangs (Linux drops the SYN)."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler.connect(("127.0.0.1", port))
        yield port


# --- requests that succeed ------------------------------------------------------------------


async def test_get_success(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/ok?a=1"), headers={"X-Custom": "v"})
    assert (response.status, response.body, response.text()) == (200, b"hello", "hello")
    assert response.headers["x-test"] == "1"
    assert response.url == fake.url("/ok?a=1")
    [got] = fake.requests
    assert (got["method"], got["path"], got["query"]) == ("GET", "/ok", "a=1")
    assert got["headers"]["User-Agent"] == "postbackd/0.1"
    assert got["headers"]["X-Custom"] == "v"


async def test_names_go_through_the_resolver(
    http: OutboundHttp, fake: Fake, resolver: StubResolver
) -> None:
    response = await http.request("GET", fake.url("/ok", host="svc.test"))
    assert response.status == 200
    assert resolver.calls == ["svc.test"]
    assert fake.requests[0]["headers"]["Host"] == f"svc.test:{fake.port}"


async def test_post_with_body(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request(
        "POST", fake.url("/ok"), headers={"Content-Type": "application/json"}, data=b'{"a":1}'
    )
    assert response.status == 200
    [got] = fake.requests
    assert (got["method"], got["body"]) == ("POST", b'{"a":1}')
    assert got["headers"]["Content-Type"] == "application/json"


async def test_user_agent_is_configurable(resolver: StubResolver, fake: Fake) -> None:
    async with OutboundHttp(guard=Guard(LOOPBACK), user_agent="custom/2") as client:
        await client.request("GET", fake.url("/ok"))
    assert fake.requests[0]["headers"]["User-Agent"] == "custom/2"


async def test_body_is_capped_and_the_client_stays_usable(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/big"))
    assert response.body == (bytes(range(256)) * 800)[:BODY_CAP]
    assert len(response.body) == BODY_CAP == 65536
    assert (await http.request("GET", fake.url("/ok"))).body == b"hello"


async def test_an_endless_body_is_cut_not_read_to_the_end(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/endless"), timeout=5.0)
    assert response.body == b"x" * BODY_CAP


async def test_no_cookie_is_kept(http: OutboundHttp, fake: Fake) -> None:
    await http.request("GET", fake.url("/cookie"))
    await http.request("GET", fake.url("/ok"))
    assert "Cookie" not in fake.requests[1]["headers"]


async def test_proxy_environment_is_ignored(
    monkeypatch: pytest.MonkeyPatch, resolver: StubResolver, fake: Fake
) -> None:
    async with RawServer() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with OutboundHttp(guard=Guard(LOOPBACK), resolver=resolver) as client:
            await client.request("GET", fake.url("/ok"))
            await client.request("GET", fake.url("/ok", host="svc.test"))
    assert proxy.accepted == 0
    assert fake.paths == ["/ok", "/ok"]


# --- redirects ------------------------------------------------------------------------------


async def test_get_follows_three_redirects(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/r/3"))
    assert (response.status, response.body) == (200, b"done")
    assert response.url == fake.url("/r/0")
    assert fake.paths == ["/r/3", "/r/2", "/r/1", "/r/0"]


async def test_a_fourth_redirect_is_refused(http: OutboundHttp, fake: Fake) -> None:
    with pytest.raises(PermanentError) as info:
        await http.request("GET", fake.url("/r/4"))
    assert info.value.reason == "too_many_redirects"
    assert fake.paths == ["/r/4", "/r/3", "/r/2", "/r/1"]


async def test_redirect_to_a_refused_name_never_reaches_it(
    http: OutboundHttp, fake: Fake, resolver: StubResolver, connects: list[tuple[str, int]]
) -> None:
    to = f"http://evil.test:{fake.port}/steal"
    with pytest.raises(GuardRefusedError) as info:
        await http.request("GET", fake.url(f"/go?to={to}"))
    assert info.value.detail == f"private address: http://evil.test:{fake.port}"
    assert resolver.calls == ["evil.test"]
    assert connects == [("127.0.0.1", fake.port)]
    assert fake.paths == ["/go"]


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("http://10.0.0.1:{port}/", "private address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata address (IPv4-mapped)"),
        # Loopback is allowed here, and still an odd spelling of it is refused.
        ("http://2130706433:{port}/", "non-canonical IPv4 spelling"),
    ],
)
async def test_redirect_to_a_refused_literal(
    http: OutboundHttp,
    fake: Fake,
    resolver: StubResolver,
    connects: list[tuple[str, int]],
    to: str,
    reason: str,
) -> None:
    with pytest.raises(GuardRefusedError) as info:
        await http.request("GET", fake.url("/go?to=" + to.format(port=fake.port)))
    assert info.value.detail.startswith(reason + ": ")
    assert resolver.calls == []
    assert connects == [("127.0.0.1", fake.port)]


@pytest.mark.parametrize("to", ["ftp://127.0.0.1/x", "javascript:alert(1)", "file:///etc/passwd"])
async def test_redirect_to_another_scheme_is_bad_redirect(
    http: OutboundHttp, fake: Fake, to: str
) -> None:
    with pytest.raises(PermanentError) as info:
        await http.request("GET", fake.url(f"/go?to={to}"))
    assert info.value.reason == "bad_redirect"


async def test_post_does_not_follow(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("POST", fake.url("/r/1"), data=b"x", idempotent=False)
    assert response.status == 302
    assert fake.paths == ["/r/1"]
    with pytest.raises(PermanentError) as info:
        classify_status(response, NOW)
    assert info.value.reason == "http_302"


async def test_get_can_be_told_not_to_follow(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/r/1"), follow_redirects=False)
    assert (response.status, fake.paths) == (302, ["/r/1"])


@pytest.mark.parametrize(("code", "method", "body"), [(307, "POST", b"x=1"), (303, "GET", b"")])
async def test_post_told_to_follow_keeps_or_drops_the_body(
    http: OutboundHttp, fake: Fake, code: int, method: str, body: bytes
) -> None:
    response = await http.request(
        "POST",
        fake.url(f"/go?code={code}&to=/ok"),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        data=b"x=1",
        follow_redirects=True,
    )
    assert response.status == 200
    assert [(r["method"], r["body"]) for r in fake.requests] == [("POST", b"x=1"), (method, body)]
    assert ("Content-Type" in fake.requests[1]["headers"]) is (method == "POST")


async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    http: OutboundHttp, fake: Fake
) -> None:
    headers = {"Authorization": "Bearer t0k3n", "X-Api-Key": "k3y", "Idempotency-Key": "s:1:1:7"}
    to = f"http://other.test:{fake.port}/ok"
    await http.request("GET", fake.url(f"/go?to={to}"), headers=headers)
    await http.request("GET", fake.url("/go?to=/ok"), headers=headers)
    cross, same = fake.requests[1]["headers"], fake.requests[3]["headers"]
    assert "Authorization" not in cross
    assert "X-Api-Key" not in cross
    assert cross["Idempotency-Key"] == "s:1:1:7"
    assert (same["Authorization"], same["X-Api-Key"]) == ("Bearer t0k3n", "k3y")


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(("idempotent", "error"), [(False, OutcomeUnknownError), (True, None)])
async def test_read_timeout_after_sending(
    http: OutboundHttp, fake: Fake, idempotent: bool, error: type[DeliveryError] | None
) -> None:
    with pytest.raises(DeliveryError) as info:
        await http.request(
            "POST", fake.url("/hang"), data=b"sms", timeout=0.5, idempotent=idempotent
        )
    assert fake.received.is_set()  # the request was sent: its outcome is unknown
    if error is None:
        assert type(info.value) is RetryableError
        assert info.value.reason == "timeout"
    else:
        assert type(info.value) is error
        assert info.value.detail == f"timeout: http://127.0.0.1:{fake.port}"


async def test_a_deadline_before_the_timeout_ends_the_request(
    http: OutboundHttp, fake: Fake
) -> None:
    # The attempt's bound (daemon.dispatcher) comes first: the request ends by it, sent or not.
    until = asyncio.get_running_loop().time() + 0.3
    with pytest.raises(RetryableError) as info:
        await http.request("GET", fake.url("/hang"), timeout=60.0, deadline=until)
    assert fake.received.is_set()
    assert not fake.release.is_set()  # ended by the deadline, not by an answer
    assert info.value.reason == "timeout"


async def test_a_deadline_already_past_sends_nothing(http: OutboundHttp, fake: Fake) -> None:
    until = asyncio.get_running_loop().time() - 1.0
    with pytest.raises(RetryableError) as info:
        await http.request("GET", fake.url("/ok"), deadline=until)
    assert info.value.reason == "timeout"
    assert fake.requests == []


async def test_read_timeout_on_a_pooled_connection_is_an_unknown_outcome(
    http: OutboundHttp, fake: Fake
) -> None:
    # The second request reuses the first one's connection (no new connection is made): it
    # was sent all the same, so a non-idempotent request that times out has an unknown outcome.
    await http.request("GET", fake.url("/ok"))
    with pytest.raises(OutcomeUnknownError) as info:
        await http.request("POST", fake.url("/hang"), data=b"sms", timeout=0.5, idempotent=False)
    assert fake.received.is_set()
    assert info.value.detail == f"timeout: http://127.0.0.1:{fake.port}"
    [first, second] = [r["peer"] for r in fake.requests]
    assert first == second  # one connection: the pooled one was reused


@pytest.mark.parametrize("idempotent", [False, True])
async def test_server_hangs_up_after_the_request(http: OutboundHttp, idempotent: bool) -> None:
    async with RawServer() as raw:
        with pytest.raises(DeliveryError) as info:
            await http.request("POST", f"http://127.0.0.1:{raw.port}/x", idempotent=idempotent)
    assert raw.accepted == 1
    if idempotent:
        assert (type(info.value), info.value.reason) == (RetryableError, "disconnected")
    else:
        assert (type(info.value), info.value.reason) == (OutcomeUnknownError, "outcome_unknown")
        assert info.value.detail.startswith("disconnected: ")


@pytest.mark.parametrize("idempotent", [False, True])
async def test_connection_refused_is_retryable(
    http: OutboundHttp, closed_port: int, idempotent: bool
) -> None:
    url = f"http://127.0.0.1:{closed_port}/x"
    with pytest.raises(RetryableError) as info:
        await http.request("POST", url, data=b"x", idempotent=idempotent)
    assert (info.value.reason, info.value.detail) == ("connect_failed", url[:-2])


async def test_connect_timeout_is_retryable_even_when_not_idempotent(
    resolver: StubResolver, full_backlog: int
) -> None:
    guard = Guard(LOOPBACK)
    async with OutboundHttp(guard=guard, resolver=resolver, connect_timeout=0.2) as client:
        with pytest.raises(RetryableError) as info:
            await client.request("POST", f"http://127.0.0.1:{full_backlog}/", idempotent=False)
    assert info.value.reason == "connect_timeout"


async def test_deadline_spent_connecting_is_a_connect_timeout(
    http: OutboundHttp, full_backlog: int
) -> None:
    # The request deadline (not connect_timeout) expires while connecting: never sent, so
    # retryable even for a non-idempotent request (aiohttp raises a bare TimeoutError here).
    with pytest.raises(RetryableError) as info:
        await http.request(
            "POST", f"http://127.0.0.1:{full_backlog}/", timeout=0.2, idempotent=False
        )
    assert info.value.reason == "connect_timeout"


@pytest.mark.parametrize("name", ["nx.test", "empty.test"])
async def test_dns_failure_is_retryable(
    http: OutboundHttp, connects: list[tuple[str, int]], name: str
) -> None:
    with pytest.raises(RetryableError) as info:
        await http.request("POST", f"http://{name}/x", idempotent=False)
    assert (info.value.reason, info.value.detail) == ("dns_failed", f"http://{name}:80")
    assert connects == []


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "ftp://127.0.0.1/",
        "http:///nohost",
        "http://x:99999/",
        "//127.0.0.1/",
        "",
        "http://%31%32%37.0.0.1/",
        "http://a b/",
    ],
)
async def test_invalid_url(http: OutboundHttp, url: str) -> None:
    with pytest.raises(PermanentError) as info:
        await http.request("GET", url)
    assert info.value.reason == "bad_url"


async def test_request_before_start() -> None:
    with pytest.raises(RuntimeError, match="start"):
        await OutboundHttp(guard=Guard()).request("GET", "http://127.0.0.1/")


async def test_system_resolver_returns_unique_addresses() -> None:
    # Numeric hosts only: getaddrinfo answers them without asking DNS.
    assert await SystemResolver().resolve("127.0.0.1", 80) == ["127.0.0.1"]
    assert await SystemResolver().resolve("::1", 80) == ["::1"]


# --- no secret in any error -----------------------------------------------------------------

SECRET_HEADERS = {"Authorization": f"Bearer {H_SECRET}", "X-Api-Key": H_SECRET}
TAIL = f"/{P_SECRET}?token={Q_SECRET}#{Q_SECRET}"


def _failure_cases(
    fake: Fake, closed: int, backlog: int, raw: int
) -> list[tuple[str, str, dict[str, str], bool, str]]:
    """(method, url, headers, idempotent, the reason it must fail with)"""
    bad_header = {"X-Note": f"{H_SECRET}\r\nInjected: yes"}
    return [
        ("POST", f"http://127.0.0.1:{closed}{TAIL}", SECRET_HEADERS, False, "connect_failed"),
        ("POST", f"http://127.0.0.1:{backlog}{TAIL}", SECRET_HEADERS, False, "connect_timeout"),
        ("POST", fake.url(f"/hang{TAIL}"), SECRET_HEADERS, False, "outcome_unknown"),
        ("GET", fake.url(f"/hang{TAIL}"), SECRET_HEADERS, True, "timeout"),
        ("POST", f"http://127.0.0.1:{raw}{TAIL}", SECRET_HEADERS, False, "outcome_unknown"),
        ("POST", f"http://127.0.0.1:{raw}{TAIL}", SECRET_HEADERS, True, "disconnected"),
        ("GET", fake.url(f"/r/5{TAIL}"), SECRET_HEADERS, True, "too_many_redirects"),
        ("GET", fake.url(f"/go?to=ftp://h/{Q_SECRET}&t={Q_SECRET}"), {}, True, "bad_redirect"),
        ("GET", f"http://evil.test{TAIL}", SECRET_HEADERS, True, "guard_refused"),
        ("GET", f"http://nx.test{TAIL}", SECRET_HEADERS, True, "dns_failed"),
        ("GET", f"http://10.0.0.1{TAIL}", SECRET_HEADERS, True, "guard_refused"),
        ("GET", f"http://u:{H_SECRET}@0x7f.1{TAIL}", SECRET_HEADERS, True, "guard_refused"),
        ("GET", f"ftp://127.0.0.1{TAIL}", SECRET_HEADERS, True, "bad_url"),
        ("GET", f"http://127.0.0.1:99999{TAIL}", SECRET_HEADERS, True, "bad_url"),
        ("GET", fake.url(f"/ok{TAIL}"), bad_header, True, "bad_request"),
    ]


async def test_no_error_carries_the_query_path_or_a_header_value(
    resolver: StubResolver, fake: Fake, closed_port: int, full_backlog: int
) -> None:
    async with (
        RawServer() as raw,
        OutboundHttp(
            guard=Guard(LOOPBACK), resolver=resolver, timeout=0.6, connect_timeout=0.3
        ) as client,
    ):
        for method, url, headers, idempotent, reason in _failure_cases(
            fake, closed_port, full_backlog, raw.port
        ):
            with pytest.raises(DeliveryError) as info:
                await client.request(method, url, headers=headers, idempotent=idempotent)
            assert info.value.reason == reason, url
            err = info.value
            text = "".join(traceback.format_exception(err)) + repr(err) + str(err)
            for secret in (Q_SECRET, H_SECRET, P_SECRET):
                assert secret not in text, (reason, text)


# --- the status classifier ------------------------------------------------------------------


def _response(status: int, retry_after: str | None = None) -> HttpResponse:
    headers = CIMultiDict({"Retry-After": retry_after} if retry_after is not None else {})
    return HttpResponse(status, headers, b"", "http://x/")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, None),
        (201, None),
        (204, None),
        (301, PermanentError),
        (304, PermanentError),
        (400, PermanentError),
        (401, PermanentError),
        (403, PermanentError),
        (404, PermanentError),
        (408, RetryableError),
        (409, PermanentError),
        (422, PermanentError),
        (425, RetryableError),
        (429, RetryableError),
        (500, RetryableError),
        (502, RetryableError),
        (503, RetryableError),
        (504, RetryableError),
        (599, RetryableError),
        (600, PermanentError),
        (101, PermanentError),
    ],
)
def test_classify_status(status: int, outcome: type[DeliveryError] | None) -> None:
    if outcome is None:
        classify_status(_response(status), NOW)
        return
    with pytest.raises(DeliveryError) as info:
        classify_status(_response(status), NOW)
    assert type(info.value) is outcome
    assert info.value.reason == f"http_{status}"


def test_classify_status_reads_retry_after() -> None:
    with pytest.raises(RetryableError) as info:
        classify_status(_response(429, "120"), NOW)
    assert info.value.retry_after == 120.0
    date = email.utils.formatdate(NOW + 90, usegmt=True)
    with pytest.raises(RetryableError) as info:
        classify_status(_response(503, date), NOW)
    assert info.value.retry_after == 90.0
    with pytest.raises(RetryableError) as info:
        classify_status(_response(500), NOW)
    assert info.value.retry_after is None


def test_classify_status_overrides() -> None:
    with pytest.raises(RetryableError, match="http_409"):
        classify_status(_response(409), NOW, retryable={409})
    with pytest.raises(PermanentError, match="http_503"):
        classify_status(_response(503, "5"), NOW, permanent={503})
    with pytest.raises(PermanentError, match="http_429"):
        classify_status(_response(429), NOW, retryable={429}, permanent={429})
    classify_status(_response(200), NOW, permanent={200})  # success stays success


async def test_classify_a_real_answer(http: OutboundHttp, fake: Fake) -> None:
    response = await http.request("GET", fake.url("/status/503"))
    with pytest.raises(RetryableError) as info:
        classify_status(response, NOW)
    assert (info.value.reason, info.value.retry_after) == ("http_503", 120.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("3600", 3600.0),
        ("3601", 3600.0),
        ("99999999999999999999", 3600.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits are not delay-seconds
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW + 86400, usegmt=True), 3600.0),
        (email.utils.formatdate(NOW - 60, usegmt=True), None),
        ("Sun Nov  6 08:49:37 1994", None),
        ("Tue, 14 Nov 2023 22:15:00 GMT", 100.0),  # NOW is 22:13:20 that day
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        ("text/plain; charset=iso-8859-1", "café".encode("latin-1"), "café"),
        ('text/plain; charset="utf-8"', "café".encode(), "café"),
        ("text/plain; charset=no-such-codec", "café".encode(), "café"),
        ("application/json", b"\xff{}", "\ufffd{}"),
    ],
)
def test_response_text_uses_the_charset(content_type: str, body: bytes, text: str) -> None:
    response = HttpResponse(200, CIMultiDict({"Content-Type": content_type}), body, "http://x/")
    assert response.text() == text


async def test_no_pool_wide_cap_holds_sends_back(http: OutboundHttp, fake: Fake) -> None:
    """More requests at once than aiohttp's default pool limit (100) all reach the destination
    together: the dispatcher's per-host lanes and attempts in flight are the only bounds, so no
    send waits for a connection inside its attempt as if the destination were slow."""
    count = 120
    sends = [
        asyncio.create_task(http.request("GET", fake.url(f"/hang/{i}"), timeout=30))
        for i in range(count)
    ]
    try:
        await wait_for(lambda: len(fake.requests) >= count, deadline=20.0, interval=0.02)
    finally:
        fake.release.set()
        await asyncio.gather(*sends, return_exceptions=True)
    assert len(fake.requests) == count
