"""The guarded HTTP client every action shares (statuses are classified in daemon/httpstatus.py).

Every request goes through one aiohttp session whose connector resolves names with a
`Resolver` and keeps only the addresses the `Guard` allows; IP-literal hosts (which aiohttp
connects to without resolving) are checked before each hop. Failures become the delivery errors
of :mod:`daemon.errors`, and their messages name at most ``scheme://host:port``: paths, query
strings and header values may carry secrets.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import aiohttp
import aiohttp.tracing
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from yarl import URL

from daemon.errors import (
    GuardRefusedError,
    PermanentError,
    RetryableError,
)
from daemon.guard import Guard as Guard  # re-exported: callers build both from here
from daemon.httpstatus import HttpResponse, classify_failure

BODY_CAP = 64 * 1024
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Kept when a redirect leaves the origin; any other header may carry a credential, whatever
# its name (X-Api-Key, Api-Token, X-Auth...).
_CROSS_ORIGIN_HEADERS = frozenset({"accept", "accept-language", "user-agent", "idempotency-key"})
# Shorter values would match innocent text and protect nothing.
_MIN_SECRET_LEN = 4
# Below the idle timeout of common servers (Node and Apache close at 5 s), so a pooled
# connection is rarely closed under us: for a non-idempotent request that would end as
# outcome_unknown.
_KEEPALIVE_SECONDS = 4.0


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """The IP addresses of `host`; raises OSError (socket.gaierror) when it cannot."""
        ...


class SystemResolver:
    """Resolves with the system's getaddrinfo, off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Progress:
    """How far one request got: a deadline that expires before a connection exists means the
    request was never sent, whatever aiohttp raises."""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


# The progress of the request the current task is making (set around each hop by
# OutboundHttp._send; every attempt is a task of its own, so requests do not share it).
_PROGRESS: contextvars.ContextVar[_Progress | None] = contextvars.ContextVar(
    "outbound_progress", default=None
)


class _Connector(aiohttp.TCPConnector):
    """The connector, telling the current request's progress once it holds a connection (a new
    one or one from the pool). This replaces aiohttp tracing (TraceConfig), which for the same
    two facts builds trace objects and awaits a dozen signals on every request."""

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 -- aiohttp's signature
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        progress = _PROGRESS.get()
        if progress is not None:
            progress.connected = True
        return conn


