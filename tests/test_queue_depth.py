"""postbackd_queue_depth at a cost that grows with the queue, not with the store
(daemon.metrics.QueueDepth): the live states counted at every read, the final ones recounted
when due, a slow recount in the background, a failed one keeping the last counts.

The store is a real SQLite store; its full count (every state) can be held, made to take time
on the test's clock, or made to fail, and counts how often it ran."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from daemon.errors import StoreError
from daemon.metrics import QueueDepth
from daemon.store.base import DeliveryState
from daemon.store.sqlite import SQLiteStore
from tests.harness import FakeClock
from tests.store.support import arrive, at, conversion, finish

Q, S = DeliveryState.QUEUED, DeliveryState.SUCCEEDED


class CountedStore(SQLiteStore):
    def __init__(self, path: Path, clock: FakeClock) -> None:
        super().__init__(path)
        self.clock = clock
        self.full_counts = 0
        self.hold: asyncio.Event | None = None
        self.takes = 0.0  # seconds of the test's clock a full count takes
        self.fail = False

    async def queue_depth(self, live_only: bool = False) -> dict[DeliveryState, int]:
        if live_only:
            return await super().queue_depth(live_only=True)
        self.full_counts += 1
        if self.hold is not None:
            await self.hold.wait()
        self.clock.advance(self.takes)
        if self.fail:
            raise StoreError("sqlite: OperationalError: disk I/O error")
        return await super().queue_depth()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountedStore]:
    store = CountedStore(tmp_path / "depth.db", FakeClock(1000.0))
    await store.open()
    yield store
    await store.close()


_made = iter(range(1, 10_000))


async def add(store: CountedStore, state: DeliveryState) -> None:
    """One more delivery, queued or succeeded."""
    n = next(_made)
    await arrive(store, conversion(f"c{n}"), at(n), postbacks=(1,))
    if state is S:
        [claim] = await store.claim_due("n1", at(n), 1, timedelta(days=1))
        assert await finish(store, claim, S, at(n))


async def test_live_states_every_read_and_final_states_when_due(store: CountedStore) -> None:
    depth = QueueDepth(clock=store.clock.now)
    await add(store, S)
    await add(store, Q)
    first = await depth.read(store)
    assert (first[Q], first[S], store.full_counts) == (1, 1, 1)
    assert first.keys() == set(DeliveryState)

    await add(store, S)
    await add(store, Q)
    store.clock.advance(9.0)
    second = await depth.read(store)
    assert (second[Q], second[S], store.full_counts) == (2, 1, 1)  # live now, final as was

    store.clock.advance(1.0)  # FINAL_COUNT_MIN_EVERY after the last count
    third = await depth.read(store)
    assert (third[Q], third[S], store.full_counts) == (2, 2, 2)


async def test_a_slow_count_is_spaced_out_and_runs_in_the_background(
    store: CountedStore,
) -> None:
    depth = QueueDepth(clock=store.clock.now)
    await add(store, S)
    store.takes = 2.0  # a store of some 30 million deliveries
    assert (await depth.read(store))[S] == 1  # no final counts yet: the read waits
    assert depth.last_count[1] == 2.0

    store.clock.advance(199.0)  # due only 100 times the last count's duration after it
    await depth.read(store)
    assert store.full_counts == 1

    store.clock.advance(1.0)
    await add(store, S)
    store.hold = asyncio.Event()
    answer = await asyncio.wait_for(depth.read(store), 5)
    assert (answer[S], store.full_counts) == (1, 2)  # the last counts, the count under way
    await depth.read(store)
    assert store.full_counts == 2  # one count at a time

    [counting] = [t for t in asyncio.all_tasks() if t.get_name() == "queue-depth-count"]
    store.hold.set()
    await counting
    assert (await depth.read(store))[S] == 2


async def test_the_first_count_outlives_a_read_given_up_on(store: CountedStore) -> None:
    depth = QueueDepth(clock=store.clock.now)
    await add(store, S)
    store.hold = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # a scrape past DEPTH_TIMEOUT
            await depth.read(store)
    waiting = asyncio.create_task(depth.read(store))
    await asyncio.sleep(0.05)
    store.hold.set()
    assert (await asyncio.wait_for(waiting, 5))[S] == 1
    assert store.full_counts == 1  # the same count, not another


async def test_a_failed_count_keeps_the_last_final_counts(store: CountedStore) -> None:
    depth = QueueDepth(clock=store.clock.now)
    await add(store, S)
    assert (await depth.read(store))[S] == 1
    await add(store, S)
    await add(store, Q)
    store.fail = True
    store.clock.advance(10.0)
    answer = await depth.read(store)
    assert (answer[Q], answer[S], store.full_counts) == (1, 1, 2)

    fresh = QueueDepth(clock=store.clock.now)
    with pytest.raises(StoreError, match="disk I/O error"):
        await fresh.read(store)  # no final counts at all: the error
    store.fail = False
    assert (await fresh.read(store))[S] == 2  # tried again at once, not when due


async def test_close_stops_a_count_under_way(store: CountedStore) -> None:
    depth = QueueDepth(clock=store.clock.now)
    store.hold = asyncio.Event()
    reading = asyncio.create_task(depth.read(store))
    await asyncio.sleep(0.05)
    assert not depth.due()  # counting
    await depth.close()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "queue-depth-count"]
