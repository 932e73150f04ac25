"""A node's own new deliveries leased as the arrival writes them (daemon.store.base.LeaseAhead,
Dispatcher.lease_ahead): sent without a claim, only while nothing older is due, never past the
node's room, a destination's or an affiliate's share, or an open breaker; a lease whose arrival
did not commit frees its room; stopping hands them back. In-process daemons and stores on real
SQLite files, loopback sinks."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from daemon.breaker import BreakerPolicy
from daemon.dispatcher import LEASE_AT_INSERT_MAX, Dispatcher, DispatcherConfig
from daemon.hosts import Destinations
from daemon.models import Conversion, Status, Transition
from daemon.store.base import ArrivalPlan, LeaseAhead, PlannedDelivery
from daemon.store.sqlite import SQLiteStore
from tests.harness import Daemon, Sink, start_daemon, wait_for

A, B = "http://a.test:80", "http://b.test:80"


def rules(sink: Sink) -> dict[str, str]:
    return {
        "o.yaml": f"""
offer: 1
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action: {{type: ping_url, url: "{sink.url}/pb?tx={{conversion_id}}"}}
"""
    }


def rows(daemon: Daemon) -> list[tuple[Any, ...]]:
    path = str(daemon.settings.store).removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT conversion_id, state, lease_owner, lease_token IS NOT NULL, attempts "
            "FROM delivery ORDER BY conversion_id"
        ).fetchall()


async def post(daemon: Daemon, cid: str) -> None:
    got = await daemon.post(conversion_id=cid, offer=1, affiliate=9, status="approved")
    assert got["deliveries"] == 1


async def test_a_new_delivery_is_leased_as_it_is_written_and_sent_without_a_claim(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [held]
    daemon = await start_daemon(tmp_path, rules(sink))
    dispatcher = daemon.services.dispatcher
    try:
        # the dispatcher's first claim found nothing due: new deliveries may be leased
        await wait_for(lambda: dispatcher.lease_ahead() is not None)
        await post(daemon, "c1")
        await wait_for(lambda: sink.received)
        # while it is being sent: in flight, leased to this node, never claimed
        assert rows(daemon) == [("c1", "in_flight", daemon.services.node, 1, 0)]
        assert dispatcher.started == {"claim": 0, "lease_at_insert": 1}
        metrics = await (await daemon.client.get("/metrics")).text()
        assert 'postbackd_deliveries_started_total{via="lease_at_insert"} 1.0' in metrics
        assert 'postbackd_deliveries_started_total{via="claim"} 0.0' in metrics
        gate.set()
        await wait_for(lambda: rows(daemon) == [("c1", "succeeded", None, 0, 1)])
        [delivery] = await daemon.deliveries()
        detail = await daemon.services.store.get_delivery(delivery.delivery_id)
        assert detail is not None
        assert [a.outcome for a in detail.attempts] == ["succeeded"]
        assert sink.received[0].headers["Idempotency-Key"] == "generic:c1:1:1"
        assert dispatcher.started == {"claim": 0, "lease_at_insert": 1}
    finally:
        gate.set()
        await daemon.client.close()
        await sink.close()


async def test_new_deliveries_queue_behind_a_full_claim_and_are_leased_once_it_drains(
    tmp_path: Path,
) -> None:
    sink = await Sink().start()
    daemon = await start_daemon(tmp_path, rules(sink), dispatch=False)
    dispatcher = daemon.services.dispatcher
    batch = dispatcher.config.batch
    try:
        assert dispatcher.lease_ahead() is None  # its loop does not run (dispatch=False)
        dispatcher._running = True  # as while run() runs; the test claims with dispatch_once
        # No claim yet: nothing is known to be drained, so nothing is leased.
        for n in range(batch + 3):
            await post(daemon, f"a{n:03d}")
        assert {r[1] for r in rows(daemon)} == {"queued"}
        assert await dispatcher.dispatch_once() == batch  # a full batch: more may be due
        await post(daemon, "b1")
        assert rows(daemon)[-1] == ("b1", "queued", None, 0, 0)  # behind the three older ones
        await dispatcher.drain()
        assert await dispatcher.dispatch_once() == 4  # the three and b1: drained now
        await dispatcher.drain()
        await post(daemon, "c1")
        await dispatcher.drain()
        assert dispatcher.started == {"claim": batch + 4, "lease_at_insert": 1}
        await wait_for(lambda: len(sink.received) == batch + 5)
        assert sink.received[-1].path_qs == "/pb?tx=c1"
        assert {r[1] for r in rows(daemon)} == {"succeeded"}
    finally:
        await daemon.client.close()
        await sink.close()


def planned(destination: str = A, affiliate: str | None = None) -> PlannedDelivery:
    return PlannedDelivery(1, "ping_url", destination, affiliate)


def bare_dispatcher(
    max_in_flight: int = 4, per_affiliate: int | None = None, *, bound_unsent: bool = False
) -> Dispatcher:
    """A dispatcher on a store that leases at insert, its last claim drained (no claim made);
    `bound_unsent`: the store's lease_bound_unsent (PostgreSQL's)."""

    class Leasing:
        leases_at_insert = True
        lease_bound_unsent = bound_unsent

    dests = Destinations(2, lambda: 0.0, BreakerPolicy(1, 60.0, 2.0, 600.0), per_affiliate)
    dispatcher = Dispatcher(
        store=Leasing(),  # type: ignore[arg-type]  # only asked whether it leases
        runtime=lambda: None,  # type: ignore[arg-type,return-value]
        now=lambda: 0.0,
        config=DispatcherConfig(node="n", max_in_flight=max_in_flight),
        destinations=dests,
    )
    dispatcher._running = dispatcher._drained = True  # as run() leaves it after a claim
    return dispatcher


def offer(dispatcher: Dispatcher) -> LeaseAhead:
    lease = dispatcher.lease_ahead()
    assert lease is not None
    return lease


def test_under_load_new_deliveries_are_left_to_the_claims() -> None:
    """Leased at insert only while, with them, at most LEASE_AT_INSERT_MAX attempts are in
    progress (or max_in_flight, when lower): a busy node claims them a batch at a time."""
    dispatcher = bare_dispatcher(max_in_flight=256)
    lease = offer(dispatcher)
    assert lease.take([planned()] * LEASE_AT_INSERT_MAX)
    assert not offer(dispatcher).take([planned()])
    lease.settle(False)
    assert offer(dispatcher).take([planned()])


@pytest.mark.parametrize("bound_unsent", [False, True], ids=["sqlite", "postgres"])
def test_what_the_room_counts_every_attempt_or_only_those_not_yet_sent(
    bound_unsent: bool,
) -> None:
    """SQLite's room counts every attempt in progress; PostgreSQL's only those not yet sent (in
    line for a slot or sending), not those waiting for their result's round trip."""
    dispatcher = bare_dispatcher(max_in_flight=256, bound_unsent=bound_unsent)
    sent = {object() for _ in range(LEASE_AT_INSERT_MAX)}  # attempts past their send
    dispatcher._tasks.update(sent)  # type: ignore[arg-type]
    lease = offer(dispatcher)
    assert lease.take([planned()]) is bound_unsent
    lease.settle(False)
    dispatcher._tasks.clear()
    # not yet sent (each destination's share counts an attempt until its send ends): counted
    # where the store bounds the unsent (elsewhere the tasks count)
    unsent = dispatcher._per_destination
    ends = [unsent.take(f"http://d{i}.test:80") for i in range(LEASE_AT_INSERT_MAX)]
    lease = offer(dispatcher)
    assert lease.take([planned()]) is not bound_unsent
    lease.settle(False)
    assert dispatcher._ahead == 0
    ends[0]()
    ends[0]()  # a second end (the task's, after the send's) counts nothing
    assert unsent.total == LEASE_AT_INSERT_MAX - 1
    assert offer(dispatcher).take([planned()])


