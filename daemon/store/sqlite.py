"""The SQLite store: WAL, synchronous=FULL, every write through one group-commit writer."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from daemon.errors import StoreError
from daemon.models import Conversion, Status
from daemon.store import rows
from daemon.store.affiliates_sqlite import SQLiteAffiliates
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
    from_us,
    lease_token,
    lease_us,
    opt_from_us,
    opt_us,
    prepare_arrival,
    to_us,
)
from daemon.store.queries import load_queries, log_migrated
from daemon.store.replay_sqlite import SQLiteReplay
from daemon.store.sqlite_schema import apply_migrations
from daemon.store.sqlite_writer import CommitHook, GroupCommitWriter, store_error

T = TypeVar("T")
PRUNE_BATCH = 500
MIN_SQLITE = (3, 31, 0)  # generated columns


# Python's sqlite3 adapts every parameter that is not exactly an int, float, str or bytearray
# before binding it. For None (NULL: an event time not given, a postback of no affiliate, a
# lease not taken) it found no adapter, then asked its protocol for __adapt__, which raises an
# AttributeError with its message formatted and dropped, and None for __conform__: about
# 3,000 instructions a parameter, 0.27 us, 7 or 8 of them per delivered conversion (1.1 % of
# its instructions under callgrind). An adapter registered for None is found by one dict
# lookup and the rest is skipped; it returns the None it is given, so NULL is bound exactly as
# before. Registered for the process, as sqlite3's adapters are: every connection binds None
# the same way, faster. (Not registered for int, float or str: that would make sqlite3 adapt
# every parameter.)
def _bind_null(value: None) -> None:
    return value


sqlite3.register_adapter(type(None), _bind_null)


def connect(path: Path, busy_timeout: float, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the settings durability depends on; autocommit (we BEGIN ourselves)."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise sqlite3.NotSupportedError(
            f"SQLite {sqlite3.sqlite_version} is too old: postbackd needs 3.31 or newer"
        )
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        mode = _journal_wal(conn, busy_timeout)
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is required")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if readonly:
            conn.execute("PRAGMA query_only=ON")
        else:
            # The writer's statement journals (its batch's savepoint: the first copy of each
            # page a batch changes) stay in memory. On disk they went to a file in /var/tmp
            # once over 64 KiB, every batch under load: a full /var/tmp (or /tmp) then failed
            # every write with "database or disk is full" although the store's disk had room,
            # and the pages were written twice more (docs/benchmarks.md). Their size is that
            # of the pages one batch changes. Readers keep temp files: a large sort of theirs
            # does not grow the process.
            conn.execute("PRAGMA temp_store=MEMORY")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _journal_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Switch to WAL (a no-op once the file is in WAL). While another process opens the same new
    file and switches it too (worker processes starting together), SQLite can answer "database is
    locked" at once, without waiting for the busy timeout: retry until the timeout instead."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class SQLiteStore(SQLiteAffiliates, SQLiteReplay):
    """A Store on one SQLite file. Writes are group-committed; reads use their own threads."""

    # The Recorder writes results one by one: the writer already commits those that end
    # together in one transaction, and gathering them first saved little and cost at the
    # shipped per-host 8 (callgrind, 1,000 finishes through Recorder.finish, whole process, less
    # the same run without finishes: waves of 8 +9k instructions per finish, waves of 64 -17k).
    batches_results = False
    # An arrival's new deliveries may be leased to the node as they are written (LeaseAhead),
    # while at most LEASE_AT_INSERT_MAX of its attempts are in progress, sent or not. Results
    # commit here in a few milliseconds, so this node already leases nearly every delivery at
    # 1,000/s; counting only the unsent ones (PostgreSQL's bound) gained nothing here and
    # leased 8 to 50 % at saturation, where leasing once cost CPU (docs/benchmarks.md, run Q;
    # run P in docs/benchmarks-history.md).
    leases_at_insert = True
    lease_bound_unsent = False

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 5.0,
        max_batch: int = 512,
        readers: int = 2,
        on_commit: CommitHook | None = None,
    ) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._q = load_queries("sqlite")
        self._list_queries: dict[tuple[object, ...], str] = {}  # _list_query's statements
        self._writer = GroupCommitWriter(
            lambda: connect(path, busy_timeout), max_batch=max_batch, on_commit=on_commit
        )
        self._readers = readers
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def commits(self) -> int:
        """Write transactions committed so far (each may hold many requests)."""
        return self._writer.commits

    def backlog(self) -> int:
        """Write requests waiting for the writer thread."""
        return self._writer.backlog()

    async def migrate(self) -> list[str]:
        """Apply pending migrations; the names applied."""
        return await asyncio.to_thread(self._migrate_sync)

    def _migrate_sync(self) -> list[str]:
        try:
            conn = connect(self.path, self._busy_timeout)
        except sqlite3.Error as err:
            raise StoreError(f"sqlite: cannot open {self.path}: {err}") from err
        try:
            return apply_migrations(conn)
        except sqlite3.Error as err:
            raise store_error(err) from err
        finally:
            conn.close()

    async def open(self) -> None:
        log_migrated(await self.migrate())
        await asyncio.to_thread(self._writer.start)
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-reader")

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.stop)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True)
        with self._lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()

    async def _write(self, job: Callable[[sqlite3.Connection], T], on_loop: bool = False) -> T:
        """Run `job` in the writer's next transaction; `on_loop`: a short job, which may run on
        this event loop's thread (daemon.store.sqlite_writer)."""
        return await self._writer.submit(job, on_loop=on_loop)

    async def _read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` in one read transaction (a consistent snapshot) on a reader thread."""
        if self._pool is None:
            raise StoreError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read_sync, job)

    def _read_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = connect(self.path, self._busy_timeout, readonly=True)
                with self._lock:
                    self._read_conns.append(conn)
            conn.execute("BEGIN")
            try:
                return job(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise store_error(err) from err

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute(self._q["ping"]).fetchone())

    async def record_arrival(
        self,
        source: str,
        conversion: Conversion,
        received_at: datetime,
        plan: Planner,
        lease: LeaseAhead | None = None,
    ) -> ArrivalResult:
        now = to_us(received_at)
        cid = conversion.conversion_id
        # The row of a new conversion, encoded here on the event loop: the writer thread, which
        # every write waits for, only runs statements.
        new_row = (
            source,
            cid,
            conversion.status._value_,  # .value without its descriptor (per request)
            opt_us(conversion.event_time),
            rows.dumps(conversion_fields(conversion)),
            now,
        )
        q = self._q

        def job(conn: sqlite3.Connection) -> ArrivalResult:
            cursor = conn.execute(q["insert_conversion"], new_row)
            stored: StoredConversion | None = None
            if cursor.rowcount == 1:  # new: the row above is what prepare_arrival decides
                assert cursor.lastrowid is not None
                pk = cursor.lastrowid
            else:
                stored = self._stored(conn, source, cid)
                pk = stored.pk
            write = prepare_arrival(source, conversion, received_at, stored, plan)
            if stored is not None:
                self._update_conversion(conn, stored.pk, write, now)
            self._write_arrival(conn, source, conversion, pk, write, now, lease)
            return write.result(source, cid)

        # _write's own, without its coroutine layer
        return await self._writer.submit(
            job, lease.settle if lease is not None else None, on_loop=True
        )

    def _stored(
        self, conn: sqlite3.Connection, source: str, conversion_id: str
    ) -> StoredConversion:
        """The conversion row (it exists: its insert just found it)."""
        row = conn.execute(self._q["select_conversion"], (source, conversion_id)).fetchone()
        if row is None:  # cannot happen inside the write transaction; never guess
            raise StoreError("sqlite: the conversion row vanished inside its transaction")
        return StoredConversion(
            row[0], Status(row[1]), opt_from_us(row[2]), json.loads(row[3]), row[4]
        )

    def _update_conversion(
        self, conn: sqlite3.Connection, pk: int, write: ArrivalWrite, now: int
    ) -> None:
        if write.update is ConversionUpdate.FULL:
            conn.execute(
                self._q["update_conversion"],
                (
                    pk,
                    write.status.value,
                    opt_us(write.status_event_time),
                    rows.dumps(write.fields),
                    now,
                ),
            )
        elif write.update is ConversionUpdate.TOUCH:
            conn.execute(self._q["touch_conversion"], (pk, now))

    def _write_arrival(
        self,
        conn: sqlite3.Connection,
        source: str,
        conversion: Conversion,
        pk: int,
        write: ArrivalWrite,
        now: int,
        lease: LeaseAhead | None = None,
    ) -> None:
        seq = write.seq
        data, values = rows.dumps(write.data), rows.dumps(write.values)
        conn.execute(
            self._q["insert_arrival"],
            (
                pk,
                seq,
                write.transition._value_,  # .value without its descriptor
                conversion.status._value_,
                opt_us(conversion.event_time),
                now,
                data,
                values,
            ),
        )
        if not write.deliveries:
            return
        cid = conversion.conversion_id
        queued = rows.delivery_rows(write, pk, source, cid, now)
        if lease is None or not lease.take([d.planned for d in write.deliveries]):
            conn.executemany(self._q["insert_delivery"], queued)
            return
        # Leased to the node at insert, as claim_one leaves a claimed delivery, and a Claim of
        # each made from what the arrival row holds, as a claim reads it.
        node, until = lease.node, now + lease_us(lease.lease)
        tokens = [lease_token() for _ in queued]
        conn.executemany(
            self._q["insert_delivery_leased"],
            [(*row, node, token, until) for row, token in zip(queued, tokens, strict=True)],
        )
        lease.claims = rows.leased_claims(write, tokens, source, cid, from_us(now), data, values)

    async def claim_due(
        self,
        node: str,
        now: datetime,
        limit: int,
        lease: timedelta,
        skip_affiliates: Collection[str] = (),
        skip_destinations: Collection[str] = (),
    ) -> list[Claim]:
        args = {
            "now": to_us(now),
            "limit": limit,
            "skip_affiliates": json.dumps(sorted(skip_affiliates)),
            "skip_destinations": json.dumps(sorted(skip_destinations)),
        }
        query = "claim_candidates_skipping" if skip_destinations else "claim_candidates"
        until, at = to_us(now + lease), args["now"]

        def job(conn: sqlite3.Connection) -> list[Claim]:
            found = conn.execute(self._q[query], args).fetchall()
            if not found:
                return []
            conn.executemany(
                self._q["claim_one"], [(node, row[1], until, at, row[0]) for row in found]
            )
            return [rows.claim(row, from_us) for row in found]

        return await self._write(job, on_loop=True)

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        params = self._finish_params(Finish(claim, attempt, state, next_attempt_at))
        finish_one = self._finish_one
        return await self._write(lambda conn: finish_one(conn, *params), on_loop=True)

    async def finish_attempts(self, finishes: Sequence[Finish]) -> list[FinishResult]:
        """Every item in one writer job: one wake-up of the writer and one of the event loop
        for all of them. An item that fails undoes the job (the writer rolls its batch back)
        and the items are run again in one job, each in a savepoint of its own."""
        items = FinishItems(finishes, self._finish_params)
        todo = items.todo
        if todo:
            finish_one = self._finish_one

            def together(conn: sqlite3.Connection) -> list[bool]:
                try:
                    return [finish_one(conn, *params) for _, params in todo]
                except sqlite3.Error as err:
                    raise _ItemFailed from err

            try:
                done: list[FinishResult] = list(await self._write(together, on_loop=True))
            except _ItemFailed:  # nothing written: each item again, on its own
                done = await self._write(
                    lambda conn: [self._apart(conn, p) for _, p in todo], on_loop=True
                )
            for (i, _), result in zip(todo, done, strict=True):
                items.results[i] = result
        return items.outcome()

    def _finish_params(self, item: Finish) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """finish_delivery's and insert_attempt's parameters (ValueError: impossible state)."""
        claim, a = item.claim, item.attempt
        due = check_finish(item.state, item.next_attempt_at)
        started = to_us(a.started_at)
        finish = (
            claim.delivery_id,
            claim.token,
            item.state.value,
            opt_us(due),
            a.reason,
            started + a.duration_ms * 1000,  # its end (whole milliseconds: exact)
        )
        return finish, (claim.delivery_id, started, *rows.attempt_values(a))

    def _finish_one(
        self, conn: sqlite3.Connection, finish: tuple[Any, ...], record: tuple[Any, ...]
    ) -> bool:
        if conn.execute(self._q["finish_delivery"], finish).rowcount != 1:
            return False
        conn.execute(self._q["insert_attempt"], record)
        return True

    def _apart(
        self, conn: sqlite3.Connection, params: tuple[tuple[Any, ...], tuple[Any, ...]]
    ) -> FinishResult:
        """One item of finish_attempts in its own savepoint: its failure undoes it alone."""
        conn.execute("SAVEPOINT finish")
        try:
            done = self._finish_one(conn, *params)
        except sqlite3.Error as err:
            conn.execute("ROLLBACK TO finish")
            conn.execute("RELEASE finish")
            return store_error(err)
        conn.execute("RELEASE finish")
        return done

    async def release(self, claim: Claim, now: datetime) -> bool:
        args = {"id": claim.delivery_id, "token": claim.token, "now": to_us(now)}
        return await self._write(
            lambda c: c.execute(self._q["release_delivery"], args).rowcount == 1, on_loop=True
        )

    async def hold(self, claim: Claim, until: datetime, now: datetime) -> bool:
        args = {
            "id": claim.delivery_id,
            "token": claim.token,
            "until": to_us(until),
            "now": to_us(now),
        }
        return await self._write(
            lambda c: c.execute(self._q["hold_delivery"], args).rowcount == 1, on_loop=True
        )

    async def unhold(self, destination: str, now: datetime, limit: int | None = None) -> int:
        args = {
            "destination": destination,
            "now": to_us(now),
            "limit": -1 if limit is None else limit,
        }
        return await self._write(lambda c: c.execute(self._q["unhold_destination"], args).rowcount)

    async def recover(self, node: str, now: datetime) -> int:
        args = {"node": node, "now": to_us(now)}
        return await self._write(lambda c: c.execute(self._q["recover_node"], args).rowcount)

    async def cancel_postbacks(self, postback_ids: Collection[int], now: datetime) -> int:
        args = {"postback_ids": json.dumps(sorted(postback_ids)), "now": to_us(now)}
        return await self._write(lambda c: c.execute(self._q["cancel_postbacks"], args).rowcount)

    async def requeue(self, delivery_ids: Collection[str], now: datetime) -> int:
        args = {"ids": json.dumps(sorted(delivery_ids)), "now": to_us(now)}
        return await self._write(lambda c: c.execute(self._q["requeue"], args).rowcount)

    async def requeue_matching(self, flt: DeliveryFilter, now: datetime) -> int:
        args = {**_filter_args(flt), "now": to_us(now)}
        return await self._write(lambda c: c.execute(self._q["requeue_matching"], args).rowcount)

    async def get_delivery(self, delivery_id: str) -> DeliveryDetail | None:
        def job(conn: sqlite3.Connection) -> DeliveryDetail | None:
            row = conn.execute(self._q["get_delivery"], {"id": delivery_id}).fetchone()
            if row is None:
                return None
            found = conn.execute(self._q["get_attempts"], {"id": delivery_id}).fetchall()
            attempts = [rows.attempt_row(a, from_us) for a in found]
            return DeliveryDetail(rows.delivery_row(row, from_us), attempts)

        return await self._read(job)

    async def list_deliveries(
        self, flt: DeliveryFilter, limit: int, cursor: str | None
    ) -> tuple[list[DeliveryRow], str | None]:
        after_created, after_id = decode_cursor(cursor) if cursor else (None, None)
        args = {
            **_filter_args(flt),
            "after_created": opt_us(after_created),
            "after_id": after_id,
            "limit": limit + 1,
        }
        ids = flt.postback_ids
        if ids is not None and not ids:
            return [], None  # sees no postback: sees nothing (and reads nothing)
        each = 0  # postbacks given one by one, a page of each merged
        if ids is not None and flt.conversion_id is None and len(ids) <= MERGED_POSTBACKS:
            postbacks = sorted(set(ids))
            args.update({f"p{n}": pid for n, pid in enumerate(postbacks)})
            each = len(postbacks)
        query = self._list_query(args, each)
        found = await self._read(lambda c: c.execute(query, args).fetchall())
        page = [rows.delivery_row(row, from_us) for row in found[:limit]]
        more = len(found) > limit and page
        return page, encode_cursor(page[-1].created_at, page[-1].delivery_id) if more else None

    def _list_query(self, args: Mapping[str, Any], each: int) -> str:
        """list_deliveries for the filters that `args` gives, each statement made once. One
        index leads, the other conditions only filter (`+column`: SQLite uses no index for
        them): a conversion id's (its few deliveries); else, for `each` postbacks given one by
        one as p0, p1... (at most MERGED_POSTBACKS), each postback's own newest deliveries in
        delivery_postback_created, a page of each, merged; else the state's; else none (the
        walk in creation order; postbacks in a list too long to merge are checked on it).
        Written as one statement with `(:state IS NULL OR state = :state)` for each filter,
        SQLite used no index at all: a rare state, a conversion id or an affiliate's
        postbacks walked every newer delivery (0.4 s a page with a million)."""
        state, postbacks, conversion = (
            args[name] is not None for name in ("state", "postback_ids", "conversion_id")
        )
        key = (state, postbacks, conversion, each)
        query = self._list_queries.get(key)
        if query is not None:
            return query
        template = self._q["list_deliveries"]
        if each:
            also = _FILTERING["state"] + " AND " if state else ""
            page = self._q["list_postback_page"]
            pages = [
                page.replace(
                    "{page}", template.replace("{filters}", f"postback_id = :p{n} AND {also}")
                )
                for n in range(each)
            ]
            query = self._q["list_postback_pages"].replace("{pages}", "\nUNION ALL\n".join(pages))
        else:
            # A conversion id leads whenever given; postbacks here only filter; the state leads
            # when no conversion id does.
            conditions = [
                condition
                for on, condition in (
                    (conversion, _LEADING["conversion"]),
                    (postbacks, _FILTERING["postbacks"]),
                    (state, (_FILTERING if conversion else _LEADING)["state"]),
                )
                if on
            ]
            query = template.replace("{filters}", "".join(f"{c} AND " for c in conditions))
        self._list_queries[key] = query
        return query

    async def get_conversion(self, source: str, conversion_id: str) -> ConversionRow | None:
        args = {"source": source, "conversion_id": conversion_id}

        def job(conn: sqlite3.Connection) -> ConversionRow | None:
            row = conn.execute(self._q["get_conversion"], args).fetchone()
            if row is None:
                return None
            arrivals = conn.execute(self._q["get_arrivals"], {"pk": row[0]}).fetchall()
            return ConversionRow(
                source=row[1],
                conversion_id=row[2],
                status=Status(row[3]),
                status_event_time=opt_from_us(row[4]),
                fields=json.loads(row[5]),
                created_at=from_us(row[6]),
                updated_at=from_us(row[7]),
                arrivals=[rows.arrival_dict(a, from_us) for a in arrivals],
            )

        return await self._read(job)

    async def queue_depth(self, live_only: bool = False) -> dict[DeliveryState, int]:
        query = self._q["queue_depth_live" if live_only else "queue_depth"]
        found = await self._read(lambda c: c.execute(query).fetchall())
        return rows.depth(found, LIVE_STATES if live_only else DeliveryState)

    async def delivery_lag(self, now: datetime) -> float:
        oldest = await self._read(lambda c: c.execute(self._q["oldest_due"]).fetchone()[0])
        if oldest is None:
            return 0.0
        return max(0.0, (to_us(now) - int(oldest)) / 1_000_000)

    async def prune(self, before: datetime) -> int:
        """Deletes in batches, each its own transaction, so ingest is never held up long."""
        args = {"before": to_us(before), "batch": PRUNE_BATCH}
        total = 0
        while True:
            deleted = await self._write(lambda c: c.execute(self._q["prune_batch"], args).rowcount)
            total += deleted
            if deleted < PRUNE_BATCH:
                return total


class _ItemFailed(Exception):
    """An item of finish_attempts failed: its job is undone, the items run again apart."""


# list_deliveries' conditions: those that lead through their index, and those that only
# filter (SQLite uses no index for a `+column` term). A conversion id always leads; postbacks
# lead only in a merge of their pages (list_postback_page), never in this list.
_LEADING = {
    "conversion": "conversion_id = :conversion_id",
    "state": "state = :state",
}
_FILTERING = {
    "postbacks": "+postback_id IN (SELECT value FROM json_each(:postback_ids))",
    "state": "+state = :state",
}
# list_deliveries merges a page of each postback's own newest deliveries for at most this many
# postbacks (one SELECT each in a UNION ALL: SQLite allows 500); a longer list (an affiliate
# with more postbacks) is checked on the walk in creation order.
MERGED_POSTBACKS = 100


def _filter_args(flt: DeliveryFilter) -> dict[str, Any]:
    ids = flt.postback_ids
    return {
        "state": flt.state.value if flt.state else None,
        "postback_ids": None if ids is None else json.dumps(sorted(ids)),
        "conversion_id": flt.conversion_id,
        "since": opt_us(flt.since),
    }
