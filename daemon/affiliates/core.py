"""The affiliate service's plumbing (issue 15): who may touch which postback, the checks run
before any write, and the writes themselves, each taken in by this node at once. The public
methods are :class:`daemon.affiliates.service.AffiliateService`'s."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from daemon.affiliates import inputs
from daemon.affiliates.index import Entry, StoreIndex
from daemon.affiliates.policy import destination_host, problems
from daemon.affiliates.records import (
    build_postback,
    secret_names,
    store_view,
)
from daemon.errors import (
    ConflictError,
    ForbiddenError,
    InputError,
    NotFoundError,
    PolicyError,
    TooManyWritesError,
)
from daemon.listing import mask
from daemon.loader import LoadedPostback, RuleSet
from daemon.log import get_logger
from daemon.macros import MASK, Template
from daemon.reload import Reloader
from daemon.store.affiliate_types import (
    FIRST_STORE_ID,
    PostbackChange,
    QuotaExceeded,
    StoredPostback,
    Who,
)
from daemon.store.base import Store
from daemon.visibility import Viewer, visible_to

log = get_logger("postbackd.affiliates")

View = dict[str, Any]
T = TypeVar("T")
POLICY_WHO = Who("policy", "affiliates policy (rules.d/affiliates.yaml)")
ADMIN_DISABLED = "disabled by an admin"
DRAFT_ID = 10**18 - 1  # the id a postback is checked under before the store gives it one


def who(viewer: Viewer) -> Who:
    name = viewer.name
    if viewer.is_admin:
        return Who(name or "admin", name or "admin")
    ident = name or f"affiliate:{viewer.affiliate}"
    return Who(ident, ident, viewer.affiliate)


class ServiceCore:
    """Everything but the public methods of AffiliateService."""

    def __init__(
        self,
        store: Store,
        index: StoreIndex,
        reloader: Reloader,
        now: Callable[[], float],
    ) -> None:
        self.store = store
        self.index = index
        self.reloader = reloader
        self._now = now
        self._owners: tuple[RuleSet, dict[str, list[LoadedPostback]]] | None = None
        self._writes: dict[str, deque[float]] = {}  # per affiliate: its writes of the last 60 s

    # --- helpers ----------------------------------------------------------------------------

    def _moment(self) -> datetime:
        return datetime.fromtimestamp(self._now(), UTC)

    def _pid(self, id: int | str) -> int:
        try:
            return inputs.postback_id(id)
        except InputError:
            raise NotFoundError(f"no postback {str(id)[:64]}") from None

    @staticmethod
    def _sees(viewer: Viewer, stored: StoredPostback) -> bool:
        return viewer.is_admin or stored.affiliate == viewer.affiliate

    def _view(self, entry: Entry) -> View:
        view = store_view(entry.stored, self.index.goals_enabled(entry.stored.offer))
        if entry.problem and entry.stored.status == "active":
            view["status_reason"] = entry.problem  # not in force although active (yet)
        return view

    def _file_postback(self, viewer: Viewer, pid: int) -> LoadedPostback:
        lp = self.reloader.runtime.rules.postbacks.get(pid)
        if lp is None or pid >= FIRST_STORE_ID or not visible_to(lp.postback, viewer):
            raise NotFoundError(f"no postback {pid}")
        return lp

    def _writable(self, viewer: Viewer, id: int | str) -> Entry:
        pid = self._pid(id)
        entry = self.index.entries.get(pid)
        if entry is not None and self._sees(viewer, entry.stored):
            return entry
        lp = self._file_postback(viewer, pid)
        raise ConflictError(
            f"postback {pid} lives in {lp.file}:{lp.line}: file postbacks change through git"
        )

    @staticmethod
    def _affiliate_only(viewer: Viewer, what: str) -> str:
        if viewer.is_admin or viewer.affiliate is None:
            raise ForbiddenError(
                f"only an affiliate token may {what}: ops keep their postbacks in git (rules.d/)"
            )
        return viewer.affiliate

    def _used(self, affiliate: str) -> int:
        return self.index.count_of(affiliate)

    def visible_ids(self, viewer: Viewer) -> frozenset[int] | None:
        """The ids of the postbacks (file and store, live) the viewer may see, and so their
        deliveries (None: all, an admin): its own only are looked at."""
        if viewer.is_admin:
            return None
        own = self.index.ids_of(viewer.affiliate or "")
        return own.union(lp.id for lp in self._file_postbacks(viewer, None))

    def _visible_entries(self, viewer: Viewer) -> Iterable[Entry]:
        if viewer.is_admin:
            return self.index.entries.values()
        return self.index.owned_by(viewer.affiliate or "")

    def _file_postbacks(self, viewer: Viewer, offer: str | None) -> list[LoadedPostback]:
        """The file postbacks the viewer may see (of one offer), from the rule files alone (the
        composed set holds every store postback too); an affiliate's are computed once per rule
        set."""
        rules = self.index.file_rules or self.reloader.runtime.rules
        if viewer.is_admin:
            found = rules.offers.get(offer, ()) if offer is not None else rules.postbacks.values()
            return [lp for lp in found if lp.id < FIRST_STORE_ID]
        if self._owners is None or self._owners[0] is not rules:
            owners: dict[str, list[LoadedPostback]] = {}
            for lp in rules.postbacks.values():
                owner = lp.postback.owner_affiliate
                if owner is not None and lp.id < FIRST_STORE_ID:
                    owners.setdefault(owner, []).append(lp)
            self._owners = (rules, owners)
        mine = self._owners[1].get(viewer.affiliate or "", [])
        return [lp for lp in mine if offer is None or lp.offer == offer]

    def _budget(self, affiliate: str, count: int = 1) -> deque[float]:
        """The affiliate's writes of the last minute on this node, with room for `count` more;
        TooManyWritesError (429) when the policy's max_writes_per_minute has no room."""
        now = self._now()
        seen = self._writes.setdefault(affiliate, deque())
        while seen and seen[0] <= now - 60:
            seen.popleft()
        limit = self.index.policy.policy.max_writes_per_minute
        if len(seen) + count > limit:
            wait = max(1, math.ceil(seen[0] + 60 - now)) if seen else 60
            raise TooManyWritesError(
                f"affiliate {affiliate} may write {limit} times a minute "
                f"(max_writes_per_minute): try again in {wait} s"
            )
        return seen

    async def _counted(self, affiliate: str | None, write: Awaitable[T]) -> T:
        """Run one store write of an affiliate within its budget (admins and the policy are not
        counted); a write that fails gives its place back."""
        if affiliate is None:
            return await write
        try:
            seen = self._budget(affiliate)
        except TooManyWritesError:
            if inspect.iscoroutine(write):
                write.close()  # never awaited: it did not start
            raise
        at = self._now()
        seen.append(at)
        try:
            result = await write
        except BaseException:
            with contextlib.suppress(ValueError):
                seen.remove(at)
            raise
        if result is None or result is False:
            with contextlib.suppress(ValueError):
                seen.remove(at)
        return result

    @staticmethod
    def _may_enable(viewer: Viewer, entry: Entry, status: str) -> None:
        if (
            status == "active"
            and not viewer.is_admin
            and entry.stored.status_reason == ADMIN_DISABLED
        ):
            raise ForbiddenError("an admin disabled this postback: only an admin can enable it")

    def _check(self, affiliate: str, change: PostbackChange, pid: int = DRAFT_ID) -> None:
        """Everything but the quota, before any write: the rule-file validation, the secrets,
        the policy. Raises InputError / PolicyError."""
        if "action" not in change.body:
            raise InputError("missing required key 'action'", "action")
        now = self._moment()
        draft = StoredPostback(
            pid, affiliate, change.offer, change.status, None, change.body, now, now, 0
        )
        lp = build_postback(draft, self.index.goals_enabled(change.offer))
        for name in sorted(secret_names(change.body["action"])):
            if not self.index.secrets.has(affiliate, name):
                raise PolicyError(f"affiliate secret {name} is not set: set it first", "action")
        host = destination_host(self.index.destination_of(lp))
        found = problems(
            self.index.policy.policy, lp.offer, lp.postback, host, self.index.offers_with_files()
        )
        if found:
            raise PolicyError("; ".join(found))

    async def _create(
        self, viewer: Viewer, affiliate: str, change: PostbackChange
    ) -> StoredPostback:
        limit = self.index.policy.policy.max_postbacks
        try:
            row = await self._counted(
                viewer.affiliate,
                self.store.create_affiliate_postback(
                    affiliate, change, who(viewer), self._moment(), limit
                ),
            )
        except QuotaExceeded as err:
            raise PolicyError(
                f"affiliate {affiliate} has {err.count} postbacks: the policy allows at most "
                f"{limit} (max_postbacks)"
            ) from err
        self._took([row])
        return row

    async def _update(
        self, viewer: Viewer, entry: Entry, change: PostbackChange, kind: str
    ) -> StoredPostback:
        row = await self._counted(
            viewer.affiliate,
            self.store.update_affiliate_postback(
                entry.stored.id, entry.stored.change_seq, change, who(viewer), kind, self._moment()
            ),
        )
        if row is None:
            raise ConflictError("the postback changed meanwhile: read it again")
        self._took([row])
        return row

    def _took(self, rows: Sequence[StoredPostback]) -> None:
        """A write of this node takes effect here at once (the sync loop reads it again)."""
        self.index.apply(rows)
        self.reloader.recompose()

    def _copy_body(self, original: View) -> dict[str, Any]:
        """What a copy of `original` takes, from the postback itself: its view masks credentials,
        and a copy made from the view would send `****` in their place (red team, issue 15)."""
        pid = int(original["id"])
        entry = self.index.entries.get(pid)
        if entry is not None:
            kept = ("trigger", "goal", "when", "action")
            return {k: copy.deepcopy(entry.stored.body[k]) for k in kept if k in entry.stored.body}
        ts = original["trigger_settings"]
        body: dict[str, Any] = {"trigger": original["trigger"]}
        if ts.get("goal") is not None:
            body["goal"] = ts["goal"]
        if ts.get("when") is not None:
            body["when"] = ts["when"]
        action = self.reloader.runtime.rules.postbacks[pid].postback.action
        body["action"] = {"type": original["action"], **settings_as_written(action)}
        return body


