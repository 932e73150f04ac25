"""Short jobs run on the event loop's thread, in the writer's transaction lent to it
(daemon/store/sqlite_writer.py), and nothing that could make the loop wait does: a batch with
any other job, a hand-off lock or SQLite write lock held by another process, a lent batch that
took too long, a loop that stopped or closed. Real SQLite files; batches are formed by holding
the writer in its commit hook while the jobs queue up."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreError
from daemon.store.base import DeliveryState
from daemon.store.sqlite import SQLiteStore, connect
from daemon.store.sqlite_lock import LockFile
from daemon.store.sqlite_writer import GroupCommitWriter
from tests.harness import FakeClock
from tests.store.support import Gate, arrive, at, claim_one, conversion, finish

Job = Callable[[sqlite3.Connection], Any]

# The writer's busy timeout here: a loop that waited for a lock held elsewhere would wait this
# long, where the tests below give the loop well under a tenth of it.
BUSY = 30.0


def _table(path: Path) -> None:
    setup = connect(path, 1.0)
    setup.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, thread INTEGER)")
    setup.close()


async def _start(path: Path, **kw: Any) -> tuple[GroupCommitWriter, Gate]:
    _table(path)
    gate = Gate()
    gcw = GroupCommitWriter(lambda: connect(path, BUSY), on_commit=gate, **kw)
    await asyncio.to_thread(gcw.start)
    return gcw, gate


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[tuple[GroupCommitWriter, Gate]]:
    gcw, gate = await _start(tmp_path / "w.db")
    gate.opened.set()
    try:
        yield gcw, gate
    finally:
        await asyncio.to_thread(gcw.stop)


def _noted(value: int) -> Job:
    """Inserts `value` with the id of the thread that ran it; returns that id."""

    def job(conn: sqlite3.Connection) -> int:
        thread = threading.get_ident()
        conn.execute("INSERT INTO t (id, thread) VALUES (?, ?)", (value, thread))
        return thread

    return job


def _threads(path: Path) -> dict[int, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT id, thread FROM t").fetchall())
    finally:
        conn.close()


async def test_a_short_job_runs_on_the_loops_thread_and_any_other_in_the_writers(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, _ = writer
    here = threading.get_ident()
    assert await gcw.submit(_noted(1), on_loop=True) == here
    assert (gcw.lent, gcw.paused) == (1, 0)
    assert await gcw.submit(_noted(2)) != here  # not asked for: the writer thread's
    assert gcw.lent == 1
    assert gcw.commits == 2


async def test_a_batch_with_one_job_not_for_the_loop_runs_whole_in_the_writer(
    tmp_path: Path,
) -> None:
    gcw, gate = await _start(tmp_path / "w.db")
    try:
        warmup = gcw.submit(_noted(1), on_loop=True)
        assert await asyncio.to_thread(gate.entered.wait, 10)  # committed, writer held
        batch = [
            gcw.submit(_noted(2), on_loop=True),
            gcw.submit(_noted(3)),  # a prune, a requeue: never on the loop
            gcw.submit(_noted(4), on_loop=True),
        ]
        gate.opened.set()
        await warmup
        threads = await asyncio.gather(*batch)
        assert len(set(threads)) == 1
        assert threads[0] != threading.get_ident()
        assert gcw.lent == 1  # the warm-up only
        assert gcw.commits == 2  # one batch
    finally:
        gate.opened.set()
        await asyncio.to_thread(gcw.stop)


async def test_a_lent_batch_over_the_budget_sends_the_next_ones_to_the_writer(
    tmp_path: Path,
) -> None:
    """A batch that held the loop longer than loop_budget (every batch, with a budget of 0)
    sends the batches of the next loop_pause seconds to the writer thread."""
    here = threading.get_ident()
    gcw, gate = await _start(tmp_path / "w.db", loop_budget=0.0, loop_pause=3600.0)
    gate.opened.set()
    try:
        assert await gcw.submit(_noted(1), on_loop=True) == here
        assert gcw.paused == 1
        assert await gcw.submit(_noted(2), on_loop=True) != here
        assert await gcw.submit(_noted(3), on_loop=True) != here
        assert (gcw.lent, gcw.paused) == (1, 1)
    finally:
        await asyncio.to_thread(gcw.stop)

    # With no pause, the next batch is lent again.
    gcw, gate = await _start(tmp_path / "w2.db", loop_budget=0.0, loop_pause=0.0)
    gate.opened.set()
    try:
        assert await gcw.submit(_noted(1), on_loop=True) == here
        assert await gcw.submit(_noted(2), on_loop=True) == here
        assert (gcw.lent, gcw.paused) == (2, 2)
    finally:
        await asyncio.to_thread(gcw.stop)


async def test_slow_lent_batches_in_a_row_double_the_pause_and_one_in_budget_resets_it(
    tmp_path: Path,
) -> None:
    """With a budget of -1 every lent batch is slow (its time is 0 on a clock that stands
    still): pauses of 1, 2, 4 s in a row. A pause ends at its time, not before. Each run of
    slow batches logs one warning."""
    here = threading.get_ident()
    clock = FakeClock(1000.0)
    gcw, gate = await _start(tmp_path / "w.db", loop_budget=-1.0, loop_pause=1.0, clock=clock.now)
    gate.opened.set()
    n = iter(range(1, 100))

    async def ran_on_loop() -> bool:
        return bool(await gcw.submit(_noted(next(n)), on_loop=True) == here)

    try:
        with capture_logs() as logs:
            assert await ran_on_loop()  # slow: 1 s without lending
            clock.advance(0.99)
            assert not await ran_on_loop()
            clock.advance(0.01)
            assert await ran_on_loop()  # slow again, in a row: 2 s
            clock.advance(1.99)
            assert not await ran_on_loop()
            clock.advance(0.01)
            assert await ran_on_loop()  # 4 s
            clock.advance(3.99)
            assert not await ran_on_loop()
            clock.advance(0.01)
            gcw._loop_budget = 3600.0  # the next batch is within the budget
            assert await ran_on_loop()
            gcw._loop_budget = -1.0
            assert await ran_on_loop()  # slow, after one in budget: 1 s again
            clock.advance(0.99)
            assert not await ran_on_loop()
            clock.advance(0.01)
            assert await ran_on_loop()
        assert gcw.paused == 5
        slow = [e for e in logs if e["event"] == "store_writes_slow"]
        assert [(e["log_level"], e["next_in_s"]) for e in slow] == [("info", 1.0)] * 2
    finally:
        await asyncio.to_thread(gcw.stop)


async def test_the_pause_stops_doubling_at_its_cap(tmp_path: Path) -> None:
    here = threading.get_ident()
    clock = FakeClock(1000.0)
    gcw, gate = await _start(tmp_path / "w.db", loop_budget=-1.0, loop_pause=1.0, clock=clock.now)
    gate.opened.set()
    try:
        pauses = []
        for value in range(1, 12):
            assert await gcw.submit(_noted(value), on_loop=True) == here
            pauses.append(gcw._apart_until - clock.t)
            clock.t = gcw._apart_until
        assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    finally:
        await asyncio.to_thread(gcw.stop)


async def _loop_stays_free(pending: asyncio.Future[Any], release: Callable[[], None]) -> float:
    """While `pending` waits for a lock held elsewhere, the loop runs other work; then the lock
    is released. How long the loop took to come back from a 0.2 s sleep."""
    start = time.monotonic()
    await asyncio.sleep(0.2)
    back = time.monotonic() - start
    assert not pending.done()
    release()
    return back


async def test_a_hand_off_lock_held_by_another_process_never_holds_the_loop(
    writer: tuple[GroupCommitWriter, Gate], tmp_path: Path
) -> None:
    """Another process's writer holds the hand-off lock (a second open file description of the
    lock file, as another process has): the loop does not wait for it; the writer thread takes
    the batch back and waits there."""
    gcw, _ = writer
    other = LockFile.open(str(tmp_path / "w.db"))
    assert other is not None
    try:
        assert other.acquire(1.0)
        pending = asyncio.ensure_future(gcw.submit(_noted(1), on_loop=True))
        back = await _loop_stays_free(pending, other.release)
        assert await pending != threading.get_ident()  # the writer thread ran it
        assert back < BUSY / 10
        assert gcw.lent == 0
        # Once the lock is free again, the next batch is lent.
        assert await gcw.submit(_noted(2), on_loop=True) == threading.get_ident()
    finally:
        other.close()


async def test_sqlites_write_lock_held_elsewhere_never_holds_the_loop(
    writer: tuple[GroupCommitWriter, Gate], tmp_path: Path
) -> None:
    """A connection outside the hand-off (the sqlite3 shell, another program) holds SQLite's
    write lock: the loop's BEGIN does not wait (busy_timeout 0 between batches), and the writer
    thread waits within its busy timeout."""
    gcw, _ = writer
    holder = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(gcw.submit(_noted(1), on_loop=True))
        back = await _loop_stays_free(pending, lambda: holder.execute("COMMIT"))
        assert await pending != threading.get_ident()
        assert back < BUSY / 10
        assert gcw.lent == 0
        assert await gcw.submit(_noted(2), on_loop=True) == threading.get_ident()
    finally:
        holder.close()


def _submitted(gcw: GroupCommitWriter, job: Job, on_loop: bool = True) -> Callable[[], Any]:
    async def submit() -> asyncio.Future[Any]:
        return gcw.submit(job, on_loop=on_loop)

    return submit


def _wait_for_row(path: Path, value: int) -> int:
    """The thread that wrote row `value`, once it is committed."""
    until = time.monotonic() + 30
    while time.monotonic() < until:
        found = _threads(path).get(value)
        if found is not None:
            return found
        time.sleep(0.02)
    raise AssertionError(f"row {value} never committed")


@pytest.mark.parametrize("closed", [False, True], ids=["stopped", "closed"])
def test_a_batch_lent_to_a_loop_that_stopped_or_closed_is_run_by_the_writer(
    tmp_path: Path, closed: bool
) -> None:
    """The loop stopped (or closed) after its jobs were submitted and before the writer took
    them: the writer thread runs the batch and commits it (an accepted request is never left
    to a loop that will not run again). A stopped loop that runs again gets its answers."""
    path = tmp_path / "w.db"
    loop = asyncio.new_event_loop()
    gcw, gate = loop.run_until_complete(_start(path))
    try:
        warmup = loop.run_until_complete(_submitted(gcw, _noted(1), on_loop=False)())
        assert gate.entered.wait(10)  # committed, writer held
        future = loop.run_until_complete(_submitted(gcw, _noted(2))())  # the loop stops
        if closed:
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        gate.opened.set()  # the writer takes the batch and lends it to a loop that is not running
        ran_by = _wait_for_row(path, 2)
        assert ran_by != threading.get_ident()
        assert gcw.lent == 0
        if not closed:
            assert loop.run_until_complete(future) == ran_by
            assert loop.run_until_complete(warmup) == ran_by
    finally:
        gate.opened.set()
        gcw.stop()
        if not loop.is_closed():
            loop.close()


async def test_the_stores_hot_writes_are_lent_and_its_bulk_ones_are_not(tmp_path: Path) -> None:
    """An arrival, a claim, a result, a release and a hold run on the loop; a prune, a requeue
    and a cancel in the writer thread (they may touch any number of rows)."""
    store = SQLiteStore(tmp_path / "s.db")
    await store.migrate()
    await store.open()
    try:
        writer = store._writer
        ids = await arrive(store, conversion("c1"), at(0), postbacks=(101, 102, 103))
        assert writer.lent == 1
        first = await claim_one(store, at(1))
        await finish(store, first, DeliveryState.SUCCEEDED, at(2))
        second = await claim_one(store, at(3))
        assert await store.release(second, at(4))
        third = await claim_one(store, at(5))
        assert await store.hold(third, at(60), at(6))
        assert writer.lent == 7
        assert writer.paused == 0

        await store.requeue(ids, at(7))
        await store.cancel_postbacks([102], at(8))
        await store.prune(at(9))
        assert writer.lent == 7
        assert writer.commits > writer.lent
    finally:
        await store.close()


def test_an_interrupt_in_a_lent_batch_fails_the_batch_and_goes_on_up(tmp_path: Path) -> None:
    """SystemExit or KeyboardInterrupt raised on the loop while it runs a lent batch goes on up
    to whoever runs the loop, as anywhere else on it; the batch is rolled back and fails, and
    the writer goes on."""
    path = tmp_path / "w.db"
    loop = asyncio.new_event_loop()
    gcw, gate = loop.run_until_complete(_start(path))
    gate.opened.set()

    def interrupted(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (id) VALUES (1)")
        raise SystemExit(3)

    async def submit(job: Job) -> Any:
        return await gcw.submit(job, on_loop=True)

    try:
        task = loop.create_task(submit(interrupted))
        with pytest.raises(SystemExit):
            loop.run_until_complete(task)
        assert loop.run_until_complete(submit(_noted(2))) == threading.get_ident()
        assert task.done()
        assert isinstance(task.exception(), StoreError)
        assert _threads(path) == {2: threading.get_ident()}
    finally:
        loop.run_until_complete(asyncio.to_thread(gcw.stop))
        loop.close()
