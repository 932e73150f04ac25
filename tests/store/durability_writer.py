"""Run by test_sqlite: records arrivals forever, printing each conversion id once acknowledged.

Usage: python durability_writer.py DB_PATH. The test kills it with SIGKILL mid-stream.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from datetime import UTC, datetime
from pathlib import Path

from daemon.log import configure_logging
from daemon.models import Conversion, Status, Transition
from daemon.store.base import ArrivalPlan, PlannedDelivery
from daemon.store.sqlite import SQLiteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def plan(transition: Transition, previous: Status | None, _: Conversion) -> ArrivalPlan:
    return ArrivalPlan({"transition": transition.value}, {}, [PlannedDelivery(1, "ping_url", "h")])


async def main(path: Path) -> None:
    # stdout carries the acknowledged ids alone: the store's lines (store_migrated) go to stderr.
    configure_logging("json", "info", stream=sys.stderr)
    store = SQLiteStore(path)
    await store.open()
    counter = itertools.count()

    async def writer() -> None:
        while True:
            cid = f"c{next(counter)}"
            conv = Conversion.parse(
                {"conversion_id": cid, "offer": "1", "affiliate": "2", "status": "pending"}
            )
            await store.record_arrival("generic", conv, T0, plan)
            # Acknowledged: the COMMIT that holds it has returned.
            sys.stdout.write(cid + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(writer() for _ in range(16)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
