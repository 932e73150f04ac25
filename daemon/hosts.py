"""Per-destination limits: bounded concurrency, and a pause for a destination that keeps
failing (its deliveries wait, never dropped). Going down and coming back are logged once each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("postbackd.hosts")

FAILURES_TO_PAUSE = 5
FIRST_PAUSE = 30.0
MAX_PAUSE = 600.0


@dataclass
class _Health:
    failures: int = 0
    paused_until: float = 0.0
    pause: float = 0.0
    down: bool = False


class Destinations:
    def __init__(self, per_host_concurrency: int, now: Callable[[], float]) -> None:
        self._limit = per_host_concurrency
        self._now = now
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._health: dict[str, _Health] = {}

    def semaphore(self, destination: str) -> asyncio.Semaphore:
        sem = self._semaphores.get(destination)
        if sem is None:
            sem = self._semaphores[destination] = asyncio.Semaphore(self._limit)
        return sem

    def paused_until(self, destination: str) -> float | None:
        """When a paused destination may be tried again (one probe), or None if it is not."""
        health = self._health.get(destination)
        if health is None or health.paused_until <= self._now():
            return None
        return health.paused_until

    def succeeded(self, destination: str) -> None:
        health = self._health.pop(destination, None)
        if health is not None and health.down:
            log.info("destination_up", destination=destination)

    def failed(self, destination: str) -> None:
        """A failure that says the destination itself is unwell (connection, timeout, 5xx, 429)."""
        health = self._health.setdefault(destination, _Health())
        health.failures += 1
        if health.failures < FAILURES_TO_PAUSE:
            return
        health.pause = min(MAX_PAUSE, health.pause * 2 if health.pause else FIRST_PAUSE)
        health.paused_until = self._now() + health.pause
        if not health.down:
            health.down = True
            log.warning(
                "destination_down",
                destination=destination,
                failures=health.failures,
                next_in_s=health.pause,
            )

    def is_down(self, destination: str) -> bool:
        health = self._health.get(destination)
        return bool(health and health.down)
