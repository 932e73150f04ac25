"""The write hand-off between processes sharing one SQLite file (daemon/store/sqlite_lock.py):
real processes, real files. Two writers lose nothing and take turns; a holder killed with
SIGKILL does not block the other (the kernel drops its flock); another program holding SQLite's
own lock is waited for within the busy timeout and then reported as before; a flock held past
the busy timeout does not stop a writer; no lock file for an in-memory database; a lock file
that cannot be opened means one warning and SQLite's own waiting."""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreError
from daemon.store.sqlite import connect
from daemon.store.sqlite_lock import SUFFIX
from daemon.store.sqlite_writer import GroupCommitWriter
from tests.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import asyncio, sys
from pathlib import Path
from daemon.store.sqlite import connect
from daemon.store.sqlite_writer import GroupCommitWriter

db, tag, rows, callers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main():
    writer = GroupCommitWriter(lambda: connect(db, 30.0))
    await asyncio.to_thread(writer.start)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    async def caller(i):
        for n in range(i, rows, callers):
            await writer.submit(
                lambda conn, n=n: conn.execute("INSERT INTO t (who, n) VALUES (?, ?)", (tag, n))
            )
    await asyncio.gather(*(caller(i) for i in range(callers)))
    lock = writer.lock
    await asyncio.to_thread(writer.stop)
    print("done", writer.commits, lock.contended, lock.timeouts, flush=True)

asyncio.run(main())
"""

HOLDER = """
import asyncio, sys, time
from pathlib import Path
from daemon.store.sqlite import connect
from daemon.store.sqlite_writer import GroupCommitWriter

def hold(conn):
    conn.execute("INSERT INTO t (who, n) VALUES ('killed', 0)")
    print("holding", flush=True)
    time.sleep(600)

async def main():
    writer = GroupCommitWriter(lambda: connect(Path(sys.argv[1]), 30.0))
    await asyncio.to_thread(writer.start)
    await writer.submit(hold)

