"""The planning of an arrival, made cheaper, gives exactly what it gave: rule_data and the macro
values of arrival_view (key order included: both are stored as JSON text in the arrival row)
against the plain definitions they replaced, for parsed conversions and for hand-built ones
that break the fast path's premise."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import datalogic_py as dl
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon import fastjson
from daemon.conditions import Prepared, _copied_as_is, _plain_data, prepare_data
from daemon.errors import ConditionEvalError
from daemon.loader import RuleSet, load_rules
from daemon.matching import match
from daemon.models import (
    CANONICAL_FIELDS,
    DECIMAL_FIELDS,
    TRIGGER_OF_STATUS,
    Conversion,
    RuleData,
    Status,
    Transition,
    arrival_view,
    macro_values,
    rule_data,
)

RECEIVED = datetime(2026, 12, 6, 21, 0, 0, 123456, tzinfo=UTC)
OPTIONAL = [
    name
    for name in CANONICAL_FIELDS
    if name not in ("conversion_id", "offer", "affiliate", "status")
]


def reference_rule_data(
    conversion: Conversion,
    source: str,
    transition: Transition,
    previous: Status | None,
    received_at: datetime,
) -> dict[str, Any]:
    """rule_data as it was written before (a dict of every canonical name, updated)."""
    data: dict[str, Any] = dict.fromkeys(CANONICAL_FIELDS)
    data.update(conversion.canonical())
    for name in DECIMAL_FIELDS:
        value = getattr(conversion, name)
        if value is None:
            data[name] = None
        else:
            data[name] = int(value) if value == value.to_integral_value() else float(value)
    data["extra"] = dict(conversion.extra)
    data["source"] = source
    data["transition"] = transition.value
    data["previous_status"] = previous.value if previous else None
    data["trigger"] = TRIGGER_OF_STATUS[conversion.status].value
    data["received_at"] = received_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return data


def reference_values(data: dict[str, Any], conversion: Conversion) -> dict[str, str]:
    """macro_values as written before: every member of data that is not null, as text, then
    the canonical fields as sent, then extra."""
    values = {
        name: str(value) for name, value in data.items() if value is not None and name != "extra"
    }
    values.update(conversion.canonical())
    for name, value in conversion.extra.items():
        values[f"extra.{name}"] = value
    return values


def assert_same_view(
    conversion: Conversion,
    source: str = "generic",
    transition: Transition = Transition.NEW,
    previous: Status | None = None,
    received_at: datetime = RECEIVED,
) -> None:
    data, values = arrival_view(
        conversion,
        source=source,
        transition=transition,
        previous_status=previous,
        received_at=received_at,
    )
    want_data = reference_rule_data(conversion, source, transition, previous, received_at)
    assert list(data.items()) == list(want_data.items())
    assert fastjson.dumps(data) == fastjson.dumps(want_data)  # the arrival row's text
    assert [type(v) for v in data.values()] == [type(v) for v in want_data.values()]
    present = getattr(data, "present", None)
    if present is not None:  # the members that are not null, in order: what conditions see
        assert list(present.items()) == [(k, v) for k, v in want_data.items() if v is not None]
    want_values = reference_values(want_data, conversion)
    assert list(values.items()) == list(want_values.items())
    if all(type(v) is str for v in conversion.fields.values()):
        assert all(type(v) is str for v in values.values())
    assert values == macro_values(data, conversion)
    plain = rule_data(
        conversion,
        source=source,
        transition=transition,
        previous_status=previous,
        received_at=received_at,
    )
    assert list(plain.items()) == list(want_data.items())


TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12
).filter(lambda t: t.strip() != "")
DECIMAL_TEXT = st.sampled_from(["0", "12.50", "12.5", "1e3", "7", " 3.25 ", "0.000001", "99"])


@st.composite
def parsed_conversions(draw: st.DrawFn) -> Conversion:
    names = draw(st.lists(st.sampled_from(OPTIONAL), unique=True, max_size=12))
    params: dict[str, str] = {}
    # The required fields anywhere among the others: the order sent must not matter.
    required = {"conversion_id": draw(TEXT), "offer": draw(TEXT), "affiliate": draw(TEXT)}
    required["status"] = draw(st.sampled_from(["approved", "pending", "REJECTED", " approved "]))
    order = draw(st.permutations([*required, *names]))
    for name in order:
        if name in required:
            params[name] = required[name]
        elif name in DECIMAL_FIELDS:
            params[name] = draw(DECIMAL_TEXT)
        elif name == "event_time":
            params[name] = draw(st.sampled_from(["2026-12-01T10:00:00Z", "1764583200"]))
        elif name == "currency":
            params[name] = "USD"
        else:
            params[name] = draw(st.one_of(TEXT, st.just("")))
    extra = draw(st.dictionaries(st.sampled_from(["a", "score", "x.y", "é"]), TEXT, max_size=3))
    return Conversion.parse(params, extra)


@settings(max_examples=400, deadline=None)
@given(
    parsed_conversions(),
    st.sampled_from(list(Transition)),
    st.sampled_from([None, *Status]),
    st.sampled_from(["generic", "everflow", "s"]),
)
def test_the_view_of_a_parsed_conversion_is_exactly_the_plain_one(
    conversion: Conversion, transition: Transition, previous: Status | None, source: str
) -> None:
    assert_same_view(conversion, source, transition, previous)
    data = rule_data(
        conversion,
        source=source,
        transition=transition,
        previous_status=previous,
        received_at=RECEIVED,
    )
    assert isinstance(data, RuleData)
    assert data.present is not None  # a parsed conversion always takes the shortcut


def test_a_received_time_in_another_zone_is_the_same_utc_text() -> None:
    conversion = Conversion.parse(
        {"conversion_id": "c1", "offer": "1", "affiliate": "2", "status": "approved"}
    )
    assert_same_view(conversion, received_at=RECEIVED.astimezone(timezone(timedelta(hours=5))))


def test_hand_built_conversions_that_break_the_premise_still_give_the_plain_view() -> None:
    """Fields that are not canonical, a decimal without the text it came from, text without
    its decimal, a value that is not a string, a source that is a str subclass."""

    class Name(str):
        pass

    cases = [
        Conversion("c", "o", "a", Status.APPROVED, fields={"nickname": "x", "goal": "g"}),
        Conversion("c", "o", "a", Status.APPROVED, fields={"source": "x", "extra": "y"}),
        Conversion("c", "o", "a", Status.APPROVED, payout=Decimal("5")),
        Conversion("c", "o", "a", Status.APPROVED, fields={"payout": "5"}),
        Conversion("c", "o", "a", Status.APPROVED, fields={"revenue": "2.5"}),
        Conversion("c", "o", "a", Status.APPROVED, revenue=Decimal("2.5")),
        Conversion("c", "o", "a", Status.APPROVED, fields={"sub1": 7}),  # type: ignore[dict-item]
        Conversion("c", "o", "a", Status.APPROVED, fields={"sub1": None}),  # type: ignore[dict-item]
        Conversion("c", "o", "a", Status.PENDING, fields={"status": "approved"}),
        Conversion("c", "o", "a", Status.PENDING, extra={"k": "v"}),
    ]
    for conversion in cases:
        assert_same_view(conversion)
        assert_same_view(conversion, Name("named"), Transition.STATUS_CHANGED, Status.PENDING)


# --- matching: the engine called directly, data prepared in C ------------------------------

WHENS = [
    '{"==": [{"var": "sub1"}, "fire-0"]}',
    '{"==": [{"var": "sub1"}, "fire-1"]}',
    "true",
    "0",
    '{"+": [{"var": "sub1"}, 1]}',  # throws for a sub1 that is not a number
    '{">=": [{"var": "payout"}, 5]}',
    '{"in": [{"var": "extra.tag"}, ["x", "y"]]}',
    '{"missing": ["email", "sub2"]}',
    '{"cat": [{"var": "sub1"}, ""]}',
]


@pytest.fixture(scope="module")
def mixed_rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    root = tmp_path_factory.mktemp("rules")
    lines = ["offer: 9", "postbacks:"]
    for i, when in enumerate(WHENS, start=1):
        lines.append(
            f'  - {{id: {i}, trigger: conversion_done, affiliate: "*", when: {when},'
            ' action: {type: ping_url, url: "https://a.example/"}}'
        )
    lines.append(
        f'  - {{id: {len(WHENS) + 1}, trigger: conversion_done, affiliate: "*",'
        ' action: {type: ping_url, url: "https://a.example/"}}'
    )
    (root / "a.yaml").write_text("\n".join(lines) + "\n")
    return load_rules(root, git=False)


def reference_match(rules: RuleSet, conversion: Conversion, data: dict[str, Any]) -> list[int]:
    """match as it was: Condition.truthy on data prepared by the plain walk."""
    fired = []
    prepared: Any = None
    for lp in rules.active.get((conversion.offer, conversion.trigger), ()):
        condition = lp.postback.condition
        if condition is not None:
            if prepared is None:
                try:
                    try:
                        prepared = Prepared(dl.DataHandle(_plain_data(dict(data))))
                    except dl.DataLogicError as err:
                        raise ConditionEvalError("DataNotJSON") from err
                except ConditionEvalError as err:
                    structlog.get_logger("postbackd.matching").warning(
                        "condition_error", error_type=err.error_type, operator=None
                    )
                    prepared = False
            if prepared is False or not condition.truthy(prepared):
                continue
        fired.append(lp.id)
    return fired


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["fire-0", "fire-1", "7", "x", "", "1e3"]),
    st.sampled_from(["", "5", "4.99", "1e30", "12.50"]),  # 1e30: an integer the engine refuses
    st.sampled_from([{}, {"tag": "x"}, {"tag": "z"}, {"tag": "x", "other": "1"}]),
    st.sampled_from(["", "a@b.example"]),
)
def test_match_fires_and_logs_exactly_what_it_did(
    mixed_rules: RuleSet, sub1: str, payout: str, extra: dict[str, str], email: str
) -> None:
    params = {"conversion_id": "c", "offer": "9", "affiliate": "1", "status": "approved"}
    for name, value in (("sub1", sub1), ("payout", payout), ("email", email)):
        if value:
            params[name] = value
    conversion = Conversion.parse(params, extra)
    data = rule_data(
        conversion,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=RECEIVED,
    )
    with capture_logs() as want_logs:
        want = reference_match(mixed_rules, conversion, data)
    with capture_logs() as logs:
        got = [lp.id for lp in match(mixed_rules, conversion, data)]
    assert got == want
    assert logs == want_logs
    assert len(WHENS) + 1 in got  # the postback without a condition always fires


# --- the store's JSON text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"a": "é😀", "b": None, "c": [1, 2.5, True], "d": {"x": "1"}},
        {"big": 2**70},  # past 64 bits: the standard encoder's text
        {1: "int key"},  # keys that are not strings: the standard encoder's text
        "plain",
    ],
)
def test_store_json_is_the_standard_encoders_text(value: Any) -> None:
    assert fastjson.dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert fastjson.dumps(value) == fastjson.dumps_with(value)


@pytest.mark.parametrize("value", [{"when": datetime(2026, 1, 1, tzinfo=UTC)}, {"s": {1, 2}}])
def test_store_json_refuses_what_the_standard_encoder_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        fastjson.dumps(value)


# --- prepared data: what the walk would copy as it is goes to the engine without it ---------


def typed(value: Any) -> Any:
    """`value` with the type of every member spelled out (1 == 1.0 == True otherwise)."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, repr(value))


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.text(max_size=3)
    | st.floats(allow_nan=True, allow_infinity=True)
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=2) | st.integers(0, 2), inner, max_size=3)
    ),
    max_leaves=10,
)
KEYS = st.text(max_size=4) | st.integers(0, 3)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.dictionaries(KEYS, JSONISH, max_size=8),
        st.dictionaries(
            st.text(max_size=4),
            st.text(max_size=3)
            | st.integers(-(2**65), 2**65)
            | st.floats()
            | st.dictionaries(st.text(max_size=2), st.text(max_size=2) | st.none(), max_size=2),
            max_size=8,
        ),
    )
)
def test_data_taken_as_it_is_is_what_the_walk_copies(data: dict[Any, Any]) -> None:
    if _copied_as_is(data):
        assert typed(_plain_data(data)) == typed(data)
        assert None not in data.values()


