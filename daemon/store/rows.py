"""Turning stored rows into the contract's dataclasses, the same way for both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from daemon import fastjson
from daemon.models import Status, Transition
from daemon.store.affiliate_types import AuditRow, StoredPostback
from daemon.store.base import (
    AttemptRow,
    Claim,
    DeliveryRow,
    DeliveryState,
    LoggedConversion,
    LoggedDelivery,
    NewDelivery,
    PlannedDelivery,
    StoredArrival,
    idempotency_key,
)
from daemon.store.common import ArrivalWrite, encode_cursor

# How one backend reads a stored time (SQLite: integer microseconds; PostgreSQL: datetime).
TimeReader = Callable[[Any], datetime]

DELIVERY_COLUMNS = (
    "id", "postback_id", "action", "destination", "source", "conversion_id", "arrival_seq",
    "idempotency_key", "state", "attempts", "created_at", "updated_at", "next_attempt_at",
    "last_reason", "affiliate_owner",
)  # fmt: skip


def dumps(value: Any) -> str:
    return fastjson.dumps(value)


def loads_json(value: Any) -> Any:
    """JSON columns: text in SQLite, already decoded by the asyncpg codec in PostgreSQL."""
    if isinstance(value, str):
        return fastjson.loads(value)
    return json.loads(value) if isinstance(value, bytes) else value


def _opt(read: TimeReader, value: Any) -> datetime | None:
    return None if value is None else read(value)


def delivery_row(row: Sequence[Any], read: TimeReader) -> DeliveryRow:
    """A DeliveryRow from a row selected in DELIVERY_COLUMNS order."""
    return DeliveryRow(
        delivery_id=row[0],
        postback_id=row[1],
        action=row[2],
        destination=row[3],
        source=row[4],
        conversion_id=row[5],
        arrival_seq=row[6],
        idempotency_key=row[7],
        state=DeliveryState(row[8]),
        attempts=row[9],
        created_at=read(row[10]),
        updated_at=read(row[11]),
        next_attempt_at=_opt(read, row[12]),
        last_reason=row[13],
        affiliate_owner=row[14],
    )


def stored_arrival(
    row: Sequence[Any], read: TimeReader, postback_ids: Iterable[int]
) -> StoredArrival:
    """A StoredArrival from a row of arrivals_between or latest_arrival; `postback_ids` is its
    last column as the backend decodes it (SQLite: JSON text; PostgreSQL: an array)."""
    return StoredArrival(
        conversion_pk=row[0],
        seq=row[1],
        source=row[2],
        conversion_id=row[3],
        transition=Transition(row[4]),
        received_at=read(row[5]),
        data=json.loads(row[6]),
        values=json.loads(row[7]),
        postback_ids=frozenset(postback_ids),
    )


def stored_postback(row: Sequence[Any], read: TimeReader) -> StoredPostback:
    """A store postback from a row of the affiliate queries' postback columns."""
    return StoredPostback(
        id=row[0],
        affiliate=row[1],
        offer=row[2],
        status=row[3],
        status_reason=row[4],
        body=json.loads(row[5]),
        created_at=read(row[6]),
        updated_at=read(row[7]),
        change_seq=row[8],
    )


def audit_row(row: Sequence[Any], read: TimeReader) -> AuditRow:
    """One audit row of a store postback's history."""
    return AuditRow(
        row[0],
        read(row[1]),
        json.loads(row[2]),
        row[3],
        json.loads(row[4]) if row[4] is not None else None,
        json.loads(row[5]) if row[5] is not None else None,
        row[6],
    )


def resend_new(row: Sequence[Any], new_seq: int) -> NewDelivery:
    """The delivery a resend adds, from its source's resend_source row, on the arrival's copy
    `new_seq`."""
    return NewDelivery(
        row[2], new_seq, row[4], row[5], PlannedDelivery(row[6], row[7], row[8], row[9])
    )


def resent_row(new: NewDelivery, delivery_id: str, at: datetime) -> DeliveryRow:
    """The queued DeliveryRow of a resend's `new` delivery, stored as `delivery_id` at `at`."""
    return DeliveryRow(
        delivery_id=delivery_id,
        postback_id=new.planned.postback_id,
        action=new.planned.action,
        destination=new.planned.destination,
        source=new.source,
        conversion_id=new.conversion_id,
        arrival_seq=new.seq,
        idempotency_key=idempotency_key(
            new.source, new.conversion_id, new.seq, new.planned.postback_id
        ),
        state=DeliveryState.QUEUED,
        attempts=0,
        created_at=at,
        updated_at=at,
        next_attempt_at=at,
        last_reason=None,
        affiliate_owner=new.planned.affiliate_owner,
    )


