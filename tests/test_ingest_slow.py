"""Slow clients cannot hold the server: a connection that trickles its request head (or sends
nothing, or idles after a request) is closed at the read timeout, while normal requests keep
being served. Runs the app behind GuardedRunner on a real loopback socket, as `postbackd run`."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from aiohttp import web

from daemon.app import create_app
from daemon.ingest import GuardedRunner
from daemon.settings import Settings
from tests.harness import LOOPBACK, wait_for

TIMEOUT = 0.5


async def serve(tmp_path: Path) -> tuple[GuardedRunner, int]:
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "store": f"sqlite:///{tmp_path / 'postbackd.db'}",
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK},
            "inbound": {"read_timeout": TIMEOUT},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, dispatch=False, watch=False)
    runner = GuardedRunner(app, read_timeout=settings.inbound.read_timeout, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class Slow:
    """One slow client; `closed` is set when the server has closed its connection."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def run(self, port: int, first: bytes, trickle: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(first)
            await writer.drain()
            if first.endswith(b"\r\n\r\n"):  # a whole request: read its answer first
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )  # fmt: skip
                await reader.readexactly(length)
            watcher = asyncio.create_task(reader.read())
            for byte in trickle * 1000:
                if watcher.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            assert await watcher == b""  # EOF: the server closed; it never answered
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            self.closed.set()
            writer.close()


async def test_trickling_clients_are_cut_off_while_others_are_served(tmp_path: Path) -> None:
    runner, port = await serve(tmp_path)
    served: list[int | str] = []

    async def normal_traffic() -> None:
        # A connection per request: a kept-alive connection left idle past the timeout is
        # closed by design, and a client reusing it just then would see a disconnect.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(10_000):
                url = f"http://127.0.0.1:{port}/webhooks/generic"
                params = {"conversion_id": f"N{i}", "offer": "7", "affiliate": "1"}
                try:
                    async with session.get(url, params={**params, "status": "approved"}) as resp:
                        served.append(resp.status)
                except aiohttp.ClientError as error:
                    served.append(type(error).__name__)
                await asyncio.sleep(0.02)

    head = b"GET /webhooks/generic?conversion_id=S&offer=7 HTTP/1.1\r\nHost: x\r\n"
    request = head + b"\r\n"
    clients = {
        "trickles its first head": (Slow(), head, b"X-Slow: yes\r\n"),
        "sends nothing": (Slow(), b"", b""),
        "trickles a head after a request": (Slow(), request, head),
        "trickles the request line": (Slow(), b"GET /webhooks/generic?a=1", b"&x=1"),
    }
    traffic = asyncio.create_task(normal_traffic())
    tasks = [asyncio.create_task(c.run(port, first, more)) for c, first, more in clients.values()]
    try:
        for name, (client, _, _) in clients.items():
            await wait_for(client.closed.is_set, deadline=15.0), name
        assert runner.guard.closed >= len(clients)
        count = len(served)
        await wait_for(lambda: len(served) >= count + 5)  # still serving after the cut-offs
        assert set(served) == {200}
        assert len(served) > 20
    finally:
        traffic.cancel()
        for task in tasks:
            task.cancel()
        for task in [traffic, *tasks]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()


async def test_a_trickled_body_is_answered_408_not_cut_by_the_head_deadline(
    tmp_path: Path,
) -> None:
    """While a request runs (here: reading its body) the connection is busy, not idle: the
    handler's own body timeout answers, with its error body, and the connection then closes."""
    runner, port = await serve(tmp_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /webhooks/generic HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100\r\n\r\nconversion_id="
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        assert body == b'{"error": "body not received within 0.5 s", "field": null}'
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed
        writer.close()
    finally:
        await runner.cleanup()
