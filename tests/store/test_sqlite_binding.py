"""How the SQLite store's parameters are bound: None through the adapter daemon.store.sqlite
registers (sqlite3's slow path for a value without one asks the protocol for __adapt__ and the
value for __conform__ each time), still as NULL; no base type adapted, which would send every
parameter through the adapters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import daemon.store.sqlite as sqlite_store


def test_none_has_its_adapter_and_base_types_have_none() -> None:
    adapters = sqlite3.adapters
    assert adapters[(type(None), sqlite3.PrepareProtocol)] is sqlite_store._bind_null
    for base in (int, float, str, bytearray, bytes):
        assert (base, sqlite3.PrepareProtocol) not in adapters


def test_none_is_still_bound_as_null(tmp_path: Path) -> None:
    conn = sqlite_store.connect(tmp_path / "bind.db", 1.0)
    try:
        conn.execute("CREATE TABLE t (a, b, c)")
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (None, 1, "x"))
        conn.execute("INSERT INTO t VALUES (:a, :b, :c)", {"a": None, "b": None, "c": None})
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(None, None, b"")])
        rows = conn.execute("SELECT typeof(a), typeof(b), typeof(c) FROM t").fetchall()
    finally:
        conn.close()
    assert rows == [
        ("null", "integer", "text"),
        ("null", "null", "null"),
        ("null", "null", "blob"),
    ]
