"""The PostgreSQL store (asyncpg): shared by several nodes, claims with FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from daemon.errors import StoreError
from daemon.models import Conversion, Status
from daemon.store import rows
from daemon.store.affiliates_postgres import PostgresAffiliates
from daemon.store.base import (
    LIVE_STATES,
    ArrivalResult,
    AttemptRow,
    Claim,
    ConversionRow,
    DeliveryDetail,
    DeliveryFilter,
    DeliveryRow,
    DeliveryState,
    Finish,
    FinishResult,
    LeaseAhead,
    Planner,
)
from daemon.store.common import (
    ArrivalWrite,
    ConversionUpdate,
    FinishItems,
    StoredConversion,
    check_finish,
    conversion_fields,
    decode_cursor,
    encode_cursor,
    lease_token,
    prepare_arrival,
    utc,
)
from daemon.store.postgres_batch import ArrivalLease, NewArrival, NewArrivals, Written, batch_args
from daemon.store.postgres_schema import apply_migrations
from daemon.store.queries import load_queries, log_migrated
from daemon.store.replay_postgres import PostgresReplay

PRUNE_BATCH = 500
# InternalClientError: a connection the server dropped can fail its next BEGIN with it.
_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


@asynccontextmanager
async def _errors() -> AsyncIterator[None]:
    """Every driver or network failure leaves as StoreError (never a raw asyncpg error)."""
    try:
        yield
    except _FAILURES as err:
        raise StoreError(f"postgresql: {err.__class__.__name__}: {err}") from err


async def _keep_session(conn: Any) -> None:
    """How a connection goes back to the pool: as it is. asyncpg's default sends a reset query
    (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) on every release, one more round trip
    per store call; the store leaves none of those behind on a pool connection (no advisory
    locks, cursors, LISTEN or SET there: migrations and LISTEN have connections of their own).
    An open transaction is still rolled back by the pool before this is called."""


KNOWN_MAX = 100_000  # conversions remembered per node (about 15 MiB at most)


class PostgresStore(PostgresAffiliates, PostgresReplay):
    """A Store on a PostgreSQL database that several postbackd nodes may share."""

    # The Recorder gathers results that end together into one finish_attempts: one round trip
    # for all of them instead of one each.
    batches_results = True
    # An arrival's new deliveries may be leased to the node as they are written (LeaseAhead): a
    # new conversion's in its batched statement, a stored conversion's in its transaction.
    leases_at_insert = True
    # ... while at most LEASE_AT_INSERT_MAX of the node's attempts are not yet sent (in line
    # for a slot or sending): a result's commit takes a round trip to the server, so attempts
    # that have sent and wait for it fill any bound on all attempts in progress while the
    # node is far from busy (docs/benchmarks.md, run Q).
    lease_bound_unsent = True

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self._dsn = dsn
        self._pool_size = (min_size, max_size)
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._settings = {"application_name": "postbackd", **(server_settings or {})}
        self._q = load_queries("postgres")
        self._pool: Any = None
        # Conversions this node has stored lately: their next arrival goes straight to the
        # locking path; any other is tried as new in one round trip (arrive_new_batch), with
        # the other new arrivals of the moment (daemon/store/postgres_batch.py).
        self._known: dict[tuple[str, str], None] = {}
        self._new_arrivals = NewArrivals(self._arrive_batch)

    async def migrate(self) -> list[str]:
        """Apply pending migrations (under the advisory lock); the names applied."""
        async with _errors():
            conn = await asyncpg.connect(
                self._dsn, timeout=self._connect_timeout, server_settings=self._settings
            )
            try:
                return await apply_migrations(conn)
            finally:
                await conn.close()

    async def open(self) -> None:
        log_migrated(await self.migrate())
        async with _errors():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_size[0],
                max_size=self._pool_size[1],
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings=self._settings,
                reset=_keep_session,
            )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            async with _errors():
                await pool.close()

    @asynccontextmanager
    async def _conn(
        self, *, transaction: bool = True, committed: Callable[[], None] | None = None
    ) -> AsyncIterator[Any]:
        """A pool connection, in a transaction unless told otherwise; `committed` is called
        once the transaction has committed, before the connection goes back to the pool (a
        cancellation while it does cannot hide the commit)."""
        if self._pool is None:
            raise StoreError("the store is not open")
        async with _errors(), self._pool.acquire() as conn:
            if not transaction:
                yield conn
                return
            async with conn.transaction():
                yield conn
            if committed is not None:
                committed()

    async def _statement(self, method: str, query: str, *args: Any) -> Any:
        """One statement on a pool connection, atomic on its own (no BEGIN/COMMIT): `method`
        is the connection's (fetch, fetchval, execute). What _conn(transaction=False) does,
        without its two generator-based context managers: this is every hot path's call."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        try:
            conn = await pool.acquire()
            try:
                return await getattr(conn, method)(query, *args)
            finally:
                await pool.release(conn)
        except _FAILURES as err:
            raise StoreError(f"postgresql: {err.__class__.__name__}: {err}") from err

    async def ping(self) -> None:
        async with self._conn(transaction=False) as conn:
            await conn.fetchval("SELECT 1")

    async def record_arrival(
        self,
        source: str,
        conversion: Conversion,
        received_at: datetime,
        plan: Planner,
        lease: LeaseAhead | None = None,
    ) -> ArrivalResult:
        now = utc(received_at)
        key = (source, conversion.conversion_id)
        if key not in self._known:
            fast = await self._arrive_new(source, conversion, now, plan, lease)
            self._remember(key)
            if fast is not None:
                return fast
            # Stored already (by another node, or by this node's arrival still on its way when
            # this one came: a status change right behind its pending arrival). The statement
            # settled the offer as not written; the locking path below asks it again, so that
            # the deliveries of the status change are leased as this node's own would be.
            if lease is not None:
                lease.reopen()
        # A conversion this node stored lately (a status change, a duplicate): its arrival in
        # a transaction that locks the conversion, its deliveries leased when the offer takes
        # them, and the offer settled once the transaction has ended, committed or not.
        done: list[bool] = []
        try:
            async with self._conn(committed=lambda: done.append(True)) as conn:
                pk, stored = await self._lock_or_insert(conn, source, conversion, now)
                write = prepare_arrival(source, conversion, now, stored, plan)
                if write.update is ConversionUpdate.FULL:
                    await conn.execute(
                        self._q["update_conversion"],
                        pk,
                        write.status.value,
                        write.status_event_time,
                        rows.dumps(write.fields),
                        now,
                    )
                elif write.update is ConversionUpdate.TOUCH:
                    await conn.execute(self._q["touch_conversion"], pk, now)
                await self._write_arrival(conn, source, conversion, pk, write, now, lease)
        finally:
            if lease is not None:
                lease.settle(bool(done))
        return write.result(source, conversion.conversion_id)

    def _remember(self, key: tuple[str, str]) -> None:
        known = self._known
        known[key] = None
        if len(known) > KNOWN_MAX:
            del known[next(iter(known))]  # the oldest (dicts keep insertion order)

    async def _arrive_new(
        self,
        source: str,
        conversion: Conversion,
        now: datetime,
        plan: Planner,
        lease: LeaseAhead | None = None,
    ) -> ArrivalResult | None:
        """A new conversion in one round trip (arrive_new_batch, with the other new arrivals of
        the moment), or None when it exists already (nothing written: the caller takes the
        locking path). The plan is made for a new conversion before the statement. Only for a
        conversion this node has not stored lately (record_arrival): when another node stored
        it, the locking path asks the planner again, for the real transition, and only that
        plan is written. With `lease`, the deliveries are leased to its node when it takes them,
        and the claims are made from the arrival's data and values as the server stored them."""
        write = prepare_arrival(source, conversion, now, None, plan)
        leased = None
        if lease is not None and lease.take([d.planned for d in write.deliveries]):
            leased = self._leased_at_insert(source, conversion.conversion_id, now, write, lease)
        arrival = NewArrival(
            source,
            conversion.conversion_id,
            conversion.status.value,
            conversion.event_time,
            rows.dumps(write.fields),
            now,
            write.transition.value,
            rows.dumps(write.data),
            rows.dumps(write.values),
            write.deliveries,
            leased,
        )
        pk = await self._new_arrivals.arrive(arrival)
        return None if pk is None else write.result(source, conversion.conversion_id)

    @staticmethod
    def _leased_at_insert(
        source: str, cid: str, now: datetime, write: ArrivalWrite, lease: LeaseAhead
    ) -> ArrivalLease:
        """The lease of an arrival's deliveries, and what makes their claims once written."""
        tokens = [lease_token() for _ in write.deliveries]

        def written(answer: Written | None) -> None:
            if answer is not None:
                _, data, values = answer
                # the statement returns both for an arrival whose deliveries it leased
                assert data is not None
                assert values is not None
                lease.claims = rows.leased_claims(write, tokens, source, cid, now, data, values)
            lease.settle(answer is not None)

        return ArrivalLease(lease.node, now + lease.lease, tokens, written)

    async def _arrive_batch(self, arrivals: Sequence[NewArrival]) -> list[Written]:
        found = await self._statement("fetch", self._q["arrive_new_batch"], *batch_args(arrivals))
        return [(row[0], row[1], row[2]) for row in found]

    async def _lock_or_insert(
        self, conn: Any, source: str, conversion: Conversion, now: datetime
    ) -> tuple[int, StoredConversion | None]:
        """Insert the conversion as new (stored None), or lock and read the existing row.

        When two nodes insert the same new conversion at once, ON CONFLICT makes the second
        wait for the first to commit and then find its row, which it locks: the conversion is
        stored once and is `new` once. A row that prune deletes between the two statements is
        inserted again on the next turn.
        """
        args = (source, conversion.conversion_id)
        fields = rows.dumps(conversion_fields(conversion))
        event_time = conversion.event_time
        for _ in range(3):
            pk = await conn.fetchval(
                self._q["insert_conversion"],
                *args,
                conversion.status.value,
                event_time,
                fields,
                now,
            )
            if pk is not None:
                return pk, None
            row = await conn.fetchrow(self._q["lock_conversion"], *args)
            if row is not None:
                last_seq = await conn.fetchval(self._q["last_seq"], row[0])
                stored = StoredConversion(
                    row[0], Status(row[1]), row[2], json.loads(row[3]), last_seq
                )
                return stored.pk, stored
        raise StoreError("postgresql: the conversion row keeps disappearing (concurrent prune)")

    async def _write_arrival(
        self,
        conn: Any,
        source: str,
        conversion: Conversion,
        pk: int,
        write: ArrivalWrite,
        now: datetime,
        lease: LeaseAhead | None = None,
    ) -> None:
        """The arrival and its deliveries, inside the caller's transaction: queued, or leased
        to the node when `lease` takes them (their claims made from the arrival's data and
        values as the server stored them, as _arrive_new's)."""
        cid = conversion.conversion_id
        arrival = (
            pk,
            write.seq,
            write.transition.value,
            conversion.status.value,
            conversion.event_time,
            now,
            rows.dumps(write.data),
            rows.dumps(write.values),
        )
        queued = rows.delivery_rows(write, pk, source, cid, now)
        if not queued or lease is None or not lease.take([d.planned for d in write.deliveries]):
            await conn.execute(self._q["insert_arrival"], *arrival)
            if queued:
                await conn.executemany(self._q["insert_delivery"], queued)
            return
        data, values = await conn.fetchrow(self._q["insert_arrival_stored"], *arrival)
        tokens = [lease_token() for _ in queued]
        until = now + lease.lease
        await conn.executemany(
            self._q["insert_delivery_leased"],
            [(*row, lease.node, token, until) for row, token in zip(queued, tokens, strict=True)],
        )
        lease.claims = rows.leased_claims(write, tokens, source, cid, now, data, values)

    async def claim_due(
        self,
        node: str,
        now: datetime,
        limit: int,
        lease: timedelta,
        skip_affiliates: Collection[str] = (),
        skip_destinations: Collection[str] = (),
    ) -> list[Claim]:
        now = utc(now)
        args = (now, limit, node, now + lease, sorted(skip_affiliates))
        if skip_destinations:
            query = self._q["claim_due_skipping"]
            found = await self._statement("fetch", query, *args, sorted(skip_destinations))
        else:
            found = await self._statement("fetch", self._q["claim_due"], *args)
        return [rows.claim(row, utc) for row in found]

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        due = check_finish(state, next_attempt_at)
        values = _finish_values(Finish(claim, attempt, state, next_attempt_at), due)
        n = await self._statement("fetchval", self._q["finish_and_record"], *values)
        return n is not None

    async def finish_attempts(self, finishes: Sequence[Finish]) -> list[FinishResult]:
        """Every item in one statement (finish_many: one round trip, atomic). When the server
        refuses it (a row of it refused, a deadlock with another node's statement), nothing was
        written and each item is written again on its own, so that one item's failure stays its
        own. When the connection or the server fails, whether it committed is not known: the
        StoreError is every item's (each left to its lease, as one statement each would be)."""
        items = FinishItems(
            finishes, lambda item: (item, check_finish(item.state, item.next_attempt_at))
        )
        if not items.todo:
            return items.outcome()
        columns: tuple[list[Any], ...] = tuple([] for _ in range(15))
        for _, (item, due) in items.todo:
            for column, value in zip(columns, _finish_values(item, due), strict=True):
                column.append(value)
        try:
            found = await self._statement("fetch", self._q["finish_many"], *columns)
        except StoreError as err:
            cause = err.__cause__
            if not isinstance(cause, asyncpg.PostgresError) or not _refused(cause):
                raise  # the connection or the server: whether it committed is not known
            found = None  # refused as a whole, nothing written: each item again, apart
        if found is None:
            for i, (item, _) in items.todo:
                try:
                    items.results[i] = await self.finish_attempt(
                        item.claim, item.attempt, item.state, item.next_attempt_at
                    )
                except StoreError as err:
                    items.results[i] = err
            return items.outcome()
        held = {row[0] for row in found}  # the items' numbers, from 1
        for k, (i, _) in enumerate(items.todo, 1):
            items.results[i] = k in held
        return items.outcome()

    async def release(self, claim: Claim, now: datetime) -> bool:
        args = (claim.delivery_id, claim.token, utc(now))
        return await self._count("release_delivery", *args) == 1

    async def hold(self, claim: Claim, until: datetime, now: datetime) -> bool:
        args = (claim.delivery_id, claim.token, utc(until), utc(now))
        return await self._count("hold_delivery", *args) == 1

    async def unhold(self, destination: str, now: datetime, limit: int | None = None) -> int:
        return await self._count("unhold_destination", destination, utc(now), limit)

    async def recover(self, node: str, now: datetime) -> int:
        return await self._count("recover_node", node, utc(now))

    async def cancel_postbacks(self, postback_ids: Collection[int], now: datetime) -> int:
        return await self._count("cancel_postbacks", sorted(postback_ids), utc(now))

    async def requeue(self, delivery_ids: Collection[str], now: datetime) -> int:
        return await self._count("requeue", sorted(delivery_ids), utc(now))

    async def requeue_matching(self, flt: DeliveryFilter, now: datetime) -> int:
        return await self._count("requeue_matching", *_filter_args(flt), utc(now))

    async def _count(self, query: str, *args: Any) -> int:
        """Run one write statement (atomic on its own: no BEGIN/COMMIT round trips); the
        number of rows it changed."""
        status: str = await self._statement("execute", self._q[query], *args)
        return int(status.rsplit(" ", 1)[-1])

    async def get_delivery(self, delivery_id: str) -> DeliveryDetail | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["get_delivery"], delivery_id)
            if row is None:
                return None
            found = await conn.fetch(self._q["get_attempts"], delivery_id)
        attempts = [rows.attempt_row(a, utc) for a in found]
        return DeliveryDetail(rows.delivery_row(row, utc), attempts)

    async def list_deliveries(
        self, flt: DeliveryFilter, limit: int, cursor: str | None
    ) -> tuple[list[DeliveryRow], str | None]:
        after_created, after_id = decode_cursor(cursor) if cursor else (None, None)
        # Postbacks without a conversion id: a page of each postback's own newest deliveries,
        # merged (the planner otherwise walked every newer delivery for an affiliate whose
        # deliveries were old); a conversion's few deliveries, or no postbacks: list_deliveries.
        each = flt.postback_ids is not None and flt.conversion_id is None
        query = self._q["list_postback_pages" if each else "list_deliveries"]
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(query, *_filter_args(flt), after_created, after_id, limit + 1)
        page = [rows.delivery_row(row, utc) for row in found[:limit]]
        more = len(found) > limit and page
        return page, encode_cursor(page[-1].created_at, page[-1].delivery_id) if more else None

    async def get_conversion(self, source: str, conversion_id: str) -> ConversionRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["get_conversion"], source, conversion_id)
            if row is None:
                return None
            arrivals = await conn.fetch(self._q["get_arrivals"], row[0])
        return ConversionRow(
            source=row[1],
            conversion_id=row[2],
            status=Status(row[3]),
            status_event_time=None if row[4] is None else utc(row[4]),
            fields=json.loads(row[5]),
            created_at=utc(row[6]),
            updated_at=utc(row[7]),
            arrivals=[rows.arrival_dict(a, utc) for a in arrivals],
        )

    async def queue_depth(self, live_only: bool = False) -> dict[DeliveryState, int]:
        query = self._q["queue_depth_live" if live_only else "queue_depth"]
        async with self._conn(transaction=False) as conn:
            found = await conn.fetch(query)
        return rows.depth(found, LIVE_STATES if live_only else DeliveryState)

    async def delivery_lag(self, now: datetime) -> float:
        async with self._conn(transaction=False) as conn:
            oldest: datetime | None = await conn.fetchval(self._q["oldest_due"])
        if oldest is None:
            return 0.0
        return max(0.0, (utc(now) - oldest).total_seconds())

    async def prune(self, before: datetime) -> int:
        """Deletes in batches, each its own transaction, so no lock is held for long."""
        total = 0
        while True:
            deleted = await self._count("prune_batch", utc(before), PRUNE_BATCH)
            total += deleted
            if deleted < PRUNE_BATCH:
                return total


def _finish_values(item: Finish, due: datetime | None) -> tuple[Any, ...]:
    """finish_and_record's parameters for one result (finish_many takes each as a column):
    the delivery's new state, then the attempt's row."""
    claim, attempt = item.claim, item.attempt
    started = utc(attempt.started_at)
    return (
        claim.delivery_id,
        claim.token,
        item.state.value,
        due,
        attempt.reason,
        started + timedelta(milliseconds=attempt.duration_ms),
        started,
        *rows.attempt_values(attempt),
    )


# SQLSTATE classes of a statement the server refused, nothing of it written: a value (22), a
# constraint (23), a deadlock or serialization failure (40).
_REFUSED_CLASSES = frozenset({"22", "23", "40"})


def _refused(err: asyncpg.PostgresError) -> bool:
    return str(getattr(err, "sqlstate", "") or "")[:2] in _REFUSED_CLASSES


def _filter_args(flt: DeliveryFilter) -> tuple[Any, ...]:
    ids = flt.postback_ids
    return (
        flt.state.value if flt.state else None,
        None if ids is None else sorted(ids),
        flt.conversion_id,
        None if flt.since is None else utc(flt.since),
    )
