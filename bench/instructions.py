"""Instructions per request (`--only instructions`): the hello server, the durable hello and
postbackd (ingest, and end to end with one ping_url each) each run under valgrind's callgrind,
counting user-space instructions only while wrk's measured window runs.

Unlike CPU time, an instruction count does not depend on what else the machine runs, on its caches
or on its clock: the same code and load give the same count within about 1 %, so a change of a few
percent shows in one run where CPU time needs many alternating rounds (docs/benchmarks-history.md,
run O). It leaves out the kernel (system calls, loopback TCP, fsync) and counts a `rep` string
instruction once per repetition; under callgrind a process runs about 50 times slower, so batches
and claims are smaller than at full speed. Read it for code changes, not for capacity.

The figures at 32 connections still move by a few percent between runs of the same code
(2 to 3 %, the durable hello's too): how many requests share a commit, and how many deliveries
a claim, depends on timing. The section therefore also counts the durable hello and postbackd
with one connection (wrk -t1 -c1: one request at a time, each its own commit and, end to end,
its delivery leased at insert), a path that timing does not change: two runs of the same code
agree within about 0.3 %, so a change of half a percent shows in one pair. It costs more per
request than the batched path (a commit each) and includes what the daemon's timers do per
second, spread over the requests of that second; compare it with itself, between versions.

valgrind (Debian's package) must be installed; without it the section says so and is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import aiohttp

from bench import wrk
from bench.context import Context, sqlite_url
from bench.procs import Daemon, Proc, leased_share, server, started
from bench.rulesgen import FIRE, NONE

WARMUP = 10.0  # seconds of load before counting (imports, caches, first connections)
CONNECTIONS = 32
ONE = "one connection"  # the targets counted with wrk -c1 (the module's docstring)


def unavailable() -> str | None:
    """Why the section cannot run here, or None."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install valgrind)"
    return None


def totals(dump: Path) -> int:
    """The instructions a callgrind dump file counted (its `summary:` or `totals:` line)."""
    found = 0
    for line in dump.read_text("utf-8", "replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            found = max(found, int(line.split()[1]))
    return found


def _under_callgrind(proc: Proc, out: Path) -> None:
    proc.args = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p", *proc.args,
    ]  # fmt: skip


