"""SQLite specifics: pragmas, group commit, a failing request alone rolled back, lock timeouts, kill -9."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon.errors import StoreError
from daemon.migrate import migrate
from daemon.models import Transition
from daemon.store.affiliates_sqlite import _Q as AFFILIATE_QUERIES
from daemon.store.base import ArrivalResult, DeliveryFilter, DeliveryState
from daemon.store.queries import load_queries
from daemon.store.sqlite import MERGED_POSTBACKS, SQLiteStore, _filter_args, connect
from daemon.store.sqlite_schema import sqlite_migrations

from .support import T0, Planner, arrive, conversion
from .test_queue import (
    test_a_listing_by_postbacks_pages_newest_first_across_them as pages_contract,
)

HERE = Path(__file__).parent


class Gate:
    """A commit hook that holds the writer after its first COMMIT until opened."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, size: int) -> None:
        self.batches.append(size)
        if len(self.batches) == 1:
            self.entered.set()
            self.opened.wait(timeout=30)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, Gate]]:
    gate = Gate()
    store = SQLiteStore(tmp_path / "gated.db", on_commit=gate)
    await store.open()
    try:
        yield store, gate
    finally:
        gate.opened.set()
        await store.close()


async def _held_batch(
    store: SQLiteStore, gate: Gate, calls: list[asyncio.Future[ArrivalResult]]
) -> list[ArrivalResult | BaseException]:
    """Hold the writer on a first request, queue `calls` meanwhile, then let it go."""
    first = asyncio.ensure_future(arrive(store, conversion("first")))
    await _until(gate.entered.is_set, "the first commit")
    tasks = [asyncio.ensure_future(c) for c in calls]
    await _until(lambda: store.backlog() == len(tasks), "every request to queue")
    gate.opened.set()
    await first
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_concurrent_arrivals_share_one_commit(gated: tuple[SQLiteStore, Gate]) -> None:
    store, gate = gated
    convs = [conversion(f"c{i}") for i in range(50)]
    calls = [store.record_arrival("generic", c, T0, Planner(c)) for c in convs]

    results = await _held_batch(store, gate, calls)  # type: ignore[arg-type]

    assert all(isinstance(r, ArrivalResult) for r in results)
    assert gate.batches == [1, 50]
    assert store.commits == 2  # 51 requests, 2 fsyncs
    assert (await store.queue_depth())[DeliveryState.QUEUED] == 102


async def test_a_failing_request_does_not_fail_its_batch(gated: tuple[SQLiteStore, Gate]) -> None:
    store, gate = gated
    good = [conversion(f"ok{i}") for i in range(4)]
    bad = conversion("bad")
    calls = [store.record_arrival("generic", c, T0, Planner(c)) for c in good]
    calls.insert(2, store.record_arrival("generic", bad, T0, Planner(bad, fail=KeyError("x"))))

    results = await _held_batch(store, gate, calls)  # type: ignore[arg-type]

    assert gate.batches == [1, 5]
    assert isinstance(results.pop(2), KeyError)
    assert [r.transition for r in results] == [Transition.NEW] * 4  # type: ignore[union-attr]
    assert await store.get_conversion("generic", "bad") is None
    assert await store.get_conversion("generic", "ok3") is not None


async def test_durability_settings(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    await store.close()
    conn = connect(tmp_path / "s.db", 1.0)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY: the writer's
    finally:
        conn.close()
    reader = connect(tmp_path / "s.db", 1.0, readonly=True)
    try:
        assert reader.execute("PRAGMA temp_store").fetchone()[0] == 0  # the default: files
    finally:
        reader.close()


async def test_a_locked_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=0.05)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(StoreError, match="locked"):
            await arrive(store, conversion())
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert len(await arrive(store, conversion())) == 2  # usable again once the lock is gone
    await store.close()


async def test_unopened_or_unopenable_stores_raise_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "never-opened.db")
    with pytest.raises(StoreError, match="not open"):
        await arrive(store, conversion())
    with pytest.raises(StoreError, match="not open"):
        await store.queue_depth()
    missing = SQLiteStore(tmp_path / "no" / "such" / "dir" / "x.db")
    with pytest.raises(StoreError, match="cannot open"):
        await missing.open()


async def test_migrate_applies_once_and_reopening_keeps_data(tmp_path: Path) -> None:
    url = "sqlite:///data/m.db"
    (tmp_path / "data").mkdir()

    assert await migrate(url, tmp_path) == [m.name for m in sqlite_migrations()]
    assert await migrate(url, tmp_path) == []
    store = SQLiteStore(tmp_path / "data" / "m.db")
    await store.open()
    await arrive(store, conversion())
    await store.close()
    await store.open()  # the same object opens again: reads and writes work
    assert await store.get_conversion("generic", "c1") is not None
    assert len(await arrive(store, conversion("c2"))) == 2
    await store.close()


