"""Schema migrations of the SQLite store, recorded in the postbackd_schema table."""

from __future__ import annotations

import sqlite3
import time

from daemon.store.queries import Migration, load_migrations

# CHECK constraints written `column IN (three or more constants)` (0001_initial): SQLite
# evaluates such an IN through a temporary b-tree of the constants, built every time the
# constraint is checked, at every insert and at every update of the column: 25,000 to 33,000
# instructions each time (sqlite3BtreeCreateTable, a zeroed 4 KiB page, its release), four
# times per delivered conversion (insert_conversion; insert_delivery, claim_one and
# finish_delivery for the delivery's state). An OR of comparisons accepts and refuses the same
# values and is evaluated in place. Under callgrind: 3 % of the instructions of an ingested
# conversion, 6 % of a delivered one's (docs/benchmarks.md, fourteenth session).
_WRAP = "\n" + " " * 24  # 0001's line break inside the delivery's CHECK
_IN_CHECKS = (
    (
        "conversion",
        "CHECK (status IN ('pending', 'approved', 'rejected'))",
        "CHECK (status = 'pending' OR status = 'approved' OR status = 'rejected')",
    ),
    (
        "delivery",
        f"CHECK (state IN{_WRAP}('queued', 'in_flight', 'retrying', 'succeeded', 'dead', "
        "'cancelled'))",
        f"CHECK (state = 'queued' OR state = 'in_flight' OR state = 'retrying'{_WRAP}OR state = "
        "'succeeded' OR state = 'dead' OR state = 'cancelled')",
    ),
)


def checks_without_in(conn: sqlite3.Connection) -> None:
    """Rewrite the CHECK constraints of _IN_CHECKS in place, as SQLite documents for changing a
    table's CHECK constraints without rebuilding it (lang_altertable.html, "Making Other Kinds
    Of Table Schema Changes"): the stored CREATE TABLE text is edited under writable_schema and
    the schema version is raised, so that every connection to the file, in any process, reads
    the new text before its next statement. Nothing on disk but that text changes, and every
    stored row satisfies the new constraints, which are equivalent to the old. A table whose
    text does not hold the old constraint (already rewritten, or made otherwise) is left as it
    is."""
    version = int(conn.execute("PRAGMA schema_version").fetchone()[0])
    conn.execute("PRAGMA writable_schema = ON")
    try:
        changed = 0
        for table, old, new in _IN_CHECKS:
            changed += conn.execute(
                "UPDATE sqlite_master SET sql = replace(sql, ?, ?)"
                " WHERE type = 'table' AND name = ? AND instr(sql, ?) > 0",
                (old, new, table, old),
            ).rowcount
        if changed:
            conn.execute(f"PRAGMA schema_version = {version + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


# Migrations in Python, applied in name order with the .sql files.
_PYTHON_MIGRATIONS = (Migration("0006_checks_without_in", "", run=checks_without_in),)


def sqlite_migrations() -> list[Migration]:
    """Every migration of the SQLite store, in order: the .sql files and the Python steps."""
    return sorted([*load_migrations("sqlite"), *_PYTHON_MIGRATIONS], key=lambda m: m.name)


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
    pending_migrations = sqlite_migrations() if migrations is None else migrations
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SCHEMA_TABLE)
        done = {row[0] for row in conn.execute("SELECT name FROM postbackd_schema")}
        applied: list[str] = []
        for migration in pending_migrations:
            if migration.name in done:
                continue
            if migration.run is not None:
                migration.run(conn)
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
