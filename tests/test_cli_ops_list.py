"""`postbackd rules list`: the platform's columns, secrets masked, filters, both formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon.listing import COLUMNS, mask, summarise_condition
from tests.test_cli_ops_kit import INSURANCE, SOLAR, run


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    (tmp_path / "offer-1234.yaml").write_text(SOLAR)
    (tmp_path / "offer-501.yaml").write_text(INSURANCE.replace('affiliate: "*"', "affiliate: 9"))
    return tmp_path


def test_table_has_the_platform_columns(rules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per postback (tests/cli: the wrapping)
    result = run("rules", "list", "--rules", str(rules), "--offer", "1234")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "Offer 1234 (goals on)"
    assert re.split(r"\s{2,}", lines[1]) == list(COLUMNS)
    row_102 = next(line for line in lines if line.startswith("102 "))
    assert "Conversion Done" in row_102
    assert "affiliate 42, goal sale, when payout >= 5" in row_102
    assert "POST https://api.partner-42.example.net/conversions; headers: X-Api-Key=****" in row_102
    assert "${secret" not in result.out
    assert row_102.rstrip().endswith("2026-11-02T09:30:00Z  Sam Lee (12, affiliate 42)")


def test_json_rows_are_whole_and_masked(rules: Path) -> None:
    result = run("rules", "list", "--rules", str(rules), "--format", "json", "--status", "active")
    rows = {row["id"]: row for row in json.loads(result.out)}
    assert sorted(rows) == [101, 102, 103, 201]
    assert rows[102] == {
        "id": 102,
        "offer": "1234",
        "trigger": "conversion_done",
        "trigger_settings": {
            "affiliate": "42",
            "goal": "sale",
            "goal_evaluated": True,
            "when": {">=": [{"var": "payout"}, 5]},
        },
        "action": "ping_url",
        "action_settings": {
            "method": "POST",
            "url": "https://api.partner-42.example.net/conversions",
            "headers": {"X-Api-Key": "****"},
            "json": {"click_id": "{click_id}", "amount": "{payout}"},
        },
        "status": "active",
        "status_reason": None,
        "created_at": "2026-11-02T09:30:00Z",
        "author": {"id": "12", "name": "Sam Lee", "affiliate": "42"},
        "source": "file",
        "file": "offer-1234.yaml",
        "line": 18,
        "updated_at": None,
    }  # the API's object (tests/cli/test_same_json.py)


def test_status_filter(rules: Path) -> None:
    text = (
        (rules / "offer-1234.yaml")
        .read_text()
        .replace(
            "affiliate: 42\n    status: active\n    created_at: 2026-11-02T09:35",
            "affiliate: 42\n    status: disabled\n    created_at: 2026-11-02T09:35",
        )
    )
    (rules / "offer-1234.yaml").write_text(text)
    result = run("rules", "list", "--rules", str(rules), "--status", "disabled", "--format", "json")
    assert [row["id"] for row in json.loads(result.out)] == [103]


def test_an_invalid_tree_lists_nothing_and_says_why(rules: Path) -> None:
    (rules / "bad.yaml").write_text("offer: 1\npostbacks:\n  - id: 1\n    trigger: nope\n")
    result = run("rules", "list", "--rules", str(rules))
    assert result.code == 1
    assert result.out == ""
    assert result.err.splitlines()[-1] == (
        f"postbackd: error: the rules in {rules} do not load (3 error(s))"
    )


def test_masking() -> None:
    assert mask({"url": "https://u:pw@h.example/x?k=${secret:k}"}) == {
        "url": "https://u:****@h.example/x?k=****"
    }
    assert mask({"headers": {"Authorization": "Bearer abc", "Accept": "json"}}) == {
        "headers": {"Authorization": "****", "Accept": "json"}
    }
    assert mask({"auth_token": "literal", "password": "x", "to": "+1555"}) == {
        "auth_token": "****",
        "password": "****",
        "to": "+1555",
    }


def test_condition_summaries() -> None:
    assert summarise_condition(
        {"and": [{"==": [{"var": "goal"}, "sale"]}, {"!": {"var": "x"}}]}
    ) == ('goal == "sale" and not x')
    assert summarise_condition({"or": [{"and": [True, False]}, {"in": ["a", "abc"]}]}) == (
        '(true and false) or "a" in "abc"'
    )
    assert summarise_condition({"max": [1, 2]}) == '{"max":[1,2]}'
