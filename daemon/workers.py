"""Several worker processes behind one listening port (settings `workers`), and the event loop.

With ``workers: N`` above 1, `postbackd run` forks N workers before any event loop or thread
exists. Each worker is a whole node (store connection, dispatcher, reloader, HTTP server) that
binds the port with SO_REUSEPORT, so the kernel spreads connections over them; its node name
is ``host:port/wI``, so each dispatcher's claims are its own (recovered by the same worker
after a restart). The parent only supervises:

- signals: SIGTERM and SIGINT are passed to every worker (each stops gracefully), SIGHUP too
  (each reloads its rules);
- a worker that exits while the parent is not stopping stops the others, and the parent exits
  with status 1 (systemd's Restart= brings the whole unit back: no half-sized node);
- systemd notify: workers send their READY/WATCHDOG/STATUS datagrams to a relay socket of the
  parent (one per worker, in a private temporary folder); the parent sends READY=1 once every
  worker is ready and WATCHDOG=1 only when every worker has pinged since its last ping, so a
  worker whose loop is stuck still trips the unit's watchdog.

With ``dispatcher_process: true`` (daemon/dispatchproc.py) the parent also forks one dispatch
process, supervised like a worker (its death stops the unit with exit 1; READY waits for it; the
watchdog waits for its pings; signals are passed to it); the serving processes then run no
dispatcher. The parent's private folder holds the relay sockets and the dispatch process's two
sockets (wake-up and state); it is removed when the parent exits.

`loop_factory` picks the event loop: asyncio's (the default), uvloop, or uvloop when it is
installed (``event_loop: auto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import functools
import gc
import os
import select
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import logout
from daemon.errors import ConfigError
from daemon.log import get_logger
from daemon.notify import Notifier

log = get_logger("postbackd.workers")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
_TICK = 0.5  # the parent's wake-up interval (reaping, forwarding)
_STOP_WAIT = 60.0  # after SIGTERM, how long workers get before SIGKILL (each has its own grace)


def loop_factory(choice: str) -> LoopFactory | None:
    """uvloop's loop factory, or None for asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as err:
        if choice == "uvloop":
            raise ConfigError("event_loop: uvloop is not installed") from err
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


# The cyclic collector's thresholds while a daemon's loop runs (CPython's default: 700, 10, 10).
# A request allocates a few hundred container objects that reference counting frees when it
# ends; the collector only walks those still alive when it runs, which is about the requests in
# flight, whatever the threshold. So a young generation 30 times larger walks much the same
# objects 30 times less often (issue 17: 2 to 5 % of the CPU per conversion end to end, 3 to 10 %
# for ingest; docs/benchmarks.md). Cyclic garbage waits a little longer to be freed: at most
# the allocations between two collections. The rule set is out of the collector's sight anyway
# (daemon.reload.settle_memory freezes it).
GC_THRESHOLDS = (20_000, 20, 20)


def run_loop(main: Callable[[], Coroutine[Any, Any, None]], factory: LoopFactory | None) -> None:
    """Run the coroutine `main()` returns on a new loop made by `factory` (asyncio's if None),
    with the collector's thresholds at GC_THRESHOLDS; then write the log lines its last turn
    kept (daemon.logout) and put the thresholds back.

    The thread's decimal context is made first, in the context the loop's tasks copy: decimal
    keeps it in a context variable, so each request's task, a copy where it was not set yet,
    made a context of its own (with its two signal dicts) at its first Decimal, 0.24 us a
    request. They now share this one, which nothing changes (no precision or trap is set)."""
    decimal.getcontext()
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        gc.set_threshold(*thresholds)
        logout.flush_all()


def worker_node(base: str, index: int | None) -> str:
    return base if index is None else f"{base}/w{index}"


DISPATCHER = -1  # the index of the dispatch process among the parent's children


@dataclass
class _Worker:
    index: int  # DISPATCHER for the dispatch process
    pid: int
    relay: socket.socket
    ready: bool = False
    pinged: bool = False
    exit_status: int | None = None


@dataclass
class _Relay:
    """What the parent tells systemd, derived from what its workers told it."""

    notifier: Notifier
    all_ready: bool = False
    last_ping: float = field(default_factory=time.monotonic)

    def update(self, workers: list[_Worker]) -> None:
        ready = all(w.ready for w in workers)
        if ready and not self.all_ready:
            serving = sum(1 for w in workers if w.index != DISPATCHER)
            extra = " and the dispatch process" if serving < len(workers) else ""
            self.notifier.ready(f"{serving} workers{extra} ready")
        self.all_ready = ready
        interval = self.notifier.watchdog_interval
        if interval is not None and all(w.pinged for w in workers):
            self.notifier.watchdog()
            for w in workers:
                w.pinged = False


