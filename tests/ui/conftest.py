"""Browser fixtures: the daemon in a thread of its own (its own event loop, real sockets on
127.0.0.1) and one headless Debian chromium per test module, driven by Playwright."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness import Daemon, FakeClock, Sink, start_daemon
from tests.ui.kit import ENV, rules, settings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
T = TypeVar("T")


def need_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): browser tests skipped")


class Live:
    """The daemon running on its own loop in a thread; `call` runs a coroutine there."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clock = FakeClock()
        self.sink, self.bad, self.daemon = self.call(lambda: self._start(tmp))

    async def _start(self, tmp: Path) -> tuple[Sink, Sink, Daemon]:
        sink = await Sink().start()
        bad = await Sink().start()
        daemon = await start_daemon(
            tmp, rules(sink, bad), environ=ENV, settings=settings(), clock=self.clock
        )
        return sink, bad, daemon

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def sink_paths(self, prefix: str) -> list[str]:
        return [r.path_qs for r in self.sink.received if r.path_qs.startswith(prefix)]

    @property
    def url(self) -> str:
        return str(self.daemon.client.make_url("/")).rstrip("/")

    def close(self) -> None:
        async def stop() -> None:
            await self.daemon.client.close()
            await self.sink.close()
            await self.bad.close()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    need_chromium()
    server = Live(tmp_path_factory.mktemp("console"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def screenshot(page: Any, name: str) -> None:
    """Saved to docs/console/NAME.png when POSTBACKD_SCREENSHOTS=1 (the docs' pictures)."""
    if os.environ.get("POSTBACKD_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
