"""The log, sliced (issue 18): `deliveries list` and `conversions list` filters, columns and
formats, the API's delivery object in the CLI's JSON, personal data masked unless --show-pii,
and tables that fit the terminal. Through the real `postbackd` command on a real SQLite store."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from daemon.api_views import attempt_view, delivery_view
from daemon.cli.log import DELIVERY_COLUMNS
from daemon.loader import load_rules
from daemon.store.base import AttemptRow, DeliveryState, Store
from tests.cli.test_backfill import T0, deliveries_of, fill, on_store
from tests.test_cli_ops_kit import make_repo, run

RULES = """\
offer: 1234
postbacks:
  - id: 101
    trigger: conversion_done
    affiliate: "*"
    created_at: 2026-11-01T10:00:00Z
    author: {id: 7, name: Jane Doe}
    action: {type: ping_url, url: "https://tracker.example.com/pb?c={click_id}&e={email}"}
  - id: 102
    trigger: conversion_done
    affiliate: 42
    when: {">=": [{"var": "payout"}, 5]}
    created_at: 2026-11-01T10:00:00Z
    author: {id: 7, name: Jane Doe}
    action: {type: ping_url, url: "https://partner.example.net/pb?c={click_id}"}
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "300")
    rules = make_repo(tmp_path / "repo", {"offer-1234.yaml": RULES})
    db = tmp_path / "store.db"
    fill(db, load_rules(rules, git=False), 20)  # c0000..c0019, a minute apart from T0
    path = tmp_path / "postbackd.yaml"
    path.write_text(f"store: sqlite:///{db}\nrules_dir: {rules}\n")
    return path


def _json(*args: str) -> list[dict[str, object]]:
    result = run(*args, "--format", "json")
    assert result.code == 0, result.err
    found: list[dict[str, object]] = json.loads(result.out)
    return found


