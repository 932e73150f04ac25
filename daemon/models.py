"""The conversion: its canonical fields, its statuses and triggers, and the data rules see."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import orjson

from daemon.errors import InputError


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class Trigger(StrEnum):
    PENDING = "conversion_pending"
    DONE = "conversion_done"
    REJECT = "conversion_reject"


class Transition(StrEnum):
    NEW = "new"
    STATUS_CHANGED = "status_changed"
    DUPLICATE = "duplicate"
    STALE = "stale"


STATUS_OF: Mapping[str, Status] = {status.value: status for status in Status}
TRIGGER_OF_STATUS: Mapping[Status, Trigger] = {
    Status.PENDING: Trigger.PENDING,
    Status.APPROVED: Trigger.DONE,
    Status.REJECTED: Trigger.REJECT,
}

REQUIRED_FIELDS = ("conversion_id", "offer", "affiliate", "status")
LEAD_FIELDS = (
    "email",
    "phone",
    "first_name",
    "last_name",
    "address",
    "city",
    "state",
    "zip",
    "country",
    "dob",
    "ip",
    "user_agent",
    "trusted_form_cert_url",
    "fbc",
    "fbp",
    "ga_client_id",
    "external_id",
)
SUB_FIELDS = tuple(f"sub{i}" for i in range(1, 11)) + tuple(f"adv{i}" for i in range(1, 6))
DECIMAL_FIELDS = ("payout", "revenue")
CANONICAL_FIELDS: tuple[str, ...] = (
    "conversion_id",
    "offer",
    "affiliate",
    "goal",
    "status",
    "click_id",
    "payout",
    "revenue",
    "currency",
    "event_time",
    *SUB_FIELDS,
    *LEAD_FIELDS,
)
_CANONICAL = frozenset(CANONICAL_FIELDS)
_STR = frozenset({str})
_REQUIRED = frozenset(REQUIRED_FIELDS)
# What a rule may read besides the canonical fields (SPEC 5).
CONTEXT_FIELDS = ("source", "transition", "previous_status", "trigger", "received_at")
# Fields logged only masked while log.mask_pii is on (SPEC 14).
PII_FIELDS = frozenset(
    {"email", "phone", "first_name", "last_name", "address", "dob", "ip", "external_id"}
)

MAX_VALUE_LENGTH = 1024
# Every control character (C0, DEL, C1): a CR or LF in a value would split a header, a log line
# or a CSV row of some destination downstream (SPEC 6: a 400).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Payout and revenue as trackers write them: ASCII digits only (`٣` and `1_000` are not
# numbers here, though Python's Decimal reads them), an optional fraction and exponent.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The amounts trackers send, which pass every check of parse_decimal.
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,18}(?:\.[0-9]{0,18})?")
_UNIX_TIME = re.compile(r"[0-9]{1,12}(?:\.[0-9]+)?")


def check_value(name: str, value: str) -> str:
    """Refuse what no tracker legitimately sends: over-long values, control characters (CR, LF
    and tab included), lone surrogates."""
    if len(value) > MAX_VALUE_LENGTH:
        raise InputError(f"value longer than {MAX_VALUE_LENGTH} characters", name)
    # The common case, decided cheaply: str.isprintable() is false for every control character
    # (Unicode category Cc: C0, DEL and C1) and every lone surrogate (Cs), among others, so a
    # printable value needs neither check below.
    if value.isprintable():
        return value
    if _CONTROL.search(value):
        raise InputError("value contains control characters", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError("value contains a lone surrogate", name) from err
    return value


# The plain amounts read so far (Decimals are immutable), at most _PLAIN_KEPT, each as sent
# without spaces around it (so at most 37 characters): trackers send the same few payouts
# again and again, and a lookup costs a tenth of the match and the parse.
_PLAIN_READ: dict[str, Decimal] = {}
_PLAIN_KEPT = 1024


def parse_decimal(name: str, value: str) -> Decimal:
    number = _PLAIN_READ.get(value)
    if number is not None:
        return number
    text = value.strip(" ")
    if _PLAIN_DECIMAL.fullmatch(text):
        # At most 18 ASCII digits either side of an optional point (12.50): a finite
        # Decimal, not negative, whose float is finite; every check below would pass.
        number = Decimal(text)
        if text is value and len(_PLAIN_READ) < _PLAIN_KEPT:  # (strip kept it as it was)
            _PLAIN_READ[value] = number
        return number
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


def parse_event_time(value: str) -> datetime:
    """An ISO 8601 time (UTC when it has no offset) or unix seconds, in ASCII; one that is out
    of range once in UTC (year 1 at +14:00, year 9999 at -14:00) is refused like any bad
    time, not left to overflow where it is compared or stored."""
    text = value.strip(" ")
    problem = "not an ISO 8601 time or unix seconds"
    if not text.isascii():
        raise InputError(problem, "event_time")
    try:
        if _UNIX_TIME.fullmatch(text):
            return datetime.fromtimestamp(float(text), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError) as err:
        raise InputError(problem, "event_time") from err
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        parsed.astimezone(UTC)
    except OverflowError as err:
        raise InputError("time out of range (years 1 to 9999 in UTC)", "event_time") from err
    return parsed


_new_object = object.__new__


@dataclass(frozen=True)
class Conversion:
    """One conversion as a tracker reported it, in canonical fields."""

    conversion_id: str
    offer: str
    affiliate: str
    status: Status
    fields: Mapping[str, str] = field(default_factory=dict)  # every other canonical field, raw
    extra: Mapping[str, str] = field(default_factory=dict)
    payout: Decimal | None = None
    revenue: Decimal | None = None
    event_time: datetime | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str], extra: Mapping[str, str] | None = None) -> Conversion:
        """Build from canonical name -> string value; raise InputError naming the bad field."""
        # check_value's common case (short and printable: it passes) decided here, without a
        # call per value; any other value goes through it and is refused as before.
        for name, value in params.items():
            if len(value) > MAX_VALUE_LENGTH or not value.isprintable():
                check_value(name, value)
        for name, value in (extra or {}).items():
            if len(value) > MAX_VALUE_LENGTH or not value.isprintable():
                check_value(f"extra.{name}", value)
        for name in REQUIRED_FIELDS:
            if not params.get(name, "").strip():
                raise InputError("required field missing", name)
        status = STATUS_OF.get(params["status"].strip().lower())  # Status(...), without the call
        if status is None:
            raise InputError("unknown status value", "status")
        currency = params.get("currency", "")
        # three ASCII letters (what `^[A-Za-z]{3}$` matched, without a regex)
        if currency and not (len(currency) == 3 and currency.isascii() and currency.isalpha()):
            raise InputError("not an ISO 4217 currency code", "currency")
        text = params.get("payout")  # DECIMAL_FIELDS, in their order
        payout = parse_decimal("payout", text) if text else None
        text = params.get("revenue")
        revenue = parse_decimal("revenue", text) if text else None
        event_time = parse_event_time(params["event_time"]) if params.get("event_time") else None
        if not _CANONICAL.issuperset(params):
            raise InputError("not a canonical field", min(set(params) - _CANONICAL))
        # every field but the required ones (each given: checked above), and none empty
        rest = dict(params)
        del rest["conversion_id"], rest["offer"], rest["affiliate"], rest["status"]
        if "" in rest.values():
            rest = {k: v for k, v in rest.items() if v != ""}
        # What the dataclass's __init__ makes (every field set, in its order), without its
        # object.__setattr__ call per field, which a frozen dataclass pays (half the cost of
        # this method); __post_init__ there is none.
        conversion = _new_object(cls)
        conversion.__dict__.update(
            conversion_id=params["conversion_id"].strip(),
            offer=params["offer"].strip(),
            affiliate=params["affiliate"].strip(),
            status=status,
            fields=rest,
            extra=dict(extra or {}),
            payout=payout,
            revenue=revenue,
            event_time=event_time,
        )
        return conversion

    @property
    def trigger(self) -> Trigger:
        return TRIGGER_OF_STATUS[self.status]

    def canonical(self) -> dict[str, str]:
        """Every canonical field that has a value, as the strings the tracker sent."""
        out = {
            "conversion_id": self.conversion_id,
            "offer": self.offer,
            "affiliate": self.affiliate,
            "status": self.status._value_,  # .value without its descriptor (hot path)
        }
        out.update(self.fields)
        return out


def decide_transition(
    current_status: Status | None,
    current_event_time: datetime | None,
    incoming: Conversion,
) -> Transition:
    """The arrival state machine of SPEC 5."""
    if current_status is None:
        return Transition.NEW
    if (
        incoming.event_time is not None
        and current_event_time is not None
        and incoming.event_time < current_event_time
    ):
        return Transition.STALE
    if incoming.status == current_status:
        return Transition.DUPLICATE
    return Transition.STATUS_CHANGED


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


class RuleData(dict[str, Any]):
    """The mapping rule_data makes. `present` holds its members that are not null, in its order,
    made while it is built: what conditions are given (daemon.matching) and what the macro
    values start from, without a walk over every canonical name. None for a conversion outside
    that shortcut (built by hand with fields that are not canonical strings). Not to be changed
    once built."""

    __slots__ = ("plain", "present")
    present: dict[str, Any] | None
    # Whether the engine takes `present` as it is (daemon.conditions.prepare_plain): only JSON
    # types, integers within 64 bits, finite numbers, no lone surrogate; decided while it is
    # built. Matching then neither walks it nor checks it again.
    plain: bool


_DATA = dict.fromkeys(CANONICAL_FIELDS)  # copied per arrival: dict.fromkeys costs ten times more
_POSITION = {name: index for index, name in enumerate(CANONICAL_FIELDS)}
_OPTIONAL = _CANONICAL - _REQUIRED


def _plain_members(present: dict[str, Any], extra: dict[str, Any]) -> bool:
    """Whether the engine takes rule data's `present` as it is. Its members are strings, but
    payout and revenue (numbers from _number) and extra (an object of what the conversion
    carried): an extra of strings by string keys, finite numbers, and text that encodes
    (orjson refuses a lone surrogate and an integer beyond 64 bits, as the engine does)."""
    if extra and not (
        _STR.issuperset(map(type, extra)) and _STR.issuperset(map(type, extra.values()))
    ):
        return False
    for name in ("payout", "revenue"):
        number = present.get(name)
        if type(number) is float and not math.isfinite(number):
            return False
    try:
        orjson.dumps(present)  # (not fastjson: its fallback, json.dumps, takes both)
    except orjson.JSONEncodeError:
        return False
    return True


class UtcText:
    """`moment.astimezone(UTC).isoformat()` with `Z` for `+00:00` (`2026-12-06T21:30:00.123456Z`,
    no fraction when the microseconds are 0), from microseconds since the epoch (by default the
    time now: `clock`, in nanoseconds, as structlog's TimeStamper(fmt="iso", utc=True) reads it,
    rounded down to the microsecond as datetime.now() does), at a third of isoformat's cost: the
    date and time of day are formatted once per second."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._second: tuple[int, str] = (-1, "")  # one attribute: threads see a pair, whole

    def __call__(self, us: int | None = None) -> str:
        if us is None:
            us = self._clock() // 1000
        second, micro = divmod(us, 1_000_000)
        known, prefix = self._second
        if second != known:
            prefix = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat()
            self._second = (second, prefix)
        return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


