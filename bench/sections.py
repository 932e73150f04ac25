"""The HTTP sections of `make bench`: ingest against the hello yardstick, end to end on SQLite,
and the same figures on PostgreSQL with one node and with three."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

import asyncpg  # type: ignore[import-untyped]

from bench import http_figures as hf
from bench import quota as cpu_quota
from bench.context import Context, sqlite_stored, sqlite_url
from bench.procs import PACED, Daemon, leased_share, started
from bench.report import Report, filesystem_of
from bench.rulesgen import PER_OFFER

SQLITE_DB = "sqlite.db"
DEFAULT_PER_HOST = 8  # outbound.per_host_concurrency as shipped
RAISED_PER_HOST = 64
# Each node's share of a core when nodes are capped (bench/quota.py): 3 capped nodes take 0.75
# of this machine's 2 cores, leaving the rest to PostgreSQL, wrk and the sink.
NODE_QUOTA = 0.25


async def _sqlite_daemon(ctx: Context) -> Daemon:
    """One daemon on an SQLite file (synchronous=FULL, as shipped) with the small rule set,
    shared by the ingest and e2e sections."""
    for daemon in ctx.daemons:
        if daemon.name == "sqlite":
            return daemon
    path = ctx.workdir / SQLITE_DB
    daemon = ctx.daemon("sqlite", sqlite_url(path), await ctx.rules(large=False))
    await daemon.ready_daemon()
    return daemon


async def ingest(ctx: Context) -> None:
    report, opts = ctx.report, ctx.opts
    report.start("ingest", "durable conversions/s vs a bare aiohttp hello server")
    fs = filesystem_of(ctx.workdir)
    generator = "wrk -t2 (one per node)" if opts.wrk else "the Python client (wrk missing)"
    report.note(
        f"SQLite file on {fs} ({ctx.workdir}); {generator}, {opts.connections} connections, "
        f"{opts.warmup:g} s warm-up + {opts.seconds:g} s; {PER_OFFER} postbacks whose "
        "conditions are all false (nothing fires)"
    )
    if fs in ("tmpfs", "ramfs"):
        report.note("the store is on a RAM filesystem: fsync costs nothing, durability is moot")
    hello = await hf.hello(report, ctx.workdir, opts)
    durable = await hf.hello(report, ctx.workdir, opts, durable=True)
    daemon = await _sqlite_daemon(ctx)
    target = hf.Target("postbackd SQLite", [daemon.url], 1, [daemon.pid])
    got = await hf.ingest(report, target, opts, sqlite_stored(ctx.workdir / SQLITE_DB))
    ctx.figures["ingest_sqlite"] = got.rate
    ctx.figures["ingest_sqlite_cpu_us"] = got.cpu_us
    ctx.figures["durable_hello_cpu_us"] = durable.cpu_us
    if got.peak_kib:
        ctx.figures["rss_sqlite_mib"] = max(got.peak_kib.values()) / 1024
    report.ratio("ingest SQLite / hello", got.rate, hello.rate, "postbackd acks per hello answer")
    report.ratio("CPU per request, hello / ingest SQLite", hello.cpu_us, got.cpu_us, "")
    _against_durable(report, hello, durable, got, "")
    if opts.wrk and (os.cpu_count() or 1) >= 2:
        await _ingest_pinned(ctx)


async def _ingest_pinned(ctx: Context) -> None:
    """The same two figures with the server on CPU 1 and wrk on CPU 0 (taskset): the generator
    off the server's core, and no migrations between cores (steadier figures)."""
    report, opts = ctx.report, replace(ctx.opts, gen_cpus="0")
    report.note("the same, pinned: the server on CPU 1, wrk on CPU 0 (taskset)")
    hello = await hf.hello(report, ctx.workdir, opts, cpus="1", label=", pinned")
    durable = await hf.hello(report, ctx.workdir, opts, cpus="1", label=", pinned", durable=True)
    path = ctx.workdir / "pinned.db"
    daemon = ctx.daemon_with("sqlite-pinned", sqlite_url(path), await ctx.rules(False), cpus="1")
    try:
        await daemon.ready_daemon()
        target = hf.Target("postbackd SQLite, pinned", [daemon.url], 1, [daemon.pid])
        got = await hf.ingest(report, target, opts, sqlite_stored(path))
    finally:
        daemon.stop()
    ctx.figures["ingest_sqlite_pinned"] = got.rate
    report.ratio("ingest SQLite / hello, pinned", got.rate, hello.rate, "")
    report.ratio("CPU per request, hello / ingest SQLite, pinned", hello.cpu_us, got.cpu_us, "")
    _against_durable(report, hello, durable, got, ", pinned")


