"""The configurable HTTP list client shared by the list actions (E-Delivery, Opt-Intel, DNPL).

The platforms behind these actions publish no wire API (see docs/actions/lists.md), so every
path, field name, auth placement and success rule is a setting with a documented default
(:mod:`daemon.actions.list_settings`). A delivery becomes one or more calls (one per path the
action plans); each call sends the list id, the mapped fields and the credential, and is judged
by two tiny predicates checked at load: ``success`` (on top of HTTP 2xx) and ``already_there``
(an answer that means the list was already as asked, counted as success). Adding to a set is
idempotent, so every failure after the request was sent is retried, never ``outcome_unknown``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from daemon.actions.base import Job, RequestRecord, Resources, origin, secret_lookup, send_http
from daemon.actions.list_settings import MISSING, Auth, Call, ListSettings, Predicate, retried
from daemon.errors import PermanentError, RenderError
from daemon.httpstatus import HttpResponse, classify_status
from daemon.macros import encode_header, encode_url_component


def normalise(kind: str, value: str) -> str:
    """The MD5 input: a trimmed lower-case email, or a phone's digits only."""
    value = value.strip()
    if kind == "email":
        return value.lower()
    return "".join(c for c in value if c.isascii() and c.isdigit())


def _md5(value: str) -> str:
    if not value:
        return ""
    try:
        return hashlib.md5(value.encode(), usedforsecurity=False).hexdigest()
    except UnicodeEncodeError as err:
        raise RenderError("a value is not valid Unicode text (lone surrogate)") from err


Rendered = tuple[str, dict[str, str], bytes | None]
Secret = Callable[[str], str] | None


class ListClient:
    """One configured list action: plans, renders and judges its calls."""

    # Adding a present contact (or removing an absent one) leaves the list as asked, so a
    # request whose answer was lost is safe to send again: never outcome_unknown.
    idempotent: ClassVar[bool] = True

    def __init__(self, settings: ListSettings, resources: Resources) -> None:
        self.settings = settings
        self.resources = resources

    @property
    def destination(self) -> str:
        return origin(self.settings.calls[0].url)

    def identifier_values(self, job: Job, secret: Secret) -> dict[str, str]:
        """Each identifier field's value as sent (trimmed; normalised and hashed for md5);
        fields that render empty are left out."""
        out: dict[str, str] = {}
        for name, kind in self.settings.identifier_kinds.items():
            value = self.settings.fields[name].render(job.values, secret=secret).strip()
            if self.settings.hashing == "md5":
                # Never hash "": md5("") on a suppression list would match every empty value.
                value = _md5(normalise(kind, value))
            if value:
                out[name] = value
        return out

    def render_all(self, job: Job, secret: Secret) -> list[Rendered]:
        """The requests of this delivery; PermanentError when no identifier has a value."""
        s = self.settings
        idents = self.identifier_values(job, secret)
        present = {s.identifier_kinds[name] for name in idents}
        calls = [c for c in s.calls if c.kinds & present]
        if not calls:
            wanted = ", ".join(sorted(s.identifier_kinds))
            raise PermanentError("no_identifier", f"the conversion has no value for {wanted}")
        return [self._render(call, job, idents, secret) for call in calls]

    def _render(self, call: Call, job: Job, idents: dict[str, str], secret: Secret) -> Rendered:
        s = self.settings
        wire: dict[str, str] = {}
        if s.list_id is not None:
            wire[s.list_id_field] = s.list_id.render(job.values, secret=secret)
        for name, template in s.fields.items():
            kind = s.identifier_kinds.get(name)
            if kind is None:
                wire[name] = template.render(job.values, secret=secret)
            elif kind in call.kinds and name in idents:
                wire[name] = idents[name]
        url = call.url.render_url(job.values, secret=secret)
        headers: dict[str, str] = {}
        if s.auth is not None:
            url = _authorize(s.auth, job, secret, url, headers, wire)
        if s.method == "GET":
            return _add_query(url, _form(wire)), headers, None
        if s.content_type == "form":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return url, headers, _form(wire).encode()
        headers["Content-Type"] = "application/json"
        return url, headers, _json_body(wire)

    def previews(self, job: Job) -> list[RequestRecord]:
        """Every request this job would send, secrets as ****. No I/O."""
        out = []
        for url, headers, body in self.render_all(job, None):
            masked = job.redactor.headers(headers)
            out.append(RequestRecord(self.settings.method, url, masked, _text(body)))
        return out

    def preview(self, job: Job) -> RequestRecord:
        # The Action contract shows one request; `previews` lists all of them.
        return self.previews(job)[0]

    async def send(self, job: Job) -> None:
        """Send each call in order; the first failure ends the attempt (a retry sends again
        from the first call, which is harmless because adding is idempotent)."""
        requests = self.render_all(job, secret_lookup(job, self.resources))
        for url, headers, body in requests:
            response = await send_http(self, job, self.settings.method, url, headers, body)
            self.judge(response)

    def judge(self, response: HttpResponse) -> None:
        """Return when the answer means success (or "already there"); raise otherwise."""
        s = self.settings
        status = response.status
        body = _json(response) if _uses_body(s.success, s.already_there) else MISSING
        there = s.already_there
        if there is not None and not retried(status) and there.matches(status, body):
            return
        classify_status(response, self.resources.clock.now())
        if s.success is not None and not s.success.matches(status, body):
            if body is MISSING and s.success.field is not None:
                raise PermanentError("unexpected_body", "the answer is not a JSON document")
            raise PermanentError("rejected", "the answer does not match `success`")


def _authorize(
    auth: Auth, job: Job, secret: Secret, url: str, headers: dict[str, str], wire: dict[str, str]
) -> str:
    """Put the key where `auth` says (header, wire field or query); the URL to send."""
    if auth.header is not None:
        value = auth.header.value.render(job.values, encode=encode_header, secret=secret)
        headers[auth.header.name] = value
    if auth.body is not None:
        wire[auth.body.name] = auth.body.value.render(job.values, secret=secret)
    if auth.query is not None:
        value = auth.query.value.render(job.values, encode=encode_url_component, secret=secret)
        url = _add_query(url, f"{quote(auth.query.name, safe='')}={value}")
    return url


def _json_body(wire: Mapping[str, str]) -> bytes:
    try:
        return json.dumps(wire, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError as err:
        raise RenderError("a value is not valid Unicode text (lone surrogate)") from err


def _uses_body(*predicates: Predicate | None) -> bool:
    return any(p is not None and p.field is not None for p in predicates)


def _json(response: HttpResponse) -> Any:
    try:
        return json.loads(response.text())
    except ValueError:
        return MISSING


def _add_query(url: str, query: str) -> str:
    if not query:
        return url
    base, hash_, fragment = url.partition("#")
    joined = f"{base}{'&' if '?' in base else '?'}{query}"
    return f"{joined}{hash_}{fragment}"


def _form(wire: Mapping[str, str]) -> str:
    try:
        return urlencode(list(wire.items()), safe="*")  # `*` keeps a masked secret readable
    except UnicodeEncodeError as err:
        raise RenderError("a value is not valid Unicode text (lone surrogate)") from err


def _text(body: bytes | None) -> str | None:
    return body.decode() if body is not None else None