# The epoch and the microsecond, in which the store keeps times (daemon.store.common.to_us)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
_received_text = UtcText()


def utc_text(moment: datetime) -> str:
    """`moment` in UTC as ISO 8601 text ending in `Z` (rule data's received_at)."""
    if moment.tzinfo is UTC:  # every clock reading: UtcText, without isoformat
        return _received_text((moment - EPOCH) // MICROSECOND)  # (to_us's, inline)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rule_data(
    conversion: Conversion,
    *,
    source: str,
    transition: Transition,
    previous_status: Status | None,
    received_at: datetime,
) -> dict[str, Any]:
    """The mapping that conditions see (JSON values: payout and revenue are numbers)."""
    data = RuleData(_DATA)
    fields = conversion.fields
    # conversion.canonical() written into data directly (the same updates, in the same order,
    # without the dict it builds); ._value_: an Enum member's value without the descriptor
    conversion_id, offer, affiliate = (
        conversion.conversion_id,
        conversion.offer,
        conversion.affiliate,
    )
    status = conversion.status._value_
    data["conversion_id"] = conversion_id
    data["offer"] = offer
    data["affiliate"] = affiliate
    data["status"] = status
    data.update(fields)
    payout, revenue = conversion.payout, conversion.revenue
    data["payout"] = None if payout is None else _number(payout)
    data["revenue"] = None if revenue is None else _number(revenue)
    extra = data["extra"] = dict(conversion.extra)
    data["source"] = source
    data["transition"] = happened = transition._value_
    data["previous_status"] = previous = previous_status._value_ if previous_status else None
    data["trigger"] = trigger = TRIGGER_OF_STATUS[conversion.status]._value_
    data["received_at"] = received = utc_text(received_at)
    data.present = None
    data.plain = False
    if (
        _OPTIONAL.issuperset(fields)
        and _STR.issuperset(map(type, fields.values()))  # (so none of them is null)
        and ("payout" in fields) is (payout is not None)
        and ("revenue" in fields) is (revenue is not None)
        and conversion_id is not None
        and offer is not None
        and affiliate is not None
        and source is not None
    ):
        # The fields sent, in canonical order: goal is the only one before status.
        names = sorted(fields, key=_POSITION.__getitem__)
        present: dict[str, Any] = {
            "conversion_id": conversion_id,
            "offer": offer,
            "affiliate": affiliate,
        }
        if names and names[0] == "goal":
            present["goal"] = fields["goal"]
            del names[0]
        present["status"] = status
        for name in names:
            present[name] = data[name]  # (payout and revenue as numbers)
        present["extra"] = extra
        present["source"] = source
        present["transition"] = happened
        if previous is not None:
            present["previous_status"] = previous
        present["trigger"] = trigger
        present["received_at"] = received
        data.present = present
        data.plain = _plain_members(present, extra)
    return data


