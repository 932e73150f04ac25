"""The supervision rule (daemon.supervise) in-process: the backoff table, the health of a loop
on an injected clock, and the real dispatcher under a store that fails on command (a real
SQLite store whose operations raise StoreError while told to): logged once when it starts
failing and once when it recovers, /readyz and the metrics say so, nothing is lost."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from daemon.app import SERVICES, Services, create_app
from daemon.errors import StoreError
from daemon.notify import Notifier
from daemon.settings import Settings
from daemon.store.sqlite import SQLiteStore
from daemon.supervise import Backoff, LoopHealth, Supervisor, describe, spawn
from tests.harness import LOOPBACK, FakeClock, Sink, wait_for, write_rules

ADMIN = "admin-token-for-readyz"
TOKENS = [
    {"name": "ops", "token_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "role": "admin"}
]
FAST = Backoff(first=0.02, cap=0.05)
SECRET_ERROR = "postgresql: connection to postgresql://partner:Sup3rPassw0rd@db.internal/x failed"


@pytest.mark.parametrize(
    ("failures", "spread", "delay"),
    [
        (1, 0.0, 0.5),
        (2, 0.0, 1.0),
        (3, 0.0, 2.0),
        (4, 0.0, 4.0),
        (5, 0.0, 5.0),  # capped
        (1000, 0.0, 5.0),  # no overflow however long it fails
        (1, 1.0, 0.6),  # +20 % jitter
        (1, -1.0, 0.4),  # -20 % jitter
        (4, 1.0, 4.8),
        (5, 1.0, 5.0),  # jitter never takes it past the cap
        (5, -1.0, 4.0),
        (0, 0.0, 0.5),  # defensive: the first wait is the least
        (2, 7.0, 1.2),  # a spread out of range is clamped
    ],
)
def test_backoff_is_capped_exponential_with_jitter(
    failures: int, spread: float, delay: float
) -> None:
    assert Backoff().delay(failures, spread) == pytest.approx(delay)


def test_a_loop_is_up_failing_stalled_or_ended_on_its_clock() -> None:
    clock = FakeClock(100.0)
    health = LoopHealth("x", 4.0, clock.now)
    assert health.state == "up"  # 4 s from the start to make progress
    clock.advance(4.1)
    assert health.state == "stalled"
    health.beat(next_in=10.0)  # periodic: next progress due in 10 + 4 s
    clock.advance(13.9)
    assert health.state == "up"
    with capture_logs() as logs:
        health.failed(StoreError(SECRET_ERROR), retry_in=2.0)
        health.failed(StoreError("again"), retry_in=4.0)
    assert health.state == "failing"
    assert health.failures == 2
    assert [e["event"] for e in logs] == ["loop_failing"]  # once
    assert "Sup3rPassw0rd" not in str(logs)
    assert "partner" not in str(logs)
    clock.advance(7.9)  # a failing loop that retries on time is not stalled
    assert not health.stalled
    with capture_logs() as logs:
        health.beat()
    assert [(e["event"], e["failures"]) for e in logs] == [("loop_recovered", 2)]
    assert health.state == "up"
    assert health.failures == 0
    clock.advance(4.1)
    with capture_logs() as logs:
        health.check()
        health.check()
        assert health.state == "stalled"
        clock.advance(3.0)
        health.beat()
    assert [(e["event"], e.get("since_s")) for e in logs] == [
        ("loop_stalled", 4.1),
        ("loop_recovered", None),
    ]
    assert logs[1]["down_s"] == 3.0
    watcher = LoopHealth("watcher", None, clock.now)
    clock.advance(1e6)
    assert watcher.state == "up"  # no duty of progress


def test_errors_are_masked_and_bounded() -> None:
    text = describe(StoreError(SECRET_ERROR + "\nsecond line"))
    assert text == (
        "StoreError: postgresql: connection to postgresql://***@db.internal/x failed second line"
    )
    assert len(describe(RuntimeError("x" * 5000))) == 300
    assert describe(TimeoutError()) == "TimeoutError"


async def test_a_body_that_raises_is_restarted_until_cancelled() -> None:
    runs: list[int] = []

    async def body(health: LoopHealth) -> None:
        runs.append(len(runs))
        if len(runs) < 4:
            raise RuntimeError(f"bug {len(runs)}")
        health.beat()
        await asyncio.Event().wait()  # runs "forever"

    supervisor = Supervisor(rng=random.Random(0))
    with capture_logs() as logs:
        health = supervisor.start("x", body, interval=10.0, backoff=FAST)
        await wait_for(lambda: health.last_progress is not None)
        assert supervisor.problems() == {}
        await supervisor.stop()  # CancelledError ends it
    assert runs == [0, 1, 2, 3]
    assert [(e["event"], e.get("error")) for e in logs] == [
        ("loop_failing", "RuntimeError: bug 1"),
        ("loop_recovered", None),
    ]


async def test_a_one_shot_task_that_fails_is_collected_and_logged() -> None:
    tasks: set[asyncio.Task[Any]] = set()

    async def fails() -> None:
        raise StoreError("sqlite: disk I/O error")

    with capture_logs() as logs:
        spawn(fails(), "reload", tasks)
        await wait_for(lambda: not tasks)
    assert logs == [
        {
            "event": "task_failed",
            "log_level": "error",
            "task": "reload",
            "error": "StoreError: sqlite: disk I/O error",
        }
    ]


# --- the real dispatcher on a store that fails on command -------------------------------------


class BreakableStore(SQLiteStore):
    """A real SQLite store; the operations named in `broken` raise StoreError instead."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.broken: set[str] = set()
        self.message = "sqlite: database is locked"

    def _check(self, operation: str) -> None:
        if operation in self.broken:
            raise StoreError(self.message)

    async def ping(self) -> None:
        self._check("ping")
        await super().ping()

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        self._check("claim_due")
        return await super().claim_due(*args, **kwargs)

    async def record_arrival(self, *args: Any, **kwargs: Any) -> Any:
        self._check("record_arrival")
        return await super().record_arrival(*args, **kwargs)


