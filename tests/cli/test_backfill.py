"""Resend, replay and backfill (issue 18) through the real `postbackd` command, on a real
SQLite store filled by the same matching as ingest and a temporary git repository of rules.

The must-show: 1,000 stored conversions, a postback added, `backfill --dry-run` lists exactly
the deliveries `backfill` then makes, and a second `backfill` makes none. (Live ingest latency
during a backfill is a `make bench` figure: bench/backfill.py.)"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.backfill import planned_of
from daemon.loader import RuleSet, load_rules
from daemon.matching import match
from daemon.models import Conversion, Status, Transition, arrival_view
from daemon.store.base import (
    ArrivalPlan,
    DeliveryFilter,
    DeliveryRow,
    DeliveryState,
    Planner,
    Store,
)
from tests.store.support import attempt
from tests.test_cli_ops_kit import make_repo, run
from tests.test_cli_store import on_store

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)

OFFER = """\
offer: 1234
postbacks:
  - id: 101
    trigger: conversion_done
    affiliate: "*"
    created_at: 2026-11-01T10:00:00Z
    author: {id: 7, name: Jane Doe}
    action: {type: ping_url, url: "https://tracker.example.com/pb?c={click_id}"}
"""
NEW_POSTBACK = [
    "rules", "add", "--offer", "1234", "--trigger", "conversion_done", "--affiliate", "42",
    "--when", '{">=": [{"var": "payout"}, 5]}', "--author", "7:Jane Doe",
    "--url", "https://api.partner-42.example.net/pb?c={click_id}&p={payout}",
]  # fmt: skip


def planner(rules: RuleSet, source: str, received: datetime) -> Planner:
    """What ingest's planner does (daemon.ingest.make_planner), on a rule set."""
    planned = planned_of(rules)

    def plan(transition: Transition, previous: Status | None, conv: Conversion) -> ArrivalPlan:
        data, values = arrival_view(
            conv, source=source, transition=transition, previous_status=previous,
            received_at=received,
        )  # fmt: skip
        if transition not in (Transition.NEW, Transition.STATUS_CHANGED):
            return ArrivalPlan(data, values, [])
        return ArrivalPlan(data, values, [planned(lp) for lp in match(rules, conv, data)])

    return plan


