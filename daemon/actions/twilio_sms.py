"""twilio_sms: one SMS through Twilio's Messages API, the recipient normalised to E.164."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import ClassVar, Literal
from urllib.parse import quote, urlencode

from pydantic import ConfigDict, Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    Job,
    LiteralUrlStr,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    is_secret_reference,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import OutcomeUnknownError, PermanentError, RetryableError
from daemon.httpstatus import HttpResponse, parse_retry_after, status_unwell
from daemon.macros import Template, TemplateStr, encode_header
from daemon.urltemplate import UrlTemplate, UrlTemplateStr

API_BASE = "https://api.twilio.com"
MAX_BODY = 1600  # https://www.twilio.com/docs/messaging/api/message-resource (Body)
# https://www.twilio.com/docs/api/errors/20429: "never processed and is always safe to retry".
TOO_MANY_REQUESTS = 20429
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_API_KEY_SID = re.compile(r"^SK[0-9a-fA-F]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
_COUNTRY_CODE = re.compile(r"^[1-9][0-9]{0,2}$")
# What people put between the digits of a phone number.
_SEPARATORS = re.compile(r"[\s().\-/]")
_E164_DIGITS = re.compile(r"^[1-9][0-9]{6,14}$")


def normalize_e164(raw: str, country_code: str = "1") -> str | None:
    """`raw` as an E.164 number (`+15551234567`), or None when it cannot be one. A number
    without `+` or `00` is national: `country_code` is prefixed after dropping a trunk `0`; in
    the North American plan (`1`) 10 digits get the `1` and 11 digits must start with it."""
    text = _SEPARATORS.sub("", raw)
    if text.startswith("+"):
        digits = text[1:]
    elif text.startswith("00"):
        digits = text[2:]
    elif text.isascii() and text.isdigit():
        digits = _international(text, country_code) or ""
    else:
        return None
    if not (digits.isascii() and _E164_DIGITS.match(digits)):
        return None
    if digits.startswith("1") and (len(digits) != 11 or digits[1] in "01"):
        return None  # NANP: a 3-digit area code that starts with 2-9, then 7 digits
    return "+" + digits


def _international(national: str, country_code: str) -> str | None:
    if country_code == "1":
        if len(national) == 10:
            return "1" + national
        return national if len(national) == 11 and national.startswith("1") else None
    if national.startswith("0"):
        return country_code + national[1:]
    if national.startswith(country_code) and len(national) >= len(country_code) + 7:
        return national  # already carries its country code
    return country_code + national


def _sid_or_secret(value: Template | None, pattern: re.Pattern[str], what: str) -> None:
    if value is None or is_secret_reference(value) or pattern.match(value.source):
        return
    raise ValueError(f"must be {what} or a ${{secret:NAME}} reference")


class Settings(ActionSettings):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["twilio_sms"]
    account_sid: TemplateStr
    auth_token: SecretTemplateStr | None = None
    api_key_sid: TemplateStr | None = None
    api_key_secret: SecretTemplateStr | None = None
    to: TemplateStr
    from_: TemplateStr | None = Field(default=None, alias="from")
    messaging_service_sid: TemplateStr | None = None
    body: TemplateStr
    status_callback: UrlTemplateStr | None = None
    default_country_code: str = "1"
    base_url: LiteralUrlStr = Field(default_factory=lambda: UrlTemplate(API_BASE))
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("account_sid")
    @classmethod
    def _account(cls, value: Template) -> Template:
        _sid_or_secret(value, _ACCOUNT_SID, "an Account SID (AC and 32 hex digits)")
        return value

    @field_validator("api_key_sid")
    @classmethod
    def _key_sid(cls, value: Template | None) -> Template | None:
        _sid_or_secret(value, _API_KEY_SID, "an API key SID (SK and 32 hex digits)")
        return value

    @field_validator("messaging_service_sid")
    @classmethod
    def _service(cls, value: Template | None) -> Template | None:
        _sid_or_secret(value, _SERVICE_SID, "a Messaging Service SID (MG and 32 hex digits)")
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: Template) -> Template:
        if len(value.render({})) > MAX_BODY:
            raise ValueError(f"is longer than {MAX_BODY} characters before any macro")
        return value

    @field_validator("default_country_code")
    @classmethod
    def _country(cls, value: str) -> str:
        if not _COUNTRY_CODE.match(value):
            raise ValueError("must be a country calling code such as 1, 44 or 353, without +")
        return value

    @model_validator(mode="after")
    def _choices(self) -> Settings:
        key = (self.api_key_sid is not None, self.api_key_secret is not None)
        if key[0] != key[1]:
            raise ValueError("api_key_sid and api_key_secret go together")
        if (self.auth_token is not None) == key[0]:
            raise ValueError("give either auth_token or api_key_sid with api_key_secret")
        if (self.from_ is None) == (self.messaging_service_sid is None):
            raise ValueError("give either from or messaging_service_sid")
        return self


class TwilioSms:
    idempotent: ClassVar[bool] = False  # the Messages API has no idempotency key

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._base = settings.base_url.source.rstrip("/")
        self._origin = origin(settings.base_url)

    @property
    def destination(self) -> str:
        return self._origin

    def _render(
        self, job: Job, secret: Callable[[str], str] | None
    ) -> tuple[str, dict[str, str], bytes]:
        s = self.settings
        sid = s.account_sid.render(job.values, secret=secret)
        if secret is not None and not _ACCOUNT_SID.match(sid):
            raise PermanentError("bad_account_sid", "the account SID is not AC and 32 hex digits")
        login, password = self._credentials(job, sid, secret)
        credentials = base64.b64encode(f"{login}:{password}".encode()).decode()
        headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        url = f"{self._base}/2010-04-01/Accounts/{quote(sid, safe='*')}/Messages.json"
        return url, headers, urlencode(self._fields(job, secret), safe="*").encode()

    def _credentials(
        self, job: Job, sid: str, secret: Callable[[str], str] | None
    ) -> tuple[str, str]:
        """Basic auth: the account SID and its auth token, or an API key SID and its secret."""
        s = self.settings
        if s.auth_token is not None:
            return sid, s.auth_token.render(job.values, encode=encode_header, secret=secret)
        assert s.api_key_sid is not None
        assert s.api_key_secret is not None
        key_sid = s.api_key_sid.render(job.values, secret=secret)
        if secret is not None and not _API_KEY_SID.match(key_sid):
            raise PermanentError("bad_api_key_sid", "the API key SID is not SK and 32 hex digits")
        return key_sid, s.api_key_secret.render(job.values, encode=encode_header, secret=secret)

    def _fields(self, job: Job, secret: Callable[[str], str] | None) -> list[tuple[str, str]]:
        s = self.settings
        values = job.values
        to_raw = s.to.render(values, secret=secret)
        to = normalize_e164(to_raw, s.default_country_code)
        if to is None:
            # No digits of the value in the detail: a phone number is personal data.
            reason = "invalid_to" if to_raw.strip() else "missing_to"
            raise PermanentError(reason, "`to` does not render to a phone number")
        fields = [("To", to)]
        if s.from_ is not None:
            fields.append(("From", s.from_.render(values, secret=secret)))
        else:
            assert s.messaging_service_sid is not None
            fields.append(
                ("MessagingServiceSid", s.messaging_service_sid.render(values, secret=secret))
            )
        body = s.body.render(values, secret=secret)
        if len(body) > MAX_BODY:
            raise PermanentError(
                "body_too_long", f"{len(body)} characters, Twilio takes {MAX_BODY}"
            )
        fields.append(("Body", body))
        if s.status_callback is not None:
            fields.append(("StatusCallback", s.status_callback.render_url(values, secret=secret)))
        return fields

    def preview(self, job: Job) -> RequestRecord:
        url, headers, body = self._render(job, None)
        return RequestRecord("POST", url, job.redactor.headers(headers), body.decode())

    async def send(self, job: Job) -> None:
        url, headers, body = self._render(job, secret_lookup(job, self.resources))
        response = await send_http(self, job, "POST", url, headers, body)
        _outcome(response, self.resources.clock.now())


def _outcome(response: HttpResponse, now: float) -> None:
    """Twilio answers 201 with the message's `sid`, or an error status with a JSON `code`
    (https://www.twilio.com/docs/usage/twilios-response)."""
    status = response.status
    try:
        answer = json.loads(response.body)
    except ValueError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if 200 <= status < 300:
        if isinstance(answer.get("sid"), str):
            return
        raise OutcomeUnknownError(f"http_{status} without a message sid")
    code = answer.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if status == 429 or code == TOO_MANY_REQUESTS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        reason = f"twilio_{code}" if code is not None else "http_429"
        raise RetryableError(reason, retry_after=retry_after, unwell=status_unwell(status))
    if status >= 500:
        # The message may have been queued before the failure: a resend could double-text.
        raise OutcomeUnknownError(f"http_{status}", unwell=True)
    raise PermanentError(f"twilio_{code}" if code is not None else f"http_{status}")


def build(settings: Settings, resources: Resources) -> TwilioSms:
    return TwilioSms(settings, resources)
