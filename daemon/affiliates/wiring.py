"""How the app puts affiliate postbacks together: one store layer over the reloader's rule
files, the service over both, and the loop that keeps the layer current."""

from __future__ import annotations

from collections.abc import Callable

from daemon.actions.base import Resources
from daemon.affiliates.index import AffiliateSecrets, StoreIndex
from daemon.affiliates.service import AffiliateService
from daemon.affiliates.sync import INTERVAL, AffiliateSync
from daemon.reload import Reloader
from daemon.store.base import Store


def attach_affiliates(
    store: Store,
    reloader: Reloader,
    resources: Resources,
    now: Callable[[], float],
    *,
    interval: float = INTERVAL,
    listen: bool = True,
) -> tuple[AffiliateService, AffiliateSync]:
    """The service and its sync loop; the reloader composes every rule set with the store
    layer from now on. Call `await sync.refresh()` once the rules are loaded, then run
    `sync.run()` as a background task."""
    index = StoreIndex(resources, AffiliateSecrets())
    reloader.overlay = index
    service = AffiliateService(store, index, reloader, now)
    return service, AffiliateSync(store, index, reloader, service, interval=interval, listen=listen)