@pytest.mark.slow
async def test_acknowledged_arrivals_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "kill.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "durability_writer.py"), str(path), stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    acknowledged = []
    try:
        async with asyncio.timeout(60):
            while len(acknowledged) < 400:
                line = await child.stdout.readline()
                assert line, f"writer exited early with {child.returncode}"
                acknowledged.append(line.decode().strip())
    finally:
        child.kill()  # SIGKILL: no atexit, no flush, no close
        rest = await child.stdout.read()
        await child.wait()
    acknowledged += rest.decode().split()
    assert child.returncode == -signal.SIGKILL

    store = SQLiteStore(path)
    await store.open()
    try:
        missing = [
            cid for cid in acknowledged if await store.get_conversion("generic", cid) is None
        ]
        assert missing == []
        # Each acknowledged arrival committed with its delivery, in the same transaction.
        assert (await store.queue_depth())[DeliveryState.QUEUED] >= len(acknowledged)
    finally:
        await store.close()


def _plan(path: Path, query: str, args: dict[str, object] | None = None) -> list[str]:
    """The steps of SQLite's plan for `query` on the database at `path`."""
    conn = sqlite3.connect(path)
    try:
        return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", args or {})]
    finally:
        conn.close()


async def _migrated(path: Path) -> Path:
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    return path


async def test_the_live_queue_depth_reads_the_state_index_not_the_table(tmp_path: Path) -> None:
    # What keeps a scrape cheap on a store that keeps a month of finished deliveries: the live
    # states are counted in the state index (ranges as long as the queue), never by a scan of
    # every delivery (daemon.metrics.QueueDepth reads them at every scrape).
    path = await _migrated(tmp_path / "plan.db")
    plan = _plan(path, load_queries("sqlite")["queue_depth_live"])
    # SEARCH: ranges of the index (SCAN would read all of it, or the table).
    assert any(
        step.startswith("SEARCH") and "COVERING INDEX delivery_state" in step for step in plan
    ), plan
    assert not any(step.startswith("SCAN") for step in plan), plan


@pytest.mark.parametrize("state", [None, DeliveryState.DEAD])
@pytest.mark.parametrize("postbacks", [None, (3, 4), tuple(range(1, 102))])
@pytest.mark.parametrize("conversion_id", [None, "c-1"])
async def test_a_delivery_listing_reads_the_index_of_its_narrowest_filter(
    tmp_path: Path,
    state: DeliveryState | None,
    postbacks: tuple[int, ...] | None,
    conversion_id: str | None,
) -> None:
    # A page of the console or the API reads about its own rows, however many deliveries the
    # store keeps: a conversion id through its index; else each of at most MERGED_POSTBACKS
    # postbacks (an affiliate's) through its own newest deliveries; else a state through the
    # state index; else the walk in creation order. Written as one statement with `:state IS
    # NULL OR ...`, a rare state, a conversion id or an affiliate whose deliveries were old
    # walked every newer delivery (0.4 s a page with a million).
    store = SQLiteStore(tmp_path / "list.db")
    await store.open()
    try:
        flt = DeliveryFilter(state=state, postback_ids=postbacks, conversion_id=conversion_id)
        page, _ = await store.list_deliveries(flt, 50, None)  # the statement, made and run
        assert page == []
        [query] = [q for q in store._list_queries.values()]
        args = {**_filter_args(flt), "after_created": None, "after_id": None, "limit": 51}
        args |= {f"p{n}": pid for n, pid in enumerate(postbacks or ())}
        plan = _plan(tmp_path / "list.db", query, args)
    finally:
        await store.close()
    merged = postbacks is not None and len(postbacks) <= MERGED_POSTBACKS
    index = (
        "delivery_conversion"
        if conversion_id
        else "delivery_postback_created"
        if merged
        else "delivery_state"
        if state
        else "delivery_created"
    )
    reads = [s for s in plan if s.startswith(("SEARCH delivery", "SCAN delivery"))]
    assert reads, plan
    assert all(s.startswith("SEARCH delivery USING INDEX") and index in s for s in reads), plan
    if merged and not conversion_id:
        assert postbacks is not None
        assert len(reads) == len(postbacks)  # a page of each
        assert all("(postback_id=? AND created_at>? AND" in s for s in reads), plan


async def test_a_listing_by_postbacks_on_the_walk_pages_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More postbacks than MERGED_POSTBACKS are checked on the walk in creation order instead of
    # merged: the same pages (the stores' contract test, run here with the merge off).
    monkeypatch.setattr("daemon.store.sqlite.MERGED_POSTBACKS", 0)
    store = SQLiteStore(tmp_path / "walk.db")
    await store.open()
    try:
        await pages_contract(store)
    finally:
        await store.close()


@pytest.mark.parametrize("name", ["changed_postbacks", "changed_secrets"])
async def test_a_nodes_fetch_of_affiliate_changes_reads_the_change_index(
    tmp_path: Path, name: str
) -> None:
    # A node that has the affiliate postbacks asks for the few changed since its version: the
    # change_seq index, then a sort of those few. Ordered in the table's own order instead,
    # SQLite read every row to skip the sort (12 ms a fetch with 100,000 postbacks).
    path = await _migrated(tmp_path / "aff.db")
    plan = _plan(path, AFFILIATE_QUERIES[name], {"since": 5})
    assert any(s.startswith("SEARCH") and "_changes (change_seq>?)" in s for s in plan), plan
    assert not any(s.startswith("SCAN") for s in plan), plan
