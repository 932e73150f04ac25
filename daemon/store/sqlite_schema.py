"""Schema migrations of the SQLite store, recorded in the postbackd_schema table."""

from __future__ import annotations

import sqlite3
import time

from daemon.store.queries import Migration, load_migrations

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS postbackd_schema (
    name       TEXT PRIMARY KEY,
    applied_at INTEGER NOT NULL
)"""


def statements(script: str) -> list[str]:
    """Split a script into complete statements (sqlite3.complete_statement knows quoting)."""
    found: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                found.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise ValueError("migration ends with an incomplete statement")
    return found


def apply_migrations(
    conn: sqlite3.Connection, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply every migration not yet recorded, all in one write transaction (so two processes
    opening the same file at once cannot both apply one); the names applied."""
    pending_migrations = load_migrations("sqlite") if migrations is None else migrations
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SCHEMA_TABLE)
        done = {row[0] for row in conn.execute("SELECT name FROM postbackd_schema")}
        applied: list[str] = []
        for migration in pending_migrations:
            if migration.name in done:
                continue
            for statement in statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO postbackd_schema (name, applied_at) VALUES (?, ?)",
                (migration.name, time.time_ns() // 1000),
            )
            applied.append(migration.name)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied
