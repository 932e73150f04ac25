"""The systemd notify protocol: readiness, reload, stop and watchdog datagrams to NOTIFY_SOCKET.

The protocol is one unix datagram per message, newline-separated ``KEY=value`` lines, sent to
the socket named by ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract
namespace). See sd_notify(3). No library is needed and none is used.

Sending never raises into the daemon: a failure is logged once as ``notify_failed`` (and once
as ``notify_recovered`` when a later send works again) and the daemon carries on, because a
missing supervisor must never take the service down.

The watchdog pinger runs as a task on the daemon's own event loop on purpose: when the loop is
blocked the pings stop, and systemd restarts a daemon that no longer serves requests. Its
`gate` (set by daemon.app) names the supervised loops that have made no progress within their
interval: while it names any, no ping is sent (``watchdog_withheld``, logged once, and
``watchdog_resumed``), so systemd restarts a process whose loop is alive but a part is wedged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping

import structlog

from daemon import logout

_LOGGER = "postbackd.notify"

# A send waits at most this long when systemd's queue is full. Dropping READY=1 would make the
# start time out and the unit fail, so a short bounded wait is the lesser harm.
_SEND_TIMEOUT = 0.5


def _positive_int(text: str | None) -> int | None:
    """`text` as a positive integer, or None when absent or not one (sd_notify ignores those)."""
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _one_line(text: str) -> str:
    """A STATUS= value on one line: a newline would start a new assignment in the datagram."""
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify messages for one process; every method is a no-op outside systemd."""

    def __init__(
        self,
        socket_path: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        # Only absolute paths and abstract names are valid targets (sd_notify(3)); anything else
        # (empty, relative, vsock:) is treated as "not supervised".
        self._address: str | None = None
        if socket_path and socket_path[0] in "/@":
            self._address = "\0" + socket_path[1:] if socket_path[0] == "@" else socket_path
        # WATCHDOG_PID names the process systemd expects pings from; another process (a child
        # that inherited the environment) must not ping on its behalf.
        pid_matches = watchdog_pid is None or watchdog_pid == os.getpid()
        usec = watchdog_usec if watchdog_usec is not None and watchdog_usec > 0 else None
        self._watchdog_usec = usec if pid_matches and self._address is not None else None
        self._failing = False
        # The parts that have stopped making progress (daemon.supervise); None: no gate yet.
        self.gate: Callable[[], Collection[str]] | None = None
        self._withheld = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier configured from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        pid_text = environ.get("WATCHDOG_PID")
        watchdog_pid = _positive_int(pid_text)
        if pid_text is not None and watchdog_pid is None:
            # A WATCHDOG_PID we cannot read cannot be ours: do not ping.
            return cls(environ.get("NOTIFY_SOCKET"), watchdog_usec=None)
        return cls(
            environ.get("NOTIFY_SOCKET"),
            watchdog_usec=_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=watchdog_pid,
        )

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured (the process runs under systemd)."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up (or a reload) has finished: READY=1, with an optional STATUS."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        self._send(lines)

    def reloading(self) -> None:
        """Tell systemd a reload has begun; READY=1 ends it. Type=notify-reload needs the time."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}"])

    def stopping(self) -> None:
        """Tell systemd the daemon is shutting down."""
        self._send(["STOPPING=1"])

    def status(self, text: str) -> None:
        """Set the free-form status line `systemctl status` shows."""
        self._send([f"STATUS={_one_line(text)}"])

    def watchdog(self) -> None:
        """Ping the watchdog; does nothing when no watchdog is armed for this process."""
        if self._watchdog_usec is not None:
            self._send(["WATCHDOG=1"])

    async def run_watchdog(self) -> None:
        """Ping every `watchdog_interval` from this event loop until cancelled.

        Returns at once when there is no watchdog. The sleep is on the loop, so a blocked loop
        sends nothing and systemd's watchdog fires, which is the point.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if self._gate_open():
                self.watchdog()
            await asyncio.sleep(interval)

    def _gate_open(self) -> bool:
        stalled = sorted(self.gate()) if self.gate is not None else []
        log = structlog.get_logger(_LOGGER)
        if stalled and not self._withheld:
            log.error("watchdog_withheld", loops=stalled)
        elif not stalled and self._withheld:
            log.info("watchdog_resumed")
        self._withheld = bool(stalled)
        return not stalled

    def _send(self, lines: list[str]) -> None:
        if self._address is None:
            return
        # What was logged before a change of state reaches the journal before it (the lines of
        # an event-loop turn are otherwise written when the turn ends: daemon.logout).
        logout.flush_all()
        datagram = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT)
                sock.sendto(datagram, self._address)
        except OSError as err:
            self._note_failure(lines[0].partition("=")[0], err)
            return
        if self._failing:
            self._failing = False
            structlog.get_logger(_LOGGER).info("notify_recovered", state=lines[0].partition("=")[0])

    def _note_failure(self, state: str, err: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        # Looked up per call (rare: only on a change of state) so that a logging set-up made
        # after import, or structlog's capture_logs in tests, applies.
        structlog.get_logger(_LOGGER).warning(
            "notify_failed",
            state=state,
            error=type(err).__name__,
            errno=err.errno,
            socket=self._address.replace("\0", "@") if self._address else None,
        )