def test_deliveries_list_slices_and_shows_offer_affiliate_and_trigger(config: Path) -> None:
    c = ["-c", str(config)]
    every = _json("deliveries", "list", *c, "--limit", "1000")
    assert len(every) == 20 + 5  # 101 for all; 102 for affiliate 42 at payout >= 5
    assert {(d["offer"], d["trigger"]) for d in every} == {("1234", "conversion_done")}
    assert len(_json("deliveries", "list", *c, "--affiliate", "42")) == 10 + 5
    assert len(_json("deliveries", "list", *c, "--affiliate", "77", "--postback", "102")) == 0
    assert len(_json("deliveries", "list", *c, "--postback", "102", "--offer", "1234")) == 5
    assert len(_json("deliveries", "list", *c, "--offer", "999")) == 0
    assert len(_json("deliveries", "list", *c, "--trigger", "conversion_reject")) == 0
    assert len(_json("deliveries", "list", *c, "--action", "ping_url", "--state", "queued")) == 25
    assert len(_json("deliveries", "list", *c, "--state", "dead")) == 0
    # Created-at range: the conversions arrived a minute apart from T0, two days ago.
    assert len(_json("deliveries", "list", *c, "--since", "3d", "--limit", "1000")) == 25
    assert len(_json("deliveries", "list", *c, "--until", "3d")) == 0
    start, end = (T0 + timedelta(minutes=m) for m in (10, 12))
    window = _json(
        "deliveries", "list", *c, "--since", start.isoformat(), "--until", end.isoformat()
    )
    assert sorted((d["conversion_id"], d["postback_id"]) for d in window) == [
        ("c0010", 101), ("c0010", 102), ("c0011", 101),
    ]  # fmt: skip
    as_csv = run("deliveries", "list", *c, "--postback", "102", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert len(rows) == 5
    assert {r["affiliate"] for r in rows} == {"42"}
    assert {r["trigger"] for r in rows} == {"conversion_done"}


def test_a_delivery_is_the_same_object_in_the_cli_and_the_api(config: Path) -> None:
    db = Path(config.read_text().split("sqlite:///")[1].split("\n")[0])
    rows = {r.delivery_id: r for r in deliveries_of(db, 101)}
    listed = _json("deliveries", "list", "-c", str(config), "--postback", "101", "--show-pii")
    for item in listed:
        row = rows[str(item["delivery_id"])]
        extra = {k: item.pop(k) for k in ("offer", "affiliate", "trigger")}
        assert item == delivery_view(row)
        assert extra == {
            "offer": "1234",
            "affiliate": "42" if row.conversion_id[-1] in "02468" else "77",
            "trigger": "conversion_done",
        }
    one = next(iter(rows))
    shown = run("deliveries", "show", one, "-c", str(config), "--format", "json", "--show-pii")
    detail = on_store(db, lambda store: store.get_delivery(one))
    assert detail is not None
    api = delivery_view(detail.delivery)
    api["attempts"] = [attempt_view(a) for a in detail.attempts]
    assert json.loads(shown.out) == {**api, "resend_of": None}


def test_conversions_list_masks_personal_data_unless_show_pii(config: Path) -> None:
    c = ["-c", str(config)]
    listed = _json("conversions", "list", *c, "--affiliate", "42", "--limit", "3")
    assert [x["conversion_id"] for x in listed] == ["c0018", "c0016", "c0014"]
    assert listed[0]["fields"]["email"] == "***"  # type: ignore[index]
    assert "example.com" not in json.dumps(listed)
    shown = _json("conversions", "list", *c, "--affiliate", "42", "--limit", "1", "--show-pii")
    assert shown[0]["fields"]["email"] == "user18@example.com"  # type: ignore[index]
    assert len(_json("conversions", "list", *c, "--postback", "102", "--limit", "100")) == 5
    assert len(_json("conversions", "list", *c, "--trigger", "conversion_done")) == 20
    assert len(_json("conversions", "list", *c, "--status", "pending")) == 0
    table = run("conversions", "list", *c, "--offer", "1234", "--limit", "2")
    assert table.out.splitlines()[0].split() == [
        "Conversion", "Offer", "Affiliate", "Status", "Payout", "Deliveries", "Created", "At",
        "Updated", "At",
    ]  # fmt: skip
    assert "Approved" in table.out
    assert table.out.splitlines()[-1] == "(first 2; more with --limit or a narrower slice)"
    as_csv = run("conversions", "list", *c, "--limit", "1", "--format", "csv").out
    assert "example.com" not in as_csv
    # Delivery requests in `deliveries show` too.
    db = Path(config.read_text().split("sqlite:///")[1].split("\n")[0])
    assert T0 + timedelta(seconds=1) > T0
    assert db.exists()


def test_tables_fit_the_terminal_and_use_the_products_labels(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "110")
    out = run("deliveries", "list", "-c", str(config), "--limit", "3").out
    assert max(len(line) for line in out.splitlines()) <= 110
    header_words = {w for h in DELIVERY_COLUMNS for w in h.split()}
    first = out.splitlines()[0].split()
    assert first[:2] == ["ID", "Created"]
    assert first[-1] == "State"
    assert set(first) <= header_words  # headers whole (a long one may take two lines)
    rows = [line for line in out.splitlines()[1:] if line[:1] not in (" ", "(")]
    assert [len(line.split()[0]) for line in rows] == [32, 32, 32]  # ids whole
    monkeypatch.setenv("COLUMNS", "200")
    wide = run("deliveries", "list", "-c", str(config), "--limit", "3").out
    assert len(wide.splitlines()) == 1 + 3 + 1  # no wrapping needed: one line each
    assert "Queued" in wide
    assert "Conversion Done  101       Ping Url" in wide
    assert "conversion_done" not in wide
    monkeypatch.setenv("COLUMNS", "84")  # narrower than the headers: words break, ids stay
    narrow = run("deliveries", "list", "-c", str(config), "--limit", "3").out
    assert max(len(line) for line in narrow.splitlines()) <= 84


@pytest.mark.parametrize(
    "args",
    [
        ["--offer", "a\x00b"],
        ["--affiliate", "x" * 2000],
        ["--since", "yesterday-ish"],
        ["--since", "1h", "--until", "2h"],
        ["--limit", "0"],
        ["--postback", "one"],
        ["--state", "exploded"],
        ["--format", "xml"],
    ],
)
def test_hostile_slices_are_usage_errors(config: Path, args: list[str]) -> None:
    for command in (["deliveries", "list"], ["conversions", "list"]):
        r = run(*command, "-c", str(config), *args)
        assert r.code == 2, (command, args, r.out, r.err)
        assert "Traceback" not in r.err
        assert len(r.err.splitlines()) == 1


def test_personal_data_is_masked_in_requests_unless_show_pii(config: Path, tmp_path: Path) -> None:
    db = Path(config.read_text().split("sqlite:///")[1].split("\n")[0])

    async def attempt_with_pii(store: Store) -> str:
        [claim] = await store.claim_due("n1", datetime.now(UTC), 1, timedelta(seconds=30))
        conv = await store.get_conversion(claim.source, claim.conversion_id)
        assert conv is not None
        email = conv.fields["email"]
        record = AttemptRow(
            started_at=datetime.now(UTC),
            duration_ms=5,
            outcome="succeeded",
            reason=None,
            rules_version="v",
            node="n1",
            request={
                "method": "GET",
                "url": f"https://tracker.example.com/pb?c=k1&e={quote(email, safe='')}",
                "headers": {},
                "body": f'{{"contact": "{email}", "ip": "198.51.100.7"}}',
            },
            response_status=200,
            response_excerpt=f"ok {email}",
        )
        await store.finish_attempt(claim, record, DeliveryState.SUCCEEDED, None)
        return claim.delivery_id

    delivery = on_store(db, attempt_with_pii)
    masked = run("deliveries", "show", delivery, "-c", str(config))
    assert masked.code == 0, masked.err
    assert "example.com/pb?c=k1&e=***" in masked.out
    assert '"contact": "***", "ip": "***"' in masked.out
    assert "@example.com" not in masked.out.replace("tracker.example.com", "")
    shown = run("deliveries", "show", delivery, "-c", str(config), "--show-pii")
    assert "%40example.com" in shown.out
    assert "198.51.100.7" in shown.out
    as_json = run("deliveries", "show", delivery, "-c", str(config), "--format", "json").out
    assert "user" not in json.loads(as_json)["attempts"][0]["response_excerpt"]
    # explain: the conversion's own values, wherever the rule puts them.
    sample = tmp_path / "conv.json"
    sample.write_text(
        json.dumps(
            {"conversion_id": "x1", "offer": "1234", "affiliate": "42", "status": "approved",
             "payout": "7", "click_id": "k9", "email": "jane.roe@example.org",
             "phone": "+15550001111", "ip": "203.0.113.50"}
        )
    )  # fmt: skip
    rules = Path(config.read_text().split("rules_dir: ")[1].strip())
    explained = run("explain", str(sample), "--rules", str(rules))
    assert explained.code == 0, explained.err
    assert "jane.roe" not in explained.out
    assert "&e=***" in explained.out
    plain = run("explain", str(sample), "--rules", str(rules), "--show-pii")
    assert "jane.roe%40example.org" in plain.out
