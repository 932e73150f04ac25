"""When a postback fires (SPEC 7.2), through the (offer, trigger) index."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.loader import RuleSet, load_rules
from daemon.matching import explain, match
from daemon.models import Conversion, Transition, rule_data

RULES = """
offer: 9
goals_enabled: {goals}
postbacks:
  - {{id: 1, trigger: conversion_done, affiliate: "*", action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 2, trigger: conversion_done, affiliate: 42, action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 3, trigger: conversion_done, affiliate: "*", goal: sale,
     action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 4, trigger: conversion_done, affiliate: "*", when: {{">=": [{{var: payout}}, 5]}},
     action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 5, trigger: conversion_done, affiliate: "*", status: disabled,
     action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 6, trigger: conversion_reject, affiliate: "*", action: {{type: ping_url, url: "https://a.example/"}}}}
  - {{id: 7, trigger: conversion_done, affiliate: "*", when: {{in: [{{var: extra.tag}}, [x, y]]}},
     action: {{type: ping_url, url: "https://a.example/"}}}}
"""
OTHER = """
offer: 10
postbacks:
  - {id: 100, trigger: conversion_done, affiliate: "*", action: {type: ping_url, url: "https://b.example/"}}
"""


def ruleset(tmp_path: Path, goals: bool) -> RuleSet:
    (tmp_path / "a.yaml").write_text(RULES.format(goals=str(goals).lower()))
    (tmp_path / "b.yaml").write_text(OTHER)
    return load_rules(tmp_path, git=False)


def arrival_data(conv: Conversion) -> dict[str, Any]:
    """The rule data of `conv` arriving new."""
    return rule_data(
        conv,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def fired(rules: RuleSet, **params: str) -> list[int]:
    extra = {k.removeprefix("extra_"): v for k, v in params.items() if k.startswith("extra_")}
    fields = {k: v for k, v in params.items() if not k.startswith("extra_")}
    conv = Conversion.parse({"conversion_id": "c", "offer": "9", **fields}, extra)
    return [lp.id for lp in match(rules, conv, arrival_data(conv))]


@pytest.mark.parametrize(
    ("params", "goals", "expected"),
    [
        ({"affiliate": "1", "status": "approved"}, True, [1]),
        ({"affiliate": "42", "status": "approved"}, True, [1, 2]),
        ({"affiliate": "42", "status": "approved", "goal": "sale"}, True, [1, 2, 3]),
        ({"affiliate": "1", "status": "approved", "goal": "lead"}, True, [1]),
        # goals disabled: the goal condition of 3 is kept but not evaluated
        ({"affiliate": "1", "status": "approved", "goal": "lead"}, False, [1, 3]),
        ({"affiliate": "1", "status": "approved", "payout": "5"}, True, [1, 4]),
        ({"affiliate": "1", "status": "approved", "payout": "4.99"}, True, [1]),
        ({"affiliate": "1", "status": "rejected"}, True, [6]),
        ({"affiliate": "1", "status": "pending"}, True, []),
        ({"affiliate": "1", "status": "approved", "extra_tag": "y"}, True, [1, 7]),
    ],
)
def test_when_a_postback_fires(
    tmp_path: Path, params: dict[str, str], goals: bool, expected: list[int]
) -> None:
    assert fired(ruleset(tmp_path, goals), **params) == expected


def test_ids_compare_as_strings(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, True)
    assert fired(rules, affiliate="42", status="approved") == [1, 2]
    assert set(rules.active) == {
        ("9", t) for t in {lp.postback.trigger for lp in rules.offers["9"]}
    } | {("10", lp.postback.trigger) for lp in rules.offers["10"]}


def test_the_index_only_holds_active_postbacks_of_one_offer_and_trigger(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, True)
    from daemon.models import Trigger

    assert [lp.id for lp in rules.active[("9", Trigger.DONE)]] == [1, 2, 3, 4, 7]
    assert [lp.id for lp in rules.active[("9", Trigger.REJECT)]] == [6]
    assert [lp.id for lp in rules.offers["9"]] == [1, 2, 3, 4, 5, 6, 7]


def test_explain_gives_the_first_failing_check(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, True)
    conv = Conversion.parse(
        {
            "conversion_id": "c",
            "offer": "9",
            "affiliate": "1",
            "status": "approved",
            "goal": "lead",
            "payout": "1",
        }
    )
    data = rule_data(
        conv,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    reasons = {v.postback.id: v.reason for v in explain(rules, conv, data, conv.trigger)}
    assert reasons == {
        1: None,
        2: "affiliate is 42, the conversion's is 1",
        3: "goal is sale, the conversion's is lead",
        4: 'when is false: {">=":[{"var":"payout"},5]}',
        5: "postback is disabled",
        6: "trigger is conversion_reject, the arrival's is conversion_done",
        7: 'when is false: {"in":[{"var":"extra.tag"},["x","y"]]}',
    }
    duplicate = {v.postback.id: v.reason for v in explain(rules, conv, data, None)}
    assert duplicate[1] == "this arrival fires no trigger"


def test_a_condition_that_fails_at_run_time_does_not_fire_and_is_logged(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "offer: 9\npostbacks:\n"
        '  - {id: 1, trigger: conversion_done, affiliate: "*", when: {"+": [{"var": "sub1"}, 1]},'
        ' action: {type: ping_url, url: "https://a.example/"}}\n'
        '  - {id: 2, trigger: conversion_done, affiliate: "*",'
        ' action: {type: ping_url, url: "https://a.example/"}}\n'
    )
    rules = load_rules(tmp_path, git=False)
    with capture_logs() as logs:
        assert fired(rules, affiliate="1", status="approved", sub1="not a number") == [2]
    assert [(e["event"], e["error_type"]) for e in logs] == [("condition_error", "Thrown")]
    assert "not a number" not in repr(logs)  # the data never reaches the log


def test_plain_rule_data_goes_to_the_engine_without_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule data the engine takes as it is (RuleData.plain) is converted without prepare_data's
    walk; data it refuses (revenue past 64 bits) still goes through it, and then no condition
    fires."""
    import daemon.matching

    rules = ruleset(tmp_path, True)
    walked: list[object] = []
    real = daemon.matching.prepare_data

    def counted(data: object) -> object:
        walked.append(data)
        return real(data)

    monkeypatch.setattr(daemon.matching, "prepare_data", counted)
    assert fired(rules, affiliate="1", status="approved", payout="5") == [1, 4]
    assert walked == []
    with capture_logs() as logs:
        assert fired(rules, affiliate="1", status="approved", payout="5", revenue=str(2**64)) == [1]
    assert len(walked) == 1
    assert [e["event"] for e in logs] == ["condition_error"]
