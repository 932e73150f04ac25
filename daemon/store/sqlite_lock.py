"""The write hand-off between processes that share one SQLite file (``workers: N``).

SQLite's own write lock is taken with ``BEGIN IMMEDIATE``; a process that finds it taken waits
in SQLite's busy handler, which *sleeps* (1, 2, 5, 10, 15, 20, 25 ... ms) between tries: the
holder commits, takes its next batch and locks again before the sleeper looks, so one worker
starves while the other runs, and a wait costs tens of milliseconds. Each group-commit writer
therefore takes an exclusive BSD lock (``flock``) on a lock file beside the database before
``BEGIN IMMEDIATE`` and drops it after ``COMMIT``/``ROLLBACK``; a writer blocked in ``flock``
is woken by the kernel as soon as the holder unlocks.

The lock file is ``<database>-writelock``, mode 0600, created if missing (owned by the
database's owner when the daemon runs as root, as SQLite does for ``-wal``/``-shm``). It holds
no data. ``flock`` and not a POSIX ``fcntl`` lock: POSIX locks belong to the process and
closing any descriptor of the file drops all of them, which would break SQLite's own locking
(on the database) and our lock (in another thread of the same process).

This lock is an aid to fairness and latency, never to correctness: SQLite's lock still guards
every transaction. So:

- an in-memory database has no lock file (``LockFile.open`` returns None);
- a lock file that cannot be opened or created (read-only directory, another user's file)
  means today's behaviour (SQLite's busy handler alone) with one warning line
  (``sqlite_write_lock_unavailable``);
- another program that holds SQLite's lock (the sqlite3 shell, a backup) does not know about
  this file; the writer that holds the file lock then waits for it in SQLite's busy handler,
  as before;
- a wait for the file lock is bounded (``acquire(timeout)``): the caller then goes on with
  whatever time is left of its busy timeout, and SQLite reports a lock still held as it always
  did ("database is locked");
- a process that dies (even SIGKILL) drops its lock: the kernel releases a ``flock`` when the
  last descriptor of the open file goes away.

Waiting without a timeout is a blocking ``flock`` (which releases the GIL and wakes at once);
to bound it, the blocking call runs in a small waiter thread of the lock while the writer
thread waits for it with a timeout. A wait that times out leaves the waiter's request standing:
the next ``acquire`` takes it over, and if nobody wants it any more when it is granted, the
waiter unlocks at once. The uncontended path is one non-blocking ``flock`` call in the writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

from daemon.log import get_logger

log = get_logger("postbackd.store")

SUFFIX = "-writelock"


def lock_path(database: str) -> Path | None:
    """The lock file of a database file name (None for an in-memory or temporary database)."""
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database + SUFFIX)


class LockFile:
    """An exclusive ``flock`` on one lock file, taken and dropped by one writer thread."""

    def __init__(self, fd: int, path: Path) -> None:
        self.path = path
        self._fd = fd
        self._mutex = threading.Lock()
        self._granted = threading.Event()  # set by the waiter thread when it holds the lock
        self._wanted = False  # a caller is waiting for (or will take over) the waiter's lock
        self._pending = False  # the waiter thread is in a blocking flock
        self._request = threading.Condition(self._mutex)
        self._closed = False
        self._broken = False  # a flock call failed: the lock is no longer used
        self._waiter: threading.Thread | None = None
        self.contended = 0  # acquisitions that had to wait, for tests and benchmarks
        self.timeouts = 0  # waits that ended at their bound

    @classmethod
    def open(cls, database: str) -> LockFile | None:
        """The lock file beside `database`, or None: in-memory, or it cannot be opened (then
        one warning line, and the writer runs as it did without the hand-off)."""
        path = lock_path(database)
        if path is None:
            return None
        try:
            fd = _open(path, database)
        except OSError as err:
            _unavailable(path, err)
            return None
        return cls(fd, path)

    def acquire(self, timeout: float) -> bool:
        """Take the lock within `timeout` seconds; False if it stayed held that long (or the
        lock file failed: then at once)."""
        with self._mutex:
            if self._broken:
                return False
            if self._pending:  # an earlier wait timed out: its request still stands
                self._wanted = True
            else:
                taken = self._flock_now()
                if taken is not None:
                    return taken
                self._wanted = True
                self._pending = True
                self._granted.clear()
                self._start_waiter()
                self._request.notify()
        self.contended += 1
        got = self._granted.wait(timeout)
        with self._mutex:
            self._wanted = False  # if granted later, the waiter unlocks at once
            granted = got or self._granted.is_set()
            self._granted.clear()
            if not granted:
                self.timeouts += 1
            # A waiter whose flock failed sets `granted` to wake us; the lock is then disabled.
            return granted and not self._broken

    def try_acquire(self) -> bool:
        """Take the lock if it is free now, without waiting (False: held elsewhere, a wait of
        acquire() still stands, or the lock file failed)."""
        with self._mutex:
            if self._broken or self._pending:
                return False
            return self._flock_now() is True

    def _flock_now(self) -> bool | None:
        """The lock without waiting (the mutex held): True if taken, None if held elsewhere,
        False if the flock failed (the lock is then disabled)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        except OSError as err:
            self._disable(err)
            return False
        return True

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as err:
            with self._mutex:
                self._disable(err)

    def close(self) -> None:
        """Stop the waiter thread and close the file (which drops a lock still held)."""
        with self._mutex:
            self._closed = True
            self._request.notify()
            waiter, pending = self._waiter, self._pending
        if pending:  # the waiter is blocked in flock: it closes the file when that returns
            return
        if waiter is not None:
            waiter.join()
        self._close_fd()

    def _close_fd(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _disable(self, err: OSError) -> None:
        """A flock call failed: from now on the writer goes without (one warning line)."""
        if not self._broken:
            self._broken = True
            _unavailable(self.path, err)

    def _start_waiter(self) -> None:
        if self._waiter is None:
            self._waiter = threading.Thread(
                target=self._wait_loop, name="sqlite-writelock", daemon=True
            )
            self._waiter.start()

    def _wait_loop(self) -> None:
        while True:
            with self._mutex:
                while not self._pending and not self._closed:
                    self._request.wait()
                if self._closed and not self._pending:
                    return
            error: OSError | None = None
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocking; releases the GIL
            except OSError as err:
                error = err
            with self._mutex:
                self._pending = False
                if self._closed:
                    self._close_fd()  # drops the lock
                    return
                if error is not None:
                    self._disable(error)
                    self._granted.set()  # wakes the caller, which finds the lock disabled
                    return
                if self._wanted:
                    self._granted.set()
                else:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


def _unavailable(path: Path, err: OSError) -> None:
    log.warning(
        "sqlite_write_lock_unavailable",
        path=str(path),
        error=f"{err.__class__.__name__}: {os.strerror(err.errno) if err.errno else err}",
        effect="processes sharing this database wait in SQLite's busy handler",
    )


def _open(path: Path, database: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        # An existing lock file in a read-only directory (or opened read-only by design): a
        # flock needs no write access.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if os.geteuid() == 0:
            owner = os.stat(database)
            if os.fstat(fd).st_uid != owner.st_uid:
                os.fchown(fd, owner.st_uid, owner.st_gid)
    except OSError:
        os.close(fd)
        raise
    return fd
