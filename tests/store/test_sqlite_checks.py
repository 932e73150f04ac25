"""Migration 0006 (daemon.store.sqlite_schema.checks_without_in): the CHECK constraints on
conversion.status and delivery.state are ORs of comparisons, not IN lists that SQLite evaluates
through a temporary b-tree at every insert and update; they accept and refuse the same values;
a store made before the migration is rewritten in place, and a connection opened before it (a
worker's) reads the new schema at its next statement."""

from __future__ import annotations

import itertools
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.store.queries import load_queries
from daemon.store.sqlite import SQLiteStore, connect
from daemon.store.sqlite_schema import apply_migrations, checks_without_in, sqlite_migrations

QUERIES = load_queries("sqlite")
# The statements of every arrival, claim and attempt that write a checked column.
HOT = (
    "insert_conversion",
    "update_conversion",
    "insert_delivery",
    "insert_delivery_leased",
    "claim_one",
    "finish_delivery",
    "release_delivery",
    "hold_delivery",
)
STATUSES = ("pending", "approved", "rejected")
STATES = ("queued", "in_flight", "retrying", "succeeded", "dead", "cancelled")


_EXPLAINED = itertools.count()


def _opcodes(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The VDBE opcodes of a statement, its parameters (?, ?N or :name) bound to NULL. Each
    text is new (a comment numbers it): a prepared EXPLAIN kept by the connection's statement
    cache would list the program it was first prepared with."""
    sql = f"{sql}\n-- {next(_EXPLAINED)}"
    names = re.findall(r":([a-z_]+)", sql)
    params: Any = dict.fromkeys(names) if names else [None] * (_numbered(sql) or sql.count("?"))
    return [row[1] for row in conn.execute("EXPLAIN " + sql, params)]


def _numbered(sql: str) -> int:
    """The highest ?N of a statement (0 without)."""
    return max((int(n) for n in re.findall(r"\?(\d+)", sql)), default=0)


def _fresh(path: Path, upto: str | None = None) -> sqlite3.Connection:
    conn = connect(path, 5.0)
    migrations = [m for m in sqlite_migrations() if upto is None or m.name <= upto]
    apply_migrations(conn, migrations)
    return conn


def _add_conversion(conn: sqlite3.Connection, cid: str, status: str) -> int:
    conn.execute(
        "INSERT INTO conversion (source, conversion_id, status, fields, created_at, updated_at)"
        " VALUES ('generic', ?, ?, '{}', 1, 1)",
        (cid, status),
    )
    pk = conn.execute("SELECT id FROM conversion WHERE conversion_id = ?", (cid,)).fetchone()
    conn.execute(
        "INSERT INTO arrival (conversion_pk, seq, transition, status, received_at, data, vals)"
        " VALUES (?, 1, 'new', ?, 1, '{}', '{}')",
        (pk[0], status),
    )
    return int(pk[0])


def _add_delivery(
    conn: sqlite3.Connection, pk: int, did: str, state: str, postback: int = 1
) -> None:
    conn.execute(
        "INSERT INTO delivery (id, conversion_pk, arrival_seq, source, conversion_id,"
        " postback_id, action, destination, idempotency_key, state, created_at, updated_at)"
        " VALUES (?, ?, 1, 'generic', 'c', ?, 'ping_url', 'http://sink', 'k', ?, 1, 1)",
        (did, pk, postback, state),
    )


def test_no_statement_of_the_hot_path_builds_a_temporary_btree(tmp_path: Path) -> None:
    conn = _fresh(tmp_path / "s.db")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    for name in HOT:
        assert "OpenEphemeral" not in _opcodes(conn, QUERIES[name]), name
    # What the old constraint compiled to, for contrast: the test sees the difference.
    old = _fresh(tmp_path / "old.db", upto="0005_postback_pages")
    assert "OpenEphemeral" in _opcodes(old, QUERIES["insert_conversion"])
    assert "OpenEphemeral" in _opcodes(old, QUERIES["finish_delivery"])


def test_the_constraints_accept_and_refuse_what_they_did(tmp_path: Path) -> None:
    for upto in ("0005_postback_pages", None):  # before the migration, and after it
        conn = _fresh(tmp_path / f"{upto}.db", upto)
        for n, status in enumerate(STATUSES):
            pk = _add_conversion(conn, f"c{n}", status)
        for n, state in enumerate(STATES):
            _add_delivery(conn, pk, f"d{n}", state, postback=n)
        conn.execute("UPDATE delivery SET state = 'dead' WHERE id = 'd0'")
        for bad in ("bogus", "Approved", "approved ", ""):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                _add_conversion(conn, f"bad-{bad}", bad)
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute("UPDATE delivery SET state = ? WHERE id = 'd1'", (bad,))
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                conn.execute("UPDATE conversion SET status = ? WHERE id = ?", (bad, pk))
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            _add_conversion(conn, "null", None)  # type: ignore[arg-type]
        assert conn.execute("SELECT state FROM delivery WHERE id = 'd1'").fetchone() == (
            "in_flight",
        )


def test_a_store_made_before_is_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "upgrade.db"
    conn = _fresh(path, upto="0005_postback_pages")
    pk = _add_conversion(conn, "kept", "approved")
    _add_delivery(conn, pk, "kept-d", "queued")
    other = connect(path, 5.0)  # another process's connection, open across the upgrade
    assert "OpenEphemeral" in _opcodes(other, QUERIES["insert_delivery"])
    version = conn.execute("PRAGMA schema_version").fetchone()[0]

    assert apply_migrations(conn) == ["0006_checks_without_in"]
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == version + 1
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    texts = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert " IN (" not in texts["conversion"]
    assert "CHECK (status = 'pending' OR" in texts["conversion"]
    assert "CHECK (state = 'queued' OR" in texts["delivery"]
    assert "WHEN state IN ('queued', 'retrying')" in texts["delivery"]  # due_at: unchanged
    assert conn.execute("SELECT state FROM delivery WHERE id = 'kept-d'").fetchone() == ("queued",)
    # The other connection reads the new schema at its next statement (an EXPLAIN runs no
    # transaction, so it is not one that notices), and still refuses.
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        other.execute("UPDATE delivery SET state = 'lost' WHERE id = 'kept-d'")
    assert "OpenEphemeral" not in _opcodes(other, QUERIES["insert_delivery"])
    other.execute("UPDATE delivery SET state = 'succeeded' WHERE id = 'kept-d'")
    assert apply_migrations(conn) == []  # recorded: not again


def test_a_table_without_the_old_text_is_left_alone(tmp_path: Path) -> None:
    conn = _fresh(tmp_path / "again.db")
    before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    checks_without_in(conn)  # already rewritten: nothing matches
    conn.execute("COMMIT")
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == before
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == version
    assert conn.execute("PRAGMA writable_schema").fetchone()[0] == 0


async def test_a_store_opened_on_an_old_schema_says_what_it_migrated(tmp_path: Path) -> None:
    path = tmp_path / "opened.db"
    _fresh(path, upto="0005_postback_pages").close()
    store = SQLiteStore(path)
    with capture_logs() as logs:
        await store.open()
    await store.close()
    migrated = [line for line in logs if line["event"] == "store_migrated"]
    assert migrated == [
        {"event": "store_migrated", "migrations": ["0006_checks_without_in"], "log_level": "info"}
    ]
    with capture_logs() as logs:  # up to date: nothing to say
        await store.open()
    await store.close()
    assert [line for line in logs if line["event"] == "store_migrated"] == []
