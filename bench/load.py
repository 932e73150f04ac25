"""The load generator: an asyncio aiohttp client, closed loop (N connections, each sending its
next request when the previous one is answered) or open loop (a fixed rate, whatever the
answers)."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

UrlFor = Callable[[int], str]  # request number -> URL


class Gate(Protocol):
    """Holds senders back (e.g. while too much is still undelivered)."""

    async def before(self) -> None: ...

    def after(self, ok: bool) -> None: ...


@dataclass
class Outcome:
    """What one run of the generator saw. Times are time.monotonic()."""

    ok: int = 0  # answered 200
    total: int = 0  # every request answered or failed, warm-up included
    errors: int = 0  # any other status, or no answer
    seconds: float = 0.0  # the measured window
    acked: dict[int, float] = field(default_factory=dict)  # request number -> answer time
    started: float = 0.0
    intended: dict[int, float] = field(default_factory=dict)  # open loop: planned send time
    lag: list[float] = field(default_factory=list)  # open loop: actual minus planned send

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


async def _send(client: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with client.get(url) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def closed_loop(
    url_for: UrlFor,
    connections: int,
    seconds: float,
    warmup: float,
    keep: bool = False,
    gate: Gate | None = None,
) -> Outcome:
    """`connections` senders for warmup + seconds; counts only what is answered in the window.
    With `keep`, notes every acknowledged request number (the warm-up too); with `gate`, each
    sender passes it before every request."""
    out = Outcome()
    numbers = itertools.count()
    state = {"measuring": False, "stop": False}

    def stopped() -> bool:  # read after an await: another task may have set it
        return state["stop"]

    async with session(connections) as client:

        async def sender() -> None:
            while not state["stop"]:
                if gate is not None:
                    await gate.before()
                    if stopped():
                        return
                n = next(numbers)
                good = await _send(client, url_for(n))
                out.total += 1
                if gate is not None:
                    gate.after(good)
                if keep and good:
                    out.acked[n] = time.monotonic()
                if state["measuring"]:
                    if good:
                        out.ok += 1
                    else:
                        out.errors += 1

        out.started = time.monotonic()
        tasks = [asyncio.create_task(sender()) for _ in range(connections)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        state["measuring"] = False
        out.seconds = time.monotonic() - t0
        state["stop"] = True
        await asyncio.gather(*tasks)
    return out


async def open_loop(url_for: UrlFor, rate: float, seconds: float, connections: int) -> Outcome:
    """Send request n at started + n / rate (late ones at once, never skipped); wait for every
    answer. Latency should be taken from `intended`, so a slow answer cannot hide the requests
    it delayed."""
    out = Outcome(seconds=seconds)
    total = int(rate * seconds)
    async with session(connections) as client:

        async def one(n: int) -> None:
            good = await _send(client, url_for(n))
            out.total += 1
            if good:
                out.ok += 1
                out.acked[n] = time.monotonic()
            else:
                out.errors += 1

        tasks = []
        out.started = time.monotonic() + 0.05
        for n in range(total):
            planned = out.started + n / rate
            delay = planned - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out.intended[n] = planned
            out.lag.append(time.monotonic() - planned)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
    return out


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
