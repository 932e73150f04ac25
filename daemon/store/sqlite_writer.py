"""Group commit for SQLite: one thread runs every write, many requests to a transaction.

Each write is a job (a function of the connection). The writer thread takes every job that is
waiting, runs them one after the other inside one ``BEGIN IMMEDIATE`` transaction, and COMMITs
once; only then does each caller's future resolve. With ``synchronous=FULL`` the fsync of that
one COMMIT is shared by every request of the batch, which is what keeps durability cheap.

A job that raises fails alone. The jobs run without a savepoint each (two statements and two
GIL hand-offs per job saved): when one raises, the whole batch is rolled back to the savepoint
taken after BEGIN and run again, each job in its own SAVEPOINT, so the failing one is rolled back
to its savepoint and the others commit. A job must therefore be safe to run twice in one batch:
a function of the connection and its captured arguments (what it returns comes from the run that
commits). A COMMIT that fails fails the whole batch with StoreError.

Processes that share the file (``workers: N``) hand the write lock to each other through a
``flock`` on ``<database>-writelock`` (daemon/store/sqlite_lock.py), taken before ``BEGIN
IMMEDIATE`` and dropped after ``COMMIT``/``ROLLBACK``: a waiting writer wakes as soon as the
other commits instead of sleeping in SQLite's busy handler. The wait for it and SQLite's own
wait share one bound, the connection's busy timeout.

**Short jobs run on the event loop's thread** (``submit(..., on_loop=True)``: an arrival, a
claim, an attempt's result, a release, a hold). The writer thread takes such a batch as any other
and lends it to the event loop its jobs came from. There, in one callback, the hand-off lock is
taken if it is free, ``BEGIN IMMEDIATE`` runs without waiting (between batches the connection's
busy timeout is 0) and the jobs run; the writer thread, waiting meanwhile, then COMMITs and
settles the batch. In the writer thread, each statement let go of the GIL and took it back while
the event loop was running Python: a job waited for the GIL several times and the two threads
handed it back and forth. Lent, a batch costs the writer thread a few hand-offs in all
(docs/benchmarks.md, twelfth session). The loop never waits for a lock or a long job:
- a batch with any job not marked so (a prune, a requeue, a cancel: any number of rows) or with
  jobs of several loops runs in the writer thread;
- when the hand-off lock is held by another process, or SQLite's write lock by another program,
  the loop hands the batch back and the writer thread waits, within the busy timeout, as before;
- a lent batch that held the loop longer than ``loop_budget`` (pages read from a slow disk)
  sends the batches of the next ``loop_pause`` seconds to the writer thread, a longer pause for
  each such batch in a row (LOOP_PAUSE below);
- a loop that has stopped before running its batch, or is closed, leaves it to the writer
  thread, which runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from daemon.errors import StoreError
from daemon.log import get_logger
from daemon.store.sqlite_lock import LockFile

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
log = get_logger("postbackd.store")

CommitHook = Callable[[int], None]  # called in the writer thread after each COMMIT: batch size


@dataclass
class _Pending(Generic[T]):
    job: Job[T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    # The caller's context: a planner that logs keeps the request's bound log context.
    context: contextvars.Context
    # Called on the event loop with whether the job committed, even when the caller stopped
    # waiting (a lease taken at insert is handed over or freed: daemon.store.base.LeaseAhead).
    after: Callable[[bool], None] | None = None
    on_loop: bool = False  # may run on `loop`'s thread, in a transaction lent to it


_STOP = object()

# A lent batch that held the event loop longer than LOOP_BUDGET seconds sends the batches of the
# next LOOP_PAUSE seconds to the writer thread (pages read from a slow disk, a huge claim); each
# further slow one in a row doubles the pause, up to LOOP_PAUSE_MAX, and one within the budget
# brings it back to LOOP_PAUSE. A loop held by slow batches is held less and less often.
LOOP_BUDGET = 0.05
LOOP_PAUSE = 1.0
LOOP_PAUSE_MAX = 60.0


Settled = tuple[asyncio.Future[Any], Any, BaseException | None, Callable[[bool], None] | None]
Outcome = tuple[Any, BaseException | None]  # a job's value, or what it raised
Lent = tuple[bool, list[Outcome]] | None  # what a lent batch hands back (GroupCommitWriter._lend)


class _Lent:
    """A batch lent to an event loop: `run` is called there once, or by the waiting writer
    thread if the loop stops before it has started (whichever takes it first runs it). The
    work is told which of the two runs it."""

    def __init__(self, work: Callable[[bool], Lent]) -> None:
        self._work = work
        self._taken = threading.Lock()  # held by whoever runs the work
        # Held until the work has run (released once, by whoever ran it): a one-shot event.
        # threading.Event would cost 3 us a batch, with a Condition of its own and the three
        # AttributeErrors its __init__ raises and drops asking a plain lock for RLock's
        # methods; a lock made held costs 0.15.
        self._done = threading.Lock()
        self._done.acquire()
        self._result: Lent = None
        self._error: BaseException | None = None

    def run(self, on_loop: bool = True) -> None:
        if not self._taken.acquire(blocking=False):
            return  # the writer thread ran it (the loop had stopped)
        try:
            self._result = self._work(on_loop)
        except Exception as err:  # raised in the writer thread, as if run there
            self._error = err
        except BaseException:  # KeyboardInterrupt, SystemExit: the batch fails, and it goes on
            self._error = StoreError("sqlite: the write transaction was interrupted")
            raise
        finally:
            self._done.release()

    def wait(self, loop: asyncio.AbstractEventLoop) -> Lent:
        while not self._done.acquire(timeout=0.5):
            if not loop.is_running():  # stopped: the callback may never run
                self.run(on_loop=False)
        if self._error is not None:
            raise self._error
        return self._result


def _settle(results: list[Settled]) -> None:
    for future, value, error, after in results:
        if after is not None:
            try:
                after(error is None)
            except Exception as err:  # the waiting caller still gets its own result
                log.error("store_after_commit_failed", error=f"{type(err).__name__}: {err}")
        if future.done():  # the caller gave up waiting (cancelled)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def store_error(err: sqlite3.Error) -> StoreError:
    """A StoreError that names the SQLite failure without the statement or its values."""
    error = StoreError(f"sqlite: {err.__class__.__name__}: {err}")
    error.__cause__ = err
    return error


def _batch_error(err: Exception) -> StoreError:
    if isinstance(err, sqlite3.Error):
        return store_error(err)
    error = StoreError(f"sqlite: the write transaction failed: {err.__class__.__name__}")
    error.__cause__ = err
    return error


class GroupCommitWriter:
    """The single writer thread of one SQLite database file."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        max_batch: int = 512,
        on_commit: CommitHook | None = None,
        handoff: bool = True,
        loop_budget: float = LOOP_BUDGET,
        loop_pause: float = LOOP_PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._handoff = handoff
        self._lock: LockFile | None = None
        self._busy_ms = 0  # the connection's busy timeout
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Pending[Any] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.commits = 0  # transactions committed, for tests and metrics
        self.reruns = 0  # batches run again with a savepoint per job (one of their jobs raised)
        self.lent = 0  # batches run on an event loop's thread
        self.paused = 0  # lent batches over loop_budget (each sent the next ones to the thread)
        self._loop_budget = loop_budget
        self._loop_pause = loop_pause
        self._pause = loop_pause  # the next pause (doubled by each slow lent batch in a row)
        self._clock = clock
        self._apart_until = 0.0  # the clock's time until which no batch is lent

    def start(self) -> None:
        """Open the connection in the writer thread; raise StoreError if that fails."""
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._queue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._thread.join()
            raise StoreError(f"sqlite: cannot open the database: {error}") from error

    def backlog(self) -> int:
        """Jobs waiting for the writer (not counting the batch it is running)."""
        return self._queue.qsize()

    def submit(
        self, job: Job[T], after: Callable[[bool], None] | None = None, *, on_loop: bool = False
    ) -> asyncio.Future[T]:
        """Queue `job`; the future resolves after the COMMIT that includes it, and `after`
        (committed or not) is called on the event loop just before, waited for or not.

        `on_loop`: `job` is short (a few statements on indexed rows) and may run on this event
        loop's thread, in the writer's transaction lent to it (the module's docstring)."""
        if self._closed or self._thread is None:
            raise StoreError("the store is not open")
        if not self._thread.is_alive():
            raise StoreError("sqlite: the writer thread has stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(job, future, loop, contextvars.copy_context(), after, on_loop))
        return future

    def stop(self) -> None:
        """Finish every queued job, then close the connection (blocking)."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as err:
            ready.put(err)
            return
        try:
            self._busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
            conn.execute("PRAGMA busy_timeout = 0")  # set for each BEGIN (_begin_within)
            if self._handoff:
                database = str(conn.execute("PRAGMA database_list").fetchone()[2])
                self._lock = LockFile.open(database)
        except sqlite3.Error as err:
            conn.close()
            ready.put(err)
            return
        ready.put(None)
        try:
            while True:
                batch, stop = self._take()
                if batch:
                    self._run_batch(conn, batch)
                if stop:
                    break
        finally:
            conn.close()
            if self._lock is not None:
                self._lock.close()

    @property
    def lock(self) -> LockFile | None:
        """The hand-off lock between processes (None: in-memory, off, or unavailable)."""
        return self._lock

    def _take(self) -> tuple[list[_Pending[Any]], bool]:
        batch: list[_Pending[Any]] = []
        item = self._queue.get()
        while item is not _STOP:
            assert isinstance(item, _Pending)
            batch.append(item)
            if len(batch) >= self._max_batch or self._queue.empty():
                # empty(), not get_nowait()'s queue.Empty: an exception made for every batch.
                # This thread alone takes from the queue, so what empty() saw stays there.
                return batch, False
            item = self._queue.get_nowait()
        return batch, True

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Pending[Any]]) -> None:
        outcomes: list[Outcome] = []
        lock = self._lock
        held = False
        try:
            loop = self._borrower(batch)
            lent = None if loop is None else self._lend(loop, conn, batch)
            if lent is None:  # this thread runs the batch
                held = self._begin(conn, lock)
                conn.execute("SAVEPOINT batch")
                outcomes = self._run_all(conn, batch)
            else:  # the loop ran it (its hand-off lock, if it took it, is released below)
                held, outcomes = lent
            conn.execute("COMMIT")
        except Exception as err:  # BEGIN, SAVEPOINT or COMMIT failed: the batch is lost
            self._rollback(conn)
            outcomes = [(None, _batch_error(err)) for _ in batch]
            committed = False
        else:
            self.commits += 1
            committed = True
        if held:
            assert lock is not None
            lock.release()
        if committed:
            self._commit_hook(len(batch))
        # One wake-up per event loop, not per request: waking a loop costs a syscall.
        by_loop: dict[asyncio.AbstractEventLoop, list[Settled]] = {}
        for pending, (value, error) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(pending.loop, []).append(
                (pending.future, value, error, pending.after)
            )
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, results)
            except RuntimeError:  # that event loop is closed: nobody is waiting
                continue

    def _begin(self, conn: sqlite3.Connection, lock: LockFile | None) -> bool:
        """BEGIN IMMEDIATE in this thread, waiting up to the busy timeout; whether the hand-off
        lock is held."""
        if lock is None:
            self._begin_within(conn, self._busy_ms)
            return False
        return self._begin_handed_off(conn, lock)

    def _begin_handed_off(self, conn: sqlite3.Connection, lock: LockFile) -> bool:
        """BEGIN IMMEDIATE after taking the hand-off lock; whether the lock is held (a wait
        that reached the busy timeout goes on without it). SQLite's own wait gets what is left
        of the busy timeout, so the two waits together stay within it."""
        start = time.monotonic()
        held = lock.acquire(self._busy_ms / 1000)
        waited_ms = int((time.monotonic() - start) * 1000)
        try:
            self._begin_within(conn, max(self._busy_ms - waited_ms, 0))
        except BaseException:
            if held:
                lock.release()
            raise
        return held

    @staticmethod
    def _begin_within(conn: sqlite3.Connection, busy_ms: int) -> None:
        """BEGIN IMMEDIATE, SQLite waiting up to `busy_ms` for its write lock. Between these
        the connection waits for nothing (busy_timeout 0): a BEGIN on the event loop's thread
        must never sleep there."""
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

    def _run_all(self, conn: sqlite3.Connection, batch: list[_Pending[Any]]) -> list[Outcome]:
        """Every job of the batch, in the open transaction: their outcomes (a job that raised
        fails alone), or the exception of one that ended the transaction."""
        outcomes, failure = self._run_jobs(conn, batch)
        if failure is not None:  # a job raised: every job again, each in its own savepoint
            if not conn.in_transaction:
                raise failure  # it took the transaction with it (SQLITE_FULL, I/O errors)
            self.reruns += 1
            conn.execute("ROLLBACK TO batch")
            outcomes = [self._run_job(conn, pending) for pending in batch]
        return outcomes

    def _borrower(self, batch: list[_Pending[Any]]) -> asyncio.AbstractEventLoop | None:
        """The event loop to lend this batch's transaction to: the one every job came from, if
        every job asked for it (and no lent batch was slow lately); None: the writer runs it."""
        loop = batch[0].loop
        for pending in batch:
            if not pending.on_loop or pending.loop is not loop:
                return None
        if self._clock() < self._apart_until:
            return None
        return loop

    def _lend(
        self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection, batch: list[_Pending[Any]]
    ) -> tuple[bool, list[Outcome]] | None:
        """The batch run on `loop`'s thread, this thread waiting: whether the loop took the
        hand-off lock, and the outcomes (or what ended the transaction, raised). None: the loop
        could not BEGIN at once (the hand-off lock or SQLite's write lock is held by another
        process, or the loop is closed): then this thread runs the batch, and may wait."""
        lock = self._lock

        def work(on_loop: bool) -> tuple[bool, list[Outcome]] | None:
            held = lock if lock is not None and lock.try_acquire() else None
            if lock is not None and held is None:
                return None
            start = self._clock()
            try:
                try:
                    conn.execute("BEGIN IMMEDIATE")  # busy_timeout 0: it never waits
                except sqlite3.OperationalError as err:
                    if err.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                        raise
                    if held is not None:
                        held.release()
                    return None
                if on_loop:
                    self.lent += 1  # begun there: a batch run on the loop, whatever follows
                conn.execute("SAVEPOINT batch")
                return held is not None, self._run_all(conn, batch)
            except BaseException:
                if held is not None:
                    held.release()
                raise
            finally:
                if on_loop:
                    self._timed(start, self._clock())

        lent = _Lent(work)
        try:
            loop.call_soon_threadsafe(lent.run)
        except RuntimeError:  # that loop is closed
            return None
        return lent.wait(loop)

    def _timed(self, start: float, end: float) -> None:
        """A lent batch ran from `start` to `end`: over the budget, no batch is lent for the
        pause, and the next pause is twice as long."""
        if end - start > self._loop_budget:
            self.paused += 1
            if self._pause == self._loop_pause:  # the first of a run of slow batches
                log.info(
                    "store_writes_slow",
                    duration_ms=round((end - start) * 1000),
                    next_in_s=self._pause,
                )
            self._apart_until = end + self._pause
            self._pause = min(self._pause * 2, max(LOOP_PAUSE_MAX, self._loop_pause))
        else:
            self._pause = self._loop_pause

    def _commit_hook(self, size: int) -> None:
        if self._on_commit is None:
            return
        # An observer must not stop the writer thread.
        with contextlib.suppress(Exception):
            self._on_commit(size)

    @staticmethod
    def _run_jobs(
        conn: sqlite3.Connection, batch: list[_Pending[Any]]
    ) -> tuple[list[Outcome], Exception | None]:
        """Every job of the batch without savepoints: their outcomes, or the error of the first
        that raised (what the jobs before it wrote is still in the transaction)."""
        outcomes: list[Outcome] = []
        append = outcomes.append
        try:
            for pending in batch:
                append((pending.context.run(pending.job, conn), None))
        except Exception as err:
            return outcomes, err
        return outcomes, None

    @staticmethod
    def _run_job(conn: sqlite3.Connection, pending: _Pending[Any]) -> Outcome:
        conn.execute("SAVEPOINT job")
        try:
            value = pending.context.run(pending.job, conn)
        except Exception as err:
            # Rolling back to the savepoint undoes this job alone; if that fails too, the
            # sqlite3.Error propagates and the whole batch fails.
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            return None, store_error(err) if isinstance(err, sqlite3.Error) else err
        conn.execute("RELEASE job")
        return value, None

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # If this fails SQLite has already rolled back (or the handle is unusable); the
            # next BEGIN reports it.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