def test_leases_never_pass_the_nodes_room_and_a_lease_that_did_not_commit_frees_it() -> None:
    dispatcher = bare_dispatcher(max_in_flight=4)
    first = offer(dispatcher)
    assert not first.take([planned()] * 5)  # more than the room: none of them
    assert first.reserved == 0
    second = offer(dispatcher)
    assert second.take([planned()] * 3)
    assert second.take([planned()] * 3)  # the transaction run again: the first answer stands
    assert (second.reserved, dispatcher._ahead) == (3, 3)
    third = offer(dispatcher)
    assert not third.take([planned()] * 2)  # 3 kept + 2 > 4
    assert offer(dispatcher).take([planned()])  # 3 + 1
    second.settle(False)  # its arrival did not commit: nothing starts, the room is free
    assert (dispatcher._ahead, dispatcher.in_flight) == (1, 0)
    assert offer(dispatcher).take([planned()] * 3)
    assert not offer(dispatcher).take([])  # an arrival without deliveries leases nothing


def test_nothing_is_leased_to_a_destination_at_its_share_or_down_or_an_affiliate_at_its_share() -> (
    None
):
    dispatcher = bare_dispatcher(max_in_flight=100, per_affiliate=2)
    dests = dispatcher.destinations
    ends = [dispatcher._per_destination.take(A) for _ in range(dests.claim_share)]
    assert not offer(dispatcher).take([planned(B), planned(A)])  # A at its share: not B either
    assert offer(dispatcher).take([planned(B)])
    ends[0]()
    assert offer(dispatcher).take([planned(A)])
    # an affiliate's postbacks at its fair-use share
    aff = [dispatcher._per_affiliate.take("42") for _ in range(2)]
    assert not offer(dispatcher).take([planned(B, "42")])
    assert offer(dispatcher).take([planned(B, "7")])
    aff[0]()
    assert offer(dispatcher).take([planned(B, "42")])
    # a destination whose breaker is open (threshold 1): its deliveries wait queued
    ticket = dests.admit(B)
    dests.record(B, ticket, False)
    assert dests.is_down(B)
    assert not offer(dispatcher).take([planned(B)])


