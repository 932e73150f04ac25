"""Resend, replay and backfill in the SQLite store (issue 18): the methods SQLiteStore takes
from this mixin. Each write is one job of the group-commit writer (all or nothing)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

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
    from_us,
    new_delivery_id,
    opt_us,
    to_us,
)
from daemon.store.queries import parse_queries

T = TypeVar("T")
_Q = parse_queries(
    resources.files("daemon.store").joinpath("sql", "sqlite_replay_queries.sql").read_text("utf-8")
)


def _arrival(row: Sequence[Any]) -> StoredArrival:
    return rows.stored_arrival(row, from_us, json.loads(row[8]) if row[8] else ())


def _insert(conn: sqlite3.Connection, d: NewDelivery, now: int, resend_of: str | None) -> str:
    """Insert one delivery unless its (arrival, postback) has one; its id, or "" if skipped."""
    delivery_id = new_delivery_id(from_us(now))
    args = {
        "id": delivery_id,
        "pk": d.conversion_pk,
        "seq": d.seq,
        "source": d.source,
        "conversion_id": d.conversion_id,
        "postback_id": d.planned.postback_id,
        "action": d.planned.action,
        "destination": d.planned.destination,
        "affiliate_owner": d.planned.affiliate_owner,
        "idempotency_key": idempotency_key(d.source, d.conversion_id, d.seq, d.planned.postback_id),
        "now": now,
        "resend_of": resend_of,
    }
    return delivery_id if conn.execute(_Q["insert_delivery_once"], args).rowcount == 1 else ""


class SQLiteReplay:
    """Mixin: needs the store's `_write` and `_read` (one job in one transaction each)."""

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def arrivals_between(
        self,
        since: datetime,
        until: datetime,
        after: tuple[datetime, int, int] | None,
        limit: int,
    ) -> list[StoredArrival]:
        args = {
            "since": to_us(since),
            "until": to_us(until),
            "after_received": opt_us(after[0]) if after else None,
            "after_pk": after[1] if after else None,
            "after_seq": after[2] if after else None,
            "limit": limit,
        }
        found = await self._read(lambda c: c.execute(_Q["arrivals_between"], args).fetchall())
        return [_arrival(row) for row in found]

    async def latest_arrival(self, source: str, conversion_id: str) -> StoredArrival | None:
        args = {"source": source, "conversion_id": conversion_id}
        row = await self._read(lambda c: c.execute(_Q["latest_arrival"], args).fetchone())
        return None if row is None else _arrival(row)

    async def add_deliveries(self, items: Sequence[NewDelivery], now: datetime) -> list[str]:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> list[str]:
            return [i for i in (_insert(conn, d, at, None) for d in items) if i]

        return await self._write(job)

    async def resend(self, delivery_id: str, now: datetime) -> DeliveryRow | None:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> DeliveryRow | None:
            row = conn.execute(_Q["resend_source"], {"id": delivery_id}).fetchone()
            if row is None:
                return None
            check_resendable(delivery_id, row[1])
            pk, seq = row[2], row[3]
            new_seq = conn.execute(_Q["last_seq"], {"pk": pk}).fetchone()[0] + 1
            copy = {"pk": pk, "seq": seq, "new_seq": new_seq, "now": at, "resend_of": row[0]}
            conn.execute(_Q["copy_arrival"], copy)
            new = rows.resend_new(row, new_seq)
            return rows.resent_row(new, _insert(conn, new, at, row[0]), from_us(at))

        return await self._write(job)

    async def resend_of(self, delivery_id: str) -> str | None:
        row = await self._read(lambda c: c.execute(_Q["resend_of"], {"id": delivery_id}).fetchone())
        return None if row is None else row[0]

    async def delivery_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedDelivery], str | None]:
        after, after_id = decode_cursor(cursor) if cursor else (None, None)
        args = {**_log_args(flt), "after_created": opt_us(after), "after_id": after_id}
        args["limit"] = limit + 1
        found = await self._read(lambda c: c.execute(_Q["delivery_log"], args).fetchall())
        return rows.delivery_log_page(found, limit, from_us)

    async def conversion_log(
        self, flt: LogFilter, limit: int, cursor: str | None
    ) -> tuple[list[LoggedConversion], str | None]:
        after, after_pk = decode_conversion_cursor(cursor)
        args = {
            **_log_args(flt),
            "status": flt.status.value if flt.status else None,
            "after_updated": opt_us(after),
            "after_pk": after_pk,
            "limit": limit + 1,
        }
        found = await self._read(lambda c: c.execute(_Q["conversion_log"], args).fetchall())
        return rows.conversion_log_page(found, limit, from_us)


def _log_args(flt: LogFilter) -> dict[str, Any]:
    return {
        "state": flt.state.value if flt.state else None,
        "postback_id": flt.postback_id,
        "action": flt.action,
        "conversion_id": flt.conversion_id,
        "since": opt_us(flt.since),
        "until": opt_us(flt.until),
        "offer": flt.offer,
        "affiliate": flt.affiliate,
        "trigger": flt.trigger,
    }
