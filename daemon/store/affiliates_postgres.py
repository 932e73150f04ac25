"""Affiliate postbacks in the PostgreSQL store (issue 15): the methods PostgresStore takes from
this mixin, and the listener that hears other nodes' changes.

Writers take the affiliate_state row first (UPDATE ... RETURNING version): changes commit in
version order, so a node that has every change up to version V misses none below it. Each
change sends NOTIFY postbackd_affiliates (delivered at commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from daemon.log import get_logger
from daemon.store import rows
from daemon.store.affiliate_types import (
    NOTIFY_CHANNEL,
    AffiliateChanges,
    AuditRow,
    PostbackChange,
    QuotaExceeded,
    StoredPostback,
    StoredSecret,
    Who,
)
from daemon.store.common import utc
from daemon.store.queries import parse_queries

log = get_logger("postbackd.store")

_Q = parse_queries(
    resources.files("daemon.store")
    .joinpath("sql", "postgres_affiliate_queries.sql")
    .read_text("utf-8")
)


class _Unchanged(Exception):
    """Rolls a write back when its row is gone or changed meanwhile."""


def _postback(row: Sequence[Any]) -> StoredPostback:
    return rows.stored_postback(row, utc)


async def _bump(conn: Any) -> int:
    seq = int(await conn.fetchval(_Q["bump_version"]))
    await conn.execute(_Q["notify"], NOTIFY_CHANNEL, str(seq))
    return seq


async def _audit(
    conn: Any,
    pid: int,
    now: datetime,
    who: Who,
    change: str,
    before: StoredPostback | None,
    after: StoredPostback | None,
) -> None:
    await conn.execute(
        _Q["insert_audit"],
        pid,
        now,
        rows.dumps(who.as_dict()),
        change,
        rows.dumps(before.snapshot()) if before else None,
        rows.dumps(after.snapshot()) if after else None,
    )


class PostgresAffiliates:
    """Mixin: needs the store's `_conn` (a pooled connection, in a transaction by default)."""

    _dsn: str

    def _conn(self, *, transaction: bool = True) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def affiliate_changes(self, since: int) -> AffiliateChanges:
        async with self._conn() as conn:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            version = int(await conn.fetchval(_Q["version"]))
            if version <= since:
                return AffiliateChanges(version)
            found = await conn.fetch(_Q["changed_postbacks"], since)
            secrets = await conn.fetch(_Q["changed_secrets"], since)
            return AffiliateChanges(
                version,
                [_postback(r) for r in found],
                [StoredSecret(r[0], r[1], r[2], r[3]) for r in secrets],
            )

    async def create_affiliate_postback(
        self,
        affiliate: str,
        change: PostbackChange,
        who: Who,
        now: datetime,
        max_live: int | None,
    ) -> StoredPostback:
        async with self._conn() as conn:
            seq = await _bump(conn)  # first: it serialises the count below across nodes
            if max_live is not None:
                count = int(await conn.fetchval(_Q["count_live"], affiliate))
                if count >= max_live:
                    raise QuotaExceeded(count)
            row = await conn.fetchrow(
                _Q["insert_postback"],
                affiliate,
                change.offer,
                change.status,
                change.status_reason,
                rows.dumps(change.body),
                now,
                seq,
            )
            created = _postback(row)
            await _audit(conn, created.id, now, who, "create", None, created)
            return created

    async def update_affiliate_postback(
        self,
        pid: int,
        expected_seq: int,
        change: PostbackChange,
        who: Who,
        kind: str,
        now: datetime,
    ) -> StoredPostback | None:
        try:
            async with self._conn() as conn:
                seq = await _bump(conn)
                found = await conn.fetchrow(_Q["select_postback"], pid)
                row = await conn.fetchrow(
                    _Q["update_postback"],
                    pid,
                    expected_seq,
                    change.offer,
                    change.status,
                    change.status_reason,
                    rows.dumps(change.body),
                    now,
                    seq,
                )
                if found is None or row is None:
                    raise _Unchanged
                after = _postback(row)
                if change.status != "active":
                    await conn.execute(_Q["cancel_deliveries"], pid, now)
                await _audit(conn, pid, now, who, kind, _postback(found), after)
                return after
        except _Unchanged:
            return None

    async def delete_affiliate_postback(
        self, pid: int, expected_seq: int, who: Who, now: datetime
    ) -> bool:
        try:
            async with self._conn() as conn:
                seq = await _bump(conn)
                found = await conn.fetchrow(_Q["select_postback"], pid)
                row = await conn.fetchrow(_Q["delete_postback"], pid, expected_seq, now, seq)
                if found is None or row is None:
                    raise _Unchanged
                await conn.execute(_Q["cancel_deliveries"], pid, now)
                await _audit(conn, pid, now, who, "delete", _postback(found), None)
                return True
        except _Unchanged:
            return False

    async def affiliate_history(
        self, pid: int, after: int = 0, limit: int | None = None
    ) -> list[AuditRow]:
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(_Q["history"], pid, after, limit)
        return [rows.audit_row(r, utc) for r in found]

    async def set_affiliate_secret(
        self, affiliate: str, name: str, value: str | None, now: datetime
    ) -> bool:
        try:
            async with self._conn() as conn:
                seq = await _bump(conn)
                if value is None:
                    status = await conn.execute(_Q["delete_secret"], affiliate, name, now, seq)
                else:
                    status = await conn.execute(
                        _Q["upsert_secret"], affiliate, name, value, now, seq
                    )
                if status.endswith(" 0"):
                    raise _Unchanged
                return True
        except _Unchanged:
            return False

    async def affiliate_secret_names(self, affiliate: str) -> list[str]:
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(_Q["secret_names"], affiliate)
        return [r[0] for r in found]

    async def listen_affiliate_changes(
        self, wake: Callable[[], None], connected: Callable[[], None] | None = None
    ) -> None:
        """LISTEN on a dedicated connection until cancelled (see :func:`listen`)."""
        await listen(self._dsn, wake, connected)


PING_EVERY = 10.0  # a connection that died without a word is found out this fast


async def listen(
    dsn: str,
    wake: Callable[[], None],
    connected: Callable[[], None] | None = None,
    retry: float = 1.0,
) -> None:
    """Call `wake` on every change a node announces; reconnect whenever the dedicated connection
    drops, and wake once after each (re)connection (changes may have been missed meanwhile).
    `connected` is called once listening (tests wait for it). Runs until cancelled."""
    while True:
        conn: Any = None
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_args: wake())
            wake()
            if connected is not None:
                connected()
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), PING_EVERY)
                except TimeoutError:
                    await conn.fetchval("SELECT 1", timeout=PING_EVERY)
            log.warning("affiliate_listener_lost")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            log.warning("affiliate_listener_failed", error=err.__class__.__name__)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()
        await asyncio.sleep(retry)
