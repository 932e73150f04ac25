"""The fault suite's kit: a sink whose destinations can hang, reset or answer 503 on command,
trackers that post conversions until one is acknowledged (as a real tracker retries), a
/readyz watcher, real `postbackd run` processes, and the checks every fault ends with.

The checks (issue 12, "Must show"): every acknowledged conversion's delivery reached the sink;
deliveries resumed within 15 s of the fault's end; /readyz reported the fault within 5 s; no
unhandled exception in the daemon's log; nothing sent twice except resends carrying the same
idempotency key.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from tests.harness import wait_for
from tests.process_support import free_port, log_events

RESUME_WITHIN = 15.0  # seconds after a fault's end (issue 12)
REPORT_WITHIN = 5.0  # seconds after a fault's start
OUTBOUND_TIMEOUT = 2.0
# Lines that must never appear in a daemon's log: an exception nobody handled.
UNHANDLED = (
    "Traceback",
    "Task exception was never retrieved",
    "Exception in callback",
    "task_failed",
    "Unhandled exception",
)


class Endpoint(Protocol):
    """A daemon to post to and ask: a process (Node) or one in-process (see test_dns)."""

    @property
    def url(self) -> str: ...


@dataclass
class Hit:
    t: float
    route: str
    key: str  # from the URL: the idempotency_key macro
    header_key: str | None  # the Idempotency-Key header
    sender: str


# Each route listens on a port of its own: the daemon's breaker is per destination (scheme,
# host and port), so one route's outage must not pause the others.
ROUTES = ("a", "hang", "reset", "flaky", "fine", "dns")

# Every node started by the running test: the fault suite's conftest stops those still running
# once the test ends, so a test that fails before its own node.stop() leaves no daemon behind.
STARTED: list[Node] = []


class FaultSink:
    """A receiver on 127.0.0.1: `/pb/{route}?k=KEY`, one port per route. Each route answers 200
    unless its mode says otherwise: ``hang`` (accepts, never answers), ``reset`` (a few bytes of
    the status line, then a TCP reset), ``503``. Requests of a held sender wait until it is
    released."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.modes: dict[str, str] = {}
        self.delay = 0.0  # every 200 waits this long first (attempts in flight)
        self.answering: set[str] = set()  # keys of requests waiting out the delay now
        self._held: dict[str, asyncio.Event] = {}
        self._hanging = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.ports: dict[str, int] = {}

    async def start(self) -> FaultSink:
        app = web.Application()
        app.router.add_get("/pb/{route}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        for route in ROUTES:
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
            self.ports[route] = self._runner.addresses[-1][1]
        return self

    async def close(self) -> None:
        self._hanging.set()
        for event in self._held.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, route: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.ports[route]}/pb/{route}?k={{idempotency_key}}"

    def hold(self, sender: str) -> None:
        self._held[sender] = asyncio.Event()

    def release(self, sender: str) -> None:
        self._held.pop(sender).set()

    def delivered(self, route: str | None = None, since: float = 0.0) -> set[str]:
        """The keys answered 200 (or sent at all, for a held sender) on `route`."""
        return {h.key for h in self.hits if (route is None or h.route == route) and h.t >= since}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        mode = self.modes.get(route, "ok")
        hit = Hit(
            time.monotonic(),
            route,
            request.query["k"],
            request.headers.get("Idempotency-Key"),
            request.headers.get("X-Sender", "?"),
        )
        if mode == "hang":
            await self._hanging.wait()
            return web.Response(status=503)
        if mode == "reset":
            _reset(request, b"HTTP/1.1 20")
            return web.Response(status=503)
        if mode == "503":
            return web.Response(status=503, text="busy")
        gate = self._held.get(hit.sender)
        if gate is not None:
            self.hits.append(hit)  # sent: its answer may go nowhere
            await gate.wait()
            return web.Response(text="OK")
        if self.delay:
            self.answering.add(hit.key)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.answering.discard(hit.key)
        self.hits.append(hit)  # counted once answered: "reached the sink"
        return web.Response(text="OK")