def reason_for(viewer: Viewer, status: str, entry: Entry) -> str | None:
    if status == "active":
        return None
    if viewer.is_admin:
        return ADMIN_DISABLED
    if entry.stored.status == "disabled":
        return entry.stored.status_reason
    return None


def secrets_of(stored: StoredPostback) -> set[str]:
    try:
        return secret_names(stored.body.get("action"))
    except InputError:
        return set()


def settings_as_written(settings: Any) -> dict[str, Any]:
    """A file postback's action settings as written (defaults left out), unmasked: `${secret:..}`
    references stay references (and are refused in a store postback)."""
    data: dict[str, Any] = settings.model_dump(
        mode="json", by_alias=True, exclude_unset=True, fallback=_source_text
    )
    data.pop("type", None)
    return data


def _source_text(value: Any) -> Any:
    return value.source if isinstance(value, Template) else str(value)


def restore_masked(new: Any, old: Any, key: str = "") -> Any:
    """`new` with every value sent back exactly as a read showed it (`****` for a credential,
    a URL with its password masked) replaced by what it stood for in `old`, at the same place:
    a client that reads a postback, edits its URL and sends the action back keeps its
    credentials instead of storing `****` (red team, issue 15)."""
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        return {k: restore_masked(v, old[k], str(k)) if k in old else v for k, v in new.items()}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [restore_masked(n, o, key) for n, o in zip(new, old, strict=True)]
    if isinstance(new, str) and isinstance(old, str) and new != old:
        if new == mask(old, key):
            return old
        return _same_origin_password(new, old)
    return new


def _same_origin_password(new: str, old: str) -> str:
    """A URL whose password reads `****` takes `old`'s password if it goes to the same user,
    scheme, host and port (never to another host)."""
    if f":{MASK}@" not in new:
        return new
    try:
        n, o = urlsplit(new), urlsplit(old)
        same = (n.scheme, n.username, n.hostname, n.port) == (
            o.scheme,
            o.username,
            o.hostname,
            o.port,
        )
    except ValueError:
        return new
    if not same or n.password != MASK or o.password is None:
        return new
    return urlunsplit(n._replace(netloc=o.netloc))


def masked(snapshot: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {**snapshot, "body": mask(snapshot.get("body") or {})}
