"""Section "outage" of `make bench`: a destination that is down while 30,000 conversions are
acknowledged (each fires one ping_url to it), then comes back. The figures: how soon after its
return the first held delivery reaches it, how fast the backlog drains (at the shipped
outbound.per_host_concurrency unless --per-host), and the ingest latency (p50/p99, open loop)
of new conversions while it drains (offered from the moment the first held delivery arrives).
SQLite store, the breaker as shipped. Each of those new conversions also fires a postback to
another destination (a second sink, up all along): how long those take to arrive while the
backlog drains says whether the backlog starves the others.

The destination is the benchmark's sink process, stopped (every connection refused) and started
again on the same port.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from bench.context import Context, sqlite_url
from bench.load import open_loop, percentile, session
from bench.procs import Proc, free_port, server
from bench.report import Report
from bench.servers import SinkClient

BACKLOG = 30_000
QUICK_BACKLOG = 5_000
LIVE_RATE = 200.0  # new conversions/s offered while the backlog drains
LIVE_SECONDS = 10.0
SENDERS = 64
_HELD = re.compile(r"^postbackd_destination_held_deliveries\{[^}]*\} (\S+)$", re.M)


def _rules(root: Path, sink_url: str, other_url: str) -> Path:
    """Every conversion to the sink that goes down; affiliate 2's also to the other sink."""
    rules = root / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "outage.yaml").write_text(
        "offer: 1\npostbacks:\n  - id: 1\n    trigger: conversion_done\n"
        '    affiliate: "*"\n'
        f'    action: {{type: ping_url, url: "{sink_url}/pb?k={{conversion_id}}"}}\n'
        "  - id: 2\n    trigger: conversion_done\n    affiliate: 2\n"
        f'    action: {{type: ping_url, url: "{other_url}/pb?k={{conversion_id}}"}}\n'
    )
    return rules


def _url(base: str, cid: str, affiliate: int = 1) -> str:
    query = urlencode(
        {"conversion_id": cid, "offer": 1, "affiliate": affiliate, "status": "approved"}
    )
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
    other_args = [sys.executable, "-m", "bench.servers", "sink", "--port", str(free_port())]
    other_proc = Proc("sink", other_args, root / "other-sink.log", int(other_args[-1]))
    other_proc.start()
    await other_proc.ready("/_stats", 30)
    rules = _rules(root, sink_proc.url, other_proc.url)
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
            for _ in range(400):  # the new conversions start once the drain has: up to 200 s
                if await sink.refresh(client):
                    break
                await asyncio.sleep(0.5)
            live = asyncio.create_task(
                open_loop(lambda n: _url(base, f"l{n}", 2), LIVE_RATE, LIVE_SECONDS, SENDERS)
            )
            wanted = {f"b{n}" for n in range(backlog)}
            for _ in range(1200):  # up to 600 s to drain
                await sink.refresh(client)
                if wanted <= sink.hits.keys():
                    break
                await asyncio.sleep(0.5)
            out = await live
            other = SinkClient(other_proc.url)
            for _ in range(120):  # the other destination's deliveries: up to 60 s more
                await other.refresh(client)
                if all(f"l{n}" in other.hits for n in out.acked):
                    break
                await asyncio.sleep(0.5)
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
        _report_other(report, out.acked, other.hits, max(got) if got else None)
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
        other_proc.stop()
        sink_proc.stop()
        daemon.stop()


def _report_other(
    report: Report, acked: dict[int, float], hits: dict[str, list[float]], drained: float | None
) -> None:
    """The other destination's deliveries of the conversions acknowledged while the backlog
    drained: from acknowledgement to arrival, and how many arrived before the backlog's last."""
    lat = [min(hits[f"l{n}"]) - at for n, at in acked.items() if f"l{n}" in hits]
    if len(lat) < len(acked):
        report.note(f"{len(acked) - len(lat)} deliveries to the other destination missing")
    if not lat:
        return
    note = "acknowledged to delivered"
    report.add("other destination p50 while draining", percentile(lat, 50) * 1e3, "ms", note)
    report.add("other destination p99 while draining", percentile(lat, 99) * 1e3, "ms", note)
    if drained is not None:
        early = sum(min(hits[f"l{n}"]) < drained for n in acked if f"l{n}" in hits)
        report.add("other destination before the backlog's last", early, "deliveries",
                   f"of {len(lat)}")  # fmt: skip
