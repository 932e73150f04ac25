"""The store side of the end of a claim, and its ``delivery_attempt`` log line: an attempt
recorded with what follows it, a claim handed back unsent or held, a delivery cancelled. A
result the store cannot take (StoreError) is logged with the outcome, ``recorded: false`` and
the store error (one masked line), and left to the claim's lease: the delivery is due again
when it ends and is sent again with the same idempotency key.

On a store whose ``batches_results`` is true (PostgreSQL: a round trip per store call),
attempts' results are written together: the results that end in one turn of the event loop, or
while the last write of results is in flight, are one store call (``finish_attempts``: one
statement), the group-commit shape, with no timer (a lone result is written at once). Each
keeps its own outcome, log line and metrics. Other stores get one ``finish_attempt`` per result
(SQLite's writer commits those that end together in one transaction already).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from daemon.actions.base import Action, Job
from daemon.decisions import Decision
from daemon.errors import StoreError
from daemon.loader import LoadedPostback
from daemon.log import get_logger, masked_first_line
from daemon.store.base import AttemptRow, Claim, DeliveryState, Finish, FinishResult, Store

if TYPE_CHECKING:
    from daemon.reload import Runtime

log = get_logger("postbackd.dispatcher")

_ERROR_MAX = 300


def describe_error(err: BaseException) -> str:
    """An error as one short line for the log: its first line (PostgreSQL's DETAIL lines may
    quote row values), a URL's userinfo masked."""
    text = masked_first_line(str(err))
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line[:_ERROR_MAX]


