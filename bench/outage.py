"""Section "outage" of `make bench`: a destination that is down while 30,000 conversions are
acknowledged (each fires one ping_url to it), then comes back. The figures: how soon after its
return the first held delivery reaches it, how fast the backlog drains (at the shipped
outbound.per_host_concurrency unless --per-host), and the ingest latency (p50/p99, open loop)
of new conversions while it drains. SQLite store, the breaker as shipped.

The destination is the benchmark's sink process, stopped (every connection refused) and started
again on the same port.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from bench.context import Context, sqlite_url
from bench.load import open_loop, percentile, session
from bench.procs import server
from bench.servers import SinkClient

BACKLOG = 30_000
QUICK_BACKLOG = 5_000
LIVE_RATE = 200.0  # new conversions/s offered while the backlog drains
LIVE_SECONDS = 10.0
SENDERS = 64
_HELD = re.compile(r"^postbackd_destination_held_deliveries\{[^}]*\} (\S+)$", re.M)


def _rules(root: Path, sink_url: str) -> Path:
    rules = root / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "outage.yaml").write_text(
        "offer: 1\npostbacks:\n  - id: 1\n    trigger: conversion_done\n"
        '    affiliate: "*"\n'
        f'    action: {{type: ping_url, url: "{sink_url}/pb?k={{conversion_id}}"}}\n'
    )
    return rules


def _url(base: str, cid: str) -> str:
    query = urlencode({"conversion_id": cid, "offer": 1, "affiliate": 1, "status": "approved"})
    return f"{base}/webhooks/generic?{query}"


async def _acknowledge(base: str, count: int) -> tuple[int, float]:
    """Post `count` conversions with SENDERS connections; (acknowledged, seconds)."""
    acked = 0
    numbers = iter(range(count))
    t0 = time.monotonic()
    async with session(SENDERS) as client:

        async def sender() -> None:
            nonlocal acked
            for n in numbers:
                async with client.get(_url(base, f"b{n}")) as resp:
                    await resp.read()
                    acked += resp.status == 200

        await asyncio.gather(*(sender() for _ in range(SENDERS)))
    return acked, time.monotonic() - t0


async def _held(client: aiohttp.ClientSession, base: str) -> float:
    async with client.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in _HELD.findall(text))


async def outage(ctx: Context) -> None:
    report = ctx.report
    backlog = QUICK_BACKLOG if ctx.opts.seconds < 5 else BACKLOG
    report.start("outage", f"a {backlog:,}-delivery backlog drained after its destination returns")
    root = ctx.workdir / "outage"
    root.mkdir(exist_ok=True)
    sink_proc = server("sink", root)
    rules = _rules(root, sink_proc.url)
    daemon = ctx.daemon("outage", sqlite_url(root / "outage.db"), rules)
    await daemon.ready_daemon()
    try:
        acked, took = await _acknowledge(daemon.url, backlog)
        report.add("backlog acknowledged while the destination is down", acked, "conversions")
        report.add("ingest while the destination is down", acked / took, "/s")
        async with aiohttp.ClientSession() as client:
            for _ in range(600):  # up to 300 s for the claims to be handed back held
                if await _held(client, daemon.url) >= acked * 0.99:
                    break
                await asyncio.sleep(0.5)
            report.add("held by the open breaker", await _held(client, daemon.url), "deliveries")
            sink_proc.start()
            await sink_proc.ready("/_stats", 30)
            back = time.monotonic()
            sink = SinkClient(sink_proc.url)
            base = daemon.url
            live = asyncio.create_task(
                open_loop(lambda n: _url(base, f"l{n}"), LIVE_RATE, LIVE_SECONDS, SENDERS)
            )
            wanted = {f"b{n}" for n in range(backlog)}
            for _ in range(1200):  # up to 600 s to drain
                await sink.refresh(client)
                if wanted <= sink.hits.keys():
                    break
                await asyncio.sleep(0.5)
            out = await live
        got = [min(sink.hits[k]) for k in wanted if k in sink.hits]
        if len(got) < len(wanted):
            report.note(f"{len(wanted) - len(got)} of the backlog not delivered within 600 s")
        if got:
            first, last = min(got), max(got)
            report.add("return to the first held delivery", first - back, "s", "the pause left")
            report.add("return to the last held delivery", last - back, "s")
            report.add("backlog drain rate", len(got) / max(last - first, 1e-9), "/s")
        lat = [out.acked[n] - out.intended[n] for n in out.acked]
        if lat:
            report.add(
                f"ingest p50 while draining ({LIVE_RATE:g}/s)", percentile(lat, 50) * 1e3, "ms"
            )
            report.add(
                f"ingest p99 while draining ({LIVE_RATE:g}/s)", percentile(lat, 99) * 1e3, "ms"
            )
        if out.errors:
            report.note(f"{out.errors} ingest requests failed while draining")
        opened = daemon.events("breaker_opened")
        pauses = [e.get("pause_s") for e in daemon.events("breaker_reopened")]
        closed = daemon.events("breaker_closed")
        report.note(
            f"breaker opened {len(opened)}x, reopened with pauses {pauses} s, closed with "
            f"backlog {[e.get('backlog') for e in closed]}"
        )
    finally:
        sink_proc.stop()
        daemon.stop()
