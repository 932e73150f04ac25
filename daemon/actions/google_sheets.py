"""google_sheets: append one row per delivery to a Google Sheet, as a service account.

Append: https://developers.google.com/sheets/api/reference/rest/v4/spreadsheets.values/append
Service-account token (OAuth 2.0 JWT bearer grant, RFC 7523):
https://developers.google.com/identity/protocols/oauth2/service-account#httprest
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlencode

import jwt
from pydantic import Field, field_validator

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
from daemon.errors import OutcomeUnknownError, PermanentError, RetryableError
from daemon.httpstatus import HttpResponse, parse_retry_after, status_unwell
from daemon.macros import MASK, PATH_SEGMENT_SAFE, TemplateStr
from daemon.urltemplate import UrlTemplate

SCOPE = "https://www.googleapis.com/auth/spreadsheets"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 -- a URL, not a password
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME = 3600  # the longest Google grants
EXPIRY_MARGIN = 60.0  # a cached token is renewed this long before it expires
# Google asks to retry these with backoff (https://developers.google.com/sheets/api/limits);
# the append did not happen. Other 5xx (a gateway's 502/504) may come after the write.
RETRYABLE = frozenset({408, 425, 429, 500, 503})
_TAG = re.compile(r"[A-Za-z_]{1,40}")


class Settings(ActionSettings):
    type: Literal["google_sheets"]
    spreadsheet_id: str
    range: str = "Sheet1!A1"
    values: list[TemplateStr] = Field(min_length=1, max_length=500)
    credentials: SecretTemplateStr  # the service account's JSON key
    base_url: BaseUrlStr = UrlTemplate("https://sheets.googleapis.com")
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("spreadsheet_id")
    @classmethod
    def _spreadsheet(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{10,128}", value):
            raise ValueError(
                "must be the id from the sheet's URL (docs.google.com/spreadsheets/d/ID/edit)"
            )
        return value

    @field_validator("range")
    @classmethod
    def _range(cls, value: str) -> str:
        if not value.strip() or len(value) > 200 or re.search(r"[\x00-\x1f\x7f]", value):
            raise ValueError("must be an A1 range such as Sheet1!A1 or 'Leads 2026'!A:F")
        return value


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: str
    private_key_id: str | None
    token_uri: str


def parse_key(text: str) -> ServiceAccount:
    """The fields of a service-account JSON key; PermanentError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError:
        # Not chained: a JSONDecodeError keeps the whole document (the key) in `.doc`.
        raise PermanentError("bad_credentials", "the credentials secret is not JSON") from None
    if not isinstance(data, dict):
        raise PermanentError("bad_credentials", "the credentials secret is not a JSON object")
    missing = [n for n in ("client_email", "private_key") if not isinstance(data.get(n), str)]
    if missing:
        raise PermanentError("bad_credentials", f"the key has no {' or '.join(missing)}")
    token_uri = data.get("token_uri") or DEFAULT_TOKEN_URI
    if not isinstance(token_uri, str) or not token_uri.startswith(("https://", "http://")):
        raise PermanentError("bad_credentials", "the key's token_uri is not an http(s) URL")
    key_id = data.get("private_key_id")
    key_id = key_id if isinstance(key_id, str) and key_id else None
    return ServiceAccount(data["client_email"], data["private_key"], key_id, token_uri)


def _json(response: HttpResponse) -> Any:
    try:
        return json.loads(response.body)
    except ValueError:
        return None


