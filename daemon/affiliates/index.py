"""Store postbacks merged into the running rule set (issue 15): the same `(offer, trigger)`
index as file postbacks, changed one postback at a time.

A change touches only the index entries of the offers and triggers it concerns (see
daemon.affiliates.layers); a rules reload re-bases the store layer on the new files without
validating the store postbacks again (only their offer's goals_enabled and the policy are looked
at anew).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from daemon.actions import build_action
from daemon.actions.base import Action, Resources, SecretLookup
from daemon.affiliates.layers import CowMap, Layered
from daemon.affiliates.outbound import PolicyHttp
from daemon.affiliates.policy import DEFAULT_POLICY, LoadedPolicy, destination_host, problems
from daemon.affiliates.records import StoreLoadedPostback, build_postback
from daemon.errors import InputError, SecretError
from daemon.loader import LoadedPostback, RuleSet
from daemon.log import get_logger
from daemon.models import Trigger
from daemon.reload import Runtime
from daemon.secrets import AFFILIATE_PREFIX
from daemon.store.affiliate_types import StoredPostback, StoredSecret

log = get_logger("postbackd.affiliates")

Key = tuple[str, Trigger, str]  # offer, trigger, affiliate


class AffiliateSecrets:
    """The values of affiliate secrets (kept in the store, apart from postbacks), and a resolver
    per affiliate that knows its own secrets and nothing else."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], str] = {}

    def apply(self, changes: Iterable[StoredSecret]) -> None:
        for s in changes:
            if s.value is None:
                self._values.pop((s.affiliate, s.name), None)
            else:
                self._values[(s.affiliate, s.name)] = s.value

    def apply_one(self, affiliate: str, name: str, value: str | None) -> None:
        self.apply([StoredSecret(affiliate, name, value, 0)])

    def has(self, affiliate: str, name: str) -> bool:
        return (affiliate, name) in self._values

    def lookup(self, affiliate: str) -> SecretLookup:
        def resolve(name: str) -> str:
            own = name.removeprefix(AFFILIATE_PREFIX)
            value = self._values.get((affiliate, own)) if own != name else None
            if not value:
                raise SecretError(f"affiliate secret {own} is not set")
            return value

        return resolve


@dataclass(frozen=True)
class Entry:
    """One live store postback: its row, and what it is in the rule set."""

    stored: StoredPostback
    loaded: StoreLoadedPostback | None  # None: it no longer validates (see `problem`)
    problem: str | None = None  # why it does not fire although active (policy, invalid)

    @property
    def in_force(self) -> bool:
        return self.loaded is not None and self.stored.status == "active" and not self.problem