def _reset(request: web.Request, partial: bytes) -> None:
    """Write `partial` bytes of an answer, then reset the connection (SO_LINGER 0)."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    transport.write(partial)
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()


def rules_yaml(
    sink: FaultSink, routes: Iterable[str], sender: str = "n0", host: str = "127.0.0.1"
) -> str:
    """offer 1: one postback per route (ids 1, 2, ...), each to its sink route."""
    postbacks = [
        {
            "id": i + 1,
            "trigger": "conversion_done",
            "affiliate": "*",
            "action": {
                "type": "ping_url",
                "url": sink.url(route, host),
                "headers": {"X-Sender": sender},
            },
        }
        for i, route in enumerate(routes)
    ]
    return json.dumps({"offer": 1, "postbacks": postbacks})  # JSON is YAML


class Node:
    """One `postbackd run` process with its own config folder and log."""

    def __init__(
        self,
        root: Path,
        store: str,
        sink: FaultSink,
        routes: Iterable[str] = ("a",),
        *,
        sender: str = "n0",
        lease: float = 30.0,
        **extra: Any,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.sender = sender
        root.mkdir(parents=True, exist_ok=True)
        (root / "rules.d").mkdir(exist_ok=True)
        (root / "webhooks").mkdir(exist_ok=True)
        (root / "rules.d" / "offer-1.yaml").write_text(rules_yaml(sink, routes, sender))
        settings: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "store": store,
            "rules_dir": "rules.d",
            "webhooks_dir": "webhooks",
            "outbound": {
                "allow_cidrs": ["127.0.0.1/32"],
                "timeout": OUTBOUND_TIMEOUT,
                "breaker": {"first_pause": 1.0, "max_pause": 4.0},
            },
            "delivery": {"lease": lease},
            "log": {"format": "json", "level": "info"},
            **extra,
        }
        self.config = root / "postbackd.yaml"
        self.config.write_text(json.dumps(settings))
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        STARTED.append(self)  # stopped after its test whatever the test did (conftest)
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACKD_")}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    async def ready(self, session: aiohttp.ClientSession, deadline: float = 30.0) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()[-3000:]}")
            try:
                async with session.get(f"{self.url}/readyz") as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_for(up, deadline=deadline, interval=0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def assert_clean_log(self) -> None:
        """No exception nobody handled, and every line is one JSON object: what libraries
        log through the standard logging module (asyncpg's pool retrying its connection floor
        while the server is down) comes out as a masked `library_log` line, not a traceback."""
        text = self.log.read_text("utf-8", "replace")
        for marker in UNHANDLED:
            assert marker not in text, f"{marker!r} in {self.log}:\n{_around(text, marker)}"
        for line in text.splitlines():
            if line.strip():
                assert line.startswith("{"), f"a line that is not JSON in {self.log}: {line[:300]}"


def _around(text: str, marker: str) -> str:
    at = text.index(marker)
    return text[max(0, at - 1500) : at + 1500]


@dataclass
class Traffic:
    """Trackers posting conversions round-robin to `nodes` until each is acknowledged."""

    session: aiohttp.ClientSession
    nodes: list[Endpoint]
    acked: dict[str, float] = field(default_factory=dict)  # conversion id -> when acked
    refused: int = 0  # answers that were not 200 (503 while the store is down...)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, workers: int = 3, pace: float = 0.02) -> None:
        self._tasks = [asyncio.create_task(self._worker(w, pace)) for w in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def post(self, node: Endpoint, cid: str) -> bool:
        params = {"conversion_id": cid, "offer": "1", "affiliate": "7", "status": "approved"}
        try:
            async with self.session.get(f"{node.url}/webhooks/generic", params=params) as resp:
                if resp.status == 200:
                    return True
        except (aiohttp.ClientError, TimeoutError):
            pass
        self.refused += 1
        return False

    async def _worker(self, worker: int, pace: float) -> None:
        n = 0
        while not self._stop.is_set():
            cid = f"w{worker}-{n}"
            for attempt in range(100_000):
                if self._stop.is_set() and attempt:
                    break  # never acknowledged: nothing was promised
                if await self.post(self.nodes[(worker + n + attempt) % len(self.nodes)], cid):
                    self.acked[cid] = time.monotonic()
                    break
                await asyncio.sleep(0.05)
            n += 1
            await asyncio.sleep(pace)

    def count(self) -> int:
        return len(self.acked)


@dataclass
class ReadyWatch:
    """Polls /readyz of a node every 0.1 s and keeps (when, status, failing parts)."""

    session: aiohttp.ClientSession
    node: Endpoint
    seen: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> ReadyWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=3)
        while True:
            try:
                async with self.session.get(f"{self.node.url}/readyz", timeout=timeout) as resp:
                    body = await resp.json()
                    self.seen.append((time.monotonic(), resp.status, body))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.1)

    def first_not_ready(self, since: float) -> tuple[float, list[str]] | None:
        """Seconds from `since` to the first 503, and the parts it named."""
        for t, status, body in self.seen:
            if t >= since and status == 503:
                return t - since, body.get("failing", [])
        return None

    def first_with(self, since: float, key: str) -> float | None:
        """Seconds from `since` to the first answer whose `key` is truthy."""
        for t, _, body in self.seen:
            if t >= since and body.get(key):
                return t - since
        return None

    def statuses(self, since: float, until: float) -> set[int]:
        return {status for t, status, _ in self.seen if since <= t <= until}

    async def reported_not_ready(self, since: float, what: str) -> list[str]:
        """Wait for the first 503 after `since` and assert it came within REPORT_WITHIN (its
        time noted as `what`); returns the parts it named."""
        await wait_for(lambda: self.first_not_ready(since), deadline=REPORT_WITHIN + 2)
        reported = self.first_not_ready(since)
        assert reported is not None
        assert note(what, reported[0]) <= REPORT_WITHIN, reported
        return reported[1]

    async def stop_once_ready(self) -> None:
        """Wait (10 s at most) until the last answer seen is 200, then stop polling."""
        await wait_for(lambda: self.seen and self.seen[-1][1] == 200, deadline=10)
        await self.stop()


async def flowing(
    session: aiohttp.ClientSession,
    node: Node,
    watch: ReadyWatch,
    traffic: Traffic,
    sink: FaultSink,
    hits: int = 20,
    workers: int = 3,
) -> None:
    """The node ready, its /readyz watched, and conversions flowing until the sink has had
    `hits` requests: where every fault test starts."""
    await node.ready(session)
    watch.start()
    traffic.start(workers=workers)
    await wait_for(lambda: len(sink.hits) >= hits, deadline=20)


def note(what: str, seconds: float) -> float:
    """Print a measured time (seen with `pytest -s`: the figures behind docs/operations.md)."""
    print(f"fault-measure {what}: {seconds:.2f} s")
    return seconds


def key_of(cid: str, postback: int = 1) -> str:
    return f"generic:{cid}:1:{postback}"  # {source}:{conversion_id}:{arrival_seq}:{postback_id}


async def all_delivered(
    sink: FaultSink, traffic: Traffic, postbacks: Iterable[int] = (1,), deadline: float = 30.0
) -> None:
    expected = {key_of(cid, pid) for cid in traffic.acked for pid in postbacks}
    try:
        await wait_for(lambda: expected <= sink.delivered(), deadline=deadline, interval=0.1)
    except AssertionError as err:
        missing = sorted(expected - sink.delivered())
        raise AssertionError(
            f"{len(missing)} of {len(expected)} not delivered: {missing[:5]}"
        ) from err


def assert_no_unexplained_duplicates(sink: FaultSink) -> None:
    """Every request carries its delivery's key; a key seen twice is a resend of it."""
    for hit in sink.hits:
        assert hit.header_key == hit.key, hit
    counts = Counter(h.key for h in sink.hits)
    assert all(n <= 3 for n in counts.values()), counts.most_common(3)


async def resumed_after(sink: FaultSink, route: str | None, since: float) -> float:
    """Seconds from `since` to the first delivery that reached the sink after it."""

    def first() -> float | None:
        times = [h.t for h in sink.hits if h.t >= since and (route is None or h.route == route)]
        return min(times) - since if times else None

    await wait_for(lambda: first() is not None, deadline=RESUME_WITHIN + 5, interval=0.05)
    found = first()
    assert found is not None
    return found


async def assert_resumed(
    sink: FaultSink, what: str, since: float, route: str | None = None
) -> None:
    """Assert that deliveries (to `route`, or any) resumed within RESUME_WITHIN of `since` (the
    fault's end), the time noted as `what`."""
    assert note(what, await resumed_after(sink, route, since)) <= RESUME_WITHIN, route


@asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield session
