"""The aiohttp application: routes, and the services that live as long as it does."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.actions.base import Resources
from daemon.affiliates.service import AffiliateService
from daemon.affiliates.wiring import attach_affiliates
from daemon.auth import GateState
from daemon.dispatcher import Dispatcher, DispatcherCollector, DispatcherConfig
from daemon.dispatchproc import DispatcherLink, WakeReceiver
from daemon.errors import StoreError
from daemon.guard import Guard
from daemon.hosts import Destinations, DestinationsCollector
from daemon.ingest import ingest
from daemon.log import get_logger
from daemon.metrics import CONTENT_TYPE, Metrics, count_requests
from daemon.outbound import OutboundHttp, Resolver
from daemon.pacing import Pacing, PacingCollector
from daemon.reload import Reloader, Runtime
from daemon.retention import INTERVAL as RETENTION_INTERVAL
from daemon.retention import STEP_LIMIT as RETENTION_STEP_LIMIT
from daemon.retention import Retention
from daemon.secrets import SecretResolver
from daemon.settings import Settings
from daemon.sources import load_sources
from daemon.store.base import ArrivalResult, LeaseAhead, Store
from daemon.supervise import Backoff, Supervisor, describe
from daemon.webhook_input import MAX_BODY, Limits

log = get_logger("postbackd.app")

READY_STORE_TIMEOUT = 2.0  # /readyz answers within this even when the store hangs
# Each loop's duty of progress (seconds), the base of /readyz and the watchdog. The dispatcher
# claims at least every poll interval (1 s) when idle; a claim that blocks (a write lock held
# past the busy timeout, a hung connection) shows within this many seconds.
DISPATCHER_PROGRESS = 3.0


class SystemClock:
    def now(self) -> float:
        return time.time()


@dataclass
class Services:
    settings: Settings
    store: Store
    http: OutboundHttp
    reloader: Reloader
    dispatcher: Dispatcher
    clock: Any
    node: str
    notifier: Any = None
    metrics: Metrics = field(default_factory=Metrics)
    supervisor: Supervisor = field(default_factory=Supervisor)
    affiliates: AffiliateService | None = None  # postbacks as a viewer sees them (issue 15)
    # Set in a serving process when the dispatcher runs in a process of its own
    # (`dispatcher_process: true`, daemon/dispatchproc.py): `dispatcher` then never runs here,
    # and its state (loops, breakers, metrics) is the dispatch process's, asked through this.
    link: DispatcherLink | None = None
    # New arrivals wait for delivery on a saturated loop (daemon.pacing); where the dispatcher
    # runs in this process.
    pacing: Pacing | None = None

    @functools.cached_property
    def limits(self) -> Limits:
        """The webhook's read limits (settings do not change while the process runs)."""
        return Limits(read_timeout=self.settings.inbound.read_timeout)

    def arrival_committed(
        self, source: str, result: ArrivalResult, lease: LeaseAhead | None = None
    ) -> None:
        """After the store committed an arrival: count it, and wake the dispatcher for its
        deliveries, unless they were leased to it at insert (it has them already: the lease's
        claims). Decided by what was leased, not by whether the offer was taken: on PostgreSQL
        the statement for a new conversion takes the offer, then may find the conversion
        stored (by another node, or by this one's arrival still on its way); its deliveries
        were queued, and, asked whether the offer was taken, they waited for the dispatcher's
        next poll (status changes at p50 1.4 s at 1,000/s in the bench). The locking path now
        asks the offer again (LeaseAhead.reopen), so this is a guard for any later path."""
        self.metrics.arrival(source, result.transition)
        if result.delivery_ids and (lease is None or not lease.claims):
            self.wake_dispatcher()

    def lease_ahead(self) -> LeaseAhead | None:
        """The dispatcher's offer to take an arrival's deliveries at insert (daemon.store.base.
        LeaseAhead); never when it runs in a process of its own."""
        return self.dispatcher.lease_ahead() if self.link is None else None

    def wake_dispatcher(self) -> None:
        """Deliveries were made due: the dispatcher that serves this node claims them now."""
        if self.link is not None:
            self.link.wake()
        else:
            self.dispatcher.wake()


SERVICES = web.AppKey("services", Services)