class StoreIndex:
    """The store layer of one node: every live store postback, the index entries they add,
    and the composed runtime (file runtime + store layer). Used on the event loop only; every
    snapshot it hands out is immutable."""

    def __init__(self, resources: Resources, secrets: AffiliateSecrets) -> None:
        # The policy's deny_destinations hold at send time too: every hop, every resolved name.
        http = PolicyHttp(resources.http, lambda: self._policy.policy)
        self.resources = replace(resources, http=http)
        self.secrets = secrets
        self.version = 0
        self.entries: dict[int, Entry] = {}
        # The ids of each affiliate's live postbacks: what one affiliate lists or counts costs
        # its own postbacks, not every affiliate's (red team: 100,000 of others' made one
        # affiliate's GET /api/v1/postbacks take 660 ms of the event loop).
        self._owned: dict[str, set[int]] = {}
        self._deleted: dict[int, int] = {}  # id -> change_seq it was deleted at (or after)
        self._blocked: set[int] = set()  # active, but the policy or the rules say no
        self._file: Runtime | None = None
        self._policy: LoadedPolicy = DEFAULT_POLICY
        self._goals: Mapping[str, bool] = {}
        self._loaded: CowMap[int, LoadedPostback] = CowMap()
        self._actions: CowMap[int, Action] = CowMap()
        self._members: dict[Key, dict[int, LoadedPostback]] = {}
        self._offer_members: dict[str, dict[int, LoadedPostback]] = {}
        self._active: CowMap[Key, tuple[LoadedPostback, ...]] = CowMap()
        self._offers: CowMap[str, tuple[LoadedPostback, ...]] = CowMap()

    # --- what the rest reads ----------------------------------------------------------------

    @property
    def policy(self) -> LoadedPolicy:
        return self._policy

    def goals_enabled(self, offer: str) -> bool:
        return self._goals.get(offer, False)

    def offers_with_files(self) -> Mapping[str, bool]:
        return self._goals

    def owned_by(self, affiliate: str) -> list[Entry]:
        """The live store postbacks of one affiliate, by id."""
        return [self.entries[pid] for pid in sorted(self._owned.get(affiliate, ()))]

    def ids_of(self, affiliate: str) -> frozenset[int]:
        return frozenset(self._owned.get(affiliate, ()))

    def count_of(self, affiliate: str) -> int:
        return len(self._owned.get(affiliate, ()))

    @property
    def file_rules(self) -> RuleSet | None:
        """The rule files' set under the store layer (None before the first compose)."""
        return self._file.rules if self._file is not None else None

    def compose(self, file_runtime: Runtime) -> Runtime:
        """The running set: `file_runtime` with the store layer over it."""
        if file_runtime is not self._file:
            self._rebase(file_runtime)
        rules: RuleSet = replace(
            file_runtime.rules,
            postbacks=Layered(file_runtime.rules.postbacks, self._loaded, disjoint=True),
            offers=Layered(file_runtime.rules.offers, self._offers),
            by_affiliate=self._active,
        )
        actions = Layered(file_runtime.actions, self._actions, disjoint=True)
        return replace(file_runtime, rules=rules, actions=actions)

    # --- changes ----------------------------------------------------------------------------

    def apply(self, rows: Iterable[StoredPostback], version: int | None = None) -> None:
        """Take changed rows in (tombstones remove); only their index entries are redone."""
        touched_keys: set[Key] = set()
        touched_offers: set[str] = set()
        put_loaded: dict[int, LoadedPostback] = {}
        put_actions: dict[int, Action] = {}
        drop: list[int] = []
        for row in rows:
            old = self.entries.get(row.id)
            if old is not None and old.stored.change_seq > row.change_seq:
                continue  # an older read than what we have
            if self._deleted.get(row.id, -1) >= row.change_seq:
                continue  # read before a delete this node already took in
            self._forget(row.id, old, touched_keys, touched_offers)
            self._blocked.discard(row.id)
            if old is not None:
                self._owned.get(old.stored.affiliate, set()).discard(row.id)
            if row.status == "deleted":
                self.entries.pop(row.id, None)
                self._deleted[row.id] = row.change_seq
                drop.append(row.id)
                continue
            entry = self._entry(row)
            self.entries[row.id] = entry
            self._owned.setdefault(row.affiliate, set()).add(row.id)
            if entry.stored.status == "active" and entry.problem:
                self._blocked.add(row.id)
            if entry.loaded is None:
                drop.append(row.id)
                continue
            put_loaded[row.id] = entry.loaded
            put_actions[row.id] = self._action(entry.loaded, old)
            self._remember(entry, touched_keys, touched_offers)
        self._loaded = self._loaded.evolve(put_loaded, drop)
        self._actions = self._actions.evolve(put_actions, drop)
        self._refresh(touched_keys, touched_offers)
        if version is not None:
            self.version = max(self.version, version)

    def _entry(self, row: StoredPostback) -> Entry:
        goals = self._goals.get(row.offer, False)
        try:
            loaded = build_postback(row, goals)
        except InputError as err:
            where = f"{err.field}: " if err.field and err.field not in err.message else ""
            return Entry(row, None, f"no longer valid: {where}{err.message}")
        return Entry(row, loaded, self._problem(loaded))

    def _problem(self, lp: StoreLoadedPostback) -> str | None:
        if lp.stored.status != "active":
            return None
        found = problems(
            self._policy.policy,
            lp.offer,
            lp.postback,
            destination_host(self._destination(lp)),
            self._goals,
        )
        return "policy: " + "; ".join(found) if found else None

    def destination_of(self, lp: LoadedPostback) -> str:
        """Where the postback's action sends to (`scheme://host:port`), built afresh."""
        return build_action(lp.postback.action, self._resources_of(lp)).destination

    def _destination(self, lp: LoadedPostback) -> str:
        action = self._actions.get(lp.id)
        if action is None:
            action = build_action(lp.postback.action, self._resources_of(lp))
        return action.destination

    def _resources_of(self, lp: LoadedPostback) -> Resources:
        owner = lp.postback.affiliate
        return replace(self.resources, secret=self.secrets.lookup(owner))

    def _action(self, lp: StoreLoadedPostback, old: Entry | None) -> Action:
        if old is not None and old.loaded is not None and old.stored.body == lp.stored.body:
            kept = self._actions.get(lp.id)
            if kept is not None:
                return kept
        return build_action(lp.postback.action, self._resources_of(lp))

    def _forget(self, pid: int, old: Entry | None, keys: set[Key], offers: set[str]) -> None:
        if old is None or old.loaded is None:
            return
        lp = old.loaded
        key = (lp.offer, lp.postback.trigger, lp.postback.affiliate)
        if self._members.get(key, {}).pop(pid, None) is not None:
            keys.add(key)
        if self._offer_members.get(lp.offer, {}).pop(pid, None) is not None:
            offers.add(lp.offer)

    def _remember(self, entry: Entry, keys: set[Key], offers: set[str]) -> None:
        lp = entry.loaded
        assert lp is not None
        self._offer_members.setdefault(lp.offer, {})[lp.id] = lp
        offers.add(lp.offer)
        if entry.in_force:
            key = (lp.offer, lp.postback.trigger, lp.postback.affiliate)
            self._members.setdefault(key, {})[lp.id] = lp
            keys.add(key)

    def _refresh(self, keys: set[Key], offers: set[str]) -> None:
        """Redo the index entries of these keys: the matching index of store postbacks by
        (offer, trigger, affiliate), and every postback of an offer (the file ones, then the store
        ones: store ids are all above file ids, so the tuple stays in id order)."""
        if self._file is None:
            return
        base = self._file.rules
        put_active: dict[Key, tuple[LoadedPostback, ...]] = {}
        drop_active: list[Key] = []
        for key in keys:
            members = self._members.get(key)
            if not members:
                self._members.pop(key, None)
                drop_active.append(key)
                continue
            put_active[key] = tuple(members[i] for i in sorted(members))
        put_offers: dict[str, tuple[LoadedPostback, ...]] = {}
        drop_offers: list[str] = []
        for offer in offers:
            in_offer = self._offer_members.get(offer)
            if not in_offer:
                self._offer_members.pop(offer, None)
                drop_offers.append(offer)
                continue
            put_offers[offer] = base.offers.get(offer, ()) + tuple(
                in_offer[i] for i in sorted(in_offer)
            )
        self._active = self._active.evolve(put_active, drop_active)
        self._offers = self._offers.evolve(put_offers, drop_offers)

    # --- a new rule set ---------------------------------------------------------------------

    def _rebase(self, file_runtime: Runtime) -> None:
        """New rule files: with the same policy, only the store postbacks of offers whose
        goals_enabled (or rule file) changed are looked at again, and the per-offer lists are
        redone over the new files; a new policy looks at every one again (no re-validation
        unless it did not validate before)."""
        policy: LoadedPolicy = getattr(file_runtime, "policy", DEFAULT_POLICY)
        goals = {offer: lps[0].goals_enabled for offer, lps in file_runtime.rules.offers.items()}
        same_policy = self._file is not None and policy.policy == self._policy.policy
        old_goals = self._goals
        self._file, self._policy, self._goals = file_runtime, policy, goals
        if same_policy:
            moved = {o for o in old_goals.keys() | goals.keys() if old_goals.get(o) != goals.get(o)}
            self.apply(
                [e.stored for e in self.entries.values() if e.stored.offer in moved or not e.loaded]
            )
            self._refresh(set(), set(self._offer_members))
            return
        entries: dict[int, Entry] = {}
        loaded: dict[int, LoadedPostback] = {}
        self._members, self._offer_members = {}, {}
        self._blocked = set()
        for pid, entry in self.entries.items():
            if entry.loaded is None:
                entry = self._entry(entry.stored)
            else:
                lp = entry.loaded
                if lp.goals_enabled != goals.get(lp.offer, False):
                    lp = replace(lp, goals_enabled=goals.get(lp.offer, False))
                entry = Entry(entry.stored, lp, self._problem(lp))
            entries[pid] = entry
            if entry.stored.status == "active" and entry.problem:
                self._blocked.add(pid)
            if entry.loaded is not None:
                loaded[pid] = entry.loaded
                self._remember(entry, set(), set())
        self.entries = entries
        self._loaded = CowMap[int, LoadedPostback]().evolve(loaded)
        actions = {pid: a for pid, a in self._actions.items() if pid in loaded}
        missing = {
            pid: build_action(lp.postback.action, self._resources_of(lp))
            for pid, lp in loaded.items()
            if pid not in actions
        }
        self._actions = CowMap[int, Action]().evolve({**actions, **missing})
        self._active, self._offers = CowMap(), CowMap()
        self._refresh(set(self._members), set(self._offer_members))

    def blocked(self) -> list[Entry]:
        """Active postbacks that do not fire (policy or no longer valid): the service disables
        them in the store, with the reason."""
        return [self.entries[pid] for pid in sorted(self._blocked) if pid in self.entries]

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "postbacks": len(self.entries)}
