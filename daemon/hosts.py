"""Per-destination limits: bounded concurrency (Lane: per_host_concurrency sends at once, each
slot handed straight to the next send in line), and a circuit breaker (daemon.breaker) for a
destination that keeps failing; per-affiliate fair use; the shares of claims in progress
(Shares) that keep one destination's or affiliate's backlog from filling a node. This module
keeps the state and says what happens in the log and the metrics; the dispatcher does the store
side (claim_due's skips, hold, unhold).

Log lines: ``breaker_opened`` (with the pause and the failures that opened it; the old
``destination_down`` name kept as an alias field-for-field), ``breaker_probe`` (one per pause),
``breaker_reopened`` (the probe failed: the longer pause), ``breaker_closed`` (logged by the
dispatcher with the size of the backlog it made due; also ``destination_up``).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.breaker import Breaker, BreakerPolicy, BreakerState, Change, Event, Ticket, Verdict
from daemon.log import get_logger
from daemon.settings import Settings

log = get_logger("postbackd.hosts")

_STATE_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}

# A destination's share of a node's claims in progress: its per-host concurrency sending, and as
# many again waiting in line for a slot, so it never waits for a claim to start its next attempt
# while the rest of the node's in-flight slots stay free for the other destinations.
CLAIM_QUEUE_FACTOR = 2
# The weight of the newest send in a destination's moving average of send times.
SEND_TIME_WEIGHT = 0.1


def moving_average(last: float | None, new: float, weight: float) -> float:
    """An exponentially weighted moving average: `new` alone for the first value, else `last`
    moved towards `new` by `weight` (0 to 1) of the difference."""
    return new if last is None else last + weight * (new - last)


def _nothing(*_: object) -> None:
    return None


class Shares:
    """Claims in progress on this node per key (an affiliate, a destination) against a bound
    (None: no bound): the keys at their bound are skipped at claim time (store.claim_due), and
    `on_room` is called when one drops below it, so that its deliveries are claimed again.

    A claim is in progress from its claim until its send ends (the slot is released): the
    writing of its result that follows needs no slot, and counting it would keep claims from
    the destination's idle slots for as long as the store takes to commit."""

    def __init__(self, bound: int | None, on_room: Callable[[], None]) -> None:
        self.bound = bound
        self._on_room = on_room
        self._counts: Counter[str] = Counter()
        self.total = 0  # claims in progress over every key (the sum of the counts)

    def take(self, key: str | None) -> Callable[..., None]:
        """Count one claim of `key` (None: counted under no key) until the function returned is
        called (the first call counts; later ones, with any arguments, do nothing)."""
        if key is None or self.bound is None:
            return _nothing
        self._counts[key] += 1
        self.total += 1
        ended = False

        def end(*_: object) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._ended(key)

        return end

    def _ended(self, key: str) -> None:
        self.total -= 1
        left = self._counts[key] - 1
        if left > 0:
            self._counts[key] = left
        else:
            del self._counts[key]
        if left == (self.bound or 0) - 1:
            self._on_room()  # no longer at its share: its deliveries may be claimed again

    def saturated(self, allowance: Callable[[str], int] | None = None) -> list[str]:
        """The keys with their share in progress, sorted. `allowance(key)`, when given, is how
        many of a key's claims are expected to have been sent by the time a claim made now comes
        back: those do not count against its share (a destination that sends faster than the
        store answers a claim is not skipped, so its slots do not run dry while the claim is
        under way)."""
        bound = self.bound
        if bound is None:
            return []
        if allowance is None:
            return sorted(key for key, n in self._counts.items() if n >= bound)
        return sorted(key for key, n in self._counts.items() if n - allowance(key) >= bound)

    def count(self, key: str) -> int:
        return self._counts[key]

    def full(self, key: str | None, allowance: int = 0) -> bool:
        """Whether `key` has its share in progress, `allowance` of them not counted (as
        saturated's); read only, so safe from another thread."""
        bound = self.bound
        return (
            key is not None and bound is not None and self._counts.get(key, 0) - allowance >= bound
        )


T = TypeVar("T")