def node_name(settings: Settings) -> str:
    """Stable across restarts (so a restarted node takes back its own claims at once) and
    unique among live nodes (no two daemons listen on one host and port)."""
    return f"{socket.gethostname()}:{settings.port}"


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    store: Store | None = None,
    resolver: Resolver | None = None,
    clock: Any = None,
    notifier: Any = None,
    dispatch: bool = True,
    watch: bool = True,
    node: str | None = None,
    overrides: Mapping[str, str] | None = None,
    link: DispatcherLink | None = None,
) -> web.Application:
    """Build the app; its services start with the runner (cleanup_ctx) and stop with it.
    `overrides` goes to Resources.overrides (tests only: pinned service hosts). `link`: the
    dispatch process of `dispatcher_process: true` (this process then dispatches nothing)."""
    from daemon.api import add_api_routes  # here: daemon.api imports SERVICES from this module

    metrics = Metrics()
    app = web.Application(client_max_size=MAX_BODY)
    count_requests(app, metrics)  # every request answered, by route and code (no middleware)
    clock = clock or SystemClock()
    app.cleanup_ctx.append(
        lambda app: _services(
            app,
            settings,
            environ,
            store,
            resolver,
            clock,
            notifier,
            dispatch,
            watch,
            node or node_name(settings),
            overrides or {},
            metrics,
            _Role(link=link),
        )
    )
    app.router.add_route("GET", "/webhooks/{source}", _webhook)
    app.router.add_route("POST", "/webhooks/{source}", _webhook)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_api_routes(app, settings, environ)
    from daemon.ui import add_ui_routes  # here: the console's pages import this module too

    add_ui_routes(app, settings, environ)
    return app


def create_dispatch_app(
    settings: Settings,
    *,
    environ: Mapping[str, str],
    folder: Path,
    notifier: Any = None,
    node: str | None = None,
) -> web.Application:
    """The dispatch process of `dispatcher_process: true` (daemon/dispatchproc.py): the same
    services as a node's, with the dispatcher and the watcher and without retention; served on
    its private Unix socket only: GET /state (its readiness) and GET /metrics (its registry)."""
    metrics = Metrics()
    app = web.Application()
    clock = SystemClock()
    app.cleanup_ctx.append(
        lambda app: _services(
            app,
            settings,
            environ,
            None,
            None,
            clock,
            notifier,
            True,
            True,
            node or node_name(settings),
            {},
            metrics,
            _Role(wake_folder=folder),
        )
    )
    app.router.add_get("/state", _dispatch_state)
    app.router.add_get("/metrics", _dispatch_metrics)
    return app


@dataclass(frozen=True)
class _Role:
    """Which part of a node this process is: all of it (the default), a serving process whose
    dispatcher is elsewhere (`link`), or the dispatch process (`wake_folder`: where its wake-up
    socket goes)."""

    link: DispatcherLink | None = None
    wake_folder: Path | None = None


async def _services(
    app: web.Application,
    settings: Settings,
    environ: Mapping[str, str],
    store: Store | None,
    resolver: Resolver | None,
    clock: Any,
    notifier: Any,
    dispatch: bool,
    watch: bool,
    node: str,
    overrides: Mapping[str, str],
    metrics: Metrics,
    role: _Role,
) -> AsyncIterator[None]:
    if role.link is not None:
        dispatch = False  # the dispatch process claims and sends; this one only serves
    if store is None:
        from daemon.store.factory import open_store

        store = open_store(settings.store, config_dir=settings.config_dir, create_dirs=True)
    await store.open()
    store = metrics.observe(store)
    http = OutboundHttp(
        guard=Guard(settings.outbound.allow_cidrs),
        resolver=resolver,
        timeout=settings.outbound.timeout,
    )
    await http.start()
    secrets = SecretResolver(
        credentials_dir=environ.get("CREDENTIALS_DIRECTORY"),
        secrets_dir=settings.secrets_path,
        environ=environ,
    )
    resources = Resources(
        http=http,
        secret=secrets,
        clock=clock,
        timeout=settings.outbound.timeout,
        overrides=overrides,
    )

    async def on_swap(new: Runtime, old: Runtime | None) -> None:
        if old is None or old.rules is new.rules:
            return
        # One lookup per postback, with get(): the rule set's mapping layers the affiliates'
        # postbacks over the files', and `in` then `[]` cost a raised KeyError per file postback
        # (most of a reload's time with 100,000 postbacks).
        now_postbacks = new.rules.postbacks
        gone = []
        for pid in old.rules.postbacks:
            lp = now_postbacks.get(pid)
            if lp is None or not lp.postback.active:
                gone.append(pid)
        if not gone:
            return
        try:
            count = await store.cancel_postbacks(gone, datetime.now(UTC))
        except StoreError as err:
            # The swap stands: the dispatcher cancels these deliveries when it claims them.
            log.warning("store_error", operation="cancel_postbacks", error=describe(err))
            return
        if count:
            log.info("deliveries_cancelled", count=count, postbacks=gone)

    gates = GateState()  # replay cache and rate limits outlive reloads
    reloader = Reloader(
        settings.rules_path,
        resources,
        missing_secrets=secrets.missing,
        load_sources=lambda: load_sources(
            settings.webhooks_path,
            secrets=secrets,
            trusted_proxies=settings.inbound.trusted_proxies,
            state=gates,
        ),
        webhooks_dir=settings.webhooks_path,
        on_swap=on_swap,
        notifier=notifier,
    )
    metrics.watch_rules(reloader)
    affiliates, affiliate_sync = attach_affiliates(store, reloader, resources, clock.now)
    destinations = Destinations.from_settings(settings, clock.now)
    if role.link is None:
        # A serving process's breakers never see an attempt: its metrics show none rather than
        # every destination closed (the dispatch process's are at /metrics/dispatcher).
        metrics.registry.register(DestinationsCollector(destinations))
    dispatcher = Dispatcher(
        store,
        lambda: reloader.runtime,
        clock.now,
        DispatcherConfig(node=node, lease=settings.delivery.lease),
        destinations,
        on_attempt=metrics.attempt,
    )
    if role.link is None:
        metrics.registry.register(DispatcherCollector(dispatcher))
    supervisor = Supervisor()
    services = Services(
        settings, store, http, reloader, dispatcher, clock, node, notifier, metrics, supervisor
    )
    services.affiliates = affiliates
    services.link = role.link
    app[SERVICES] = services
    metrics.watch_loops(supervisor)
    receiver = None
    try:
        await reloader.load_initial()
        await affiliate_sync.initial()  # the store postbacks, before the first request
        recovered = await store.recover(node, datetime.fromtimestamp(clock.now(), UTC))
        if recovered:
            log.info("deliveries_recovered", count=recovered, node=node)
        if role.wake_folder is not None:
            receiver = WakeReceiver(role.wake_folder, dispatcher.wake)
            receiver.start()
        # serving: not the dispatch process (it serves no webhook)
        _start_loops(services, dispatch=dispatch, watch=watch, serving=role.wake_folder is None)
        supervisor.start(
            "affiliate-sync", lambda health: affiliate_sync.run(health.beat), interval=30.0
        )
        yield
    finally:
        if receiver is not None:
            receiver.close()
        await dispatcher.stop(grace=20.0)
        await supervisor.stop()
        if role.link is not None:
            await role.link.close()
        if notifier is not None:
            notifier.gate = None
        await http.close()
        await metrics.close()
        await store.close()


