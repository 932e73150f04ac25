"""trustedform_claim: a TrustedForm v4 retain of the conversion's certificate, whose API key is
only ever sent to https://cert.trustedform.com/ (the platform's "Trusted Form Claim").

Provider docs: https://activeprospect.redoc.ly/docs/trustedform/api/v4.0/tag/Certificate-URL/
and the warning of https://activeprospect.redoc.ly/docs/trustedform/api/v2.0/overview/ ("do not
make a request unless the URL starts with https://cert.trustedform.com, otherwise you may expose
your TrustedForm credentials to someone else").
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from daemon.actions.base import (
    ActionSettings,
    Job,
    RequestRecord,
    Resources,
    SecretTemplateStr,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import PermanentError, RetryableError
from daemon.httpstatus import HttpResponse, classify_status
from daemon.macros import TemplateStr, parse_template

CERT_ORIGIN = "https://cert.trustedform.com"
# The key of Resources.overrides that tests set (from code, never from a rule or a conversion) to
# send to a fake instead, e.g. "http://127.0.0.1:PORT/". The certificate id is put on that base.
OVERRIDE_KEY = "trustedform_base"
# A certificate URL as TrustedForm issues it, matched whole by one anchored expression rather
# than a URL parser: nothing before the host (userinfo), no other host, port 443 at most, and a
# path that is one hexadecimal certificate id. What we send to is rebuilt from the constant
# origin and the id, never taken from the conversion's text.
_CERT_URL = re.compile(r"https://cert\.trustedform\.com(?::443)?/([0-9a-fA-F]{20,255})")
_PROPERTY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BAD_CERT_URL = "the certificate URL is not https://cert.trustedform.com/<certificate id>"


class Settings(ActionSettings):
    type: Literal["trustedform_claim"]
    api_key: SecretTemplateStr
    cert_url: TemplateStr = parse_template("{trusted_form_cert_url}")
    email: TemplateStr = parse_template("{email}")
    phone: TemplateStr = parse_template("{phone}")
    vendor: TemplateStr = parse_template("{affiliate}")
    insights: list[str] = Field(default_factory=list, max_length=64)
    timeout: Duration | None = Field(default=None, gt=0, le=60)

    @field_validator("insights")
    @classmethod
    def _properties(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _PROPERTY.fullmatch(name):
                raise ValueError(f"{name!r} is not an insights property name (e.g. age_seconds)")
        if len(set(value)) != len(value):
            raise ValueError("an insights property is listed twice (each is billed)")
        return value


class TrustedFormClaim:
    idempotent: ClassVar[bool] = True  # a repeated v4 retain answers previously_retained: true

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._base = resources.overrides.get(OVERRIDE_KEY) or f"{CERT_ORIGIN}/"

    @property
    def destination(self) -> str:
        if self._base.startswith(CERT_ORIGIN + "/"):
            return f"{CERT_ORIGIN}:443"
        return self._base.rstrip("/")

    def _url(self, job: Job, secret: Callable[[str], str] | None) -> str:
        """Checked before anything else is rendered, so a bad URL never costs the key."""
        raw = self.settings.cert_url.render(job.values, secret=secret).strip()
        match = _CERT_URL.fullmatch(raw)
        if match is None:
            detail = "no certificate URL" if not raw else _BAD_CERT_URL
            raise PermanentError("bad_cert_url", detail)
        return self._base.rstrip("/") + "/" + match.group(1)

    def _body(self, job: Job, secret: Callable[[str], str] | None) -> bytes:
        s = self.settings
        match_lead = {
            name: value
            for name, template in (("email", s.email), ("phone", s.phone))
            if (value := template.render(job.values, secret=secret).strip())
        }
        if not match_lead:
            # TrustedForm requires match_lead with retain; the call would fail (and be billed).
            raise PermanentError("nothing_to_match", "neither an email nor a phone to match")
        retain = {"reference": job.idempotency_key}
        vendor = s.vendor.render(job.values, secret=secret).strip()
        if vendor:
            retain["vendor"] = vendor
        body: dict[str, Any] = {"match_lead": match_lead, "retain": retain}
        if s.insights:
            body["insights"] = {"properties": list(s.insights)}
        return json.dumps(body, separators=(",", ":")).encode()

    def _headers(self, job: Job, key: str) -> dict[str, str]:
        token = base64.b64encode(f"API:{key}".encode()).decode()
        job.redactor.add(token)
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "api-version": "4.0",
            "Authorization": f"Basic {token}",
        }

    def preview(self, job: Job) -> RequestRecord:
        url = self._url(job, None)
        body = self._body(job, None)
        headers = job.redactor.headers(self._headers(job, "****"))
        return RequestRecord("POST", url, headers, body.decode())

    async def send(self, job: Job) -> None:
        secret = secret_lookup(job, self.resources)
        url = self._url(job, secret)
        body = self._body(job, secret)
        headers = self._headers(job, self.settings.api_key.render(job.values, secret=secret))
        response = await send_http(self, job, "POST", url, headers, body, follow_redirects=False)
        classify_status(response, self.resources.clock.now())
        _check_outcome(response)


def _check_outcome(response: HttpResponse) -> None:
    """TrustedForm answers 200 whatever the outcome: "Best practice is to base your purchase
    decision on this property" (v4.0 Certificate-URL doc)."""
    try:
        data = json.loads(response.body)
    except ValueError:
        data = None
    outcome = data.get("outcome") if isinstance(data, dict) else None
    if outcome == "success":
        return
    if outcome in ("failure", "error"):
        raise PermanentError(f"trustedform_{outcome}")
    # Not the v4 shape (an account pinned to v2/v3, a proxy's page): retrying is safe.
    raise RetryableError("trustedform_bad_response", "no v4 outcome in the answer")


def build(settings: Settings, resources: Resources) -> TrustedFormClaim:
    return TrustedFormClaim(settings, resources)
