"""The dispatcher: claims due deliveries, runs each action once per claim, records the attempt
and what comes next (daemon.decisions decides it: succeeded, retry at T, dead), and feeds each
destination's circuit breaker (daemon.hosts, daemon.breaker).

An attempt's time counts from the moment it gets its destination slot: waiting in line never
cuts a request that was not sent, nor marks a destination as failing. The claim's lease still
outlasts every attempt because the wait for a slot is bounded (docs/scaling.md): at most
`slot_wait` in line, then at most `attempt_bound` sending, together 90 % of the lease; a claim
that waited too long is handed back unsent.

A node keeps at most a share of claims in progress (claimed and not yet sent) per affiliate
(fair use) and per destination (twice its per-host concurrency): the claims leave out the
deliveries of those at their share (store.claim_due's skips), so one backlog, such as a
destination's released after an outage, drains oldest first at its own pace and leaves the
node's other claims to the rest.

A lightly loaded node does not claim its own new deliveries: the store writes them leased to
it as the arrival commits (lease_ahead, daemon.store.base.LeaseAhead: only while its last claim
found nothing more due and at most LEASE_AT_INSERT_MAX attempts are in progress, or on
PostgreSQL not yet sent), and they start here as claimed ones do, bound by the same shares,
breakers and lease.

While a destination's breaker is open its claims are handed back held (store.hold: no attempt,
no attempt count); when it closes, its backlog becomes due at once (store.unhold). A result that
cannot be recorded (StoreError) is logged and left to its claim's lease; no task's exception
goes unretrieved.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.actions.base import Action, Job, is_bounded
from daemon.attempts import Recorder, describe_error
from daemon.breaker import Change, Ticket, Verdict
from daemon.decisions import Decision, decide, effective_policy
from daemon.errors import DeliveryError, OutcomeUnknownError, RetryableError, StoreError
from daemon.hosts import Destinations, InLineTooLong, Shares, moving_average
from daemon.loader import LoadedPostback
from daemon.log import get_logger
from daemon.retry import RetryPolicy
from daemon.store.base import Claim, LeaseAhead, PlannedDelivery, Store

if TYPE_CHECKING:
    from daemon.reload import Runtime

log = get_logger("postbackd.dispatcher")


class _Unsent(enum.Enum):
    """Why a send that had its slot did not go: stopping, or the breaker holds it."""

    STOPPING = "stopping"
    HOLD = "hold"


_STOPPING, _HOLD = _Unsent.STOPPING, _Unsent.HOLD

# A delivery of a postback this node does not know is put back for this long, for as long as
# the delivery is younger than the grace; then it is cancelled as removed.
UNKNOWN_POSTBACK_RETRY = 30.0
UNKNOWN_POSTBACK_GRACE = 600.0
# The weight of the newest claim in the moving average of how long claims take.
CLAIM_TIME_WEIGHT = 0.2
# The share of the lease that waiting for slots plus sending may take; the rest is the margin
# for recording the result before another node may claim the delivery.
LEASE_USE = 0.9
# An attempt may take at most this share of the lease; what is left of LEASE_USE is the wait.
ATTEMPT_SHARE = 0.6
# New deliveries are leased at insert (no claim) only while, with them, at most this many
# attempts are in progress here: a lightly loaded node starts each at once, one commit sooner.
# Under load the claims take them a batch at a time, and attempts started together cost less
# CPU than the same attempts started as each arrival commits (docs/benchmarks-history.md, run P:
# leasing at any load cost 5 to 8 % more CPU per delivered conversion at saturation, though
# fewer instructions). On a store whose lease_bound_unsent is true (PostgreSQL) the bound counts
# only the attempts not yet sent: there an attempt waits tens of milliseconds for its result's
# round trip after its send, and counting those left most deliveries to the claims at 1,000/s.
LEASE_AT_INSERT_MAX = 16


@dataclass(frozen=True)
class DispatcherConfig:
    node: str
    lease: float = 300.0  # longer than any attempt's timeout
    batch: int = 64
    max_in_flight: int = 256
    poll_interval: float = 1.0
    attempt_timeout: float = 130.0  # a last-resort bound around an action's own timeouts

    # Computed once per config (frozen: dataclasses.replace makes a new one, with its own).
    @functools.cached_property
    def attempt_bound(self) -> float:
        """How long an attempt may take from the moment it has its slot."""
        return min(self.attempt_timeout, self.lease * ATTEMPT_SHARE)

    @functools.cached_property
    def slot_wait(self) -> float:
        """How long a claim may wait in line for its slots; with attempt_bound, 90 % of the
        lease, so an attempt always ends before its claim does (no other node can start it)."""
        return self.lease * LEASE_USE - self.attempt_bound


class Dispatcher:
    def __init__(
        self,
        store: Store,
        runtime: Callable[[], Runtime],
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
        self._record = Recorder(store, config.node, now, on_attempt)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Destinations whose breaker closed and whose held backlog is still to be made due
        # (done before the next claim; kept when the store fails, so nothing stays held).
        self._unhold: set[str] = set()
        # Claims in progress here per affiliate (postbacks authored for one) and per
        # destination: the ones at their share are skipped at claim time (fair use; a backlog
        # draining after an outage leaves the node's slots to the other destinations).
        self._per_affiliate = Shares(destinations.per_affiliate, self.wake)
        self._per_destination = Shares(destinations.claim_share, self.wake)
        # Held while claiming and starting: stop() waits on it, so that a claim already under
        # way cannot start attempts after stop() has returned (and the session has closed).
        self._claiming = asyncio.Lock()
        # How long claims take (moving average): what a fast destination's slots can send
        # while one is under way (_claim_allowance).
        self._claim_s: float | None = None
        # Leasing at insert (lease_ahead): the deliveries the store leased to this node inside
        # arrivals' transactions and not yet started here, counted with the attempts against
        # _lease_room (the store's writer thread takes room under the lock, the loop frees
        # it); offered only while the last claim found the due deliveries drained.
        self._leases_at_insert = bool(getattr(store, "leases_at_insert", False))
        self._lease = timedelta(seconds=config.lease)
        self._lease_room = min(config.max_in_flight, LEASE_AT_INSERT_MAX)
        # What the room bounds: every attempt in progress, or (store.lease_bound_unsent) only
        # those not yet sent: the destinations' shares count each attempt from its start until
        # its send ends (_per_destination.total).
        self._bound_unsent = bool(getattr(store, "lease_bound_unsent", False))
        self._ahead = 0
        self._ahead_lock = threading.Lock()
        self._drained = False
        self._claimed_full = False  # the last claim came back full (behind: not before one)
        self._running = False  # run() is under way (not in a supervisor's backoff, not a test's)
        # Deliveries started here from claims and from leases at insert (DispatcherCollector).
        self.started = {"claim": 0, "lease_at_insert": 0}
        self._none_ahead = asyncio.Event()  # stopping, and nothing leased ahead is unsettled
        # Told when an attempt ends (daemon.pacing: arrivals waiting for delivery to catch up).
        self.on_attempt_done: Callable[[], None] | None = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def behind(self) -> bool:
        """Whether more is due here now than one claim takes (its last claim came back full).
        A destination at its share is left out of the claims, so a slow one does not count."""
        return self._running and self._claimed_full

    def _dt(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    async def run(self, beat: Callable[[], None] | None = None) -> None:
        """Claim and start attempts until stopped; `beat()` after each claim that worked.

        A StoreError from the claim ends this call: the supervisor (daemon.supervise) logs it
        once and calls run again after its backoff, so the dispatcher outlives any outage."""
        self._running = True
        try:
            await self._run(beat)
        finally:
            self._running = False
            self._drained = False
            self._claimed_full = False

    async def _run(self, beat: Callable[[], None] | None) -> None:
        while not self._stopping:
            # Cleared before the claim, not after it: a wake-up that comes while the claim is
            # under way (an attempt ended, its destination's share has room again) is kept, and
            # claims again at once. Cleared after, it was lost, and the destination's next
            # claim waited for the poll interval with its slots idle.
            self._wake.clear()
            started = await self.dispatch_once()
            if beat is not None:
                beat()
            if started:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_interval):
                    await self._wake.wait()

    async def dispatch_once(self) -> int:
        """Make due what closed breakers held, then claim what is due and start an attempt for
        each; returns how many were started."""
        async with self._claiming:
            await self._release_held()
            room = self.config.max_in_flight - len(self._tasks)
            if room <= 0 or self._stopping:
                return 0
            batch = min(room, self.config.batch)
            loop = asyncio.get_running_loop()
            asked = loop.time()
            claims = await self.store.claim_due(
                self.config.node,
                self._dt(self._now()),
                batch,
                self._lease,
                skip_affiliates=self._per_affiliate.saturated(),
                skip_destinations=self._per_destination.saturated(
                    functools.partial(self._claim_allowance, batch)
                ),
            )
            self._claim_s = moving_average(self._claim_s, loop.time() - asked, CLAIM_TIME_WEIGHT)
            # Fewer than asked: nothing else is due now, and new deliveries may be leased at
            # insert without passing any (a full batch: they queue behind it, oldest first).
            self._drained = len(claims) < batch
            self._claimed_full = not self._drained
            self.started["claim"] += len(claims)
            self._start(claims)
            return len(claims)

    def lease_ahead(self) -> LeaseAhead | None:
        """An offer to take one arrival's new deliveries as the store writes them (LeaseAhead:
        no claim), or None: the store cannot, this dispatcher's loop does not run (not started,
        in its supervisor's backoff after a failure, stopping), its last claim found a full
        batch due, or a closed breaker's backlog is still to be made due (new deliveries then
        queue behind those, oldest first)."""
        if not (self._running and self._drained and self._leases_at_insert):
            return None
        if self._stopping or self._unhold:
            return None
        return LeaseAhead(self.config.node, self._lease, self._admit, self._adopt)

    def _admit(self, planned: Sequence[PlannedDelivery]) -> bool:
        """When the store has planned an arrival (SQLite: in its transaction, on the writer
        thread; PostgreSQL: on the event loop, before a new conversion's statement or inside a
        stored conversion's transaction): whether all of an arrival's deliveries may be
        leased here now, keeping the room for them when so. Not when one's
        destination is down (a claim would hold it: as queued, it waits for the breaker), one's
        destination or affiliate has its share in progress (a claim would skip it), or the
        node's attempts with them would pass LEASE_AT_INSERT_MAX (or max_in_flight when lower):
        all its attempts in progress, or those not yet sent where the store says so
        (lease_bound_unsent: PostgreSQL). The shares and breakers are read, not changed: a
        batch of arrivals may pass a share by its size, as a claim may by one batch."""
        if self._stopping:
            return False
        dests, per_dest, per_aff = self.destinations, self._per_destination, self._per_affiliate
        batch = self.config.batch
        for p in planned:
            dest = p.destination
            if (
                dests.is_down(dest)
                or per_dest.full(dest, self._claim_allowance(batch, dest))
                or per_aff.full(p.affiliate_owner)
            ):
                return False
        n = len(planned)
        busy = per_dest.total if self._bound_unsent else len(self._tasks)
        with self._ahead_lock:
            if busy + self._ahead + n > self._lease_room:
                return False
            self._ahead += n
        return True

    def _adopt(self, lease: LeaseAhead, committed: bool) -> None:
        """On the event loop after an arrival's transaction: start the deliveries it leased
        here, or only free their room when it did not commit. Stopping, they are handed back
        (due at once) by tasks that stop() waits for."""
        with self._ahead_lock:
            self._ahead -= lease.reserved
            none_ahead = self._ahead == 0
        if none_ahead and self._stopping:
            self._none_ahead.set()
        if not committed or not lease.claims:
            return
        if self._stopping:
            for claim in lease.claims:
                task = asyncio.create_task(
                    self._record.give_back(claim, self._now()), name="attempt"
                )
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._task_done, ()))
            return
        self.started["lease_at_insert"] += len(lease.claims)
        self._start(lease.claims)

    def _start(self, claims: Sequence[Claim]) -> None:
        """An attempt task for each claim, its shares taken."""
        if not claims:
            return
        postbacks = self._runtime().rules.postbacks
        for claim in claims:
            lp = postbacks.get(claim.postback_id)
            affiliate = lp.postback.owner_affiliate if lp is not None else None
            # Their deliveries are not claimed again until one of these has sent, so a
            # backlog cannot fill the node (the claim that reaches a share may pass it by up
            # to one batch; attempts are bounded exactly by the affiliate's and host's
            # slots). Ended when the send ends, or else when the task does.
            shares = (
                self._per_affiliate.take(affiliate),
                self._per_destination.take(claim.destination),
            )
            task = asyncio.create_task(self._attempt(claim, shares), name="attempt")
            self._tasks.add(task)
            # one callback (one handle on the loop) for the task's end and its shares'
            task.add_done_callback(functools.partial(self._task_done, shares))

    def _claim_allowance(self, batch: int, destination: str) -> int:
        """How many of a destination's claims in progress are not counted against its share
        for the next claim: those its slots will have sent while that claim is under way (by
        the last claims' round trip), at most one batch. Under ingest load a claim waits for
        the store's writer (tens of ms) while a fast destination's slots send a batch in a few:
        with the share alone, the claim made right after a full one skipped that destination
        and came back empty, and its slots sat idle for one claim in two."""
        if self._claim_s is None:
            return 0
        return self.destinations.claim_allowance(destination, self._claim_s, batch)

    def _task_done(self, shares: tuple[Callable[..., None], ...], task: asyncio.Task[None]) -> None:
        """Every attempt task's end is collected: an exception that escaped is logged; its
        shares end (if the send did not end them already: a second end does nothing)."""
        self._tasks.discard(task)
        if self.on_attempt_done is not None:
            self.on_attempt_done()
        try:
            if task.cancelled():
                return
            err = task.exception()
            if err is not None:
                log.error("attempt_task_failed", error=describe_error(err), exc_info=err)
        finally:
            for end in shares:
                end()

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
        # Arrivals whose deliveries were leased here before the stop: their transactions end
        # in a moment (settled: handed back, as tasks waited for below).
        if self._ahead > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._none_ahead.wait()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _release_held(self) -> None:
        for dest in self.destinations.probes_due():
            try:
                await self.store.unhold(dest, self._dt(self._now()), limit=1)
            except StoreError as err:
                self.destinations.probe_not_asked(dest)
                log.warning("breaker_probe_unreleased", destination=dest, error=describe_error(err))
        for dest in sorted(self._unhold):
            try:
                count = await self.store.unhold(dest, self._dt(self._now()))
            except StoreError as err:
                log.warning(
                    "breaker_backlog_unreleased", destination=dest, error=describe_error(err)
                )
                return  # tried again before the next claim
            self._unhold.discard(dest)
            log.info("breaker_closed", destination=dest, backlog=count)
            log.info("destination_up", destination=dest)

    async def _attempt(self, claim: Claim, shares: tuple[Callable[..., None], ...]) -> None:
        runtime = self._runtime()
        lp = runtime.rules.postbacks.get(claim.postback_id)
        age = self._now() - claim.created_at.timestamp()
        if lp is None and age < UNKNOWN_POSTBACK_GRACE:
            # Another node may run newer rules than this one (a sync timer apart): wait for
            # ours to catch up rather than cancel a postback we have not heard of yet.
            await self._record.give_back(claim, self._now() + UNKNOWN_POSTBACK_RETRY)
            return
        if lp is None or not lp.postback.active:
            await self._record.cancel(claim, runtime, lp)
            return
        action = runtime.actions[claim.postback_id]
        sent = await self._send_in_slot(claim, lp, action)
        for end in shares:  # sent (or handed back): no longer in line for a slot
            end()
        if sent is None:
            return
        job, decision, started, duration = sent
        await self._record.finish(claim, runtime, lp, action, job, decision, started, duration)

    def _health(self, dest: str, ticket: Ticket, decision: Decision) -> None:
        event = self.destinations.record(dest, ticket, decision.healthy)
        if event is not None and event.change is Change.CLOSED:
            self._unhold.add(dest)
            self.wake()

    async def _hold(self, claim: Claim, dest: str) -> None:
        """The breaker is open: hand the claim back held, no attempt."""
        held = await self._record.hold(claim, self._now() + self.destinations.hold_safety)
        if held:
            self.destinations.held(dest, claim.delivery_id)
        if not self.destinations.is_down(dest):
            # The breaker closed while this hold was being written: release it with the rest.
            self._unhold.add(dest)
            self.wake()

    async def _send_in_slot(
        self, claim: Claim, lp: LoadedPostback, action: Action
    ) -> tuple[Job, Decision, float, float] | None:
        """Wait (bounded) for the affiliate's fair-use slot and the destination's slot, ask the
        destination's breaker, then send and decide what follows; None when the claim was
        handed back unsent (no slot in time, stopping) or held (the breaker is open)."""
        dest = action.destination
        affiliate = self.destinations.affiliate_slot(lp.postback.owner_affiliate)
        loop = asyncio.get_running_loop()
        in_line_until = loop.time() + self.config.slot_wait
        # The send runs in one of the destination's slots (a lane's runner task), started as
        # soon as a slot's previous send ends.
        send = functools.partial(self._in_slot, claim, lp, action)
        try:
            if affiliate is None:
                sent = await self.destinations.lane(dest).run(send, in_line_until)
            else:
                async with asyncio.timeout_at(in_line_until):
                    await affiliate.acquire()
                try:
                    sent = await self.destinations.lane(dest).run(send, in_line_until)
                finally:
                    affiliate.release()
        except (TimeoutError, InLineTooLong):
            # Too long in line: hand the claim back unsent (its lease must outlast it).
            await self._record.give_back(claim, self._now())
            return None
        # the slots are released here, before the store write: they bound sending, not commits
        if sent is _STOPPING:  # not sent: it waits for the next start instead of the grace
            await self._record.give_back(claim, self._now())
            return None
        if sent is _HOLD:
            await self._hold(claim, dest)
            return None
        assert not isinstance(sent, _Unsent)
        return sent

    async def _in_slot(
        self, claim: Claim, lp: LoadedPostback, action: Action
    ) -> tuple[Job, Decision, float, float] | _Unsent:
        """What runs in the destination's slot: the breaker's verdict, the send, and what its
        result says of the destination's health, told to the breaker before the slot goes to
        the next send in line (which the breaker may then hold)."""
        if self._stopping:
            return _STOPPING
        dest = action.destination
        # Asked with the slot in hand: a claim that waited in line while the breaker opened
        # is held, not sent, so at most per_host_concurrency attempts meet a dead host.
        ticket = self.destinations.admit(dest)
        if ticket.verdict is Verdict.HOLD:
            return _HOLD
        try:
            # The attempt's time starts now that it has its slot, not when it was claimed.
            deadline = asyncio.get_running_loop().time() + self.config.attempt_bound
            job, error, started, duration = await self._send(claim, lp, action, deadline)
            self.destinations.sent(dest, duration)
            policy = effective_policy(self.policy, lp.postback.retry)
            decision = decide(error, claim, policy, self._now(), self._rng)
            self._health(dest, ticket, decision)
            if not decision.healthy:
                # The slot waits one turn of the event loop before its next send, as a woken
                # waiter would: the other attempts whose answers came in the same turn tell the
                # breaker first, so once they open it the next send in line is held, and at most
                # per_host_concurrency attempts meet a dead host.
                await asyncio.sleep(0)
        finally:
            # A probe that never ended is given up (a no-op once its result is recorded).
            self.destinations.abandon(dest, ticket)
        return job, decision, started, duration

    async def _send(
        self, claim: Claim, lp: LoadedPostback, action: Action, deadline: float
    ) -> tuple[Job, DeliveryError | None, float, float]:
        """One attempt of the action: the job (with its record), the error if any, when it
        started and how long it took."""
        # A bounded action ends by the job's deadline by itself (its requests carry it): no
        # timer here. Any other is cut by this one at the deadline.
        bounded = is_bounded(action)
        started = self._now()  # the attempt's start, and its {timestamp}
        job = Job.for_attempt(
            claim.postback_id,
            claim.delivery_id,
            claim.idempotency_key,
            claim.values,
            claim.data,
            now=started,  # rand: drawn for this attempt if a template reads it
            deadline=deadline if bounded else None,
        )
        t0 = time.monotonic()
        error: DeliveryError | None = None
        try:
            if bounded:
                await action.send(job)
            else:
                async with asyncio.timeout_at(deadline):
                    await action.send(job)
        except DeliveryError as err:
            error = err
        except TimeoutError:
            error = (
                RetryableError("timeout", "attempt timed out", unwell=True)
                if action.idempotent
                else OutcomeUnknownError(
                    "attempt timed out after the request was sent", unwell=True
                )
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


class DispatcherCollector(Collector):
    """How this node's deliveries started, at scrape time: from a claim, or leased at insert
    (Dispatcher.lease_ahead)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher

    def collect(self) -> Iterable[Metric]:
        started = CounterMetricFamily(
            "postbackd_deliveries_started",
            "Deliveries this node started sending, by how it took them: claimed from the "
            "store's due deliveries (claim), or leased to it as the arrival wrote them "
            "(lease_at_insert: no claim).",
            labels=["via"],
        )
        for via, count in self._d.started.items():
            started.add_metric([via], count)
        yield started
