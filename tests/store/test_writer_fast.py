"""The group-commit writer runs a batch without a savepoint per job, and only when a job raises
runs the whole batch again with one: the failing job fails alone, the others commit once, with
what the committed run returned. Real SQLite files; each batch is formed by holding the writer
in its commit hook while the jobs queue up. Every test runs twice: in the writer thread, and with
the jobs lent to the event loop (on_loop), where the same rules hold."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import StoreError
from daemon.store.sqlite import connect
from daemon.store.sqlite_writer import GroupCommitWriter

Job = Callable[[sqlite3.Connection], Any]


class Gate:
    """Commit hook: holds the writer after its first COMMIT until `opened` is set, so the jobs
    submitted meanwhile make one batch."""

    def __init__(self, on_loop: bool) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.sizes: list[int] = []
        self.on_loop = on_loop  # how the tests submit their jobs

    def __call__(self, size: int) -> None:
        self.sizes.append(size)
        if not self.entered.is_set():
            self.entered.set()
            self.opened.wait(timeout=30)


def _open(path: Path, max_pages: int | None = None) -> sqlite3.Connection:
    conn = connect(path, 1.0)
    if max_pages is not None:
        conn.execute(f"PRAGMA max_page_count = {max_pages}")
    return conn


async def _writer(
    path: Path, on_loop: bool, max_pages: int | None = None
) -> tuple[GroupCommitWriter, Gate]:
    setup = connect(path, 1.0)
    setup.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY, body BLOB)")
    setup.execute("CREATE TABLE child (parent INTEGER NOT NULL REFERENCES parent (id))")
    setup.close()
    gate = Gate(on_loop)
    gcw = GroupCommitWriter(lambda: _open(path, max_pages), on_commit=gate)
    await asyncio.to_thread(gcw.start)
    return gcw, gate


ON_LOOP = pytest.mark.parametrize("on_loop", [False, True], ids=["writer thread", "on the loop"])


@pytest.fixture(params=[False, True], ids=["writer thread", "on the loop"])
async def writer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[GroupCommitWriter, Gate]]:
    gcw, gate = await _writer(tmp_path / "w.db", request.param)
    try:
        yield gcw, gate
    finally:
        gate.opened.set()
        await asyncio.to_thread(gcw.stop)


async def _one_batch(gcw: GroupCommitWriter, gate: Gate, jobs: list[Job]) -> list[Any]:
    """Run `jobs` as one batch (after a first batch that holds the writer); their outcomes."""
    warmup = gcw.submit(_insert(1))
    assert await asyncio.to_thread(gate.entered.wait, 10)  # committed, writer held
    futures = [gcw.submit(job, on_loop=gate.on_loop) for job in jobs]
    gate.opened.set()
    assert await warmup == 1
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert gate.sizes[-1] == len(jobs) or isinstance(results[0], StoreError)
    assert gcw.lent == (1 if gate.on_loop else 0)  # where the batch ran (committed or not)
    return results


def _insert(value: int) -> Job:
    return lambda conn: conn.execute("INSERT INTO parent (id) VALUES (?)", (value,)).lastrowid


class Counted:
    """A job that inserts its id and counts how often it ran; returns that count."""

    def __init__(self, value: int, fail: bool = False) -> None:
        self.value = value
        self.fail = fail
        self.runs = 0

    def __call__(self, conn: sqlite3.Connection) -> int:
        self.runs += 1
        conn.execute("INSERT INTO parent (id) VALUES (?)", (self.value,))
        if self.fail:
            raise ValueError(f"job {self.value} fails after its insert")
        return self.runs


def _ids(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM parent ORDER BY id")]


async def test_a_batch_without_failure_runs_each_job_once_without_rerun(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    jobs = [Counted(v) for v in (2, 3, 4)]
    assert await _one_batch(gcw, gate, list(jobs)) == [1, 1, 1]
    assert [job.runs for job in jobs] == [1, 1, 1]
    assert gcw.reruns == 0
    assert await gcw.submit(_ids) == [1, 2, 3, 4]


async def test_a_job_that_raises_mid_batch_fails_alone_and_its_writes_are_undone(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    before, failing, after = Counted(2), Counted(3, fail=True), Counted(4)
    results = await _one_batch(gcw, gate, [before, failing, after])

    assert isinstance(results[1], ValueError)  # the job's own error, as before
    # The batch ran again with savepoints: the jobs before the failing one ran twice and their
    # result is the committed run's; the ones after it ran once.
    assert results[0] == 2
    assert results[2] == 1
    assert (before.runs, failing.runs, after.runs) == (2, 2, 1)
    assert gcw.reruns == 1
    assert gcw.commits == 2  # the warm-up and this batch: one COMMIT for the batch
    assert await gcw.submit(_ids) == [1, 2, 4]  # the failing job's insert is gone


async def test_a_constraint_error_fails_only_its_job(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer
    orphan: Job = lambda conn: conn.execute("INSERT INTO child (parent) VALUES (999)")  # noqa: E731
    results = await _one_batch(gcw, gate, [_insert(2), _insert(2), orphan, _insert(3), _insert(1)])

    assert results[0] == 2
    assert results[3] == 3
    for failed in (results[1], results[2], results[4]):
        assert isinstance(failed, StoreError), results
    assert "UNIQUE" in str(results[1])
    assert "FOREIGN KEY" in str(results[2])
    assert await gcw.submit(_ids) == [1, 2, 3]
    assert await gcw.submit(lambda c: c.execute("SELECT count(*) FROM child").fetchone()[0]) == 0


async def test_a_job_failing_in_both_runs_and_one_failing_only_in_the_first(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    """What a job returns or raises is what its committed run did."""
    gcw, gate = writer
    runs: list[int] = []

    def flaky(conn: sqlite3.Connection) -> str:
        runs.append(1)
        conn.execute("INSERT INTO parent (id) VALUES (5)")
        if len(runs) == 1:
            raise RuntimeError("only the first time")
        return "second run"

    results = await _one_batch(gcw, gate, [_insert(2), flaky, Counted(6, fail=True), _insert(7)])
    assert results[0] == 2
    assert results[1] == "second run"
    assert results[3] == 7
    assert isinstance(results[2], ValueError)
    assert await gcw.submit(_ids) == [1, 2, 5, 7]


async def test_a_job_that_ends_the_transaction_fails_its_whole_batch_and_the_writer_goes_on(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    """When the failure took the transaction with it (what SQLite does on some I/O errors),
    nothing of the batch can be kept: every job of it fails with StoreError, as a failed
    COMMIT does."""
    gcw, gate = writer

    def ends_it(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    results = await _one_batch(gcw, gate, [_insert(2), ends_it, _insert(3)])
    assert all(isinstance(r, StoreError) for r in results), results
    assert await gcw.submit(_insert(4)) == 4
    assert await gcw.submit(_ids) == [1, 4]


@ON_LOOP
async def test_the_database_full_fails_the_batch_it_rolled_back_and_names_the_cause(
    tmp_path: Path, on_loop: bool
) -> None:
    """SQLITE_FULL (here the file at its page limit) rolls the whole transaction back in
    SQLite: every job of the batch fails with a StoreError that names it, and the next batch
    commits."""
    gcw, gate = await _writer(tmp_path / "full.db", on_loop, max_pages=64)
    try:
        big: Job = lambda conn: conn.execute(  # noqa: E731
            "INSERT INTO parent (id, body) VALUES (9, zeroblob(1000000))"
        )
        results = await _one_batch(gcw, gate, [_insert(2), big, _insert(3)])
        assert all(isinstance(r, StoreError) for r in results), results
        assert all("full" in str(r) for r in results), results
        assert gcw.reruns == 0
        assert await gcw.submit(_insert(4)) == 4
        assert await gcw.submit(_ids) == [1, 4]
    finally:
        gate.opened.set()
        await asyncio.to_thread(gcw.stop)


async def test_a_failed_commit_after_a_rerun_fails_the_whole_batch(
    writer: tuple[GroupCommitWriter, Gate],
) -> None:
    gcw, gate = writer

    def orphan_at_commit(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute("INSERT INTO child (parent) VALUES (999)")

    results = await _one_batch(
        gcw, gate, [_insert(2), Counted(3, fail=True), orphan_at_commit, _insert(4)]
    )
    assert all(isinstance(r, StoreError) for r in results), results
    assert gcw.reruns == 1
    assert await gcw.submit(_ids) == [1]
