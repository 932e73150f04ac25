"""The store contract that SQLite and PostgreSQL both satisfy (one contract test suite).

Data model:
- conversion: one row per (source, conversion_id); its current status, the event_time that set
  it, and its merged canonical fields.
- arrival: one row per webhook that reached the store (any transition), numbered 1, 2, ... per
  conversion (`arrival_seq`); keeps the data the rules saw (so every retry renders from it).
- delivery: one row per (arrival, postback that fired); written in the arrival's transaction.
  Its idempotency key is ``{source}:{conversion_id}:{arrival_seq}:{postback_id}``.
- attempt: one row per attempt of a delivery.

Claims: ``claim_due`` moves due deliveries to ``in_flight`` with a lease (owner, token, until).
A node finishes an attempt only while it holds the claim token (``finish_attempt`` returns False
otherwise); a claim whose lease has ended is due again, for any node.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from daemon.models import Conversion, Status, Transition
from daemon.store.affiliate_types import (
    AffiliateChanges,
    AuditRow,
    PostbackChange,
    StoredPostback,
    Who,
)


class DeliveryState(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


PENDING_STATES = (DeliveryState.QUEUED, DeliveryState.RETRYING)
FINAL_STATES = (DeliveryState.SUCCEEDED, DeliveryState.DEAD, DeliveryState.CANCELLED)
# The states a delivery passes through before a final one: what queue_depth(live_only=True)
# counts, in the state index, as cheaply as the queue is short.
LIVE_STATES = (DeliveryState.QUEUED, DeliveryState.IN_FLIGHT, DeliveryState.RETRYING)


def idempotency_key(source: str, conversion_id: str, arrival_seq: int, postback_id: int) -> str:
    return f"{source}:{conversion_id}:{arrival_seq}:{postback_id}"


@dataclass(frozen=True)
class PlannedDelivery:
    postback_id: int
    action: str  # the action type, for listings and metrics
    destination: str  # per-host grouping key (Action.destination)
    affiliate_owner: str | None = None  # the affiliate of the postback's author, for visibility


@dataclass(frozen=True)
class ArrivalPlan:
    """What the rules make of an arrival, decided inside the store's transaction."""

    data: dict[str, Any]  # daemon.models.rule_data(...)
    values: dict[str, str]  # daemon.models.macro_values(...)
    deliveries: list[PlannedDelivery] = field(default_factory=list)


# Called inside the transaction once the transition is known, with (transition, previous
# status, the conversion as it stands after this arrival: for a status change, the stored fields
# merged with the ones sent, so a tracker that sends only id and status still renders them all).
Planner = Callable[[Transition, Status | None, Conversion], ArrivalPlan]


@dataclass(frozen=True)
class ArrivalResult:
    source: str
    conversion_id: str
    transition: Transition
    previous_status: Status | None
    arrival_seq: int
    delivery_ids: list[str]


class Claim(NamedTuple):
    """A delivery claimed for one attempt. (A NamedTuple, not a frozen dataclass: one is made
    per delivery and a frozen dataclass's __init__ sets each field through object.__setattr__.)"""

    delivery_id: str
    token: str
    postback_id: int
    destination: str  # as planned when the delivery was written (claim_due's skip_destinations)
    source: str
    conversion_id: str
    arrival_seq: int
    idempotency_key: str
    attempts: int  # attempts made before this one
    created_at: datetime
    data: dict[str, Any]
    values: dict[str, str]


