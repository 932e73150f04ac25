"""facebook_conversion: one Meta Conversions API event per delivery, user data hashed as Meta asks.

Wire protocol: https://developers.facebook.com/docs/marketing-api/conversions-api/using-the-api
(form fields `data`, `access_token`, `test_event_code`); normalisation and hashing:
https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

from pydantic import Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    BaseUrlStr,
    Job,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import InputError, PermanentError, RenderError, RetryableError
from daemon.httpstatus import HttpResponse, classify_status, parse_retry_after, status_unwell
from daemon.macros import MASK, Template, TemplateStr
from daemon.models import parse_event_time
from daemon.urltemplate import UrlTemplate
from daemon.yamlfile import raw_text

MAX_EVENT_AGE = 7 * 86400  # Meta refuses the whole request past this (parameters/server-event)
ACTION_SOURCES = (
    "website", "email", "app", "phone_call", "chat", "physical_store", "system_generated",
    "business_messaging", "other",
)  # fmt: skip
# external_id: hashing is only recommended, but it is often an email or a phone number.
HASHED_KEYS = frozenset(
    {"em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id"}
)
# Sent as they are: Meta matches these raw, and a hash would make them useless.
PLAIN_KEYS = frozenset(
    {"client_ip_address", "client_user_agent", "fbc", "fbp", "lead_id", "fb_login_id"}
)
# user_data key=canonical field it renders by default (a rule overrides keys one by one).
_DEFAULTS = (
    "em=email ph=phone fn=first_name ln=last_name ct=city st=state zp=zip country=country db=dob"
    " external_id=external_id client_ip_address=ip client_user_agent=user_agent fbc=fbc fbp=fbp"
)
DEFAULT_USER_DATA = {k: f"{{{v}}}" for k, v in (pair.split("=") for pair in _DEFAULTS.split())}
# Graph error codes (https://developers.facebook.com/docs/graph-api/guides/error-handling):
# transient (1, 2), throttling (4, 17, 341), "temporarily blocked, wait" (368).
RETRYABLE_CODES = frozenset({1, 2, 4, 17, 341, 368})
PERMANENT_CODES = frozenset({10, 100, 190, *range(200, 300)})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CUSTOM_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")


def digits_text(value: Any, pattern: str, message: str) -> str:
    """A number written in YAML as a number or a string, kept as the text it was written as."""
    text = raw_text(value) if isinstance(value, int | str) else None
    if text is None or not re.fullmatch(pattern, text):
        raise ValueError(message)
    return text


class Settings(ActionSettings):
    type: Literal["facebook_conversion"]
    pixel_id: str
    access_token: SecretTemplateStr
    app_secret: SecretTemplateStr | None = None
    api_version: str = "v25.0"
    base_url: BaseUrlStr = UrlTemplate("https://graph.facebook.com")
    event_name: TemplateStr = Template("Lead")
    action_source: str = "system_generated"
    event_source_url: TemplateStr | None = None
    user_data: dict[str, TemplateStr] = Field(default_factory=dict)
    phone_country_code: str | None = None
    value: TemplateStr = Template("{payout}")
    currency: TemplateStr = Template("{currency}")
    custom_data: dict[str, TemplateStr] = Field(default_factory=dict)
    test_event_code: TemplateStr | None = None
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("pixel_id", mode="before")
    @classmethod
    def _pixel(cls, value: Any) -> str:
        return digits_text(value, r"[0-9]{1,32}", "must be the pixel's number (digits only)")

    @field_validator("api_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"v[0-9]{1,3}\.[0-9]{1,2}", value):
            raise ValueError(f"must look like v25.0, not {value!r}")
        return value

    @field_validator("phone_country_code", mode="before")
    @classmethod
    def _country_code(cls, value: Any) -> str | None:
        message = "must be 1 to 3 digits without + (1, 44, 380)"
        return None if value is None else digits_text(value, r"[1-9][0-9]{0,2}", message)

    @field_validator("action_source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value not in ACTION_SOURCES:
            raise ValueError(f"must be one of {', '.join(ACTION_SOURCES)}, not {value!r}")
        return value

    @field_validator("user_data")
    @classmethod
    def _user_keys(cls, value: dict[str, Template]) -> dict[str, Template]:
        for key in value:
            if key not in HASHED_KEYS | PLAIN_KEYS:
                known = ", ".join(sorted(HASHED_KEYS | PLAIN_KEYS))
                raise ValueError(f"unknown key {key!r} (known: {known})")
        return value

    @field_validator("custom_data")
    @classmethod
    def _custom_keys(cls, value: dict[str, Template]) -> dict[str, Template]:
        for key in value:
            if key in ("value", "currency"):
                raise ValueError(f"{key!r} is set by the `{key}` setting, not here")
            if not _CUSTOM_KEY.fullmatch(key):
                raise ValueError(f"key {key!r} is not a lower-case identifier")
        return value

    @model_validator(mode="after")
    def _website(self) -> Settings:
        if self.action_source == "website" and self.event_source_url is None:
            raise ValueError("action_source website needs event_source_url")
        return self

    def user_templates(self) -> dict[str, Template]:
        """The user_data mapping: the defaults, overridden key by key by the rule's own."""
        merged = {key: Template(text) for key, text in DEFAULT_USER_DATA.items()}
        merged.update(self.user_data)
        return merged


