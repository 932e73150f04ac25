"""`postbackd run`: the daemon's process lifecycle (signals, systemd notify, graceful stop)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import click
import structlog
from aiohttp import web

from daemon.app import SERVICES, create_app
from daemon.cli import cli, config_option, settings_from
from daemon.errors import RulesError, StoreError
from daemon.log import configure_logging
from daemon.notify import Notifier
from daemon.settings import Settings

log = structlog.get_logger("postbackd")

STOP_GRACE = 25.0  # inside systemd's TimeoutStopSec=30s


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the rules."""
    notifier = Notifier.from_environ(os.environ)
    app = create_app(settings, environ=os.environ, notifier=notifier)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=STOP_GRACE)
    await runner.setup()  # opens the store and loads the rules (cleanup_ctx)
    services = app[SERVICES]
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise click.ClickException(f"cannot listen on {settings.listen}: {err.strerror}") from err
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(services.reloader.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    notifier.ready(f"listening on {settings.listen}")
    log.info(
        "daemon_started",
        listen=settings.listen,
        node=services.node,
        rules_version=str(services.reloader.runtime.rules.version),
    )
    await stop.wait()
    notifier.stopping()
    log.info("daemon_stopping", node=services.node)
    await runner.cleanup()  # stop accepting, finish requests, finish or release attempts
    log.info("daemon_stopped", node=services.node)


@cli.command()
@config_option
def run(config: str | None) -> None:
    """Run the daemon in the foreground (systemd: Type=notify).

    Listens on `listen` of the settings file, takes conversions on /webhooks/{source}, and
    delivers the postbacks of rules_dir. SIGHUP reloads the rules; SIGTERM stops gracefully.
    """
    settings = settings_from(config)
    configure_logging(settings.log.format, settings.log.level, settings.log.mask_pii)
    try:
        asyncio.run(serve(settings))
    except RulesError as err:
        for issue in err.issues:
            click.echo(str(issue), err=True)
        raise click.ClickException(f"the rules in {settings.rules_path} do not load") from err
    except StoreError as err:
        raise click.ClickException(f"store: {err}") from err
    sys.exit(0)
