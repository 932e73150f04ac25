"""JsonLogic conditions: the official suite, load-time errors, run-time failures and the budget."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import datalogic_py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from structlog.testing import capture_logs

from daemon.conditions import (
    MAX_DATA_DEPTH,
    MAX_DEPTH,
    OPERATORS,
    OPS_BUDGET,
    Condition,
    compile_condition,
    is_truthy,
    prepare_data,
    prepare_plain,
)
from daemon.errors import ConditionError, ConditionEvalError, InputError
from daemon.models import Conversion, Status, Transition, rule_data

DATA = Path(__file__).parent / "data" / "jsonlogic"


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: unlike ==, true is not 1, and 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _official() -> list[Any]:
    cases = [c for c in json.loads((DATA / "tests.json").read_text()) if not isinstance(c, str)]
    return [
        pytest.param(logic, data, expected, id=f"{i:03d}-{json.dumps(logic)[:60]}")
        for i, (logic, data, expected) in enumerate(cases)
    ]


def test_the_official_suite_has_277_cases() -> None:
    assert len(_official()) == 277


@pytest.mark.parametrize(("logic", "data", "expected"), _official())
def test_official_case(logic: Any, data: Any, expected: Any) -> None:
    condition = compile_condition(logic)
    assert json_equal(condition(data), expected)
    assert json_equal(condition(prepare_data(data)), expected)
    assert condition.truthy(data) is is_truthy(expected)
    assert condition.truthy(prepare_data(data)) is is_truthy(expected)  # matching's path


# --- truthiness -----------------------------------------------------------------------------

TRUTH_TABLE = [
    (True, True), (False, False), (None, False), (0, False), (0.0, False), (-0.0, False),
    (1, True), (-1, True), (0.5, True), ("", False), ("0", True), ("false", True), (" ", True),
    ([], False), ([0], True), ([[]], True), ({}, False), ({"a": 0}, True),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), TRUTH_TABLE, ids=repr)
def test_is_truthy(value: Any, expected: bool) -> None:
    assert is_truthy(value) is expected
    # ... and it agrees with the truthiness the engine applies inside `if`, `and`, `!!`.
    assert compile_condition({"!!": {"var": "v"}}).truthy({"v": value}) is expected
    assert compile_condition({"if": [{"var": "v"}, "yes", "no"]})({"v": value}) == (
        "yes" if expected else "no"
    )


# --- load-time errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logic", "message"),
    [
        ({"foo": [1]}, 'unknown operator "foo"'),
        ({"and": [True, {"vr": "payout"}]}, 'unknown operator "vr" (at /and/1)'),
        ({"if": [{"var": "a"}, {"log": "x"}, 1]}, 'unknown operator "log" (at /if/1)'),
        ({"val": "payout"}, 'unknown operator "val"'),  # newer proposal, not jsonlogic.com
        ({"throw": "x"}, 'unknown operator "throw"'),
        ({"upper": {"var": "sub1"}}, 'unknown operator "upper"'),  # engine extension
        ({"now": []}, 'unknown operator "now"'),
        ({"": 1}, 'unknown operator ""'),
        ({"var": {"a/b~": 1}}, 'unknown operator "a/b~" (at /var)'),
        ({"!": {"x/y": 1}}, 'unknown operator "x/y" (at /!)'),
        ({"==": [{"zz": 1}, 1]}, 'unknown operator "zz" (at /==/0)'),
        ({"/": [{"zz": 1}, 1]}, 'unknown operator "zz" (at /~1/0)'),
    ],
)
def test_unknown_operator(logic: Any, message: str) -> None:
    with pytest.raises(ConditionError) as err:
        compile_condition(logic)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("logic", "message"),
    [
        ({"==": [1]}, '"==" takes exactly 2 arguments, not 1'),
        ({"==": [{"var": "goal"}, "lead", "sale"]}, '"==" takes exactly 2 arguments, not 3'),
        ({"!==": 1}, '"!==" takes exactly 2 arguments, not 1'),
        ({">=": [{"var": "payout"}]}, '">=" takes exactly 2 arguments, not 1'),
        ({"<": [1, 2, 3, 4]}, '"<" takes 2 to 3 arguments, not 4'),
        ({"in": ["a"]}, '"in" takes exactly 2 arguments, not 1'),
        ({"substr": ["abc"]}, '"substr" takes 2 to 3 arguments, not 1'),
        ({"map": [[1, 2]]}, '"map" takes exactly 2 arguments, not 1'),
        ({"filter": [[1], True, 3]}, '"filter" takes exactly 2 arguments, not 3'),
        ({"reduce": [[1]]}, '"reduce" takes 2 to 3 arguments, not 1'),
        ({"some": []}, '"some" takes exactly 2 arguments, not 0'),
        ({"!": [1, 2]}, '"!" takes exactly 1 argument, not 2'),
        ({"!!": []}, '"!!" takes exactly 1 argument, not 0'),
        ({"and": []}, '"and" takes at least 1 argument, not 0'),
        ({"or": []}, '"or" takes at least 1 argument, not 0'),
        ({"var": ["a", 1, 2]}, '"var" takes 0 to 2 arguments, not 3'),
        ({"missing_some": [1]}, '"missing_some" takes exactly 2 arguments, not 1'),
        ({"%": [7]}, '"%" takes at least 2 arguments, not 1'),
        ({"-": []}, '"-" takes at least 1 argument, not 0'),
        ({"max": []}, '"max" takes at least 1 argument, not 0'),
        (
            {"and": [{">=": [{"var": "payout"}, 5]}, {"in": [{"var": "sub1"}]}]},
            '"in" takes exactly 2 arguments, not 1 (at /and/1)',
        ),
    ],
)
def test_wrong_arity(logic: Any, message: str) -> None:
    with pytest.raises(ConditionError) as err:
        compile_condition(logic)
    assert str(err.value) == message


def _nested_not(levels: int) -> Any:
    """`levels` objects {"!": {"!": ... true}}, built without recursion."""
    logic: Any = True
    for _ in range(levels):
        logic = {"!": logic}
    return logic


def test_depth_64_compiles_and_evaluates() -> None:
    assert compile_condition(_nested_not(MAX_DEPTH))({}) is True  # an even number of negations
    nested_lists: Any = 1
    for _ in range(MAX_DEPTH - 1):
        nested_lists = [nested_lists]
    assert compile_condition({"!!": nested_lists}).truthy({}) is True


def test_depth_65_is_refused() -> None:
    with pytest.raises(ConditionError) as err:
        compile_condition(_nested_not(MAX_DEPTH + 1))
    assert str(err.value) == f"nesting deeper than 64 levels (at {'/!' * MAX_DEPTH})"


@pytest.mark.parametrize("kind", ["objects", "arrays"])
def test_depth_100000_is_refused_without_crashing(kind: str) -> None:
    # The engine segfaults on values nested this deep: the check must run first, iteratively.
    logic: Any = True
    for _ in range(100_000):
        logic = {"!": logic} if kind == "objects" else [logic]
    with pytest.raises(ConditionError) as err:
        compile_condition(logic)
    assert str(err.value).startswith("nesting deeper than 64 levels (at /")


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("logic", "message"),
    [
        ({"==": [{"var": "payout"}, float("nan")]}, "not a finite number: nan (at /==/1)"),
        ({">": [{"var": "payout"}, float("inf")]}, "not a finite number: inf (at />/1)"),
        ({"<": [float("-inf"), 1]}, "not a finite number: -inf (at /</0)"),
        ({"in": [{"var": "sub1"}, {"a", "b"}]}, "not a JSON value: set (at /in/1)"),
        ({"in": [{"var": "sub1"}, ("a", "b")]}, "not a JSON value: tuple (at /in/1)"),
        ({"==": [{"var": "x"}, _Opaque()]}, "not a JSON value: _Opaque (at /==/1)"),
        ({"==": [{"var": "dob"}, date(2000, 1, 1)]}, "not a JSON value: date (at /==/1)"),
        ({">=": [{"var": "payout"}, Decimal("5")]}, "not a JSON value: Decimal (at />=/1)"),
        ({"==": [{"var": "x"}, b"raw"]}, "not a JSON value: bytes (at /==/1)"),
        ({"==": [{"var": "x"}, 2**70]}, "number out of range (at /==/1)"),
        ({"==": [{"var": "x"}, "\ud800"]}, "string with a lone surrogate (at /==/1)"),
        ({1: [1, 2]}, "object key is not a string: 1"),
        (
            {"==": [1, 1], "!=": [1, 2]},
            "an object with 2 keys is not an operator call: write one operator per object",
        ),
        (
            {"and": [{"var": "a", "default": 1}]},
            "an object with 2 keys is not an operator call: write one operator per object "
            "(at /and/0)",
        ),
        (_Opaque(), "not a JSON value: _Opaque"),
    ],
)
def test_values_that_are_not_json_are_refused(logic: Any, message: str) -> None:
    with pytest.raises(ConditionError) as err:
        compile_condition(logic)
    assert str(err.value) == message


def test_condition_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        compile_condition({"nope": 1})


def test_yaml_round_trip_types_compile_as_plain_json() -> None:
    text = "and:\n  - {'>=': [{var: payout}, 5.50]}\n  - {'==': [{var: x}, &t true]}\n  - *t\n"
    logic = YAML().load(io.StringIO(text))  # CommentedMap, ScalarFloat, anchored ScalarBoolean
    condition = compile_condition(logic)
    expected = {"and": [{">=": [{"var": "payout"}, 5.5]}, {"==": [{"var": "x"}, True]}, True]}
    assert condition.logic == expected
    assert type(condition.logic["and"][2]) is bool
    assert condition.truthy({"payout": 6, "x": True}) is True
    assert condition.truthy({"payout": 6, "x": 1}) is True  # loose equality
    assert condition.truthy({"payout": 5.4, "x": True}) is False


# --- run time -------------------------------------------------------------------------------


def test_run_time_error_is_false_logged_once_and_never_raises() -> None:
    condition = compile_condition({">": [{"+": [{"var": "extra.score"}, 1]}, 0]})
    secret_value = "not-a-number-4242"
    with capture_logs() as logs:
        assert condition.truthy({"extra": {"score": secret_value}}) is False
    assert logs == [
        {
            "event": "condition_error",
            "error_type": "Thrown",
            "operator": "+",
            "log_level": "warning",
        }
    ]
    with capture_logs() as prepared_logs:  # the same through matching's path (prepared data)
        assert condition.truthy(prepare_data({"extra": {"score": secret_value}})) is False
    assert prepared_logs == logs
    with pytest.raises(ConditionEvalError) as err:
        condition({"extra": {"score": secret_value}})
    assert err.value.error_type == "Thrown"
    assert secret_value not in str(err.value)
    assert condition.truthy({"extra": {"score": "41"}}) is True


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        ({"payout": {1, 2}}, "DataNotJSON"),
        ({"payout": datetime(2026, 1, 1, tzinfo=UTC)}, "DataNotJSON"),
        ({"payout": Decimal("5.5")}, "DataNotJSON"),
        ({"payout": float("nan")}, "DataNotJSON"),
        ({1: "x"}, "DataNotJSON"),
        ({"payout": 2**70}, "DataNotJSON"),
        ({"sub1": "\udc00"}, "DataNotJSON"),
        (_Opaque(), "DataNotJSON"),
    ],
)
def test_data_that_is_not_json_does_not_fire(data: Any, error_type: str) -> None:
    condition = compile_condition({"or": [{">=": [{"var": "payout"}, 5]}, True]})
    with capture_logs() as logs:
        assert condition.truthy(data) is False
    assert [(e["event"], e["error_type"]) for e in logs] == [("condition_error", error_type)]
    with pytest.raises(ConditionEvalError):
        prepare_data(data)


@pytest.mark.parametrize("depth", [MAX_DATA_DEPTH + 1, 100_000])
def test_data_nested_too_deep_does_not_fire_and_does_not_crash(depth: int) -> None:
    nested: Any = "leaf"
    for _ in range(depth - 1):
        nested = {"a": nested}
    condition = compile_condition({"!!": {"var": "deep"}})
    with capture_logs() as logs:
        assert condition.truthy({"deep": nested}) is False
    assert [e["error_type"] for e in logs] == ["DataTooDeep"]
    ok: Any = "leaf"
    for _ in range(MAX_DATA_DEPTH - 2):
        ok = [ok]
    assert condition.truthy({"deep": ok}) is True  # 64 levels counting the outer object


def test_budget_stops_a_runaway_rule() -> None:
    # A nested iteration over a million items: far over the budget of the engine.
    runaway = compile_condition(
        {"some": [{"var": "rows"}, {"some": [{"var": ""}, {"==": [{"var": ""}, 1]}]}]}
    )
    assert runaway.truthy({"rows": [[0, 0], [0, 1]]}) is True  # small data: fine
    big = prepare_data({"rows": [[0] * 1000] * 1000})
    with capture_logs() as logs:
        assert runaway.truthy(big) is False
    assert logs == [
        {
            "event": "condition_error",
            "error_type": "BudgetExceeded",
            "operator": "some",
            "log_level": "warning",
        }
    ]
    with pytest.raises(ConditionEvalError) as err:
        runaway(big)
    assert err.value.error_type == "BudgetExceeded"


def test_budget_is_the_documented_number() -> None:
    # `in` over an array charges one operation per item plus three for the nodes.
    condition = compile_condition({"in": [{"var": "s"}, {"var": "ids"}]})
    within = [str(i) for i in range(OPS_BUDGET - 10)]
    assert condition({"s": "nope", "ids": within}) is False
    with pytest.raises(ConditionEvalError) as err:
        condition({"s": "nope", "ids": [*within, *"abcdefghijklmnopqrst"]})
    assert err.value.error_type == "BudgetExceeded"


def test_lazy_operators_do_not_evaluate_what_they_skip() -> None:
    # What the compat tables probe with `throw`, probed with a run-time NaN instead.
    nan: Any = {"+": ["not a number", 1]}
    for logic, expected in [
        ({"and": [False, nan]}, False),
        ({"and": [0, nan]}, 0),
        ({"or": [True, nan]}, True),
        ({"or": ["hello", nan]}, "hello"),
        ({"if": [True, "apple", nan]}, "apple"),
        ({"if": [False, nan, "banana"]}, "banana"),
        ({"?:": [False, nan, "banana"]}, "banana"),
        ({"<": [3, 2, nan]}, False),
        ({"<=": [3, 2, nan]}, False),
    ]:
        assert json_equal(compile_condition(logic)({}), expected), logic
    with pytest.raises(ConditionEvalError):
        compile_condition({"and": [True, nan]})({})


# --- data passing ---------------------------------------------------------------------------


def _conversion_data(**params: str) -> dict[str, Any]:
    base = {"conversion_id": "tx-1", "offer": "1234", "affiliate": "42", "status": "approved"}
    extra = {k[6:]: v for k, v in params.items() if k.startswith("extra_")}
    fields = {k: v for k, v in params.items() if not k.startswith("extra_")}
    conversion = Conversion.parse({**base, **fields}, extra)
    return rule_data(
        conversion,
        source="everflow",
        transition=Transition.STATUS_CHANGED,
        previous_status=Status.PENDING,
        received_at=datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
    )


# The examples of docs/conditions.md, against the data a real conversion gives.
DOC_EXAMPLES = [
    ({">=": [{"var": "payout"}, 5]}, {"payout": "5.00"}, True),
    ({">=": [{"var": "payout"}, 5]}, {"payout": "4.99"}, False),
    ({">=": [{"var": "payout"}, 5]}, {}, False),
    ({"<": [1, {"var": "payout"}, 20]}, {"payout": "7.5"}, True),
    ({"<": [1, {"var": "payout"}, 20]}, {"payout": "20"}, False),
    ({"in": [{"var": "sub1"}, ["google", "bing"]]}, {"sub1": "bing"}, True),
    ({"in": [{"var": "sub1"}, ["google", "bing"]]}, {"sub1": "yahoo"}, False),
    ({"in": [{"var": "sub1"}, ["google", "bing"]]}, {}, False),
    ({"!": {"in": [{"var": "sub2"}, ["fraud1", "fraud2"]]}}, {"sub2": "ok"}, True),
    ({"in": ["promo", {"var": "sub3"}]}, {"sub3": "spring-promo-7"}, True),
    ({"in": [{"var": "goal"}, ["lead", "sale"]]}, {"goal": "sale"}, True),
    ({"==": [{"var": "goal"}, "lead"]}, {"goal": "sale"}, False),
    ({"==": [{"var": "extra.utm_source"}, "newsletter"]}, {"extra_utm_source": "newsletter"}, True),
    ({"==": [{"var": "extra.utm_source"}, "newsletter"]}, {}, False),
    ({"==": [{"var": "previous_status"}, "pending"]}, {}, True),
    ({"==": [{"var": "offer"}, 1234]}, {}, True),  # loose: trackers send strings
    ({"===": [{"var": "offer"}, 1234]}, {}, False),
    ({"===": [{"var": "offer"}, "1234"]}, {}, True),
    ({"==": [{"var": "currency"}, None]}, {}, True),
    ({"missing": ["email", "phone"]}, {"email": "a@b.example"}, True),  # ["phone"]: truthy
    ({"missing": ["email"]}, {"email": "a@b.example"}, False),
    ({"!": {"missing_some": [1, ["email", "phone"]]}}, {"phone": "+15550100"}, True),
    ({"!": {"missing_some": [1, ["email", "phone"]]}}, {}, False),
    (
        {">": [{"var": "revenue"}, {"*": [{"var": "payout"}, 2]}]},
        {"revenue": "9", "payout": "4"},
        True,
    ),
    (
        {">": [{"var": "revenue"}, {"*": [{"var": "payout"}, 2]}]},
        {"revenue": "8", "payout": "4"},
        False,
    ),
    (
        {
            "and": [
                {"==": [{"var": "source"}, "everflow"]},
                {">": [{"var": "revenue"}, 10]},
                {"!": {"missing_some": [1, ["email", "phone"]]}},
            ]
        },
        {"revenue": "12.5", "email": "a@b.example"},
        True,
    ),
    ({"var": "sub1"}, {"sub1": "x"}, True),
    ({"var": "sub1"}, {}, False),
]


@pytest.mark.parametrize(("logic", "params", "expected"), DOC_EXAMPLES, ids=str)
def test_documented_examples(logic: Any, params: dict[str, str], expected: bool) -> None:
    data = _conversion_data(**params)
    condition = compile_condition(logic)
    assert condition.truthy(data) is expected
    assert condition.truthy(prepare_data(data)) is expected


def _doc_conditions() -> list[Any]:
    """Every `when:` in the YAML blocks of docs/conditions.md."""
    text = (Path(__file__).parent.parent / "docs" / "conditions.md").read_text()
    found: list[Any] = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL):
        for chunk in re.split(r"(?m)^(?=when:)", block):  # one `when:` per YAML document
            pending = [YAML(typ="safe").load(chunk)]
            while pending:
                node = pending.pop()
                if isinstance(node, dict):
                    found += [v for k, v in node.items() if k == "when"]
                    pending += node.values()
                elif isinstance(node, list):
                    pending += node
    return found


def test_every_documented_condition_is_tested() -> None:
    documented = _doc_conditions()
    assert len(documented) == 12
    tested = {json.dumps(logic, sort_keys=True) for logic, _, _ in DOC_EXAMPLES}
    for logic in documented:
        compile_condition(logic)
        assert json.dumps(logic, sort_keys=True) in tested, logic


def test_null_members_read_as_null_and_count_as_missing() -> None:
    data = _conversion_data()
    assert data["goal"] is None  # rule_data lists every canonical field
    assert compile_condition({"var": "goal"})(data) is None
    assert compile_condition({"var": ["goal", "none"]})(data) == "none"
    assert compile_condition({"missing": ["goal", "offer"]})(data) == ["goal"]
    assert compile_condition({"missing": ["extra.gone"]})({"extra": {"gone": None}}) == [
        "extra.gone"
    ]
    assert compile_condition({"var": "l"})({"l": [1, None]}) == [1, None]  # arrays keep nulls


def test_prepared_data_is_shared_by_many_conditions() -> None:
    data = _conversion_data(payout="9", sub1="bing", goal="lead")
    prepared = prepare_data(data)
    conditions = [compile_condition(logic) for logic, _, _ in DOC_EXAMPLES]
    assert [c.truthy(prepared) for c in conditions] == [c.truthy(data) for c in conditions]
    assert compile_condition({"var": "payout"})(prepared) == 9


def test_scalar_data_and_literal_conditions() -> None:
    assert compile_condition({"var": ""})("apple") == "apple"  # a str datum is not JSON text
    assert compile_condition({"cat": [{"var": ""}, "!"]})("[]") == "[]!"
    assert compile_condition({"var": 1})(["a", "b"]) == "b"
    assert compile_condition("apple")({}) == "apple"
    assert compile_condition("").truthy({}) is False
    assert compile_condition(True).truthy(_Opaque()) is True  # a literal never reads data


def test_condition_is_a_value() -> None:
    a = compile_condition({">=": [{"var": "payout"}, 5]})
    assert a == compile_condition({">=": [{"var": "payout"}, 5]})
    assert hash(a) == hash(compile_condition({">=": [{"var": "payout"}, 5]}))
    assert a != compile_condition({">=": [{"var": "payout"}, 5.0]})
    assert compile_condition({"==": [1, True]}) != compile_condition({"==": [1, 1]})
    assert copy.deepcopy(a) is a
    clone = pickle.loads(pickle.dumps(a))  # noqa: S301 - our own bytes
    assert clone == a
    assert clone.truthy({"payout": 6}) is True
    assert repr(a) == 'Condition({">=":[{"var":"payout"},5]})'
    assert isinstance(a, Condition)


def test_operator_table_stays_inside_what_the_engine_accepts() -> None:
    catalogue = {}
    for info in datalogic_py.Engine(families=[]).operators():
        for name in [info["name"], *info["aliases"]]:
            catalogue[name] = (info["min_args"], info["max_args"])
    for name, (low, high) in OPERATORS.items():
        engine_low, engine_high = catalogue[name]
        # The catalogue says `if` needs one argument, yet the official suite has {"if": []}
        # (null), which the engine evaluates.
        assert engine_low <= low or name in {"if", "?:"}, name
        assert engine_high is None or (high is not None and high <= engine_high), name
    assert compile_condition({"if": []})({}) is None
    assert compile_condition({"?:": []})({}) is None
    assert set(catalogue) - set(OPERATORS) == {"val"}


# --- never anything but ConditionError ------------------------------------------------------

_KEYS = st.sampled_from([*OPERATORS, "val", "throw", "log", "upper", "now", "x"]) | st.text(
    max_size=4
)
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_JSONISH = st.recursive(
    _SCALAR,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(_KEYS, children, min_size=1, max_size=1)
        | st.dictionaries(_KEYS, children, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logic=_JSONISH, data=_JSONISH)
def test_compile_only_ever_returns_a_condition_or_raises_condition_error(
    logic: Any, data: Any
) -> None:
    try:
        condition = compile_condition(logic)
    except ConditionError:
        return
    assert callable(condition)
    assert isinstance(condition.truthy(data), bool)
    assert isinstance(condition.truthy({"payout": 5, "sub1": "a", "extra": {}}), bool)
    with contextlib.suppress(ConditionEvalError):
        condition(data)


def _calls(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Operator calls with an accepted argument count, so evaluation is what gets exercised."""

    def call(op: str) -> st.SearchStrategy[Any]:
        low, high = OPERATORS[op]
        args = st.lists(children, min_size=low, max_size=min(high if high is not None else 4, 4))
        return args.map(lambda a: {op: a})

    return st.sampled_from(sorted(OPERATORS)).flatmap(call)