class LeaseAhead:
    """An offer of this node's dispatcher to take one arrival's new deliveries as they are
    written: leased to the node at insert (in flight, a lease token each, the lease counted
    from the arrival) and handed to the dispatcher after the commit, without a claim (one
    statement and one commit less per delivery, and no wait for the next claim).

    Made on the event loop for one arrival (Dispatcher.lease_ahead). Inside the arrival's
    transaction (SQLite: the writer thread), the store asks `take(planned)` once it knows the
    deliveries: True when the dispatcher has room for all of them now (none is leased
    otherwise: they are queued and claimed as usual); the store then records a Claim for each
    row it wrote leased (`claims`). After the transaction, committed or not, the store calls
    `settle(committed)` on the event loop whenever `take` agreed (SQLite: in every case),
    whether or not the request still waits for it: the dispatcher then starts the claims, or
    frees the room it kept. A transaction run again (SQLite's savepoint rerun) asks `take`
    again: the first answer stands, and `claims` is what the last run wrote. PostgreSQL asks
    before a new conversion's batched statement or inside a stored conversion's transaction,
    and makes the claims from the arrival's data and values as the server stored them (jsonb
    orders an object's keys its own way). When the batched statement finds the conversion
    stored (by another node, or by this node's arrival still on its way), it has settled the
    offer as not written; the store then `reopen`s it and the locking path asks it again."""

    __slots__ = ("_admit", "_reserved", "_settle", "claims", "lease", "node")

    def __init__(
        self,
        node: str,
        lease: timedelta,
        admit: Callable[[Sequence[PlannedDelivery]], bool],
        settle: Callable[[LeaseAhead, bool], None],
    ) -> None:
        self.node = node
        self.lease = lease
        self.claims: list[Claim] = []
        self._admit = admit
        self._settle = settle
        self._reserved: int | None = None  # the first take's answer: how many (0: refused)

    @property
    def reserved(self) -> int:
        """How many deliveries the dispatcher keeps room for, until settle."""
        return self._reserved or 0

    def take(self, planned: Sequence[PlannedDelivery]) -> bool:
        self.claims = []
        if self._reserved is None:
            self._reserved = len(planned) if planned and self._admit(planned) else 0
        return self._reserved > 0

    def settle(self, committed: bool) -> None:
        self._settle(self, committed)

    def reopen(self) -> None:
        """The offer, settled, may be taken again: the next `take` asks the dispatcher anew
        (and keeps its own room, until its own settle). Only after settle, or when no take
        agreed: settle gives back the room the first take kept."""
        self._reserved = None
        self.claims = []


class AttemptRow(NamedTuple):
    """One attempt's record (a NamedTuple, as Claim: one is made per attempt)."""

    started_at: datetime
    duration_ms: int
    outcome: str  # succeeded | retry | dead | cancelled | released
    reason: str | None
    rules_version: str
    node: str
    request: Mapping[str, Any] | None = None
    response_status: int | None = None
    response_excerpt: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """One attempt's result for :meth:`Store.finish_attempts` (finish_attempt's arguments)."""

    claim: Claim
    attempt: AttemptRow
    state: DeliveryState
    next_attempt_at: datetime | None


# One item's outcome in finish_attempts: True (recorded), False (the claim is no longer held,
# nothing written), or the exception that item alone raised (nothing of it written).
FinishResult = bool | Exception


@dataclass(frozen=True)
class DeliveryRow:
    delivery_id: str
    postback_id: int
    action: str
    destination: str
    source: str
    conversion_id: str
    arrival_seq: int
    idempotency_key: str
    state: DeliveryState
    attempts: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    last_reason: str | None
    affiliate_owner: str | None = None


@dataclass(frozen=True)
class DeliveryDetail:
    delivery: DeliveryRow
    attempts: list[AttemptRow]


@dataclass(frozen=True)
class ConversionRow:
    source: str
    conversion_id: str
    status: Status
    status_event_time: datetime | None
    fields: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    arrivals: list[dict[str, Any]]  # seq, transition, status, event_time, received_at


@dataclass(frozen=True)
class DeliveryFilter:
    state: DeliveryState | None = None
    postback_ids: Collection[int] | None = None  # None = all; used for visibility too
    conversion_id: str | None = None
    since: datetime | None = None  # created at or after


@dataclass(frozen=True)
class StoredArrival:
    """An arrival as backfill and replay read it (issue 18): what the rules saw, and the
    postbacks that already have a delivery for it."""

    conversion_pk: int
    seq: int
    source: str
    conversion_id: str
    transition: Transition
    received_at: datetime
    data: dict[str, Any]
    values: dict[str, str]
    postback_ids: frozenset[int]


@dataclass(frozen=True)
class NewDelivery:
    """A delivery added to a stored arrival after the fact (backfill, replay)."""

    conversion_pk: int
    seq: int
    source: str
    conversion_id: str
    planned: PlannedDelivery


@dataclass(frozen=True)
class LogFilter:
    """The slices of `deliveries list` and `conversions list` (issue 18); None = any. Offer,
    affiliate and trigger are the arrival's (a delivery) or the conversion's."""

    offer: str | None = None
    affiliate: str | None = None
    postback_id: int | None = None
    action: str | None = None
    trigger: str | None = None
    state: DeliveryState | None = None  # conversions: one of its deliveries is in this state
    status: Status | None = None  # conversions only
    conversion_id: str | None = None
    since: datetime | None = None  # deliveries: created at; conversions: updated at
    until: datetime | None = None