asyncio.run(main())
"""


def _setup(db: Path) -> None:
    conn = connect(db, 5.0)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT NOT NULL, n INTEGER)")
    conn.close()


def _rows(db: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db)
    try:
        return [(str(w), int(n)) for w, n in conn.execute("SELECT who, n FROM t ORDER BY id")]
    finally:
        conn.close()


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@asynccontextmanager
async def _writer(db: Path, busy_timeout: float) -> AsyncIterator[GroupCommitWriter]:
    writer = GroupCommitWriter(lambda: connect(db, busy_timeout))
    await asyncio.to_thread(writer.start)
    try:
        yield writer
    finally:
        await asyncio.to_thread(writer.stop)


def _insert(who: str) -> Callable[[sqlite3.Connection], object]:
    return lambda conn: conn.execute("INSERT INTO t (who, n) VALUES (?, 0)", (who,)).lastrowid


def test_two_processes_lose_nothing_and_take_turns(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    rows = 3000
    procs = [_spawn(WRITER, str(db), tag, str(rows), "16") for tag in ("a", "b")]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:  # both start together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        done = [proc.communicate(timeout=90)[0].split() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    written = _rows(db)
    for tag in ("a", "b"):
        assert sorted(n for who, n in written if who == tag) == list(range(rows))
    # Both made progress while the other wrote: the commits of each come in several runs, and
    # each writer went through the hand-off (it waited for the other's flock at least once).
    runs = [who for i, (who, _) in enumerate(written) if i == 0 or written[i - 1][0] != who]
    assert runs.count("a") >= 2
    assert runs.count("b") >= 2
    for words in done:
        assert words[0] == "done"
        assert int(words[2]) > 0
    lock_file = tmp_path / f"shared.db{SUFFIX}"
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600


async def test_a_holder_killed_with_sigkill_does_not_block_the_other(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    holder = _spawn(HOLDER, str(db))
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == "holding\n"
        # The holder is inside its transaction, holding the flock and SQLite's lock, and will
        # not let go for 10 minutes; our busy timeout (30 s) is far off.
        async with _writer(db, 30.0) as writer:
            write = writer.submit(_insert("survivor"))
            lock = writer.lock
            assert lock is not None
            await wait_for(lambda: lock.contended > 0, deadline=30)  # it waits for the flock
            assert not write.done()
            os.kill(holder.pid, signal.SIGKILL)
            await asyncio.wait_for(write, timeout=60)
            assert lock.timeouts == 0
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    # The killed transaction is gone, ours is there.
    assert _rows(db) == [("survivor", 0)]


async def test_an_external_holder_of_sqlites_lock_is_waited_for_then_reported(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    other = sqlite3.connect(db, isolation_level=None)  # knows nothing of the lock file
    try:
        # Held shorter than the busy timeout: waited for.
        other.execute("BEGIN IMMEDIATE")
        async with _writer(db, 30.0) as writer:
            write = writer.submit(_insert("waited"))
            await asyncio.sleep(0.3)
            assert not write.done()
            other.execute("ROLLBACK")
            await asyncio.wait_for(write, timeout=60)
        # Held past the busy timeout: "database is locked", as without the hand-off; two
        # writers of this process (two lock file descriptions: they exclude each other) both
        # end within their bound, the second with what the first left of it.
        other.execute("BEGIN IMMEDIATE")
        async with _writer(db, 0.5) as first, _writer(db, 0.5) as second:
            results = await asyncio.wait_for(
                asyncio.gather(
                    first.submit(_insert("first")),
                    second.submit(_insert("second")),
                    return_exceptions=True,
                ),
                timeout=60,
            )
            for result in results:
                assert isinstance(result, StoreError)
                assert "database is locked" in str(result)
            # A failed BEGIN drops the flock (a wait that timed out drops it when granted).
            await wait_for(lambda: _unlocked(db), deadline=30)
            other.execute("ROLLBACK")
            await first.submit(_insert("first"))
            await second.submit(_insert("second"))
            await wait_for(lambda: _unlocked(db), deadline=30)  # so does a COMMIT
    finally:
        other.close()
    assert _rows(db) == [("waited", 0), ("first", 0), ("second", 0)]


def _unlocked(db: Path) -> bool:
    fd = os.open(f"{db}{SUFFIX}", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def test_a_flock_held_past_the_busy_timeout_does_not_stop_the_writer(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    # Someone holds the lock file but not SQLite's lock (a stopped worker between its COMMIT and
    # its unlock): after the busy timeout the writer goes on without the flock.
    fd = os.open(f"{db}{SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        async with _writer(db, 0.3) as writer:
            fcntl.flock(fd, fcntl.LOCK_EX)
            await asyncio.wait_for(writer.submit(_insert("past")), timeout=60)
            assert writer.lock is not None
            assert writer.lock.timeouts == 1
            fcntl.flock(fd, fcntl.LOCK_UN)
            # The waiter's standing request is granted, found unwanted and dropped, or taken
            # over by the next write; either way the next writes go through and unlock.
            for n in range(3):
                await asyncio.wait_for(writer.submit(_insert(f"after{n}")), timeout=60)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the writer does not hold it
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert [who for who, _ in _rows(db)] == ["past", "after0", "after1", "after2"]


async def test_no_lock_file_for_an_in_memory_database() -> None:
    writer = GroupCommitWriter(lambda: sqlite3.connect(":memory:", isolation_level=None))
    await asyncio.to_thread(writer.start)
    try:
        await writer.submit(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
        assert writer.lock is None
    finally:
        await asyncio.to_thread(writer.stop)


async def test_a_lock_file_that_cannot_be_opened_means_one_warning_and_sqlites_waiting(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    (tmp_path / f"shared.db{SUFFIX}").mkdir()  # cannot be opened as a file, even by root
    with capture_logs() as logs:
        async with _writer(db, 5.0) as writer:
            await writer.submit(_insert("plain"))
            await writer.submit(_insert("plain"))
            assert writer.lock is None
    warnings = [entry for entry in logs if entry["event"] == "sqlite_write_lock_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["path"] == str(tmp_path / f"shared.db{SUFFIX}")
    assert _rows(db) == [("plain", 0), ("plain", 0)]


async def test_a_failing_flock_disables_the_hand_off_with_one_warning(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    async with _writer(db, 5.0) as writer:
        lock = writer.lock
        assert lock is not None
        # The descriptor goes bad under the writer (flock answers EBADF), as an NFS mount that
        # cannot lock (ENOLCK) would.
        os.close(lock._fd)
        lock._fd = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # never a valid descriptor
        with capture_logs() as logs:
            await writer.submit(_insert("first"))
            await writer.submit(_insert("second"))
    warnings = [entry for entry in logs if entry["event"] == "sqlite_write_lock_unavailable"]
    assert len(warnings) == 1
    assert "EBADF" in warnings[0]["error"] or "Bad file descriptor" in warnings[0]["error"]
    assert _rows(db) == [("first", 0), ("second", 0)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own the lock file like the db")
async def test_root_makes_the_lock_file_the_databases_owners(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    _setup(db)
    os.chown(db, 4321, 4322)
    async with _writer(db, 5.0) as writer:
        await writer.submit(_insert("owned"))
    lock_file = Path(f"{db}{SUFFIX}").stat()
    assert (lock_file.st_uid, lock_file.st_gid) == (4321, 4322)
    assert stat.S_IMODE(lock_file.st_mode) == 0o600