_PATHS = st.sampled_from(["", "payout", "sub1", "extra", "extra.k", "rows", "rows.0", "nope"])
_RULES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | _PATHS.map(lambda p: {"var": p}),
    lambda children: _calls(children) | st.lists(children, max_size=3),
    max_leaves=25,
)
_DATA = st.fixed_dictionaries(
    {
        "payout": st.integers(-5, 50) | st.floats(-1e6, 1e6) | st.text(max_size=3),
        "sub1": st.text(max_size=4) | st.none(),
        "extra": st.dictionaries(st.sampled_from(["k", "j"]), st.text(max_size=3)),
        "rows": st.lists(st.lists(st.integers(-3, 3), max_size=3), max_size=3),
    }
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logic=_RULES, data=_DATA)
def test_valid_rules_compile_and_truthy_never_raises(logic: Any, data: dict[str, Any]) -> None:
    try:
        condition = compile_condition(logic)
    except ConditionError as err:  # only what our own table forbids: nothing else
        pytest.fail(f"refused a rule built within the operator table: {err}")
    assert isinstance(condition.truthy(data), bool)
    assert condition.truthy(prepare_data(data)) is condition.truthy(data)
    try:
        result = condition(data)
    except ConditionEvalError:
        return
    assert condition.truthy(data) is is_truthy(result)