class Recorder:
    """Records the ends of claims for one node; `on_attempt(action, outcome, seconds)` feeds the
    metrics."""

    def __init__(
        self,
        store: Store,
        node: str,
        now: Callable[[], float],
        on_attempt: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.store = store
        self._node = node
        self._now = now
        self._on_attempt = on_attempt
        self._batch = bool(getattr(store, "batches_results", False))
        # The text of the last rules version seen (str() of a RulesVersion formats it each
        # time; it changes only with a reload): every attempt's row and log line carry it.
        self._version: object = None
        self._version_text = ""
        # Results waiting for the write of results in flight (its task: None when none is).
        self._results: list[tuple[Finish, asyncio.Future[FinishResult]]] = []
        self._writing: asyncio.Task[None] | None = None

    def _dt(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    async def hold(self, claim: Claim, until: float) -> bool:
        """Hand a claim back held (its breaker is open); False when not held (lease lost, or
        the store failed: logged)."""
        try:
            return await self.store.hold(claim, self._dt(until), self._dt(self._now()))
        except StoreError as err:
            self.unrecorded(claim, "held", err)
            return False

    async def finish(
        self,
        claim: Claim,
        runtime: Runtime,
        lp: LoadedPostback,
        action: Action,
        job: Job,
        decision: Decision,
        started: float,
        duration: float,
    ) -> None:
        next_at = decision.next_at
        record = job.record
        request = record.request
        version = runtime.rules.version
        if version is not self._version:
            self._version_text, self._version = str(version), version
        # AttemptRow's fields in their order (positional: a third cheaper than by keyword)
        row = AttemptRow(
            self._dt(started),  # started_at
            int(duration * 1000),  # duration_ms
            decision.outcome,
            decision.reason,
            self._version_text,  # rules_version
            self._node,
            request.as_dict() if request is not None else None,
            record.response_status,
            record.response_excerpt,
        )
        store_error: str | None = None
        try:
            due = self._dt(next_at) if next_at is not None else None
            if self._batch:
                held = await self._finish(Finish(claim, row, decision.state, due))
            else:
                held = await self.store.finish_attempt(claim, row, decision.state, due)
        except StoreError as err:
            # Not recorded: the claim's lease ends and the delivery is tried again (with the
            # same idempotency key). Said once here, with what the attempt did.
            held, store_error = False, describe_error(err)
        action_type = lp.postback.action.type
        outcome = decision.outcome if held else "unrecorded" if store_error else "lease_lost"
        # One call for both levels; the store error's keys only when there is one (a merge of
        # an empty dict costs about 0.5 us a line, 0.1 % of a delivery).
        unrecorded = {"recorded": False, "store_error": store_error} if store_error else {}
        (log.warning if store_error else log.info)(
            "delivery_attempt",
            conversion_id=claim.conversion_id,
            source=claim.source,
            postback_id=claim.postback_id,
            delivery_id=claim.delivery_id,
            action=action_type,
            destination=action.destination,
            attempt=claim.attempts + 1,
            outcome=decision.outcome if store_error else outcome,
            reason=decision.reason,
            http_status=record.response_status,
            duration_ms=row.duration_ms,
            next_in_s=round(next_at - self._now(), 1) if next_at is not None else None,
            rules_version=row.rules_version,
            **unrecorded,
        )
        if self._on_attempt is not None:
            self._on_attempt(action_type, outcome, duration)

    async def _finish(self, item: Finish) -> bool:
        """The store's finish_attempt for `item`, written with the other results that end in
        this turn of the event loop or while the write before is in flight."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FinishResult] = loop.create_future()
        self._results.append((item, future))
        if self._writing is None:  # its first step runs after this turn's other callbacks
            self._writing = loop.create_task(self._write_results(), name="attempt-results")
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    async def _write_results(self) -> None:
        """Write what has gathered, then what gathered meanwhile, until nothing waits. The
        writes go on even if their callers stop waiting (cancelled), as one store call of their
        own did; graceful stop waits for the callers, so every result is written (or logged
        unrecorded) before the store closes."""
        batch: list[tuple[Finish, asyncio.Future[FinishResult]]] = []
        try:
            while self._results:
                batch, self._results = self._results, []
                results: list[FinishResult]
                try:
                    if len(batch) == 1:
                        f = batch[0][0]
                        results = [
                            await self.store.finish_attempt(
                                f.claim, f.attempt, f.state, f.next_attempt_at
                            )
                        ]
                    else:
                        results = await self.store.finish_attempts([f for f, _ in batch])
                except Exception as err:  # the write as a whole: every item's outcome
                    results = [err] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                batch = []
        except BaseException:  # cancelled (the loop is closing): nobody is left waiting
            for _, future in batch + self._results:
                future.cancel()
            self._results = []
            raise
        finally:
            self._writing = None

    async def give_back(self, claim: Claim, when: float) -> None:
        """Release a claim unsent, due again at `when`; a store failure leaves it to the lease."""
        try:
            await self.store.release(claim, self._dt(when))
        except StoreError as err:
            self.unrecorded(claim, "released", err)

    def unrecorded(self, claim: Claim, outcome: str, err: StoreError) -> None:
        log.warning(
            "delivery_attempt",
            conversion_id=claim.conversion_id,
            source=claim.source,
            postback_id=claim.postback_id,
            delivery_id=claim.delivery_id,
            outcome=outcome,
            recorded=False,
            store_error=describe_error(err),
        )

    async def cancel(self, claim: Claim, runtime: Runtime, lp: LoadedPostback | None) -> None:
        """A delivery of a removed or disabled postback ends cancelled, never sent."""
        reason = "postback_removed" if lp is None else "postback_disabled"
        row = AttemptRow(
            started_at=self._dt(self._now()),
            duration_ms=0,
            outcome="cancelled",
            reason=reason,
            rules_version=str(runtime.rules.version),
            node=self._node,
        )
        try:
            await self.store.finish_attempt(claim, row, DeliveryState.CANCELLED, None)
        except StoreError as err:
            self.unrecorded(claim, "cancelled", err)
            return
        log.info(
            "delivery_attempt",
            delivery_id=claim.delivery_id,
            postback_id=claim.postback_id,
            conversion_id=claim.conversion_id,
            outcome="cancelled",
            reason=reason,
        )
        if self._on_attempt is not None:  # a removed postback's action type is gone with it
            self._on_attempt(lp.postback.action.type if lp else "unknown", "cancelled", 0.0)