def _against_durable(
    report: Report, hello: hf.Measured, durable: hf.Measured, got: hf.Measured, label: str
) -> None:
    """The durable hello's rate against hello (what a committed answer costs on this stack)
    and postbackd's ingest against it (what the rest of ingest costs)."""
    report.ratio(f"durable hello / hello{label}", durable.rate, hello.rate, "")
    report.ratio(f"ingest SQLite / durable hello{label}", got.rate, durable.rate, "")
    report.ratio(f"CPU per request, durable hello / ingest SQLite{label}", durable.cpu_us,
                 got.cpu_us, "")  # fmt: skip


async def end_to_end(ctx: Context) -> None:
    report = ctx.report
    report.start("e2e", "ingested and delivered (one ping_url each to a loopback sink), SQLite")
    daemon = await _sqlite_daemon(ctx)
    per_host = ctx.per_host or DEFAULT_PER_HOST
    target = hf.Target(f"SQLite, per-host {per_host}", [daemon.url], 1, [daemon.pid])
    rate = await _e2e(ctx, target, [daemon], changes=True)
    ctx.figures["e2e_delivered_sqlite"] = ctx.figures["last_delivered"]
    if rate is not None:
        ctx.figures["e2e_sqlite"] = rate
        ctx.figures["e2e_sqlite_cpu_us"] = ctx.figures["last_e2e_cpu_us"]
        if "ingest_sqlite" in ctx.figures:
            report.ratio("e2e / ingest (SQLite)", rate, ctx.figures["ingest_sqlite"], "")
    await _e2e_floor(ctx, per_host)
    if ctx.per_host is None:
        report.note(
            f"all postbacks go to one host, so outbound.per_host_concurrency ({DEFAULT_PER_HOST}, "
            f"as shipped) bounds deliveries in flight; the same with {RAISED_PER_HOST}:"
        )
        path = ctx.workdir / f"per-host-{RAISED_PER_HOST}.db"
        raised = ctx.daemon(
            "sqlite-raised", sqlite_url(path), await ctx.rules(False), RAISED_PER_HOST
        )
        await raised.ready_daemon()
        name = f"SQLite, per-host {RAISED_PER_HOST}"
        rate = await _e2e(ctx, hf.Target(name, [raised.url], 1, [raised.pid]), [raised])
        raised.stop()
        if rate is not None:
            ctx.figures["e2e_sqlite_raised"] = rate
    await _e2e_dispatcher_process(ctx, per_host)


async def _e2e_floor(ctx: Context, per_host: int) -> None:
    """What a delivered conversion costs at least on this stack: the durable hello's answer
    (ingest section) plus a bare aiohttp client's request, against postbackd's end to end."""
    report = ctx.report
    sink = await ctx.start_sink()
    client = await hf.client_hello(report, sink.base_url, ctx.opts, per_host)
    durable = ctx.figures.get("durable_hello_cpu_us")
    ours = ctx.figures.get("e2e_sqlite_cpu_us")
    if durable is None or ours is None or math.isnan(client):
        return
    floor = report.add("floor: durable hello + aiohttp client, CPU", durable + client, "µs")
    report.ratio("e2e CPU per conversion / floor", ours, floor, "what postbackd adds, x")


async def _e2e_dispatcher_process(ctx: Context, per_host: int) -> None:
    """The same figures with `dispatcher_process: true` (daemon/dispatchproc.py): the
    dispatcher in a process of its own; CPU and memory are those of all the node's processes."""
    from bench.cores import children  # here: bench.cores imports this module

    report = ctx.report
    report.note(
        "the same with dispatcher_process: true (a serving process and a dispatch process on "
        "one SQLite file; CPU per conversion of all the node's processes):"
    )
    path = ctx.workdir / "dispatcher-process.db"
    daemon = ctx.daemon_with(
        "sqlite-dispatcher-process",
        sqlite_url(path),
        await ctx.rules(False),
        per_host,
        extra={"dispatcher_process": True},
    )
    try:
        await daemon.ready_daemon()  # /readyz is 200 once the dispatch process answers too
        pids = [daemon.pid, *children(daemon.pid)]
        name = f"SQLite, dispatcher_process, per-host {per_host}"
        rate = await _e2e(ctx, hf.Target(name, [daemon.url], 1, pids))
    finally:
        daemon.stop()
    ctx.figures["e2e_delivered_sqlite_dispatcher_process"] = ctx.figures["last_delivered"]
    if rate is not None:
        ctx.figures["e2e_sqlite_dispatcher_process"] = rate
        shipped = ctx.figures.get("e2e_sqlite")
        if shipped:
            report.ratio("e2e SQLite, dispatcher_process / one process", rate, shipped, "")
    shipped_delivered = ctx.figures.get("e2e_delivered_sqlite")
    if shipped_delivered:
        report.ratio(
            "delivered while accepting, dispatcher_process / one process",
            ctx.figures["last_delivered"],
            shipped_delivered,
            "",
        )


