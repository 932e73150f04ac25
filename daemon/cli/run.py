"""`postbackd run`: the daemon's process lifecycle (signals, systemd notify, graceful stop)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, cast

import click
from aiohttp import web

from daemon import rulecache
from daemon.app import SERVICES, Services, create_app, create_dispatch_app, node_name
from daemon.cli.common import config_option, settings_from
from daemon.dispatchproc import CONTROL_SOCKET, DispatcherLink
from daemon.errors import ConfigError, RulesError, StoreError
from daemon.ingest import GuardedRunner
from daemon.log import configure_logging, get_logger
from daemon.logout import TurnFlushed
from daemon.notify import Notifier
from daemon.settings import Settings
from daemon.sources import exposure_warnings
from daemon.store.factory import make_store, open_store
from daemon.supervise import spawn
from daemon.workers import LoopFactory, loop_factory, run_loop, run_workers, worker_node

log = get_logger("postbackd")

# Requests in flight get this long at a stop; then attempts in flight get the dispatcher's grace
# (20 s, daemon/app.py). Both together stay inside systemd's TimeoutStopSec=30s.
STOP_GRACE = 5.0


async def serve(
    settings: Settings, worker: int | None = None, dispatch_folder: Path | None = None
) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the rules. `worker`: this process's index
    when several share the port (daemon.workers), else None. `dispatch_folder`: where the
    dispatch process's sockets are (`dispatcher_process: true`), else None (this process
    dispatches)."""
    await _watched(lambda notifier: _serve(settings, notifier, worker, dispatch_folder))


async def serve_dispatcher(settings: Settings, folder: Path) -> None:
    """The dispatch process of `dispatcher_process: true` (daemon/dispatchproc.py): the
    dispatcher, the watcher and the store, with its state and metrics on a Unix socket in
    `folder` and no public listener. SIGTERM lets attempts in flight finish (the dispatcher's
    grace); SIGHUP reloads the rules."""
    await _watched(lambda notifier: _serve_dispatcher(settings, notifier, folder))


async def _watched(main: Callable[[Notifier], Awaitable[None]]) -> None:
    """Run `main(notifier)` with systemd's watchdog pinged from this loop. The pings start
    first, so they never depend on how long the store and the rules take to come up; they come
    from this loop, so a blocked loop still stops them."""
    notifier = Notifier.from_environ(os.environ)
    watchdog = asyncio.create_task(notifier.run_watchdog(), name="watchdog")
    try:
        await main(notifier)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


