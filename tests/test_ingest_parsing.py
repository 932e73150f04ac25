"""The request path's cheap checks decide exactly as the full ones: check_value's fast path
(printable text), parse_urlencoded without the per-parameter work it used to do, and
Source.to_conversion with its mapping worked out once per source. Each is compared with the
straightforward form it replaced (kept here as the reference), on generated inputs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
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
    UtcText,
    check_value,
    utc_text,
)
from daemon.sources import MAX_LAYOUTS, Source
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
     "%00", "%7F", "%C2%85", "%0A", "é", "\x01", "\ud800", "x" * 130, "y" * 1030, "%2B",
     " ", "#", "n=v", "n=w", "=&", "x" * 128, "y" * 1024]
)  # fmt: skip


@given(st.lists(PIECES, max_size=16).map("".join))
@settings(max_examples=3000, deadline=None)
def test_parse_urlencoded_decides_as_before(text: str) -> None:
    assert outcome(new_parse, text) == outcome(reference_parse, text)


@pytest.mark.parametrize(
    "text",
    [
        "&".join(f"n{i}=v" for i in range(MAX_PARAMS)),  # as many as taken
        "&".join(f"n{i}=v" for i in range(MAX_PARAMS + 1)),  # one too many
        "&".join(f"n{i % 150}=v" for i in range(MAX_PARAMS + 50)),  # repeats, agreeing
        "a=1&b=2&a=1",
        "a=1&b=2&a=2",
        "a=b=c&d=e",
        "a=&=b",
        "x" * MAX_NAME + "=" + "y" * MAX_VALUE_LENGTH,
        "x" * (MAX_NAME + 1) + "=y",
        "x=" + "y" * (MAX_VALUE_LENGTH + 1),
        "a=1&&b=2",
        "a=1&b",
        "a b=c d&e!=~",
    ],
)
def test_parse_urlencoded_plain_queries_decide_as_before(text: str) -> None:
    """The whole-text path for plain queries (every part `name=value` in printable ASCII),
    at its bounds: the same parameters, or the same error, as the walk."""
    assert outcome(new_parse, text) == outcome(reference_parse, text)


def test_parse_urlencoded_adds_to_what_the_query_gave() -> None:
    """A form body's parameters join the query's: a name in both must agree."""
    params = {"a": "1"}
    parse_urlencoded("b=2&c=3", params)
    assert params == {"a": "1", "b": "2", "c": "3"}
    with pytest.raises(InputError, match="twice with different values"):
        parse_urlencoded("c=3&a=2", {"a": "1"})


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


def test_to_conversion_layouts_are_kept_per_source_up_to_a_bound() -> None:
    """A layout is worked out once per list of parameter names and kept, at most MAX_LAYOUTS
    of them; names sent in more ways than that still decode, as the reference does."""
    source = Source("mapped", fields=MAPPED, defaults={"currency": "USD", "affiliate": "7"})
    base = {"transaction_id": "c1", "offer_id": "5", "status": "approved"}
    for n in range(MAX_LAYOUTS + 20):
        params = {**base, f"note{n}": "x", "aff_sub": str(n), "goal": "lead"}
        new = outcome(source.to_conversion, params)
        assert new == outcome(reference_to_conversion, source, params)
        assert list(new[1].fields.items()) == [("currency", "USD"), ("sub1", str(n)),
                                               ("sub2", str(n))]  # fmt: skip
        assert list(new[1].extra.items()) == [(f"note{n}", "x"), ("goal", "lead")]
    assert len(source._layouts) == MAX_LAYOUTS
    # the same names again, from the kept layout, and in another order (another layout)
    again = {**base, "note3": "y", "aff_sub": "", "goal": "sale"}
    assert outcome(source.to_conversion, again) == outcome(reference_to_conversion, source, again)
    turned = dict(reversed(again.items()))
    assert outcome(source.to_conversion, turned) == outcome(reference_to_conversion, source, turned)


@given(
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), UTC])),
    st.booleans(),
)
@settings(max_examples=1500, deadline=None)
def test_utc_text_writes_what_isoformat_wrote(moment: datetime, whole: bool) -> None:
    """Rule data's received_at: the text isoformat gave (in UTC, `Z` for `+00:00`, no fraction
    for a whole second), through UtcText's once-a-second prefix for UTC moments."""
    if whole:
        moment = moment.replace(microsecond=0)
    try:
        expected = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:  # out of range once in UTC: never a received_at
        return
    assert utc_text(moment) == expected
    # the same second again (the kept prefix), then the next one
    assert utc_text(moment.replace(microsecond=7)) == moment.astimezone(UTC).replace(
        microsecond=7
    ).isoformat().replace("+00:00", "Z")
    if moment.astimezone(UTC).year < 9999:
        later = moment + timedelta(seconds=1)
        assert utc_text(later) == later.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_utc_text_reads_the_clock_when_given_no_time() -> None:
    ns = iter([1_765_000_000_123_456_789, 1_765_000_001_000_000_999])
    text = UtcText(lambda: next(ns))
    assert text() == "2025-12-06T05:46:40.123456Z"
    assert text() == "2025-12-06T05:46:41Z"