async def _e2e(
    ctx: Context, target: hf.Target, daemons: Sequence[Daemon] = (), *, changes: bool = False
) -> float | None:
    """Sustained rate, then latency at opts.rate, or below what was sustained if that is less
    (latency at a rate the node cannot keep up with only measures the growing queue). With
    `daemons` (the target's), the share of each phase's deliveries leased at insert. With
    `changes`, then the latency of status changes (pending, then approved) at the same rate."""
    report, opts = ctx.report, ctx.opts
    sink = await ctx.start_sink()
    since = await started(daemons)
    got = await hf.sustained(report, target, sink, opts)
    if daemons:
        since = await _leased(ctx, daemons, since, target.name, "saturated")
    rate = None if got is None else got.rate
    ctx.figures["last_delivered"] = 0.0 if got is None else got.delivered
    if got is not None:
        ctx.figures["last_e2e_cpu_us"] = got.cpu_us
    pace = opts.rate
    if rate is not None and rate < opts.rate:
        pace = max(10.0, round(rate * 0.8, -1))
        report.note(
            f"{opts.rate:,.0f}/s cannot be sustained ({rate:,.0f}/s was, end to end): latency "
            f"measured at {pace:,.0f}/s instead"
        )
    await hf.latency(report, target, sink, replace(opts, rate=pace))
    if daemons:
        since = await _leased(ctx, daemons, since, target.name, f"at {pace:,.0f}/s")
    if changes:
        await hf.change_latency(report, target, sink, replace(opts, rate=pace))
        if daemons:
            await _leased(ctx, daemons, since, target.name, f"status changes at {pace:,.0f}/s")
    return rate


async def _leased(
    ctx: Context, daemons: Sequence[Daemon], since: dict[str, float], name: str, phase: str
) -> dict[str, float]:
    """Report, for the `phase` of `name` since `since` (a started() reading), the share of the
    deliveries started that were leased at insert and the arrivals that waited for delivery
    (daemon/pacing.py); the reading to measure the next phase from."""
    now = await started(daemons)
    share = leased_share(since, now)
    if share is not None:
        ctx.report.add(f"{name}: leased at insert, {phase}", share * 100, "%")
    paced = now.get(PACED, 0.0) - since.get(PACED, 0.0)
    ctx.report.add(f"{name}: arrivals paced, {phase}", paced, "")
    return now


@asynccontextmanager
async def _schema(dsn: str) -> AsyncIterator[tuple[str, Callable[[str], Awaitable[int]]]]:
    """A fresh schema (through search_path) and a counter of its stored conversions."""
    admin = await asyncpg.connect(dsn, timeout=10)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    url = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"

    async def stored(prefix: str) -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            query = "SELECT count(*) FROM conversion WHERE conversion_id LIKE $1"
            return int(await conn.fetchval(query, f"{prefix}-%"))
        finally:
            await conn.close()

    try:
        yield url, stored
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