@dataclass
class Running:
    client: TestClient
    store: BreakableStore

    @property
    def services(self) -> Services:
        return self.client.app[SERVICES]  # type: ignore[index]

    async def readyz(self, token: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = await self.client.get("/readyz", headers=headers)
        return resp.status, await resp.json()

    async def metric(self, name: str) -> float | None:
        text = await (await self.client.get("/metrics")).text()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture
async def running(tmp_path: Path, sink: Sink) -> AsyncIterator[Running]:
    rules = tmp_path / "rules.d"
    url = f"{sink.url}/pb?tx={{conversion_id}}"
    write_rules(
        rules,
        {
            "o.yaml": f"""
                offer: 1
                postbacks:
                  - id: 1
                    trigger: conversion_done
                    affiliate: "*"
                    action: {{type: ping_url, url: "{url}"}}
            """
        },
    )
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "rules_dir": str(rules),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5},
            "api": {"tokens": TOKENS},
            "config_dir": tmp_path,
        }
    )
    store = BreakableStore(tmp_path / "s.db")
    app = create_app(settings, environ={}, store=store, watch=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Running(client, store)
    finally:
        await client.close()


async def post(running: Running, cid: str) -> int:
    params = {"conversion_id": cid, "offer": "1", "affiliate": "1", "status": "approved"}
    return (await running.client.get("/webhooks/generic", params=params)).status


async def test_the_dispatcher_outlives_a_failing_store_and_says_so_once(
    running: Running, sink: Sink
) -> None:
    health = running.services.supervisor.loops["dispatcher"]
    assert await post(running, "before") == 200
    await wait_for(lambda: len(sink.received) == 1)

    with capture_logs() as logs:
        running.store.broken.add("claim_due")
        await wait_for(lambda: health.failures >= 3)  # tried again and again, on the backoff
        status, body = await running.readyz()
        # Claiming is a write: the store is named too (it answers pings, but does not commit).
        assert (status, body["failing"], body["loops"]["dispatcher"]) == (
            503,
            ["store", "dispatcher"],
            "failing",
        )
        assert await running.metric('postbackd_loop_up{loop="dispatcher"}') == 0
        assert (
            await running.metric('postbackd_store_errors_total{operation="claim_due"}') or 0
        ) >= 3
        assert await post(running, "during") == 200  # ingest is not the part that fails
        running.store.broken.clear()
        await wait_for(lambda: len(sink.received) == 2, deadline=15)

    events = [e["event"] for e in logs if e["event"].startswith("loop_")]
    assert events == ["loop_failing", "loop_recovered"]
    failing = next(e for e in logs if e["event"] == "loop_failing")
    assert (failing["loop"], failing["error"]) == (
        "dispatcher",
        "StoreError: sqlite: database is locked",
    )
    assert (await running.readyz())[0] == 200
    assert await running.metric('postbackd_loop_up{loop="dispatcher"}') == 1
    assert [r.path_qs for r in sink.received] == ["/pb?tx=before", "/pb?tx=during"]


async def test_readyz_names_the_store_and_hides_details_without_an_admin_token(
    running: Running,
) -> None:
    status, body = await running.readyz()
    assert (status, body["status"], body["failing"], body["store"]) == (200, "ready", [], "ok")
    running.store.message = SECRET_ERROR + " at /var/lib/postbackd/secret.db"
    running.store.broken.add("ping")

    status, body = await running.readyz()
    assert (status, body["status"], body["failing"], body["store"]) == (
        503,
        "not ready",
        ["store"],
        "unreachable",
    )
    public = str(body)
    for leak in ("Sup3rPassw0rd", "partner", "postgresql://", "secret.db", "StoreError"):
        assert leak not in public
    assert (await running.readyz("wrong-token"))[1] == body  # a bad token is no token

    status, detail = await running.readyz(ADMIN)
    assert status == 503
    assert detail["store_error"] == (
        "StoreError: postgresql: connection to postgresql://***@db.internal/x failed at "
        "/var/lib/postbackd/secret.db"
    )
    assert "Sup3rPassw0rd" not in str(detail)
    assert await running.metric('postbackd_store_errors_total{operation="ping"}') == 3


async def test_a_stalled_loop_withholds_the_watchdog_until_it_progresses(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    clock = FakeClock(0.0)
    supervisor = Supervisor(now=clock.now)
    release = asyncio.Event()

    async def body(health: LoopHealth) -> None:
        health.beat()
        await release.wait()  # wedged: no progress until released
        while True:
            health.beat()
            await asyncio.sleep(0.001)

    notifier = Notifier(path, watchdog_usec=20_000)  # a ping every 10 ms
    notifier.gate = lambda: [n for n, s in supervisor.states().items() if s == "stalled"]
    pinger = asyncio.create_task(notifier.run_watchdog())
    try:
        supervisor.start("dispatcher", body, interval=4.0)
        await wait_for(_pings(receiver, 2))
        with capture_logs() as logs:
            clock.advance(5.0)  # past its interval without progress
            await wait_for(lambda: logs)
            _drain(receiver)
            await asyncio.sleep(0.05)  # proving an absence: five ping periods
            assert _drain(receiver) == 0
            release.set()
            await wait_for(_pings(receiver, 2))
        assert [(e["event"], e.get("loops")) for e in logs] == [
            ("watchdog_withheld", ["dispatcher"]),
            ("watchdog_resumed", None),
        ]
    finally:
        pinger.cancel()
        await supervisor.stop()
        receiver.close()


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return count
        count += 1


def _pings(sock: socket.socket, want: int) -> Callable[[], Awaitable[bool] | bool]:
    seen = [0]

    def check() -> bool:
        seen[0] += _drain(sock)
        return seen[0] >= want

    return check


async def test_a_store_that_answers_but_does_not_commit_is_not_ready(running: Running) -> None:
    """SQLite's disk full: reads (the ping) work, writes fail. Nothing is due, so only ingest
    notices; /readyz says so until a write works again (or the memory of it ends)."""
    running.store.message = "sqlite: OperationalError: database or disk is full"
    running.store.broken.add("record_arrival")
    assert await post(running, "refused") == 503
    status, body = await running.readyz()
    assert (status, body["failing"], body["store"]) == (503, ["store"], "not committing")
    status, detail = await running.readyz(ADMIN)
    assert detail["store_writes_failing"] == {
        "record_arrival": "StoreError: sqlite: OperationalError: database or disk is full"
    }
    running.store.broken.clear()
    assert await post(running, "accepted") == 200
    status, body = await running.readyz()
    assert (status, body["failing"], body["store"]) == (200, [], "ok")


async def test_the_watcher_outlives_its_rules_folder_going_away(tmp_path: Path) -> None:
    from tests.harness import start_daemon

    daemon = await start_daemon(tmp_path, {"o.yaml": "offer: 1\n"}, watch=True, dispatch=False)
    health = daemon.services.supervisor.loops["watcher"]
    moved = tmp_path / "rules.moved"
    try:
        await wait_for(lambda: health.last_progress is not None)
        with capture_logs() as logs:
            daemon.rules_dir.rename(moved)  # a deploy that swaps folders, badly
            await wait_for(lambda: health.failing, deadline=10)
            resp = await daemon.client.get("/readyz")
            assert (resp.status, (await resp.json())["failing"]) == (503, ["watcher"])
            moved.rename(daemon.rules_dir)
            await wait_for(lambda: not health.failing, deadline=10)
        events = [(e["event"], e.get("loop")) for e in logs if e["event"].startswith("loop_")]
        assert events == [("loop_failing", "watcher"), ("loop_recovered", "watcher")]
        assert (await daemon.client.get("/readyz")).status == 200
    finally:
        await daemon.client.close()