def _child_environ(environ: Mapping[str, str], relay_path: str, notifier: Notifier) -> None:
    """Point the worker's sd_notify at the parent's relay socket (in os.environ: the worker
    reads it when it builds its Notifier)."""
    os.environ["NOTIFY_SOCKET"] = relay_path
    os.environ.pop("WATCHDOG_PID", None)
    usec = environ.get("WATCHDOG_USEC")
    if notifier.watchdog_interval is None or usec is None:
        os.environ.pop("WATCHDOG_USEC", None)


def run_workers(
    count: int,
    serve_one: Callable[[int, Path], int],
    environ: Mapping[str, str],
    dispatcher: Callable[[Path], int] | None = None,
) -> int:
    """Fork `count` workers, each running serve_one(index, folder) (its exit status), and with
    `dispatcher` one dispatch process running dispatcher(folder); `folder` is the parent's
    private one (mode 0700). Supervise them until they have all exited. The parent's exit
    status."""
    notifier = Notifier.from_environ(environ)
    relay = _Relay(notifier)
    workers: list[_Worker] = []
    stopping = False
    with tempfile.TemporaryDirectory(prefix="postbackd-notify-") as tmp:
        folder = Path(tmp)
        roles: list[tuple[int, Callable[[], int]]] = []
        if dispatcher is not None:
            roles.append((DISPATCHER, functools.partial(dispatcher, folder)))
        roles += [(i, functools.partial(serve_one, i, folder)) for i in range(count)]
        # SIGHUP's default action ends a process. Ignored from here until the parent's `forward`
        # below and each child's own handler (installed when its loop starts) take it over: a
        # reload asked during the start is then not a dead worker (and a stopped unit); a child
        # loads the rules as they are when it starts anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for index, main in roles:
            path = str(folder / (f"w{index}.sock" if index != DISPATCHER else "d.sock"))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setblocking(False)
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the parent's code
                status = 1
                try:
                    for other in workers:
                        other.relay.close()
                    sock.close()
                    _child_environ(environ, path, notifier)
                    status = main()
                finally:
                    os._exit(status)
            workers.append(_Worker(index, pid, sock))
        serving = [w.pid for w in workers if w.index != DISPATCHER]
        log.info("workers_started", count=count, pids=serving)
        if dispatcher is not None:
            log.info("dispatcher_process_started", pid=workers[0].pid)

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
            for w in workers:
                if w.exit_status is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        failed = False
        stop_deadline: float | None = None
        while any(w.exit_status is None for w in workers):
            _read_relays(workers, relay)
            for w in workers:
                if w.exit_status is None:
                    done, status = os.waitpid(w.pid, os.WNOHANG)
                    if done:
                        w.exit_status = os.waitstatus_to_exitcode(status)
                        if not stopping:
                            if w.index == DISPATCHER:
                                log.error("dispatcher_process_exited", status=w.exit_status)
                            else:
                                log.error("worker_exited", worker=w.index, status=w.exit_status)
                            failed = stopping = True
                            forward(signal.SIGTERM, None)
            if stopping and stop_deadline is None:
                notifier.stopping()
                stop_deadline = time.monotonic() + _STOP_WAIT
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                for w in workers:
                    if w.exit_status is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
        for w in workers:
            w.relay.close()
    if failed or any(w.exit_status for w in workers):
        return 1
    return 0


def _read_relays(workers: list[_Worker], relay: _Relay) -> None:
    """Wait up to a tick for datagrams from the workers, and apply them."""
    socks = {w.relay: w for w in workers if w.exit_status is None}
    if not socks:
        return
    try:
        readable, _, _ = select.select(list(socks), [], [], _TICK)
    except InterruptedError:  # a signal: the caller's loop runs again
        return
    for sock in readable:
        w = socks[sock]
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            for line in data.decode("utf-8", "replace").splitlines():
                if line == "READY=1":
                    w.ready = True
                elif line == "WATCHDOG=1":
                    w.pinged = True
                elif line == "STOPPING=1":
                    w.ready = False
                elif line.startswith("STATUS=") and w.index == 0:
                    relay.notifier.status(line.removeprefix("STATUS="))
    relay.update(workers)