def arrival_view(
    conversion: Conversion,
    *,
    source: str,
    transition: Transition,
    previous_status: Status | None,
    received_at: datetime,
) -> tuple[dict[str, Any], dict[str, str]]:
    """What rules see of one arrival: the data of conditions and the values of macros."""
    data = rule_data(
        conversion,
        source=source,
        transition=transition,
        previous_status=previous_status,
        received_at=received_at,
    )
    return data, _view_values(data, conversion)


def _view_values(data: dict[str, Any], conversion: Conversion) -> dict[str, str]:
    """macro_values(data, conversion) for the `data` rule_data made of `conversion`, from its
    members that are not null (RuleData.present): with a source that is a str they are already
    the strings macro_values makes, in its order, except payout and revenue, which get the text
    sent back."""
    present = data.present if type(data) is RuleData else None
    if present is None or type(data["source"]) is not str:
        return macro_values(data, conversion)
    values: dict[str, Any] = present.copy()
    del values["extra"]
    fields = conversion.fields
    if "payout" in fields:
        values["payout"] = fields["payout"]
    if "revenue" in fields:
        values["revenue"] = fields["revenue"]
    for name, value in conversion.extra.items():
        values[f"extra.{name}"] = value
    return values


def macro_values(data: Mapping[str, Any], conversion: Conversion) -> dict[str, str]:
    """The strings that macros render: canonical fields exactly as sent, context as text."""
    values = {
        name: str(value) for name, value in data.items() if value is not None and name != "extra"
    }
    values.update(conversion.canonical())
    for name, value in conversion.extra.items():
        values[f"extra.{name}"] = value
    return values


