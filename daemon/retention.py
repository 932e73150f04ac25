"""Retention (SPEC 13): prunes conversions and attempts older than `retention` in the background.

The store decides what may go (never a conversion with a pending or in-flight delivery); this
module only says when, and makes sure a failing prune is logged and tried again next time
instead of taking the daemon down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from daemon.errors import StoreError
from daemon.store.base import Store

log = structlog.get_logger("postbackd.retention")

INTERVAL = 3600.0  # seconds between prunes


class Retention:
    """Prunes `store` every `interval` seconds, the first time right away."""

    def __init__(
        self,
        store: Store,
        retention: float,
        now: Callable[[], float],
        interval: float = INTERVAL,
    ) -> None:
        self._store = store
        self._retention = retention
        self._now = now
        self._interval = interval
        self.runs = 0  # completed prune attempts, failed ones included (tests wait on it)

    async def prune_once(self) -> int | None:
        """One prune; how many conversions went, or None when it failed (logged)."""
        before = datetime.fromtimestamp(self._now() - self._retention, UTC)
        try:
            count = await self._store.prune(before)
        except StoreError as err:
            log.error("retention_failed", error=str(err))
            count = None
        except Exception as err:  # a prune that fails must never stop the daemon
            log.exception("retention_failed", error=type(err).__name__)
            count = None
        else:
            log.info("retention_pruned", count=count, before=before.isoformat())
        self.runs += 1
        return count

    async def run(self) -> None:
        """Prune now and then every `interval` seconds, until cancelled."""
        while True:
            await self.prune_once()
            await asyncio.sleep(self._interval)
