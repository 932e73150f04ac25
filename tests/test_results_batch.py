"""The Recorder writes the results of attempts that end together in one store call (a real
SQLite store): each keeps its row, its number, its log line and its metrics; a lost claim or a
refused row is that attempt's alone; a write that fails is logged unrecorded for each; a write
in flight gathers the next; a caller that stops waiting still has its result written."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from daemon.app import create_app
from daemon.attempts import Recorder
from daemon.decisions import Decision
from daemon.errors import StoreError
from daemon.metrics import Metrics
from daemon.settings import Settings
from daemon.store.base import AttemptRow, Claim, DeliveryState, Finish, FinishResult
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore
from tests.harness import LOOPBACK, Daemon, Sink, wait_for, write_rules
from tests.store.support import LEASE, T0, arrive, at, conversion

NOW = T0.timestamp() + 5


class Counted(SQLiteStore):
    """A real SQLite store that notes each finish call's items, fails them while `failing`, and
    holds them at `gate` when one is set (a slow commit); its results are gathered, as
    PostgreSQL's are (SQLite's own finish_attempts, a real write, does the writing)."""

    batches_results = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[list[str]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def _enter(self, ids: list[str]) -> None:
        self.calls.append(ids)
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise StoreError("sqlite: database or disk is full")

    async def finish_attempt(
        self,
        claim: Claim,
        attempt: AttemptRow,
        state: DeliveryState,
        next_attempt_at: datetime | None,
    ) -> bool:
        await self._enter([claim.delivery_id])
        return await super().finish_attempt(claim, attempt, state, next_attempt_at)

    async def finish_attempts(self, finishes: Sequence[Finish]) -> list[FinishResult]:
        await self._enter([f.claim.delivery_id for f in finishes])
        return await super().finish_attempts(finishes)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = Counted(tmp_path / "r.db")
    await s.open()
    yield s
    await s.close()


async def claims(store: SQLiteStore, n: int) -> list[Claim]:
    for i in range(n):
        await arrive(store, conversion(f"c{i}"), postbacks=(101,))
    found = await store.claim_due("n1", at(1), n, LEASE)
    assert len(found) == n
    # by conversion: deliveries made in one millisecond are claimed in the order of their
    # ids' random part
    return sorted(found, key=lambda claim: claim.conversion_id)


def recorder(store: Any, seen: list[tuple[str, str, float]]) -> Recorder:
    return Recorder(store, "n1", lambda: NOW, lambda *a: seen.append(a))


def finish(rec: Recorder, claim: Claim, outcome: str = "succeeded") -> Any:
    """Recorder.finish for a ping_url that answered 200 (or 503: retry in 60 s)."""
    runtime: Any = SimpleNamespace(rules=SimpleNamespace(version="v1"))
    lp: Any = SimpleNamespace(postback=SimpleNamespace(action=SimpleNamespace(type="ping_url")))
    action: Any = SimpleNamespace(destination="http://127.0.0.1:9")
    request = {"method": "GET", "url": "http://127.0.0.1:9/p?x=1", "headers": {}}
    status = 200 if outcome == "succeeded" else 503
    job: Any = SimpleNamespace(
        record=SimpleNamespace(
            request=SimpleNamespace(as_dict=lambda: request),
            response_status=status,
            response_excerpt="OK",
        )
    )
    if outcome == "succeeded":
        decision = Decision(DeliveryState.SUCCEEDED, "succeeded", None, None, True)
    else:
        decision = Decision(DeliveryState.RETRYING, "retry", "http_503", NOW + 60, False)
    return rec.finish(claim, runtime, lp, action, job, decision, NOW - 1, 0.25)


def attempt_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "delivery_attempt"]


async def states(store: SQLiteStore, found: list[Claim]) -> list[tuple[DeliveryState, int]]:
    out = []
    for claim in found:
        detail = await store.get_delivery(claim.delivery_id)
        assert detail is not None
        out.append((detail.delivery.state, len(detail.attempts)))
    return out


async def test_results_that_end_together_are_one_write(store: Counted) -> None:
    found = await claims(store, 5)
    seen: list[tuple[str, str, float]] = []
    rec = recorder(store, seen)
    with capture_logs() as logs:
        await asyncio.gather(*(finish(rec, c, "retry" if i == 2 else "succeeded")
                               for i, c in enumerate(found)))  # fmt: skip

    assert store.calls == [[c.delivery_id for c in found]]
    assert await states(store, found) == [
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.RETRYING, 1),
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.SUCCEEDED, 1),
    ]
    lines = attempt_lines(logs)
    assert [(e["delivery_id"], e["outcome"], e["attempt"]) for e in lines] == [
        (c.delivery_id, "retry" if i == 2 else "succeeded", 1) for i, c in enumerate(found)
    ]
    assert lines[2]["next_in_s"] == 60.0
    assert all(e["log_level"] == "info" and "recorded" not in e for e in lines)
    assert [s[1] for s in seen] == ["succeeded", "succeeded", "retry", "succeeded", "succeeded"]
    detail = await store.get_delivery(found[2].delivery_id)
    assert detail is not None
    [row] = detail.attempts
    assert (row.outcome, row.reason, row.response_status, row.duration_ms) == (
        "retry",
        "http_503",
        503,
        250,
    )


async def test_a_store_that_does_not_batch_gets_one_finish_attempt_per_result(
    tmp_path: Path,
) -> None:
    store = Counted(tmp_path / "one.db")
    store.batches_results = False
    await store.open()
    try:
        found = await claims(store, 3)
        seen: list[tuple[str, str, float]] = []
        with capture_logs() as logs:
            await asyncio.gather(*(finish(recorder(store, seen), c) for c in found))
        assert store.calls == [[c.delivery_id] for c in found]
        assert [e["outcome"] for e in attempt_lines(logs)] == ["succeeded"] * 3
        assert [s[1] for s in seen] == ["succeeded"] * 3
        assert await states(store, found) == [(DeliveryState.SUCCEEDED, 1)] * 3
    finally:
        await store.close()


def test_which_stores_gather_results() -> None:
    assert PostgresStore("postgresql://127.0.0.1/x").batches_results is True
    assert SQLiteStore(Path("x.db")).batches_results is False
    assert Metrics().observe(Counted(Path("x.db"))).batches_results is True  # seen through


async def test_a_lone_result_is_written_at_once_by_itself(store: Counted) -> None:
    [claim] = await claims(store, 1)
    rec = recorder(store, [])
    await finish(rec, claim)
    assert store.calls == [[claim.delivery_id]]
    assert await states(store, [claim]) == [(DeliveryState.SUCCEEDED, 1)]


async def test_results_that_end_while_a_write_is_in_flight_are_the_next_write(
    store: Counted,
) -> None:
    found = await claims(store, 4)
    store.gate = asyncio.Event()
    rec = recorder(store, [])
    first = asyncio.create_task(finish(rec, found[0]))
    await wait_for(lambda: len(store.calls) == 1)
    rest = [asyncio.create_task(finish(rec, c)) for c in found[1:]]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(store.calls) == 1  # gathered behind the write in flight
    store.gate.set()
    await asyncio.gather(first, *rest)

    assert store.calls == [[found[0].delivery_id], [c.delivery_id for c in found[1:]]]
    assert await states(store, found) == [(DeliveryState.SUCCEEDED, 1)] * 4


async def test_a_lost_claim_is_lease_lost_alone(store: Counted) -> None:
    found = await claims(store, 3)
    assert await store.release(found[1], at(2))
    seen: list[tuple[str, str, float]] = []
    rec = recorder(store, seen)
    with capture_logs() as logs:
        await asyncio.gather(*(finish(rec, c) for c in found))

    assert len(store.calls) == 1
    assert [e["outcome"] for e in attempt_lines(logs)] == ["succeeded", "lease_lost", "succeeded"]
    assert [s[1] for s in seen] == ["succeeded", "lease_lost", "succeeded"]
    assert await states(store, found) == [
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.QUEUED, 0),
        (DeliveryState.SUCCEEDED, 1),
    ]


async def test_a_write_that_fails_is_unrecorded_for_each_and_counted_for_each(
    store: Counted,
) -> None:
    found = await claims(store, 3)
    metrics = Metrics()
    seen: list[tuple[str, str, float]] = []
    rec = recorder(metrics.observe(store), seen)
    store.failing = True
    with capture_logs() as logs:
        await asyncio.gather(*(finish(rec, c) for c in found))

    lines = attempt_lines(logs)
    assert [(e["outcome"], e["recorded"], e["log_level"]) for e in lines] == [
        ("succeeded", False, "warning")
    ] * 3
    assert {e["store_error"] for e in lines} == {"StoreError: sqlite: database or disk is full"}
    assert [s[1] for s in seen] == ["unrecorded"] * 3
    failing = [e for e in logs if e["event"] == "store_failing"]
    assert [e["operation"] for e in failing] == ["finish_attempt"]  # the outage: once
    errors = metrics.store_errors.labels("finish_attempt")._value.get()
    assert errors == 3
    assert "finish_attempt" in metrics.failing_writes()
    assert await states(store, found) == [(DeliveryState.IN_FLIGHT, 0)] * 3  # to their leases

    store.failing = False
    with capture_logs() as logs:
        await asyncio.gather(*(finish(rec, c) for c in found))
    assert [e["event"] for e in logs if e["event"].startswith("store_")] == ["store_recovered"]
    assert metrics.failing_writes() == {}
    assert await states(store, found) == [(DeliveryState.SUCCEEDED, 1)] * 3


async def test_a_row_the_database_refuses_is_unrecorded_alone(store: Counted) -> None:
    found = await claims(store, 3)
    conn = sqlite3.connect(store.path)
    conn.execute(
        "INSERT INTO attempt (delivery_id, n, started_at, duration_ms, outcome, rules_version,"
        " node) VALUES (?, 1, 0, 1, 'succeeded', 'v0', 'n0')",
        (found[0].delivery_id,),
    )
    conn.commit()
    conn.close()
    metrics = Metrics()
    seen: list[tuple[str, str, float]] = []
    rec = recorder(metrics.observe(store), seen)
    with capture_logs() as logs:
        await asyncio.gather(*(finish(rec, c) for c in found))

    lines = attempt_lines(logs)
    assert [e.get("recorded", True) for e in lines] == [False, True, True]
    assert lines[0]["store_error"].startswith("StoreError: sqlite: IntegrityError")
    assert [s[1] for s in seen] == ["unrecorded", "succeeded", "succeeded"]
    assert metrics.store_errors.labels("finish_attempt")._value.get() == 1
    assert await states(store, found) == [
        (DeliveryState.IN_FLIGHT, 1),  # the row put there above; nothing of its own
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.SUCCEEDED, 1),
    ]


async def test_a_caller_that_stops_waiting_still_has_its_result_written(
    store: Counted,
) -> None:
    found = await claims(store, 2)
    store.gate = asyncio.Event()
    rec = recorder(store, [])
    first = asyncio.create_task(finish(rec, found[0]))
    await wait_for(lambda: len(store.calls) == 1)
    second = asyncio.create_task(finish(rec, found[1]))
    await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    store.gate.set()
    await first
    await wait_for(lambda: len(store.calls) == 2 and rec._writing is None)
    assert await states(store, found) == [(DeliveryState.SUCCEEDED, 1)] * 2


async def test_an_impossible_state_fails_its_caller_alone(store: Counted) -> None:
    """A bug (a retry with no next time) raises in its own attempt task, as finish_attempt's
    ValueError did; the results written with it are not lost."""
    found = await claims(store, 3)
    rec = recorder(store, [])
    runtime: Any = SimpleNamespace(rules=SimpleNamespace(version="v1"))
    lp: Any = SimpleNamespace(postback=SimpleNamespace(action=SimpleNamespace(type="ping_url")))
    record = SimpleNamespace(request=None, response_status=503, response_excerpt="")
    job: Any = SimpleNamespace(record=record)
    bad = Decision(DeliveryState.RETRYING, "retry", "http_503", None, False)
    broken = rec.finish(found[1], runtime, lp, SimpleNamespace(destination="d"), job, bad, 1, 0)
    results = await asyncio.gather(
        finish(rec, found[0]), broken, finish(rec, found[2]), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], ValueError)
    assert await states(store, found) == [
        (DeliveryState.SUCCEEDED, 1),
        (DeliveryState.IN_FLIGHT, 0),
        (DeliveryState.SUCCEEDED, 1),
    ]


async def test_graceful_stop_writes_the_gathered_results_before_it_returns(
    tmp_path: Path,
) -> None:
    """The dispatcher's stop waits for its attempts, and each waits for its result's write:
    results gathered behind a write in flight are in the store when stop returns."""
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(text="OK")

    sink = await Sink().start()
    sink.script = [slow] * 5
    store = Counted(tmp_path / "p.db")
    write_rules(
        tmp_path / "rules.d",
        {
            "o.yaml": "offer: 1\npostbacks:\n  - id: 1\n    trigger: conversion_done\n"
            "    affiliate: 7\n    author: {id: 1, name: User 1, affiliate: 7}\n"
            f'    action: {{type: ping_url, url: "{sink.url}/p1?tx={{conversion_id}}"}}\n'
        },
    )
    (tmp_path / "webhooks").mkdir()
    settings = Settings.model_validate(
        {
            "rules_dir": str(tmp_path / "rules.d"),
            "webhooks_dir": str(tmp_path / "webhooks"),
            "outbound": {"allow_cidrs": LOOPBACK, "timeout": 5},
            "config_dir": tmp_path,
        }
    )
    app = create_app(settings, environ={}, store=store, dispatch=False, watch=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    daemon = Daemon(client, tmp_path / "rules.d", settings)
    dispatcher = daemon.services.dispatcher
    try:
        for i in range(5):
            await daemon.post(conversion_id=f"c{i}", offer=1, affiliate=7, status="approved")
        assert await dispatcher.dispatch_once() == 5
        await wait_for(lambda: len(sink.received) == 5)
        store.gate = asyncio.Event()  # the first write of results waits: the rest gather
        recorder = dispatcher._record
        with capture_logs() as logs:
            stopping = asyncio.create_task(dispatcher.stop(30.0))
            gate.set()
            await wait_for(lambda: sum(map(len, store.calls)) + len(recorder._results) == 5)
            store.gate.set()
            await stopping
            rows = await daemon.deliveries()
        assert [(r.state, r.attempts) for r in rows] == [(DeliveryState.SUCCEEDED, 1)] * 5
        assert sorted(len(c) for c in store.calls)[-1] > 1  # some of them written together
        assert sum(len(c) for c in store.calls) == 5
        assert [e["outcome"] for e in attempt_lines(logs)] == ["succeeded"] * 5
    finally:
        await client.close()
        await sink.close()
