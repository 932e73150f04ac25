"""Several cores for one node (`--only workers`): `workers: 1` against `workers: 2` (processes
sharing the port with SO_REUSEPORT, daemon/workers.py), ingest with wrk, on SQLite and on
PostgreSQL (when reachable).

On a machine with few cores the generator cannot be kept off the daemon's cores, so the run
says what was pinned where (taskset): the workers get CPUs 1..N-1 when there are 3 cores or
more, and the generator CPU 0; with 2 cores, 1 worker runs on CPU 1 and 2 workers on CPUs 0-1,
with the generator on CPU 0 in both runs (2 workers then share a core with wrk). Then, where
cgroup CPU quotas can be set (root), the same with each process of the node capped at a quarter
of a core instead of pinned (bench/quota.py): a machine with a core per worker, simulated.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import handoff, sections
from bench import http_figures as hf
from bench import quota as cpu_quota
from bench.context import Context, sqlite_stored, sqlite_url
from bench.procs import Daemon


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers of a `workers: N` daemon)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def _plan(cores: int, workers: int) -> tuple[str | None, str | None]:
    """(the daemon's CPU list, the generator's), or (None, None) on a single core."""
    if cores < 2:
        return None, None
    if cores == 2:
        return ("1" if workers == 1 else "0,1"), "0"
    last = min(cores - 1, workers)
    return f"1-{last}", "0"


async def workers(ctx: Context) -> None:
    report, opts = ctx.report, ctx.opts
    report.start("workers", "one node on several cores: workers 1 against 2 (ingest, SQLite)")
    if opts.wrk is None:
        report.note("skipped: wrk is not available")
        return
    await _handoff(ctx)
    cores = os.cpu_count() or 1
    rates: dict[int, float] = {}
    for count in (1, 2):
        path = ctx.workdir / f"workers-{count}.db"
        rates[count] = await _one(ctx, f"SQLite, workers {count}", sqlite_url(path), count,
                                  sqlite_stored(path))  # fmt: skip
    if rates.get(1) and rates.get(2):
        report.ratio("ingest SQLite, 2 workers / 1", rates[2], rates[1], f"{cores} cores")
    pg = ctx.pg_dsn is not None and await sections.pg_reachable(ctx.pg_dsn) is None
    if not pg:
        report.note("PostgreSQL: skipped (no server)")
    else:
        assert ctx.pg_dsn is not None
        for count in (1, 2):
            async with sections._schema(ctx.pg_dsn) as (url, stored):
                rates[count] = await _one(ctx, f"PostgreSQL, workers {count}", url, count, stored)
        if rates.get(1) and rates.get(2):
            report.ratio("ingest PostgreSQL, 2 workers / 1", rates[2], rates[1], f"{cores} cores")
    await _capped(ctx, pg)


async def _capped(ctx: Context, pg: bool) -> None:
    """Workers 1 against 2 with every process of the node capped at NODE_QUOTA of a core
    (bench/quota.py): the scaling a machine with a core per worker would show, simulated."""
    report = ctx.report
    problem = cpu_quota.unavailable()
    if problem is not None:
        report.note(f"workers capped by CPU quota: skipped ({problem})")
        return
    share = sections.NODE_QUOTA
    report.note(
        f"simulated: each process of the node capped at {share:.0%} of one core by a cgroup CPU "
        "quota, as if each worker had a core of its own and the store and wrk the rest; no "
        "taskset (rates and CPU per conversion only, see bench/quota.py)"
    )
    stores: list[tuple[str, Callable[[], Any]]] = [("SQLite", lambda: _sqlite_store(ctx))]
    dsn = ctx.pg_dsn
    if pg and dsn is not None:
        stores.append(("PostgreSQL", lambda: sections._schema(dsn)))
    for kind, opened in stores:
        # 1 worker and 2 alternate twice (a capped process's figures vary from one start to
        # the next): the ratio is that of the two rounds' means.
        rates: dict[int, list[float]] = {1: [], 2: []}
        for again in ("", " (again)"):
            for count in (1, 2):
                async with opened() as (url, stored):
                    name = f"{kind}, workers {count}, each capped at {share:.0%} of a core{again}"
                    rates[count].append(await _one(ctx, name, url, count, stored, quota=share))
        if all(rates[1]) and all(rates[2]):
            one, two = sum(rates[1]) / 2, sum(rates[2]) / 2
            note = "2.0 = linear; means of 2 alternating rounds"
            report.ratio(f"ingest {kind}, 2 capped workers / 1", two, one, note)


@asynccontextmanager
async def _sqlite_store(ctx: Context) -> AsyncIterator[tuple[str, Callable[[str], Awaitable[int]]]]:
    path = ctx.workdir / f"workers-capped-{uuid.uuid4().hex[:6]}.db"
    yield sqlite_url(path), sqlite_stored(path)


async def _handoff(ctx: Context) -> None:
    """Two writer processes on one file, with and without the flock hand-off, alternating."""
    report, seconds = ctx.report, ctx.opts.seconds
    rounds = 1 if seconds < 5 else 3
    report.note(
        f"SQLite write hand-off: 2 processes x {handoff.CALLERS} callers inserting, no HTTP, "
        f"{rounds} round(s) of {seconds:g} s each way, alternating"
    )
    path = ctx.workdir / "handoff.db"
    got: dict[bool, list[handoff.Result]] = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            got[on].append(await asyncio.to_thread(handoff.measure, path, on, seconds))
    for on in (False, True):
        name = "flock hand-off" if on else "busy handler only"
        runs = got[on]
        best = max(runs, key=lambda r: r.writes)
        report.add(f"{name}: writes", best.writes, "/s", "best round")
        report.add(f"{name}: commits", best.commits, "/s", "same round")
        report.add(f"{name}: wait p99", max(r.p99_ms for r in runs), "ms", "worst round")
        report.add(f"{name}: smaller share", min(r.share for r in runs), "", "0.5 is even")
    report.ratio(
        "SQLite 2 writers, hand-off / busy handler",
        max(r.writes for r in got[True]),
        max(r.writes for r in got[False]),
        "writes/s, best rounds",
    )


async def _one(
    ctx: Context,
    name: str,
    store: str,
    count: int,
    stored: Callable[[str], Awaitable[int]],
    *,
    quota: float | None = None,
) -> float:
    """Ingest of one node with `count` workers: pinned by taskset, or else each of its
    processes capped at `quota` of a core."""
    if quota is None:
        daemon_cpus, gen_cpus = _plan(os.cpu_count() or 1, count)
        ctx.report.note(f"{name}: daemon on CPUs {daemon_cpus}, wrk on CPU {gen_cpus}")
    else:
        daemon_cpus = gen_cpus = None
    daemon = ctx.daemon_with(
        name.replace(", ", "-").replace(" ", "-"),
        store,
        await ctx.rules(large=False),
        extra={"workers": count},
        cpus=daemon_cpus,
    )
    try:
        await _ready(daemon, count)
        pids = [daemon.pid, *children(daemon.pid)] if count > 1 else [daemon.pid]
        target = hf.Target(name, [daemon.url], 1, pids)
        opts = replace(ctx.opts, gen_cpus=gen_cpus)
        with cpu_quota.each_capped(pids, quota):
            got = await hf.ingest(ctx.report, target, opts, stored)
        return got.rate
    finally:
        daemon.stop()


async def _ready(daemon: Daemon, count: int) -> None:
    await daemon.ready_daemon()
    # Every worker has written its start line (each answers on the shared port once it has).
    await daemon.wait_event("daemon_started", count, deadline=60)