def delivery_log_page(
    found: Sequence[Sequence[Any]], limit: int, read: TimeReader
) -> tuple[list[LoggedDelivery], str | None]:
    """The page of a delivery_log query fetched with `limit + 1` rows, and the cursor of the
    next page (None when this one is the last)."""
    page = [
        LoggedDelivery(delivery_row(row, read), row[15], row[16], row[17]) for row in found[:limit]
    ]
    last = page[-1].delivery if len(found) > limit and page else None
    return page, encode_cursor(last.created_at, last.delivery_id) if last else None


def conversion_log_page(
    found: Sequence[Sequence[Any]], limit: int, read: TimeReader
) -> tuple[list[LoggedConversion], str | None]:
    """The page of a conversion_log query fetched with `limit + 1` rows, and the cursor of the
    next page (None when this one is the last)."""
    page = [
        LoggedConversion(
            source=row[1],
            conversion_id=row[2],
            status=Status(row[3]),
            fields=json.loads(row[4]),
            created_at=read(row[5]),
            updated_at=read(row[6]),
            deliveries=int(row[7]),
        )
        for row in found[:limit]
    ]
    more = len(found) > limit and page
    return page, encode_cursor(page[-1].updated_at, str(found[limit - 1][0])) if more else None


def attempt_row(row: Sequence[Any], read: TimeReader) -> AttemptRow:
    """An AttemptRow from (started_at, duration_ms, outcome, reason, rules_version, node,
    request, response_status, response_excerpt)."""
    request = loads_json(row[6]) if row[6] is not None else None
    return AttemptRow(
        started_at=read(row[0]),
        duration_ms=row[1],
        outcome=row[2],
        reason=row[3],
        rules_version=row[4],
        node=row[5],
        request=request,
        response_status=row[7],
        response_excerpt=row[8],
    )


def claim(row: Sequence[Any], read: TimeReader) -> Claim:
    """A Claim from a row in its fields' order, lease token second (both stores' claim
    queries select them so): built by position, the one place a claim is made."""
    return Claim(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        read(row[9]),
        loads_json(row[10]),
        loads_json(row[11]),
    )


def delivery_rows(
    write: ArrivalWrite, pk: int, source: str, conversion_id: str, now: object
) -> list[tuple[Any, ...]]:
    """insert_delivery's parameters for each of an arrival's deliveries, in both stores' order:
    id, conversion row, arrival seq, source, conversion id, postback, action, destination,
    affiliate owner, idempotency key and `now` (the store's own time value); the leased insert
    adds the lease's columns after them."""
    seq = write.seq
    return [
        (
            d.delivery_id,
            pk,
            seq,
            source,
            conversion_id,
            d.planned.postback_id,
            d.planned.action,
            d.planned.destination,
            d.planned.affiliate_owner,
            d.idempotency_key,
            now,
        )
        for d in write.deliveries
    ]


def leased_claims(
    write: ArrivalWrite,
    tokens: Sequence[str],
    source: str,
    conversion_id: str,
    created: datetime,
    data: str,
    values: str,
) -> list[Claim]:
    """The Claims of an arrival's deliveries leased at insert (daemon.store.base.LeaseAhead),
    one per token, in order: what a claim would read back, its data and values decoded from the
    arrival's JSON as stored."""
    return [
        Claim(
            d.delivery_id,
            token,
            d.planned.postback_id,
            d.planned.destination,
            source,
            conversion_id,
            write.seq,
            d.idempotency_key,
            0,
            created,
            loads_json(data),
            loads_json(values),
        )
        for d, token in zip(write.deliveries, tokens, strict=True)
    ]


def arrival_dict(row: Sequence[Any], read: TimeReader) -> dict[str, Any]:
    """One entry of ConversionRow.arrivals from (seq, transition, status, event_time,
    received_at)."""
    return {
        "seq": row[0],
        "transition": Transition(row[1]),
        "status": Status(row[2]),
        "event_time": _opt(read, row[3]),
        "received_at": read(row[4]),
    }


def depth(
    rows: Sequence[Sequence[Any]], states: Iterable[DeliveryState] = DeliveryState
) -> dict[DeliveryState, int]:
    """Each of `states`, with zeros for those that have no delivery."""
    counts = dict.fromkeys(states, 0)
    for state, count in rows:
        counts[DeliveryState(state)] = int(count)
    return counts


def attempt_values(attempt: AttemptRow) -> tuple[Any, ...]:
    """The attempt's columns other than times (each backend converts those itself), in the
    insert statements' order: duration_ms, outcome, reason, rules_version, node, request,
    response_status, response_excerpt."""
    return (
        attempt.duration_ms,
        attempt.outcome,
        attempt.reason,
        attempt.rules_version,
        attempt.node,
        dumps(dict(attempt.request)) if attempt.request is not None else None,
        attempt.response_status,
        attempt.response_excerpt,
    )
