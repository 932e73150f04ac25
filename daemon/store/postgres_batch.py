"""Group commit for PostgreSQL's new arrivals: the arrivals of new conversions that come
together go to the server in one statement (``arrive_new_batch``), one round trip and one
commit, as SQLite's writer commits a batch of jobs in one transaction.

The first arrival starts a round at once (the next turn of the event loop, so the arrivals of
one turn go together); the arrivals that come while rounds are running wait for the next one.
At most ROUNDS rounds run at a time, each of at most MAX_BATCH arrivals. An arrival whose
(source, conversion_id) is in the round being made or in one running waits for a round after
it: a conversion's arrivals are written in the order they came (its second webhook finds it
stored and takes the locking path, as it would alone).

A round's statement is atomic: if it fails, nothing of it was written, and each of its arrivals
is sent again in a round of its own, so one arrival's failure is its own (a value the
server refuses), and a failure of the server or the connection reaches every caller as the
StoreError it would have had alone. A statement whose answer was lost after its commit is no
different from a lone arrival's: each one sent again finds its conversion stored and takes the
locking path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from daemon.log import get_logger
from daemon.store.common import NewDelivery

log = get_logger("postbackd.store")

MAX_BATCH = 256
ROUNDS = 2

# A round's answer for one arrival: the new conversion's id (None: it existed, nothing
# written), and for an arrival whose deliveries are leased, its data and values as stored.
Written = tuple[int | None, str | None, str | None]


class ArrivalLease(NamedTuple):
    """An arrival's deliveries leased at insert to `node` (daemon.store.base.LeaseAhead): a
    token each, in order, all until `until`. `written` is called once, on the event loop, with
    the round's answer when the arrival was written, or None when it was not (it existed, its
    round failed, the store closed), whether or not its caller still waits."""

    node: str
    until: datetime
    tokens: Sequence[str]
    written: Callable[[Written | None], None]


class NewArrival(NamedTuple):
    """One arrival of a conversion not stored yet: its part of arrive_new_batch's arrays."""

    source: str
    conversion_id: str
    status: str
    event_time: datetime | None
    fields: str  # JSON text
    received_at: datetime
    transition: str
    data: str  # JSON text
    values: str  # JSON text
    deliveries: Sequence[NewDelivery]  # prepare_arrival's
    lease: ArrivalLease | None = None  # its deliveries leased at insert, or queued


# The store's statement for a round: one answer per arrival, in order; raises StoreError.
RunBatch = Callable[[Sequence[NewArrival]], Awaitable[list[Written]]]

_NOT_LEASED = (None, None, None)


def batch_args(arrivals: Sequence[NewArrival]) -> list[list[object]]:
    """arrive_new_batch's 20 arrays: the arrivals' first 9 fields, column by column (NewArrival
    keeps the statement's order), then the deliveries', each led by its arrival's ordinal and
    ending with its lease (owner, token, until: nulls when queued), then whether each arrival's
    deliveries are leased."""
    columns = [list(column) for column in zip(*(a[:9] for a in arrivals), strict=True)]
    deliveries = [
        (
            n,
            d.delivery_id,
            d.planned.postback_id,
            d.planned.action,
            d.planned.destination,
            d.planned.affiliate_owner,
            d.idempotency_key,
            *((a.lease.node, a.lease.tokens[k], a.lease.until) if a.lease else _NOT_LEASED),
        )
        for n, a in enumerate(arrivals, start=1)
        for k, d in enumerate(a.deliveries)
    ]
    leased = [a.lease is not None for a in arrivals]
    if not deliveries:
        return [*columns, *([] for _ in range(10)), leased]
    return [*columns, *(list(column) for column in zip(*deliveries, strict=True)), leased]


class NewArrivals:
    """The rounds of one store (see the module's docstring)."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int = MAX_BATCH) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._waiting: deque[tuple[NewArrival, asyncio.Future[int | None]]] = deque()
        self._rounds = 0  # running now
        self._sending: set[tuple[str, str]] = set()  # the conversions of the rounds running
        self._tasks: set[asyncio.Task[None]] = set()
        self.statements = 0  # rounds sent, for tests
        self.apart = 0  # rounds that failed and were sent again one by one

    async def arrive(self, arrival: NewArrival) -> int | None:
        """The new conversion's id, or None when it was stored already (nothing written)."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((arrival, future))
        if self._rounds < ROUNDS:
            self._rounds += 1
            task = asyncio.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _take(self) -> list[tuple[NewArrival, asyncio.Future[int | None]]]:
        """The next round: the first arrivals waiting, leaving for a later round those whose
        conversion is in this one or in a round running (the round that has it ends first, so
        a conversion's arrivals are written in the order they came)."""
        taken: list[tuple[NewArrival, asyncio.Future[int | None]]] = []
        sending = self._sending
        later: list[tuple[NewArrival, asyncio.Future[int | None]]] = []
        waiting = self._waiting
        while waiting and len(taken) < self._max_batch:
            item = waiting.popleft()
            if item[1].done():  # its caller stopped waiting (cancelled): not sent
                _written(item[0], None)
                continue
            key = (item[0].source, item[0].conversion_id)
            if key in sending:
                later.append(item)
            else:
                sending.add(key)
                taken.append(item)
        waiting.extendleft(reversed(later))
        return taken

    async def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if not batch:  # (what still waits belongs to a running round's conversions:
                    return  # the task running that round takes it when the round ends)
                try:
                    await self._round(batch)
                finally:
                    self._sending.difference_update(
                        (arrival.source, arrival.conversion_id) for arrival, _ in batch
                    )
        finally:
            self._rounds -= 1

    async def _round(self, batch: list[tuple[NewArrival, asyncio.Future[int | None]]]) -> None:
        arrivals = [arrival for arrival, _ in batch]
        self.statements += 1
        try:
            answers = await self._run_batch(arrivals)
        except asyncio.CancelledError:  # the store is closing: nobody is left hanging
            for arrival, future in batch:
                _written(arrival, None)
                future.cancel()
            raise
        except Exception as err:
            if len(arrivals) == 1:
                _written(arrivals[0], None)
                _settle(batch[0][1], error=err)
                return
            self.apart += 1
            await asyncio.gather(*(self._alone(arrival, future) for arrival, future in batch))
            return
        for (arrival, future), answer in zip(batch, answers, strict=True):
            _written(arrival, answer)
            _settle(future, answer[0])

    async def _alone(self, arrival: NewArrival, future: asyncio.Future[int | None]) -> None:
        try:
            [answer] = await self._run_batch([arrival])
        except BaseException as err:
            _written(arrival, None)
            if not isinstance(err, Exception):
                raise
            _settle(future, error=err)
        else:
            _written(arrival, answer)
            _settle(future, answer[0])


def _written(arrival: NewArrival, answer: Written | None) -> None:
    """Tell an arrival's lease what became of it (once; a failure there is logged, not raised:
    the arrival's caller still gets its own answer)."""
    lease = arrival.lease
    if lease is None:
        return
    try:
        lease.written(answer if answer is not None and answer[0] is not None else None)
    except Exception as err:
        log.error("store_after_commit_failed", error=f"{type(err).__name__}: {err}")


def _settle(
    future: asyncio.Future[int | None], pk: int | None = None, error: Exception | None = None
) -> None:
    if future.done():  # its caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(pk)
