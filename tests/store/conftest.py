"""Store fixtures: every contract test runs against SQLite and PostgreSQL.

PostgreSQL comes from POSTBACKD_TEST_PG_DSN (else postgresql://postgres@127.0.0.1:5432/test).
Each test gets a fresh schema (through search_path), dropped afterwards, so tests may run in
parallel. Unreachable: skipped, unless POSTBACKD_REQUIRE_PG=1, which turns that into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.store.base import Store
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore

PG_DSN = os.environ.get("POSTBACKD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
_pg_problem: list[str] = []  # the reason PostgreSQL is unusable, once found


def with_search_path(dsn: str, schema: str) -> str:
    """The DSN with search_path set (asyncpg passes unknown query keys as server settings)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


async def pg_admin() -> asyncpg.Connection:
    """A connection for schema set-up, or skip (fail under POSTBACKD_REQUIRE_PG=1)."""
    where = urlsplit(PG_DSN)
    problem = _pg_problem[0] if _pg_problem else None
    if problem is None:
        try:
            return await asyncpg.connect(PG_DSN, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            problem = f"{err.__class__.__name__}: {err}"
            _pg_problem.append(problem)
    reason = (
        f"PostgreSQL not reachable at {where.hostname}:{where.port or 5432} ({problem}); set "
        "POSTBACKD_TEST_PG_DSN to run these tests, POSTBACKD_REQUIRE_PG=1 makes this a failure"
    )
    if os.environ.get("POSTBACKD_REQUIRE_PG") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


class Backend:
    """One database for one test; `make()` gives another store (another "node") on it."""

    def __init__(self, name: str, make: Callable[[], Store]) -> None:
        self.name = name
        self._make = make
        self._opened: list[Store] = []

    def make(self) -> Store:
        return self._make()

    async def open(self) -> Store:
        store = self._make()
        await store.open()
        self._opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in reversed(self._opened):
            await store.close()


@asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A DSN whose search_path is a schema made for this test alone, dropped afterwards."""
    admin = await pg_admin()
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield with_search_path(PG_DSN, schema)
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with pg_schema() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path / "store.db"
            chosen = Backend("sqlite", lambda: SQLiteStore(path))
        else:
            dsn = await stack.enter_async_context(pg_schema())
            chosen = Backend("postgres", lambda: PostgresStore(dsn, max_size=20))
        stack.push_async_callback(chosen.close_all)
        yield chosen


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
