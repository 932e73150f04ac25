"""`workers: 2`: two processes share the listening port (SO_REUSEPORT), each with its own
dispatcher and node name; the parent passes signals on and stops everything when a worker dies.
Real processes, a real SQLite file, a real sink on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import gc
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from daemon.errors import ConfigError
from daemon.workers import GC_THRESHOLDS, loop_factory, run_loop, worker_node
from tests.harness import Sink, wait_for, write_rules
from tests.process_support import (
    DaemonProcess,
    children,
    free_port,
    ping_rules,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the loopback TCP sockets listening on `port` (state 0A)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


async def _start(tmp_path: Path, sink: Sink) -> tuple[DaemonProcess, int]:
    port = free_port()
    config = write_config(tmp_path, port=port, workers=2)
    write_rules(tmp_path / "rules.d", {"offer-1.yaml": ping_rules(sink.url)})
    daemon = DaemonProcess(config, port)
    daemon.start()
    await daemon.ready()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    await wait_for(lambda: len(children(pid)) == 2, deadline=20)
    # The first ready worker answers /readyz: wait for the other to be listening too.
    await wait_for(lambda: len(daemon.events("daemon_started")) == 2, deadline=20)
    return daemon, port


async def test_two_workers_share_the_port_and_both_deliver(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon, port = await _start(tmp_path, sink)
    try:
        assert daemon.proc is not None
        workers = children(daemon.proc.pid)
        listening = _listening_inodes(port)
        # Each worker holds a listening socket of its own on the port.
        owners = [w for w in workers if _socket_inodes(w) & listening]
        assert sorted(owners) == sorted(workers)
        # Without a dispatch process, every worker dispatches: none is made nicer.
        unit = os.getpriority(os.PRIO_PROCESS, daemon.proc.pid)
        assert [os.getpriority(os.PRIO_PROCESS, w) for w in workers] == [unit, unit]
        # Fresh connections are spread over both; every conversion is acknowledged.
        for n in range(40):
            async with aiohttp.ClientSession() as session:
                url = f"{daemon.url}/webhooks/generic"
                params = {"conversion_id": f"c{n}", "offer": "1", "affiliate": "42"}
                async with session.get(url, params={**params, "status": "approved"}) as resp:
                    assert resp.status == 200, await resp.text()
        db = tmp_path / "var" / "postbackd.db"
        # Every delivery recorded as succeeded (the sink hears of it before the store does).
        await wait_for(lambda: _succeeded(db) == 40, deadline=30)
        nodes = {row[0] for row in _query(db, "SELECT DISTINCT node FROM attempt")}
        started = {e["node"] for e in daemon.events("daemon_started")}
        (base,) = {n.rsplit("/", 1)[0] for n in started}
        assert started == {f"{base}/w0", f"{base}/w1"}
        # Both dispatchers delivered (a worker wakes its own dispatcher after each commit).
        assert nodes == started
        # Both writers hand SQLite's write lock over through the lock file beside the database
        # (daemon/store/sqlite_lock.py): each worker holds it open.
        lock_file = tmp_path / "var" / "postbackd.db-writelock"
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
        for worker in workers:
            assert str(lock_file) in _open_files(worker)
        assert not daemon.events("sqlite_write_lock_unavailable")
    finally:
        assert daemon.stop() == 0
        await sink.close()
    assert daemon.proc.poll() == 0
    assert not children(daemon.proc.pid)


async def test_a_worker_that_dies_stops_the_node(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon, _ = await _start(tmp_path, sink)
    try:
        assert daemon.proc is not None
        first, second = children(daemon.proc.pid)
        os.kill(first, signal.SIGKILL)
        # The parent stops the other worker and exits 1 (systemd restarts the whole unit).
        returncode = await asyncio.to_thread(daemon.proc.wait, 30)
        assert returncode == 1
        assert not Path(f"/proc/{second}").exists() or _is_zombie(second)
        assert daemon.events("worker_exited")
    finally:
        daemon.stop()
        await sink.close()


def _open_files(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            found.add(os.readlink(fd))
    return found


def _query(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _succeeded(db: Path) -> int:
    (row,) = _query(db, "SELECT count(*) FROM delivery WHERE state = 'succeeded'")
    return int(str(row[0]))


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


def test_worker_nodes_and_event_loop_choice() -> None:
    assert worker_node("h:8080", None) == "h:8080"
    assert worker_node("h:8080", 3) == "h:8080/w3"
    assert loop_factory("asyncio") is None
    try:
        import uvloop  # noqa: F401 (an optional dependency)
    except ImportError:
        assert loop_factory("auto") is None
        with pytest.raises(ConfigError, match="uvloop is not installed"):
            loop_factory("uvloop")
        return
    factory = loop_factory("auto")
    assert factory is not None
    loop = factory()
    try:
        assert "uvloop" in type(loop).__module__
    finally:
        loop.close()


def test_a_sighup_during_the_workers_start_is_not_a_dead_worker(tmp_path: Path) -> None:
    """From the fork until a worker's loop installs its handler, SIGHUP is ignored: its default
    action would end the worker (and so the unit). Each child here sends itself a SIGHUP before
    it has any handler, then writes down that it lived on and what SIGHUP was set to."""
    script = tmp_path / "start.py"
    script.write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from daemon.workers import run_workers\n"
        "def serve(index, folder):\n"
        "    state = signal.getsignal(signal.SIGHUP)\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        f"    Path({str(tmp_path)!r}, f'child-{{index}}').write_text(str(state))\n"
        "    return 0\n"
        "def dispatcher(folder):\n"
        "    return serve('d', folder)\n"
        "sys.exit(run_workers(2, serve, {}, dispatcher=dispatcher))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, timeout=60, check=False)
    found = {p.name: p.read_text() for p in tmp_path.glob("child-*")}
    assert found == {name: str(signal.SIG_IGN) for name in ("child-0", "child-1", "child-d")}


def test_the_loop_runs_with_the_daemons_collector_thresholds_and_puts_them_back() -> None:
    """Every process of `postbackd run` (one, a worker, the dispatch process) serves through
    run_loop: its young generation is GC_THRESHOLDS' while the loop runs (issue 17)."""
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS
    seen: list[tuple[int, ...]] = []

    async def main() -> None:
        seen.append(gc.get_threshold())

    run_loop(main, None)
    assert seen == [GC_THRESHOLDS]
    assert gc.get_threshold() == before

    async def failing() -> None:
        raise RuntimeError("the loop ends")

    with pytest.raises(RuntimeError):
        run_loop(failing, None)
    assert gc.get_threshold() == before


def test_the_loops_tasks_share_the_threads_decimal_context() -> None:
    """decimal keeps its context in a context variable: run_loop makes it before the loop, so
    that a request's task (a copy of the loop's context) does not make one of its own at its
    first Decimal. Run in a new thread, whose context starts empty, as a worker's does."""
    seen: list[decimal.Context] = []

    async def task() -> None:
        decimal.Decimal("12.50")
        seen.append(decimal.getcontext())

    async def main() -> None:
        # tasks made before anything here touched decimal, as aiohttp makes a request's
        await asyncio.gather(asyncio.create_task(task()), asyncio.create_task(task()))
        seen.append(decimal.getcontext())

    thread = threading.Thread(target=run_loop, args=(main, None))
    thread.start()
    thread.join(30)
    assert len(seen) == 3
    assert seen[0] is seen[1] is seen[2]
    assert seen[0].prec == decimal.DefaultContext.prec  # the default, unchanged
