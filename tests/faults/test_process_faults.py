"""The process: SIGTERM while attempts are in flight (every answer takes 0.5 s), conversions
flowing. The attempts under way finish and are recorded within the grace, the process exits 0,
and once started again it delivers the rest; nothing is sent twice. (SIGSTOP past the lease,
with a second node, is in test_postgres_faults.py.)"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.faults.support import (
    REPORT_WITHIN,
    FaultSink,
    Node,
    Traffic,
    all_delivered,
    assert_no_unexplained_duplicates,
    assert_resumed,
    client_session,
)
from tests.harness import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_sigterm_with_attempts_in_flight(tmp_path: Path, fault_sink: FaultSink) -> None:
    node = Node(tmp_path / "n0", "sqlite:///../var/postbackd.db", fault_sink)
    fault_sink.delay = 0.5  # every attempt is in flight for half a second
    node.start()
    async with client_session() as session:
        traffic = Traffic(session, [node])
        try:
            await node.ready(session)
            traffic.start(workers=2, pace=0.1)  # below what 8 slots of 0.5 s deliver
            await wait_for(lambda: len(fault_sink.hits) >= 10, deadline=20)
            await wait_for(lambda: len(fault_sink.answering) >= 2, deadline=10)
            node.signal(signal.SIGTERM)
            t0 = time.monotonic()
            in_flight = set(fault_sink.answering)

            async def not_ready() -> bool:
                return not await _ready_now(session, node)

            await wait_for(not_ready, deadline=REPORT_WITHIN)
            assert node.proc is not None
            code = await asyncio.to_thread(node.proc.wait, 30)
            stopped = time.monotonic() - t0
            assert code == 0
            node.start()
            await node.ready(session)
            t1 = time.monotonic()
            await assert_resumed(fault_sink, "process_faults resume", t1)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic)
    assert in_flight <= fault_sink.delivered()  # answered, and (below) never sent again
    assert stopped < 20.0  # inside the dispatcher's grace: nothing was cut off
    assert node.stop() == 0
    node.assert_clean_log()
    assert len(node.events("daemon_stopped")) == 2  # the SIGTERM, and the end of the test
    assert_no_unexplained_duplicates(fault_sink)
    # Every attempt in flight at the stop finished and was recorded as it was, once.
    attempts = node.events("delivery_attempt")
    for key in in_flight:
        cid = key.split(":")[1]
        done = [(e["outcome"], e["attempt"]) for e in attempts if e["conversion_id"] == cid]
        assert done == [("succeeded", 1)], (key, done)
    keys = [h.key for h in fault_sink.hits]
    assert len(keys) == len(set(keys))


async def _ready_now(session: aiohttp.ClientSession, node: Node) -> bool:
    try:
        async with session.get(f"{node.url}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
