"""google_analytics: one GA4 Measurement Protocol event per delivery, limits checked at load.

Protocol: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events
Limits and reserved names: https://developers.google.com/analytics/devguides/collection/protocol/ga4/reference
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
)

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
from daemon.errors import InputError, PermanentError, RetryableError
from daemon.httpstatus import HttpResponse, classify_status
from daemon.macros import Template, TemplateStr, encode_url_component, parse_template
from daemon.models import parse_event_time
from daemon.urltemplate import UrlTemplate

MAX_EVENT_AGE = 72 * 3600  # timestamp_micros may be backdated by at most 72 hours
MAX_PARAMS = 25
MAX_NAME = 40
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_EVENTS = frozenset(
    """ad_activeview ad_click ad_exposure ad_query ad_reward adunit_exposure app_background
    app_clear_data app_exception app_remove app_store_refund app_store_subscription_cancel
    app_store_subscription_convert app_store_subscription_renew app_update app_upgrade
    dynamic_link_app_open dynamic_link_app_update dynamic_link_first_open error first_open
    first_visit in_app_purchase notification_dismiss notification_foreground notification_open
    notification_receive os_update session_start session_start_with_rollout
    user_engagement""".split()  # noqa: SIM905 -- a word list reads better than 31 lines
)
DEFAULT_PARAMS: Mapping[str, str] = {
    "value": "{payout}",
    "currency": "{currency}",
    "transaction_id": "{conversion_id}",
}
# Sent as JSON numbers: GA only sums numbers (a "12.50" string value is ignored in reports).
NUMERIC_PARAMS = frozenset({"value"})
_NUMERIC_TEMPLATE = re.compile(r"\{(payout|revenue)\}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _param_value(value: Any) -> Any:
    """A param is a text template, or a YAML number or boolean sent as it is."""
    if isinstance(value, Template | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str):
        return parse_template(value)
    raise ValueError("must be a text template, a finite number or true/false")


ParamValue = Annotated[
    Any,
    BeforeValidator(_param_value),
    PlainSerializer(lambda v: v.source if isinstance(v, Template) else v),
]


def check_name(name: str, what: str) -> None:
    """GA4's naming rules for events and params; ValueError saying which one is broken."""
    if name.startswith(RESERVED_PREFIXES):
        raise ValueError(f"{what} {name!r} uses a reserved prefix ({', '.join(RESERVED_PREFIXES)})")
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} {name!r} is longer than {MAX_NAME} characters")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must start with a letter and hold only letters, digits and _"
        )


class Settings(ActionSettings):
    type: Literal["google_analytics"]
    measurement_id: str
    api_secret: SecretTemplateStr
    base_url: BaseUrlStr = UrlTemplate("https://www.google-analytics.com")
    client_id: TemplateStr = Template("{ga_client_id}")
    user_id: TemplateStr | None = None
    event_name: str = "generate_lead"
    max_value_length: int = Field(default=100, ge=1, le=500)  # 500 on GA360 properties
    params: dict[str, ParamValue] = Field(default_factory=dict)
    use_event_time: bool = True
    validate_only: bool = False
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("measurement_id")
    @classmethod
    def _measurement(cls, value: str) -> str:
        if not re.fullmatch(r"G-[A-Z0-9]{4,20}", value):
            raise ValueError(f"must look like G-XXXXXXXXXX, not {value!r}")
        return value

    @field_validator("event_name")
    @classmethod
    def _event(cls, value: str) -> str:
        check_name(value, "event name")
        if value in RESERVED_EVENTS:
            raise ValueError(f"event name {value!r} is reserved by Google Analytics")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        count = len({**DEFAULT_PARAMS, **value})
        if count > MAX_PARAMS:
            defaults = ", ".join(DEFAULT_PARAMS)
            raise ValueError(f"{count} params with the defaults ({defaults}), at most {MAX_PARAMS}")
        limit = info.data.get("max_value_length", 100)
        for name, item in value.items():
            check_name(name, "param")
            literal = isinstance(item, Template) and not item.macros and not item.secrets
            if literal and len(item.render({})) > limit:
                raise ValueError(f"the value of {name!r} is longer than {limit} characters")
        return value

    def all_params(self) -> dict[str, Any]:
        """The default params overridden one by one by the rule's own."""
        merged: dict[str, Any] = {k: Template(v) for k, v in DEFAULT_PARAMS.items()}
        merged.update(self.params)
        return merged


