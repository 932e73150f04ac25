"""Several cores for one node (`--only workers`): `workers: 1` against `workers: 2` (processes
sharing the port with SO_REUSEPORT, daemon/workers.py), ingest on SQLite with wrk.

On a machine with few cores the generator cannot be kept off the daemon's cores, so the run
says what was pinned where (taskset): the workers get CPUs 1..N-1 when there are 3 cores or
more, and the generator CPU 0; with 2 cores, 1 worker runs on CPU 1 and 2 workers on CPUs 0-1,
with the generator on CPU 0 in both runs (2 workers then share a core with wrk).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from bench import http_figures as hf
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
    cores = os.cpu_count() or 1
    rates: dict[int, float] = {}
    for count in (1, 2):
        daemon_cpus, gen_cpus = _plan(cores, count)
        report.note(f"workers {count}: daemon on CPUs {daemon_cpus}, wrk on CPU {gen_cpus}")
        path = ctx.workdir / f"workers-{count}.db"
        daemon = ctx.daemon_with(
            f"workers-{count}",
            sqlite_url(path),
            await ctx.rules(large=False),
            extra={"workers": count},
            cpus=daemon_cpus,
        )
        try:
            await _ready(daemon, count)
            pids = [daemon.pid, *children(daemon.pid)] if count > 1 else [daemon.pid]
            target = hf.Target(f"workers {count}", [daemon.url], 1, pids)
            got = await hf.ingest(report, target, replace(opts, gen_cpus=gen_cpus),
                                  sqlite_stored(path))  # fmt: skip
            rates[count] = got.rate
        finally:
            daemon.stop()
    if rates.get(1) and rates.get(2):
        report.ratio("ingest, 2 workers / 1", rates[2], rates[1], f"{cores} cores")


async def _ready(daemon: Daemon, count: int) -> None:
    await daemon.ready_daemon()
    # Every worker has written its start line (each answers on the shared port once it has).
    await daemon.wait_event("daemon_started", count, deadline=60)
