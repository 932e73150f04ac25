"""What Recorder.finish writes and logs, field by field (a real SQLite store): the attempt row's
every column, the `delivery_attempt` line's keys in their order for a recorded attempt, a lost
lease and a store failure, and the rules version's text kept per version (a reload's new
version is the next attempt's)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.actions.base import RequestRecord
from daemon.attempts import Recorder
from daemon.decisions import Decision
from daemon.errors import StoreError
from daemon.httpstatus import HttpResponse
from daemon.loader import RulesVersion
from daemon.store.base import AttemptRow, Claim, DeliveryState
from daemon.store.sqlite import SQLiteStore
from tests.store.support import T0
from tests.test_results_batch import claims

NOW = T0.timestamp() + 5
SUCCEEDED = Decision(DeliveryState.SUCCEEDED, "succeeded", None, None, True)
RETRY = Decision(DeliveryState.RETRYING, "retry", "http_503", NOW + 60, False)
LINE_KEYS = [
    "conversion_id", "source", "postback_id", "delivery_id", "action", "destination", "attempt",
    "outcome", "reason", "http_status", "duration_ms", "next_in_s", "rules_version", "event",
    "log_level",
]  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SQLiteStore(tmp_path / "r.db")
    await s.open()
    yield s
    await s.close()


def runtime(version: RulesVersion) -> Any:
    return SimpleNamespace(rules=SimpleNamespace(version=version))


async def finish(
    rec: Recorder, claim: Claim, version: RulesVersion, decision: Decision = SUCCEEDED
) -> None:
    lp: Any = SimpleNamespace(postback=SimpleNamespace(action=SimpleNamespace(type="ping_url")))
    action: Any = SimpleNamespace(destination="http://127.0.0.1:9")
    request = RequestRecord("GET", "http://127.0.0.1:9/p?x=1", {"X-A": "b"}, None)
    job: Any = SimpleNamespace(
        record=SimpleNamespace(request=request, response_status=200, response_excerpt="OK")
    )
    await rec.finish(claim, runtime(version), lp, action, job, decision, NOW - 1, 0.2504)


async def stored(store: SQLiteStore, claim: Claim) -> list[AttemptRow]:
    detail = await store.get_delivery(claim.delivery_id)
    assert detail is not None
    return detail.attempts


async def test_the_row_and_the_line_of_a_recorded_attempt(store: SQLiteStore) -> None:
    [first, second] = await claims(store, 2)
    seen: list[tuple[str, str, float]] = []
    rec = Recorder(store, "n1", lambda: NOW, lambda *a: seen.append(a))
    version = RulesVersion("ab" * 32, "cd" * 20, True)
    with capture_logs() as logs:
        await finish(rec, first, version)
        await finish(rec, second, version, RETRY)

    assert await stored(store, first) == [
        AttemptRow(
            started_at=datetime.fromtimestamp(NOW - 1, UTC),
            duration_ms=250,
            outcome="succeeded",
            reason=None,
            rules_version="abababababab+git.cdcdcdcdcdcd-dirty",
            node="n1",
            request={
                "method": "GET",
                "url": "http://127.0.0.1:9/p?x=1",
                "headers": {"X-A": "b"},
                "body": None,
            },
            response_status=200,
            response_excerpt="OK",
        )
    ]
    [retried] = await stored(store, second)
    assert (retried.outcome, retried.reason) == ("retry", "http_503")
    assert [list(e) for e in logs] == [LINE_KEYS, LINE_KEYS]
    assert logs[0] == {
        "conversion_id": "c0",
        "source": "generic",
        "postback_id": 101,
        "delivery_id": first.delivery_id,
        "action": "ping_url",
        "destination": "http://127.0.0.1:9",
        "attempt": 1,
        "outcome": "succeeded",
        "reason": None,
        "http_status": 200,
        "duration_ms": 250,
        "next_in_s": None,
        "rules_version": "abababababab+git.cdcdcdcdcdcd-dirty",
        "event": "delivery_attempt",
        "log_level": "info",
    }
    assert (logs[1]["outcome"], logs[1]["reason"], logs[1]["next_in_s"]) == (
        "retry",
        "http_503",
        60.0,
    )
    assert seen == [("ping_url", "succeeded", 0.2504), ("ping_url", "retry", 0.2504)]


async def test_a_lost_lease_is_said_and_counted_as_lost(store: SQLiteStore) -> None:
    [claim] = await claims(store, 1)
    seen: list[tuple[str, str, float]] = []
    rec = Recorder(store, "n1", lambda: NOW, lambda *a: seen.append(a))
    await finish(rec, claim, RulesVersion("ab" * 32))  # the lease's token is spent now
    with capture_logs() as logs:
        await finish(rec, claim, RulesVersion("ab" * 32))
    assert [list(e) for e in logs] == [LINE_KEYS]
    assert (logs[0]["outcome"], logs[0]["log_level"]) == ("lease_lost", "info")
    assert [s[1] for s in seen] == ["succeeded", "lease_lost"]
    assert len(await stored(store, claim)) == 1


class Failing(SQLiteStore):
    async def finish_attempt(self, *args: Any) -> bool:
        raise StoreError("sqlite: database or disk is full")


async def test_a_store_failure_is_a_warning_with_the_error_last(tmp_path: Path) -> None:
    store = Failing(tmp_path / "f.db")
    await store.open()
    try:
        [claim] = await claims(store, 1)
        seen: list[tuple[str, str, float]] = []
        rec = Recorder(store, "n1", lambda: NOW, lambda *a: seen.append(a))
        with capture_logs() as logs:
            await finish(rec, claim, RulesVersion("ab" * 32), RETRY)
    finally:
        await store.close()
    [line] = logs
    keys = [*LINE_KEYS[:-2], "recorded", "store_error", "event", "log_level"]
    assert list(line) == keys
    assert (line["outcome"], line["log_level"], line["recorded"], line["store_error"]) == (
        "retry",  # what the attempt did; the metric says it went unrecorded
        "warning",
        False,
        "StoreError: sqlite: database or disk is full",
    )
    assert seen == [("ping_url", "unrecorded", 0.2504)]


async def test_a_reloads_new_rules_version_is_the_next_attempts(store: SQLiteStore) -> None:
    found = await claims(store, 3)
    rec = Recorder(store, "n1", lambda: NOW, None)
    old, new = RulesVersion("ab" * 32), RulesVersion("ef" * 32, "12" * 20)
    with capture_logs() as logs:
        await finish(rec, found[0], old)
        await finish(rec, found[1], new)
        await finish(rec, found[2], RulesVersion("ab" * 32))  # equal to the first, new object
    texts = ["abababababab", "efefefefefef+git.121212121212", "abababababab"]
    assert [e["rules_version"] for e in logs] == texts
    assert [(await stored(store, c))[0].rules_version for c in found] == texts


def test_a_response_is_an_immutable_value() -> None:
    response = HttpResponse(200, {"Content-Type": "text/plain; charset=latin-1"}, b"caf\xe9", "u")
    assert (response.status, response.body, response.url) == (200, b"caf\xe9", "u")
    assert response.text() == "café"
    assert response == HttpResponse(200, {"Content-Type": "text/plain; charset=latin-1"},
                                     b"caf\xe9", "u")  # fmt: skip
    with pytest.raises(AttributeError):
        response.status = 500  # type: ignore[misc]
