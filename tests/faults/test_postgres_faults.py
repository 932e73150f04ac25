"""PostgreSQL faults against real `postbackd run` processes with conversions flowing: the server
stopped for 10 s and started again; its backends killed (pg_terminate_backend) again and again
under load; and a node frozen (SIGSTOP) longer than its lease while a second node on the same
database takes its deliveries over. The server is the suite's own (tests/faults/conftest.py)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.faults.conftest import PgServer
from tests.faults.support import (
    REPORT_WITHIN,
    RESUME_WITHIN,
    FaultSink,
    Node,
    ReadyWatch,
    Traffic,
    all_delivered,
    assert_no_unexplained_duplicates,
    assert_resumed,
    client_session,
    flowing,
    note,
)
from tests.harness import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(150)]

OUTAGE = 10.0  # issue 12: "stopped for 10 s"
LEASE = 4.0  # delivery.lease: longer than the outbound timeout (2 s), as the settings require


async def test_postgres_stopped_for_10_s_then_started(
    tmp_path: Path, pg_server: PgServer, pg_database: str, fault_sink: FaultSink
) -> None:
    # A short lease: an attempt whose result could not be recorded is sent again after it.
    node = Node(tmp_path / "n0", pg_database, fault_sink, lease=LEASE)
    node.start()
    async with client_session() as session:
        watch = ReadyWatch(session, node)
        traffic = Traffic(session, [node])
        try:
            await flowing(session, node, watch, traffic, fault_sink)

            t0 = time.monotonic()
            await asyncio.to_thread(pg_server.stop)
            failing = await watch.reported_not_ready(t0, "postgres_faults report")
            assert "store" in failing
            acked_during = traffic.count()
            await asyncio.sleep(max(0.0, t0 + OUTAGE - time.monotonic()))  # the fault lasts 10 s
            assert traffic.count() == acked_during  # nothing acknowledged without the store
            assert traffic.refused > 0  # ingest answered 503 (trackers retry)

            await asyncio.to_thread(pg_server.start)
            t1 = time.monotonic()
            await assert_resumed(fault_sink, "postgres_faults resume", t1)
            await wait_for(lambda: traffic.count() >= acked_during + 20, deadline=RESUME_WITHIN)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic)
        await watch.stop_once_ready()
    assert node.stop() == 0
    node.assert_clean_log()
    assert [e["loop"] for e in node.events("loop_failing")] == ["dispatcher"]
    assert [e["loop"] for e in node.events("loop_recovered")] == ["dispatcher"]
    assert_no_unexplained_duplicates(fault_sink)


async def test_postgres_backends_killed_again_and_again_under_load(
    tmp_path: Path, pg_server: PgServer, pg_database: str, fault_sink: FaultSink
) -> None:
    # A short lease: an attempt whose result could not be recorded is sent again after it.
    node = Node(tmp_path / "n0", pg_database, fault_sink, lease=LEASE)
    node.start()
    killed = 0
    async with client_session() as session:
        watch = ReadyWatch(session, node)
        traffic = Traffic(session, [node])
        try:
            await flowing(session, node, watch, traffic, fault_sink, workers=4)
            killer = await asyncpg.connect(pg_server.admin_dsn)
            t0 = time.monotonic()
            try:
                while time.monotonic() < t0 + 5.0:  # a kill every 0.25 s for 5 s
                    killed += await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'postbackd'"
                    )
                    await asyncio.sleep(0.25)
            finally:
                await killer.close()
            t1 = time.monotonic()
            await assert_resumed(fault_sink, "postgres_faults resume", t1)
            acked = traffic.count()
            await wait_for(lambda: traffic.count() >= acked + 20, deadline=RESUME_WITHIN)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic)
        reported = watch.first_not_ready(t0)  # watched until now: a late loop failure is seen
        await watch.stop()
    assert killed >= 10
    assert node.stop() == 0
    node.assert_clean_log()
    # The kills were seen. Whether a loop (not just one store call) failed depends on which
    # backend a kill found busy (a connection killed while idle is replaced unseen, and a node
    # that leases its new deliveries at insert claims seldom), so it is not asserted; but a
    # loop that failed was reported by /readyz (it stays failing for its backoff), and every
    # loop that failed recovered. A failed webhook write alone is reported only until the next
    # one works, often milliseconds: /readyz may or may not have caught it.
    assert node.events("store_failing")
    failed = Counter(e["loop"] for e in node.events("loop_failing"))
    recovered = Counter(e["loop"] for e in node.events("loop_recovered"))
    assert set(recovered) == set(failed), (failed, recovered)
    if failed:
        assert reported is not None, failed
    if reported is not None:
        note("postgres_faults report", reported[0])  # from the first kill: for the record
    assert_no_unexplained_duplicates(fault_sink)


async def test_a_node_frozen_past_its_lease_loses_its_claims_to_the_other(
    tmp_path: Path, pg_database: str, fault_sink: FaultSink
) -> None:
    a = Node(tmp_path / "a", pg_database, fault_sink, sender="a", lease=LEASE)
    b = Node(tmp_path / "b", pg_database, fault_sink, sender="b", lease=LEASE)
    a.start()
    b.start()
    async with client_session() as session:
        traffic = Traffic(session, [a, b])
        try:
            await asyncio.gather(a.ready(session), b.ready(session))
            traffic.start()
            await wait_for(lambda: len(fault_sink.hits) >= 20, deadline=20)
            fault_sink.hold("a")  # a's next requests are sent and wait for their answer
            held_at = time.monotonic()
            await wait_for(lambda: _sent(fault_sink, "a", held_at), deadline=10)
            a.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            # From outside, the frozen node does not answer /readyz at all.
            assert not await _answers(session, a, REPORT_WITHIN)
            frozen = _sent(fault_sink, "a", held_at)  # all it wrote has arrived by now
            assert frozen
            # The other node takes them over once the lease has ended.
            await wait_for(lambda: frozen <= _sent(fault_sink, "b", t0), deadline=LEASE + 10)
            fault_sink.release("a")  # the answers wait in a's socket
            a.signal(signal.SIGCONT)
            t1 = time.monotonic()
            await assert_resumed(fault_sink, "postgres_faults resume", t1)
        finally:
            await traffic.stop()
        await all_delivered(fault_sink, traffic)
        await wait_for(lambda: len(_lease_lost(a)) >= len(frozen), deadline=10)
        lost = _lease_lost(a)

    assert a.stop() == 0
    assert b.stop() == 0
    a.assert_clean_log()
    b.assert_clean_log()
    # a recorded nothing for the claims it lost: every attempt of those deliveries is b's.
    conn = await asyncpg.connect(pg_database)
    try:
        rows = await conn.fetch(
            "SELECT d.idempotency_key AS key, a.node, a.outcome FROM attempt a "
            "JOIN delivery d ON d.id = a.delivery_id WHERE d.idempotency_key = ANY($1)",
            sorted(frozen),
        )
    finally:
        await conn.close()
    assert {r["key"] for r in rows} == frozen
    node_a = f"{socket.gethostname()}:{a.port}"
    assert all(r["node"] != node_a for r in rows), rows
    assert all(r["outcome"] == "succeeded" for r in rows)
    assert len(lost) >= len(frozen)
    assert_no_unexplained_duplicates(fault_sink)


def _sent(sink: FaultSink, sender: str, since: float) -> set[str]:
    return {h.key for h in sink.hits if h.sender == sender and h.t >= since}


def _lease_lost(node: Node) -> set[str]:
    return {
        e["delivery_id"] for e in node.events("delivery_attempt") if e["outcome"] == "lease_lost"
    }


async def _answers(session: aiohttp.ClientSession, node: Node, within: float) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=within)
        async with session.get(f"{node.url}/readyz", timeout=timeout) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