def attempt_values(
    values: Mapping[str, str],
    *,
    postback_id: int,
    delivery_id: str,
    idempotency_key: str,
    now: float,
    rand: str,
) -> dict[str, str]:
    """The macro values of one attempt: the arrival's values plus the per-attempt macros."""
    out = dict(values)
    out.update(
        postback_id=str(postback_id),
        delivery_id=delivery_id,
        idempotency_key=idempotency_key,
        timestamp=str(int(now)),
        rand=rand,
    )
    return out


def split_params(params: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Canonical fields and `extra` (every other parameter), as the generic source reads them."""
    canonical = {k: v for k, v in params.items() if k in CANONICAL_FIELDS}
    extra = {k: v for k, v in params.items() if k not in CANONICAL_FIELDS}
    return canonical, extra


def scalar_text(value: Any) -> str:
    """A JSON/YAML scalar as the string a tracker would have sent."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    raw = getattr(value, "raw", None)  # a YAML number keeps the text it was written as
    if isinstance(raw, str):
        return raw
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    raise InputError("must be a string or a number")


def conversion_from_mapping(obj: Mapping[str, Any]) -> tuple[Conversion, str]:
    """A conversion written as a JSON/YAML mapping (explain files, rule tests): canonical fields,
    an optional `extra` mapping, an optional `source`; other keys go to extra."""
    source = scalar_text(obj.get("source", "generic")) or "generic"
    params: dict[str, str] = {}
    for key, value in obj.items():
        if key in ("source", "extra"):
            continue
        try:
            params[str(key)] = scalar_text(value)
        except InputError as err:
            raise InputError(err.message, str(key)) from err
    canonical, extra = split_params(params)
    given_extra = obj.get("extra") or {}
    if not isinstance(given_extra, Mapping):
        raise InputError("must be a mapping", "extra")
    for key, value in given_extra.items():
        try:
            extra[str(key)] = scalar_text(value)
        except InputError as err:
            raise InputError(err.message, f"extra.{key}") from err
    return Conversion.parse(canonical, extra), source