def _start_pacing(services: Services) -> None:
    """New arrivals wait for the dispatcher while it is behind on a saturated loop."""
    dispatcher = services.dispatcher
    pacing = services.pacing = Pacing(dispatcher.behind, lambda: dispatcher.in_flight)
    dispatcher.on_attempt_done = pacing.credit
    services.metrics.registry.register(PacingCollector(pacing))
    services.supervisor.start("pacing", lambda health: pacing.run(), interval=None)


def _start_loops(services: Services, *, dispatch: bool, watch: bool, serving: bool) -> None:
    """Every background loop of the daemon, each under the one rule of daemon.supervise.
    Retention runs in the serving processes only (the dispatch process has no need of it), and
    pacing where one serves webhooks and dispatches too (`dispatch` is false where the
    dispatcher runs in a process of its own)."""
    supervisor, settings = services.supervisor, services.settings
    if dispatch:
        poll = services.dispatcher.config.poll_interval
        supervisor.start(
            "dispatcher",
            lambda health: services.dispatcher.run(health.beat),
            interval=max(DISPATCHER_PROGRESS, 3 * poll),
        )
        if serving:  # webhooks and deliveries on this loop
            _start_pacing(services)
    if watch:
        reloader = services.reloader
        supervisor.start("watcher", lambda health: reloader.watch(health.beat), interval=None)
    if serving:
        pruner = Retention(services.store, settings.retention, services.clock.now)
        supervisor.every(
            "retention",
            pruner.prune_once,
            RETENTION_INTERVAL,
            interval=RETENTION_STEP_LIMIT,
            backoff=Backoff(first=5.0, cap=300.0),
        )
    if services.notifier is not None:
        # The watchdog is fed only while no loop is wedged (daemon.notify).
        services.notifier.gate = lambda: [
            name for name, state in supervisor.states().items() if state == "stalled"
        ]


