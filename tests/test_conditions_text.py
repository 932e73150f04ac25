"""A comparison of one field with a string (`{"==": [{"var": "sub1"}, "x"]}`, also `===`, `!=`
and `!==`, in either order) is decided in Python when the field is a string
(Condition.text_test), and by the engine otherwise. Checked against the engine on generated
values and literals, and through matching, whose postbacks fired must not depend on which of
the two decided."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.conditions import compile_condition, prepare_plain
from daemon.loader import load_rules
from daemon.matching import match
from daemon.models import Conversion
from tests.test_matching import arrival_data

OPS = ["==", "===", "!=", "!=="]
# Texts that look alike to a loose comparison: numbers, booleans, null, blanks, Unicode forms.
LOOKALIKES = ["", " ", "0", "1", "1.0", "01", "-0", "1e0", "true", "false", "null", "x", "X",
              "é", "e\u0301", "\u00a0", "[object Object]", "NaN", "Infinity"]  # fmt: skip
TEXTS = st.sampled_from(LOOKALIKES) | st.text(max_size=6)
VALUES = (
    TEXTS
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, 1.5, -0.0])
    | st.booleans()
    | st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["1", "x"]), max_size=2)
)
NAMES = st.sampled_from(["sub1", "goal", "click_id"])


def engine_verdict(logic: Any, members: dict[str, Any]) -> bool:
    """What the engine alone decides (Condition.truthy never asks the text test)."""
    condition = compile_condition(logic)
    return condition.truthy(prepare_plain(members))


@given(
    op=st.sampled_from(OPS),
    name=NAMES,
    listed=st.booleans(),
    first=st.booleans(),
    text=TEXTS,
    value=st.none() | VALUES,
)
@settings(max_examples=3000, deadline=None)
def test_text_test_decides_as_the_engine(
    op: str, name: str, listed: bool, first: bool, text: str, value: Any
) -> None:
    field = {"var": [name] if listed else name}
    logic = {op: [field, text] if first else [text, field]}
    members = {} if value is None else {name: value}
    test = compile_condition(logic).text_test
    assert test is not None
    verdict = test(members)
    if type(value) is str:
        assert verdict == engine_verdict(logic, members)
    else:  # missing (null), numbers, booleans, objects: the engine's loose equality decides
        assert verdict is None


@pytest.mark.parametrize(
    "logic",
    [
        {"==": [{"var": "a.b"}, "x"]},  # a path
        {"==": [{"var": ""}, "x"]},  # the whole data
        {"==": [{"var": "0"}, "x"]},  # an index
        {"==": [{"var": ["sub1", "dflt"]}, "x"]},  # a default
        {"==": [{"var": "sub1"}, 1]},  # not a string
        {"==": [{"var": "sub1"}, None]},
        {"==": [{"var": "sub1"}, {"var": "sub2"}]},
        {"==": ["x", "x"]},
        {"<": [{"var": "sub1"}, "x"]},
        {"in": [{"var": "sub1"}, ["x"]]},
        {"!": [{"==": [{"var": "sub1"}, "x"]}]},
        {"and": [{"==": [{"var": "sub1"}, "x"]}]},
        True,
    ],
)
def test_other_conditions_have_no_text_test(logic: Any) -> None:
    assert compile_condition(logic).text_test is None


def test_a_missing_field_is_the_engines_to_decide() -> None:
    """null == "" holds for the engine (it converts): a missing field is never decided here."""
    logic = {"==": [{"var": "sub1"}, ""]}
    assert compile_condition(logic).text_test({}) is None  # type: ignore[misc]
    assert engine_verdict(logic, {}) is True


RULES = """
offer: 9
postbacks:
  - {id: 1, trigger: conversion_done, affiliate: "*", when: {"==": [{var: sub1}, a]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 2, trigger: conversion_done, affiliate: "*", when: {"!=": [{var: sub1}, a]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 3, trigger: conversion_done, affiliate: "*", when: {"===": ["", {var: sub2}]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 4, trigger: conversion_done, affiliate: "*", when: {"==": [{var: sub2}, ""]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 5, trigger: conversion_done, affiliate: "*", when: {"==": [{var: payout}, "12.5"]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 6, trigger: conversion_done, affiliate: "*", when: {"!==": [{var: [sub1]}, "1"]},
     action: {type: ping_url, url: "https://a.example/"}}
  - {id: 7, trigger: conversion_done, affiliate: "*", when: {">": [{var: payout}, 5]},
     action: {type: ping_url, url: "https://a.example/"}}
"""


@pytest.mark.parametrize(
    "fields",
    [
        {"sub1": "a"},
        {"sub1": "b", "sub2": "x"},
        {"sub1": "1", "payout": "12.5"},
        {"payout": "3"},
        {},
    ],
)
def test_matching_fires_what_the_engine_alone_fires(tmp_path: Path, fields: dict[str, str]) -> None:
    (tmp_path / "a.yaml").write_text(RULES)
    rules = load_rules(tmp_path, git=False)
    conversion = Conversion.parse(
        {"conversion_id": "c", "offer": "9", "affiliate": "4", "status": "approved", **fields}
    )
    data = arrival_data(conversion)
    assert getattr(data, "plain", False)  # the members the text tests read
    fired = [lp.id for lp in match(rules, conversion, data)]
    # the same data as a plain dict: no members, so every condition goes to the engine
    by_engine = [lp.id for lp in match(rules, conversion, dict(data))]
    assert fired == by_engine
