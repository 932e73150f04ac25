"""PostgreSQL specifics: concurrent migrations, lock timeouts, lost connections."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.errors import StoreError
from daemon.migrate import migrate
from daemon.store.postgres import PostgresStore
from daemon.store.queries import load_migrations

from .conftest import pg_admin
from .support import T0, arrive, conversion

pytestmark = pytest.mark.postgres


async def test_nodes_starting_together_apply_each_migration_once(pg_dsn: str) -> None:
    stores = [PostgresStore(pg_dsn) for _ in range(4)]

    applied = await asyncio.gather(*(s.migrate() for s in stores))

    every = [m.name for m in load_migrations("postgres")]  # 0001, 0002... as they come
    assert sorted(applied) == [[], [], [], every]
    assert await migrate(pg_dsn, Path(".")) == []


async def test_open_migrates_and_a_second_open_finds_the_data(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await arrive(store, conversion())
    await store.close()
    again = PostgresStore(pg_dsn)
    await again.open()
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
