"""lms_post_lead: posts the lead to a Phonexa LMS instance (`POST {base_url}/lead/`) and reads the
sale's outcome from the answer's `status` (the platform's "Post Lead to LMS").

The post is never repeated blindly: it has no idempotency key, and a lead posted twice can be
auctioned and sold twice ("a duplicate sale is worse than a failed post"). Whatever may have
reached the auction without a clear answer ends as outcome_unknown for an operator.

Wire protocol (no public spec): github.com/ratespecial/phonexa-php (LmsSyncConnector.php,
Requests/PostLead.php, Responses/AbstractLeadResponse.php, tests/fixtures/post-lead-*.json).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

from pydantic import Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    BaseUrlStr,
    Job,
    Redactor,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import OutcomeUnknownError, PermanentError, RenderError
from daemon.httpstatus import HttpResponse, classify_status
from daemon.macros import Template, TemplateStr

SOLD, REJECTED, IN_PROGRESS, ERROR = 1, 2, 3, 4
# Auctions run long: the PHP client waits 120 s. The dispatcher ends every attempt before its
# claim's lease does (DispatcherConfig.attempt_bound), so a long wait cannot let another claim
# post the lead a second time; an attempt it cuts short ends outcome_unknown like our timeout.
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 120.0
_SYSTEM_FIELDS = frozenset(
    {"apiId", "apiPassword", "productId", "testMode", "testSold", "closeConnection"}
)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]-]{0,63}")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


class Settings(ActionSettings):
    type: Literal["lms_post_lead"]
    base_url: BaseUrlStr  # the action adds /lead/
    api_id: TemplateStr
    api_password: SecretTemplateStr
    product_id: int = Field(gt=0)
    fields: dict[str, TemplateStr] = Field(min_length=1)
    format: Literal["json", "form"] = "json"
    test_mode: bool = False
    test_sold: bool = False
    timeout: Duration = Field(default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT)

    @field_validator("fields")
    @classmethod
    def _field_names(cls, value: dict[str, Template]) -> dict[str, Template]:
        for name in value:
            if name in _SYSTEM_FIELDS:
                raise ValueError(f"{name!r} is set by the action, not in fields")
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an LMS field name (e.g. firstName, cellPhone)")
        return value

    @model_validator(mode="after")
    def _test_sold_needs_test_mode(self) -> Settings:
        if self.test_sold and not self.test_mode:
            raise ValueError("test_sold applies only with test_mode: true")
        return self


class LmsPostLead:
    idempotent: ClassVar[bool] = False  # a replay can be auctioned and sold again

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self.url = settings.base_url.source.rstrip("/") + "/lead/"

    @property
    def destination(self) -> str:
        return origin(self.settings.base_url)

    def _render(
        self, job: Job, secret: Callable[[str], str] | None
    ) -> tuple[dict[str, str], bytes]:
        s = self.settings
        pairs: list[tuple[str, str | int]] = [
            ("apiId", s.api_id.render(job.values, secret=secret)),
            ("apiPassword", s.api_password.render(job.values, secret=secret)),
            ("productId", s.product_id),
        ]
        for name, template in s.fields.items():
            value = template.render(job.values, secret=secret)
            if value:  # a missing value is left out, so LMS says "required" instead of "invalid"
                pairs.append((name, value))
        pairs += [
            (flag, 1) for flag, on in (("testMode", s.test_mode), ("testSold", s.test_sold)) if on
        ]
        try:
            if s.format == "form":
                body = urlencode(pairs, safe="*").encode()
                kind = "application/x-www-form-urlencoded"
            else:
                body = json.dumps(dict(pairs), ensure_ascii=False, separators=(",", ":")).encode()
                kind = "application/json"
        except UnicodeEncodeError as err:
            raise RenderError("a value is not valid Unicode text (lone surrogate)") from err
        return {"Content-Type": kind, "Accept": "application/json"}, body

    def preview(self, job: Job) -> RequestRecord:
        headers, body = self._render(job, None)
        return RequestRecord("POST", self.url, headers, body.decode())

    async def send(self, job: Job) -> None:
        headers, body = self._render(job, secret_lookup(job, self.resources))
        response = await send_http(self, job, "POST", self.url, headers, body)
        if 500 <= response.status < 600:
            # LMS answers 200 whatever the outcome; a 5xx comes from a gateway timing out on a
            # long auction or a failure part-way through it: the lead may exist, even be sold.
            raise OutcomeUnknownError(f"http_{response.status}")
        # 408, 425 and 429 say the request was refused before any processing: retried.
        classify_status(response, self.resources.clock.now())
        _check_status(response, job.redactor)


def _check_status(response: HttpResponse, redactor: Redactor) -> None:
    """The `status` of the answer: 1 sold, 2 rejected, 3 in progress, 4 error."""
    try:
        data: Any = json.loads(response.body)
    except ValueError:
        data = None
    status = data.get("status") if isinstance(data, dict) else None
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if status == SOLD:
        return
    if status == IN_PROGRESS:
        # Accepted and still being auctioned: the lead is in LMS, posting it again would
        # duplicate it. The attempt's response excerpt keeps the lead_id to look it up.
        return
    if status == REJECTED:
        raise PermanentError("lms_rejected", "no buyer took the lead")
    if status == ERROR and isinstance(data, dict):
        reason, detail = _error_reason(data.get("errors"))
        raise PermanentError(reason, redactor.redact(detail))
    raise OutcomeUnknownError("the answer carries no known LMS status")


def _error_reason(errors: Any) -> tuple[str, str]:
    """Status 4 carries `errors`: [{"email": "required"}], [{"Duplicate Application": ...}],
    [{"Authorization Failed...": ""}] or [["Current user is disabled..."]]."""
    first = errors[0] if isinstance(errors, list) and errors else None
    key = ""
    if isinstance(first, dict) and first:
        key = str(next(iter(first)))
    elif isinstance(first, list) and first:
        key = str(first[0])
    elif isinstance(first, str):
        key = first
    lowered = key.lower()
    if lowered.startswith("duplicate"):
        return "lms_duplicate", ""
    if lowered.startswith("authorization failed"):
        return "lms_auth_failed", ""
    if "user is disabled" in lowered:
        return "lms_user_disabled", ""
    return "lms_error", f"first error: {_PRINTABLE.sub('?', key)[:80]}" if key else ""


def build(settings: Settings, resources: Resources) -> LmsPostLead:
    return LmsPostLead(settings, resources)