def test_no_offer_unless_running_or_while_a_backlog_is_due_unreleased_or_stopping() -> None:
    dispatcher = bare_dispatcher()
    dispatcher._running = False  # its loop ended (supervisor's backoff) or never started
    assert dispatcher.lease_ahead() is None
    dispatcher._running = True
    dispatcher._drained = False  # the last claim was full
    assert dispatcher.lease_ahead() is None
    dispatcher._drained = True
    dispatcher._unhold.add(A)  # a closed breaker's backlog is still to be made due
    assert dispatcher.lease_ahead() is None
    dispatcher._unhold.clear()
    lease = offer(dispatcher)
    dispatcher._stopping = True
    assert dispatcher.lease_ahead() is None
    assert not lease.take([planned()])  # an offer made before the stop is refused after it

    class NotLeasing:
        leases_at_insert = False

    other = bare_dispatcher()
    other.store = NotLeasing()  # type: ignore[assignment]
    other._leases_at_insert = False
    assert other.lease_ahead() is None


def conversion(cid: str) -> Conversion:
    return Conversion(conversion_id=cid, offer="1", affiliate="9", status=Status.APPROVED)


def plan_two(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
    deliveries = [PlannedDelivery(1, "ping_url", A), PlannedDelivery(2, "ping_url", B, "42")]
    return ArrivalPlan(data={"payout": 1.5, "extra": {"k": "v"}}, values={"tx": conv.conversion_id},
                       deliveries=deliveries if transition is Transition.NEW else [])  # fmt: skip


async def test_a_claim_made_at_insert_is_the_claim_a_claim_would_make(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    settled: list[bool] = []
    lease = LeaseAhead(
        "node-1", timedelta(seconds=300), lambda p: True, lambda lease, ok: settled.append(ok)
    )
    at = datetime(2026, 12, 7, 8, 0, 0, 123456, tzinfo=UTC)
    try:
        result = await store.record_arrival("generic", conversion("c1"), at, plan_two, lease)
        assert settled == [True]
        assert [c.delivery_id for c in lease.claims] == result.delivery_ids
        assert len({c.token for c in lease.claims}) == 2
        # nothing is due until the lease ends; then a claim takes the same deliveries
        assert await store.claim_due("node-2", at, 10, timedelta(seconds=60)) == []
        later = at + timedelta(seconds=301)
        claimed = await store.claim_due("node-2", later, 10, timedelta(seconds=60))
        assert sorted(c._replace(token="") for c in claimed) == sorted(
            c._replace(token="") for c in lease.claims
        )
        # the insert's tokens no longer finish anything, the claim's do
        assert {c.token for c in claimed}.isdisjoint(c.token for c in lease.claims)
        # a duplicate arrival writes no delivery: nothing is taken, nothing reserved
        again = LeaseAhead("node-1", timedelta(seconds=300), lambda p: True, lambda lease, ok: None)
        await store.record_arrival("generic", conversion("c1"), at, plan_two, again)
        assert (again.claims, again.reserved) == ([], 0)
    finally:
        await store.close()


async def test_a_refused_lease_writes_the_deliveries_queued(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    lease = LeaseAhead("node-1", timedelta(seconds=300), lambda p: False, lambda lease, ok: None)
    at = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)
    try:
        await store.record_arrival("generic", conversion("c1"), at, plan_two, lease)
        assert lease.claims == []
        assert len(await store.claim_due("node-2", at, 10, timedelta(seconds=60))) == 2
    finally:
        await store.close()


async def test_deliveries_leased_while_stopping_are_handed_back_due(tmp_path: Path) -> None:
    sink = await Sink().start()
    daemon = await start_daemon(tmp_path, rules(sink), dispatch=False)
    dispatcher = daemon.services.dispatcher
    store = daemon.services.store
    try:
        dispatcher._running = dispatcher._drained = True

        def admit_then_stop(p: Any) -> bool:
            taken = dispatcher._admit(p)
            dispatcher._stopping = True  # the stop comes while the arrival commits
            return taken

        lease = LeaseAhead(dispatcher.config.node, dispatcher._lease, admit_then_stop,
                           dispatcher._adopt)  # fmt: skip
        at = datetime.fromtimestamp(daemon.services.clock.now(), UTC)
        await store.record_arrival("generic", conversion("s1"), at, plan_two, lease)
        assert len(lease.claims) == 2
        await dispatcher.stop(grace=5.0)
        assert [r[1:] for r in rows(daemon)] == [("queued", None, 0, 0)] * 2
        assert sink.received == []
        assert dispatcher.started == {"claim": 0, "lease_at_insert": 0}
    finally:
        await daemon.client.close()
        await sink.close()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_on_postgres_attempts_waiting_for_their_result_leave_the_room_to_new_ones(
    tmp_path: Path,
) -> None:
    """A PostgreSQL node's room counts only attempts not yet sent: while the results of
    LEASE_AT_INSERT_MAX sent attempts wait for their commit (here: held by a lock on the attempt
    table), a new conversion's delivery is still leased at insert; while as many are still
    being sent (a sink that does not answer), it is left to a claim."""
    import asyncpg  # type: ignore[import-untyped]

    from tests.store.conftest import pg_schema

    gate = asyncio.Event()
    gate.set()

    async def gated(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [gated] * 1000
    settings = {"outbound": {"allow_cidrs": ["127.0.0.0/8"], "per_host_concurrency": 32}}
    async with pg_schema() as dsn:
        daemon = await start_daemon(tmp_path, rules(sink), store_url=dsn, settings=settings)
        dispatcher = daemon.services.dispatcher
        locker = await asyncpg.connect(dsn, timeout=10)
        try:
            await wait_for(lambda: dispatcher.lease_ahead() is not None)
            # The results cannot commit: the attempt rows wait for the lock.
            held = locker.transaction()
            await held.start()
            await locker.execute("LOCK TABLE attempt IN EXCLUSIVE MODE")
            for n in range(LEASE_AT_INSERT_MAX):
                await post(daemon, f"s{n:02d}")
            await wait_for(lambda: len(sink.received) == LEASE_AT_INSERT_MAX)
            await wait_for(
                lambda: dispatcher._per_destination.total == 0
            )  # all sent, results pending
            assert dispatcher.in_flight == LEASE_AT_INSERT_MAX
            await post(daemon, "s16")
            assert dispatcher.started == {"claim": 0, "lease_at_insert": LEASE_AT_INSERT_MAX + 1}
            await held.rollback()
            await wait_for(lambda: dispatcher.in_flight == 0)
            # Sends that do not end: these count, and the next delivery waits for a claim.
            gate.clear()
            for n in range(LEASE_AT_INSERT_MAX):
                await post(daemon, f"u{n:02d}")
            await wait_for(lambda: dispatcher._per_destination.total == LEASE_AT_INSERT_MAX)
            await post(daemon, "u16")
            await wait_for(lambda: dispatcher.started["claim"] == 1)
            assert dispatcher.started["lease_at_insert"] == 2 * LEASE_AT_INSERT_MAX + 1
            gate.set()
            await wait_for(lambda: len(sink.received) == 2 * LEASE_AT_INSERT_MAX + 2)
            await wait_for(lambda: dispatcher.in_flight == 0)
            assert dispatcher._per_destination.total == 0
        finally:
            gate.set()
            await locker.close()
            await daemon.client.close()
            await sink.close()


async def sent_leased_at_insert(node: Daemon, sink: Sink) -> None:
    """The one delivery reached the sink, started from a lease at insert (no claim), and is
    recorded as succeeded."""
    dispatcher = node.services.dispatcher
    await wait_for(lambda: len(sink.received) == 1)
    await wait_for(lambda: dispatcher.in_flight == 0)
    assert dispatcher.started == {"claim": 0, "lease_at_insert": 1}
    [delivery] = await node.deliveries()
    assert delivery.state == "succeeded"


async def pending_then_approved(first: Daemon, then: Daemon, cid: str) -> None:
    """`cid` arrives pending at `first` (nothing fires), then approved at `then` (the same node
    or another): a status change with one delivery."""
    pending = await first.post(conversion_id=cid, offer=1, affiliate=9, status="pending")
    assert pending["deliveries"] == 0
    approved = await then.post(conversion_id=cid, offer=1, affiliate=9, status="approved")
    assert (approved["transition"], approved["deliveries"]) == ("status_changed", 1)


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_on_postgres_a_status_change_is_leased_at_insert_and_delivered(
    tmp_path: Path,
) -> None:
    """pending, then approved (the rule fires on approval): the approval's delivery is leased
    as its arrival is written by the locking path, sent without a claim, and recorded."""
    from tests.store.conftest import pg_schema

    sink = await Sink().start()
    async with pg_schema() as dsn:
        daemon = await start_daemon(tmp_path, rules(sink), store_url=dsn)
        dispatcher = daemon.services.dispatcher
        try:
            await wait_for(lambda: dispatcher.lease_ahead() is not None)
            await pending_then_approved(daemon, daemon, "c1")
            await sent_leased_at_insert(daemon, sink)
        finally:
            await daemon.client.close()
            await sink.close()


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_on_postgres_a_status_change_of_a_conversion_stored_elsewhere_is_leased(
    tmp_path: Path,
) -> None:
    """Node B stored the pending conversion; node A receives its approval. A's statement for a
    new conversion takes the lease offer and finds the conversion stored; the locking path then
    asks the offer again (LeaseAhead.reopen) and leases the delivery, sent at once. Before,
    it queued the delivery and nothing woke A's dispatcher: it waited for the next poll (set to
    a minute here, so that a missed wake-up cannot pass for a fast poll)."""
    from tests.store.conftest import pg_schema

    sink = await Sink().start()
    async with pg_schema() as dsn:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        node_a = await start_daemon(tmp_path / "a", rules(sink), store_url=dsn)
        node_b = await start_daemon(tmp_path / "b", rules(sink), store_url=dsn, dispatch=False)
        dispatcher = node_a.services.dispatcher
        try:
            await wait_for(lambda: dispatcher.lease_ahead() is not None)
            dispatcher.config = replace(dispatcher.config, poll_interval=60.0)
            dispatcher.wake()  # its current wait ends; the next one is a minute long
            await asyncio.sleep(0.2)
            await pending_then_approved(node_b, node_a, "c1")
            await sent_leased_at_insert(node_a, sink)
            # the offer taken twice (the statement, then the locking path) kept no room: the
            # whole of it is free again
            room = offer(dispatcher)
            assert room.take([planned()] * LEASE_AT_INSERT_MAX)
            room.settle(False)
        finally:
            await node_a.client.close()
            await node_b.client.close()
            await sink.close()