def event_time(job: Job, now: float) -> float:
    """The conversion's event_time, else the time it was received, else now; never ahead of
    now (a tracker's clock may run fast, and GA drops events from the future)."""
    for name in ("event_time", "received_at"):
        text = job.values.get(name, "")
        if text:
            try:
                return min(parse_event_time(text).timestamp(), now)
            except InputError:
                continue
    return now


class GoogleAnalytics:
    # Not idempotent by protocol, but a repeat is one duplicate analytics event carrying the
    # same transaction_id, not harm: retrying beats parking it for an operator.
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._params = settings.all_params()
        path = "/debug/mp/collect" if settings.validate_only else "/mp/collect"
        self._endpoint = settings.base_url.source.rstrip("/") + path

    @property
    def destination(self) -> str:
        return origin(self.settings.base_url)

    def _url(self, secret: Callable[[str], str] | None) -> str:
        api_secret = self.settings.api_secret.render({}, secret=secret)
        query = f"measurement_id={self.settings.measurement_id}"
        return f"{self._endpoint}?{query}&api_secret={encode_url_component(api_secret)}"

    def payload(self, job: Job, now: float, secret: Callable[[str], str] | None) -> dict[str, Any]:
        s = self.settings
        client_id = s.client_id.render(job.values, secret=secret).strip()
        if not client_id:
            raise PermanentError("missing_client_id", "client_id renders empty")
        body: dict[str, Any] = {"client_id": client_id}
        if s.user_id is not None and (user_id := s.user_id.render(job.values, secret=secret)):
            body["user_id"] = user_id
        if s.use_event_time:
            when = event_time(job, now)
            if now - when > MAX_EVENT_AGE:
                raise PermanentError("event_too_old", f"event time is {int(now - when)} s old")
            body["timestamp_micros"] = int(when * 1_000_000)
        params = self._render_params(job.values, secret)
        body["events"] = [{"name": s.event_name, "params": params}]
        return body

    def _render_params(
        self, values: Mapping[str, str], secret: Callable[[str], str] | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        limit = self.settings.max_value_length
        for name, value in self._params.items():
            if not isinstance(value, Template):
                out[name] = value  # a YAML number or boolean, sent as it is
                continue
            text = value.render(values, secret=secret)
            if not text:
                continue  # an empty param is left out rather than sent as ""
            if name in NUMERIC_PARAMS or _NUMERIC_TEMPLATE.fullmatch(value.source):
                out[name] = _number(name, text)
            elif len(text) > limit:
                # Cutting it would corrupt ids such as transaction_id: refuse, visibly.
                raise PermanentError(
                    "param_too_long", f"param {name} renders {len(text)} characters (> {limit})"
                )
            else:
                out[name] = text
        return out

    def preview(self, job: Job) -> RequestRecord:
        body = self.payload(job, self.resources.clock.now(), None)
        headers = {"Content-Type": "application/json"}
        return RequestRecord("POST", self._url(None), headers, _dumps(body).decode())

    async def send(self, job: Job) -> None:
        secret = secret_lookup(job, self.resources)
        now = self.resources.clock.now()
        body = _dumps(self.payload(job, now, secret))
        url = self._url(secret)
        headers = {"Content-Type": "application/json"}
        response = await send_http(self, job, "POST", url, headers, body)
        # GA answers 2xx even for malformed events: only transport and server errors show.
        classify_status(response, now)
        if self.settings.validate_only:
            check_validation(response)


def _number(name: str, text: str) -> int | float:
    try:
        number = Decimal(text.strip())
    except InvalidOperation as err:
        raise PermanentError("param_not_a_number", f"param {name} is not a number") from err
    if not number.is_finite():
        raise PermanentError("param_not_a_number", f"param {name} is not a finite number")
    return int(number) if number == number.to_integral_value() else float(number)


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def check_validation(response: HttpResponse) -> None:
    """The debug endpoint's verdict: any validationMessages entry is a permanent error.
    https://developers.google.com/analytics/devguides/collection/protocol/ga4/validating-events"""
    try:
        messages = json.loads(response.body).get("validationMessages")
    except (ValueError, AttributeError) as err:
        raise RetryableError("bad_response", "the debug endpoint did not answer JSON") from err
    if not isinstance(messages, list):
        raise RetryableError("bad_response", "no validationMessages in the answer")
    if messages:
        first = messages[0] if isinstance(messages[0], dict) else {}
        where = first.get("fieldPath", "?")
        code = first.get("validationCode", "?")
        raise PermanentError("validation_failed", f"{code} at {where} ({len(messages)} in all)")


def build(settings: Settings, resources: Resources) -> GoogleAnalytics:
    return GoogleAnalytics(settings, resources)
