"""The systemd notify protocol as the real `postbackd run` process speaks it, to a datagram socket
standing in for systemd: READY=1 only once it serves, RELOADING=1 then READY=1 around every
SIGHUP reload (a failed one too), STOPPING=1 on SIGTERM, and watchdog pings throughout."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Sink, wait_for
from tests.process_support import DaemonProcess, free_port, write_config

pytestmark = pytest.mark.slow

DEADLINE = 20.0
WATCHDOG_USEC = "100000"  # a ping every 50 ms


class Systemd:
    """The receiving end of NOTIFY_SOCKET; counts watchdog pings apart from state changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.pings = 0

    async def state(self) -> list[str]:
        """The next datagram that is not a watchdog ping, as its lines."""
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), DEADLINE)
            if data == b"WATCHDOG=1":
                self.pings += 1
                continue
            return data.decode().split("\n")

    async def reload_cycle(self) -> None:
        """RELOADING=1 (with the monotonic time Type=notify-reload needs), then READY=1."""
        reloading = await self.state()
        assert reloading[0] == "RELOADING=1", reloading
        assert reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].partition("=")[2]) > 0
        assert await self.state() == ["READY=1"]


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    folder = Path("/tmp") / f"pbn-{uuid.uuid4().hex[:12]}"
    folder.mkdir(mode=0o700)
    receiver = Systemd(folder / "notify")
    yield receiver
    receiver.sock.close()
    shutil.rmtree(folder)


def supervised(config: Path, port: int, systemd: Systemd) -> DaemonProcess:
    daemon = DaemonProcess(
        config, port, env={"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": WATCHDOG_USEC}
    )
    # systemd sets WATCHDOG_PID to the main process's pid, which we cannot know before the
    # fork; unset, the daemon pings (sd_notify(3)). A stray one from our own environment
    # would name another process and silence the pings.
    daemon.env.pop("WATCHDOG_PID", None)
    return daemon


def rules_for(sink: Sink) -> str:
    return f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pb?tx={{conversion_id}}"}}
"""


def write_atomically(path: Path, text: str) -> None:
    """As a deployment would: the watcher sees one finished file, never a half-written one."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    temp.rename(path)


async def readyz(daemon: DaemonProcess) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{daemon.url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.json()


async def test_ready_reload_stopping_and_watchdog_from_the_real_process(
    tmp_path: Path, sink: Sink, systemd: Systemd
) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    write_atomically(tmp_path / "rules.d" / "one.yaml", rules_for(sink))
    daemon = supervised(config, port, systemd)
    daemon.start()
    try:
        ready = await systemd.state()
        assert ready == ["READY=1", f"STATUS=listening on 127.0.0.1:{port}"]
        # No retry: when READY=1 arrives, the port is bound, the store answers and the rules
        # are loaded.
        status, detail = await readyz(daemon)
        assert (status, detail["status"], detail["store"]) == (200, "ready", "ok")
        assert detail["last_reload_ok"] is True
        version = detail["rules_version"]
        assert daemon.events("rules_loaded")
        assert systemd.pings >= 1  # the watchdog pinged while the daemon was starting

        daemon.signal(signal.SIGHUP)
        await systemd.reload_cycle()
        assert [e["reason"] for e in daemon.events("rules_reloaded")] == ["SIGHUP"]

        # A bad rule: the watcher's reload fails and says so around it, as does a SIGHUP.
        write_atomically(tmp_path / "rules.d" / "two.yaml", "offer: 2\npostbacks: [{id: x}]\n")
        await systemd.reload_cycle()
        await wait_for(lambda: daemon.events("rules_reload_failed"), deadline=DEADLINE)
        daemon.signal(signal.SIGHUP)

        def failed_on_sighup() -> bool:
            return any(e["reason"] == "SIGHUP" for e in daemon.events("rules_reload_failed"))

        for _ in range(5):  # a watcher that split one write into two reloads adds a cycle
            await systemd.reload_cycle()
            if failed_on_sighup():
                break
        await wait_for(failed_on_sighup, deadline=DEADLINE)
        status, detail = await readyz(daemon)
        assert (status, detail["last_reload_ok"], detail["rules_version"]) == (200, False, version)

        pings = systemd.pings
        await wait_for(lambda: _drain_pings(systemd) >= pings + 3, deadline=DEADLINE)

        daemon.signal(signal.SIGTERM)
        assert await systemd.state() == ["STOPPING=1"]
        assert daemon.proc is not None
        assert await asyncio.to_thread(daemon.proc.wait, DEADLINE) == 0
        assert daemon.events("daemon_stopped")
    finally:
        daemon.stop()


def _drain_pings(systemd: Systemd) -> int:
    """Count the pings queued right now; any other message here would be a protocol error."""
    while True:
        try:
            data = systemd.sock.recv(4096)
        except BlockingIOError:
            return systemd.pings
        assert data == b"WATCHDOG=1", data
        systemd.pings += 1


@pytest.mark.parametrize("broken", ["rules", "store"])
async def test_no_ready_when_the_rules_or_the_store_cannot_come_up(
    tmp_path: Path, systemd: Systemd, broken: str
) -> None:
    port = free_port()
    store = "sqlite:////proc/postbackd-nowhere/x.db" if broken == "store" else None
    config = write_config(tmp_path, port=port, store=store)
    rules = "offer: 1\npostbacks: [{id: 0}]\n" if broken == "rules" else "offer: 1\n"
    write_atomically(tmp_path / "rules.d" / "one.yaml", rules)
    daemon = supervised(config, port, systemd)
    daemon.start()
    try:
        assert daemon.proc is not None
        assert await asyncio.to_thread(daemon.proc.wait, DEADLINE) == 1
        _drain_pings(systemd)  # pings only: no READY=1 (nor anything else) was ever sent
        assert not daemon.events("daemon_started")
    finally:
        daemon.stop()
