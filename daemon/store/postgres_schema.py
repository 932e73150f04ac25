"""Schema migrations of the PostgreSQL store: recorded in postbackd_schema, applied under an
advisory lock so several nodes starting at once apply each migration exactly once."""

from __future__ import annotations

from typing import Any

from daemon.store.queries import Migration, load_migrations

# pg_advisory_lock key: "postbackd" spelled in ASCII, as a bigint. Held by one session only
# while it migrates.
MIGRATION_LOCK = 0x706F73746261636B

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS postbackd_schema (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def apply_migrations(conn: Any, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; the names applied.

    `conn` is an asyncpg connection; the lock is taken on it and released before returning.
    """
    pending = load_migrations("postgres") if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_SCHEMA_TABLE)
        done = {row[0] for row in await conn.fetch("SELECT name FROM postbackd_schema")}
        applied: list[str] = []
        for migration in pending:
            if migration.name in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO postbackd_schema (name) VALUES ($1)", migration.name
                )
            applied.append(migration.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
