"""Affiliate postbacks in the SQLite store (issue 15): the methods SQLiteStore takes from this
mixin. Every write is one job of the group-commit writer: all or nothing
(daemon/store/sqlite_writer.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

from daemon.store import rows
from daemon.store.affiliate_types import (
    AffiliateChanges,
    AuditRow,
    PostbackChange,
    QuotaExceeded,
    StoredPostback,
    StoredSecret,
    Who,
)
from daemon.store.common import from_us, to_us
from daemon.store.queries import parse_queries

T = TypeVar("T")
_Q = parse_queries(
    resources.files("daemon.store")
    .joinpath("sql", "sqlite_affiliate_queries.sql")
    .read_text("utf-8")
)


def _postback(row: Sequence[Any]) -> StoredPostback:
    return rows.stored_postback(row, from_us)


def _next_seq(conn: sqlite3.Connection) -> int:
    """The version this write will set (the writer is alone: nothing else bumps it meanwhile)."""
    return int(conn.execute(_Q["version"]).fetchone()[0]) + 1


def _audit(
    conn: sqlite3.Connection,
    pid: int,
    now: int,
    who: Who,
    change: str,
    before: StoredPostback | None,
    after: StoredPostback | None,
) -> None:
    conn.execute(
        _Q["insert_audit"],
        {
            "id": pid,
            "now": now,
            "who": rows.dumps(who.as_dict()),
            "change": change,
            "before": rows.dumps(before.snapshot()) if before else None,
            "after": rows.dumps(after.snapshot()) if after else None,
        },
    )


def _select(conn: sqlite3.Connection, pid: int) -> StoredPostback | None:
    row = conn.execute(_Q["select_postback"], {"id": pid}).fetchone()
    return _postback(row) if row is not None else None


class SQLiteAffiliates:
    """Mixin: needs the store's `_write` and `_read` (one job in one transaction each)."""

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def affiliate_changes(self, since: int) -> AffiliateChanges:
        def job(conn: sqlite3.Connection) -> AffiliateChanges:
            version = int(conn.execute(_Q["version"]).fetchone()[0])
            if version <= since:
                return AffiliateChanges(version)
            # Every one on a first fetch; else the few changed since, through change_seq.
            postbacks, secrets_query = (
                ("changed_postbacks", "changed_secrets")
                if since > 0
                else ("all_postbacks", "all_secrets")
            )
            found = conn.execute(_Q[postbacks], {"since": since}).fetchall()
            secrets = conn.execute(_Q[secrets_query], {"since": since}).fetchall()
            return AffiliateChanges(
                version,
                [_postback(r) for r in found],
                [StoredSecret(r[0], r[1], r[2], r[3]) for r in secrets],
            )

        return await self._read(job)

    async def create_affiliate_postback(
        self,
        affiliate: str,
        change: PostbackChange,
        who: Who,
        now: datetime,
        max_live: int | None,
    ) -> StoredPostback:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> StoredPostback:
            if max_live is not None:
                count = conn.execute(_Q["count_live"], {"affiliate": affiliate}).fetchone()[0]
                if count >= max_live:
                    raise QuotaExceeded(count)
            seq = _next_seq(conn)
            cursor = conn.execute(
                _Q["insert_postback"],
                {
                    "affiliate": affiliate,
                    "offer": change.offer,
                    "status": change.status,
                    "status_reason": change.status_reason,
                    "body": rows.dumps(change.body),
                    "now": at,
                    "seq": seq,
                },
            )
            assert cursor.lastrowid is not None
            created = _select(conn, cursor.lastrowid)
            assert created is not None
            conn.execute(_Q["bump_version"])
            _audit(conn, created.id, at, who, "create", None, created)
            return created

        return await self._write(job)

    async def update_affiliate_postback(
        self,
        pid: int,
        expected_seq: int,
        change: PostbackChange,
        who: Who,
        kind: str,
        now: datetime,
    ) -> StoredPostback | None:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> StoredPostback | None:
            before = _select(conn, pid)
            seq = _next_seq(conn)
            args = {
                "id": pid,
                "expected": expected_seq,
                "offer": change.offer,
                "status": change.status,
                "status_reason": change.status_reason,
                "body": rows.dumps(change.body),
                "now": at,
                "seq": seq,
            }
            if before is None or conn.execute(_Q["update_postback"], args).rowcount != 1:
                return None
            conn.execute(_Q["bump_version"])
            after = _select(conn, pid)
            if change.status != "active":
                conn.execute(_Q["cancel_deliveries"], {"id": pid, "now": at})
            _audit(conn, pid, at, who, kind, before, after)
            return after

        return await self._write(job)

    async def delete_affiliate_postback(
        self, pid: int, expected_seq: int, who: Who, now: datetime
    ) -> bool:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> bool:
            before = _select(conn, pid)
            args = {"id": pid, "expected": expected_seq, "now": at, "seq": _next_seq(conn)}
            if before is None or conn.execute(_Q["delete_postback"], args).rowcount != 1:
                return False
            conn.execute(_Q["bump_version"])
            conn.execute(_Q["cancel_deliveries"], {"id": pid, "now": at})
            _audit(conn, pid, at, who, "delete", before, None)
            return True

        return await self._write(job)

    async def affiliate_history(
        self, pid: int, after: int = 0, limit: int | None = None
    ) -> list[AuditRow]:
        def job(conn: sqlite3.Connection) -> list[AuditRow]:
            args = {"id": pid, "after": after, "limit": -1 if limit is None else limit}
            found = conn.execute(_Q["history"], args).fetchall()
            return [rows.audit_row(r, from_us) for r in found]

        return await self._read(job)

    async def set_affiliate_secret(
        self, affiliate: str, name: str, value: str | None, now: datetime
    ) -> bool:
        at = to_us(now)

        def job(conn: sqlite3.Connection) -> bool:
            args = {"affiliate": affiliate, "name": name, "now": at, "seq": _next_seq(conn)}
            if value is None:
                changed = conn.execute(_Q["delete_secret"], args).rowcount == 1
            else:
                changed = conn.execute(_Q["upsert_secret"], {**args, "value": value}).rowcount > 0
            if changed:
                conn.execute(_Q["bump_version"])
            return changed

        return await self._write(job)

    async def affiliate_secret_names(self, affiliate: str) -> list[str]:
        def job(conn: sqlite3.Connection) -> list[str]:
            found = conn.execute(_Q["secret_names"], {"affiliate": affiliate}).fetchall()
            return [r[0] for r in found]

        return await self._read(job)