class GoogleSheets:
    idempotent: ClassVar[bool] = False  # an append repeated after a lost answer adds a row

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        base = settings.base_url.source.rstrip("/")
        cell_range = quote(settings.range, safe=PATH_SEGMENT_SAFE)
        self.url = (
            f"{base}/v4/spreadsheets/{settings.spreadsheet_id}/values/{cell_range}:append"
            "?valueInputOption=RAW&insertDataOption=INSERT_ROWS"
        )
        # Access tokens by (client_email, token_uri): (token, renew at). It lives as long as
        # this action, which a reload rebuilds, so a rotated key never meets an old token long.
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @property
    def destination(self) -> str:
        return origin(self.settings.base_url)

    def _body(self, job: Job, secret: Callable[[str], str] | None) -> bytes:
        row = [t.render(job.values, secret=secret) for t in self.settings.values]
        body = {"range": self.settings.range, "majorDimension": "ROWS", "values": [row]}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def preview(self, job: Job) -> RequestRecord:
        headers = {"Authorization": f"Bearer {MASK}", "Content-Type": "application/json"}
        return RequestRecord("POST", self.url, headers, self._body(job, None).decode())

    async def send(self, job: Job) -> None:
        secret = secret_lookup(job, self.resources)
        account = parse_key(self.settings.credentials.render({}, secret=secret))
        job.redactor.add(account.private_key)
        if account.private_key_id:
            job.redactor.add(account.private_key_id)
        token = await self._token(job, account)
        body = self._body(job, secret)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        job.record.response_status = job.record.response_excerpt = None  # not the token's
        response = await send_http(self, job, "POST", self.url, headers, body)
        if response.status == 401:
            # Revoked or expired early: an operator's retry should not reuse it.
            self._tokens.pop((account.client_email, account.token_uri), None)
        check_append(response, self.resources.clock.now())

    async def _token(self, job: Job, account: ServiceAccount) -> str:
        key = (account.client_email, account.token_uri)
        async with self._locks.setdefault(key, asyncio.Lock()):  # one fetch for many attempts
            cached = self._tokens.get(key)
            if cached is None or cached[1] <= self.resources.clock.now():
                cached = await self._fetch_token(job, account)
                self._tokens[key] = cached
        job.redactor.add(cached[0])
        return cached[0]

    async def _fetch_token(self, job: Job, account: ServiceAccount) -> tuple[str, float]:
        now = self.resources.clock.now()
        claims = {
            "iss": account.client_email,
            "scope": SCOPE,
            "aud": account.token_uri,
            "iat": int(now),
            "exp": int(now) + TOKEN_LIFETIME,
        }
        headers = {"kid": account.private_key_id} if account.private_key_id else None
        try:
            assertion = jwt.encode(claims, account.private_key, algorithm="RS256", headers=headers)
        except (jwt.PyJWTError, ValueError, TypeError):
            # Not chained: key-parsing errors may quote the key material.
            raise PermanentError("bad_credentials", "the private key is not an RSA key") from None
        job.redactor.add(assertion)
        body = urlencode({"grant_type": GRANT_TYPE, "assertion": assertion}).encode()
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        job.record.set_request(job.redactor, "POST", account.token_uri, form, body)
        response = await self.resources.http.request(
            "POST",
            account.token_uri,
            headers=form,
            data=body,
            timeout=self.settings.timeout or self.resources.timeout,
            idempotent=True,  # asking twice for a token does no harm
        )
        answer = _json(response)
        if isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
            job.redactor.add(answer["access_token"])  # before the answer reaches the record
        job.record.set_response(job.redactor, response.status, response.body)
        return _token_answer(response, answer, now)


def _token_answer(response: HttpResponse, answer: Any, now: float) -> tuple[str, float]:
    """(access token, time to renew it) from the token endpoint's answer (RFC 6749 5.1/5.2)."""
    status = response.status
    if 200 <= status < 300:
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise RetryableError("token_bad_response", "no access_token in the answer")
        lifetime = answer.get("expires_in", TOKEN_LIFETIME)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool):
            lifetime = TOKEN_LIFETIME
        return token, now + max(float(lifetime) - EXPIRY_MARGIN, 0.0)
    if status in RETRYABLE or status >= 500:
        after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RetryableError(
            f"token_http_{status}", retry_after=after, unwell=status_unwell(status)
        )
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, str) and _TAG.fullmatch(error):
        # invalid_grant: a deleted key, a wrong client_email, or this host's clock off by
        # minutes. Trying again cannot fix any of them.
        raise PermanentError(f"token_{error.lower()}", f"HTTP {status} from the token endpoint")
    raise PermanentError(f"token_http_{status}")


def check_append(response: HttpResponse, now: float) -> None:
    """Success is a 2xx; errors carry Google's status (`http_403_permission_denied`)."""
    status = response.status
    if 200 <= status < 300:
        return
    answer = _json(response)
    error = answer.get("error") if isinstance(answer, dict) else None
    tag = error.get("status") if isinstance(error, dict) else None
    reason = f"http_{status}"
    if isinstance(tag, str) and _TAG.fullmatch(tag):
        reason += f"_{tag.lower()}"
    if status in RETRYABLE:
        after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RetryableError(reason, retry_after=after, unwell=status_unwell(status))
    if status >= 500:
        raise OutcomeUnknownError(f"{reason}: the row may have been appended", unwell=True)
    raise PermanentError(reason)


def build(settings: Settings, resources: Resources) -> GoogleSheets:
    return GoogleSheets(settings, resources)
