"""Personal data (email, phone, IP address and the other PII fields of SPEC 14) masked in
every command-line output unless --show-pii: by field name in a conversion's fields, and by
shape (or by parameter name) inside request texts, URLs, bodies and response excerpts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import click

from daemon.models import PII_FIELDS

MASK = "***"
PII_KEYS = frozenset(PII_FIELDS) | {"ip_address", "mobile", "msisdn", "tel", "telephone", "e-mail"}
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", re.IGNORECASE
)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
# Full (eight groups) or compressed (with ::): a time such as 12:30:45 is neither.
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}"
    r"|(?=[0-9a-fA-F:]*::)[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7})(?![\w:])"
)
_PHONE = re.compile(r"(?:\+|%2B)\d[\d .()/-]{6,18}\d")
_keys = "|".join(sorted((re.escape(k) for k in PII_KEYS), key=len, reverse=True))
# key=value in a query or form body, and "key": "value" in JSON, for the PII names.
_PARAM = re.compile(rf"(?i)(?<![\w.])((?:{_keys})=)([^&\s#]*)")
_JSON = re.compile(rf'(?i)("(?:{_keys})"\s*:\s*)"((?:[^"\\]|\\.)*)"')

show_pii_option = click.option(
    "--show-pii", is_flag=True, help="Show personal data (email, phone, IP...) unmasked."
)


def mask_text(text: str) -> str:
    """The text with every email, phone number and IP address, and every value of a
    PII-named parameter, replaced by ***."""
    text = _PARAM.sub(lambda m: m.group(1) + (MASK if m.group(2) else ""), text)
    text = _JSON.sub(lambda m: f'{m.group(1)}"{MASK}"', text)
    for pattern in (_EMAIL, _PHONE, _IPV6, _IPV4):
        text = pattern.sub(MASK, text)
    return text


def mask(value: Any, key: str = "", show: bool = False) -> Any:
    """A JSON-like value with PII masked (nothing changes when `show`)."""
    if show:
        return value
    if isinstance(value, Mapping):
        return {k: mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key) for v in value]
    if isinstance(value, str):
        if key.lower() in PII_KEYS and value:
            return MASK
        return mask_text(value)
    return value