class InLineTooLong(Exception):
    """A send still in line for its destination's slot at its deadline (withdrawn, not sent)."""


class Turn(Generic[T]):
    """One send in a Lane: in line, then running in one of the lane's runners, then over."""

    __slots__ = ("deadline", "ended", "result", "runner", "send", "state")

    def __init__(
        self, send: Callable[[], Awaitable[T]], result: asyncio.Future[T], deadline: float
    ) -> None:
        self.send = send
        self.result = result
        self.deadline = deadline  # loop time: withdrawn if still in line then
        self.state = _IN_LINE
        self.runner: asyncio.Task[None] | None = None  # while running
        self.ended: asyncio.Future[None] | None = None  # a cancelled running send: its end


_IN_LINE, _RUNNING, _OVER = 0, 1, 2


class Lane:
    """A destination's slots: at most `limit` sends at once, run in order of arrival.

    Each send runs in one of at most `limit` runner tasks, and a runner whose send ends starts
    the next one in line at once, in the same turn of the event loop. A semaphore would wake
    the next waiting task instead, which runs a turn later: the slot stays idle meanwhile, and
    under ingest load a turn lasts tens of milliseconds, as long as a loopback request.

    The deadlines in line are watched by one timer per lane, set for the earliest (not one per
    send: nearly every send starts long before its deadline, and each timer set and cancelled
    costs the event loop's heap its work)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._line: deque[Turn[Any]] = deque()
        self._runners: set[asyncio.Task[None]] = set()
        self._running = 0  # runners started and not yet ended
        self.sending = 0  # sends running now, at most `limit`
        self._watch: asyncio.TimerHandle | None = None  # at _watch_at: _expire_due
        self._watch_at = math.inf
        # the loop of the watch: a lane used on another loop (tests) sets its own there
        self._watch_loop: asyncio.AbstractEventLoop | None = None

    async def run(self, send: Callable[[], Awaitable[T]], line_deadline: float) -> T:
        """Run `send` in a slot and return its result (or raise its exception); InLineTooLong
        when it has not started by `line_deadline` (loop time). Cancelled while it runs, the
        send is cancelled too, and this raises once the send has ended."""
        loop = asyncio.get_running_loop()
        turn: Turn[T] = Turn(send, loop.create_future(), line_deadline)
        self._line.append(turn)
        if self._running < self.limit:
            self._running += 1
            # kept here while it runs (the loop holds tasks weakly); it drops itself at its end
            self._runners.add(loop.create_task(self._run(), name="lane"))
        if line_deadline < self._watch_at or loop is not self._watch_loop:
            self._watch_until(loop, line_deadline)
        try:
            return await turn.result
        except asyncio.CancelledError:
            ended = self._cancel(turn)
            if ended is not None:
                await asyncio.shield(ended)
            raise

    def _watch_until(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_at, self._watch_loop = when, loop
        self._watch = loop.call_at(when, self._expire_due, loop)

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Withdraw every send still in line at its deadline; watch for the next deadline."""
        self._watch, self._watch_at = None, math.inf
        now = loop.time()
        following = math.inf
        for turn in self._line:
            if turn.state != _IN_LINE or turn.result.done():  # done: its waiter was cancelled
                continue
            if turn.deadline <= now:
                turn.state = _OVER
                turn.result.set_exception(InLineTooLong())
            elif turn.deadline < following:
                following = turn.deadline
        if following < math.inf:
            self._watch_until(loop, following)

    def _cancel(self, turn: Turn[Any]) -> asyncio.Future[None] | None:
        """Take a turn out of line, or cancel its running send: then the future that is done
        when the send has ended."""
        if turn.state == _IN_LINE:
            turn.state = _OVER
            return None
        if turn.state == _RUNNING and turn.runner is not None:
            if turn.ended is None:
                turn.ended = asyncio.get_running_loop().create_future()
                turn.runner.cancel()
            return turn.ended
        return None

    async def _run(self) -> None:
        runner = asyncio.current_task()
        assert runner is not None
        try:
            while self._line:
                turn = self._line.popleft()
                if turn.state != _IN_LINE:
                    continue  # withdrawn
                turn.state, turn.runner = _RUNNING, runner
                self.sending += 1
                try:
                    value = await turn.send()
                except asyncio.CancelledError:
                    if turn.ended is None:  # the runner's own cancellation (loop shutdown)
                        turn.result.cancel()
                        raise
                    runner.uncancel()  # this send's, asked by its waiter: go on with the line
                except BaseException as err:
                    if not turn.result.done():
                        turn.result.set_exception(err)
                else:
                    if not turn.result.done():
                        turn.result.set_result(value)
                finally:
                    self.sending -= 1
                    turn.state, turn.runner = _OVER, None
                    if turn.ended is not None and not turn.ended.done():
                        turn.ended.set_result(None)
        finally:
            self._running -= 1
            self._runners.discard(runner)  # no done callback: one handle less per runner


