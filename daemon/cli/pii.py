"""Personal data (email, phone, IP address and the other PII fields of SPEC 14) masked in
every command-line output unless --show-pii: by field name in a conversion's fields, and in
request texts, URLs, bodies and response excerpts as the conversion's own values, by parameter
name, and (emails and phone numbers) by shape."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

import click

from daemon.models import PII_FIELDS

MASK = "***"
PII_KEYS = frozenset(PII_FIELDS) | {"ip_address", "mobile", "msisdn", "tel", "telephone", "e-mail"}
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", re.IGNORECASE
)
_PHONE = re.compile(r"(?:\+|%2B)\d[\d .()/-]{6,18}\d")
_keys = "|".join(sorted((re.escape(k) for k in PII_KEYS), key=len, reverse=True))
# key=value in a query or form body, and "key": "value" in JSON, for the PII names.
_PARAM = re.compile(rf"(?i)(?<![\w.])((?:{_keys})=)([^&\s#]*)")
_JSON = re.compile(rf'(?i)("(?:{_keys})"\s*:\s*)"((?:[^"\\]|\\.)*)"')

show_pii_option = click.option(
    "--show-pii", is_flag=True, help="Show personal data (email, phone, IP...) unmasked."
)


def mask_text(text: str, values: Iterable[str] = ()) -> str:
    """The text with the conversion's own personal values (`values`, as written and URL- or
    form-encoded), every email and phone number, and every value of a PII-named parameter
    replaced by ***. IP addresses are masked by name (ip=..., "ip": ...) and as the
    conversion's values, not by shape: a destination host is not personal data."""
    for value in sorted({v for v in values if len(v) >= 3}, key=len, reverse=True):
        for form in {value, quote(value, safe=""), quote_plus(value, safe="")}:
            text = text.replace(form, MASK)
    text = _PARAM.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)
    text = _JSON.sub(lambda m: f'{m.group(1)}"{MASK}"', text)
    for pattern in (_EMAIL, _PHONE):
        text = pattern.sub(MASK, text)
    return text


def personal_values(fields: Mapping[str, Any]) -> list[str]:
    """The values of a conversion's PII fields (extra ones with PII names included)."""
    found = [str(v) for k, v in fields.items() if k.lower() in PII_KEYS and v]
    extra = fields.get("extra")
    if isinstance(extra, Mapping):
        found += [str(v) for k, v in extra.items() if str(k).lower() in PII_KEYS and v]
    return found


def mask(value: Any, key: str = "", show: bool = False, values: Sequence[str] = ()) -> Any:
    """A JSON-like value with PII masked (nothing changes when `show`)."""
    if show:
        return value
    if isinstance(value, Mapping):
        return {k: mask(v, str(k), values=values) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key, values=values) for v in value]
    if isinstance(value, str):
        if key.lower() in PII_KEYS and value:
            return MASK
        return mask_text(value, values)
    return value
