"""Resend, replay and backfill in the PostgreSQL store (issue 18): the methods PostgresStore
takes from this mixin. A resend locks the conversion row, as an arrival does, so the copy's
arrival number is not taken by a webhook meanwhile."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from importlib import resources
from typing import Any

from daemon.store import rows
from daemon.store.base import (
    DeliveryRow,
    LogFilter,
    LoggedConversion,
    LoggedDelivery,
    NewDelivery,
    StoredArrival,
    idempotency_key,
)
from daemon.store.common import (
    check_resendable,
    decode_conversion_cursor,
    decode_cursor,
    new_delivery_id,
    utc,
)
from daemon.store.queries import parse_queries

_Q = parse_queries(
    resources.files("daemon.store")
    .joinpath("sql", "postgres_replay_queries.sql")
    .read_text("utf-8")
)


def _arrival(row: Sequence[Any]) -> StoredArrival:
    return rows.stored_arrival(row, utc, (int(p) for p in row[8] or ()))


async def _insert(conn: Any, d: NewDelivery, now: datetime, resend_of: str | None) -> str:
    """Insert one delivery unless its (arrival, postback) has one; its id, or "" if skipped."""
    found = await conn.fetchval(
        _Q["insert_delivery_once"],
        new_delivery_id(now),
        d.conversion_pk,
        d.seq,
        d.source,
        d.conversion_id,
        d.planned.postback_id,
        d.planned.action,
        d.planned.destination,
        d.planned.affiliate_owner,
        idempotency_key(d.source, d.conversion_id, d.seq, d.planned.postback_id),
        now,
        resend_of,
    )
    return str(found) if found is not None else ""


class PostgresReplay:
    """Needs the store's `_conn` (PostgresStore has it)."""

    def _conn(self, *, transaction: bool = True) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def arrivals_between(
        self,
        since: datetime,
        until: datetime,
        after: tuple[datetime, int, int] | None,
        limit: int,
    ) -> list[StoredArrival]:
        cursor = (utc(after[0]), after[1], after[2]) if after else (None, None, None)
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(_Q["arrivals_between"], utc(since), utc(until), *cursor, limit)
        return [_arrival(row) for row in found]

    async def latest_arrival(self, source: str, conversion_id: str) -> StoredArrival | None:
        async with self._conn(transaction=False) as conn:
            row = await conn.fetchrow(_Q["latest_arrival"], source, conversion_id)
        return None if row is None else _arrival(row)

    async def add_deliveries(self, items: Sequence[NewDelivery], now: datetime) -> list[str]:
        at = utc(now)
        added = []
        async with self._conn() as conn:
            for d in items:
                found = await _insert(conn, d, at, None)
                if found:
                    added.append(found)
        return added

    async def resend(self, delivery_id: str, now: datetime) -> DeliveryRow | None:
        at = utc(now)
        async with self._conn() as conn:
            row = await conn.fetchrow(_Q["resend_source"], delivery_id)
            if row is None:
                return None
            check_resendable(delivery_id, row[1])
            pk, seq = row[2], row[3]
            new_seq = int(await conn.fetchval(_Q["last_seq"], pk)) + 1
            await conn.execute(_Q["copy_arrival"], pk, seq, new_seq, at, row[0])
            new = rows.resend_new(row, new_seq)
            new_id = await _insert(conn, new, at, row[0])
        return rows.resent_row(new, new_id, at)

    async def resend_of(self, delivery_id: str) -> str | None:
        async with self._conn(transaction=False) as conn:
            found = await conn.fetchval(_Q["resend_of"], delivery_id)
        return None if found is None else str(found)

    async def delivery_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedDelivery], str | None]:
        after, after_id = decode_cursor(cursor) if cursor else (None, None)
        args = (
            flt.state.value if flt.state else None,
            flt.postback_id,
            flt.action,
            flt.conversion_id,
            _opt(flt.since),
            _opt(flt.until),
            flt.offer,
            flt.affiliate,
            flt.trigger,
            _opt(after),
            after_id,
            limit + 1,
        )
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(_Q["delivery_log"], *args)
        return rows.delivery_log_page(found, limit, utc)

    async def conversion_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedConversion], str | None]:
        after, after_pk = decode_conversion_cursor(cursor)
        args = (
            flt.status.value if flt.status else None,
            flt.conversion_id,
            _opt(flt.since),
            _opt(flt.until),
            flt.offer,
            flt.affiliate,
            flt.trigger,
            flt.postback_id,
            flt.action,
            flt.state.value if flt.state else None,
            _opt(after),
            after_pk,
            limit + 1,
        )
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(_Q["conversion_log"], *args)
        return rows.conversion_log_page(found, limit, utc)


def _opt(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)
