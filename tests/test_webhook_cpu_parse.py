"""The webhook's parsing shortcuts decide exactly as the code they shortcut: parse_decimal's
plain-amount path and the amounts it keeps, Conversion.parse without a check_value call per
short printable value, without the dict of decimals, without the dataclass's __init__ (the same
object), without the currency's regex and with its other fields copied rather than filtered.
Each is compared with the form it replaced (kept here as the reference), on generated
inputs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import models
from daemon.errors import InputError
from daemon.models import (
    _CANONICAL,
    _REQUIRED,
    DECIMAL_FIELDS,
    MAX_VALUE_LENGTH,
    REQUIRED_FIELDS,
    STATUS_OF,
    Conversion,
    check_value,
    parse_decimal,
    parse_event_time,
)

_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def reference_decimal(name: str, value: str) -> Decimal:
    """parse_decimal as it was written before its plain-amount path."""
    text = value.strip(" ")
    try:
        number = Decimal(text)
    except InvalidOperation as err:
        raise InputError("not a decimal number", name) from err
    if number.is_finite() and not _DECIMAL.fullmatch(text):
        raise InputError("not a decimal number (ASCII digits, e.g. 12.50)", name)
    if not number.is_finite() or not math.isfinite(float(number)):
        raise InputError("not a finite decimal number", name)
    if number < 0:
        raise InputError("must not be negative", name)
    return number


def reference_parse(params: Mapping[str, str], extra: Mapping[str, str] | None = None) -> Any:
    """Conversion.parse as it was written before (a check_value call per value)."""
    for name, value in params.items():
        check_value(name, value)
    for name, value in (extra or {}).items():
        check_value(f"extra.{name}", value)
    for name in REQUIRED_FIELDS:
        if not params.get(name, "").strip():
            raise InputError("required field missing", name)
    status = STATUS_OF.get(params["status"].strip().lower())
    if status is None:
        raise InputError("unknown status value", "status")
    currency = params.get("currency", "")
    if currency and not _CURRENCY.match(currency):
        raise InputError("not an ISO 4217 currency code", "currency")
    decimals = {n: reference_decimal(n, params[n]) for n in DECIMAL_FIELDS if params.get(n)}
    event_time = parse_event_time(params["event_time"]) if params.get("event_time") else None
    if not _CANONICAL.issuperset(params):
        raise InputError("not a canonical field", min(set(params) - _CANONICAL))
    rest = {k: v for k, v in params.items() if k not in _REQUIRED and v != ""}
    return Conversion(
        conversion_id=params["conversion_id"].strip(),
        offer=params["offer"].strip(),
        affiliate=params["affiliate"].strip(),
        status=status,
        fields=rest,
        extra=dict(extra or {}),
        payout=decimals.get("payout"),
        revenue=decimals.get("revenue"),
        event_time=event_time,
    )


def outcome(call: Any, *args: Any) -> Any:
    try:
        result = call(*args)
    except InputError as err:
        return ("error", err.message, err.field)
    if isinstance(result, Decimal):  # the same number written the same way (12.50, not 12.5)
        return ("ok", str(result), result.as_tuple())
    if isinstance(result, Conversion):  # every attribute, in order (dicts' order too)
        attributes = [
            (k, list(v.items()) if isinstance(v, dict) else v) for k, v in vars(result).items()
        ]
        return ("ok", result, attributes)
    return ("ok", result)


AMOUNT_PIECES = st.sampled_from(
    ["0", "1", "9", "12", "50", ".", "-", "+", "e", "E", "5", " ", "٣", "_", "0" * 18, "9" * 19,
     "inf", "nan", "x", "\t", "1e999", "00"]
)  # fmt: skip


@given(st.lists(AMOUNT_PIECES, max_size=8).map("".join))
@settings(max_examples=1500, deadline=None)
def test_parse_decimal_decides_as_before(text: str) -> None:
    assert outcome(parse_decimal, "payout", text) == outcome(reference_decimal, "payout", text)


def test_parse_decimal_plain_amounts() -> None:
    for text in ["12.50", "0", "12.", "000123.4500", " 7 ", "9" * 18 + "." + "9" * 18]:
        assert outcome(parse_decimal, "p", text) == outcome(reference_decimal, "p", text)
        assert outcome(parse_decimal, "p", text)[0] == "ok"
    for text in ["-0", "-1", "1e999", "٣", ".5", "1_000", "", " ", "NaN", "9" * 400]:
        assert outcome(parse_decimal, "p", text) == outcome(reference_decimal, "p", text)


VALUES = st.sampled_from(
    ["", " ", "x", "42", "approved", " Approved ", "pending", "nope", "12.50", "-1", "1e999",
     "USD", "usd", "US1", "ÉÉÉ", "ǅǅǅ", "EU", "EURO", "U D", "a\nb", "a\x85b", "\ud800", "é", "a" * MAX_VALUE_LENGTH,
     "a" * (MAX_VALUE_LENGTH + 1), "2026-12-01T10:00:00Z", "1780000000", "tomorrow"]
)  # fmt: skip
NAMES = st.sampled_from(
    [*REQUIRED_FIELDS, "payout", "revenue", "currency", "event_time", "sub1", "email", "goal",
     "nope"]
)  # fmt: skip


@given(
    st.dictionaries(NAMES, VALUES, max_size=10),
    st.none() | st.dictionaries(st.sampled_from(["note", "a.b", "x"]), VALUES, max_size=3),
)
@settings(max_examples=1500, deadline=None)
def test_conversion_parse_decides_as_before(
    params: dict[str, str], extra: dict[str, str] | None
) -> None:
    base = {"conversion_id": "c1", "offer": "1", "affiliate": "7", "status": "approved"}
    for given_params in (params, {**base, **params}):
        assert outcome(Conversion.parse, given_params, extra) == outcome(
            reference_parse, given_params, extra
        )


def test_parse_decimal_keeps_a_bounded_number_of_amounts() -> None:
    """The plain amounts read are kept, at most _PLAIN_KEPT of them; past that an amount is
    read again each time, to the same number. What is refused is never kept."""
    models._PLAIN_READ.clear()
    try:
        first = parse_decimal("payout", "12.50")
        assert parse_decimal("payout", "12.50") is first  # kept: the same object
        for text in ["-1", "1e999", "x", " 3 "]:
            outcome(parse_decimal, "payout", text)
        assert "-1" not in models._PLAIN_READ
        assert "1e999" not in models._PLAIN_READ
        assert parse_decimal("payout", " 3 ") == Decimal("3")
        assert " 3 " not in models._PLAIN_READ  # only amounts sent without spaces are kept
        for n in range(models._PLAIN_KEPT + 10):
            assert outcome(parse_decimal, "p", f"{n}.5") == outcome(
                reference_decimal, "p", f"{n}.5"
            )
        assert len(models._PLAIN_READ) == models._PLAIN_KEPT
        late = f"{models._PLAIN_KEPT + 5}.5"
        assert parse_decimal("p", late) == Decimal(late)
        assert late not in models._PLAIN_READ
    finally:
        models._PLAIN_READ.clear()