async def pg_reachable(dsn: str) -> str | None:
    """None when a PostgreSQL server answers at dsn, else why not."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        return f"{err.__class__.__name__}: {err}"
    await conn.close()
    return None


async def postgres(ctx: Context) -> None:
    report = ctx.report
    report.start("pg", "ingest and end to end on PostgreSQL: one node, then three")
    if ctx.pg_dsn is None:
        report.note("skipped: no PostgreSQL (--no-pg)")
        return
    problem = await pg_reachable(ctx.pg_dsn)
    if problem is not None:
        report.note(f"skipped: PostgreSQL not reachable ({problem})")
        return
    report.note(
        "same machine as the daemons and the load generator; 3 nodes = 3 processes on these "
        "cores, the generator round-robins over their ports (no load balancer)"
    )
    for nodes in (1, 3):
        await _pg_cluster(ctx, nodes)
    figures = ctx.figures
    for kind in ("ingest", "e2e"):
        one, three = figures.get(f"{kind}_pg1"), figures.get(f"{kind}_pg3")
        if one and three:
            report.ratio(f"{kind} PG 3 nodes / 1 node", three, one, "")
    await _pg_capped(ctx)
    sqlite = {"ingest": figures.get("ingest_sqlite"), "e2e": figures.get("e2e_sqlite_raised")}
    for kind, base in sqlite.items():
        one = figures.get(f"{kind}_pg1")
        if one and base:
            report.ratio(f"{kind} PG 1 node / SQLite", one, base, "same per-host limit")


async def _pg_capped(ctx: Context) -> None:
    """One node against three with each node capped at NODE_QUOTA of a core (bench/quota.py):
    how the cluster scales with its nodes' cores where the machine has them, simulated."""
    report = ctx.report
    problem = cpu_quota.unavailable()
    if problem is not None:
        report.note(f"nodes capped by CPU quota: skipped ({problem})")
        return
    report.note(
        f"simulated: each node capped at {NODE_QUOTA:.0%} of one core by a cgroup CPU quota, as "
        "if each ran on a small machine of its own; PostgreSQL, wrk and the sink share the rest "
        f"of the {os.cpu_count()} cores (rates and CPU per conversion only: a capped node waits "
        f"for its next share every {cpu_quota.PERIOD_US // 1000} ms, so its latency is not a "
        "real machine's)"
    )
    # A capped node's figures vary from one start to the next (a fifth, seen): 1 node and 3
    # alternate twice for ingest, whose ratio is that of the two rounds' means.
    for nodes in (1, 3):
        await _pg_cluster(ctx, nodes, NODE_QUOTA)
    for nodes in (1, 3):
        await _pg_cluster(ctx, nodes, NODE_QUOTA, e2e=False, tag="_again")
    figures = ctx.figures
    ingest = {
        n: [
            figures.get(f"ingest_pg{n}_capped", 0.0),
            figures.get(f"ingest_pg{n}_capped_again", 0.0),
        ]
        for n in (1, 3)
    }
    if all(all(rates) for rates in ingest.values()):
        one, three = sum(ingest[1]) / 2, sum(ingest[3]) / 2
        note = "3.0 = linear; means of 2 alternating rounds"
        report.ratio("ingest PG 3 capped nodes / 1 capped node", three, one, note)
    one, three = figures.get("e2e_pg1_capped"), figures.get("e2e_pg3_capped")
    if one and three:
        report.ratio("e2e PG 3 capped nodes / 1 capped node", three, one, "3.0 = linear")


async def _pg_cluster(
    ctx: Context, nodes: int, quota: float | None = None, *, e2e: bool = True, tag: str = ""
) -> None:
    assert ctx.pg_dsn is not None
    report, opts = ctx.report, ctx.opts
    rules = await ctx.rules(large=False)
    async with _schema(ctx.pg_dsn) as (url, stored):
        per_host = ctx.per_host or RAISED_PER_HOST
        daemons = [ctx.daemon(f"pg{nodes}-{i}", url, rules, per_host) for i in range(nodes)]
        try:
            for daemon in daemons:
                await daemon.ready_daemon()
            name = f"PostgreSQL {nodes} node{'s' if nodes > 1 else ''}, per-host {per_host}"
            if quota is not None:
                name += f", each capped at {quota:.0%} of a core"
            if tag:
                name += " (again)"
            key = f"pg{nodes}" + ("" if quota is None else "_capped")
            pids = [d.pid for d in daemons]
            target = hf.Target(name, [d.url for d in daemons], 1, pids)
            with cpu_quota.each_capped(pids, quota):  # once started: its start is not measured
                got = await hf.ingest(report, target, opts, stored)
                ctx.figures[f"ingest_{key}{tag}"] = got.rate
                changes = nodes == 1 and quota is None
                rate = await _e2e(ctx, target, daemons, changes=changes) if e2e else None
                if rate is not None:
                    ctx.figures[f"e2e_{key}{tag}"] = rate
        finally:
            for daemon in daemons:
                daemon.stop()  # before the schema is dropped