async def _serve_dispatcher(settings: Settings, notifier: Notifier, folder: Path) -> None:
    # The node name of a single-process node: a switch to `dispatcher_process: true` takes
    # that node's claims back at once at the first start (store.recover).
    app = create_dispatch_app(
        settings, environ=os.environ, folder=folder, notifier=notifier, node=node_name(settings)
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()  # opens the store, loads the rules, starts the dispatcher
    services = app[SERVICES]
    try:
        await web.UnixSite(runner, str(folder / CONTROL_SOCKET)).start()
    except OSError as err:
        await runner.cleanup()
        raise click.ClickException(f"dispatch process: cannot listen: {err.strerror}") from err
    stop = _signals(services)
    notifier.ready("dispatching")
    rules_version = str(services.reloader.runtime.rules.version)
    log.info("dispatcher_started", node=services.node, rules_version=rules_version)
    await stop.wait()
    notifier.stopping()
    log.info("dispatcher_stopping", node=services.node)
    await runner.cleanup()  # finish attempts in flight within the grace, release the rest
    log.info("dispatcher_stopped", node=services.node)


def _signals(services: Services) -> asyncio.Event:
    """SIGTERM and SIGINT set the returned event; SIGHUP reloads the rules."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        spawn(services.reloader.reload("SIGHUP"), "reload", reloads)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return stop


async def _serve(
    settings: Settings, notifier: Notifier, worker: int | None, dispatch_folder: Path | None
) -> None:
    node = worker_node(node_name(settings), worker)
    link = DispatcherLink(dispatch_folder) if dispatch_folder is not None else None
    app = create_app(settings, environ=os.environ, notifier=notifier, node=node, link=link)
    runner = GuardedRunner(  # aiohttp has no request-head timeout of its own (slow clients)
        app,
        read_timeout=settings.inbound.read_timeout,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=STOP_GRACE,
    )
    await runner.setup()  # opens the store and loads the rules (cleanup_ctx)
    services = app[SERVICES]
    try:
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port,
            reuse_address=True,
            reuse_port=worker is not None,  # workers share the port (SO_REUSEPORT)
        )
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise click.ClickException(f"cannot listen on {settings.listen}: {err.strerror}") from err
    stop = _signals(services)
    notifier.ready(f"listening on {settings.listen}")
    log.info(
        "daemon_started",
        listen=settings.listen,
        node=services.node,
        rules_version=str(services.reloader.runtime.rules.version),
    )
    for source, why in exposure_warnings(services.reloader.runtime.sources):
        log.warning("source_unauthenticated", source=source.name, reason=why)
    await stop.wait()
    notifier.stopping()
    log.info("daemon_stopping", node=services.node)
    await runner.cleanup()  # stop accepting, finish requests, finish or release attempts
    log.info("daemon_stopped", node=services.node)


@click.command()
@config_option
def run(config: str | None) -> None:
    """Run the daemon in the foreground (systemd: Type=notify).

    Listens on `listen` of the settings file, takes conversions on /webhooks/{source}, and
    delivers the postbacks of rules_dir. SIGHUP reloads the rules; SIGTERM stops gracefully.
    """
    settings = settings_from(config)
    # The lines of one turn of the event loop in one write (daemon.logout): a write per line
    # was a system call, and a turn of the GIL to the SQLite writer, per webhook and delivery.
    configure_logging(
        settings.log.format,
        settings.log.level,
        settings.log.mask_pii,
        stream=cast(TextIO, TurnFlushed(sys.stdout)),  # what WriteLogger uses of a stream
        cache=True,
    )
    # A watchdog kill is SIGABRT: the journal then shows where the event loop was stuck.
    faulthandler.enable()
    try:
        rulecache.configure(
            rulecache.cache_dir(settings.state_dir, settings.store, settings.config_dir)
        )
        factory = loop_factory(settings.event_loop)
        if settings.workers > 1 or settings.dispatcher_process:
            # Migrate once, here, before the workers start: N processes creating and migrating
            # one new SQLite file at the same moment can meet SQLite's "database is locked"
            # answer, which does not wait for the busy timeout.
            asyncio.run(_migrate_before_workers(settings))
            split = settings.dispatcher_process
            status = run_workers(
                settings.workers,
                lambda i, folder: _run_worker(settings, factory, i, folder if split else None),
                os.environ,
                dispatcher=(lambda folder: _run_dispatcher(settings, factory, folder))
                if split
                else None,
            )
            sys.exit(status)
        run_loop(lambda: serve(settings), factory)
    except RulesError as err:
        for issue in err.issues:
            click.echo(str(issue), err=True)
        raise click.ClickException(f"the rules in {settings.rules_path} do not load") from err
    except StoreError as err:
        raise click.ClickException(f"store: {err}") from err
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    sys.exit(0)


async def _migrate_before_workers(settings: Settings) -> None:
    open_store(settings.store, config_dir=settings.config_dir, create_dirs=True)  # its folder
    await make_store(settings.store, config_dir=settings.config_dir).migrate()


# With `dispatcher_process: true`, how much nicer than the dispatch process the serving
# processes are (os.nice: relative to the unit's Nice=, which an unprivileged process may
# raise but not lower). Ingest and delivery then share a short CPU the way one process shares
# it, the dispatch process first: on the benchmark's 2 cores, shared with the load generator,
# the serving process took the CPU the dispatch process needed, and delivery fell behind what
# was accepted (delivered/accepted 0.89 to 0.97 over 10 s windows, a backlog growing for as
# long as the load lasts); at 5 it kept up (0.996, with the same end-to-end rate). When the
# CPU is not short, niceness changes nothing.
SERVING_NICENESS = 5


def _run_worker(
    settings: Settings, factory: LoopFactory | None, index: int, dispatch_folder: Path | None
) -> int:
    """One worker process of `workers: N` (forked by daemon.workers): its exit status. Beside
    a dispatch process it serves at SERVING_NICENESS above the unit's niceness."""
    if dispatch_folder is not None:
        os.nice(SERVING_NICENESS)
    return _child_status(
        settings, lambda: run_loop(lambda: serve(settings, index, dispatch_folder), factory)
    )


def _run_dispatcher(settings: Settings, factory: LoopFactory | None, folder: Path) -> int:
    """The dispatch process of `dispatcher_process: true` (forked by daemon.workers)."""
    return _child_status(
        settings, lambda: run_loop(lambda: serve_dispatcher(settings, folder), factory)
    )


def _child_status(settings: Settings, main: Callable[[], None]) -> int:
    """Run a child process's `main`; its exit status, with its error on stderr."""
    try:
        main()
    except RulesError as err:
        for issue in err.issues:
            click.echo(str(issue), err=True)
        click.echo(f"Error: the rules in {settings.rules_path} do not load", err=True)
        return 1
    except (StoreError, ConfigError, click.ClickException) as err:
        click.echo(f"Error: {err}", err=True)
        return 1
    return 0


@click.command()
@config_option
def migrate(config: str | None) -> None:
    """Apply the store's pending schema migrations and name them.

    `postbackd run` does this at start too; run it on its own before an upgrade rolls over
    several nodes. Safe while nodes run: migrations are serialised and applied once each.
    """
    from daemon.errors import ConfigError
    from daemon.migrate import migrate as apply_migrations

    settings = settings_from(config)
    try:
        applied = asyncio.run(apply_migrations(settings.store, settings.config_dir))
    except (ConfigError, StoreError) as err:
        raise click.ClickException(str(err)) from err
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("the store's schema is up to date")