@dataclass(frozen=True)
class LoggedDelivery:
    delivery: DeliveryRow
    offer: str | None
    affiliate: str | None
    trigger: str | None


@dataclass(frozen=True)
class LoggedConversion:
    source: str
    conversion_id: str
    status: Status
    fields: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deliveries: int


class Store(Protocol):
    async def open(self) -> None:
        """Connect and run migrations."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store is not reachable."""
        ...

    async def record_arrival(
        self,
        source: str,
        conversion: Conversion,
        received_at: datetime,
        plan: Planner,
        lease: LeaseAhead | None = None,
    ) -> ArrivalResult:
        """In one durable transaction: decide the transition against the stored conversion,
        record the arrival, update the conversion, write the deliveries that `plan` returns
        (none for duplicate and stale). Raises StoreError when it cannot commit.

        `lease` (only on a store whose `leases_at_insert` is true): the deliveries are written
        leased to its node when `lease.take` agrees, and then `lease.settle` is called after
        the transaction, committed or not (LeaseAhead)."""
        ...

    async def claim_due(
        self,
        node: str,
        now: datetime,
        limit: int,
        lease: timedelta,
        skip_affiliates: Collection[str] = (),
        skip_destinations: Collection[str] = (),
    ) -> list[Claim]:
        """Claim up to `limit` deliveries that are queued/retrying and due, or in flight with an
        ended lease, oldest due first; none of the postbacks of `skip_affiliates` (fair use: the
        dispatcher's affiliates that have their share in flight), none of the deliveries to
        `skip_destinations` (the destinations with their share claimed on this node: a backlog
        draining after an outage leaves the node's slots to the others)."""
        ...

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Record the attempt and move the delivery to `state`; False (and nothing written) when
        the claim is no longer held."""
        ...

    async def finish_attempts(self, finishes: Sequence[Finish]) -> list[FinishResult]:
        """:meth:`finish_attempt` for several claims in one write (one transaction, one round
        trip where the backend can): each item's own outcome, in order. An item that fails
        (its StoreError, or the ValueError of an impossible state) fails alone: the others are
        written as if it were not there. Raises StoreError when the write as a whole failed
        (nothing of it written)."""
        ...

    async def release(self, claim: Claim, now: datetime) -> bool:
        """Give a claim back without an attempt (graceful stop): due again at `now` (pass a
        later time to postpone it); False when the claim is no longer held."""
        ...

    async def hold(self, claim: Claim, until: datetime, now: datetime) -> bool:
        """Give a claim back held by an open circuit breaker: not an attempt (the attempt count
        does not move), due again at `until` (a safety time, in case this node dies holding
        it) unless :meth:`unhold` makes it due sooner. It keeps the time it was first due, also
        across a second hold. False when the claim is no longer held."""
        ...

    async def unhold(self, destination: str, now: datetime, limit: int | None = None) -> int:
        """The breaker of `destination` closed: every delivery of it still held (not moved
        since its hold) is due again at once, at the time it was first due (so the backlog
        drains oldest first). With `limit`, only that many, the oldest (its pause ended: one
        becomes the probe). Returns how many."""
        ...

    async def recover(self, node: str, now: datetime) -> int:
        """At start: the claims this node held before it stopped (killed mid-attempt) become
        due at once, instead of waiting for their leases to end. Node names are stable across
        restarts (host and port) and unique among live nodes."""
        ...

    async def cancel_postbacks(self, postback_ids: Collection[int], now: datetime) -> int:
        """Queued and retrying deliveries of these postbacks become cancelled."""
        ...

    async def requeue(self, delivery_ids: Collection[str], now: datetime) -> int:
        """Dead or cancelled deliveries become queued again, due now."""
        ...

    async def requeue_matching(self, flt: DeliveryFilter, now: datetime) -> int:
        """Like requeue, for every dead/cancelled delivery that matches."""
        ...

    async def get_delivery(self, delivery_id: str) -> DeliveryDetail | None: ...

    async def list_deliveries(
        self, flt: DeliveryFilter, limit: int, cursor: str | None
    ) -> tuple[list[DeliveryRow], str | None]:
        """Newest first; the returned cursor fetches the next page (None at the end).
        A malformed cursor raises InputError (field "cursor")."""
        ...

    async def get_conversion(self, source: str, conversion_id: str) -> ConversionRow | None: ...

    async def queue_depth(self, live_only: bool = False) -> dict[DeliveryState, int]:
        """Deliveries by state, each state present (0 when none). Counting the final states
        reads every delivery the store keeps (a month of them: seconds); `live_only` counts
        only LIVE_STATES (an index range as long as the queue) and leaves the others out."""
        ...

    async def delivery_lag(self, now: datetime) -> float:
        """Seconds since the oldest delivery that is due and unclaimed (queued or retrying and
        due, or in flight with an ended lease) became due; 0.0 when none is. Every node's:
        the "accepting but not delivering" alert reads it (docs/operations.md)."""
        ...

    async def prune(self, before: datetime) -> int:
        """Delete conversions (with arrivals, final deliveries and attempts) last updated before
        `before`; never a conversion that still has a pending or in-flight delivery. Returns
        how many conversions were deleted."""
        ...

    # --- affiliate postbacks (issue 15; rows in daemon.store.affiliate_types) ---------------

    async def affiliate_changes(self, since: int) -> AffiliateChanges:
        """Store postbacks (tombstones of deleted ones too) and affiliate secrets changed after
        version `since`, as of one consistent version."""
        ...

    async def create_affiliate_postback(
        self,
        affiliate: str,
        change: PostbackChange,
        who: Who,
        now: datetime,
        max_live: int | None,
    ) -> StoredPostback:
        """Insert with a new id (never one handed out before) and its audit row; QuotaExceeded
        (nothing written) when the affiliate already has `max_live` live postbacks."""
        ...

    async def update_affiliate_postback(
        self,
        pid: int,
        expected_seq: int,
        change: PostbackChange,
        who: Who,
        kind: str,
        now: datetime,
    ) -> StoredPostback | None:
        """Apply `change` if the row is still at `expected_seq` (None, nothing written, if not
        or if it is gone), with its audit row; a status other than active cancels its queued and
        retrying deliveries in the same transaction."""
        ...

    async def delete_affiliate_postback(
        self, pid: int, expected_seq: int, who: Who, now: datetime
    ) -> bool:
        """Leave a tombstone (the id stays taken), cancel its queued and retrying deliveries and
        keep the audit row, in one transaction; False (nothing written) if it changed or is
        gone."""
        ...

    async def affiliate_history(
        self, pid: int, after: int = 0, limit: int | None = None
    ) -> list[AuditRow]:
        """The audit rows of one store postback, oldest first: those whose `seq` is above
        `after`, at most `limit` of them (None: all)."""
        ...

    async def set_affiliate_secret(
        self, affiliate: str, name: str, value: str | None, now: datetime
    ) -> bool:
        """Set (or, with None, delete) one secret of an affiliate; False when deleting one that
        is not set."""
        ...

    async def affiliate_secret_names(self, affiliate: str) -> list[str]: ...

    # --- resend, replay and backfill (issue 18) ---------------------------------------------

    async def arrivals_between(
        self,
        since: datetime,
        until: datetime,
        after: tuple[datetime, int, int] | None,
        limit: int,
    ) -> list[StoredArrival]:
        """Arrivals received in [since, until) that may fire postbacks (new and status changes;
        never a resend's copy), oldest first, after the keyset (received_at, conversion_pk, seq)
        of the last one read."""
        ...

    async def latest_arrival(self, source: str, conversion_id: str) -> StoredArrival | None:
        """The conversion's latest arrival that may fire postbacks (None if unknown)."""
        ...

    async def add_deliveries(self, items: Sequence[NewDelivery], now: datetime) -> list[str]:
        """Queue these deliveries in one transaction, due now; an (arrival, postback) that has a
        delivery already (in any state) is skipped. The ids of those added."""
        ...

    async def resend(self, delivery_id: str, now: datetime) -> DeliveryRow | None:
        """A deliberate new delivery of a succeeded one: a copy of its arrival (marked as such,
        hidden from the conversion's arrivals) and a delivery with its own idempotency key,
        recorded as a resend of `delivery_id`, due now. None if unknown; InputError (field
        "state") if it has not succeeded."""
        ...

    async def resend_of(self, delivery_id: str) -> str | None:
        """The delivery that `delivery_id` resends, if it is a resend."""
        ...

    async def delivery_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedDelivery], str | None]:
        """Deliveries with their arrival's offer, affiliate and trigger, newest first, sliced
        by `flt`; the cursor fetches the next page (None at the end; InputError if malformed)."""
        ...

    async def conversion_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedConversion], str | None]:
        """Conversions, last updated first, sliced by `flt` (postback, action and state: one of
        its deliveries); the cursor as for delivery_log."""
        ...