def fill(db: Path, rules: RuleSet, count: int) -> None:
    """`count` approved conversions, one a minute from T0: affiliates 42 and 77 in turn,
    payouts 0..9 (so postback 102, for affiliate 42 at payout >= 5, fires for a quarter)."""

    async def job(store: Store) -> None:
        for i in range(count):
            received = T0 + timedelta(minutes=i)
            conv = Conversion.parse(
                {
                    "conversion_id": f"c{i:04d}",
                    "offer": "1234",
                    "affiliate": "42" if i % 2 == 0 else "77",
                    "status": "approved",
                    "payout": str((i // 2) % 10),
                    "click_id": f"k{i}",
                    "email": f"user{i}@example.com",
                }
            )
            await store.record_arrival(
                "everflow", conv, received, planner(rules, "everflow", received)
            )

    on_store(db, job)


def deliveries_of(db: Path, postback: int) -> list[DeliveryRow]:
    async def job(store: Store) -> list[DeliveryRow]:
        rows, _ = await store.list_deliveries(DeliveryFilter(postback_ids=[postback]), 10_000, None)
        return rows

    return on_store(db, job)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    rules = make_repo(tmp_path / "repo", {"offer-1234.yaml": OFFER})
    db = tmp_path / "store.db"
    config = tmp_path / "postbackd.yaml"
    config.write_text(f"store: sqlite:///{db}\nrules_dir: {rules}\n")
    return rules, db, config


def test_backfill_dry_run_lists_exactly_what_backfill_makes_and_a_second_makes_none(
    setup: tuple[Path, Path, Path],
) -> None:
    rules, db, config = setup
    fill(db, load_rules(rules, git=False), 1000)
    assert len(deliveries_of(db, 101)) == 1000
    added = run(*NEW_POSTBACK, "--rules", str(rules))
    assert added.code == 0, added.err
    assert "added postback 102" in added.out
    since = (T0 - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    args = [
        "backfill",
        "--postback",
        "102",
        "--since",
        since,
        "-c",
        str(config),
        "--rate",
        "100000",
    ]
    dry = run(*args, "--dry-run")
    assert dry.code == 0, dry.err
    would = re.findall(r"^  would queue (\S+)$", dry.out, re.MULTILINE)
    assert len(would) == 250  # affiliate 42 (half) with payout 5..9 (half of those)
    assert dry.out.splitlines()[-1] == (
        "dry run: 250 deliveries would be queued (1000 arrivals read, 0 already had one); "
        "nothing written"
    )
    assert deliveries_of(db, 102) == []
    done = run(*args)
    assert done.code == 0, done.err
    made = deliveries_of(db, 102)
    assert sorted(d.idempotency_key for d in made) == sorted(would)
    assert {d.state for d in made} == {DeliveryState.QUEUED}
    assert re.findall(r"^  queue (\S+)$", done.out, re.MULTILINE) == would
    assert done.out.splitlines()[-1].startswith("250 deliveries queued (1000 arrivals read")
    again = run(*args)
    assert again.code == 0, again.err
    assert again.out.splitlines()[-1].startswith(
        "0 deliveries queued (1000 arrivals read, 250 already had one"
    )
    assert len(deliveries_of(db, 102)) == 250
    assert len(deliveries_of(db, 101)) == 1000  # the old postback is never sent again
    # A range that ends before the conversions: nothing.
    early = run(
        "backfill", "--postback", "102", "--since", "30d", "--until", since, "-c", str(config)
    )
    assert early.out.splitlines()[-1].startswith("0 deliveries queued (0 arrivals read")


def test_backfill_refuses_unknown_or_disabled_postbacks_and_bad_ranges(
    setup: tuple[Path, Path, Path],
) -> None:
    rules, db, config = setup
    fill(db, load_rules(rules, git=False), 3)
    r = run("backfill", "--postback", "999", "--since", "1d", "-c", str(config))
    assert r.code == 1
    assert r.err == "postbackd: error: no postback with id 999 in the rules\n"
    run("rules", "disable", "101", "--rules", str(rules))
    r = run("backfill", "--postback", "101", "--since", "1d", "-c", str(config))
    assert r.code == 1
    assert "postback 101 is disabled: enable it first" in r.err
    for since, until in (("nonsense", None), ("1d", "2d"), ("\x00", None), ("9" * 400, None)):
        extra = ["--until", until] if until else []
        r = run("backfill", "--postback", "101", "--since", since, *extra, "-c", str(config))
        assert r.code == 2, (since, until, r.err)
        assert "Traceback" not in r.err


def test_resend_makes_a_new_delivery_with_its_own_key(setup: tuple[Path, Path, Path]) -> None:
    rules, db, config = setup
    fill(db, load_rules(rules, git=False), 1)
    [first] = deliveries_of(db, 101)
    refused = run("deliveries", "resend", first.delivery_id, "-c", str(config))
    assert refused.code == 1
    assert "is queued: only a succeeded delivery can be resent" in refused.err

    async def succeed(store: Store) -> None:
        [claim] = await store.claim_due("n1", datetime.now(UTC), 1, timedelta(seconds=30))
        await store.finish_attempt(claim, attempt(datetime.now(UTC)), DeliveryState.SUCCEEDED, None)

    on_store(db, succeed)
    r = run("deliveries", "resend", first.delivery_id, "-c", str(config))
    assert r.code == 0, r.err
    new_id = re.search(r"^delivery (\S+) queued: a resend of", r.out)
    assert new_id is not None
    assert (
        f"a resend of {first.delivery_id} (postback 101, idempotency key everflow:c0000:2:101)"
        in r.out
    )
    assert on_store(db, lambda store: store.resend_of(new_id.group(1))) == first.delivery_id
    assert run("deliveries", "resend", "nope", "-c", str(config)).code == 1


def test_replay_queues_what_the_current_rules_add_to_the_latest_arrival(
    setup: tuple[Path, Path, Path],
) -> None:
    rules, db, config = setup
    fill(db, load_rules(rules, git=False), 3)
    nothing = run("conversions", "replay", "everflow", "c0002", "-c", str(config))
    assert nothing.code == 0, nothing.err
    assert nothing.out.splitlines()[-1].startswith(
        "0 deliveries queued (1 arrivals read, 1 already"
    )
    plain = [a for a in NEW_POSTBACK if a not in ("--when", '{">=": [{"var": "payout"}, 5]}')]
    assert run(*plain, "--rules", str(rules)).code == 0  # postback 102: affiliate 42, always
    dry = run("conversions", "replay", "everflow", "c0002", "-c", str(config), "--dry-run")
    assert dry.out.splitlines() == [
        f"conversion everflow:c0002, arrival 1 (new, received "
        f"{(T0 + timedelta(minutes=2)).strftime('%Y-%m-%dT%H:%M:%SZ')})",
        "  would queue everflow:c0002:1:102",
        "dry run: 1 deliveries would be queued (1 arrivals read, 1 already had one); "
        "nothing written",
    ]
    done = run("conversions", "replay", "everflow", "c0002", "-c", str(config))
    assert done.code == 0, done.err
    assert [d.idempotency_key for d in deliveries_of(db, 102)] == ["everflow:c0002:1:102"]
    again = run("conversions", "replay", "everflow", "c0002", "-c", str(config))
    assert again.out.splitlines()[-1].startswith("0 deliveries queued (1 arrivals read, 2 already")
    other = run("conversions", "replay", "everflow", "c0001", "-c", str(config))  # affiliate 77
    assert other.out.splitlines()[-1].startswith("0 deliveries queued (1 arrivals read, 1 already")
    missing = run("conversions", "replay", "everflow", "nope", "-c", str(config))
    assert missing.code == 1
    assert "no arrival of conversion nope from source everflow" in missing.err
