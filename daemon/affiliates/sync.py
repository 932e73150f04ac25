"""Keeps this node's store layer up to date (issue 15): changes made through other nodes (or
other worker processes) reach this one within 2 s, without a rules reload.

Two ways in, one path: PostgreSQL announces each change with NOTIFY on a dedicated connection
that reconnects by itself; and every `interval` the node compares the store's version with its
own anyway (the fallback when a notification is lost, and the only way on SQLite). Either way it
fetches what changed since the version it has, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from daemon.affiliates.index import StoreIndex
from daemon.affiliates.service import AffiliateService
from daemon.errors import StoreError
from daemon.log import get_logger
from daemon.reload import Reloader
from daemon.store.base import Store

log = get_logger("postbackd.affiliates")

INTERVAL = 1.0  # the version check; a change is seen within INTERVAL + one query


class AffiliateSync:
    def __init__(
        self,
        store: Store,
        index: StoreIndex,
        reloader: Reloader,
        service: AffiliateService,
        *,
        interval: float = INTERVAL,
        listen: bool = True,
    ) -> None:
        self.store = store
        self.index = index
        self.reloader = reloader
        self.service = service
        self.interval = interval
        self._listen = listen
        self._wake = asyncio.Event()
        self.listening = asyncio.Event()  # set once a LISTEN connection is up (tests)
        self._failing = False

    def wake(self) -> None:
        self._wake.set()

    async def refresh(self) -> bool:
        """Take in every change since our version; True when there was one."""
        changes = await self.store.affiliate_changes(self.index.version)
        if changes.version <= self.index.version:
            return False
        self.index.secrets.apply(changes.secrets)
        self.index.apply(changes.postbacks, changes.version)
        self.reloader.recompose()
        log.debug("affiliate_changes_applied", version=changes.version)
        return True

    async def initial(self) -> None:
        """The first load, at start, before anything else reads the index: validating every
        store postback is done in a thread (100,000 take seconds). A store that fails now is the
        loop's to retry."""
        try:
            changes = await self.store.affiliate_changes(self.index.version)
        except StoreError as err:
            log.warning("affiliate_sync_failed", error=str(err))
            return
        self.index.secrets.apply(changes.secrets)
        await asyncio.to_thread(self.index.apply, changes.postbacks, changes.version)
        self.reloader.recompose()

    async def run(self, beat: Callable[[], None] | None = None) -> None:
        """Until cancelled; survives the store's failures (logged once, and once recovered).
        `beat()` after every check (daemon.supervise)."""
        listener = self._start_listener()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
                await self._tick()
                if beat is not None:
                    beat()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _tick(self) -> None:
        try:
            await self.refresh()
            await self.service.enforce_policy()
        except StoreError as err:
            if not self._failing:
                log.warning("affiliate_sync_failed", error=str(err))
            self._failing = True
            return
        except Exception:  # a bug here must not end the loop: the next tick tries again
            log.exception("affiliate_sync_error")
            return
        if self._failing:
            log.info("affiliate_sync_recovered")
        self._failing = False

    def _start_listener(self) -> asyncio.Task[Any] | None:
        listen = getattr(self.store, "listen_affiliate_changes", None)
        if not self._listen or listen is None:
            return None
        return asyncio.create_task(listen(self.wake, self.listening.set), name="affiliate-listener")
