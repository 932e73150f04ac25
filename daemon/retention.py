"""Retention (SPEC 13): prunes conversions and attempts older than `retention` in the background.

The store decides what may go (never a conversion with a pending or in-flight delivery); this
module only says what one prune is. It runs as a supervised loop (daemon.supervise, started in
daemon.app): a failing prune is logged once and tried again on the supervisor's backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from daemon.log import get_logger
from daemon.store.base import Store

log = get_logger("postbackd.retention")

INTERVAL = 3600.0  # seconds between prunes
STEP_LIMIT = 900.0  # a prune that takes longer than this is stalled (see /readyz)


class Retention:
    """One prune of `store` at a time; the supervisor runs it every INTERVAL seconds."""

    def __init__(self, store: Store, retention: float, now: Callable[[], float]) -> None:
        self._store = store
        self._retention = retention
        self._now = now

    async def prune_once(self) -> int:
        """One prune; how many conversions went. StoreError (or any bug) propagates to the
        supervisor, which logs it once and tries again."""
        before = datetime.fromtimestamp(self._now() - self._retention, UTC)
        count = await self._store.prune(before)
        log.info("retention_pruned", count=count, before=before.isoformat())
        return count
