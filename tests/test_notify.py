"""The sd_notify client against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.notify import Notifier

DEADLINE = 10.0  # seconds; generous, only bounds a test that would otherwise hang


class Systemd:
    """The receiving end of NOTIFY_SOCKET, as systemd holds it."""

    def __init__(self, address: str) -> None:
        self.address = address  # as written in NOTIFY_SOCKET
        self.target = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.target)
        self.sock.setblocking(False)

    def drain(self) -> list[bytes]:
        """Every datagram queued right now, without waiting."""
        got: list[bytes] = []
        while True:
            try:
                got.append(self.sock.recv(4096))
            except BlockingIOError:
                return got

    async def receive(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), DEADLINE)

    def receive_sync(self) -> bytes:
        self.sock.settimeout(DEADLINE)
        try:
            return self.sock.recv(4096)
        finally:
            self.sock.setblocking(False)


def _short_dir() -> Path:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    path = Path("/tmp") / f"pbn-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[Systemd]:
    if request.param == "abstract":
        receiver = Systemd(f"@postbackd-test-{uuid.uuid4().hex}")
        yield receiver
        receiver.sock.close()
        return
    folder = _short_dir()
    receiver = Systemd(str(folder / "notify"))
    yield receiver
    receiver.sock.close()
    (folder / "notify").unlink()
    folder.rmdir()


def test_messages_are_the_exact_datagrams(systemd: Systemd) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd.address})
    assert notifier.enabled

    notifier.ready()
    notifier.ready("serving on 127.0.0.1:8080")
    notifier.status("rules 3f2a loaded\nsecond line")
    notifier.stopping()

    assert systemd.receive_sync() == b"READY=1"
    assert systemd.receive_sync() == b"READY=1\nSTATUS=serving on 127.0.0.1:8080"
    assert systemd.receive_sync() == b"STATUS=rules 3f2a loaded second line"
    assert systemd.receive_sync() == b"STOPPING=1"
    assert systemd.drain() == []


def test_reloading_carries_the_monotonic_clock(systemd: Systemd) -> None:
    notifier = Notifier(systemd.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = systemd.receive_sync().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("environ", "enabled", "interval"),
    [
        ({}, False, None),
        ({"NOTIFY_SOCKET": ""}, False, None),
        ({"NOTIFY_SOCKET": "relative/notify"}, False, None),
        ({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "30000000"}, False, None),
        ({"WATCHDOG_USEC": "30000000"}, False, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, True, None),
        ({"NOTIFY_SOCKET": "@sd-notify"}, True, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}, True, 15.0),
        ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "0"}, True, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "-5"}, True, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30s"}, True, None),
        (
            {"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"},
            True,
            15.0,
        ),
        (
            {"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"},
            True,
            None,
        ),
        (
            {"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "bogus"},
            True,
            None,
        ),
    ],
)
def test_from_environ(environ: dict[str, str], enabled: bool, interval: float | None) -> None:
    pids = {"pid": str(os.getpid()), "other": str(os.getpid() + 1)}
    notifier = Notifier.from_environ({k: v.format(**pids) for k, v in environ.items()})
    assert notifier.enabled is enabled
    assert notifier.watchdog_interval == interval


def test_constructor_applies_the_pid_rule() -> None:
    assert Notifier("/s", watchdog_usec=2_000_000).watchdog_interval == 1.0
    mine = Notifier("/s", watchdog_usec=2_000_000, watchdog_pid=os.getpid())
    assert mine.watchdog_interval == 1.0
    theirs = Notifier("/s", watchdog_usec=2_000_000, watchdog_pid=os.getpid() + 1)
    assert theirs.watchdog_interval is None


async def test_watchdog_pings_arrive_on_schedule(systemd: Systemd) -> None:
    notifier = Notifier.from_environ(
        {
            "NOTIFY_SOCKET": systemd.address,
            "WATCHDOG_USEC": "40000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert notifier.watchdog_interval == 0.02
    started = time.monotonic()
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        pings = [await systemd.receive() for _ in range(5)]
    finally:
        task.cancel()
    assert pings == [b"WATCHDOG=1"] * 5
    # A lower bound only (load can only lengthen it): the pinger waits an interval between
    # pings instead of spinning; the 5th ping cannot have been sent before 4 intervals passed.
    assert time.monotonic() - started >= 4 * 0.02
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_pings_stop_while_the_event_loop_is_blocked(systemd: Systemd) -> None:
    notifier = Notifier(systemd.address, watchdog_usec=20_000)  # a ping every 10 ms
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        for _ in range(3):
            assert await systemd.receive() == b"WATCHDOG=1"
        # From here to the second drain the loop never runs: a pinger driven by the loop
        # sends nothing, whereas one on a thread would send about 25 pings in this window.
        systemd.drain()
        threading.Event().wait(0.25)
        during_block = systemd.drain()
        assert during_block == []
        # Once the loop runs again, so do the pings.
        assert await systemd.receive() == b"WATCHDOG=1"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_watchdog_returns_at_once_without_a_watchdog(systemd: Systemd) -> None:
    other_pid = str(os.getpid() + 1)
    cases = [
        Notifier(None, watchdog_usec=20_000),
        Notifier(systemd.address),
        Notifier.from_environ(
            {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": other_pid}
        ),
    ]
    for notifier in cases:
        await asyncio.wait_for(notifier.run_watchdog(), DEADLINE)
        notifier.watchdog()
    assert systemd.drain() == []


def test_watchdog_pid_mismatch_sends_no_ping(systemd: Systemd) -> None:
    notifier = Notifier.from_environ(
        {
            "NOTIFY_SOCKET": systemd.address,
            "WATCHDOG_USEC": "20000",
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
    )
    notifier.watchdog()
    notifier.ready()
    # Datagrams keep their order: the first one to arrive is the READY=1 sent after the ping.
    assert systemd.receive_sync() == b"READY=1"
    assert systemd.drain() == []


def test_a_missing_socket_never_raises_and_logs_once() -> None:
    folder = _short_dir()
    path = folder / "notify"
    notifier = Notifier(str(path), watchdog_usec=1_000_000)
    try:
        with capture_logs() as logs:
            notifier.ready("up")
            notifier.reloading()
            notifier.status("still here")
            notifier.watchdog()
            notifier.stopping()
        assert logs == [
            {
                "event": "notify_failed",
                "log_level": "warning",
                "state": "READY",
                "error": "FileNotFoundError",
                "errno": errno.ENOENT,
                "socket": str(path),
            }
        ]
        # When systemd's socket is there again, sending resumes and says so once.
        receiver = Systemd(str(path))
        with capture_logs() as logs:
            notifier.status("back")
            notifier.status("again")
        assert [entry["event"] for entry in logs] == ["notify_recovered"]
        assert receiver.drain() == [b"STATUS=back", b"STATUS=again"]
        receiver.sock.close()
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_an_abstract_socket_nobody_holds_never_raises() -> None:
    notifier = Notifier(f"@postbackd-test-{uuid.uuid4().hex}")
    with capture_logs() as logs:
        notifier.ready()
        notifier.stopping()
    assert [(e["event"], e["errno"]) for e in logs] == [("notify_failed", errno.ECONNREFUSED)]


def _fill_queue(target: str) -> list[socket.socket]:
    """Senders that filled the receiver's queue: a fresh socket can no longer send one byte."""
    senders: list[socket.socket] = []
    for _ in range(10_000):  # each sender stops at its own buffer, the queue's limit is shared
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        senders.append(sender)
        sent = 0
        try:
            while True:
                sender.sendto(b"x", target)
                sent += 1
        except BlockingIOError:
            if sent == 0:
                return senders
    raise AssertionError("the receiver's queue never filled")


def test_a_full_systemd_queue_neither_raises_nor_hangs(systemd: Systemd) -> None:
    senders = _fill_queue(systemd.target)
    try:
        notifier = Notifier(systemd.address)
        with capture_logs() as logs:
            notifier.status("queue full")
        assert [(e["event"], e["error"]) for e in logs] == [("notify_failed", "TimeoutError")]
    finally:
        for sender in senders:
            sender.close()


def test_without_a_socket_nothing_is_sent_or_logged() -> None:
    notifier = Notifier(None, watchdog_usec=1_000_000)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready("x")
        notifier.reloading()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
    assert logs == []
