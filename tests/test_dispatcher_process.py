"""`dispatcher_process: true`: the dispatcher runs in a process of its own beside the serving
process(es), woken through a datagram socket, asked for its state and metrics through a Unix
socket, supervised like a worker. Real processes, real stores (an SQLite file; PostgreSQL when
reachable), a real sink on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp import web

from daemon.cli.run import SERVING_NICENESS
from daemon.dispatchproc import WakeReceiver, WakeSender
from tests.harness import Sink, wait_for, write_rules
from tests.process_support import (
    DaemonProcess,
    children,
    free_port,
    ping_rules,
    write_config,
)
from tests.store.conftest import pg_schema
from tests.ui.kit import csrf_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ADMIN = "admin-token-for-the-dispatch-process-tests"


async def _start(
    tmp_path: Path, sink: Sink, *, store: str | None = None, workers: int = 1
) -> DaemonProcess:
    port = free_port()
    tokens = [{"name": "ops", "role": "admin", "token_sha256": _sha(ADMIN)}]
    config = write_config(
        tmp_path,
        port=port,
        store=store,
        workers=workers,
        dispatcher_process=True,
        api={"tokens": tokens},
    )
    write_rules(tmp_path / "rules.d", {"offer-1.yaml": ping_rules(sink.url)})
    daemon = DaemonProcess(config, port)
    daemon.start()
    await daemon.ready(deadline=30)
    await wait_for(lambda: len(daemon.events("daemon_started")) == workers, deadline=20)
    return daemon


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _dispatch_pid(daemon: DaemonProcess) -> int:
    (started,) = daemon.events("dispatcher_process_started")[-1:]
    pid = int(started["pid"])
    assert daemon.proc is not None
    assert pid in children(daemon.proc.pid)
    return pid


async def _post(daemon: DaemonProcess, ids: range | list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        for n in ids:
            params = {"conversion_id": f"c{n}", "offer": "1", "affiliate": "42"}
            url = f"{daemon.url}/webhooks/generic"
            async with session.get(url, params={**params, "status": "approved"}) as resp:
                assert resp.status == 200, await resp.text()


async def _get(daemon: DaemonProcess, path: str, admin: bool = False) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"} if admin else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}{path}", headers=headers) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def _health_page(daemon: DaemonProcess) -> str:
    """The console's health page, signed in with the admin token (a real browser's steps)."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    headers = {"Origin": daemon.url}
    async with aiohttp.ClientSession(cookie_jar=jar, headers=headers) as session:
        async with session.get(f"{daemon.url}/ui/sign-in") as resp:
            check = csrf_of(await resp.text())
        form = {"csrf": check, "token": ADMIN, "next": "/ui/health"}
        async with session.post(f"{daemon.url}/ui/sign-in", data=form) as resp:
            assert resp.status == 200, await resp.text()
        async with session.get(f"{daemon.url}/ui/health") as resp:
            assert resp.status == 200
            return await resp.text()


def _keys(sink: Sink) -> set[str]:
    queries = [parse_qs(urlsplit(r.path_qs).query) for r in sink.received]
    return {q["k"][0] for q in queries if "k" in q}


