"""Benchmark section `backfill` (issue 18): live ingest latency while `postbackd backfill` runs,
against the same without.

A daemon on SQLite with the small rule set; the store is filled beforehand with conversions
whose postback (postback 6: sub1=fire-5) "did not exist yet" (their arrivals have no delivery).
The live load is an open loop of conversions that fire nothing (pure ingest, acknowledged after
the commit); its acknowledgement latency is measured for a window without a backfill, then for
a window while `postbackd backfill --postback 6` runs at its default rate and at a high one. The
backfilled deliveries go to the sink, so the dispatcher's work competes too.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.context import Context, sqlite_url
from bench.load import open_loop, percentile
from bench.procs import Daemon, child_env
from bench.rulesgen import NONE, conversion_query, offer_of
from daemon.models import Conversion, Status, Transition, macro_values, rule_data
from daemon.store.base import ArrivalPlan, Planner
from daemon.store.sqlite import SQLiteStore

POSTBACK = 6  # fires for sub1=fire-5 (bench/rulesgen.py)
RATES = (50.0, 1000.0)  # the backfill's default --rate, and a high one
ROUNDS = 2
_runs = itertools.count(1)


def _planner(conv: Conversion, now: datetime) -> Planner:
    def plan(transition: Transition, previous: Status | None, effective: Conversion) -> ArrivalPlan:
        data = rule_data(
            effective, source="generic", transition=transition, previous_status=previous,
            received_at=now,
        )  # fmt: skip
        return ArrivalPlan(data, macro_values(data, effective), [])  # before postback 6 existed

    return plan


async def _fill(path: Path, count: int) -> None:
    """`count` approved conversions an hour ago, none with a delivery, 64 writers at once."""
    store = SQLiteStore(path)
    await store.open()
    ids = iter(range(count))
    when = datetime.now(UTC) - timedelta(hours=1)

    async def writer() -> None:
        for n in ids:
            params = {
                "conversion_id": f"old-{n}",
                "offer": "1",
                "affiliate": "42",
                "status": "approved",
                "payout": "12.50",
                "click_id": uuid.uuid4().hex,
                "sub1": "fire-5",
            }
            conv = Conversion.parse(params)
            await store.record_arrival("generic", conv, when, _planner(conv, when))

    try:
        await asyncio.gather(*(writer() for _ in range(64)))
    finally:
        await store.close()


async def _window(ctx: Context, daemon: Daemon, rate: float, seconds: float) -> list[float]:
    """Acknowledgement latencies (s) of an open loop of pure-ingest conversions."""
    prefix = f"bf{next(_runs)}t{int(time.time()) % 100000}"

    def url_for(n: int) -> str:
        query = conversion_query(f"{prefix}-{n}", offer_of(n, 1), NONE)
        return f"{daemon.url}/webhooks/generic?{query}"

    out = await open_loop(url_for, rate, seconds, 64)
    if out.errors:
        ctx.report.note(f"{out.errors} ingest errors in a window")
    return [out.acked[n] - out.intended[n] for n in out.acked]


async def _backfill(config: Path, rate: float) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", "daemon", "backfill", "--postback", str(POSTBACK)]
    argv += ["--since", "1d", "-c", str(config), "--rate", str(rate)]
    return await asyncio.create_subprocess_exec(
        *argv,
        env=child_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def _queued(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return int(
            conn.execute(
                "SELECT count(*) FROM delivery WHERE postback_id = ?", (POSTBACK,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


async def backfill(ctx: Context) -> None:
    report, opts = ctx.report, ctx.opts
    report.start("backfill", "live ingest latency while `postbackd backfill` runs, vs without")
    live = min(opts.rate, 200.0)
    seconds = opts.latency_seconds
    count = 10_000 if seconds < 5 else 40_000  # more than the rounds at 1,000/s queue
    path = ctx.workdir / "backfill.db"
    started = time.monotonic()
    await _fill(path, count)
    report.note(
        f"{count:,} stored conversions without postback {POSTBACK}'s delivery (filled in "
        f"{time.monotonic() - started:.1f} s); live load {live:,.0f}/s of conversions that "
        f"fire nothing, {seconds:g} s windows"
    )
    daemon = ctx.daemon("backfill", sqlite_url(path), await ctx.rules(large=False))
    await daemon.ready_daemon()
    config = Path(daemon.args[-1])  # `postbackd run -c CONFIG`: the backfill uses the same
    await _window(ctx, daemon, live, 1.0)  # warm-up
    # Rounds of (none, each rate), their samples pooled per condition: the other work of a
    # shared machine then weighs on every condition alike rather than on whichever came first.
    pooled: dict[float, list[float]] = {0.0: [], **{rate: [] for rate in RATES}}
    made = dict.fromkeys(RATES, 0)
    for _ in range(ROUNDS):
        pooled[0.0] += await _window(ctx, daemon, live, seconds)
        for rate in RATES:
            during, count_made = await _during(ctx, daemon, path, config, rate, live, seconds)
            pooled[rate] += during
            made[rate] += count_made
    p50, p99 = (percentile(pooled[0.0], q) * 1000 for q in (50, 99))
    report.add("ingest ack latency p50, no backfill", p50, "ms")
    report.add("ingest ack latency p99, no backfill", p99, "ms")
    for rate in RATES:
        d50, d99 = (percentile(pooled[rate], q) * 1000 for q in (50, 99))
        note = f"{made[rate]:,} backfilled"
        report.add(f"ingest ack latency p50, backfill at {rate:g}/s", d50, "ms", note)
        report.add(f"ingest ack latency p99, backfill at {rate:g}/s", d99, "ms", note)
        report.ratio(f"ingest p50, backfill {rate:g}/s / none", d50, p50, "at most 2 wanted")
        report.ratio(f"ingest p99, backfill {rate:g}/s / none", d99, p99, "at most 2 wanted")


async def _during(
    ctx: Context, daemon: Daemon, path: Path, config: Path, rate: float, live: float, seconds: float
) -> tuple[list[float], int]:
    """One window of live load while a backfill runs at `rate` (from its first write: its
    start-up is not the backfill); the latencies and how many it queued meanwhile."""
    before = _queued(path)
    proc = await _backfill(config, rate)
    deadline = time.monotonic() + 30
    while _queued(path) == before and proc.returncode is None and time.monotonic() < deadline:  # noqa: ASYNC110 - another process's writes send no event
        await asyncio.sleep(0.05)
    during = await _window(ctx, daemon, live, seconds)
    if proc.returncode is None:
        proc.terminate()
    _, err = await proc.communicate()
    if proc.returncode not in (0, -15) and err:
        ctx.report.note(f"backfill at {rate:g}/s: {err.decode(errors='replace').strip()[-300:]}")
    return during, _queued(path) - before
