"""The daemon's log output: the lines of one turn of the event loop written together.

A webhook logs one line and a delivery another; written one write() each, they were a system
call per line on the event loop's thread (with PYTHONUNBUFFERED=1, the systemd unit's, and
because structlog's WriteLogger flushes every line), and each one let the SQLite writer thread
take the GIL, so that the event loop then waited to get it back. `TurnFlushed` keeps the lines
written on the thread of a running event loop and writes them when the loop has run what it had
to run in that turn (a callback it runs next: call_soon), in as few write()s as whole lines
allow, each at most PIPE_BUF bytes, so that processes sharing stdout (`workers`, the dispatch
process) still never glue each other's lines (a pipe write of at most PIPE_BUF is atomic).

A line written from any other thread, or where no loop runs, is written at once, after what is
kept. What is kept is written before the process forks, at exit (atexit), and by
`flush_all()`, which daemon.workers.run_loop calls when its loop ends (a worker ends with
os._exit, without atexit). What a SIGKILL can lose is the lines of the turn it interrupts
(written by the daemon within the same millisecond or so), never a delivery or an attempt:
those are the store's.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import select
import threading
import weakref
from typing import TextIO

# Every stream alive (the daemon makes one, in daemon.cli.run): flush_all() writes what they keep.
_STREAMS: weakref.WeakSet[TurnFlushed] = weakref.WeakSet()

# The most one write() carries: POSIX makes a pipe write of at most PIPE_BUF bytes atomic.
CHUNK = getattr(select, "PIPE_BUF", 4096)


class TurnFlushed:
    """A text stream for structlog's WriteLogger (write, then flush, per line) over `out`."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        try:
            self._fd: int | None = out.fileno()
        except (AttributeError, OSError, ValueError):  # a StringIO, a closed or odd stream
            self._fd = None
        self._lines: list[str] = []
        # The loop whose next turn writes what is kept (None: no write is pending on a loop).
        self._pending_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        _STREAMS.add(self)

    def isatty(self) -> bool:
        return self._out.isatty()

    def fileno(self) -> int:
        return self._out.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            self._lines.append(text)
        return len(text)

    def line(self, message: str | None) -> None:
        """`message` and its newline as one line (None: none), then flush(): in one call."""
        if message is not None:
            with self._lock:
                self._lines.append(message + "\n")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_now()
            return
        if self._pending_on is not loop:  # (a loop that stopped before its turn ended: not it)
            self._pending_on = loop
            loop.call_soon(self._turn_ended)

    def flush(self) -> None:
        """The end of one line: written when the loop's turn ends (on a running loop's own
        thread), else now."""
        self.line(None)

    def _turn_ended(self) -> None:
        self._pending_on = None
        self.flush_now()

    def flush_now(self) -> None:
        """Write every line kept (whole lines, at most CHUNK bytes per write when it can)."""
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            if self._fd is None:
                self._out.write("".join(lines))
                self._out.flush()
            else:
                self._out.flush()  # anything written to the stream around us goes first
                for chunk in _chunks(lines):
                    _write_all(self._fd, chunk)
        except (OSError, ValueError):
            # stdout is gone (closed pipe, journald restarted): as print() would, the lines are
            # lost and the daemon goes on; delivery does not depend on its log.
            return


class LineLogger:
    """structlog's WriteLogger (one line per event, whatever its level) over a TurnFlushed
    stream, without WriteLogger's lock and its write and flush calls: the stream keeps each
    line whole under its own lock (TurnFlushed.line)."""

    def __init__(self, stream: TurnFlushed) -> None:
        self._line = stream.line

    def msg(self, message: str) -> None:
        self._line(message)

    log = debug = info = warn = warning = err = error = critical = exception = failure = msg
    fatal = msg


def flush_all() -> None:
    """Write what every stream keeps (an event loop has ended: its next turn never comes; the
    process forks or exits)."""
    for stream in list(_STREAMS):
        stream.flush_now()


atexit.register(flush_all)
os.register_at_fork(before=flush_all)


def _chunks(lines: list[str]) -> list[bytes]:
    """The lines encoded and joined into pieces of whole lines of at most CHUNK bytes (a longer
    line alone in its piece, as it was written before)."""
    pieces: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8", "backslashreplace")
        if current and size + len(data) > CHUNK:
            pieces.append(b"".join(current))
            current, size = [], 0
        current.append(data)
        size += len(data)
    if current:
        pieces.append(b"".join(current))
    return pieces


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            # a non-blocking stdout that is full: wait until it takes more (as a blocking
            # write would), rather than drop the rest of the lines
            select.select([], [fd], [])
            continue
        view = view[written:]
