"""Prometheus metrics (SPEC 14): one registry per app, fed by ingest, the dispatcher, the reloader
and the app's request handler (`count_requests`); the queue depth is read from the store when
Prometheus scrapes.

Every metric of ours is prefixed ``postbackd_``; the registry also carries the standard
``process_*`` metrics (start time, memory, open files) of the running process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.errors import StoreError
from daemon.log import get_logger
from daemon.models import Transition
from daemon.store.base import FINAL_STATES, DeliveryState, Finish, FinishResult, Store
from daemon.supervise import describe

log = get_logger("postbackd.metrics")

# Attempts range from a few milliseconds (a local receiver) to the outbound timeout and beyond.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Requests that matched no route share one label, so random URLs cannot grow the series count.
UNMATCHED = "unmatched"
DEPTH_TIMEOUT = 5.0  # a scrape still answers (with the last depth) when the store is slow
# The final states (succeeded, dead, cancelled) hold most of the deliveries a store keeps, and
# counting them reads all of those: about 0.07 s per million on SQLite, and 0.08 s of three
# PostgreSQL processes per million, here (docs/operations.md). QueueDepth counts the live states
# at every read and recounts the final ones only when FINAL_COUNT_MIN_EVERY seconds and
# FINAL_COUNT_SPACING times the last count's duration have passed (so counting takes at most
# about 1 % of a reader's time); a read waits for a due count only if the last one took at most
# FINAL_COUNT_WAIT seconds, else the count runs in the background.
FINAL_COUNT_MIN_EVERY = 10.0
FINAL_COUNT_SPACING = 100.0
FINAL_COUNT_WAIT = 0.5
CONTENT_TYPE = CONTENT_TYPE_LATEST

RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RulesSource(Protocol):
    """What the reload metrics read (daemon.reload.Reloader)."""

    @property
    def status(self) -> Any: ...

    @property
    def runtime(self) -> Any: ...


class _RulesCollector(Collector):
    """Reload and rule-set metrics, read from the reloader's status at scrape time."""

    def __init__(self) -> None:
        self.source: RulesSource | None = None

    def collect(self) -> Iterable[Metric]:
        source = self.source
        if source is None or source.status.loaded_at is None:
            return
        status = source.status
        reloads = CounterMetricFamily(
            "postbackd_reloads",
            "Rule reloads since start (SIGHUP, file changes, API), by result.",
            labels=["result"],
        )
        reloads.add_metric(["ok"], status.reloads_ok)
        reloads.add_metric(["failed"], status.reloads_failed)
        yield reloads
        yield GaugeMetricFamily(
            "postbackd_last_reload_success_timestamp_seconds",
            "Unix time when the running rule set was loaded (the start counts).",
            value=status.loaded_at.timestamp(),
        )
        yield GaugeMetricFamily(
            "postbackd_last_reload_ok",
            "1 when the last load or reload succeeded, 0 when it failed (old rules kept).",
            value=1.0 if status.ok else 0.0,
        )
        rules = source.runtime.rules
        loaded = GaugeMetricFamily(
            "postbackd_postbacks_loaded", "Postbacks in the running rule set.", labels=["status"]
        )
        active = sum(1 for lp in rules.postbacks.values() if lp.postback.active)
        loaded.add_metric(["active"], active)
        loaded.add_metric(["disabled"], len(rules.postbacks) - active)
        yield loaded
        info = GaugeMetricFamily(
            "postbackd_rules_info", "The running rules version (always 1).", labels=["version"]
        )
        info.add_metric([str(rules.version)], 1)
        yield info


class LoopsSource(Protocol):
    """What the loop metrics read (daemon.supervise.Supervisor)."""

    def states(self) -> Mapping[str, str]: ...


class _LoopsCollector(Collector):
    """`postbackd_loop_up` per supervised loop, read from the supervisor at scrape time."""

    def __init__(self) -> None:
        self.source: LoopsSource | None = None

    def collect(self) -> Iterable[Metric]:
        if self.source is None:
            return
        up = GaugeMetricFamily(
            "postbackd_loop_up",
            "1 while a background loop (dispatcher, watcher, retention...) is up, 0 while it "
            "fails or has made no progress within its interval (see /readyz).",
            labels=["loop"],
        )
        for name, state in sorted(self.source.states().items()):
            if state != "ended":
                up.add_metric([name], 1.0 if state == "up" else 0.0)
        yield up


