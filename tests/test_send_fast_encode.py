"""The URL encoders' table for ASCII values gives exactly what urllib's quote() gives (which
still encodes every other value), for every character and any text."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.errors import RenderError
from daemon.macros import FRAGMENT_SAFE, PATH_SEGMENT_SAFE, QUERY_SAFE, _quoter

SAFE_SETS = [QUERY_SAFE, PATH_SEGMENT_SAFE, FRAGMENT_SAFE, ""]


@pytest.mark.parametrize("safe", SAFE_SETS)
def test_every_character_is_encoded_as_quote_encodes_it(safe: str) -> None:
    encode = _quoter(safe)
    for code in range(0x800):
        char = chr(code)
        if 0xD800 <= code < 0xE000:
            continue
        for value in (char, f"a{char}b", char * 3):
            assert encode(value) == quote(value, safe=safe), hex(code)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(SAFE_SETS), st.text(st.characters(exclude_categories=["Cs"]), max_size=30))
def test_any_text_is_encoded_as_quote_encodes_it(safe: str, value: str) -> None:
    assert _quoter(safe)(value) == quote(value, safe=safe)


@pytest.mark.parametrize("safe", SAFE_SETS)
def test_a_lone_surrogate_is_still_refused(safe: str) -> None:
    with pytest.raises(RenderError):
        _quoter(safe)("a\ud800")
