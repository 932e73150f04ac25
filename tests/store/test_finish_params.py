"""SQLite's finish parameters: finish_delivery's (?1..?6) and insert_attempt's (?1..?10), each
column in its place."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.store import rows
from daemon.store.base import AttemptRow, Claim, DeliveryState, Finish
from daemon.store.common import to_us
from daemon.store.sqlite import SQLiteStore

CLAIM = Claim(
    delivery_id="d1",
    token="t1",
    postback_id=7,
    destination="http://127.0.0.1:1",
    source="generic",
    conversion_id="c1",
    arrival_seq=1,
    idempotency_key="generic:c1:1:7",
    attempts=0,
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
    data={},
    values={},
)


@pytest.mark.parametrize(
    ("started", "request_", "state", "next_at"),
    [
        (datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC), None, DeliveryState.SUCCEEDED, None),
        (
            datetime(2026, 3, 1, 14, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))),
            {"method": "GET", "url": "http://127.0.0.1:1/x?é=1", "headers": {"A": "b"}},
            DeliveryState.RETRYING,
            datetime(2026, 3, 1, 13, 0, tzinfo=UTC),
        ),
    ],
)
def test_finish_params_are_the_columns_in_their_order(
    tmp_path: Path,
    started: datetime,
    request_: dict[str, object] | None,
    state: DeliveryState,
    next_at: datetime | None,
) -> None:
    attempt = AttemptRow(
        started_at=started,
        duration_ms=1234,
        outcome="succeeded" if next_at is None else "retry",
        reason=None if next_at is None else "http_503",
        rules_version="v1",
        node="n1",
        request=request_,
        response_status=200,
        response_excerpt="OK",
    )
    store = SQLiteStore(tmp_path / "p.db")
    finish, record = store._finish_params(Finish(CLAIM, attempt, state, next_at))
    request = rows.dumps(request_) if request_ is not None else None
    assert record == (
        "d1",
        to_us(started),
        1234,
        attempt.outcome,
        attempt.reason,
        "v1",
        "n1",
        request,
        200,
        "OK",
    )
    end = to_us(started + timedelta(milliseconds=attempt.duration_ms))
    due = to_us(next_at) if next_at is not None else None
    assert finish == ("d1", "t1", state.value, due, attempt.reason, end)