def test_rule_data_is_taken_as_it_is_and_evaluates_as_the_walked_copy(
    mixed_rules: RuleSet,
) -> None:
    conversion = Conversion.parse(
        {
            "conversion_id": "c",
            "offer": "9",
            "affiliate": "1",
            "status": "approved",
            "payout": "12.50",
            "sub1": "fire-0",
        },
        {"tag": "x"},
    )
    data = rule_data(
        conversion,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=RECEIVED,
    )
    assert isinstance(data, RuleData)
    assert data.present is not None
    assert _copied_as_is(data.present)
    assert not _copied_as_is(dict(data))  # its nulls are dropped by the walk
    fast = prepare_data(data.present)
    walked = Prepared(dl.DataHandle(_plain_data(dict(data))))
    for lp in mixed_rules.postbacks.values():
        condition = lp.postback.condition
        if condition is not None:
            assert condition.truthy(fast) is condition.truthy(walked), condition


@pytest.mark.parametrize(
    "data",
    [
        {"p": float("nan")},
        {"p": float("inf")},
        {"e": {"k": None}},
        {"e": {"k": 1}},
        {"e": {1: "v"}},
        {1: "v"},
        {"n": None},
        {"l": []},
    ],
)
def test_data_the_walk_changes_or_refuses_is_walked(data: dict[Any, Any]) -> None:
    assert not _copied_as_is(data)
