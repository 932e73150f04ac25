"""The dispatcher: claims due deliveries, runs each action once per claim, records the attempt
and decides what comes next (retry on the schedule, dead, cancelled)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from daemon.actions.base import Job
from daemon.errors import DeliveryError, OutcomeUnknownError, PermanentError, RetryableError
from daemon.hosts import Destinations
from daemon.retry import RetryPolicy
from daemon.store.base import AttemptRow, Claim, DeliveryState, Store

log = structlog.get_logger("postbackd.dispatcher")

# Reasons that say the destination itself is unwell (feeds the pause of hosts.Destinations).
# At most this share of the lease is spent waiting for a per-destination slot, so the rest (by
# default 40 % of 300 s: 120 s) is left for the attempt itself.
SLOT_WAIT_SHARE = 0.5
# A delivery of a postback this node does not know is put back for this long, for as long as
# the delivery is younger than the grace; then it is cancelled as removed.
UNKNOWN_POSTBACK_RETRY = 30.0
UNKNOWN_POSTBACK_GRACE = 600.0
_HOST_REASONS = ("connect_failed", "connect_timeout", "dns_failed", "timeout", "disconnected")


@dataclass(frozen=True)
class DispatcherConfig:
    node: str
    lease: float = 300.0  # longer than any attempt's timeout
    batch: int = 64
    max_in_flight: int = 256
    poll_interval: float = 1.0
    attempt_timeout: float = 130.0  # a last-resort bound around an action's own timeouts

    @property
    def attempt_bound(self) -> float:
        """An attempt always ends before its claim does, so no other node can start it."""
        return min(self.attempt_timeout, self.lease * 0.9)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        runtime: Callable[[], Any],
        now: Callable[[], float],
        config: DispatcherConfig,
        destinations: Destinations,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        on_attempt: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.store = store
        self._runtime = runtime
        self._now = now
        self.config = config
        self.destinations = destinations
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self._on_attempt = on_attempt
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Held while claiming and starting: stop() waits on it, so that a claim already under
        # way cannot start attempts after stop() has returned (and the session has closed).
        self._claiming = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _dt(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    async def run(self) -> None:
        """Claim and start attempts until stopped."""
        while not self._stopping:
            started = await self.dispatch_once()
            if started:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_interval):
                    await self._wake.wait()

    async def dispatch_once(self) -> int:
        """Claim what is due and start an attempt for each; returns how many were started."""
        async with self._claiming:
            room = self.config.max_in_flight - len(self._tasks)
            if room <= 0 or self._stopping:
                return 0
            claims = await self.store.claim_due(
                self.config.node,
                self._dt(self._now()),
                min(room, self.config.batch),
                timedelta(seconds=self.config.lease),
            )
            for claim in claims:
                task = asyncio.create_task(self._attempt(claim))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return len(claims)

    async def drain(self) -> None:
        """Wait for every attempt in progress (tests and graceful stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let attempts finish within `grace` seconds, release the rest."""
        self._stopping = True
        self.wake()
        async with self._claiming:  # a claim under way starts its attempts, then none starts
            pass
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _attempt(self, claim: Claim) -> None:
        runtime = self._runtime()
        lp = runtime.rules.postbacks.get(claim.postback_id)
        age = self._now() - claim.created_at.timestamp()
        if lp is None and age < UNKNOWN_POSTBACK_GRACE:
            # Another node may run newer rules than this one (a sync timer apart): wait for
            # ours to catch up rather than cancel a postback we have not heard of yet.
            await self.store.release(claim, self._dt(self._now() + UNKNOWN_POSTBACK_RETRY))
            return
        if lp is None or not lp.postback.active:
            await self._cancel(claim, runtime, lp)
            return
        action = runtime.actions[claim.postback_id]
        dest = action.destination
        paused = self.destinations.paused_until(dest)
        if paused is not None:
            await self.store.release(claim, self._dt(paused))  # due again when the pause ends
            return
        loop = asyncio.get_running_loop()
        # The claim's clock starts now, not when a slot frees up: an attempt must end before
        # the lease does, or another node could send it too.
        deadline = loop.time() + self.config.attempt_bound
        semaphore = self.destinations.semaphore(dest)
        try:
            async with asyncio.timeout(self.config.lease * SLOT_WAIT_SHARE):
                await semaphore.acquire()
        except TimeoutError:
            # Too long in line for this destination: hand the claim back unsent.
            await self.store.release(claim, self._dt(self._now()))
            return
        try:
            if self._stopping:  # not sent yet: it waits for the next start instead of the grace
                await self.store.release(claim, self._dt(self._now()))
                return
            sent = await self._send(claim, lp, action, deadline)
        finally:
            semaphore.release()  # before the store write: the slot bounds sending, not commits
        await self._conclude(claim, runtime, lp, action, *sent)

    async def _send(
        self, claim: Claim, lp: Any, action: Any, deadline: float
    ) -> tuple[Job, DeliveryError | None, float, float]:
        """One attempt of the action: the job (with its record), the error if any, when it
        started and how long it took."""
        job = Job.for_attempt(
            claim.postback_id,
            claim.delivery_id,
            claim.idempotency_key,
            claim.values,
            claim.data,
            now=self._now(),
            rand=str(uuid.uuid4()),
        )
        started, t0 = self._now(), time.monotonic()
        error: DeliveryError | None = None
        try:
            async with asyncio.timeout_at(deadline):
                await action.send(job)
        except DeliveryError as err:
            error = err
        except TimeoutError:
            error = (
                RetryableError("timeout", "attempt timed out")
                if action.idempotent
                else OutcomeUnknownError("attempt timed out after the request was sent")
            )
        except asyncio.CancelledError:
            # Graceful stop: hand the claim back. The resend, if any, carries the same key.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(claim, self._dt(self._now())))
            raise
        except Exception as err:  # an action bug must not kill the dispatcher
            log.exception(
                "action_failed", delivery_id=claim.delivery_id, action=lp.postback.action.type
            )
            error = RetryableError("internal_error", type(err).__name__)
        return job, error, started, time.monotonic() - t0

    async def _conclude(
        self,
        claim: Claim,
        runtime: Any,
        lp: Any,
        action: Any,
        job: Job,
        error: DeliveryError | None,
        started: float,
        duration: float,
    ) -> None:
        dest = action.destination
        next_at: float | None = None
        if error is None:
            state, outcome, reason = DeliveryState.SUCCEEDED, "succeeded", None
            self.destinations.succeeded(dest)
        elif isinstance(error, RetryableError):
            retry = lp.postback.retry
            policy = self.policy.with_override(
                retry.max_attempts if retry else None, retry.max_age if retry else None
            )
            age = self._now() - claim.created_at.timestamp()
            delay = policy.next_delay(claim.attempts + 1, age, error.retry_after, self._rng)
            if delay is None:
                state, outcome, reason = DeliveryState.DEAD, "dead", error.reason
            else:
                state, outcome, reason = DeliveryState.RETRYING, "retry", error.reason
                next_at = self._now() + delay
            if error.reason in _HOST_REASONS or error.reason.startswith(("http_5", "http_429")):
                self.destinations.failed(dest)
        else:
            assert isinstance(error, PermanentError)
            state, outcome, reason = DeliveryState.DEAD, "dead", error.reason
            if error.reason in _HOST_REASONS:
                self.destinations.failed(dest)
        row = AttemptRow(
            started_at=self._dt(started),
            duration_ms=int(duration * 1000),
            outcome=outcome,
            reason=reason,
            rules_version=str(runtime.rules.version),
            node=self.config.node,
            request=job.record.request.as_dict() if job.record.request else None,
            response_status=job.record.response_status,
            response_excerpt=job.record.response_excerpt,
        )
        held = await self.store.finish_attempt(
            claim, row, state, self._dt(next_at) if next_at is not None else None
        )
        log.info(
            "delivery_attempt",
            conversion_id=claim.conversion_id,
            source=claim.source,
            postback_id=claim.postback_id,
            delivery_id=claim.delivery_id,
            action=lp.postback.action.type,
            destination=dest,
            attempt=claim.attempts + 1,
            outcome=outcome if held else "lease_lost",
            reason=reason,
            http_status=job.record.response_status,
            duration_ms=row.duration_ms,
            next_in_s=round(next_at - self._now(), 1) if next_at is not None else None,
            rules_version=row.rules_version,
        )
        if self._on_attempt is not None:
            self._on_attempt(lp.postback.action.type, outcome if held else "lease_lost", duration)

    async def _cancel(self, claim: Claim, runtime: Any, lp: Any) -> None:
        """A delivery of a removed or disabled postback ends cancelled, never sent."""
        reason = "postback_removed" if lp is None else "postback_disabled"
        row = AttemptRow(
            started_at=self._dt(self._now()),
            duration_ms=0,
            outcome="cancelled",
            reason=reason,
            rules_version=str(runtime.rules.version),
            node=self.config.node,
        )
        await self.store.finish_attempt(claim, row, DeliveryState.CANCELLED, None)
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
