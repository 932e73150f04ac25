"""The group-commit writer on its own: a failed COMMIT fails its whole batch, and only it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import StoreError
from daemon.store.sqlite import connect
from daemon.store.sqlite_writer import GroupCommitWriter
from tests.store.support import Gate


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[tuple[GroupCommitWriter, Gate]]:
    path = tmp_path / "w.db"
    setup = connect(path, 1.0)
    setup.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    setup.execute("CREATE TABLE child (parent INTEGER NOT NULL REFERENCES parent (id))")
    setup.close()
    gate = Gate()
    gcw = GroupCommitWriter(lambda: connect(path, 1.0), on_commit=gate)
    await asyncio.to_thread(gcw.start)
    try:
        yield gcw, gate
    finally:
        gate.opened.set()
        await asyncio.to_thread(gcw.stop)


def _insert(value: int) -> object:
    return lambda conn: conn.execute("INSERT INTO parent (id) VALUES (?)", (value,)).lastrowid


def _orphan_checked_at_commit(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA defer_foreign_keys = ON")
    conn.execute("INSERT INTO child (parent) VALUES (999)")


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM parent").fetchone()[0])


async def test_a_failed_commit_fails_every_request_of_its_batch(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    warmup = gcw.submit(_insert(1))  # type: ignore[arg-type]
    assert await asyncio.to_thread(gate.entered.wait, 10)  # committed, writer held
    batch = [
        gcw.submit(_insert(2)),  # type: ignore[arg-type]
        gcw.submit(_orphan_checked_at_commit),
        gcw.submit(_insert(3)),  # type: ignore[arg-type]
    ]
    gate.opened.set()

    assert await warmup == 1
    results = await asyncio.gather(*batch, return_exceptions=True)

    assert all(isinstance(r, StoreError) for r in results), results
    assert "FOREIGN KEY" in str(results[0])
    assert results[0] is not results[2]
    assert await gcw.submit(_count) == 1  # 2 and 3 were rolled back with the batch
    assert gcw.commits == 2


async def test_a_stopped_writer_refuses_work(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    gate.opened.set()
    assert await gcw.submit(_count) == 0
    await asyncio.to_thread(gcw.stop)
    with pytest.raises(StoreError, match="not open"):
        gcw.submit(_count)


def _fails(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO parent (id) VALUES (5)")
    raise ValueError("the job's own failure")


async def test_after_says_whether_each_job_committed_even_to_a_caller_that_left(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    """`after` runs for each job on the event loop: True for one that committed, False for one
    rolled back (its batch failed at COMMIT, or the job itself raised and was run again in a
    savepoint), and also when its caller stopped waiting (a lease taken at insert must start or
    be freed whatever the request does)."""
    gcw, gate = writer
    seen: dict[str, bool] = {}

    def note(name: str) -> object:
        return lambda committed: seen.__setitem__(name, committed)

    warmup = gcw.submit(_insert(1))  # type: ignore[arg-type]
    assert await asyncio.to_thread(gate.entered.wait, 10)  # committed, writer held
    left = gcw.submit(_insert(2), note("left"))  # type: ignore[arg-type]
    raised = gcw.submit(_fails, note("raised"))  # type: ignore[arg-type]
    kept = gcw.submit(_insert(3), note("kept"))  # type: ignore[arg-type]
    left.cancel()  # the caller gave up before the writer ran it
    gate.opened.set()
    await warmup
    with pytest.raises(ValueError, match="own failure"):
        await raised
    assert await kept == 3
    assert seen == {"left": True, "raised": False, "kept": True}
    assert await gcw.submit(_count) == 3  # 1, 2 (its caller left: still written), 3

    failed = gcw.submit(_orphan_checked_at_commit, note("batch"))  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await failed
    assert seen["batch"] is False


async def test_an_after_that_raises_is_logged_and_its_caller_still_answered(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    gate.opened.set()

    def broken(committed: bool) -> None:
        raise RuntimeError("observer bug")

    with capture_logs() as logs:
        assert await gcw.submit(_insert(7), broken) == 7  # type: ignore[arg-type]
    assert [(e["event"], e["error"]) for e in logs] == [
        ("store_after_commit_failed", "RuntimeError: observer bug")
    ]
