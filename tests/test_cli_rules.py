"""`postbackd validate`, `explain` and `test`, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_support import commit_all, init_repo, run_cli

REPO_RULES = Path(__file__).parent.parent / "rules.d"

OFFER = """\
# Offer 9: a comment that must survive
offer: 9
goals_enabled: true
postbacks:
  - id: 1
    trigger: conversion_done
    affiliate: "*"
    action:
      type: ping_url
      url: https://tracker.example.com/pb?cid={click_id}&p={payout}
  - id: 2
    trigger: conversion_done
    affiliate: 42
    goal: sale
    when: {"and": [{">=": [{"var": "payout"}, 5]}, {"in": [{"var": "sub1"}, ["fb", "tt"]]}]}
    action:
      type: ping_url
      method: POST
      url: https://api.partner.example.net/conv
      headers: {X-Key: "${secret:partner_key}"}
      json: {click: "{click_id}", amount: "{payout}"}
  - id: 3
    trigger: conversion_reject
    affiliate: 42
    action: {type: ping_url, url: "http://10.0.0.5/internal?tx={conversion_id}"}
  - id: 4
    trigger: conversion_done
    affiliate: 7
    status: disabled
    action: {type: ping_url, url: "https://x.example/"}
"""


def test_validate_ok_lists_version_and_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "o.yaml").write_text(OFFER)
    monkeypatch.setenv("POSTBACKD_SECRET_PARTNER_KEY", "s3cret-value")
    monkeypatch.delenv("POSTBACKD_CONFIG", raising=False)
    r = run_cli(capsys, ["validate", str(tmp_path)])
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].startswith("ok: 4 postbacks for 1 offers in 1 files, version ")
    assert lines[1:] == ["secret partner_key: found in environment", "ok: 4 postbacks, 0 warnings"]
    assert "s3cret-value" not in r.out + r.err


def test_validate_errors_one_line_each_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text("offer: 1\ncolour: red\n")
    (tmp_path / "b.yaml").write_text(OFFER.replace("p={payout}", "p={payot}"))
    r = run_cli(capsys, ["validate", str(tmp_path)])
    assert r.code == 1
    assert r.out.splitlines() == [
        "a.yaml:2: unknown key 'colour'",
        "b.yaml:10: postback 1: action.url: unknown macro {payot}; did you mean {payout}?",
    ]
    assert r.err == "invalid: 2 errors, 0 warnings\n"


def test_validate_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("offer: 1\ncolour: red\n")
    r = run_cli(capsys, ["validate", str(tmp_path), "--format", "json"])
    assert r.code == 1
    data = json.loads(r.out)
    assert data["valid"] is False
    assert data["errors"] == [
        {"file": "a.yaml", "line": 2, "postback": None, "message": "unknown key 'colour'"}
    ]


def test_validate_usage_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_cli(capsys, ["validate", "--format", "xml", str(tmp_path)])
    assert r.code == 2
    assert r.err.strip().splitlines() == [
        "postbackd validate: error: Invalid value for '--format': 'xml' is not one of "
        "'text', 'json'. (see postbackd validate --help)"
    ]
    r = run_cli(capsys, ["validate", str(tmp_path / "missing")])
    assert r.code == 1
    assert r.err.strip().endswith("missing: no such rules directory (given on the command line)")


def test_validate_base_catches_a_changed_action_type_and_other_history_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    rules = repo / "rules.d"
    rules.mkdir()
    (rules / "o.yaml").write_text(
        "offer: 9\npostbacks:\n"
        "  - id: 1\n    trigger: conversion_done\n    affiliate: 1\n"
        "    created_at: 2026-11-01T10:00:00Z\n    author: {id: 7, name: Jane}\n"
        "    action: {type: ping_url, url: 'https://a.example/'}\n"
    )
    base = commit_all(repo, "first")
    ok = run_cli(capsys, ["validate", str(rules), "--base", base])
    assert ok.code == 0, ok.out + ok.err
    # The same id now with another action type (a second action type is needed: fake one by
    # changing the offer, created_at and author, which the same rule forbids), and the file
    # moved to another offer.
    (rules / "o.yaml").write_text(
        "offer: 10\npostbacks:\n"
        "  - id: 1\n    trigger: conversion_done\n    affiliate: 1\n"
        "    created_at: 2026-11-02T10:00:00Z\n    author: {id: 8, name: Sam}\n"
        "    action: {type: ping_url, url: 'https://a.example/'}\n"
    )
    r = run_cli(capsys, ["validate", str(rules), "--base", "HEAD"])
    assert r.code == 1
    assert r.out.splitlines() == [
        "o.yaml:3: postback 1: author changed (was Jane (7) in HEAD)",
        "o.yaml:3: postback 1: created_at changed (was 2026-11-01 10:00:00+00:00 in HEAD)",
        "o.yaml:3: postback 1: id 1 belongs to offer 9 in HEAD; ids are never reused: use a new id",
    ]
    bad = run_cli(capsys, ["validate", str(rules), "--base", "no-such-ref"])
    assert bad.code == 1
    assert bad.err.startswith("postbackd: error: --base no-such-ref: git rev-parse")


def test_explain_text_shows_verdicts_first_failing_clause_and_exact_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "o.yaml").write_text(OFFER)
    conv = tmp_path / "c.json"
    conv.write_text(
        json.dumps(
            {
                "conversion_id": "tx-1",
                "offer": 9,
                "affiliate": 42,
                "goal": "sale",
                "status": "approved",
                "payout": 12.5,
                "click_id": "a b",
                "sub1": "google",
            }
        )
    )
    r = run_cli(capsys, ["explain", str(conv), "--rules", str(rules)])
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "conversion tx-1 from generic: offer 9, affiliate 42, status approved; transition new",
        "postback 1 (o.yaml:5, ping_url): FIRES",
        "  GET https://tracker.example.com/pb?cid=a%20b&p=12.5",
        "  Idempotency-Key: generic:tx-1:1:1",
        "postback 2 (o.yaml:11, ping_url): does not fire: when is false: "
        '{"in":[{"var":"sub1"},["fb","tt"]]}',
        "postback 3 (o.yaml:22, ping_url): does not fire: trigger is conversion_reject, "
        "the arrival's is conversion_done",
        "postback 4 (o.yaml:26, ping_url): does not fire: postback is disabled",
    ]
    conv.write_text(
        json.dumps(
            {
                "conversion_id": "tx-1",
                "offer": 9,
                "affiliate": 42,
                "goal": "sale",
                "status": "approved",
                "payout": 12.5,
                "click_id": "a b",
                "sub1": "fb",
            }
        )
    )
    r = run_cli(capsys, ["explain", str(conv), "--rules", str(rules), "--format", "json"])
    fired = {p["id"]: p for p in json.loads(r.out)["postbacks"] if p["fires"]}
    assert fired[2]["request"] == {
        "method": "POST",
        "url": "https://api.partner.example.net/conv",
        "headers": {
            "X-Key": "****",
            "Idempotency-Key": "generic:tx-1:1:2",
            "Content-Type": "application/json",
        },
        "body": '{"click":"a b","amount":"12.5"}',
    }


def test_explain_marks_a_request_the_guard_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "o.yaml").write_text(OFFER)
    conv = tmp_path / "c.json"
    conv.write_text(
        '{"conversion_id": "r1", "offer": "9", "affiliate": "42", "status": "rejected"}'
    )
    r = run_cli(
        capsys, ["explain", str(conv), "--rules", str(tmp_path), "--previous-status", "approved"]
    )
    assert r.code == 0
    assert "  GET http://10.0.0.5/internal?tx=r1" in r.out
    assert "  warning: the outbound guard would refuse 10.0.0.5" in r.out
    assert "transition status_changed" in r.out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "c.json: cannot read JSON: Expecting value: line 1 column 1 (char 0)"),
        ("[1, 2]", "c.json: must hold a JSON object"),
        (
            '{"offer": 1, "affiliate": 2, "status": "approved"}',
            "c.json: conversion_id: required field missing",
        ),
        (
            '{"conversion_id": 1, "offer": 1, "affiliate": 2, "status": "maybe"}',
            "c.json: status: unknown status value",
        ),
        (
            '{"conversion_id": 1, "offer": 1, "affiliate": 2, "status": "approved", '
            '"payout": "NaN"}',
            "c.json: payout: not a finite decimal number",
        ),
    ],
)
def test_explain_bad_conversion_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (tmp_path / "c.json").write_text(content)
    r = run_cli(capsys, ["explain", str(tmp_path / "c.json"), "--rules", str(REPO_RULES)])
    assert r.code == 1
    assert r.err.strip().replace(str(tmp_path) + "/", "") == f"postbackd: error: {message}"


def test_rule_tests_of_the_repository_pass(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, ["test", str(REPO_RULES)])
    assert r.code == 0, r.out
    assert r.out.strip().splitlines()[-1] == "8 passed, 0 failed"


def test_rule_tests_report_failures_like_unit_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "o.yaml").write_text(OFFER)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text(
        "cases:\n"
        "  - name: fires 1 and 2\n"
        "    conversion: {conversion_id: x, offer: 9, affiliate: 42, goal: sale, status: approved,"
        " payout: 3, sub1: fb}\n"
        "    fires: [1, 2]\n"
        "  - name: url of 1\n"
        "    conversion: {conversion_id: x, offer: 9, affiliate: 5, status: approved,"
        " click_id: c}\n"
        "    fires: [1]\n"
        "    requests:\n"
        "      1: {url: 'https://tracker.example.com/pb?cid=WRONG&p='}\n"
        "  - name: passes\n"
        "    conversion: {conversion_id: x, offer: 9, affiliate: 5, status: rejected}\n"
        "    fires: []\n"
    )
    r = run_cli(capsys, ["test", str(tmp_path)])
    assert r.code == 1
    assert r.out.splitlines() == [
        "FAIL tests/t.yaml:2: fires 1 and 2",
        '  expected to fire but did not: 2 (when is false: {">=":[{"var":"payout"},5]})',
        "FAIL tests/t.yaml:5: url of 1",
        "  postback 1: url",
        "    expected: https://tracker.example.com/pb?cid=WRONG&p=",
        "    got:      https://tracker.example.com/pb?cid=c&p=",
        "1 passed, 2 failed",
    ]


def test_rule_tests_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "o.yaml").write_text(OFFER)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text("cases:\n  - name: x\n    fires: [1]\n")
    r = run_cli(capsys, ["test", str(tmp_path)])
    assert r.code == 1
    assert r.err.splitlines() == ["tests/t.yaml:2: missing required key 'cases.conversion'"]


def test_migrate_applies_once_then_says_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "postbackd.yaml"
    config.write_text("store: sqlite:///pb.db\n")
    first = run_cli(capsys, ["migrate", "-c", str(config)])
    assert first.code == 0, first.err
    assert first.out.startswith("applied ")
    again = run_cli(capsys, ["migrate", "-c", str(config)])
    assert again.out.strip() == "the store's schema is up to date"
    config.write_text("store: mysql://x\n")
    bad = run_cli(capsys, ["migrate", "-c", str(config)])
    assert bad.code == 1
    assert bad.err.startswith("postbackd: error: store: unsupported scheme 'mysql'")