# --- normalisation (customer-information-parameters, and the official SDK's normalize.py) ---


def _letters(value: str) -> str:
    return "".join(c for c in value if c.isalpha())


def _no_punctuation(value: str) -> str:
    return "".join(c for c in value if not unicodedata.category(c).startswith("P")).strip()


def _phone(value: str, country_code: str | None) -> str:
    digits = re.sub(r"\D", "", value)
    if value.startswith("+"):
        return digits
    if digits.startswith("00"):  # international call prefix before the country code
        return digits[2:]
    if country_code is None:
        return digits
    if digits.startswith("0"):  # national trunk prefix: 07911 123456 -> 44 7911 123456
        return country_code + digits[1:]
    return digits if digits.startswith(country_code) else country_code + digits


def _birth_date(value: str) -> str:
    """YYYYMMDD from YYYY-MM-DD, YYYYMMDD or MM/DD/YYYY; "" when it is not a real date."""
    if m := re.fullmatch(r"(\d{4})-?(\d{1,2})-?(\d{1,2})", value):
        year, month, day = m.groups()
    elif m := re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{4})", value):
        month, day, year = m.groups()
    else:
        return ""
    try:
        return date(int(year), int(month), int(day)).strftime("%Y%m%d")
    except ValueError:
        return ""


def normalise(key: str, raw: str, country_code: str | None = None) -> str:
    """The value Meta hashes for `key` (lower case, trimmed, per-key rules); "" when nothing
    usable is left. A value that already is a SHA-256 hex digest is returned as it is."""
    value = raw.strip().lower()
    if not value or _HEX64.fullmatch(value):
        return value
    if key == "ph":
        return _phone(value, country_code)
    if key in ("fn", "ln"):
        return _no_punctuation(value)
    if key in ("ct", "st"):
        return _letters(value)
    if key == "zp":
        return re.sub(r"\s", "", value).split("-")[0]
    if key == "country":
        letters = _letters(value)
        return letters if len(letters) == 2 else ""
    if key == "ge":
        return value[0] if value[0] in "fm" else ""
    if key == "db":
        return _birth_date(value)
    return value


def hashed(key: str, raw: str, country_code: str | None = None) -> str | None:
    value = normalise(key, raw, country_code)
    if not value or _HEX64.fullmatch(value):
        return value or None
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# --- the action ---------------------------------------------------------------------------


def event_time(job: Job, now: float) -> int:
    """The conversion's event_time, else the time it was received, else now (unix seconds);
    never in the future, which Meta refuses (a tracker's clock may run ahead)."""
    for name in ("event_time", "received_at"):
        text = job.values.get(name, "")
        if text:
            try:
                return int(min(parse_event_time(text).timestamp(), now))
            except InputError:
                continue
    return int(now)


