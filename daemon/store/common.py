"""Backend-independent store logic: the arrival decision, delivery ids, cursors and times."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Generic, TypeVar

from daemon.errors import InputError
from daemon.models import (
    EPOCH,
    MICROSECOND,
    Conversion,
    Status,
    Transition,
    decide_transition,
)
from daemon.store.base import (
    ArrivalResult,
    DeliveryState,
    Finish,
    FinishResult,
    PlannedDelivery,
    Planner,
    idempotency_key,
)

# States a delivery may be moved to by finish_attempt, and those that wait for a next attempt.
FINISH_STATES = frozenset(DeliveryState) - {DeliveryState.IN_FLIGHT}
WAITING_STATES = frozenset({DeliveryState.QUEUED, DeliveryState.RETRYING})
ACTIVE_STATES = ("queued", "retrying", "in_flight")  # what prune must never delete


def utc(moment: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are refused (their zone is a guess)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime given to the store: pass an aware datetime")
    return moment.astimezone(UTC)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch: exact, sortable, how SQLite keeps times."""
    if moment.tzinfo is UTC:  # the common case (every clock reading): nothing to convert
        return (moment - EPOCH) // MICROSECOND
    return (utc(moment) - EPOCH) // MICROSECOND


def from_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def opt_us(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def opt_from_us(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def new_delivery_id(at: datetime) -> str:
    """32 hex digits: milliseconds of `at`, then 80 random bits, so ids sort by creation."""
    millis = to_us(at) // 1000
    return f"{millis:012x}{_random_hex20()}"


# The random parts of delivery ids, read from the OS's CSPRNG in blocks: os.urandom(10) per id
# was a system call per delivery. Each part is popped once (list.pop is atomic: threads never
# get the same one); a process forked from this one starts with none of them, so that workers
# (daemon.workers forks them) never share a part.
_RANDOM_PARTS: list[str] = []
_RANDOM_BLOCK = 256  # parts per os.urandom read (2,560 bytes)


def _random_hex20() -> str:
    """20 hex digits (80 bits) from the OS's CSPRNG, as secrets.token_hex(10) gives."""
    while True:
        try:
            return _RANDOM_PARTS.pop()
        except IndexError:
            block = os.urandom(10 * _RANDOM_BLOCK).hex()
            # extend() with a list is one atomic step; two threads refilling at once both add
            _RANDOM_PARTS.extend([block[i : i + 20] for i in range(0, len(block), 20)])


os.register_at_fork(after_in_child=_RANDOM_PARTS.clear)


def lease_token() -> str:
    """The lease token of a delivery leased at insert (daemon.store.base.LeaseAhead): 32 hex
    digits, as a claim's. A fencing token, not a secret: what it must be is different from
    every other lease of the same delivery, and a delivery is leased at insert once, by the
    node that writes it; later leases are claims, with random tokens of their own."""
    return f"{_TOKEN_PREFIX}{next(_TOKEN_COUNT):016x}"


_TOKEN_PREFIX = secrets.token_hex(8)
_TOKEN_COUNT = itertools.count()


def lease_us(lease: timedelta) -> int:
    """A lease's length in microseconds (to_us's unit)."""
    return lease // MICROSECOND


class ConversionUpdate(Enum):
    """What an arrival writes on its conversion row."""

    INSERT = "insert"  # new: the row is created
    FULL = "full"  # status_changed: status, its event time, merged fields, updated_at
    TOUCH = "touch"  # duplicate: updated_at only
    NONE = "none"  # stale


@dataclass(frozen=True)
class StoredConversion:
    """The conversion row as read (under lock) inside the arrival's transaction."""

    pk: int
    status: Status
    status_event_time: datetime | None
    fields: dict[str, Any]
    last_seq: int


@dataclass(frozen=True)
class NewDelivery:
    delivery_id: str
    planned: PlannedDelivery
    idempotency_key: str


@dataclass(frozen=True)
class ArrivalWrite:
    """Everything one arrival writes, decided before any row is touched."""

    transition: Transition
    previous_status: Status | None
    seq: int
    data: dict[str, Any]
    values: dict[str, str]
    deliveries: list[NewDelivery]
    update: ConversionUpdate
    status: Status  # the conversion's status after this arrival
    status_event_time: datetime | None
    fields: dict[str, Any]  # the conversion's fields after this arrival

    def result(self, source: str, conversion_id: str) -> ArrivalResult:
        return ArrivalResult(
            source=source,
            conversion_id=conversion_id,
            transition=self.transition,
            previous_status=self.previous_status,
            arrival_seq=self.seq,
            delivery_ids=[d.delivery_id for d in self.deliveries],
        )


def conversion_fields(conversion: Conversion) -> dict[str, Any]:
    """What the conversion row keeps: canonical fields as sent, and `extra` when there is any."""
    fields: dict[str, Any] = dict(conversion.canonical())
    if conversion.extra:
        fields["extra"] = dict(conversion.extra)
    return fields


def merge_fields(stored: dict[str, Any], conversion: Conversion) -> dict[str, Any]:
    """Fields sent with a status change overwrite the stored ones; the others stay."""
    merged = {**stored, **conversion.canonical()}
    extra = {**stored.get("extra", {}), **conversion.extra}
    if extra:
        merged["extra"] = extra
    return merged


def merged_conversion(stored: dict[str, Any], conversion: Conversion) -> Conversion:
    """The conversion as it stands after a status change: stored fields, overwritten by those
    sent now (the stored ones were validated when they arrived)."""
    merged = merge_fields(stored, conversion)
    extra = merged.pop("extra", {})
    return Conversion.parse(merged, extra)


def prepare_arrival(
    source: str,
    conversion: Conversion,
    received_at: datetime,
    stored: StoredConversion | None,
    plan: Planner,
) -> ArrivalWrite:
    """Decide the transition, ask the planner, and name every row the arrival writes."""
    previous = stored.status if stored else None
    transition = decide_transition(
        previous, stored.status_event_time if stored else None, conversion
    )
    effective = conversion
    if stored is not None and transition is Transition.STATUS_CHANGED:
        effective = merged_conversion(stored.fields, conversion)
    arrival_plan = plan(transition, previous, effective)
    seq = (stored.last_seq if stored else 0) + 1
    fires = transition in (Transition.NEW, Transition.STATUS_CHANGED)
    deliveries = [
        NewDelivery(
            new_delivery_id(received_at),
            planned,
            idempotency_key(source, conversion.conversion_id, seq, planned.postback_id),
        )
        for planned in (arrival_plan.deliveries if fires else [])
    ]
    if stored is None:
        update = ConversionUpdate.INSERT
        status, event_time = conversion.status, conversion.event_time
        fields = conversion_fields(conversion)
    elif transition is Transition.STATUS_CHANGED:
        update = ConversionUpdate.FULL
        status = conversion.status
        # Without an event time of its own, the change keeps the older one, so an arrival
        # older than both is still recognised as stale.
        event_time = conversion.event_time or stored.status_event_time
        fields = merge_fields(stored.fields, conversion)
    else:
        duplicate = transition is Transition.DUPLICATE
        update = ConversionUpdate.TOUCH if duplicate else ConversionUpdate.NONE
        status, event_time, fields = stored.status, stored.status_event_time, stored.fields
    return ArrivalWrite(
        transition=transition,
        previous_status=previous,
        seq=seq,
        data=arrival_plan.data,
        values=arrival_plan.values,
        deliveries=deliveries,
        update=update,
        status=status,
        status_event_time=event_time,
        fields=fields,
    )


P = TypeVar("P")


class FinishItems(Generic[P]):
    """The items of one finish_attempts call: each one's parameters (`prepare(item)`), or its
    own ValueError (an impossible state), which is then its result; `results` in the items'
    order, None where the store has yet to say."""

    def __init__(self, finishes: Sequence[Finish], prepare: Callable[[Finish], P]) -> None:
        self.results: list[FinishResult | None] = []
        self.todo: list[tuple[int, P]] = []  # (the item's place, its parameters)
        for i, item in enumerate(finishes):
            try:
                self.todo.append((i, prepare(item)))
            except ValueError as err:  # this item's own failure
                self.results.append(err)
                continue
            self.results.append(None)

    def outcome(self) -> list[FinishResult]:
        """The results (an item the store said nothing of: not held)."""
        return [False if r is None else r for r in self.results]


def check_finish(state: DeliveryState, next_attempt_at: datetime | None) -> datetime | None:
    """The next_attempt_at to store for a finished attempt (None unless it waits again)."""
    if state not in FINISH_STATES:
        raise ValueError(f"an attempt cannot leave a delivery {state.value}")
    if state in WAITING_STATES:
        if next_attempt_at is None:
            raise ValueError(f"a {state.value} delivery needs next_attempt_at")
        return utc(next_attempt_at)
    return None


def encode_cursor(created_at: datetime, delivery_id: str) -> str:
    return f"{to_us(created_at)}_{delivery_id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) after which the next page starts; InputError when malformed."""
    micros, _, delivery_id = cursor.partition("_")
    # ASCII only: str.isdigit/isalnum accept '²' or 'é', which int() or the ids never hold.
    if not (cursor.isascii() and micros.isdigit() and len(micros) < 20 and delivery_id.isalnum()):
        raise InputError("malformed cursor", "cursor")
    try:
        return from_us(int(micros)), delivery_id
    except (OverflowError, ValueError, OSError) as err:  # a time past what datetime holds
        raise InputError("malformed cursor", "cursor") from err


def check_resendable(delivery_id: str, state: str) -> None:
    """InputError unless the delivery to resend succeeded (a dead or cancelled one is retried)."""
    if state != DeliveryState.SUCCEEDED.value:
        raise InputError(
            f"delivery {delivery_id} is {state}: only a succeeded delivery can be "
            "resent (retry a dead or cancelled one)",
            "state",
        )


def decode_conversion_cursor(cursor: str | None) -> tuple[datetime | None, int | None]:
    """The (updated_at, conversion pk) after which the next conversion_log page starts (Nones
    without a cursor); InputError when malformed."""
    if not cursor:
        return None, None
    after, pk = decode_cursor(cursor)
    if not pk.isdigit():
        raise InputError("malformed cursor", "cursor")
    return after, int(pk)