@dataclass
class _Destination:
    breaker: Breaker
    lane: Lane
    held: set[str] = field(default_factory=set)  # delivery ids this node holds for it
    last_success: float | None = None
    probe_asked: int = -1  # the breaker epoch whose pause end already made one held due
    send_s: float | None = None  # how long its sends take (moving average), for claim_allowance


class Destinations:
    def __init__(
        self,
        per_host_concurrency: int,
        now: Callable[[], float],
        policy: BreakerPolicy | None = None,
        per_affiliate: int | None = None,
    ) -> None:
        self._limit = per_host_concurrency
        self._now = now
        self.policy = policy or BreakerPolicy()
        self._per_affiliate = per_affiliate
        self._dests: dict[str, _Destination] = {}
        self._affiliates: dict[str, asyncio.Semaphore] = {}
        self._started = now()

    @classmethod
    def from_settings(cls, settings: Settings, now: Callable[[], float]) -> Destinations:
        b = settings.outbound.breaker
        return cls(
            settings.outbound.per_host_concurrency,
            now,
            BreakerPolicy(b.threshold, b.first_pause, b.growth, b.max_pause),
            per_affiliate=settings.delivery.per_affiliate_in_flight,
        )

    @property
    def hold_safety(self) -> float:
        """How long a held delivery waits in the store at most (if this node dies holding it):
        twice the longest pause, so a live node re-holds it at most once per two pauses."""
        return 2 * self.policy.max_pause

    def _get(self, destination: str) -> _Destination:
        dest = self._dests.get(destination)
        if dest is None:
            dest = self._dests[destination] = _Destination(Breaker(self.policy), Lane(self._limit))
        return dest

    def lane(self, destination: str) -> Lane:
        """The destination's slots (per_host_concurrency sends at once)."""
        return self._get(destination).lane

    @property
    def claim_share(self) -> int:
        """How many claims of one destination a node keeps in progress at most (sending or in
        line for its slots) before it claims the other destinations' deliveries only."""
        return CLAIM_QUEUE_FACTOR * self._limit

    @property
    def per_affiliate(self) -> int | None:
        """The fair-use bound of one affiliate's attempts on this node (None: no bound)."""
        return self._per_affiliate

    def affiliate_slot(self, affiliate: str | None) -> asyncio.Semaphore | None:
        """The fair-use bound of one affiliate's postbacks (None: not an affiliate's)."""
        if affiliate is None or self._per_affiliate is None:
            return None
        sem = self._affiliates.get(affiliate)
        if sem is None:
            sem = self._affiliates[affiliate] = asyncio.Semaphore(self._per_affiliate)
        return sem

    def admit(self, destination: str) -> Ticket:
        """SEND, PROBE (the one attempt after a pause) or HOLD (hand the delivery back)."""
        ticket, event = self._get(destination).breaker.admit(self._now())
        if event is not None and event.change is Change.PROBING:
            log.info("breaker_probe", destination=destination, pause_s=event.pause)
        return ticket

    def probes_due(self) -> list[str]:
        """Destinations whose pause has ended without a probe asked for yet: one held delivery
        of each is made due (store.unhold with limit 1) to be the probe, so a destination whose
        whole backlog is held is probed at the end of its pause, not at the safety time."""
        now = self._now()
        due = []
        for name, dest in self._dests.items():
            breaker = dest.breaker
            ended = breaker.state is BreakerState.OPEN and now >= breaker.until
            if ended and dest.probe_asked != breaker.epoch:
                dest.probe_asked = breaker.epoch
                due.append(name)
        return due

    def probe_not_asked(self, destination: str) -> None:
        """The store could not make a held delivery due: ask again on the next pass."""
        self._get(destination).probe_asked = -1

    def held(self, destination: str, delivery_id: str) -> None:
        self._get(destination).held.add(delivery_id)

    def record(self, destination: str, ticket: Ticket, healthy: bool) -> Event | None:
        """The result of an admitted attempt; the change of state it caused, if any (CLOSED:
        the caller makes the held backlog due and logs breaker_closed with its size)."""
        dest = self._get(destination)
        now = self._now()
        if healthy:
            dest.last_success = now
        event = dest.breaker.record(ticket, healthy, now)
        if event is None:
            return None
        if event.change is Change.OPENED:
            fields = {"destination": destination, "failures": event.failures}
            log.warning("breaker_opened", **fields, pause_s=event.pause)
            log.warning("destination_down", **fields, next_in_s=event.pause)
        elif event.change is Change.REOPENED:
            log.warning("breaker_reopened", destination=destination, pause_s=event.pause)
        elif event.change is Change.CLOSED:
            dest.held.clear()
        return event

    def sent(self, destination: str, seconds: float) -> None:
        """How long one send to `destination` took (from its slot to its answer)."""
        dest = self._get(destination)
        dest.send_s = moving_average(dest.send_s, seconds, SEND_TIME_WEIGHT)

    def claim_allowance(self, destination: str, claim_s: float, most: int) -> int:
        """How many of `destination`'s claims in progress its slots will have sent by the time
        a claim that takes `claim_s` comes back (at most `most`): its per-host concurrency
        times as many sends as fit in that time, by its sends' moving average. 0 before its
        first send, and about 0 for a slow destination, whose share stays as it is."""
        dest = self._dests.get(destination)
        if dest is None or dest.send_s is None or claim_s <= 0:
            return 0
        fits = claim_s / max(dest.send_s, 1e-4)
        return min(most, int(self._limit * fits))

    def abandon(self, destination: str, ticket: Ticket) -> None:
        if ticket.verdict is not Verdict.PROBE:
            return  # only a probe can be abandoned (Breaker.abandon): no clock read for a send
        self._get(destination).breaker.abandon(ticket, self._now())

    def state(self, destination: str) -> BreakerState:
        dest = self._dests.get(destination)
        return dest.breaker.state if dest else BreakerState.CLOSED

    def is_down(self, destination: str) -> bool:
        return self.state(destination) is not BreakerState.CLOSED

    def down(self) -> list[str]:
        """The destinations whose breaker is not closed (open, or probing), by name."""
        closed = BreakerState.CLOSED
        return sorted(n for n, d in self._dests.items() if d.breaker.state is not closed)


class DestinationsCollector(Collector):
    """Per-destination metrics at scrape time: breaker state, held deliveries, time since the
    last healthy answer (since start when there was none)."""

    def __init__(self, destinations: Destinations) -> None:
        self._d = destinations

    def collect(self) -> Iterable[Metric]:
        d = self._d
        state = GaugeMetricFamily(
            "postbackd_destination_breaker_state",
            "Circuit breaker of each destination: 0 closed, 1 half-open (probing), 2 open.",
            labels=["destination"],
        )
        held = GaugeMetricFamily(
            "postbackd_destination_held_deliveries",
            "Deliveries this node holds for a destination while its breaker is open.",
            labels=["destination"],
        )
        since = GaugeMetricFamily(
            "postbackd_destination_seconds_since_success",
            "Seconds since the destination last answered as a healthy host (since start if never).",
            labels=["destination"],
        )
        now = d._now()
        for name, dest in list(d._dests.items()):
            state.add_metric([name], _STATE_VALUE[dest.breaker.state])
            held.add_metric([name], len(dest.held))
            last = dest.last_success if dest.last_success is not None else d._started
            since.add_metric([name], max(0.0, now - last))
        yield state
        yield held
        yield since