# --- RuleData.plain: what the engine takes as it is, without the walk ---


def _rule_data_of(params: dict[str, str], extra: dict[str, str]) -> Any:
    conversion = Conversion.parse(
        {"conversion_id": "c", "offer": "1", "affiliate": "2", "status": "approved", **params},
        extra,
    )
    return rule_data(
        conversion,
        source="generic",
        transition=Transition.NEW,
        previous_status=None,
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _engine_takes(members: Any) -> bool:
    try:
        prepare_data(members)
    except ConditionEvalError:
        return False
    return True


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    payout=st.one_of(
        st.none(),
        st.integers(min_value=0, max_value=2**70).map(str),
        st.decimals(min_value=0, max_value=10**30, places=3).map(str),
    ),
    extra=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
)
def test_rule_data_is_plain_exactly_when_the_engine_takes_it(
    payout: str | None, extra: dict[str, str]
) -> None:
    """RuleData.plain lets matching skip the walk and lets quick predicates decide: it must
    hold for exactly the data the engine takes (text with a lone surrogate, an integer past 64
    bits), so that data the engine refuses still fires no condition."""
    try:
        data = _rule_data_of({"payout": payout} if payout else {}, extra)
    except InputError:
        return  # refused at the door: never rule data
    assert data.present is not None
    assert data.plain is _engine_takes(data.present)
    if data.plain:
        condition = compile_condition({"==": [{"var": "offer"}, "1"]})
        assert condition.truthy(prepare_plain(data.present)) is True


@pytest.mark.parametrize(
    ("params", "extra", "plain"),
    [
        ({"sub1": "a", "payout": "12.50"}, {"k": "é"}, True),
        ({"payout": str(2**64 - 1)}, {}, True),  # the engine's largest integer
        ({"payout": str(2**64)}, {}, False),
        ({"revenue": "1e30"}, {}, False),
        ({}, {"k\ud800": "v"}, False),  # a lone surrogate in a name of extra
    ],
    ids=repr,
)
def test_rule_data_plain_cases(params: dict[str, str], extra: dict[str, str], plain: bool) -> None:
    data = _rule_data_of(params, extra)
    assert data.plain is plain
    assert _engine_takes(data.present) is plain
