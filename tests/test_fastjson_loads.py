"""fastjson.loads (stored JSON columns, decoded by orjson) is json.loads: the same value, of the
same types, for every text; the same JSONDecodeError for what json.loads refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import fastjson

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def typed(value: Any) -> Any:
    """`value` with every member's type spelled out (1 == 1.0 == True otherwise)."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


@given(JSON)
def test_the_value_of_what_the_store_writes_is_json_loads(value: Any) -> None:
    for text in (fastjson.dumps(value), json.dumps(value)):  # orjson's text, the stdlib's
        got = fastjson.loads(text)
        assert typed(got) == typed(json.loads(text))
        assert list(json.loads(text) if isinstance(got, dict) else []) == list(
            got if isinstance(got, dict) else []
        )  # keys in order


@pytest.mark.parametrize(
    "text",
    [
        '{"a": NaN}',  # the standard library's extensions: orjson refuses them
        "[Infinity, -Infinity]",
        '{"big": 123456789012345678901234567890}',  # past 64 bits
        '"\\ud800"',  # a lone surrogate
        '{"a": 1, "a": 2}',  # the last one wins, in both
        '  {"spaced" :\t[1 , 2]}\n',
        '"caf\\u00e9 \\u2603"',
    ],
)
def test_texts_orjson_refuses_or_reads_differently_give_json_loads_value(text: str) -> None:
    want, got = json.loads(text), fastjson.loads(text)
    if isinstance(want, dict) and any(
        isinstance(v, float) and math.isnan(v) for v in want.values()
    ):
        assert math.isnan(got["a"])
    else:
        assert typed(got) == typed(want)


@pytest.mark.parametrize("text", ["", "{", '{"a":}', "[1,]", "nul", '{"a":1}x', "\x00"])
def test_malformed_text_raises_json_loads_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as stdlib:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as ours:
        fastjson.loads(text)
    assert str(ours.value) == str(stdlib.value)


def test_what_the_store_writes_is_read_by_orjson_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it: a stored arrival's data and values are not decoded twice."""
    data = {
        "conversion_id": "c-1",
        "payout": 12.5,
        "revenue": 3,
        "goal": None,
        "extra": {"k": "caf\u00e9 \u2603", "q": 'a"b\\c\n'},
        "flags": [True, False],
    }
    text = fastjson.dumps(data)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("json.loads was called")

    monkeypatch.setattr(fastjson.json, "loads", refuse)
    assert fastjson.loads(text) == data
