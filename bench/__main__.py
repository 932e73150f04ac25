"""`make bench`: run the benchmarks of SPEC 15 on this machine and print the figures, each with
its unit, and the ratios measured in the same run (docs/benchmarks.md explains each one).

python -m bench [--quick] [--only SECTION[,SECTION]] [--pg DSN | --no-pg] [--json FILE]

Sections: ingest, e2e, rules, scale, pg, workers, alertmanager, affiliates (all by default) and
store (the store-only bench of bench/store_ingest.py), outage, backfill, console (page times
with 100,000 postbacks and 1,000,000 deliveries: about 3 minutes and 1 GB) and instructions
(instructions per request under valgrind's callgrind: about 3 minutes) on request. Closed-loop
figures use wrk (bench/wrk.py; installed with apt-get when missing and root), the Python client
only for open-loop latency. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import (
    affiliates,
    alertmanager,
    backfill,
    console,
    cores,
    instructions,
    outage,
    scale,
    sections,
    wrk,
)
from bench.context import LARGE_OFFERS, Context
from bench.http_figures import Options
from bench.procs import Daemon
from bench.report import Report, loadavg, machine

DEFAULT_SECTIONS = (
    "ingest", "e2e", "rules", "scale", "pg", "workers", "alertmanager", "affiliates",
)  # fmt: skip
ALL_SECTIONS = (*DEFAULT_SECTIONS, "store", "outage", "backfill", "console", "instructions")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short windows, 10,000 postbacks")
    parser.add_argument("--only", action="append", default=[], help=f"of {ALL_SECTIONS}")
    parser.add_argument("--seconds", type=float, help="each closed-loop window (default 5)")
    parser.add_argument("--connections", type=int, default=64, help="load generator (64)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency figure's rate")
    parser.add_argument("--offers", type=int, help="offers of the large set (10 postbacks each)")
    parser.add_argument(
        "--per-host", type=int, help="outbound.per_host_concurrency (default: the shipped 8)"
    )
    parser.add_argument("--dir", help="where the SQLite files go (default: the temp dir)")
    parser.add_argument("--pg", help="PostgreSQL DSN (default: $POSTBACKD_TEST_PG_DSN, else "
                        f"{DEFAULT_PG})")  # fmt: skip
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--e2e-seconds", type=float, help="the end-to-end window with wrk (default 20, quick 5)"
    )
    parser.add_argument(
        "--python-generator", action="store_true", help="the Python client even if wrk is there"
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(ALL_SECTIONS))
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(ALL_SECTIONS)}")
    args.sections = chosen or list(DEFAULT_SECTIONS)
    return args


def options(args: argparse.Namespace) -> Options:
    found = None
    if not args.python_generator:
        found, how = wrk.ensure_wrk()
        print(f"load generator: {how}" if found else f"load generator: Python client ({how})")
    if args.quick:
        seconds = args.seconds or 2.0
        e2e = args.e2e_seconds or 5.0
        return Options(seconds, 0.5, args.connections, args.rate, 3.0, 30.0, wrk=found,
                       e2e_seconds=e2e)  # fmt: skip
    return Options(args.seconds or 5.0, 1.0, args.connections, args.rate, 8.0, 60.0, wrk=found,
                   e2e_seconds=args.e2e_seconds or 20.0)  # fmt: skip


async def run(args: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    pg = None if args.no_pg else (args.pg or os.environ.get("POSTBACKD_TEST_PG_DSN", DEFAULT_PG))
    offers = args.offers or (1_000 if args.quick else LARGE_OFFERS)
    ctx = Context(report, options(args), workdir, offers, pg, args.per_host)
    chosen = args.sections
    try:
        large: Daemon | None = None
        if "ingest" in chosen:
            await sections.ingest(ctx)
        if "e2e" in chosen:
            await sections.end_to_end(ctx)
        if "scale" in chosen and "rules" in chosen:
            # Loading 100,000 postbacks takes a while: the daemon loads its copy while the
            # in-process figures are taken (each has a core of its own on 2 cores).
            large = scale.start_large(ctx, await ctx.rules(large=True))
        if "rules" in chosen:
            await scale.rules_inprocess(ctx)
        if "scale" in chosen:
            await scale.scale(ctx, large)
        if "pg" in chosen:
            await sections.postgres(ctx)
        if "workers" in chosen:
            await cores.workers(ctx)  # workers 1 against 2 (bench/cores.py)
        if "alertmanager" in chosen:
            await alertmanager.alertmanager(ctx)  # the peer, when installed (bench/alertmanager.py)
        if "store" in chosen:
            await _store_bench(ctx, pg)
        if "outage" in chosen:
            await outage.outage(ctx)  # a destination down, then back (bench/outage.py)
        if "backfill" in chosen:
            await backfill.backfill(ctx)  # ingest latency during a backfill (bench/backfill.py)
        if "instructions" in chosen:
            await instructions.instructions(ctx)  # under callgrind (bench/instructions.py)
        if "affiliates" in chosen:
            await affiliates.affiliates(ctx)  # store postbacks (bench/affiliates.py)
        if "console" in chosen:
            await console.section(ctx)  # the web console's page times (bench/console.py)
    finally:
        ctx.close()
    return report


async def _store_bench(ctx: Context, pg: str | None) -> None:
    """The store alone (no HTTP): bench/store_ingest.py, in a child process."""
    ctx.report.start("store", "record_arrival/s without HTTP (bench/store_ingest.py)")
    argv = [sys.executable, "-m", "bench.store_ingest", "--seconds", str(ctx.opts.seconds)]
    argv += ["--dir", str(ctx.workdir)] + (["--pg", pg] if pg else [])
    proc = await asyncio.create_subprocess_exec(*argv)
    if await proc.wait() != 0:
        ctx.report.note(f"bench/store_ingest.py failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    info = machine()
    print(
        f"postbackd benchmark: {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"Python {info['python']} ({info['interpreter']}, built {info['python_build']}), "
        f"{info['date']}, load average {info['loadavg_at_start']}"
    )
    print("Other work on this machine shows in the load average printed with each section.")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="postbackd-bench-", dir=args.dir) as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report.summary()
    elapsed = time.monotonic() - started
    print(f"\nfinished in {elapsed:.0f} s; load average now {loadavg()}")
    if args.json:
        info["loadavg_at_end"] = loadavg()
        info["elapsed_s"] = round(elapsed)
        opts: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "pg"}
        report.save(Path(args.json), info, opts)


if __name__ == "__main__":
    main()