async def _webhook(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return await ingest(
        request,
        runtime=services.reloader.runtime,
        store=services.store,
        now=services.clock.now,
        on_committed=services.arrival_committed,
        limits=services.limits,
        lease_ahead=services.lease_ahead,
        pacing=services.pacing,
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    """503 while the store cannot be reached or a supervised loop fails or has stalled, with
    the failing parts named. Without an admin token: states only (no error text, no file
    names, no URL); with one, the details too (issue 13 item 10). With a dispatch process
    (`dispatcher_process: true`), its own readiness is part of this one: asked within
    daemon.dispatchproc.STATE_TIMEOUT, and `dispatcher_process` is failing when it is not
    ready or does not answer."""
    from daemon.api import is_admin  # here: daemon.api imports SERVICES from this module

    services = request.app[SERVICES]
    admin = is_admin(request)
    link = services.link
    if link is None:
        body = await readiness(services, admin=admin)
    else:
        body, (remote, problem) = await asyncio.gather(
            readiness(services, admin=admin), link.state()
        )
        _with_dispatch_process(body, remote, problem, admin=admin)
    return web.json_response(body, status=503 if body["failing"] else 200)


def _with_dispatch_process(
    body: dict[str, Any], remote: dict[str, Any] | None, problem: str | None, *, admin: bool
) -> None:
    """A serving process's readiness `body` with the dispatch process's state in it."""
    if remote is None:
        body["failing"].append("dispatcher_process")
        body["dispatcher_process"] = {"status": "unreachable"}
        body["destinations_down"] = None  # not known here: never 0 as if all were well
        if admin:
            body["destinations_down_names"] = None
            body["dispatcher_process_error"] = problem
    else:
        if remote.get("failing"):
            body["failing"].append("dispatcher_process")
        body["dispatcher_process"] = {
            "status": remote.get("status"),
            "failing": remote.get("failing"),
            "store": remote.get("store"),
            "loops": remote.get("loops"),
            "node": remote.get("node"),
            "in_flight": remote.get("in_flight"),
        }
        body["destinations_down"] = remote.get("destinations_down")
        if admin:
            body["destinations_down_names"] = remote.get("destinations_down_names")
            body["dispatcher_process"]["loop_errors"] = remote.get("loop_errors")
            body["dispatcher_process"]["store_error"] = remote.get("store_error")
    body["status"] = "not ready" if body["failing"] else "ready"


async def readiness(services: Services, *, admin: bool) -> dict[str, Any]:
    """This process's readiness (the body of /readyz, and the dispatch process's /state):
    `failing` names what is down; `admin` adds the details."""
    store_error = await _store_problem(services.store)
    writes = services.metrics.failing_writes()
    failing = ["store"] if store_error is not None or writes else []
    loops = services.supervisor.states()
    down = services.dispatcher.destinations.down()
    failing += [name for name, state in loops.items() if state in ("failing", "stalled")]
    runtime = services.reloader.runtime
    status = services.reloader.status
    body: dict[str, Any] = {
        "status": "not ready" if failing else "ready",
        "failing": failing,
        "store": "unreachable" if store_error else "not committing" if writes else "ok",
        "loops": loops,
        # A destination that is down is not this node's fault: counted, never a 503 (taking the
        # node out of a load balancer would stop ingest and help nobody).
        "destinations_down": len(down),
        "rules_version": str(runtime.rules.version),
        "last_reload_ok": status.ok,
    }
    if admin:
        body["destinations_down_names"] = down
        body["store_error"] = store_error
        body["store_writes_failing"] = writes
        body["loop_errors"] = {
            name: {"failures": h.failures, "error": h.error}
            for name, h in services.supervisor.loops.items()
            if h.failing
        }
        body["rules_loaded_at"] = status.loaded_at.isoformat() if status.loaded_at else None
        body["last_reload_errors"] = status.last_error
    return body


async def _dispatch_state(request: web.Request) -> web.Response:
    """The dispatch process's readiness, with every detail: its socket is private to the
    unit (a folder of mode 0700), and the serving process decides what its caller sees."""
    services = request.app[SERVICES]
    body = await readiness(services, admin=True)
    body["node"] = services.node
    body["in_flight"] = services.dispatcher.in_flight
    body["loop_details"] = loop_details(services)
    return web.json_response(body)


def loop_details(services: Services) -> list[dict[str, Any]]:
    """Every supervised loop of this process, by name: its state, seconds since its last
    progress (None: none yet), failures in a row and its last error (the console's health
    page, here and from the dispatch process's /state)."""
    now = services.supervisor.now()
    return [
        {
            "name": name,
            "state": health.state,
            "since_progress": None if health.last_progress is None else now - health.last_progress,
            "failures": health.failures,
            "error": health.error if health.failing else None,
        }
        for name, health in sorted(services.supervisor.loops.items())
    ]


async def metrics_response(services: Services) -> web.Response:
    """This process's metrics, with what is read from the store at scrape time refreshed (the
    body of /metrics, and the dispatch process's /metrics)."""
    now = datetime.fromtimestamp(services.clock.now(), UTC)
    await services.metrics.refresh(services.store, now)
    return web.Response(body=services.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _dispatch_metrics(request: web.Request) -> web.Response:
    return await metrics_response(request.app[SERVICES])


async def _store_problem(store: Store) -> str | None:
    """None when the store answers a ping in time, else why not (masked)."""
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT):
            await store.ping()
    except StoreError as err:
        return describe(err)
    except TimeoutError:
        return f"no answer within {READY_STORE_TIMEOUT:g} s"
    return None