async def _control(*args: str | int) -> None:
    """callgrind_control on a process: instrumentation on or off (-i), or a dump (-d)."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", *map(str, args),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(map(str, args))}: {err.decode()[:200]}")


async def _delivered(ctx: Context, session: aiohttp.ClientSession, count: int) -> int:
    """Wait until the sink has received `count` postbacks in all (each conversion acknowledged
    fires exactly one), at most 5 minutes; what it has."""
    assert ctx.sink is not None
    until = time.monotonic() + 300
    while True:
        got = await ctx.sink.refresh(session)
        if got >= count or time.monotonic() > until:
            return got
        await asyncio.sleep(1)


async def _count(
    ctx: Context, proc: Proc, ready: str, sub1: str, seconds: float, connections: int
) -> tuple[int, int, int]:
    """(instructions in the window, requests answered 200, deliveries the sink received)."""
    out = ctx.workdir / f"callgrind-{proc.name}"
    _under_callgrind(proc, out)
    proc.start()
    wrk_path = ctx.opts.wrk
    assert wrk_path is not None
    try:
        await proc.ready(ready, 600)
        url = [proc.url]
        fires = sub1 == FIRE
        async with aiohttp.ClientSession() as session:
            start = await _delivered(ctx, session, 0) if fires else 0
            warm = await wrk.closed(wrk_path, url, "w", sub1, 1, seconds=WARMUP,
                                    connections=connections)  # fmt: skip
            # the warm-up's deliveries all made before counting starts, the window's after
            before = await _delivered(ctx, session, start + warm.ok) if fires else 0
            since = await started([proc]) if fires and isinstance(proc, Daemon) else {}
            await _control("-i", "on", proc.pid)
            got = await wrk.closed(wrk_path, url, "m", sub1, 1, seconds=seconds,
                                   connections=connections)  # fmt: skip
            after = await _delivered(ctx, session, before + got.ok) if fires else 0
        await _control("-i", "off", proc.pid)
        if since:  # after counting: the scrapes are not counted
            assert isinstance(proc, Daemon)
            share = leased_share(since, await started([proc]))
            if share is not None:
                ctx.report.note(f"{proc.name}: {share:.0%} of deliveries leased at insert")
        await _control("-d", proc.pid)
        until = time.monotonic() + 30
        dumps: list[Path] = []
        while not dumps and time.monotonic() < until:
            await asyncio.sleep(0.5)
            dumps = sorted(ctx.workdir.glob(f"{out.name}.{proc.pid}.*"))
        if not dumps:
            raise RuntimeError(f"no callgrind dump from {proc.name}")
        return totals(dumps[-1]), got.ok, after - before
    finally:
        proc.stop()


async def instructions(ctx: Context) -> None:
    report = ctx.report
    report.start("instructions", "instructions per request under callgrind (deterministic)")
    problem = unavailable() or (None if ctx.opts.wrk else "wrk not found")
    if problem is not None:
        report.note(f"skipped: {problem}")
        return
    seconds = max(ctx.opts.seconds * 3, 6.0)
    report.note(
        f"wrk, {CONNECTIONS} connections (or one), {WARMUP:g} s uncounted then {seconds:g} s "
        "counted; "
        "user space only (no kernel); a process under callgrind runs about 50 times slower"
    )
    rules = await ctx.rules(large=False)
    counted: dict[str, float] = {}
    targets = [
        ("hello", server("hello", ctx.workdir), "/", NONE),
        ("durable hello", server("durable", ctx.workdir, None,
                                 ("--db", str(ctx.workdir / "cg-durable.db"))), "/", NONE),
        ("postbackd ingest", Daemon("cg-ingest", ctx.workdir,
                                    sqlite_url(ctx.workdir / "cg-ingest.db"), rules),
         "/readyz", NONE),
        ("postbackd end to end", Daemon("cg-e2e", ctx.workdir,
                                        sqlite_url(ctx.workdir / "cg-e2e.db"), rules),
         "/readyz", FIRE),
        (f"durable hello, {ONE}", server("durable", ctx.workdir, None,
                                         ("--db", str(ctx.workdir / "cg1-durable.db"))),
         "/", NONE),
        (f"postbackd ingest, {ONE}", Daemon("cg1-ingest", ctx.workdir,
                                           sqlite_url(ctx.workdir / "cg1-ingest.db"), rules),
         "/readyz", NONE),
        (f"postbackd end to end, {ONE}", Daemon("cg1-e2e", ctx.workdir,
                                               sqlite_url(ctx.workdir / "cg1-e2e.db"), rules),
         "/readyz", FIRE),
    ]  # fmt: skip
    for name, proc, ready, sub1 in targets:
        connections = 1 if name.endswith(ONE) else CONNECTIONS
        try:
            total, ok, delivered = await _count(ctx, proc, ready, sub1, seconds, connections)
        except (RuntimeError, OSError) as err:
            report.note(f"{name}: not counted ({err})")
            continue
        note = f"{ok} answered" + (f", {delivered} delivered" if sub1 == FIRE else "")
        counted[name] = report.add(f"{name}: instructions per request", total / max(ok, 1) / 1000,
                                   "k", note)  # fmt: skip
    hello = counted.get("hello")
    for name, value in counted.items():
        if hello and name != "hello" and not name.endswith(ONE):
            report.ratio(f"instructions, {name} / hello", value, hello, "in hellos")
    for suffix in ("", f", {ONE}"):
        with contextlib.suppress(KeyError):
            durable = counted[f"durable hello{suffix}"]
            report.ratio(f"instructions, postbackd ingest / durable hello{suffix}",
                         counted[f"postbackd ingest{suffix}"], durable, "")  # fmt: skip