class FacebookConversion:
    idempotent: ClassVar[bool] = True  # event_id (the idempotency key) dedupes at Meta

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._user = settings.user_templates()
        base = settings.base_url.source.rstrip("/")
        self.url = f"{base}/{settings.api_version}/{settings.pixel_id}/events"

    @property
    def destination(self) -> str:
        return origin(self.settings.base_url)

    def event(
        self, job: Job, when: int, secret: Callable[[str], str] | None = None
    ) -> dict[str, Any]:
        s = self.settings

        def render(template: Template) -> str:
            return template.render(job.values, secret=secret)

        name = render(s.event_name)
        if not name:
            raise RenderError("event_name renders empty")
        event: dict[str, Any] = {
            "event_name": name,
            "event_time": when,
            "event_id": job.idempotency_key,
            "action_source": s.action_source,
        }
        if s.event_source_url is not None:
            event["event_source_url"] = render(s.event_source_url)
        event["user_data"] = self._user_data(render)
        custom = self._custom_data(render)
        if custom:
            event["custom_data"] = custom
        return event

    def _user_data(self, render: Callable[[Template], str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, template in self._user.items():
            raw = render(template)
            if key in PLAIN_KEYS:
                if raw.strip():
                    out[key] = raw.strip()
            elif (digest := hashed(key, raw, self.settings.phone_country_code)) is not None:
                out[key] = [digest]
        return out

    def _custom_data(self, render: Callable[[Template], str]) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {}
        value = render(s.value).strip()
        if value:
            try:
                number = Decimal(value)
            except InvalidOperation as err:
                raise RenderError("value: not a number") from err
            if not number.is_finite():
                raise RenderError("value: not a finite number")
            out["value"] = float(number)
        currency = render(s.currency).strip().lower()
        if currency:
            if not re.fullmatch(r"[a-z]{3}", currency):
                raise RenderError("currency: not a 3-letter ISO 4217 code")
            out["currency"] = currency
        for key, template in s.custom_data.items():
            if text := render(template):
                out[key] = text
        return out

    def _form(self, job: Job, when: int, secret: Callable[[str], str] | None) -> bytes:
        s = self.settings
        event = self.event(job, when, secret)
        data = json.dumps([event], ensure_ascii=False, separators=(",", ":"))
        fields = [("data", data)]
        token = s.access_token.render({}, secret=secret)
        fields.append(("access_token", token))
        if s.app_secret is not None:
            proof = MASK
            if secret is not None:
                key = s.app_secret.render({}, secret=secret).encode()
                proof = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
                job.redactor.add(proof)  # it grants what the token grants
            fields.append(("appsecret_proof", proof))
        code = s.test_event_code.render(job.values, secret=secret) if s.test_event_code else ""
        if code:
            fields.append(("test_event_code", code))
        return urlencode(fields, safe="*").encode()

    def preview(self, job: Job) -> RequestRecord:
        body = self._form(job, event_time(job, self.resources.clock.now()), None)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return RequestRecord("POST", self.url, headers, body.decode())

    async def send(self, job: Job) -> None:
        now = self.resources.clock.now()
        when = event_time(job, now)
        if now - when > MAX_EVENT_AGE:
            # One event over 7 days old makes Meta refuse the whole request (code 100).
            raise PermanentError("event_too_old", f"event_time is {int(now - when)} s old")
        body = self._form(job, when, secret_lookup(job, self.resources))
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        response = await send_http(self, job, "POST", self.url, headers, body)
        check_answer(response, now)


def check_answer(response: HttpResponse, now: float) -> None:
    """Success is a 2xx whose `events_received` is at least 1; a Graph error object decides by
    its code; anything else falls back to the shared status classifier."""
    try:
        body = json.loads(response.body)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(error, dict) and isinstance(code, int) and not isinstance(code, bool):
        _raise_graph_error(response, code, error, now)
    classify_status(response, now)
    received = body.get("events_received") if isinstance(body, dict) else None
    if not isinstance(received, int) or isinstance(received, bool):
        # A proxy's page or a cut answer: the event_id makes trying again safe.
        raise RetryableError("bad_response", "no events_received in the answer")
    if received < 1:
        raise PermanentError("events_not_received")


def _raise_graph_error(
    response: HttpResponse, code: int, error: Mapping[str, Any], now: float
) -> None:
    subcode = error.get("error_subcode")
    trace = error.get("fbtrace_id")
    detail = f"HTTP {response.status}, code {code}" + (f"/{subcode}" if subcode else "")
    detail += f", fbtrace_id {trace}" if isinstance(trace, str) else ""
    reason = f"graph_{code}"
    retryable = code in RETRYABLE_CODES or (
        code not in PERMANENT_CODES and (response.status >= 500 or response.status == 429)
    )
    if retryable:
        after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RetryableError(
            reason, detail, retry_after=after, unwell=status_unwell(response.status)
        )
    raise PermanentError(reason, detail, unwell=status_unwell(response.status))


def build(settings: Settings, resources: Resources) -> FacebookConversion:
    return FacebookConversion(settings, resources)