def _sqlite(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def _delivers_with_a_dispatch_process(
    daemon: DaemonProcess, sink: Sink, nodes: Callable[[], Awaitable[set[str]]]
) -> None:
    await _post(daemon, range(30))
    await wait_for(lambda: len(_keys(sink)) == 30, deadline=30)
    started = {e["node"] for e in daemon.events("dispatcher_started")}
    (node,) = started
    # Every attempt was made by the dispatch process (the serving process dispatches nothing).
    await wait_for(lambda: _has_nodes(nodes, {node}), deadline=20)
    assert all(e["node"].endswith("/w0") for e in daemon.events("daemon_started"))


async def _has_nodes(nodes: Callable[[], Awaitable[set[str]]], want: set[str]) -> bool:
    return await nodes() == want


async def test_deliveries_state_metrics_and_reload_on_sqlite(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon = await _start(tmp_path, sink)
    db = tmp_path / "var" / "postbackd.db"

    async def nodes() -> set[str]:
        return {row[0] for row in _sqlite(db, "SELECT DISTINCT node FROM attempt")}

    try:
        await _delivers_with_a_dispatch_process(daemon, sink, nodes)
        # /readyz includes the dispatch process's loops and store.
        status, body = await _get(daemon, "/readyz")
        assert status == 200, body
        remote = body["dispatcher_process"]
        assert remote["status"] == "ready"
        assert remote["store"] == "ok"
        assert remote["loops"]["dispatcher"] == "up"
        assert "dispatcher" not in body["loops"]  # this process dispatches nothing
        assert body["destinations_down"] == 0
        # The console's health page lists the dispatch process's loops.
        page = await _health_page(daemon)
        assert "dispatcher (dispatch process)" in page
        # Its metrics, proxied: attempts, durations and the dispatcher's loop.
        status, text = await _get(daemon, "/metrics/dispatcher")
        assert status == 200
        assert 'postbackd_loop_up{loop="dispatcher"} 1.0' in text
        assert "postbackd_attempt_duration_seconds_count" in text
        # The serving process's own metrics show no breakers (it has none to show).
        status, text = await _get(daemon, "/metrics")
        assert status == 200
        assert 'loop="dispatcher"' not in text
        # SIGHUP to the parent reaches the dispatch process: it reloads, and delivers to a
        # postback that only the new rules have.
        write_rules(tmp_path / "rules.d", {"offer-1.yaml": ping_rules(sink.url, postback=8)})
        daemon.signal(signal.SIGHUP)
        # Both processes log it (counted in the raw text: two processes share the log stream).
        await wait_for(lambda: daemon.log.read_text().count('"reason":"SIGHUP"') == 2, deadline=20)
        await _post(daemon, [100])
        await wait_for(lambda: "generic:c100:1:8" in _keys(sink), deadline=20)
    finally:
        assert daemon.stop() == 0
        await sink.close()


@pytest.mark.postgres
async def test_deliveries_on_postgresql(tmp_path: Path) -> None:
    async with pg_schema() as dsn:
        sink = await Sink().start()
        daemon = await _start(tmp_path, sink, store=dsn)

        async def nodes() -> set[str]:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                rows = await conn.fetch("SELECT DISTINCT node FROM attempt")
            finally:
                await conn.close()
            return {row[0] for row in rows}

        try:
            await _delivers_with_a_dispatch_process(daemon, sink, nodes)
            status, body = await _get(daemon, "/readyz")
            assert status == 200
            assert body["dispatcher_process"]["store"] == "ok"
        finally:
            assert daemon.stop() == 0
            await sink.close()


async def test_readyz_is_503_while_the_dispatch_process_does_not_answer(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon = await _start(tmp_path, sink)
    pid = _dispatch_pid(daemon)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            status, body = await _get(daemon, "/readyz")
            assert status == 503
            assert body["failing"] == ["dispatcher_process"]
            assert body["dispatcher_process"] == {"status": "unreachable"}
            assert body["destinations_down"] is None  # unknown, not "none down"
            status, body = await _get(daemon, "/readyz", admin=True)
            assert "no answer" in body["dispatcher_process_error"]
            assert body["destinations_down_names"] is None
            status, _ = await _get(daemon, "/metrics/dispatcher")
            assert status == 503
            page = await _health_page(daemon)
            assert "dispatch process" in page
            assert "Unreachable" in page
        finally:
            os.kill(pid, signal.SIGCONT)
        status, body = await _get(daemon, "/readyz")
        assert status == 200, body
    finally:
        assert daemon.stop() == 0
        await sink.close()


async def test_a_dispatch_process_that_dies_stops_the_unit_and_loses_nothing(
    tmp_path: Path,
) -> None:
    # Each attempt takes a while, so some are in flight (claimed) when the process dies.
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slow] * 40
    daemon = await _start(tmp_path, sink)
    try:
        pid = _dispatch_pid(daemon)
        await _post(daemon, range(40))  # every one acknowledged (committed)
        await wait_for(lambda: sink.received, deadline=20)
        os.kill(pid, signal.SIGKILL)
        assert daemon.proc is not None
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 1
        assert daemon.events("dispatcher_process_exited")
        assert not children(daemon.proc.pid)
        delivered = len(_keys(sink))
        assert delivered < 40  # some were left to the restarted unit
        # Restarted (systemd's Restart=): the dispatch process takes its claims back at once.
        daemon.start()
        await daemon.ready(deadline=30)
        want = {f"generic:c{n}:1:7" for n in range(40)}
        await wait_for(lambda: _keys(sink) == want, deadline=60)
    finally:
        daemon.stop()
        await sink.close()


async def test_sigterm_lets_attempts_in_flight_finish(tmp_path: Path) -> None:
    held = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        held.set()
        await asyncio.sleep(1.5)
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slow]
    daemon = await _start(tmp_path, sink)
    db = tmp_path / "var" / "postbackd.db"
    try:
        await _post(daemon, [1])
        await asyncio.wait_for(held.wait(), 20)
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
        rows = _sqlite(db, "SELECT state FROM delivery")
        assert rows == [("succeeded",)]
        assert daemon.events("dispatcher_stopped")
    finally:
        daemon.stop()
        await sink.close()


async def test_two_workers_and_a_dispatch_process(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon = await _start(tmp_path, sink, workers=2)
    try:
        assert daemon.proc is not None
        assert len(children(daemon.proc.pid)) == 3
        # The serving processes are nicer than the dispatch process: when the CPU is short,
        # delivery is served first and keeps up with what they accept.
        dispatcher = _dispatch_pid(daemon)
        serving = [p for p in children(daemon.proc.pid) if p != dispatcher]
        unit = os.getpriority(os.PRIO_PROCESS, daemon.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, dispatcher) == unit
        assert [os.getpriority(os.PRIO_PROCESS, p) for p in serving] == [
            min(unit + SERVING_NICENESS, 19)
        ] * 2
        await _post(daemon, range(20))
        await wait_for(lambda: len(_keys(sink)) == 20, deadline=30)
        db = tmp_path / "var" / "postbackd.db"
        nodes = {row[0] for row in _sqlite(db, "SELECT DISTINCT node FROM attempt")}
        assert nodes == {e["node"] for e in daemon.events("dispatcher_started")}
    finally:
        assert daemon.stop() == 0
        await sink.close()


async def test_a_wake_up_reaches_the_dispatcher_and_a_lost_one_is_harmless(tmp_path: Path) -> None:
    woken = asyncio.Event()
    sender = WakeSender(tmp_path)
    sender.wake()  # nobody listens yet: dropped without an error
    await asyncio.sleep(0)
    receiver = WakeReceiver(tmp_path, woken.set)
    receiver.start()
    try:
        for _ in range(1000):  # coalesced: at most one datagram per loop turn
            sender.wake()
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        receiver.close()
        sender.close()
    assert not (tmp_path / "dispatcher-wake.sock").exists()
