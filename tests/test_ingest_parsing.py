"""The request path's cheap checks decide exactly as the full ones: check_value's fast path
(printable text), parse_urlencoded without the per-parameter work it used to do, and
Source.to_conversion with its mapping worked out once per source. Each is compared with the
straightforward form it replaced (kept here as the reference), on generated inputs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.auth import Gate, TokenCredentials
from daemon.errors import InputError
from daemon.models import (
    CANONICAL_FIELDS,
    MAX_VALUE_LENGTH,
    Conversion,
    Status,
    check_value,
)
from daemon.sources import Source
from daemon.webhook_input import MAX_NAME, MAX_PARAMS, parse_urlencoded

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def reference_check(name: str, value: str) -> str:
    """check_value as it was written before its fast path."""
    if len(value) > MAX_VALUE_LENGTH:
        raise InputError(f"value longer than {MAX_VALUE_LENGTH} characters", name)
    if _CONTROL.search(value):
        raise InputError("value contains control characters", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError("value contains a lone surrogate", name) from err
    return value


def outcome(call: Any, *args: Any) -> Any:
    try:
        return ("ok", call(*args))
    except InputError as err:
        return ("error", type(err), err.message, err.field)


def test_the_fast_path_never_passes_a_character_the_full_check_refuses() -> None:
    for code in range(0x110000):
        char = chr(code)
        if char.isprintable():  # check_value's fast path
            reference_check("x", char)  # raises if the fast path let a bad character through
        assert outcome(check_value, "x", char) == outcome(reference_check, "x", char)


VALUES = st.text(
    alphabet=st.characters(codec=None) | st.sampled_from("\x00\t\n\r\x1f\x7f\x80\x85\x9f\xa0é"),
    max_size=40,
) | st.sampled_from(["a" * MAX_VALUE_LENGTH, "a" * (MAX_VALUE_LENGTH + 1), "é" * 1025, ""])


@given(VALUES)
@settings(max_examples=2000, deadline=None)
def test_check_value_decides_as_before(value: str) -> None:
    assert outcome(check_value, "f", value) == outcome(reference_check, "f", value)
    if len(value) <= MAX_VALUE_LENGTH and value.isprintable():  # the fast path
        assert outcome(reference_check, "f", value) == ("ok", value)


def _safe(name: str) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name[:64])


def reference_parse(text: str) -> dict[str, str]:
    """parse_urlencoded as it was written before (every check on every parameter)."""
    params: dict[str, str] = {}

    def unquote(raw: str, field: str | None) -> str:
        try:
            return unquote_plus(raw, errors="strict")
        except UnicodeDecodeError as err:
            raise InputError("not valid UTF-8 (or a lone surrogate)", field) from err

    for part in text.split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        name = unquote(raw_name, None)
        value = unquote(raw_value, _safe(name))
        if not name:
            raise InputError("a parameter has an empty name")
        if len(name) > MAX_NAME:
            raise InputError(f"parameter name longer than {MAX_NAME} characters", _safe(name))
        try:
            reference_check("", name)
        except InputError as err:
            message = err.message.removeprefix("value ")
            raise InputError(f"parameter name {message}", _safe(name)) from err
        reference_check(_safe(name), value)
        if name in params:
            if params[name] != value:
                raise InputError("parameter given twice with different values", _safe(name))
            continue
        if len(params) >= MAX_PARAMS:
            raise InputError(f"more than {MAX_PARAMS} parameters")
        params[name] = value
    return params


def new_parse(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    parse_urlencoded(text, params)
    return params


PIECES = st.sampled_from(
    ["a", "b", "sub1", "=", "&", "+", "%", "%2", "%20", "%41", "%C3%A9", "%ED%A0%80", "%FF",
     "%00", "%7F", "%C2%85", "%0A", "é", "\x01", "\ud800", "x" * 130, "y" * 1030, "%2B"]
)  # fmt: skip


@given(st.lists(PIECES, max_size=16).map("".join))
@settings(max_examples=3000, deadline=None)
def test_parse_urlencoded_decides_as_before(text: str) -> None:
    assert outcome(new_parse, text) == outcome(reference_parse, text)


def test_parse_urlencoded_errors_name_the_parameter() -> None:
    assert outcome(new_parse, "sub2=%ED%A0%80") == (
        "error", InputError, "not valid UTF-8 (or a lone surrogate)", "sub2"
    )  # fmt: skip
    assert outcome(new_parse, "a%00b=1") == (
        "error", InputError, "parameter name contains control characters", "a\\x00b"
    )  # fmt: skip
    assert outcome(new_parse, "n%0A=%01") == (
        "error", InputError, "parameter name contains control characters", "n\\n"
    )  # fmt: skip
    assert outcome(new_parse, "click_id=a%01b") == (
        "error", InputError, "value contains control characters", "click_id"
    )  # fmt: skip


def reference_to_conversion(source: Source, params: Mapping[str, str]) -> Conversion:
    """Source.to_conversion as it was written before its mapping was kept per source."""
    consumed = source.gate.consumed
    canonical: dict[str, str] = dict(source.defaults)
    used: set[str] = set(consumed)
    for name in CANONICAL_FIELDS:
        param = source.fields.get(name, name)
        if param is None or param in consumed:
            continue
        used.add(param)
        value = params.get(param, "")
        if value != "":
            canonical[name] = value
    if "status" in canonical:
        key = canonical["status"].strip().lower()
        mapped = source.status_map.get(key)
        if mapped is not None:
            canonical["status"] = mapped
        elif key in Status.__members__.values():
            canonical["status"] = key
        else:
            raise InputError("unknown status value", source.fields.get("status", "status"))
    extra = {k: v for k, v in params.items() if k not in used}
    try:
        return Conversion.parse(canonical, extra)
    except InputError as err:
        name = err.field or ""
        raise InputError(err.message, source.fields.get(name, name) or name) from err


MAPPED: dict[str, str | None] = {
    "conversion_id": "transaction_id",
    "offer": "offer_id",
    "sub1": "aff_sub",
    "sub2": "aff_sub",  # one parameter, two fields
    "goal": None,  # never mapped
    "click_id": "key",  # the credential's parameter: never mapped, never extra
}
SOURCES = [
    Source("generic"),
    Source(
        "mapped",
        fields=MAPPED,
        status_map={"1": "approved", "0": "rejected"},
        defaults={"currency": "USD", "affiliate": "7"},
        gate=Gate(credentials=TokenCredentials("t", param="key")),
    ),
    Source("defaults", defaults={"status": "pending", "goal": "lead", "sub3": ""}),
]
PARAM_NAMES = st.sampled_from(
    [*CANONICAL_FIELDS, "transaction_id", "offer_id", "aff_sub", "key", "note", "a.b", "Status"]
)
PARAM_VALUES = st.sampled_from(
    ["", "1", "0", "42", "approved", " Approved ", "pending", "nope", "12.50", "-1", "USD",
     "usd1", "2026-01-02T03:04:05Z", "never", "a\x01b", "é", "x" * 1025]
)  # fmt: skip


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
@given(params=st.dictionaries(PARAM_NAMES, PARAM_VALUES, max_size=12))
@settings(max_examples=400, deadline=None)
def test_to_conversion_decides_as_before(source: Source, params: dict[str, str]) -> None:
    base = {"conversion_id": "c1", "offer": "5", "affiliate": "9", "status": "approved"}
    for given_params in (params, {**base, **params}, {**params, **base}):
        new, old = (
            outcome(source.to_conversion, given_params),
            outcome(reference_to_conversion, source, given_params),
        )
        assert new == old
        if new[0] == "ok":  # the same fields in the same order (the stored row's order)
            assert list(new[1].fields.items()) == list(old[1].fields.items())
            assert list(new[1].extra.items()) == list(old[1].extra.items())


def test_to_us_reads_utc_and_other_zones_alike() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from daemon.store.common import EPOCH, from_us, to_us

    moment = datetime(2026, 12, 6, 19, 50, 1, 123456, tzinfo=UTC)
    expected = (moment - EPOCH) // timedelta(microseconds=1)
    assert to_us(moment) == expected == 1796586601123456
    assert to_us(moment.astimezone(timezone(timedelta(hours=-7, minutes=-30)))) == expected
    assert from_us(expected) == moment
    with pytest.raises(ValueError, match="naive datetime"):
        to_us(moment.replace(tzinfo=None))


def test_rule_data_context_values_are_plain_strings() -> None:
    from datetime import UTC, datetime

    from daemon.models import Transition, arrival_view

    conversion = Conversion.parse(
        {"conversion_id": "c", "offer": "1", "affiliate": "2", "status": "rejected"}
    )
    data, values = arrival_view(
        conversion,
        source="s",
        transition=Transition.STATUS_CHANGED,
        previous_status=Status.PENDING,
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    context = {k: data[k] for k in ("transition", "previous_status", "trigger", "status")}
    assert context == {
        "transition": "status_changed",
        "previous_status": "pending",
        "trigger": "conversion_reject",
        "status": "rejected",
    }
    assert all(type(v) is str for v in context.values())  # not Enum members
    assert all(type(v) is str for v in values.values())