class _DnsFailed(Exception):
    """Raised inside the connector (not an OSError, so aiohttp passes it through unwrapped)."""


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver hook: resolve with `resolver`, keep what the guard allows."""

    def __init__(self, resolver: Resolver, guard: Guard) -> None:
        self._resolver = resolver
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            ips = await self._resolver.resolve(host, port)
        except OSError as err:
            raise _DnsFailed(type(err).__name__) from err
        wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
        ips = [ip for ip in ips if wanted is None or (6 if ":" in ip else 4) == wanted]
        if not ips:
            raise _DnsFailed("no address")
        refusals = [self._guard.refusal(ip) for ip in ips]
        allowed = [ip for ip, reason in zip(ips, refusals, strict=True) if reason is None]
        if not allowed:
            raise GuardRefusedError(next(r for r in refusals if r is not None))
        return [_result(host, ip, port) for ip in allowed]

    async def close(self) -> None:
        return None


def _result(host: str, ip: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return ResolveResult(hostname=host, host=ip, port=port, family=family, proto=0, flags=0)


class OutboundHttp:
    """The one shared HTTP client of every action: guarded, proxy-free, cookie-free."""

    def __init__(
        self,
        *,
        guard: Guard,
        resolver: Resolver | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        user_agent: str = "postbackd/0.1",
    ) -> None:
        self._guard = guard
        self._resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        # The session's event loop, kept by start(): asyncio.get_running_loop() costs a getpid()
        # system call on CPython 3.11, twice a request.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def guard(self) -> Guard:
        """The guard, for actions that open their own connections (SMTP) under the same rule."""
        return self._guard

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = _Connector(
            resolver=_GuardedResolver(self._resolver, self._guard),
            keepalive_timeout=_KEEPALIVE_SECONDS,
            # No pool-wide cap: aiohttp's default (100 connections in use) would hold sends
            # past the 100th in line inside the attempt, with their slot held and their time
            # running, as if their destination were slow. The dispatcher's own bounds
            # (per-host lanes, attempts in flight) are the limits.
            limit=0,
        )
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # proxy variables and .netrc are ignored (SPEC 10)
            cookie_jar=aiohttp.DummyCookieJar(),  # no cookie travels between destinations
            headers={"User-Agent": self._user_agent},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def connect(self, host: str, port: int, origin: str) -> socket.socket:
        """A TCP connection under the same guard and resolver, for a protocol that is not HTTP
        (SMTP): to the first address of `host` the guard allows that answers. Errors name
        `origin` only: GuardRefusedError, or RetryableError dns_failed, connect_failed or
        connect_timeout."""
        try:
            literal = self._guard.check_host(host)
        except GuardRefusedError as err:
            raise GuardRefusedError(f"{err.detail}: {origin}") from err
        try:
            ips = [host] if literal else await self._resolver.resolve(host, port)
        except OSError as err:
            raise RetryableError("dns_failed", origin, unwell=True) from err
        if not ips:
            raise RetryableError("dns_failed", origin, unwell=True)
        allowed = [ip for ip in ips if self._guard.allowed(ip)]
        if not allowed:
            raise GuardRefusedError(f"{self._guard.refusal(ips[0])}: {origin}")
        error: BaseException | None = None
        for ip in allowed:
            try:
                return await _open_socket(ip, port, self._connect_timeout)
            except (OSError, TimeoutError) as err:
                error = err
        reason = "connect_timeout" if isinstance(error, TimeoutError) else "connect_failed"
        raise RetryableError(reason, origin) from error

    async def __aenter__(self) -> OutboundHttp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- a per-request deadline, not a wait
        idempotent: bool = True,
        follow_redirects: bool | None = None,
        check: Callable[[URL], Awaitable[None]] | None = None,
        deadline: float | None = None,
    ) -> HttpResponse:
        """Send one request (following redirects for GET unless told otherwise). `check`, when
        given, is awaited before every hop (the first and each redirect) and may refuse it by
        raising (affiliate postbacks: the policy's deny_destinations, issue 15). Every hop ends
        within `timeout` of the call, and by `deadline` (event loop time) when that comes
        first (the attempt's bound, daemon.dispatcher); `check` is not bounded here."""
        loop = self._loop
        if self._session is None or loop is None:
            raise RuntimeError("OutboundHttp.start() was not called")
        method = method.upper()
        follow = method == "GET" if follow_redirects is None else follow_redirects
        until = loop.time() + (self._timeout if timeout is None else timeout)
        if deadline is not None and deadline < until:
            until = deadline
        target = _parse_url(url, "bad_url")
        sent = dict(headers or {})
        for hop in range(MAX_REDIRECTS + 1):
            if check is not None:
                await check(target)
            response = await self._send(method, target, sent, data, until, idempotent)
            if not follow or response.status not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            if not location:
                return response
            if hop == MAX_REDIRECTS:
                raise PermanentError("too_many_redirects", _origin(target))
            following = _parse_url(location, "bad_redirect", base=target)
            if _origin(following) != _origin(target):
                sent = {k: v for k, v in sent.items() if k.lower() in _CROSS_ORIGIN_HEADERS}
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                # As browsers do: the redirected request is a GET without the body.
                method, data = "GET", None
                sent = {k: v for k, v in sent.items() if not k.lower().startswith("content-")}
            target = following
        raise AssertionError("unreachable: the loop returns or raises")

    async def _send(
        self,
        method: str,
        target: URL,
        headers: Mapping[str, str],
        data: bytes | None,
        deadline: float,
        idempotent: bool,
    ) -> HttpResponse:
        assert self._session is not None
        assert self._loop is not None
        remaining = deadline - self._loop.time()
        if remaining <= 0:  # spent on earlier hops; this one was never sent
            raise RetryableError("timeout", _origin(target))
        # Exact: by default aiohttp rounds a deadline of 5 s or more up to the next whole
        # second, past the attempt's bound.
        timeout = aiohttp.ClientTimeout(
            total=remaining,
            sock_connect=min(self._connect_timeout, remaining),
            ceil_threshold=math.inf,
        )
        progress = _Progress()
        token = _PROGRESS.set(progress)
        try:
            self._guard.check_host(target.raw_host or "")
            # Awaited, not entered: aiohttp's context manager takes four coroutines (two to
            # enter, two to leave) for what the finally below does, release and wait for close.
            resp = await self._session.request(
                method,
                target,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
            )
            try:
                body = await _read_capped(resp)
                return HttpResponse(resp.status, resp.headers, body, str(resp.url))
            finally:
                resp.release()
                await resp.wait_for_close()
        # The errors name the origin only (made here: a request that works never needs it).
        except GuardRefusedError as err:
            raise GuardRefusedError(f"{err.detail}: {_origin(target)}") from err
        except _DnsFailed as err:
            raise RetryableError("dns_failed", _origin(target), unwell=True) from err
        except (aiohttp.ClientError, OSError) as err:
            origin = _origin(target)
            failure = classify_failure(err, origin, idempotent, sent=progress.connected)
            raise failure from _safe_cause(err, _secret_parts(target, headers))
        except ValueError as err:
            # aiohttp refuses e.g. a header value with CR/LF; its message may quote the value.
            raise PermanentError("bad_request", f"{type(err).__name__}: {_origin(target)}") from (
                _safe_cause(err, _secret_parts(target, headers))
            )
        finally:
            _PROGRESS.reset(token)


async def _open_socket(ip: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    # What is left unread is dropped with the connection when the response is released.
    content = resp.content
    first = await content.read(BODY_CAP)
    if not first or (content.at_eof() and content.exception() is None):
        return first  # the usual small body, all in one read (the loop below would say so)
    chunks = [first]
    size = len(first)
    while size < BODY_CAP:
        chunk = await content.read(BODY_CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if content.at_eof() and content.exception() is None:
            break  # all of it: the next read would only say so (b"")
    return b"".join(chunks)


def _parse_url(text: str, reason: str, *, base: URL | None = None) -> URL:
    if base is None and not text.endswith(("?", "#")) and "?#" not in text:
        # The usual case, a rendered URL: a valid URI (_RENDERED) without a query or fragment
        # marker that has nothing after it. Its authority is checked and normalised once per
        # distinct `scheme://authority` (_checked_origin), and the rest is sent byte for byte,
        # as _as_sent makes it.
        found = _RENDERED.fullmatch(text)
        if found is not None:
            head, path, query, fragment = found.groups()
            checked = _checked_origin(head)
            if checked is None:
                return _parse_url_in_full(text, reason)  # raises: the full parse says why
            scheme, authority = checked
            return URL.build(
                scheme=scheme,
                authority=authority,
                path=path,
                query_string=query or "",
                fragment=fragment or "",
                encoded=True,
            )
    return _parse_url_in_full(text, reason, base=base)


# The characters of a valid URI (RFC 3986: unreserved, reserved and %), and those of its
# parts: the authority ends at the first / ? or #, the path at the first ? or #, the query at
# the first #.
_URI_CHARS = r"A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%"
_AUTHORITY_CHARS = _URI_CHARS.replace("/?#", "")
_PATH_CHARS = _URI_CHARS.replace("?#", "")
_QUERY_CHARS = _URI_CHARS.replace("#", "")
# A valid URI whose authority is followed by a path (`scheme://authority/path?query#fragment`),
# its parts in groups: what _parse_url takes without a full parse. Any other text takes the
# full parse, which gives the same URL or error (a scheme that is not letters, digits, + . -
# is not http or https; nor is one whose `://` is not the first).
_RENDERED = re.compile(
    rf"([A-Za-z][A-Za-z0-9+.\-]*://[{_AUTHORITY_CHARS}]*)(/[{_PATH_CHARS}]*)"
    rf"(?:\?([{_QUERY_CHARS}]*))?(?:#([{_URI_CHARS}]*))?"
)


@functools.lru_cache(maxsize=1024)
def _checked_origin(head: str) -> tuple[str, str] | None:
    """The scheme and authority as _parse_url sends them (normalised by yarl: lower case,
    IDNA) of the head `scheme://authority` of a URI that passes _parse_url's checks; None when
    it does not."""
    try:
        url = _parse_url_in_full(head + "/", "bad_url")
    except PermanentError:
        return None
    return url.scheme, url.raw_authority


def _parse_url_in_full(text: str, reason: str, *, base: URL | None = None) -> URL:
    try:
        # A URL that is already a valid URI (ours are: macros render percent-encoded) is sent
        # byte for byte; yarl would otherwise decode %2F, %3F and %40 in the query.
        url = URL(text)
        if base is None and _is_uri(text):
            url = _as_sent(url, URL(text, encoded=True))
        if base is not None:
            url = base.join(url)
        port = url.port
    except (ValueError, TypeError, IndexError):
        # IndexError: yarl's own slip on an empty host after user info in brackets
        # (`http://[x]@/`), which a destination's Location can carry.
        raise PermanentError(reason) from None  # the parser's message quotes the whole URL
    if url.scheme not in ("http", "https"):
        raise PermanentError(reason, f"scheme {url.scheme[:16]!r} is not http or https")
    host = url.raw_host or ""
    if not host or port is None or not _plausible_host(host):
        raise PermanentError(reason, "no usable host")
    return url


_URI = re.compile(f"[{_URI_CHARS}]*")


def _as_sent(normal: URL, raw: URL) -> URL:
    """The authority as yarl normalises it (lower case, IDNA: what the guard checks), with the
    path, query and fragment exactly as rendered."""
    text = f"{normal.scheme}://{normal.raw_authority}{raw.raw_path}"
    if raw.raw_query_string:
        text += f"?{raw.raw_query_string}"
    if raw.raw_fragment:
        text += f"#{raw.raw_fragment}"
    return URL(text, encoded=True)


def _is_uri(text: str) -> bool:
    return _URI.fullmatch(text) is not None


def _plausible_host(host: str) -> bool:
    # IPv6 literals keep their colons (and a %25-quoted zone); names are LDH plus underscore
    # after yarl's IDNA encoding. Anything else would only reach DNS as garbage.
    allowed = "0123456789abcdefghijklmnopqrstuvwxyz-._"
    return ":" in host or all(c in allowed for c in host.lower())


def _origin(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{url.port}"


def _secret_parts(url: URL, headers: Mapping[str, str]) -> list[str]:
    """The parts of a request that an exception's text must not carry."""
    parts = [url.raw_query_string, url.query_string, url.fragment, url.raw_fragment]
    parts += [url.user or "", url.password or "", *headers.values()]
    if url.raw_path not in ("", "/"):
        parts += [url.raw_path, url.path]
    return [p for p in parts if len(p) >= _MIN_SECRET_LEN]


def _safe_cause(err: BaseException, secrets: list[str]) -> BaseException | None:
    """`err` if no text in its chain quotes a secret part (a traceback would print it), else
    None: aiohttp quotes the full URL in some messages (connection timeout, bad response)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{current}{current!r}{current.args!r}"
        if any(secret in text for secret in secrets):
            return None
        current = current.__cause__ or current.__context__
    return err
