"""ping_url: a GET or POST to a URL templated with macros (the platform's "Ping Url")."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import re2  # type: ignore[import-untyped]
from pydantic import ConfigDict, Field, field_validator, model_validator

from daemon.actions.base import (
    ActionSettings,
    Job,
    RequestRecord,
    Resources,
    origin,
    secret_lookup,
    send_http,
)
from daemon.durations import Duration
from daemon.errors import PermanentError
from daemon.httpstatus import classify_status
from daemon.macros import (
    Template,
    TemplateStr,
    encode_header,
    parse_json_templates,
    render_form,
    render_json,
)
from daemon.outbound import OutboundHttp
from daemon.urltemplate import UrlTemplateStr

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the rule's error line, not stderr noise
_RE2_OPTIONS.max_mem = 8 << 20  # a pattern whose automaton needs more is refused at load
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def compile_expect(pattern: str) -> Any:
    """`expect` as an RE2 regex: matching takes time linear in the body, whatever the pattern
    (`^(a+)+$` against a hostile destination's `aaaa…!` cannot stall the daemon). RE2 has no
    backreferences or lookarounds: such a pattern is refused at load."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as err:
        first = err.args[0] if err.args else err
        detail = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
        raise ValueError(
            f"expect is not a valid regular expression: {detail} (RE2 syntax: no "
            "backreferences or lookarounds)"
        ) from err


class Settings(ActionSettings):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["ping_url"]
    method: Literal["GET", "POST"] = "GET"
    url: UrlTemplateStr
    headers: dict[str, TemplateStr] = Field(default_factory=dict)
    form: dict[str, TemplateStr] | None = None
    json_body: Any = Field(default=None, alias="json")
    expect: str | None = Field(default=None, max_length=500)
    idempotency_header: bool = True
    timeout: Duration | None = Field(default=None, gt=0, le=120)

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, Template]) -> dict[str, Template]:
        for name in value:
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by postbackd and cannot be templated")
        return value

    @field_validator("json_body")
    @classmethod
    def _json_templates(cls, value: Any) -> Any:
        return None if value is None else parse_json_templates(value)

    @field_validator("expect")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_expect(value)
        return value

    @model_validator(mode="after")
    def _body(self) -> Settings:
        if self.form is not None and self.json_body is not None:
            raise ValueError("give either form or json, not both")
        if self.method == "GET" and (self.form is not None or self.json_body is not None):
            raise ValueError("a GET request has no body: put the values in the URL's query")
        return self


class PingUrl:
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: Settings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources
        self._expect = compile_expect(settings.expect) if settings.expect else None
        self._destination = origin(settings.url)  # the settings are immutable
        # The headers to render (none for most rules: then no comprehension runs).
        self._headers = tuple(settings.headers.items())
        # Its send awaits one send_http and nothing else: through the shared client itself,
        # that ends by the job's deadline, and the dispatcher keeps no timer of its own around
        # it (daemon.actions.base.is_bounded). Through a wrapper (an affiliate's PolicyHttp,
        # which may also resolve names before each hop) it does not: the dispatcher's timer.
        self.bounded = type(resources.http) is OutboundHttp

    @property
    def destination(self) -> str:
        return self._destination

    def _render(
        self, job: Job, secret: Callable[[str], str] | None
    ) -> tuple[str, dict[str, str], bytes | None]:
        s = self.settings
        values = job.values
        url = s.url.render_url(values, secret=secret)
        headers = (
            {
                name: t.render(values, encode=encode_header, secret=secret)
                for name, t in self._headers
            }
            if self._headers
            else {}
        )
        if s.idempotency_header:
            headers["Idempotency-Key"] = job.idempotency_key
        body: bytes | None = None
        if s.form is not None:
            body = render_form(s.form, job.values, secret=secret).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif s.json_body is not None:
            rendered = render_json(s.json_body, job.values, secret=secret)
            body = json.dumps(rendered, ensure_ascii=False, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json")
        return url, headers, body

    def preview(self, job: Job) -> RequestRecord:
        url, headers, body = self._render(job, None)
        masked = job.redactor.headers(headers)
        return RequestRecord(self.settings.method, url, masked, body.decode() if body else None)

    async def send(self, job: Job) -> None:
        url, headers, body = self._render(job, secret_lookup(job, self.resources))
        response = await send_http(self, job, self.settings.method, url, headers, body)
        classify_status(response, self.resources.clock.now())
        if self._expect is not None and not self._expect.search(response.text()):
            raise PermanentError("unexpected_body", "the answer does not match `expect`")


def build(settings: Settings, resources: Resources) -> PingUrl:
    return PingUrl(settings, resources)