# The store operations that write: while the last call of one failed (and not longer ago than
# WRITE_FAILURE_MEMORY), /readyz says the store does not commit, although it may still answer
# a ping (SQLite's disk full, a write lock held past the busy timeout). The memory ends on its
# own so that a node a load balancer took out does not stay out for want of traffic.
WRITES = frozenset(
    {"record_arrival", "claim_due", "finish_attempt", "release", "recover", "hold", "unhold"}
)
WRITE_FAILURE_MEMORY = 10.0


class ObservedStore:
    """A store that counts each StoreError under the operation that raised it (the method's
    name: a fixed set), then raises it on, and remembers which writes fail right now.
    An operation that starts failing is logged once (``store_failing``, the error masked) and
    once when it works again (``store_recovered``): an outage is two lines, not one per
    request. Everything else is the wrapped store's own."""

    def __init__(
        self, store: Store, errors: Counter, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._errors = errors
        self._now = now
        self.failed_writes: dict[str, tuple[float, str]] = {}  # operation -> (when, error)
        self._failing: set[str] = set()  # operations whose last call failed

    def failing_writes(self) -> dict[str, str]:
        """The writes whose last call failed, lately: operation -> the error (masked)."""
        since = self._now() - WRITE_FAILURE_MEMORY
        return {op: error for op, (at, error) in self.failed_writes.items() if at >= since}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        call = self._wrap(name, attr)
        # Kept on the instance, so later lookups of `name` find it without coming back here:
        # the store's methods are fixed, and this sits on every store call of the hot path.
        setattr(self, name, call)
        return call

    def _wrap(self, name: str, attr: Callable[..., Any]) -> Callable[..., Any]:
        errors = self._errors.labels(name)
        write = name in WRITES

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await attr(*args, **kwargs)
            except StoreError as err:
                self._failed(name, errors, err)
                raise
            if write:
                self.failed_writes.pop(name, None)
            if name in self._failing:
                self._worked(name)
            return result

        return call

    async def finish_attempts(self, finishes: Sequence[Finish]) -> list[FinishResult]:
        """Counted as the finish_attempt of each item (the operation the metric and the log
        name): a write that fails as a whole counts once per item, as each item's own
        finish_attempt did; an item that failed alone counts once."""
        name = "finish_attempt"
        errors = self._errors.labels(name)
        try:
            results = await self._store.finish_attempts(finishes)
        except StoreError as err:
            self._failed(name, errors, err, len(finishes))
            raise
        failed = [r for r in results if isinstance(r, StoreError)]
        if failed:
            self._failed(name, errors, failed[-1], len(failed))
        else:
            self.failed_writes.pop(name, None)
            if name in self._failing:
                self._worked(name)
        return results

    def _failed(self, name: str, errors: Any, err: StoreError, count: int = 1) -> None:
        errors.inc(count)
        if name in WRITES:
            self.failed_writes[name] = (self._now(), describe(err))
        if name not in self._failing:
            self._failing.add(name)
            log.warning("store_failing", operation=name, error=describe(err))

    def _worked(self, name: str) -> None:
        """`name` failed last time and works again."""
        self._failing.discard(name)
        log.info("store_recovered", operation=name)


class QueueDepth:
    """postbackd_queue_depth's numbers at a cost that grows with the queue, not with the store:
    the live states (queued, in_flight, retrying) are counted at every read, in the state index;
    the final ones come from a count of every state, made again when it is due (at least
    `min_every` seconds and `spacing` times its last duration after the last one ended).

    That count runs as a task of its own. A read waits for it (shielded: a read given up on,
    such as a scrape past DEPTH_TIMEOUT, leaves it running for the next one) while there are no
    final counts yet, or when the last count took at most `wait` seconds; otherwise it answers
    at once with the final counts it has. A count that fails keeps the last ones (ObservedStore
    counts and logs the store's error); while none has worked, a read raises its error."""

    def __init__(
        self,
        *,
        min_every: float = FINAL_COUNT_MIN_EVERY,
        spacing: float = FINAL_COUNT_SPACING,
        wait: float = FINAL_COUNT_WAIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._min_every = min_every
        self._spacing = spacing
        self._wait = wait
        self._clock = clock
        self._final: dict[DeliveryState, int] | None = None
        self._error: StoreError | None = None
        self._ended = -math.inf  # when the last count ended, worked or not
        self._took = 0.0  # how long it took
        self._counting: asyncio.Task[None] | None = None

    @property
    def last_count(self) -> tuple[float, float]:
        """(when the last count of every state ended, by the clock; how long it took)."""
        return self._ended, self._took

    def due(self) -> bool:
        """Whether the next read starts a count of every state."""
        if self._counting is not None:
            return False
        gap = max(self._min_every, self._spacing * self._took)
        return self._final is None or self._clock() - self._ended >= gap

    async def read(self, store: Store) -> dict[DeliveryState, int]:
        """Every state's count: the live ones now, the final ones as last counted."""
        if self.due():
            self._counting = asyncio.create_task(self._count(store), name="queue-depth-count")
        counting = self._counting
        if counting is not None and (self._final is None or self._took <= self._wait):
            await asyncio.shield(counting)
        if self._final is None:
            assert self._error is not None
            raise self._error
        final = self._final
        live = await store.queue_depth(live_only=True)
        return {state: live[state] if state in live else final[state] for state in DeliveryState}

    async def _count(self, store: Store) -> None:
        start = self._clock()
        try:
            counts = await store.queue_depth()
        except StoreError as err:
            self._error = err
        else:
            self._final = {state: counts.get(state, 0) for state in FINAL_STATES}
            self._error = None
        finally:
            self._ended = self._clock()
            self._took = self._ended - start
            self._counting = None

    async def close(self) -> None:
        """Stop a count under way (the store is about to close)."""
        task = self._counting
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Metrics:
    """The daemon's metrics; feed it through the hook methods, serve it with :meth:`render`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.conversions = Counter(
            "postbackd_conversions",
            "Committed conversion arrivals, by source and transition.",
            ["source", "transition"],
            registry=reg,
        )
        self.deliveries = Counter(
            "postbackd_deliveries",
            "Delivery attempts by action and outcome (succeeded, retry, dead, cancelled, "
            "lease_lost, unrecorded: the store failed); succeeded and dead count each delivery "
            "once.",
            ["action", "outcome"],
            registry=reg,
        )
        self.attempt_duration = Histogram(
            "postbackd_attempt_duration_seconds",
            "Duration of delivery attempts, by action.",
            ["action"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "postbackd_queue_depth",
            "Deliveries in the store by state (every node's): queued, in_flight and retrying "
            "counted at each scrape; succeeded, dead and cancelled recounted when due "
            "(docs/operations.md).",
            ["state"],
            registry=reg,
        )
        self.store_up = Gauge(
            "postbackd_store_up",
            "1 when the store answered the last scrape's queue-depth query, else 0.",
            registry=reg,
        )
        self.delivery_lag = Gauge(
            "postbackd_delivery_lag_seconds",
            "Age of the oldest delivery that is due and unclaimed (every node's, read at scrape "
            "time): grows while conversions are accepted but not delivered.",
            registry=reg,
        )
        self.store_errors = Counter(
            "postbackd_store_errors",
            "Store calls that failed (StoreError), by operation (the store method).",
            ["operation"],
            registry=reg,
        )
        self.http_requests = Counter(
            "postbackd_http_requests",
            "HTTP requests answered, by route (its pattern, e.g. /webhooks/{source}) and code.",
            ["route", "code"],
            registry=reg,
        )
        self._rules = _RulesCollector()
        reg.register(self._rules)
        self._loops = _LoopsCollector()
        reg.register(self._loops)
        ProcessCollector(registry=reg)
        self._refresh_lock = asyncio.Lock()
        self.depth = QueueDepth()  # postbackd_queue_depth, and the console's health page
        self.observed: ObservedStore | None = None
        # The labelled children of the per-request counters, looked up once per label values
        # (labels() validates and locks on every call), each kept as its value's inc: what the
        # child's inc() calls once it has checked that the child is observable (a labelled
        # child always is) and that the amount is not negative (1). Bounded: routes are the
        # app's patterns, codes are HTTP's, sources are the loaded ones, transitions four.
        self._requests: dict[tuple[str, int], Callable[[float], None]] = {}
        self._arrivals: dict[tuple[str, str], Callable[[float], None]] = {}
        self._attempts: dict[tuple[str, str], Callable[[float], None]] = {}
        self._durations: dict[str, Histogram] = {}

    # --- hooks ------------------------------------------------------------------------------

    def watch_rules(self, source: RulesSource) -> None:
        """Report reloads and the loaded rule set of `source` from now on."""
        self._rules.source = source

    def watch_loops(self, source: LoopsSource) -> None:
        """Report the state of `source`'s supervised loops from now on."""
        self._loops.source = source

    def observe(self, store: Store) -> Store:
        """`store`, with every StoreError counted in postbackd_store_errors_total."""
        self.observed = ObservedStore(store, self.store_errors)
        observed: Store = self.observed
        return observed

    def failing_writes(self) -> dict[str, str]:
        """The observed store's writes that fail right now (see ObservedStore)."""
        return self.observed.failing_writes() if self.observed is not None else {}

    def arrival(self, source: str, transition: Transition | str) -> None:
        """A committed arrival (daemon.app's `Services.arrival_committed`)."""
        key = (source, str(transition))
        inc = self._arrivals.get(key)
        if inc is None:
            inc = self._arrivals[key] = _inc_of(self.conversions.labels(*key))
        inc(1)

    def attempt(self, action: str, outcome: str, duration: float) -> None:
        """The dispatcher's `on_attempt` hook; a cancellation sent nothing and is not timed.
        The labelled children are kept, as arrival's (action types x outcomes: a few)."""
        key = (action, outcome)
        inc = self._attempts.get(key)
        if inc is None:
            inc = self._attempts[key] = _inc_of(self.deliveries.labels(action, outcome))
        inc(1)
        if outcome != "cancelled":
            timer = self._durations.get(action)
            if timer is None:
                timer = self._durations[action] = self.attempt_duration.labels(action)
            timer.observe(duration)

    def count(self, handler: RequestHandler) -> RequestHandler:
        """`handler` (a server's request handler: an app's routing, then the route's handler),
        counting every request it answers under its route's pattern, never its raw URL
        (UNMATCHED when the router matched none): the response's code, an HTTPException's
        when one was raised, 499 when the request was cancelled (the client went away first,
        nginx's code for it; not a server error), else 500 (what aiohttp answers for any
        other exception). Installed on the app by `count_requests`: no middleware, whose
        layers aiohttp rebuilds and wraps around every handler (docs/benchmarks.md)."""
        requests = self._requests
        labels = self.http_requests.labels

        async def counted(request: web.Request) -> web.StreamResponse:
            code = 500
            try:
                response = await handler(request)
                code = response.status
                return response
            except web.HTTPException as err:
                code = err.status
                raise
            except asyncio.CancelledError:
                code = 499
                raise
            finally:
                key = (_route(request), code)
                inc = requests.get(key)
                if inc is None:
                    inc = requests[key] = _inc_of(labels(key[0], str(code)))
                inc(1)

        return counted

    # --- scraping ---------------------------------------------------------------------------

    async def refresh(self, store: Store, now: datetime | None = None) -> None:
        """Read the queue depth and the delivery lag from the store; on failure keep the last
        values, store_up 0."""
        async with self._refresh_lock:
            try:
                async with asyncio.timeout(DEPTH_TIMEOUT):
                    depth = await self.depth.read(store)
                    lag = await store.delivery_lag(now or datetime.now(UTC))
            except (StoreError, TimeoutError) as err:
                self.store_up.set(0)
                log.warning("store_error", error=str(err) or type(err).__name__)
                return
            self.store_up.set(1)
            self.delivery_lag.set(lag)
            for state in DeliveryState:
                self.queue_depth.labels(state.value).set(depth.get(state, 0))

    async def close(self) -> None:
        """Stop what runs in the background (the count of the final states) before the store
        closes."""
        await self.depth.close()

    def render(self) -> bytes:
        """The registry in the Prometheus text format (see CONTENT_TYPE)."""
        return generate_latest(self.registry)


def _inc_of(child: Counter) -> Callable[[float], None]:
    """What `child.inc(1)` comes to for a labelled child (observable, a positive amount): its
    value's inc. A counter without that attribute keeps its own inc."""
    value = getattr(child, "_value", None)
    inc: Callable[[float], None] = getattr(value, "inc", None) or child.inc
    return inc


def count_requests(app: web.Application, metrics: Metrics) -> None:
    """Count every request `app` answers in `metrics` (Metrics.count), whatever serves it:
    daemon.ingest's GuardedRunner, a plain AppRunner, aiohttp's TestServer. Each builds its
    server's request handler from the app's `_handle` (its routing and the route's handler,
    aiohttp's Application._make_handler), so the app's own is wrapped, once; the instance's
    attribute is set past Application.__setattr__, which warns in aiohttp's debug mode about
    any attribute it does not know. tests/test_metrics_requests.py checks that every way of
    serving the app counts."""
    object.__setattr__(app, "_handle", metrics.count(app._handle))


def _route(request: web.Request) -> str:
    # Not request.match_info, which asserts that routing ran: `_handle` may fail before it.
    match_info = request._match_info
    route = match_info.route if match_info is not None else None
    resource = route.resource if route is not None else None
    if resource is None:
        return UNMATCHED
    return resource.canonical
