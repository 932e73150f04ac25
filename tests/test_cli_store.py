"""`postbackd deliveries list|show|retry` and `conversions show` on a real SQLite store filled
through the store API."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.models import Conversion, Status, Transition, macro_values, rule_data
from daemon.store.base import (
    ArrivalPlan,
    AttemptRow,
    DeliveryDetail,
    DeliveryState,
    PlannedDelivery,
    Store,
)
from daemon.store.sqlite import SQLiteStore
from tests.test_cli_ops_kit import SOLAR, run

T = TypeVar("T")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def on_store(path: Path, job: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = SQLiteStore(path)
        await store.open()
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(go())


def planner(postbacks: list[int]) -> Any:
    def plan(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
        data = rule_data(
            conv, source="everflow", transition=transition, previous_status=previous, received_at=T0
        )
        deliveries = [
            PlannedDelivery(pid, "ping_url", "https://api.partner-42.example.net:443", "42")
            for pid in postbacks
        ]
        return ArrivalPlan(data, macro_values(data, conv), deliveries)

    return plan


def attempt(outcome: str, reason: str | None, status: int, when: datetime) -> AttemptRow:
    return AttemptRow(
        started_at=when,
        duration_ms=120,
        outcome=outcome,
        reason=reason,
        rules_version="abc123",
        node="node-1",
        request={
            "method": "POST",
            "url": "https://api.partner-42.example.net/conversions",
            "headers": {"X-Api-Key": "****"},
            "body": '{"click_id":"k1"}',
        },
        response_status=status,
        response_excerpt="not found" if status == 404 else "ok",
    )


@dataclass
class Filled:
    config: Path
    db: Path
    rules: Path
    dead: str  # postback 102's delivery of the approval: dead after a 404
    ok: str  # postback 101's delivery of the approval: succeeded
    queued: list[str]  # the rejection's deliveries, never attempted


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "offer-1234.yaml").write_text(SOLAR)
    config = tmp_path / "postbackd.yaml"
    config.write_text(f"store: sqlite:///store.db\nrules_dir: {rules}\n")
    db = tmp_path / "store.db"

    async def fill(store: Store) -> tuple[str, str, list[str]]:
        conv = Conversion.parse(
            {"conversion_id": "cv-1", "offer": "1234", "affiliate": "42", "status": "pending",
             "click_id": "k1", "email": "lead@example.com"}
        )  # fmt: skip
        await store.record_arrival("everflow", conv, T0, planner([]))
        approved = Conversion.parse({**conv.canonical(), "status": "approved", "payout": "7"})
        first = await store.record_arrival("everflow", approved, T0 + timedelta(minutes=1),
                                           planner([101, 102]))  # fmt: skip
        for claim in await store.claim_due("node-1", T0 + timedelta(minutes=2), 10, LEASE):
            if claim.postback_id == 102:
                row = attempt("dead", "http_404", 404, T0 + timedelta(minutes=2))
                await store.finish_attempt(claim, row, DeliveryState.DEAD, None)
            else:
                row = attempt("succeeded", None, 200, T0 + timedelta(minutes=2))
                await store.finish_attempt(claim, row, DeliveryState.SUCCEEDED, None)
        rejected = Conversion.parse({**conv.canonical(), "status": "rejected"})
        later = await store.record_arrival("everflow", rejected, T0 + timedelta(minutes=3),
                                           planner([103]))  # fmt: skip
        by_pid = dict(zip([101, 102], first.delivery_ids, strict=True))
        return by_pid[102], by_pid[101], later.delivery_ids

    dead, ok, queued = on_store(db, fill)
    return Filled(config, db, rules, dead, ok, queued)


def cli(filled: Filled, *args: str) -> Any:
    return run(*args, "-c", str(filled.config))


def detail(filled: Filled, delivery_id: str) -> DeliveryDetail:
    found = on_store(filled.db, lambda store: store.get_delivery(delivery_id))
    assert found is not None
    return found


def test_list_shows_newest_first(filled: Filled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one line per delivery (tests/cli: the wrapping)
    result = cli(filled, "deliveries", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "ID", "Created At", "Offer", "Affiliate", "Trigger", "Postback", "Action", "Conversion",
        "State",
    ]  # fmt: skip
    states = [re.split(r"\s{2,}", line)[2:9] for line in lines[1:]]
    assert states[0] == [
        "1234", "42", "Conversion Reject", "103", "Ping Url", "everflow:cv-1", "Queued",
    ]  # fmt: skip
    assert sorted(s[3] + ":" + s[6] for s in states[1:]) == [
        "101:Succeeded (1 attempt)", "102:Dead (1 attempt, http_404)",
    ]  # fmt: skip


def test_list_filters_and_json(filled: Filled) -> None:
    dead = json.loads(cli(filled, "deliveries", "list", "--state", "dead", "--format", "json").out)
    assert [(d["delivery_id"], d["postback_id"], d["last_reason"]) for d in dead] == [
        (filled.dead, 102, "http_404")
    ]
    by_postback = json.loads(
        cli(filled, "deliveries", "list", "--postback", "101", "--format", "json").out
    )
    assert [d["delivery_id"] for d in by_postback] == [filled.ok]
    by_conversion = cli(filled, "deliveries", "list", "--conversion", "nope")
    assert by_conversion.out == "no deliveries\n"
    limited = cli(filled, "deliveries", "list", "--limit", "1")
    assert limited.out.splitlines()[-1] == "(first 1; more with --limit or a narrower slice)"


def test_show_prints_every_attempt(filled: Filled) -> None:
    result = cli(filled, "deliveries", "show", filled.dead)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"delivery {filled.dead}: postback 102 (ping_url to "
        "https://api.partner-42.example.net:443)",
        "  conversion everflow:cv-1, arrival 2",
        "  state dead after 1 attempt(s); last reason http_404; next attempt -",
        "  created 2026-03-01T12:01:00Z, updated 2026-03-01T12:02:00Z",
        "  idempotency key everflow:cv-1:2:102",
        "attempt 1 at 2026-03-01T12:02:00Z (120 ms, node node-1, rules abc123): dead (http_404)",
        "  > POST https://api.partner-42.example.net/conversions",
        "  > X-Api-Key: ****",
        '  > body: {"click_id":"k1"}',
        "  < HTTP 404 not found",
    ]
    as_json = json.loads(cli(filled, "deliveries", "show", filled.dead, "--format", "json").out)
    assert as_json["attempts"][0]["response_status"] == 404
    unknown = cli(filled, "deliveries", "show", "nope")
    assert (unknown.code, unknown.err) == (1, "postbackd: error: unknown delivery nope\n")


def test_retry_one_makes_it_due_now(filled: Filled) -> None:
    before = datetime.now(UTC)
    result = cli(filled, "deliveries", "retry", filled.dead)
    assert result.code == 0, result.err
    assert (
        result.out == f"delivery {filled.dead} queued again; the daemon sends it within seconds\n"
    )
    row = detail(filled, filled.dead).delivery
    assert row.state is DeliveryState.QUEUED
    assert row.next_attempt_at is not None
    assert before - timedelta(seconds=1) <= row.next_attempt_at <= datetime.now(UTC)


def test_retry_refuses_what_is_not_dead_or_cancelled(filled: Filled) -> None:
    result = cli(filled, "deliveries", "retry", filled.ok)
    assert result.code == 1
    assert result.err == (
        f"postbackd: error: delivery {filled.ok} is succeeded: only dead or cancelled "
        "deliveries can be retried\n"
    )
    assert detail(filled, filled.ok).delivery.state is DeliveryState.SUCCEEDED
    unknown = cli(filled, "deliveries", "retry", "nope")
    assert unknown.err == "postbackd: error: unknown delivery nope\n"


def test_bulk_retry_by_state_and_postback(filled: Filled) -> None:
    none = cli(filled, "deliveries", "retry", "--state", "dead", "--postback", "101")
    assert none.out == "0 dead deliveries of postback 101 queued again\n"
    old = cli(filled, "deliveries", "retry", "--state", "dead", "--postback", "102",
              "--since", "2027-01-01T00:00:00Z")  # fmt: skip
    assert old.out == "0 dead deliveries of postback 102 queued again\n"
    result = cli(filled, "deliveries", "retry", "--state", "dead", "--postback", "102",
                 "--since", "2026-03-01T12:00:00Z")  # fmt: skip
    assert result.out == "1 dead deliveries of postback 102 queued again\n"
    assert detail(filled, filled.dead).delivery.state is DeliveryState.QUEUED


def test_retry_warns_when_the_postback_is_disabled(filled: Filled) -> None:
    text = SOLAR.replace("goal: sale\n    when", "goal: sale\n    status: disabled\n    when")
    (filled.rules / "offer-1234.yaml").write_text(
        text.replace(
            "    status: active\n    created_at: 2026-11-02T09:30",
            "    created_at: 2026-11-02T09:30",
        )
    )
    result = cli(filled, "deliveries", "retry", filled.dead)
    assert result.code == 0
    assert result.err == (
        f"warning: postback 102 is disabled in {filled.rules}: the daemon will cancel the "
        "delivery again\n"
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["deliveries", "retry"], 2, "postbackd deliveries retry: error: give a delivery ID, or "
         "--state dead|cancelled with --postback N (see postbackd deliveries retry --help)"),
        (["deliveries", "retry", "x", "--postback", "1"], 2, "postbackd deliveries retry: error: "
         "give a delivery ID or --state/--postback/--since, not both "
         "(see postbackd deliveries retry --help)"),
        (["deliveries", "list", "--state", "lost"], 2, "postbackd deliveries list: error: "
         "Invalid value for '--state': 'lost' is not one of 'queued', 'in_flight', 'retrying', "
         "'succeeded', 'dead', 'cancelled'. (see postbackd deliveries list --help)"),
        (["deliveries", "list", "--since", "last week"], 2, "postbackd deliveries list: error: "
         "Invalid value for --since: 'last week' is not a time (2026-11-01T10:00:00Z) or a "
         "duration ago (2h, 1d) (see postbackd deliveries list --help)"),
        (["conversions", "show", "everflow", "nope"], 1,
         "postbackd: error: unknown conversion nope from source everflow"),
    ],
)  # fmt: skip
def test_errors_are_one_line(filled: Filled, args: list[str], code: int, message: str) -> None:
    result = cli(filled, *args)
    assert (result.code, result.err) == (code, message + "\n")


def test_no_store_file_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    config = tmp_path / "postbackd.yaml"
    config.write_text("store: sqlite:///missing.db\n")
    result = run("deliveries", "list", "-c", str(config))
    assert result.code == 1
    assert result.err == (
        f"postbackd: error: no store at {tmp_path / 'missing.db'} (is -c the daemon's settings?)\n"
    )
    assert not (tmp_path / "missing.db").exists()


def test_conversion_show(filled: Filled) -> None:
    result = cli(filled, "conversions", "show", "everflow", "cv-1")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "conversion everflow:cv-1: rejected (last arrival status_changed)"
    assert "  email: ***" in lines  # personal data masked unless --show-pii
    arrivals = [re.split(r"\s{2,}", line) for line in lines if re.match(r"^[123]  ", line)]
    assert [a[:3] for a in arrivals] == [
        ["1", "new", "pending"],
        ["2", "status_changed", "approved"],
        ["3", "status_changed", "rejected"],
    ]
    assert sum(filled.dead in line for line in lines) == 1


def test_conversion_show_as_a_diff_sample(filled: Filled) -> None:
    masked = cli(filled, "conversions", "show", "everflow", "cv-1", "--format", "sample").out
    assert json.loads(masked)["email"] == "***"
    out = cli(
        filled, "conversions", "show", "everflow", "cv-1", "--format", "sample", "--show-pii"
    ).out
    assert json.loads(out) == {
        "conversion_id": "cv-1",
        "offer": "1234",
        "affiliate": "42",
        "status": "rejected",
        "click_id": "k1",
        "email": "lead@example.com",
        "payout": "7",
        "source": "everflow",
        "previous_status": "approved",
    }
    as_json = json.loads(
        cli(filled, "conversions", "show", "everflow", "cv-1", "--format", "json").out
    )
    assert [a["transition"] for a in as_json["arrivals"]] == [
        "new",
        "status_changed",
        "status_changed",
    ]
    assert len(as_json["deliveries"]) == 3
