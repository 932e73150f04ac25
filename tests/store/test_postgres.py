"""PostgreSQL specifics: concurrent migrations, lock timeouts, lost connections."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreError
from daemon.migrate import migrate
from daemon.models import Status, Transition
from daemon.store.postgres import PostgresStore
from daemon.store.queries import load_migrations, load_queries

from .conftest import pg_admin
from .support import T0, Planner, arrive, at, conversion

pytestmark = pytest.mark.postgres


async def test_nodes_starting_together_apply_each_migration_once(pg_dsn: str) -> None:
    stores = [PostgresStore(pg_dsn) for _ in range(4)]

    applied = await asyncio.gather(*(s.migrate() for s in stores))

    every = [m.name for m in load_migrations("postgres")]  # 0001, 0002... as they come
    assert sorted(applied) == [[], [], [], every]
    assert await migrate(pg_dsn, Path(".")) == []


async def test_open_migrates_and_a_second_open_finds_the_data(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    with capture_logs() as logs:
        await store.open()
    every = [m.name for m in load_migrations("postgres")]
    assert [line["migrations"] for line in logs if line["event"] == "store_migrated"] == [every]
    await arrive(store, conversion())
    await store.close()
    again = PostgresStore(pg_dsn)
    with capture_logs() as logs:
        await again.open()
    assert [line for line in logs if line["event"] == "store_migrated"] == []
    try:
        assert await again.get_conversion("generic", "c1") is not None
        assert await again.migrate() == []
    finally:
        await again.close()


async def test_a_lock_held_too_long_is_a_store_error(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, server_settings={"lock_timeout": "100ms"})
    await store.open()
    await arrive(store, conversion())
    holder = await asyncpg.connect(pg_dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT * FROM conversion FOR UPDATE")
            with pytest.raises(StoreError, match="LockNotAvailable"):
                await arrive(store, conversion(status="approved"))
        ids = await arrive(store, conversion(status="approved"))
        assert len(ids) == 2
    finally:
        await holder.close()
        await store.close()


async def test_lost_connections_surface_as_store_error_and_recover(pg_dsn: str) -> None:
    name = f"pbtest_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(
        pg_dsn, min_size=2, max_size=2, server_settings={"application_name": name}
    )
    await store.open()
    admin = await pg_admin()
    try:
        await store.ping()
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            name,
        )
        assert killed >= 1
        outcomes = []
        for i in range(4):
            try:
                await arrive(store, conversion(f"c{i}"), T0)
                outcomes.append("ok")
            except StoreError:
                outcomes.append("store_error")
        assert outcomes[-1] == "ok"  # the pool reconnects
        await store.ping()
    finally:
        await admin.close()
        await store.close()


async def test_an_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=5)
    with pytest.raises(StoreError, match="postgresql"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.queue_depth()


async def test_a_conversion_another_node_stored_takes_the_locking_path(pg_dsn: str) -> None:
    """A node tries a conversion it has not seen as new in one statement (arrive_new_batch); when
    another node stored it, that statement writes nothing, the planner is asked again for the
    real transition, and only that plan is written."""
    first, second = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    await first.open()
    await second.open()
    try:
        new = Planner(conversion(status="pending"))
        result = await first.record_arrival("generic", new.conversion, T0, new)
        assert new.calls == [(Transition.NEW, None)]
        assert len(result.delivery_ids) == 2

        changed = Planner(conversion(status="approved"), postbacks=(103,))
        again = await second.record_arrival("generic", changed.conversion, at(60), changed)
        assert changed.calls == [
            (Transition.NEW, None),  # the one-statement try, not written
            (Transition.STATUS_CHANGED, Status.PENDING),
        ]
        assert (again.transition, again.arrival_seq) == (Transition.STATUS_CHANGED, 2)
        stored = await second.get_conversion("generic", "c1")
        assert stored is not None
        assert [(a["seq"], a["transition"]) for a in stored.arrivals] == [
            (1, Transition.NEW),
            (2, Transition.STATUS_CHANGED),
        ]
        keys = []
        for delivery_id in [*result.delivery_ids, *again.delivery_ids]:
            detail = await second.get_delivery(delivery_id)
            assert detail is not None
            keys.append(detail.delivery.idempotency_key)
        assert sorted(keys) == ["generic:c1:1:101", "generic:c1:1:102", "generic:c1:2:103"]
        # A node that stored the conversion itself goes straight to the locking path.
        dup = Planner(conversion(status="approved"))
        await second.record_arrival("generic", dup.conversion, at(120), dup)
        assert dup.calls == [(Transition.DUPLICATE, Status.APPROVED)]
    finally:
        await first.close()
        await second.close()


async def test_a_store_call_is_one_round_trip_and_its_connection_goes_back_as_it_is(
    pg_dsn: str,
) -> None:
    """No reset query on a connection's way back to the pool (asyncpg's default: one more
    round trip per store call); a transaction that failed half-way is still rolled back, so
    the next call on the same connection neither sees nor waits for what it wrote."""
    store = PostgresStore(pg_dsn, min_size=1, max_size=1)
    await store.open()
    try:
        await arrive(store, conversion("c0"))
        [holder] = store._pool._holders
        protocol = holder._con._protocol
        before = protocol.queries_count
        for i in range(1, 6):
            await store.record_arrival(
                "generic", conversion(f"c{i}"), T0, Planner(conversion(f"c{i}"))
            )
        assert protocol.queries_count - before == 5  # one statement each, nothing more

        failing = Planner(conversion("c1", "approved"), fail=RuntimeError("planner bug"))
        with pytest.raises(RuntimeError, match="planner bug"):
            await store.record_arrival("generic", conversion("c1", "approved"), at(1), failing)
        again = conversion("c1", "approved")
        result = await store.record_arrival("generic", again, at(2), Planner(again))
        assert result.transition is Transition.STATUS_CHANGED
        stored = await store.get_conversion("generic", "c1")
        assert stored is not None
        assert [a["seq"] for a in stored.arrivals] == [1, 2]  # the failed one left nothing
    finally:
        await store.close()


async def _plan(pg_dsn: str, name: str, *args: object) -> str:
    """EXPLAIN of the named query on a migrated schema, sequential scans priced out (on a small
    table the planner may scan it anyway: this shows which index can serve the query)."""
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SET enable_seqscan = off")
        query = load_queries("postgres")[name]
        return "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {query}", *args))
    finally:
        await conn.close()


async def test_the_live_queue_depth_can_read_the_state_index_alone(pg_dsn: str) -> None:
    # The live states are counted in the state index (ranges as long as the queue), never in
    # the table's rows.
    plan = await _plan(pg_dsn, "queue_depth_live")
    assert "delivery_state" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_a_listing_by_postbacks_reads_a_page_of_each_in_their_index(pg_dsn: str) -> None:
    # list_postback_pages: for each postback, its own newest deliveries in
    # delivery_postback_created (a page at most), merged; never the walk in creation order,
    # which read every newer delivery for an affiliate whose deliveries were old.
    plan = await _plan(pg_dsn, "list_postback_pages", None, [3, 4], None, None, None, None, 51)
    assert "delivery_postback_created" in plan, plan
    assert "delivery_created" not in plan.replace("delivery_postback_created", ""), plan
