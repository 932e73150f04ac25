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

import structlog

from daemon.errors import StoreError
from daemon.store.sqlite_lock import LockFile

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
log = structlog.get_logger("postbackd.store")

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


_STOP = object()


Settled = tuple[asyncio.Future[Any], Any, BaseException | None, Callable[[bool], None] | None]


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

    def submit(self, job: Job[T], after: Callable[[bool], None] | None = None) -> asyncio.Future[T]:
        """Queue `job`; the future resolves after the COMMIT that includes it, and `after`
        (committed or not) is called on the event loop just before, waited for or not."""
        if self._closed or self._thread is None:
            raise StoreError("the store is not open")
        if not self._thread.is_alive():
            raise StoreError("sqlite: the writer thread has stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(job, future, loop, contextvars.copy_context(), after))
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
            if len(batch) >= self._max_batch:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Pending[Any]]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        lock = self._lock
        held = False
        try:
            if lock is None:
                conn.execute("BEGIN IMMEDIATE")
            else:
                held = self._begin_handed_off(conn, lock)
            conn.execute("SAVEPOINT batch")
            outcomes, failure = self._run_jobs(conn, batch)
            if failure is not None:  # a job raised: every job again, each in its own savepoint
                if not conn.in_transaction:
                    raise failure  # it took the transaction with it (SQLITE_FULL, I/O errors)
                self.reruns += 1
                conn.execute("ROLLBACK TO batch")
                outcomes = [self._run_job(conn, pending) for pending in batch]
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

    def _begin_handed_off(self, conn: sqlite3.Connection, lock: LockFile) -> bool:
        """BEGIN IMMEDIATE after taking the hand-off lock; whether the lock is held (a wait
        that reached the busy timeout goes on without it). SQLite's own wait gets what is left
        of the busy timeout, so the two waits together stay within it."""
        start = time.monotonic()
        held = lock.acquire(self._busy_ms / 1000)
        waited_ms = int((time.monotonic() - start) * 1000)
        try:
            if waited_ms < 1:
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute(f"PRAGMA busy_timeout = {max(self._busy_ms - waited_ms, 0)}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                finally:
                    conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        except BaseException:
            if held:
                lock.release()
            raise
        return held

    def _commit_hook(self, size: int) -> None:
        if self._on_commit is None:
            return
        # An observer must not stop the writer thread.
        with contextlib.suppress(Exception):
            self._on_commit(size)

    @staticmethod
    def _run_jobs(
        conn: sqlite3.Connection, batch: list[_Pending[Any]]
    ) -> tuple[list[tuple[Any, BaseException | None]], Exception | None]:
        """Every job of the batch without savepoints: their outcomes, or the error of the first
        that raised (what the jobs before it wrote is still in the transaction)."""
        outcomes: list[tuple[Any, BaseException | None]] = []
        append = outcomes.append
        try:
            for pending in batch:
                append((pending.context.run(pending.job, conn), None))
        except Exception as err:
            return outcomes, err
        return outcomes, None

    @staticmethod
    def _run_job(
        conn: sqlite3.Connection, pending: _Pending[Any]
    ) -> tuple[Any, BaseException | None]:
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
