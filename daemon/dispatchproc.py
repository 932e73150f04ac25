"""The dispatcher in a process of its own (settings `dispatcher_process: true`).

`postbackd run` then forks, beside the serving process(es) (daemon.workers), one dispatch
process: the same store, rules (SIGHUP, the watcher), outbound HTTP, destinations and breakers,
and no public listener. The serving processes run no dispatcher. The two sides talk through
two Unix sockets in the parent's private folder (mode 0700, removed at exit):

- ``dispatcher-wake.sock``, a datagram socket the dispatch process reads: after a serving
  process commits an arrival with deliveries (or requeues one), it sends one byte, at most one
  per turn of its event loop, never waiting (a full queue or an absent reader drops it). A lost
  wake-up costs at most the dispatcher's poll interval (1 s), never a delivery: the deliveries
  are in the store, and the dispatcher claims what is due on every poll.
- ``dispatcher.sock``, a stream socket with a small HTTP server of the dispatch process:
  ``GET /state`` (its readiness: loops, store, destinations down, in JSON) for the serving
  processes' ``/readyz`` and console, and ``GET /metrics`` (its Prometheus registry: attempts,
  durations, breaker states, ``postbackd_loop_up{loop="dispatcher"}``...), which the serving
  processes proxy at ``/metrics/dispatcher``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp

from daemon.log import get_logger

log = get_logger("postbackd.dispatchproc")

WAKE_SOCKET = "dispatcher-wake.sock"
CONTROL_SOCKET = "dispatcher.sock"
# /readyz and the console ask the dispatch process within this; no answer is "unreachable".
STATE_TIMEOUT = 1.0
# A scrape of /metrics/dispatcher: the dispatch process reads its queue depth from the store
# within daemon.metrics.DEPTH_TIMEOUT (5 s) and answers with the last one after that.
METRICS_TIMEOUT = 8.0
_BASE = "http://dispatcher"  # the host is not used: the connector's Unix socket is


class WakeSender:
    """The serving side of the wake-up: one datagram per event loop turn at most."""

    def __init__(self, folder: Path) -> None:
        self._path = str(folder / WAKE_SOCKET)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._pending = False

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = False
        # Full (the reader is behind: it is awake anyway), absent or refused (not started yet,
        # or gone: the parent stops the unit): the dispatcher's poll finds the deliveries.
        with contextlib.suppress(OSError):
            self._sock.sendto(b"w", self._path)

    def close(self) -> None:
        self._sock.close()


class WakeReceiver:
    """The dispatch process's side: every datagram (drained in one go) wakes the dispatcher."""

    def __init__(self, folder: Path, wake: Any) -> None:
        self._path = folder / WAKE_SOCKET
        self._wake = wake
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # left by a dispatch process that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._path))
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                self._sock.recv(64)
            except OSError:  # drained (BlockingIOError), or the socket failed: wake anyway
                break
        self._wake()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(OSError):
            self._path.unlink()


class DispatcherLink:
    """What a serving process knows of the dispatch process: wake it, ask its state and its
    metrics. The HTTP session is made on first use (on the serving process's loop)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._waker = WakeSender(folder)
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        self._waker.wake()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.folder / CONTROL_SOCKET))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def state(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the dispatch process's state, None), or (None, why it could not be had)."""
        raw, problem = await self._get("/state", STATE_TIMEOUT)
        if raw is None:
            return None, problem
        try:
            body = json.loads(raw)
        except ValueError as err:
            return None, f"unreachable ({err.__class__.__name__})"
        if not isinstance(body, dict):
            return None, "malformed answer"
        return body, None

    async def metrics(self) -> tuple[bytes | None, str | None]:
        """(the dispatch process's metrics text, None), or (None, why it could not be had)."""
        return await self._get("/metrics", METRICS_TIMEOUT)

    async def _get(self, path: str, within: float) -> tuple[bytes | None, str | None]:
        """The body of a 200 answer to GET `path` within `within` seconds, or (None, why not)."""
        try:
            async with asyncio.timeout(within):
                async with self._client().get(f"{_BASE}{path}") as resp:
                    if resp.status != 200:
                        return None, f"answered {resp.status}"
                    return await resp.read(), None
        except TimeoutError:
            return None, f"no answer within {within:g} s"
        except (aiohttp.ClientError, OSError) as err:
            return None, f"unreachable ({err.__class__.__name__})"

    async def close(self) -> None:
        self._waker.close()
        if self._session is not None:
            await self._session.close()
