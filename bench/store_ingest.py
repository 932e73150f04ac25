"""Benchmark: durable record_arrival calls per second with 1 and with 64 concurrent callers.

Run: .venv/bin/python -m bench.store_ingest [--seconds 3] [--dir DIR] [--pg DSN]
SQLite runs in a temporary directory (synchronous=FULL, as in production); it also runs with
group commit disabled (one request per transaction) to show what batching buys. With --pg,
the same on PostgreSQL (the schema is created and dropped by the benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from daemon.models import Conversion, Status, Transition, macro_values, rule_data
from daemon.store.base import ArrivalPlan, PlannedDelivery, Planner, Store
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore

_ids = itertools.count()


def _conversion() -> Conversion:
    params = {
        "conversion_id": f"c{next(_ids)}",
        "offer": "501",
        "affiliate": "42",
        "status": "approved",
        "click_id": uuid.uuid4().hex,
        "payout": "12.50",
        "sub1": "campaign-7",
    }
    return Conversion.parse(params)


def _planner(conv: Conversion, now: datetime) -> Planner:
    def plan(transition: Transition, previous: Status | None, effective: Conversion) -> ArrivalPlan:
        data = rule_data(
            effective,
            source="generic",
            transition=transition,
            previous_status=previous,
            received_at=now,
        )
        delivery = PlannedDelivery(101, "ping_url", "tracker.example.com")
        return ArrivalPlan(data, macro_values(data, effective), [delivery])

    return plan


async def _rate(store: Store, callers: int, seconds: float) -> tuple[float, float]:
    """Arrivals per second, each acknowledged after its commit, with `callers` at once, and
    the CPU time of this process (every thread) per arrival in microseconds."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            conv = _conversion()
            now = datetime.now(UTC)
            await store.record_arrival("generic", conv, now, _planner(conv, now))
            done += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    used = time.process_time() - cpu
    return done / (time.perf_counter() - started), used / max(done, 1) * 1e6


async def _measure(name: str, make: Callable[[], Store], seconds: float) -> None:
    store = make()
    await store.open()
    try:
        for callers in (1, 64):
            rate, cpu_us = await _rate(store, callers, seconds)
            print(
                f"{name:<28} callers={callers:<3} {rate:>9,.0f} record_arrival/s "
                f"{cpu_us:>6,.0f} µs CPU each",
                flush=True,
            )
    finally:
        await store.close()


async def _pg_schema(dsn: str, seconds: float) -> None:
    import asyncpg  # type: ignore[import-untyped]

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        url = f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
        await _measure("postgresql", lambda: PostgresStore(url, max_size=64), seconds)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--pg", metavar="DSN", help="also measure PostgreSQL at DSN")
    parser.add_argument("--dir", help="where the SQLite files go (default: the temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.db"
        await _measure("sqlite (group commit)", lambda: SQLiteStore(path), args.seconds)
        one = Path(tmp) / "one.db"
        await _measure(
            "sqlite (commit per request)", lambda: SQLiteStore(one, max_batch=1), args.seconds
        )
    if args.pg:
        await _pg_schema(args.pg, args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
